//! A minimal HTTP/1.1 front end, written for the tests, that turns git's smart HTTP requests
//! into SmartHttpService calls on a gitfleet server (a node or the proxy): one call per
//! request, bodies passed through as they are. It stands in for the proxy's HTTP gateway.

use std::io::Read;

use gitfleet::client::AuthedChannel;
use gitfleet::proto::smart_http_service_client::SmartHttpServiceClient;
use gitfleet::proto::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::header;

/// Errors the node reported that the front end could not hand to git as an HTTP error
/// because data had already been sent; the test fails if there are any.
pub type Hidden = std::sync::Arc<std::sync::Mutex<Vec<String>>>;

/// Serves smart HTTP on 127.0.0.1 in front of the server `channel` leads to; returns the base
/// URL, under which repositories are `STORAGE/RELATIVE_PATH`.
pub async fn start_front_end(channel: AuthedChannel, hidden: Hidden) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((connection, _)) = listener.accept().await {
            tokio::spawn(serve(connection, channel.clone(), hidden.clone()));
        }
    });
    format!("http://{address}")
}

struct HttpRequest {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl HttpRequest {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

async fn read_request(connection: &mut TcpStream) -> HttpRequest {
    let mut buffer = Vec::new();
    let (method, target, headers, body_start) = loop {
        let mut chunk = [0; 8192];
        let read = connection.read(&mut chunk).await.unwrap();
        assert!(read > 0, "connection closed inside the headers");
        buffer.extend_from_slice(&chunk[..read]);
        let mut parsed_headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut parsed_headers);
        if let httparse::Status::Complete(length) = request.parse(&buffer).unwrap() {
            let headers = request
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            break (
                request.method.unwrap().to_owned(),
                request.path.unwrap().to_owned(),
                headers,
                length,
            );
        }
    };
    let mut request = HttpRequest {
        method,
        target,
        headers,
        body: buffer.split_off(body_start),
    };
    if let Some(length) = request
        .header("content-length")
        .map(|v| v.parse::<usize>().unwrap())
    {
        while request.body.len() < length {
            let mut chunk = vec![0; length - request.body.len()];
            let read = connection.read(&mut chunk).await.unwrap();
            request.body.extend_from_slice(&chunk[..read]);
        }
    } else if request.header("transfer-encoding") == Some("chunked") {
        request.body = read_chunked(connection, request.body).await;
    }
    if request.header("content-encoding") == Some("gzip") {
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&request.body[..])
            .read_to_end(&mut plain)
            .unwrap();
        request.body = plain;
    }
    request
}

async fn read_chunked(connection: &mut TcpStream, mut raw: Vec<u8>) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        while !raw.windows(2).any(|w| w == b"\r\n") {
            let mut chunk = [0; 8192];
            let read = connection.read(&mut chunk).await.unwrap();
            raw.extend_from_slice(&chunk[..read]);
        }
        let line_end = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&raw[..line_end]).unwrap().trim(), 16)
            .unwrap();
        while raw.len() < line_end + 2 + size + 2 {
            let mut chunk = [0; 8192];
            let read = connection.read(&mut chunk).await.unwrap();
            raw.extend_from_slice(&chunk[..read]);
        }
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&raw[line_end + 2..line_end + 2 + size]);
        raw.drain(..line_end + 2 + size + 2);
    }
}

/// One request per connection: git opens another for the next round.
async fn serve(mut connection: TcpStream, channel: AuthedChannel, hidden: Hidden) {
    let request = read_request(&mut connection).await;
    let git_protocol = request
        .header("git-protocol")
        .unwrap_or_default()
        .to_owned();
    let (path, query) = request
        .target
        .split_once('?')
        .unwrap_or((&request.target, ""));
    let (repository, endpoint) = path.trim_start_matches('/').rsplit_once(".git/").unwrap();
    let (storage, relative_path) = repository.split_once('/').unwrap();
    let header = header(storage, &format!("{relative_path}.git"));
    let mut client = SmartHttpServiceClient::new(channel);
    let (content_type, result) =
        match (request.method.as_str(), endpoint, query) {
            ("GET", "info/refs", "service=git-upload-pack") => (
                "application/x-git-upload-pack-advertisement",
                collect(
                    client
                        .info_refs_upload_pack(InfoRefsRequest {
                            repository: header,
                            git_protocol,
                        })
                        .await,
                    |m| m.data,
                )
                .await,
            ),
            ("GET", "info/refs", "service=git-receive-pack") => (
                "application/x-git-receive-pack-advertisement",
                collect(
                    client
                        .info_refs_receive_pack(InfoRefsRequest {
                            repository: header,
                            git_protocol,
                        })
                        .await,
                    |m| m.data,
                )
                .await,
            ),
            ("POST", "git-upload-pack", _) => {
                let messages = request.body.chunks(16 * 1024).enumerate().map(|(i, data)| {
                    PostUploadPackRequest {
                        repository: if i == 0 { header.clone() } else { None },
                        git_protocol: git_protocol.clone(),
                        data: data.to_vec().into(),
                    }
                });
                let messages: Vec<_> = messages.collect();
                (
                    "application/x-git-upload-pack-result",
                    collect(
                        client.post_upload_pack(tokio_stream::iter(messages)).await,
                        |m| m.data,
                    )
                    .await,
                )
            }
            ("POST", "git-receive-pack", _) => {
                let messages = request.body.chunks(16 * 1024).enumerate().map(|(i, data)| {
                    PostReceivePackRequest {
                        repository: if i == 0 { header.clone() } else { None },
                        git_protocol: git_protocol.clone(),
                        data: data.to_vec().into(),
                        ..Default::default()
                    }
                });
                let messages: Vec<_> = messages.collect();
                (
                    "application/x-git-receive-pack-result",
                    collect(
                        client.post_receive_pack(tokio_stream::iter(messages)).await,
                        |m| m.data,
                    )
                    .await,
                )
            }
            other => panic!("unexpected request {other:?}"),
        };
    // A push the node refused still carries git's report, which git shows; any other error
    // after data would be lost on the way, so the test fails on it.
    let result = result.map(|(body, trailing)| {
        if let Some(status) = trailing {
            let reported =
                endpoint == "git-receive-pack" && body.windows(7).any(|w| w == b"unpack ");
            if !reported {
                hidden
                    .lock()
                    .unwrap()
                    .push(format!("{endpoint}: {status:?}"));
            }
        }
        body
    });
    let response = match result {
        Ok(body) => {
            let mut response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nCache-Control: no-cache\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            response.extend_from_slice(&body);
            response
        }
        Err(status) => {
            let message = format!("{}\n", status.message());
            format!("HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{message}", message.len()).into_bytes()
        }
    };
    connection.write_all(&response).await.unwrap();
    let _ = connection.shutdown().await;
}

/// The whole body of a streamed response, and the error that ended it after some data.
async fn collect<M>(
    response: Result<tonic::Response<tonic::Streaming<M>>, tonic::Status>,
    data: impl Fn(M) -> bytes::Bytes,
) -> Result<(Vec<u8>, Option<tonic::Status>), tonic::Status> {
    let mut stream = response?.into_inner();
    let mut body = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(message)) => body.extend_from_slice(&data(message)),
            Ok(None) => return Ok((body, None)),
            Err(status) if body.is_empty() => return Err(status),
            Err(status) => return Ok((body, Some(status))),
        }
    }
}

// git blocks the test's thread; the front end needs threads of its own.
