//! Real git against a real node: create over gRPC, push a history, clone it back, compare.

use crate::common::*;

fn files_of(dir: &std::path::Path) -> Vec<(String, String)> {
    let mut files = Vec::new();
    for name in ["README.md", "src/deep/lib.rs", "run.sh", "feature.txt"] {
        if let Ok(content) = std::fs::read_to_string(dir.join(name)) {
            files.push((name.to_owned(), content));
        }
    }
    files
}

#[tokio::test]
async fn push_and_clone_a_history_over_ssh_protocol_v2_and_v0() {
    let node = NodeProcess::start();
    create_repository(&node, "group/project.git", "main").await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    make_history(&source);

    let url = node.ssh_url("s1", "group/project.git");
    run_git(
        &source,
        &["push", "-q", &url, "main", "feature", "v1", "v2"],
    );
    assert_eq!(
        refs_of(&node.repo_path("s1", "group/project.git")),
        refs_of(&source)
    );

    for (version, name) in [("2", "clone-v2"), ("0", "clone-v0")] {
        let (clone, trace) = clone_traced(work.path(), &url, version, name);
        assert_eq!(
            trace.contains("clone< version 2"),
            version == "2",
            "protocol v{version} was not used"
        );

        run_git(&clone, &["fetch", "-q", "origin", "feature:feature"]);
        let cloned_refs = refs_of(&clone);
        for line in refs_of(&source).lines() {
            assert!(
                cloned_refs.contains(line),
                "{name} lacks {line}:\n{cloned_refs}"
            );
        }
        assert_eq!(files_of(&clone), files_of(&source));
        assert_eq!(
            run_git(&clone, &["rev-parse", "HEAD"]),
            run_git(&source, &["rev-parse", "main"])
        );
        let mode = run_git(&clone, &["ls-files", "-s", "run.sh"]);
        assert!(mode.starts_with("100755"), "executable bit lost: {mode}");
    }
}

#[tokio::test]
async fn push_fetch_and_delete_over_the_ext_transport() {
    let node = NodeProcess::start();
    create_repository(&node, "ext.git", "main").await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    make_history(&source);
    let url = node.ext_url("s1", "ext.git");

    run_git(&source, &["push", "-q", &url, "main", "feature", "v1"]);
    run_git(work.path(), &["clone", "-q", &url, "clone"]);
    let clone = work.path().join("clone");
    assert_eq!(
        files_of(&clone),
        files_of(&source)
            .into_iter()
            .filter(|(n, _)| n != "feature.txt")
            .collect::<Vec<_>>()
    );

    // An incremental push, then a fetch of it, then a branch deletion.
    std::fs::write(source.join("new.txt"), "more\n").unwrap();
    run_git(&source, &["add", "new.txt"]);
    run_git(&source, &["commit", "-q", "-m", "fourth"]);
    run_git(&source, &["push", "-q", &url, "main", ":feature"]);
    run_git(&clone, &["pull", "-q", "--ff-only"]);
    assert_eq!(
        std::fs::read_to_string(clone.join("new.txt")).unwrap(),
        "more\n"
    );
    let remote = run_git(work.path(), &["ls-remote", &url]);
    assert!(
        !remote.contains("refs/heads/feature"),
        "feature was not deleted:\n{remote}"
    );
    assert!(remote.contains("refs/tags/v1"));
}

#[tokio::test]
async fn a_push_git_refuses_changes_nothing() {
    let node = NodeProcess::start();
    create_repository(&node, "ff.git", "main").await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    make_history(&source);
    let url = node.ssh_url("s1", "ff.git");
    run_git(&source, &["push", "-q", &url, "main"]);
    let before = refs_of(&node.repo_path("s1", "ff.git"));

    // git refuses both pushes after reading the node's advertisement (a non-fast-forward
    // without --force, and a lease the advertised value contradicts), so the node's refs must
    // come through untouched. A push the node itself refuses is in node_errors.rs.
    run_git(&source, &["commit", "-q", "--amend", "-m", "rewritten"]);
    let output = try_git(&source, &["push", &url, "main"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("rejected"));
    let stale = "--force-with-lease=main:".to_owned() + &"1".repeat(40);
    let output = try_git(&source, &["push", &stale, &url, "main"]);
    assert!(!output.status.success());
    assert_eq!(refs_of(&node.repo_path("s1", "ff.git")), before);
}

#[tokio::test]
async fn the_bridge_needs_no_ssh_variant_setting() {
    let node = NodeProcess::start();
    create_repository(&node, "plain.git", "main").await;
    let work = tempfile::tempdir().unwrap();
    let source = work.path().join("source");
    make_history(&source);
    let url = node.ssh_url("s1", "plain.git");
    // Without GIT_SSH_VARIANT git probes the bridge with -G, then passes the port and, for
    // reads, GIT_PROTOCOL as it does for OpenSSH.
    let plain_git = |args: &[&str]| {
        let output = git(&source)
            .env_remove("GIT_SSH_VARIANT")
            .env("GIT_TRACE_PACKET", "1")
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    plain_git(&["push", "-q", &url, "main"]);
    let trace = plain_git(&["ls-remote", &url]);
    assert!(
        trace.contains("ls-remote< version 2"),
        "protocol v2 was not used:\n{trace}"
    );
    let main = run_git(
        &source,
        &[
            "for-each-ref",
            "--format=%(objectname) %(refname)",
            "refs/heads/main",
        ],
    );
    assert_eq!(refs_of(&node.repo_path("s1", "plain.git")), main);
}
