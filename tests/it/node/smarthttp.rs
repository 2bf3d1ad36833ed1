//! The stateless form of git's protocol, the one smart HTTP uses, driven by real git through
//! the test front end in `crate::common::http_front`.

use crate::common::http_front::{Hidden, start_front_end};
use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_fetch_and_push_over_the_stateless_protocol_v0_and_v2() {
    let node = NodeProcess::start();
    let hidden = Hidden::default();
    let base = start_front_end(node.channel().await, hidden.clone()).await;
    create_repository(&node, "web.git", "main").await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    make_history(&source);
    let url = format!("{base}/s1/web.git");

    // A push over smart HTTP (receive-pack is protocol v0 by nature).
    run_git(
        &source,
        &["push", "-q", &url, "main", "feature", "v1", "v2"],
    );
    assert_eq!(refs_of(&node.repo_path("s1", "web.git")), refs_of(&source));

    for version in ["2", "0"] {
        let name = format!("clone-v{version}");
        let (clone, trace) = clone_traced(work.path(), &url, version, &name);
        assert_eq!(
            trace.contains("< version 2"),
            version == "2",
            "protocol v{version} was not used"
        );
        assert_eq!(
            std::fs::read_to_string(clone.join("src/deep/lib.rs")).unwrap(),
            "pub fn answer() -> u32 { 42 }\n"
        );
        assert_eq!(
            run_git(&clone, &["rev-parse", "HEAD"]),
            run_git(&source, &["rev-parse", "main"])
        );

        // An incremental fetch, several rounds of negotiation over separate requests.
        std::fs::write(source.join(format!("more-{version}.txt")), "more\n").unwrap();
        run_git(&source, &["add", "."]);
        run_git(&source, &["commit", "-q", "-m", "more"]);
        run_git(&source, &["push", "-q", &url, "main"]);
        run_git(
            &clone,
            &[
                "-c",
                &format!("protocol.version={version}"),
                "pull",
                "-q",
                "--ff-only",
            ],
        );
        assert_eq!(
            std::fs::read_to_string(clone.join(format!("more-{version}.txt"))).unwrap(),
            "more\n"
        );
    }
    assert!(
        hidden.lock().unwrap().is_empty(),
        "errors hidden from git: {:?}",
        hidden.lock().unwrap()
    );
}
