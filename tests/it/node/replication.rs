//! Replication between two real nodes: the target fetches through the source's own
//! upload-pack RPC and ends up an exact mirror.

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
    NodeServiceClient::new(target.channel().await)
        .replicate_repository(ReplicateRepositoryRequest {
            repository: header("s1", target_path),
            source,
        })
        .await
        .map(|response| response.into_inner().created)
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
