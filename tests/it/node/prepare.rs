//! A prepared push, driven by real git: receive-pack runs with the node's hook, stops with the
//! pack in quarantine and its commands reported at the rendezvous (pre-receive), and commits
//! only on the node's decision, under that decision's token and the replica's fence, which the
//! hook holds until receive-pack exits.

use std::path::Path;
use std::process::Stdio;

use crate::common::*;
use gitfleet::node::prepare::{PREPARE_ENV, PreparedUpdate, Rendezvous};
use gitfleet::node::{fence, hook};
use gitfleet::proto::smart_http_service_client::SmartHttpServiceClient;
use gitfleet::proto::{PostReceivePackRequest, PreparedPush, PushDecision, push_decision};

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
    hook::install_hook(&hooks, Path::new(BINARY), hook::PREPARED_HOOKS).unwrap();
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
    assert_eq!(
        prepared.updates,
        [PreparedUpdate {
            name: "refs/heads/main".into(),
            old: "0".repeat(40),
            new: setup.commit.clone(),
        }]
    );
    // Held before any ref moves, with the pack still in quarantine.
    assert!(!has_main(&setup.repository()));
    assert!(!has_object(&setup.repository(), &setup.commit));

    prepared.commit(7).await.unwrap();
    let repository = setup.repository();
    let output = setup.push.wait_with_output().await.unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(
        run_git(&repository, &["rev-parse", "refs/heads/main"]).trim(),
        setup.commit
    );
    assert_eq!(fence::read(&repository).unwrap(), 7);
    // The fence was held for the push, and let go when receive-pack exited: a newer token
    // enters at once, and no holder is left behind.
    let started = std::time::Instant::now();
    fence::enter(&repository, 8).unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert_eq!(fence_holders(&repository), Vec::<String>::new());
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
    // The quarantined pack went with the push.
    assert!(!has_object(&repository, &commit));
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
    let prepared = rendezvous.prepared().await.unwrap();
    prepared.commit(8).await.unwrap();
    let output = setup.push.wait_with_output().await.unwrap();
    assert!(!output.status.success(), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("fenced: token 8 is older than 9"),
        "{output:?}"
    );
    assert!(!has_main(&repository));
}

type Requests = tokio::sync::mpsc::Sender<PostReceivePackRequest>;
type Responses = tonic::Streaming<gitfleet::proto::PostReceivePackResponse>;

/// Starts a prepared PostReceivePack of `body` on the node, and reads up to its `prepared`
/// answer.
async fn prepare_push(node: &NodeProcess, body: Vec<u8>) -> (Requests, Responses, PreparedPush) {
    let (requests, inbound) = tokio::sync::mpsc::channel(4);
    requests
        .send(PostReceivePackRequest {
            repository: header("s1", "repo.git"),
            data: body.into(),
            prepare: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut responses = SmartHttpServiceClient::new(node.channel().await)
        .post_receive_pack(tokio_stream::wrappers::ReceiverStream::new(inbound))
        .await
        .unwrap()
        .into_inner();
    let prepared = loop {
        let message = responses.message().await.unwrap().expect("prepared");
        if let Some(prepared) = message.prepared {
            break prepared;
        }
    };
    (requests, responses, prepared)
}

/// Sends the decision, and reads the rest: receive-pack's report, and the error the answer
/// ended with, if any.
async fn send_decision(
    requests: Requests,
    mut responses: Responses,
    decision: push_decision::Decision,
) -> (String, Option<tonic::Status>) {
    requests
        .send(PostReceivePackRequest {
            decision: Some(PushDecision {
                decision: Some(decision),
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut report = Vec::new();
    let ended = loop {
        match responses.message().await {
            Ok(Some(message)) => report.extend_from_slice(&message.data),
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    (String::from_utf8_lossy(&report).into_owned(), ended)
}

/// A prepared push over PostReceivePack: answers `prepared` with its updates, waits, and
/// applies the decision.
#[tokio::test]
async fn a_node_answers_a_prepared_push_and_applies_the_decision() {
    let node = NodeProcess::start();
    let work = push_history(&node, &["main"]).await;
    let replica = node.repo_path("s1", "repo.git");
    let committed = push_decision::Decision::CommitToken(11);
    let aborted = push_decision::Decision::AbortReason("the write lock is on".into());
    for (branch, decision) in [("kept", committed), ("dropped", aborted)] {
        let commit = commit_on(work.path(), branch);
        let body = creating_push(work.path(), &[branch], &commit);
        let (requests, responses, prepared) = prepare_push(&node, body).await;
        assert_eq!(prepared.updates.len(), 1, "{prepared:?}");
        assert_eq!(prepared.updates[0].name, format!("refs/heads/{branch}"));
        assert_eq!(prepared.updates[0].new_target, commit);
        assert!(!refs_of(&replica).contains(&format!("refs/heads/{branch}")));

        let commits = matches!(decision, push_decision::Decision::CommitToken(_));
        let (report, ended) = send_decision(requests, responses, decision).await;
        if commits {
            assert!(ended.is_none(), "{ended:?}");
            assert!(
                report.contains(&format!("ok refs/heads/{branch}")),
                "{report}"
            );
            assert!(refs_of(&replica).contains(&format!("refs/heads/{branch}")));
        } else {
            // Every command is refused; the reason is the node's to log, and whoever decided
            // tells the client.
            let refused = format!("ng refs/heads/{branch} pre-receive hook declined");
            assert!(report.contains(&refused), "{report} {ended:?}");
            assert!(!refs_of(&replica).contains(&format!("refs/heads/{branch}")));
        }
        assert_eq!(fence::read(&replica).unwrap(), 11);
    }
}

/// Every command of a push is prepared at once; git then commits a push without --atomic one
/// ref transaction per command, all under the fence the decision's token entered.
#[tokio::test]
async fn every_ref_of_a_prepared_push_gets_its_decision() {
    let node = NodeProcess::start();
    let work = push_history(&node, &["main"]).await;
    let replica = node.repo_path("s1", "repo.git");
    let commit = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let body = creating_push(work.path(), &["one", "two", "three"], &commit);
    let (requests, responses, prepared) = prepare_push(&node, body).await;
    let names: Vec<&str> = prepared.updates.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(
        names,
        ["refs/heads/one", "refs/heads/two", "refs/heads/three"]
    );
    let decision = push_decision::Decision::CommitToken(13);
    let (report, ended) = send_decision(requests, responses, decision).await;
    assert!(ended.is_none(), "{ended:?}");
    let refs = refs_of(&replica);
    for branch in ["one", "two", "three"] {
        assert!(
            report.contains(&format!("ok refs/heads/{branch}")),
            "{report}"
        );
        assert!(refs.contains(&format!("refs/heads/{branch}")), "{refs}");
    }
    assert_eq!(fence::read(&replica).unwrap(), 13);
}
