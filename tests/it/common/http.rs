//! Plain HTTP and git-over-HTTP helpers for the tests of the proxy's HTTP port.

use std::io::{Read, Write};
use std::path::Path;

use super::git;

/// Runs git with no way to ask for a password.
pub fn git_http(dir: &Path, args: &[&str]) -> std::process::Output {
    git(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .args(["-c", "credential.helper="])
        .args(args)
        .output()
        .unwrap()
}

pub fn ok(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(|line| line.replace('\t', " ")).collect();
    lines.sort();
    lines
}

/// A plain HTTP/1.1 POST: status and body.
pub fn http_post(base: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Vec<u8>) {
    let address = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&response[..split]).into_owned();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, response[split + 4..].to_vec())
}

pub fn basic(token: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("git:{token}"))
    )
}

/// A plain HTTP/1.1 GET: status, headers and body.
pub fn http_get(base: &str, path: &str, authorization: Option<&str>) -> (u16, String, String) {
    let address = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n");
    if let Some(authorization) = authorization {
        request.push_str(&format!("Authorization: {authorization}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// Opens a git-over-HTTP push of `length` body bytes to `default/RELATIVE_PATH` on `base` and
/// sends its head, over plain HTTP/1.1; the caller sends the body as it likes.
pub fn start_push(
    base: &str,
    relative_path: &str,
    token: &str,
    length: usize,
) -> std::net::TcpStream {
    let address = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    let request = format!(
        "POST /default/{relative_path}/git-receive-pack HTTP/1.1\r\nHost: {address}\r\n\
         Authorization: {}\r\nContent-Type: application/x-git-receive-pack-request\r\n\
         Content-Length: {length}\r\nConnection: close\r\n\r\n",
        basic(token)
    );
    stream.write_all(request.as_bytes()).unwrap();
    stream
}
