//! The fence a node keeps per replica: a ref change that carries a token older than the highest
//! the node has accepted for that replica changes nothing and says why, and the fence outlives
//! the node's restart.

use std::path::Path;

use crate::common::stall::Stall;
use crate::common::*;
use gitfleet::node::fence::FENCE_HEADER;
use gitfleet::proto::node_service_client::NodeServiceClient;
use gitfleet::proto::ref_service_client::RefServiceClient;
use gitfleet::proto::repository_service_client::RepositoryServiceClient;
use gitfleet::proto::ssh_service_client::SshServiceClient;
use gitfleet::proto::*;
use tonic::Code;

fn fenced<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(FENCE_HEADER, token.parse().unwrap());
    request
}

fn move_main(old: &str, new: &str) -> UpdateRefsRequest {
    UpdateRefsRequest {
        repository: header("s1", "repo.git"),
        updates: vec![RefUpdate {
            name: "refs/heads/main".into(),
            old_target: old.into(),
            new_target: new.into(),
        }],
    }
}

fn default_branch(branch: &str) -> SetDefaultBranchRequest {
    SetDefaultBranchRequest {
        repository: header("s1", "repo.git"),
        branch: branch.into(),
    }
}

#[tokio::test]
async fn a_ref_change_with_an_older_token_than_the_fence_changes_nothing() {
    let mut node = NodeProcess::start();
    let work = push_history(&node, &["main", "feature"]).await;
    let replica = node.repo_path("s1", "repo.git");
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let feature = run_git(work.path(), &["rev-parse", "feature"])
        .trim()
        .to_owned();
    let mut refs = RefServiceClient::new(node.channel().await);

    // A call without a token is not fenced; one with a token raises the fence.
    refs.update_refs(fenced(move_main(&main, &feature), "5"))
        .await
        .unwrap();
    assert_eq!(
        run_git(&replica, &["rev-parse", "refs/heads/main"]).trim(),
        feature
    );

    // An older token: refused with the reason, and the ref stays.
    let refused = refs
        .update_refs(fenced(move_main(&feature, &main), "4"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(refused.message(), "fenced: token 4 is older than 5");
    assert_eq!(
        run_git(&replica, &["rev-parse", "refs/heads/main"]).trim(),
        feature
    );
    let refused = refs
        .set_default_branch(fenced(default_branch("feature"), "3"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(
        run_git(&replica, &["symbolic-ref", "HEAD"]).trim(),
        "refs/heads/main"
    );

    // The fence is on disk: a restarted node still refuses the older token.
    node.restart();
    let mut refs = RefServiceClient::new(node.channel().await);
    let refused = refs
        .update_refs(fenced(move_main(&feature, &main), "4"))
        .await
        .unwrap_err();
    assert_eq!(refused.message(), "fenced: token 4 is older than 5");
    // The same token, or a newer one, goes through.
    refs.set_default_branch(fenced(default_branch("feature"), "5"))
        .await
        .unwrap();
    refs.update_refs(fenced(move_main(&feature, &main), "8"))
        .await
        .unwrap();
    assert_eq!(
        run_git(&replica, &["rev-parse", "refs/heads/main"]).trim(),
        main
    );
    assert_eq!(
        run_git(&replica, &["symbolic-ref", "HEAD"]).trim(),
        "refs/heads/feature"
    );

    // A token that is not a number is bad input.
    let refused = refs
        .update_refs(fenced(move_main(&main, &feature), "soon"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
}

/// Pushes `commit` to a new branch of `s1/repo.git` as git's client would over SshReceivePack,
/// with `token` in the fence header; returns what receive-pack wrote (its report, and the
/// hook's words on stderr).
async fn push_fenced(
    channel: gitfleet::client::AuthedChannel,
    work: &Path,
    branch: &str,
    commit: &str,
    token: &str,
) -> String {
    let stdin = creating_push(work, &[branch], commit);
    let request = fenced(
        tokio_stream::iter(vec![SshRequest {
            repository: header("s1", "repo.git"),
            git_protocol: String::new(),
            stdin: stdin.into(),
            close_stdin: true,
        }]),
        token,
    );
    let mut stream = SshServiceClient::new(channel)
        .ssh_receive_pack(request)
        .await
        .unwrap()
        .into_inner();
    let mut said = Vec::new();
    while let Some(message) = stream.message().await.unwrap() {
        said.extend_from_slice(&message.stdout);
        said.extend_from_slice(&message.stderr);
    }
    String::from_utf8_lossy(&said).into_owned()
}

/// Whether a fence holder (a `prepared` hook that forked) is still running anywhere.
fn a_holder_runs() -> bool {
    let marker = b"reference-transaction\0prepared\0";
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        std::fs::read(entry.path().join("cmdline"))
            .is_ok_and(|cmdline| cmdline.windows(marker.len()).any(|w| w == marker))
    })
}

#[tokio::test]
async fn a_push_with_an_older_token_than_the_fence_changes_nothing() {
    let node = NodeProcess::start();
    let work = push_history(&node, &["main"]).await;
    let replica = node.repo_path("s1", "repo.git");
    RefServiceClient::new(node.channel().await)
        .set_default_branch(fenced(default_branch("main"), "7"))
        .await
        .unwrap();
    let late = commit_on(work.path(), "late");

    // git aborts the update (receive-pack says why on stderr and stops).
    let said = push_fenced(node.channel().await, work.path(), "late", &late, "6").await;
    assert!(said.contains("fenced: token 6 is older than 7"), "{said}");
    assert!(!said.contains("ok refs/heads/late"), "{said}");
    assert!(!refs_of(&replica).contains("refs/heads/late"));

    // A newer token goes through, raises the fence, and leaves no holder behind.
    let said = push_fenced(node.channel().await, work.path(), "late", &late, "8").await;
    assert!(said.contains("ok refs/heads/late"), "{said}");
    assert_eq!(
        run_git(&replica, &["rev-parse", "refs/heads/late"]).trim(),
        late
    );
    assert_eq!(gitfleet::node::fence::read(&replica).unwrap(), 8);
    assert_eq!(fence_holders(&replica), Vec::<String>::new());
    for _ in 0..100 {
        if !a_holder_runs() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!a_holder_runs(), "the fence holder outlived its push");
}

/// The fence is checked when receive-pack's refs change, not when the push arrives: a push
/// that stalled before it ran, while a newer change was accepted, is refused when it resumes.
#[tokio::test]
async fn a_push_that_resumes_after_a_newer_change_is_refused_when_its_refs_change() {
    let stall = Stall::new("receive-pack");
    let node = NodeProcess::start_with(NodeOptions {
        extra_config: stall.node_config(),
        ..NodeOptions::default()
    });
    let work = push_history(&node, &["main", "feature"]).await;
    let replica = node.repo_path("s1", "repo.git");
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let feature = run_git(work.path(), &["rev-parse", "feature"])
        .trim()
        .to_owned();
    let late = commit_on(work.path(), "late");

    stall.arm();
    let push = tokio::spawn({
        let (channel, work, late) = (node.channel().await, work.path().to_owned(), late.clone());
        async move { push_fenced(channel, &work, "late", &late, "6").await }
    });
    stall.stalled().await;
    RefServiceClient::new(node.channel().await)
        .update_refs(fenced(move_main(&main, &feature), "7"))
        .await
        .unwrap();
    stall.release();

    let said = push.await.unwrap();
    assert!(said.contains("fenced: token 6 is older than 7"), "{said}");
    assert!(!said.contains("ok refs/heads/late"), "{said}");
    let refs = refs_of(&replica);
    assert!(!refs.contains("refs/heads/late"), "{refs}");
    assert_eq!(
        run_git(&replica, &["rev-parse", "refs/heads/main"]).trim(),
        feature
    );
}

#[tokio::test]
async fn a_removal_or_quarantine_older_than_the_fence_removes_nothing() {
    let node = NodeProcess::start();
    let work = push_history(&node, &["main"]).await;
    let replica = node.repo_path("s1", "repo.git");
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let mut nodes = NodeServiceClient::new(node.channel().await);
    let mut repositories = RepositoryServiceClient::new(node.channel().await);
    let repository = || header("s1", "repo.git");

    // Raising the fence needs a token, and changes no ref.
    let refused = nodes
        .raise_fence(RaiseFenceRequest {
            repository: repository(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains(FENCE_HEADER), "{refused:?}");
    nodes
        .raise_fence(fenced(
            RaiseFenceRequest {
                repository: repository(),
            },
            "7",
        ))
        .await
        .unwrap();
    assert_eq!(
        run_git(&replica, &["rev-parse", "refs/heads/main"]).trim(),
        main
    );
    let refused = nodes
        .raise_fence(fenced(
            RaiseFenceRequest {
                repository: repository(),
            },
            "6",
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.message(), "fenced: token 6 is older than 7");

    // A removal and a quarantine decided before the fence rose: refused, the replica stays.
    let refused = repositories
        .remove_repository(fenced(
            RemoveRepositoryRequest {
                repository: repository(),
            },
            "5",
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(refused.message(), "fenced: token 5 is older than 7");
    let refused = nodes
        .quarantine_repository(fenced(
            QuarantineRepositoryRequest {
                repository: repository(),
            },
            "6",
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.message(), "fenced: token 6 is older than 7");
    assert_eq!(
        run_git(&replica, &["rev-parse", "refs/heads/main"]).trim(),
        main
    );
    let mut listed = nodes
        .list_quarantine(ListQuarantineRequest {
            storage: Some(StorageHeader {
                storage: "s1".into(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(batch) = listed.message().await.unwrap() {
        assert!(batch.entries.is_empty(), "{batch:?}");
    }

    // A newer token goes through: the quarantine takes it away whole.
    nodes
        .quarantine_repository(fenced(
            QuarantineRepositoryRequest {
                repository: repository(),
            },
            "9",
        ))
        .await
        .unwrap();
    assert!(!replica.exists());
    // With a token, a replica that is not there is not found, as without one.
    let missing = repositories
        .remove_repository(fenced(
            RemoveRepositoryRequest {
                repository: repository(),
            },
            "10",
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
    let missing = nodes
        .raise_fence(fenced(
            RaiseFenceRequest {
                repository: repository(),
            },
            "10",
        ))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");
}

#[tokio::test]
async fn a_fenced_push_is_refused_when_the_hook_leads_nowhere() {
    let node = NodeProcess::start();
    let work = push_history(&node, &["main"]).await;
    let replica = node.repo_path("s1", "repo.git");
    let before = refs_of(&replica);
    // git would skip a hook it cannot run, and the push would go through unchecked.
    let hook = node
        .storage_path("s1")
        .join(".gitfleet/hooks/reference-transaction");
    std::fs::remove_file(&hook).unwrap();
    std::os::unix::fs::symlink("/nonexistent/gitfleet", &hook).unwrap();
    let late = commit_on(work.path(), "unchecked");
    let request = fenced(
        tokio_stream::iter(vec![SshRequest {
            repository: header("s1", "repo.git"),
            git_protocol: String::new(),
            stdin: format!("{} {late} refs/heads/unchecked\n", "0".repeat(40))
                .into_bytes()
                .into(),
            close_stdin: true,
        }]),
        "3",
    );
    let refused = match SshServiceClient::new(node.channel().await)
        .ssh_receive_pack(request)
        .await
    {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Err(status) => break status,
                    Ok(None) => panic!("the push was run"),
                    Ok(Some(_)) => {}
                }
            }
        }
    };
    assert!(
        refused.message().contains("does not lead to a program"),
        "{refused:?}"
    );
    assert_eq!(refs_of(&replica), before);
    // Without a token (a push that is not fenced), the hook is not needed.
    run_git(
        work.path(),
        &["push", "-q", &node.ssh_url("s1", "repo.git"), "unchecked"],
    );
    assert!(refs_of(&replica).contains("refs/heads/unchecked"));
}
