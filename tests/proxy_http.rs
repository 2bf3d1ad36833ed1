//! git over HTTP against the proxy's own smart HTTP port, with the real git CLI.

mod common;

use std::io::{Read, Write};
use std::path::Path;

use common::cluster::{Cluster, READ_TOKEN, WRITE_TOKEN};
use common::*;

/// Runs git with no way to ask for a password.
fn git_http(dir: &Path, args: &[&str]) -> std::process::Output {
    git(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .args(["-c", "credential.helper="])
        .args(args)
        .output()
        .unwrap()
}

fn ok(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn sorted_lines(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().map(|line| line.replace('\t', " ")).collect();
    lines.sort();
    lines
}

/// Makes the [`make_history`] work tree in a new scratch directory and pushes its main over
/// HTTP to `relative_path` (written as in a URL). Returns the scratch directory and the tree.
fn push_main_over_http(
    cluster: &Cluster,
    relative_path: &str,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    make_history(&work);
    let url = cluster.git_url(WRITE_TOKEN, relative_path);
    ok(&git_http(&work, &["push", "-q", &url, "main"]));
    (dir, work)
}

/// A plain HTTP/1.1 POST: status and body.
fn http_post(base: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, Vec<u8>) {
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

fn basic(token: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("git:{token}"))
    )
}

/// A plain HTTP/1.1 GET: status, headers and body.
fn http_get(base: &str, path: &str, authorization: Option<&str>) -> (u16, String, String) {
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

#[tokio::test(flavor = "multi_thread")]
async fn clone_push_fetch_and_delete_over_http_with_protocol_v0_and_v2() {
    let cluster = Cluster::start(3).await;
    cluster.create("web/project.git").await;
    let url = cluster.git_url(WRITE_TOKEN, "web/project.git");
    let dir = tempfile::tempdir().unwrap();

    // An empty repository clones.
    let output = git_http(dir.path(), &["clone", &url, "empty"]);
    ok(&output);
    assert!(String::from_utf8_lossy(&output.stderr).contains("empty repository"));

    // A history with several branches and tags.
    let work = dir.path().join("work");
    make_history(&work);
    ok(&git_http(
        &work,
        &["push", "-q", &url, "main", "feature", "v1", "v2"],
    ));
    let record = cluster.record("web/project.git").await;
    assert_eq!(record.generation, 1);
    assert_eq!(record.up_to_date().count(), 3);

    for version in ["0", "2"] {
        let name = format!("clone-v{version}");
        let output = git(dir.path())
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_TRACE_PACKET", "1")
            .args([
                "-c",
                &format!("protocol.version={version}"),
                "clone",
                "-q",
                &url,
                &name,
            ])
            .output()
            .unwrap();
        ok(&output);
        let trace = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            trace.contains("git< version 2"),
            version == "2",
            "protocol v{version}"
        );
        let clone = dir.path().join(&name);
        // Every ref, and the working tree.
        let advertised = ok(&git_http(&clone, &["ls-remote", "--refs", &url]));
        let pushed = run_git(&work, &["show-ref"]);
        assert_eq!(sorted_lines(&advertised), sorted_lines(&pushed));
        assert_eq!(
            run_git(&clone, &["rev-parse", "HEAD^{tree}"]),
            run_git(&work, &["rev-parse", "main^{tree}"])
        );
        assert_eq!(
            std::fs::read_to_string(clone.join("src/deep/lib.rs")).unwrap(),
            "pub fn answer() -> u32 { 42 }\n"
        );
    }

    // A second push, fetched into a clone.
    commit_branch(&work, "second");
    ok(&git_http(&work, &["push", "-q", &url, "second"]));
    let clone = dir.path().join("clone-v2");
    ok(&git_http(&clone, &["fetch", "-q", "origin"]));
    assert_eq!(
        run_git(&clone, &["rev-parse", "origin/second"]),
        run_git(&work, &["rev-parse", "second"])
    );

    // A branch deleted by push.
    ok(&git_http(&work, &["push", "-q", &url, ":feature"]));
    let advertised = ok(&git_http(&work, &["ls-remote", "--refs", &url]));
    assert!(!advertised.contains("refs/heads/feature"), "{advertised}");
    assert_eq!(cluster.record("web/project.git").await.generation, 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_decide_who_reads_and_who_pushes() {
    let cluster = Cluster::start(3).await;
    cluster.create("guarded.git").await;
    let (dir, _work) = push_main_over_http(&cluster, "guarded.git");

    // No token, and a wrong one: 401 with a challenge, so git would ask for a password.
    let (status, head, _) = http_get(
        &cluster.git_http,
        "/default/guarded.git/info/refs?service=git-upload-pack",
        None,
    );
    assert_eq!(status, 401);
    assert!(
        head.to_lowercase().contains("www-authenticate: basic"),
        "{head}"
    );
    let plain = format!(
        "{}/default/guarded.git",
        cluster.git_http.replace("http://", "http://git@")
    );
    let output = git_http(dir.path(), &["clone", &plain, "anonymous"]);
    assert!(!output.status.success());
    let wrong = cluster.git_url("not-a-token-at-all-0000", "guarded.git");
    let output = git_http(dir.path(), &["clone", &wrong, "wrong"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("Authentication failed"), "{stderr}");

    // A read-only token clones, and may not push.
    let read_url = cluster.git_url(READ_TOKEN, "guarded.git");
    ok(&git_http(dir.path(), &["clone", "-q", &read_url, "reader"]));
    let reader = dir.path().join("reader");
    commit_branch(&reader, "not-allowed");
    let output = git_http(&reader, &["push", &read_url, "not-allowed"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("403"), "{stderr}");
    assert!(stderr.contains("may read but not push"), "{stderr}");
    assert_eq!(cluster.record("guarded.git").await.generation, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_to_a_missing_repository_creates_it_only_where_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    make_history(&work);

    let closed = Cluster::start(3).await;
    let output = git_http(
        &work,
        &["push", &closed.git_url(WRITE_TOKEN, "new/repo.git"), "main"],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("default/new/repo.git does not exist"),
        "{stderr}"
    );

    let open = Cluster::start_on(
        common::db::fresh_database().await,
        3,
        3,
        "",
        "push_to_create = true",
    )
    .await;
    ok(&git_http(
        &work,
        &[
            "push",
            "-q",
            &open.git_url(WRITE_TOKEN, "new/repo.git"),
            "main",
        ],
    ));
    let record = open.record("new/repo.git").await;
    assert_eq!(record.generation, 1);
    assert_eq!(record.up_to_date().count(), 3);
    // Reading never creates.
    let output = git_http(
        dir.path(),
        &["clone", &open.git_url(READ_TOKEN, "other.git"), "other"],
    );
    assert!(!output.status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_50_mb_push_and_clone_over_http() {
    let cluster = Cluster::start(3).await;
    cluster.create("big.git").await;
    let url = cluster.git_url(WRITE_TOKEN, "big.git");
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    make_history(&work);
    let noise: Vec<u8> = (0..50_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(work.join("noise.bin"), &noise).unwrap();
    run_git(&work, &["add", "noise.bin"]);
    run_git(&work, &["commit", "-q", "-m", "noise"]);
    ok(&git_http(&work, &["push", "-q", &url, "main"]));
    ok(&git_http(dir.path(), &["clone", "-q", &url, "clone"]));
    let cloned = std::fs::read(dir.path().join("clone/noise.bin")).unwrap();
    assert_eq!(cloned.len(), noise.len());
    assert!(cloned == noise, "the clone's file differs");
    let record = cluster.record("big.git").await;
    let checksums: Vec<String> =
        futures_util::future::join_all((0..3).map(|index| cluster.node_checksum(index, &record)))
            .await;
    assert!(checksums.iter().all(|checksum| *checksum == checksums[0]));
}

#[tokio::test(flavor = "multi_thread")]
async fn probes_and_metrics_answer_on_the_http_port() {
    let mut cluster = Cluster::start(3).await;
    let (status, _, body) = http_get(&cluster.git_http, "/healthz", None);
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, _, body) = http_get(&cluster.git_http, "/readyz", None);
    assert_eq!((status, body.trim()), (200, "ready"));
    let (status, head, body) = http_get(&cluster.git_http, "/metrics", None);
    assert_eq!(status, 200);
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(
        body.contains("gitfleet_proxy_node_healthy{storage=\"storage-1\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("gitfleet_proxy_db_statements_total "),
        "{body}"
    );

    // Two of three nodes down: alive, not ready, and the metrics say which.
    cluster.nodes[1].kill();
    cluster.nodes[2].kill();
    cluster.wait_for_health(1, false).await;
    cluster.wait_for_health(2, false).await;
    let (status, _, _) = http_get(&cluster.git_http, "/healthz", None);
    assert_eq!(status, 200);
    let (status, _, body) = http_get(&cluster.git_http, "/readyz", None);
    assert_eq!(status, 503);
    assert!(body.contains("1 of 3 nodes healthy"), "{body}");
    let (_, _, body) = http_get(&cluster.git_http, "/metrics", None);
    assert!(
        body.contains("gitfleet_proxy_node_healthy{storage=\"storage-3\"} 0"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn escaped_names_gzip_bodies_and_foreign_posts() {
    let cluster = Cluster::start(3).await;
    cluster.create("with space.git").await;
    // git escapes the space; the proxy decodes it.
    let (_dir, work) = push_main_over_http(&cluster, "with%20space.git");
    assert_eq!(cluster.record("with space.git").await.generation, 1);
    let (status, _, body) = http_get(
        &cluster.git_http,
        "/default/a%2F..%2Fwith%20space.git/info/refs?service=git-upload-pack",
        Some(&basic(READ_TOKEN)),
    );
    assert_eq!(status, 400, "{body}");

    // A protocol v2 ls-refs, gzipped as git sends its bigger requests.
    let mut request = Vec::new();
    request.extend_from_slice(b"0014command=ls-refs\n0000");
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gzip.write_all(&request).unwrap();
    let gzipped = gzip.finish().unwrap();
    let authorization = basic(READ_TOKEN);
    let path = "/default/with%20space.git/git-upload-pack";
    let (status, body) = http_post(
        &cluster.git_http,
        path,
        &[
            ("Authorization", &authorization),
            ("Git-Protocol", "version=2"),
            ("Content-Type", "application/x-git-upload-pack-request"),
            ("Content-Encoding", "gzip"),
        ],
        &gzipped,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let main = run_git(&work, &["rev-parse", "main"]);
    let listed = String::from_utf8_lossy(&body);
    assert!(
        listed.contains(&format!("{} refs/heads/main", main.trim())),
        "{listed}"
    );

    // A POST that is not git's is turned away.
    let (status, _) = http_post(
        &cluster.git_http,
        path,
        &[
            ("Authorization", &authorization),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        &request,
    );
    assert_eq!(status, 415);
}
