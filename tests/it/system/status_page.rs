//! The proxy's `/status` page in a real headless browser (Debian's chromium): served with no
//! script at all, it renders, tells a healthy cluster from one with a node down, and reloads
//! itself. The screenshots are left in the build's tmp directory for a look.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::cluster::Cluster;
use crate::common::worker::wait_for;

/// The chromium binary: CHROMIUM, or the first of the usual names on PATH.
fn chromium() -> String {
    if let Ok(path) = std::env::var("CHROMIUM") {
        return path;
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return name.to_owned();
        }
    }
    panic!("no chromium: install it (apt-get install chromium) or set CHROMIUM");
}

fn headless(extra: &[&str], url: &str) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url)
        .output()
        .unwrap()
}

/// The page's DOM as the browser built it.
fn rendered(url: &str) -> String {
    let output = headless(&["--dump-dom"], url);
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap()
}

fn screenshot(url: &str, to: &Path) {
    let output = headless(
        &[
            &format!("--screenshot={}", to.display()),
            "--window-size=1400,900",
            "--hide-scrollbars",
        ],
        url,
    );
    assert!(output.status.success(), "{output:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_renders_in_a_browser_and_tells_a_node_down() {
    let mut cluster = Cluster::start(2).await;
    cluster.create("page/one.git").await;
    cluster.create("page/two.git").await;
    let url = format!("{}/status", cluster.git_http);

    // Served as HTML that carries no script at all.
    let (status, _, body) = crate::common::http::http_get(&cluster.git_http, "/status", None);
    assert_eq!(status, 200, "{body}");
    assert!(!body.to_lowercase().contains("<script"), "{body}");
    let page = rendered(&url);
    assert!(
        page.contains("<span class=\"verdict healthy\" id=\"verdict\">HEALTHY</span>"),
        "{page}"
    );
    assert!(
        page.contains("2 storages up, 2 repositories, every replica up to date"),
        "{page}"
    );
    assert!(
        page.contains("<td>storage-1</td><td>up</td><td>2</td><td>2</td>"),
        "{page}"
    );
    assert!(
        page.contains("<meta http-equiv=\"refresh\" content=\"5\">"),
        "{page}"
    );
    assert!(page.contains("Write lock off"), "{page}");
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let healthy = shots.join("status-healthy.png");
    screenshot(&url, &healthy);
    assert!(std::fs::metadata(&healthy).unwrap().len() > 5_000);

    // A node goes down: the page says so, in words and in the table.
    cluster.nodes[1].child.kill().unwrap();
    cluster.nodes[1].child.wait().unwrap();
    cluster.wait_for_health(1, false).await;
    wait_for(30, "the page to tell", || async {
        rendered(&url).contains("ATTENTION")
    })
    .await;
    let page = rendered(&url);
    assert!(
        page.contains("<span class=\"verdict attention\" id=\"verdict\">ATTENTION</span>"),
        "{page}"
    );
    assert!(
        page.contains("storage-2 is down: its 2 replicas are neither read nor written"),
        "{page}"
    );
    assert!(page.contains("<td class=\"down\">DOWN</td>"), "{page}");
    let down = shots.join("status-node-down.png");
    screenshot(&url, &down);
    assert!(std::fs::metadata(&down).unwrap().len() > 5_000);
    tokio::time::sleep(Duration::from_millis(10)).await;
}
