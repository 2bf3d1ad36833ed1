//! A prepared push, driven by real git: receive-pack runs with the node's reference-transaction
//! hook, stops with the pack in quarantine and its ref updates reported at the rendezvous, and
//! commits only on the node's decision, under that decision's token and the replica's fence.

use std::path::Path;
use std::process::Stdio;

use crate::common::*;
use gitfleet::node::fence;
use gitfleet::node::prepare::{PREPARE_ENV, PreparedUpdate, Rendezvous};

/// A bare repository with the node's hook installed beside it, a work tree with one commit,
/// and the push of that commit, started with the rendezvous and waiting at `prepared`.
struct Setup {
    dir: tempfile::TempDir,
    commit: String,
    push: tokio::process::Child,
}

impl Setup {
    fn repository(&self) -> std::path::PathBuf {
        self.dir.path().join("r.git")
    }
}

fn start_push(rendezvous: &Rendezvous) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    run_git(dir.path(), &["init", "-q", "--bare", "r.git"]);
    let hooks = dir.path().join("hooks");
    fence::install_hook(&hooks, Path::new(BINARY)).unwrap();
    let work = dir.path().join("work");
    make_history(&work);
    let commit = run_git(&work, &["rev-parse", "main"]).trim().to_owned();
    let receive_pack = format!("git -c core.hooksPath={} receive-pack", hooks.display());
    let push = tokio::process::Command::new("git")
        .current_dir(&work)
        .args(["push", "--porcelain", "--receive-pack", &receive_pack])
        .arg(dir.path().join("r.git"))
        .arg("main")
        .env(PREPARE_ENV, rendezvous.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    Setup { dir, commit, push }
}

fn has_main(repository: &Path) -> bool {
    try_git(
        repository,
        &["rev-parse", "--verify", "-q", "refs/heads/main"],
    )
    .status
    .success()
}

fn has_object(repository: &Path, id: &str) -> bool {
    try_git(repository, &["cat-file", "-e", id])
        .status
        .success()
}

#[tokio::test]
async fn a_prepared_push_waits_for_its_decision_and_commits_under_its_token() {
    let sockets = tempfile::tempdir().unwrap();
    let rendezvous = Rendezvous::bind(sockets.path()).unwrap();
    let setup = start_push(&rendezvous);
    let prepared = rendezvous.prepared().await.unwrap();
    // The branch, and HEAD, which points at it.
    let update = |name: &str| PreparedUpdate {
        name: name.into(),
        old: "0".repeat(40),
        new: setup.commit.clone(),
    };
    assert_eq!(
        prepared.updates,
        [update("refs/heads/main"), update("HEAD")]
    );
    // Held at the ref update: no ref has moved yet.
    assert!(!has_main(&setup.repository()));

    prepared.commit(7).await.unwrap();
    let repository = setup.repository();
    let output = setup.push.wait_with_output().await.unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        run_git(&repository, &["rev-parse", "refs/heads/main"]).trim(),
        setup.commit
    );
    assert_eq!(fence::read(&repository).unwrap(), 7);
}

#[tokio::test]
async fn an_aborted_prepared_push_changes_nothing_and_says_why() {
    let sockets = tempfile::tempdir().unwrap();
    let rendezvous = Rendezvous::bind(sockets.path()).unwrap();
    let setup = start_push(&rendezvous);
    let prepared = rendezvous.prepared().await.unwrap();
    prepared
        .abort("a majority of the replicas is out of reach")
        .await
        .unwrap();
    let repository = setup.repository();
    let commit = setup.commit.clone();
    let output = setup.push.wait_with_output().await.unwrap();
    assert!(!output.status.success(), "{output:?}");
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(
        said.contains("a majority of the replicas is out of reach"),
        "{said}"
    );
    assert!(!has_main(&repository));
    // The pack's objects stay, unreferenced.
    assert!(has_object(&repository, &commit));
    assert_eq!(run_git(&repository, &["for-each-ref"]), "");
}

#[tokio::test]
async fn a_prepared_push_without_a_decision_aborts_and_one_with_an_older_token_is_fenced() {
    let sockets = tempfile::tempdir().unwrap();
    let rendezvous = Rendezvous::bind(sockets.path()).unwrap();
    // The node goes away: no decision is an abort.
    let setup = start_push(&rendezvous);
    drop(rendezvous.prepared().await.unwrap());
    let repository = setup.repository();
    let output = setup.push.wait_with_output().await.unwrap();
    assert!(!output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no decision"),
        "{output:?}"
    );
    assert!(!has_main(&repository));

    // A decision whose token is older than the replica's fence is refused at the fence.
    let setup = start_push(&rendezvous);
    let repository = setup.repository();
    fence::enter(&repository, 9).unwrap();
    rendezvous
        .prepared()
        .await
        .unwrap()
        .commit(8)
        .await
        .unwrap();
    let output = setup.push.wait_with_output().await.unwrap();
    assert!(!output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("fenced: token 8 is older than 9"),
        "{output:?}"
    );
    assert!(!has_main(&repository));
}
