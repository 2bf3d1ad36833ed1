//! git over HTTP against the proxy's own smart HTTP port, with the real git CLI.

use std::io::Write;

use crate::common::cluster::{Cluster, READ_TOKEN, WRITE_TOKEN};
use crate::common::http::*;
use crate::common::*;

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
        crate::common::db::fresh_database().await,
        3,
        3,
        "",
        "push_to_create = true",
    )
    .await;
    let url = open.git_url(WRITE_TOKEN, "new/repo.git");
    // A dry run is answered as by an empty repository, and creates nothing.
    let output = git_http(&work, &["push", "--dry-run", &url, "main"]);
    ok(&output);
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("[new branch]"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        open.store()
            .find_repository(
                &Cluster::virtual_storage(),
                &gitfleet::model::RelativePath::parse("new/repo.git").unwrap()
            )
            .await
            .unwrap()
            .is_none()
    );
    ok(&git_http(&work, &["push", "-q", &url, "main"]));
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
async fn escaped_names_gzip_bodies_and_bodies_that_are_refused() {
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

    // Damaged gzip: the node gets nothing, and the client is told why.
    let git_headers = [
        ("Authorization", authorization.as_str()),
        ("Git-Protocol", "version=2"),
        ("Content-Type", "application/x-git-upload-pack-request"),
        ("Content-Encoding", "gzip"),
    ];
    let (status, body) = http_post(&cluster.git_http, path, &git_headers, b"not gzip at all");
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("gzip is damaged"),
        "{}",
        String::from_utf8_lossy(&body)
    );

    // A fetch request past 64 MiB once gunzipped (65 KiB on the wire): an ls-refs whose
    // arguments never end, so the node is still reading when the proxy cuts it off.
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gzip.write_all(b"0014command=ls-refs\n0001").unwrap();
    let peel = b"0009peel\n".repeat(1 << 16);
    for _ in 0..((65 << 20) / peel.len()) {
        gzip.write_all(&peel).unwrap();
    }
    let bomb = gzip.finish().unwrap();
    assert!(bomb.len() < 1 << 20, "{}", bomb.len());
    let (status, body) = http_post(&cluster.git_http, path, &git_headers, &bomb);
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    assert!(
        String::from_utf8_lossy(&body).contains("larger than 64 MiB"),
        "{}",
        String::from_utf8_lossy(&body)
    );
}
