//! Replication between two real nodes: the target fetches through the source's own
//! upload-pack RPC and ends up an exact mirror.

use crate::common::stall::Stall;
use crate::common::*;
use gitfleet::proto::node_service_client::NodeServiceClient;
use gitfleet::proto::ref_service_client::RefServiceClient;
use gitfleet::proto::repository_service_client::RepositoryServiceClient;
use gitfleet::proto::*;
use tonic::Code;

fn source_of(node: &NodeProcess, relative_path: &str, token: String) -> Option<SourceRepository> {
    Some(SourceRepository {
        address: node.address.clone(),
        storage: "s1".into(),
        relative_path: relative_path.into(),
        token,
    })
}

async fn replicate(
    target: &NodeProcess,
    target_path: &str,
    source: Option<SourceRepository>,
) -> Result<bool, tonic::Status> {
    replicate_phase(target, target_path, source, ReplicationPhase::Refs, None)
        .await
        .map(|response| response.created)
}

/// One phase of a replication, with `token` as its fencing token when there is one.
async fn replicate_phase(
    target: &NodeProcess,
    target_path: &str,
    source: Option<SourceRepository>,
    phase: ReplicationPhase,
    token: Option<i64>,
) -> Result<ReplicateRepositoryResponse, tonic::Status> {
    let mut request = tonic::Request::new(ReplicateRepositoryRequest {
        repository: header("s1", target_path),
        source,
        phase: phase.into(),
    });
    if let Some(token) = token {
        gitfleet::fleet::set_fence(request.metadata_mut(), token);
    }
    NodeServiceClient::new(target.channel().await)
        .replicate_repository(request)
        .await
        .map(tonic::Response::into_inner)
}

/// The source `s1/repo.git` on `node`, with a fresh replication token.
fn repo_on(node: &NodeProcess) -> Option<SourceRepository> {
    source_of(
        node,
        "repo.git",
        gitfleet::auth::sign(TOKEN, gitfleet::auth::REPLICATION_SCOPE),
    )
}

/// One phase of replicating `s1/repo.git` on `source` to `s1/copy.git` on `target`.
async fn copy_phase(
    target: &NodeProcess,
    source: &NodeProcess,
    phase: ReplicationPhase,
    token: Option<i64>,
) -> Result<ReplicateRepositoryResponse, tonic::Status> {
    replicate_phase(target, "copy.git", repo_on(source), phase, token).await
}

async fn checksum(node: &NodeProcess, relative_path: &str) -> String {
    RefServiceClient::new(node.channel().await)
        .refs_checksum(RefsChecksumRequest {
            repository: header("s1", relative_path),
        })
        .await
        .unwrap()
        .into_inner()
        .checksum
}

/// Two nodes, the first holding `s1/repo.git` with a pushed history.
async fn two_nodes() -> (NodeProcess, NodeProcess, tempfile::TempDir) {
    let source = NodeProcess::start();
    let target = NodeProcess::start();
    let work = push_history(&source, &["main", "feature", "v1", "v2"]).await;
    (source, target, work)
}

#[tokio::test]
async fn replicates_to_a_new_target_and_to_a_behind_one() {
    let (source, target, work) = two_nodes().await;

    // A target that does not have the repository yet.
    let created = replicate(
        &target,
        "copy.git",
        source_of(
            &source,
            "repo.git",
            gitfleet::auth::sign(TOKEN, gitfleet::auth::REPLICATION_SCOPE),
        ),
    )
    .await
    .unwrap();
    assert!(created);
    assert_eq!(
        refs_of(&target.repo_path("s1", "copy.git")),
        refs_of(&source.repo_path("s1", "repo.git"))
    );
    assert_eq!(
        checksum(&target, "copy.git").await,
        checksum(&source, "repo.git").await
    );

    // The source moves on: a new commit on main, feature deleted, a new branch, HEAD moved.
    std::fs::write(work.path().join("more.txt"), "more\n").unwrap();
    run_git(work.path(), &["add", "more.txt"]);
    run_git(work.path(), &["commit", "-q", "-m", "more"]);
    run_git(work.path(), &["branch", "fresh"]);
    run_git(
        work.path(),
        &[
            "push",
            "-q",
            &source.ssh_url("s1", "repo.git"),
            "main",
            "fresh",
            ":feature",
            ":v1",
        ],
    );
    RefServiceClient::new(source.channel().await)
        .set_default_branch(SetDefaultBranchRequest {
            repository: header("s1", "repo.git"),
            branch: "fresh".into(),
        })
        .await
        .unwrap();
    assert_ne!(
        checksum(&target, "copy.git").await,
        checksum(&source, "repo.git").await
    );

    // The behind target catches up, deletions included.
    let created = replicate(
        &target,
        "copy.git",
        source_of(
            &source,
            "repo.git",
            gitfleet::auth::sign(TOKEN, gitfleet::auth::REPLICATION_SCOPE),
        ),
    )
    .await
    .unwrap();
    assert!(!created);
    let mirrored = refs_of(&target.repo_path("s1", "copy.git"));
    assert_eq!(mirrored, refs_of(&source.repo_path("s1", "repo.git")));
    assert!(
        !mirrored.contains("refs/heads/feature") && !mirrored.contains("refs/tags/v1"),
        "{mirrored}"
    );
    assert_eq!(
        checksum(&target, "copy.git").await,
        checksum(&source, "repo.git").await
    );

    // And the copy is a working repository: clone it and read the new file.
    let clone = work.path().join("from-target");
    run_git(
        work.path(),
        &[
            "clone",
            "-q",
            &target.ssh_url("s1", "copy.git"),
            clone.to_str().unwrap(),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(clone.join("more.txt")).unwrap(),
        "more\n"
    );
    assert_eq!(
        run_git(&clone, &["symbolic-ref", "HEAD"]).trim(),
        "refs/heads/fresh"
    );
}

#[tokio::test]
async fn replicating_an_empty_repository_empties_the_target() {
    let (source, target, _work) = two_nodes().await;
    replicate(
        &target,
        "copy.git",
        source_of(
            &source,
            "repo.git",
            gitfleet::auth::sign(TOKEN, gitfleet::auth::REPLICATION_SCOPE),
        ),
    )
    .await
    .unwrap();
    RepositoryServiceClient::new(source.channel().await)
        .create_repository(CreateRepositoryRequest {
            repository: header("s1", "empty.git"),
            default_branch: "trunk".into(),
        })
        .await
        .unwrap();
    replicate(
        &target,
        "copy.git",
        source_of(
            &source,
            "empty.git",
            gitfleet::auth::sign(TOKEN, gitfleet::auth::REPLICATION_SCOPE),
        ),
    )
    .await
    .unwrap();
    assert_eq!(refs_of(&target.repo_path("s1", "copy.git")), "");
    assert_eq!(
        checksum(&target, "copy.git").await,
        checksum(&source, "empty.git").await
    );
}

#[tokio::test]
async fn replication_failures_are_reported_and_leave_nothing_behind() {
    let (source, target, _work) = two_nodes().await;
    let good_token = || gitfleet::auth::sign(TOKEN, gitfleet::auth::REPLICATION_SCOPE);

    let status = replicate(
        &target,
        "copy.git",
        source_of(&source, "missing.git", good_token()),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("does not exist"),
        "{}",
        status.message()
    );

    let status = replicate(
        &target,
        "copy.git",
        source_of(
            &source,
            "repo.git",
            gitfleet::auth::sign("a different secret!!", gitfleet::auth::REPLICATION_SCOPE),
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("signature"),
        "{}",
        status.message()
    );

    let mut unreachable = source_of(&source, "repo.git", good_token()).unwrap();
    unreachable.address = "http://127.0.0.1:1".into();
    let status = replicate(&target, "copy.git", Some(unreachable))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    let status = replicate(&target, "copy.git", None).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = replicate(
        &target,
        "copy.git",
        source_of(&source, "../repo.git", good_token()),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // No failed attempt left a repository or a staging directory behind.
    assert!(!target.repo_path("s1", "copy.git").exists());
    let staging: Vec<_> = std::fs::read_dir(target.storage_path("s1").join(".gitfleet/tmp"))
        .unwrap()
        .collect();
    assert!(staging.is_empty(), "{staging:?}");
}

#[tokio::test]
async fn a_replication_whose_caller_goes_away_finishes_cleanly() {
    let (source, target, work) = two_nodes().await;
    // Enough incompressible data that the fetch outlives the caller's deadline.
    push_noise(&source, work.path());

    let mut request = tonic::Request::new(ReplicateRepositoryRequest {
        repository: header("s1", "copy.git"),
        source: source_of(
            &source,
            "repo.git",
            gitfleet::auth::sign(TOKEN, gitfleet::auth::REPLICATION_SCOPE),
        ),
        phase: ReplicationPhase::Refs.into(),
    });
    request.set_timeout(std::time::Duration::from_millis(100));
    let status = NodeServiceClient::new(target.channel().await)
        .replicate_repository(request)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Cancelled, "{status:?}");

    // The node finishes the work on its own: the replica appears complete, and no git process
    // or staging directory is left.
    let copy = target.repo_path("s1", "copy.git");
    let wanted = refs_of(&source.repo_path("s1", "repo.git"));
    let mut waited = 0;
    while !(copy.exists() && refs_of(&copy) == wanted) {
        assert!(waited < 600, "the replication never finished");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        waited += 1;
    }
    wait_for_no_children(target.pid()).await;
    let staging: Vec<_> = std::fs::read_dir(target.storage_path("s1").join(".gitfleet/tmp"))
        .unwrap()
        .collect();
    assert!(staging.is_empty(), "{staging:?}");
}

/// A commit on a new branch of the source, pushed from `work`; returns its id.
fn push_branch(source: &NodeProcess, work: &std::path::Path, branch: &str) -> String {
    std::fs::write(work.join(format!("{branch}.txt")), branch).unwrap();
    run_git(work, &["add", "."]);
    run_git(work, &["commit", "-q", "-m", branch]);
    run_git(
        work,
        &[
            "push",
            "-q",
            &source.ssh_url("s1", "repo.git"),
            &format!("HEAD:refs/heads/{branch}"),
        ],
    );
    run_git(work, &["rev-parse", "HEAD"]).trim().to_owned()
}

fn has_object(repository: &std::path::Path, id: &str) -> bool {
    std::process::Command::new("git")
        .arg("--git-dir")
        .arg(repository)
        .args(["cat-file", "-e", id])
        .status()
        .unwrap()
        .success()
}

#[tokio::test]
async fn the_objects_phase_copies_objects_and_changes_no_reference() {
    let (source, target, work) = two_nodes().await;
    let copy = target.repo_path("s1", "copy.git");

    // A new target: created with HEAD and the objects, and no reference yet.
    let response = copy_phase(&target, &source, ReplicationPhase::Objects, None)
        .await
        .unwrap();
    assert!(response.created);
    assert_eq!(response.refs_changed, 0);
    assert_eq!(refs_of(&copy), "");
    let main = run_git(work.path(), &["rev-parse", "main"]);
    assert!(has_object(&copy, main.trim()));

    // The refs phase sets every reference and HEAD, and says how many it changed.
    let response = copy_phase(&target, &source, ReplicationPhase::Refs, Some(3))
        .await
        .unwrap();
    assert!(!response.created);
    assert_eq!(refs_of(&copy), refs_of(&source.repo_path("s1", "repo.git")));
    assert_eq!(
        response.refs_changed as usize,
        refs_of(&copy).lines().count()
    );
    assert_eq!(
        checksum(&target, "copy.git").await,
        checksum(&source, "repo.git").await
    );

    // The source moves on: the objects phase fetches the new commit and leaves the refs.
    let before = refs_of(&copy);
    let fresh = push_branch(&source, work.path(), "fresh");
    let response = copy_phase(&target, &source, ReplicationPhase::Objects, None)
        .await
        .unwrap();
    assert_eq!((response.created, response.refs_changed), (false, 0));
    assert!(has_object(&copy, &fresh));
    assert_eq!(refs_of(&copy), before);
    let response = copy_phase(&target, &source, ReplicationPhase::Refs, Some(4))
        .await
        .unwrap();
    assert_eq!(response.refs_changed, 1);
    assert_eq!(refs_of(&copy), refs_of(&source.repo_path("s1", "repo.git")));
}

#[tokio::test]
async fn a_refs_phase_older_than_the_replica_s_fence_changes_nothing() {
    let (source, target, work) = two_nodes().await;
    let copy = target.repo_path("s1", "copy.git");
    copy_phase(&target, &source, ReplicationPhase::Refs, Some(5))
        .await
        .unwrap();
    let before = refs_of(&copy);
    push_branch(&source, work.path(), "fresh");

    let status = copy_phase(&target, &source, ReplicationPhase::Refs, Some(4))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(status.message(), "fenced: token 4 is older than 5");
    assert_eq!(refs_of(&copy), before);

    // The same token again, or a newer one, goes through.
    copy_phase(&target, &source, ReplicationPhase::Refs, Some(5))
        .await
        .unwrap();
    assert_eq!(refs_of(&copy), refs_of(&source.repo_path("s1", "repo.git")));
}

/// The fence is checked when the refs change, not when the request arrives: a refs phase
/// that read the source and then stalled, while a newer one went through, is refused when it
/// resumes, and the replica keeps the newer state.
#[tokio::test]
async fn a_refs_phase_that_resumes_after_a_newer_one_is_refused() {
    let source = NodeProcess::start();
    let stall = Stall::new("cat-file");
    let target = NodeProcess::start_with(NodeOptions {
        extra_config: stall.node_config(),
        ..NodeOptions::default()
    });
    let work = push_history(&source, &["main", "feature", "v1", "v2"]).await;
    let copy = target.repo_path("s1", "copy.git");
    copy_phase(&target, &source, ReplicationPhase::Refs, Some(5))
        .await
        .unwrap();

    // The old phase reads the source with `early` on it, and stalls before its update.
    let early = push_branch(&source, work.path(), "early");
    stall.arm();
    let late = tokio::spawn({
        let (target_channel, source) = (target.channel().await, repo_on(&source));
        async move {
            let mut request = tonic::Request::new(ReplicateRepositoryRequest {
                repository: header("s1", "copy.git"),
                source,
                phase: ReplicationPhase::Refs.into(),
            });
            gitfleet::fleet::set_fence(request.metadata_mut(), 6);
            NodeServiceClient::new(target_channel)
                .replicate_repository(request)
                .await
        }
    });
    stall.stalled().await;

    // Meanwhile `early` is deleted and a newer phase mirrors that.
    run_git(
        work.path(),
        &["push", "-q", &source.ssh_url("s1", "repo.git"), ":early"],
    );
    copy_phase(&target, &source, ReplicationPhase::Refs, Some(7))
        .await
        .unwrap();
    let newer = refs_of(&copy);
    assert_eq!(newer, refs_of(&source.repo_path("s1", "repo.git")));
    assert!(!newer.contains("refs/heads/early"), "{newer}");

    stall.release();
    let status = late.await.unwrap().unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_eq!(status.message(), "fenced: token 6 is older than 7");
    assert_eq!(refs_of(&copy), newer);
    assert!(has_object(&copy, &early), "the objects were still copied");
}
