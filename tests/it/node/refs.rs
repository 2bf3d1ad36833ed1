//! Reference and object RPCs against a real repository: listing, checksums, atomic
//! compare-and-swap updates, the default branch, reading files and commits.

use crate::common::*;
use gitfleet::proto::object_service_client::ObjectServiceClient;
use gitfleet::proto::ref_service_client::RefServiceClient;
use gitfleet::proto::*;
use tonic::Code;

const ZERO: &str = "0000000000000000000000000000000000000000";

/// A node holding `s1/repo.git` with the history of [`make_history`]; returns the work tree.
async fn node_with_history() -> (NodeProcess, tempfile::TempDir) {
    let node = NodeProcess::start();
    let work = push_history(&node, &["main", "feature", "v1", "v2"]).await;
    (node, work)
}

fn rev(work: &tempfile::TempDir, revision: &str) -> String {
    run_git(work.path(), &["rev-parse", revision])
        .trim()
        .to_owned()
}

async fn list(node: &NodeProcess, prefixes: &[&str]) -> Vec<Ref> {
    let mut stream = RefServiceClient::new(node.channel().await)
        .list_refs(ListRefsRequest {
            repository: header("s1", "repo.git"),
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut refs = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        refs.extend(message.refs);
    }
    refs
}

fn update(name: &str, old: &str, new: &str) -> RefUpdate {
    RefUpdate {
        name: name.into(),
        old_target: old.into(),
        new_target: new.into(),
    }
}

#[tokio::test]
async fn list_refs_streams_every_ref_with_peeled_tags() {
    let (node, work) = node_with_history().await;
    let refs = list(&node, &[]).await;
    let names: Vec<&str> = refs.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "refs/heads/feature",
            "refs/heads/main",
            "refs/tags/v1",
            "refs/tags/v2"
        ]
    );
    let v2 = refs.iter().find(|r| r.name == "refs/tags/v2").unwrap();
    assert_eq!(v2.target, rev(&work, "v2"));
    assert_eq!(v2.peeled_target, rev(&work, "main"));
    assert_eq!(
        refs.iter()
            .find(|r| r.name == "refs/tags/v1")
            .unwrap()
            .peeled_target,
        ""
    );

    let heads = list(&node, &["refs/heads/"]).await;
    assert_eq!(heads.len(), 2);
}

#[tokio::test]
async fn update_refs_is_compare_and_swap_and_all_or_nothing() {
    let (node, work) = node_with_history().await;
    let mut refs = RefServiceClient::new(node.channel().await);
    let main = rev(&work, "main");
    let feature = rev(&work, "feature");
    let first = rev(&work, "main~2");
    let repository = node.repo_path("s1", "repo.git");

    // A good batch: move main back, create a branch, delete feature.
    refs.update_refs(UpdateRefsRequest {
        repository: header("s1", "repo.git"),
        updates: vec![
            update("refs/heads/main", &main, &first),
            update("refs/heads/new", ZERO, &main),
            update("refs/heads/feature", &feature, ZERO),
        ],
    })
    .await
    .unwrap();
    let after_good = refs_of(&repository);
    assert!(after_good.contains(&format!("{first} refs/heads/main")));
    assert!(after_good.contains(&format!("{main} refs/heads/new")));
    assert!(!after_good.contains("refs/heads/feature"));

    // One stale expectation aborts the whole batch.
    let status = refs
        .update_refs(UpdateRefsRequest {
            repository: header("s1", "repo.git"),
            updates: vec![
                update("refs/heads/other", ZERO, &main),
                update("refs/heads/main", &main, &feature),
            ],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(
        status.message().contains("refs/heads/main"),
        "{}",
        status.message()
    );
    assert_eq!(refs_of(&repository), after_good);

    // Creating a branch that exists is a conflict too.
    let status = refs
        .update_refs(UpdateRefsRequest {
            repository: header("s1", "repo.git"),
            updates: vec![update("refs/heads/new", ZERO, &first)],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Aborted, "{status:?}");

    // Pointing a branch at an object that does not exist is refused as bad input.
    let status = refs
        .update_refs(UpdateRefsRequest {
            repository: header("s1", "repo.git"),
            updates: vec![update("refs/heads/ghost", ZERO, &"ab".repeat(20))],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(refs_of(&repository), after_good);
}

#[tokio::test]
async fn default_branch_and_checksum() {
    let (node, work) = node_with_history().await;
    let mut refs = RefServiceClient::new(node.channel().await);
    let head = refs
        .find_default_branch(FindDefaultBranchRequest {
            repository: header("s1", "repo.git"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (head.name.as_str(), head.target.clone()),
        ("refs/heads/main", rev(&work, "main"))
    );

    let checksum = |refs: &mut RefServiceClient<_>| {
        let mut refs = refs.clone();
        async move {
            refs.refs_checksum(RefsChecksumRequest {
                repository: header("s1", "repo.git"),
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let before = checksum(&mut refs).await;
    assert_eq!(before.ref_count, 4);

    refs.set_default_branch(SetDefaultBranchRequest {
        repository: header("s1", "repo.git"),
        branch: "feature".into(),
    })
    .await
    .unwrap();
    let head = refs
        .find_default_branch(FindDefaultBranchRequest {
            repository: header("s1", "repo.git"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(head.name, "refs/heads/feature");
    let moved = checksum(&mut refs).await;
    assert_ne!(
        moved.checksum, before.checksum,
        "HEAD is part of the checksum"
    );

    refs.set_default_branch(SetDefaultBranchRequest {
        repository: header("s1", "repo.git"),
        branch: "main".into(),
    })
    .await
    .unwrap();
    assert_eq!(checksum(&mut refs).await, before);

    // A branch that does not exist yet is allowed, and has no target.
    refs.set_default_branch(SetDefaultBranchRequest {
        repository: header("s1", "repo.git"),
        branch: "later".into(),
    })
    .await
    .unwrap();
    let head = refs
        .find_default_branch(FindDefaultBranchRequest {
            repository: header("s1", "repo.git"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (head.name.as_str(), head.target.as_str()),
        ("refs/heads/later", "")
    );

    let status = refs
        .set_default_branch(SetDefaultBranchRequest {
            repository: header("s1", "repo.git"),
            branch: "bad..name".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // HEAD is read from its file only when that holds a symbolic reference: a detached HEAD
    // is git's to judge, and it is no default branch.
    let head_file = node.storage_path("s1").join("repo.git/HEAD");
    std::fs::write(&head_file, format!("{}\n", rev(&work, "main"))).unwrap();
    let status = refs
        .find_default_branch(FindDefaultBranchRequest {
            repository: header("s1", "repo.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    std::fs::write(&head_file, "ref: refs/heads/feature\n").unwrap();
    assert_eq!(checksum(&mut refs).await, moved);
}

#[tokio::test]
async fn a_reftable_repository_has_its_head_read_by_git() {
    let node = NodeProcess::start();
    let path = node.storage_path("s1").join("table.git");
    // The reftable backend needs git 2.45 or later; an older git has nothing to test here.
    let made = std::process::Command::new("git")
        .args([
            "init",
            "--quiet",
            "--bare",
            "--ref-format=reftable",
            "-b",
            "trunk",
        ])
        .arg(&path)
        .status()
        .unwrap();
    if !made.success() {
        eprintln!("this git cannot make a reftable repository: skipped");
        return;
    }
    // Its HEAD file holds a placeholder that is no branch of the repository.
    let head_file = std::fs::read_to_string(path.join("HEAD")).unwrap();
    assert!(head_file.contains(".invalid"), "{head_file}");
    let mut refs = RefServiceClient::new(node.channel().await);
    let head = refs
        .find_default_branch(FindDefaultBranchRequest {
            repository: header("s1", "table.git"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(head.name, "refs/heads/trunk");
}

#[tokio::test]
async fn read_blob_and_commit() {
    let (node, work) = node_with_history().await;
    let mut objects = ObjectServiceClient::new(node.channel().await);
    let read = |revision: &str, path: &str, limit: u64| {
        let mut objects = objects.clone();
        let request = ReadBlobRequest {
            repository: header("s1", "repo.git"),
            revision: revision.into(),
            path: path.into(),
            limit,
        };
        async move {
            let mut stream = objects.read_blob(request).await?.into_inner();
            let mut messages = Vec::new();
            while let Some(message) = stream.message().await? {
                messages.push(message);
            }
            Ok::<_, tonic::Status>(messages)
        }
    };

    let messages = read("main", "src/deep/lib.rs", 0).await.unwrap();
    assert_eq!(messages[0].oid, rev(&work, "main:src/deep/lib.rs"));
    assert_eq!(messages[0].mode, 0o100644);
    let content: Vec<u8> = messages.iter().flat_map(|m| m.data.to_vec()).collect();
    assert_eq!(content, b"pub fn answer() -> u32 { 42 }\n");

    let messages = read("v1", "README.md", 3).await.unwrap();
    assert_eq!(messages[0].size, 6);
    assert_eq!(
        messages
            .iter()
            .flat_map(|m| m.data.to_vec())
            .collect::<Vec<_>>(),
        b"hel"
    );
    assert_eq!(read("main", "run.sh", 0).await.unwrap()[0].mode, 0o100755);

    // A file that exists only on another branch.
    assert_eq!(read("feature", "feature.txt", 0).await.unwrap()[0].size, 13);

    for (revision, path, code) in [
        ("main", "missing.txt", Code::NotFound),
        ("nope", "README.md", Code::NotFound),
        ("main", "src", Code::InvalidArgument),
        ("main", "../etc/passwd", Code::InvalidArgument),
        ("--output=/tmp/x", "README.md", Code::InvalidArgument),
    ] {
        let status = read(revision, path, 0).await.unwrap_err();
        assert_eq!(status.code(), code, "{revision}:{path}: {status:?}");
    }

    let commit = objects
        .read_commit(ReadCommitRequest {
            repository: header("s1", "repo.git"),
            revision: "v2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(commit.oid, rev(&work, "main"));
    assert_eq!(commit.parents, vec![rev(&work, "main~1")]);
    assert_eq!(commit.tree, rev(&work, "main^{tree}"));
    assert_eq!(commit.author.unwrap().email, "author@example.com");
    assert_eq!(commit.committer.unwrap().name, "C O Mitter");
    assert_eq!(&commit.message[..], b"third\n");

    let status = objects
        .read_commit(ReadCommitRequest {
            repository: header("s1", "repo.git"),
            revision: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn a_branch_and_a_directory_of_branches_cannot_share_a_name() {
    let (node, work) = node_with_history().await;
    let main = rev(&work, "main");
    let status = RefServiceClient::new(node.channel().await)
        .update_refs(UpdateRefsRequest {
            repository: header("s1", "repo.git"),
            updates: vec![update("refs/heads/main/sub", ZERO, &main)],
        })
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::FailedPrecondition,
        "retrying cannot help: {status:?}"
    );
    assert!(
        status.message().contains("refs/heads/main"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn list_refs_streams_thousands_of_refs_in_several_messages() {
    let (node, work) = node_with_history().await;
    let main = rev(&work, "main");
    let script: String = (0..5000)
        .map(|i| format!("create refs/heads/many/branch-{i:05} {main}\n"))
        .collect();
    let output = git(&node.repo_path("s1", "repo.git"))
        .args(["update-ref", "--stdin"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(script.as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(output.status.success());

    let mut stream = RefServiceClient::new(node.channel().await)
        .list_refs(ListRefsRequest {
            repository: header("s1", "repo.git"),
            prefixes: vec!["refs/heads/many/".into()],
        })
        .await
        .unwrap()
        .into_inner();
    let (mut names, mut messages) = (Vec::new(), 0);
    while let Some(message) = stream.message().await.unwrap() {
        messages += 1;
        names.extend(message.refs.into_iter().map(|r| r.name));
    }
    assert_eq!(names.len(), 5000);
    assert!(messages > 1, "5000 refs came in one message");
    assert_eq!(names[4321], "refs/heads/many/branch-04321");
}

/// A git killed mid-update leaves its ref lock behind, and every later update of that ref
/// would trip over it. The node removes a lock that no git of its own is working under, and
/// the update goes through; a lock of a git that is still running is left alone.
#[tokio::test]
async fn a_ref_lock_left_by_a_killed_git_does_not_block_later_updates() {
    let stall = crate::common::stall::Stall::new("update-ref");
    let node = NodeProcess::start_with(NodeOptions {
        extra_config: stall.node_config(),
        ..NodeOptions::default()
    });
    let work = push_history(&node, &["main", "feature"]).await;
    let replica = node.repo_path("s1", "repo.git");
    let id = |name: &str| run_git(work.path(), &["rev-parse", name]).trim().to_owned();
    let (main, feature) = (id("main"), id("feature"));
    let update = |old: &str, new: &str| UpdateRefsRequest {
        repository: header("s1", "repo.git"),
        updates: vec![RefUpdate {
            name: "refs/heads/main".into(),
            old_target: old.into(),
            new_target: new.into(),
        }],
    };

    // Left by a git that died: removed, and the update lands.
    std::fs::write(replica.join("refs/heads/main.lock"), "").unwrap();
    RefServiceClient::new(node.channel().await)
        .update_refs(update(&main, &feature))
        .await
        .unwrap();
    assert!(!replica.join("refs/heads/main.lock").exists());
    assert_eq!(
        run_git(&replica, &["rev-parse", "refs/heads/main"]).trim(),
        feature
    );
    std::fs::write(replica.join("HEAD.lock"), "").unwrap();
    RefServiceClient::new(node.channel().await)
        .set_default_branch(SetDefaultBranchRequest {
            repository: header("s1", "repo.git"),
            branch: "feature".into(),
        })
        .await
        .unwrap();
    assert!(!replica.join("HEAD.lock").exists());
    assert_eq!(
        run_git(&replica, &["symbolic-ref", "HEAD"]).trim(),
        "refs/heads/feature"
    );

    // While a git of the node works on the replica, a lock may be its own: left alone.
    std::fs::write(replica.join("refs/heads/main.lock"), "").unwrap();
    stall.arm();
    let stalled = tokio::spawn({
        let channel = node.channel().await;
        let request = update(&feature, &main);
        async move { RefServiceClient::new(channel).update_refs(request).await }
    });
    stall.stalled().await;
    let refused = RefServiceClient::new(node.channel().await)
        .update_refs(update(&feature, &main))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Aborted, "{refused:?}");
    assert!(replica.join("refs/heads/main.lock").exists());
    // Once that git is gone, the next update clears it.
    stall.release();
    stalled.await.unwrap().unwrap();
    assert!(!replica.join("refs/heads/main.lock").exists());
    assert_eq!(
        run_git(&replica, &["rev-parse", "refs/heads/main"]).trim(),
        main
    );
}
