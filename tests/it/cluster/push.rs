//! Pushes as a two-phase commit, seen as stock git sees them over the proxy's HTTP port: git's
//! own answer per ref (`ok`, `ng` with the reason), nothing recorded for what was refused, and
//! no push held by another one's slow pack.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::cluster::{Cluster, READ_TOKEN, WRITE_TOKEN};
use crate::common::http::*;
use crate::common::worker::wait_for;
use crate::common::*;

/// A repository with main and a branch `feat` pushed over HTTP; returns the work tree's dir.
async fn with_feat(cluster: &Cluster, relative_path: &str) -> tempfile::TempDir {
    cluster.create(relative_path).await;
    let work = tempfile::tempdir().unwrap();
    make_history(work.path());
    run_git(work.path(), &["branch", "feat"]);
    let url = cluster.git_url(WRITE_TOKEN, relative_path);
    ok(&git_http(
        work.path(),
        &["push", "-q", &url, "main", "feat"],
    ));
    work
}

/// Each replica's refs, by node.
async fn replica_refs(cluster: &Cluster, relative_path: &str) -> Vec<String> {
    let record = cluster.record(relative_path).await;
    (0..3)
        .map(|index| refs_of(&cluster.replica_dir(index, &record)))
        .collect()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs `git push ARGS` in `work` with a pre-push hook that stops the push after git has
/// read the advertisement and before it sends its pack, runs `meanwhile`, then lets the
/// push go on. Returns git's output.
fn push_with_pause(work: &Path, args: &[&str], meanwhile: impl FnOnce()) -> std::process::Output {
    let marker = work.join(".git/paused");
    let hook = work.join(".git/hooks/pre-push");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\ntouch '{0}'\nwhile [ -e '{0}' ]; do sleep 0.02; done\n",
            marker.display()
        ),
    )
    .unwrap();
    std::process::Command::new("chmod")
        .args(["+x", hook.to_str().unwrap()])
        .status()
        .unwrap();
    let (work_dir, args): (std::path::PathBuf, Vec<String>) = (
        work.to_owned(),
        args.iter().map(|arg| (*arg).to_owned()).collect(),
    );
    let push = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        git_http(&work_dir, &args)
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the push never reached its hook");
        std::thread::sleep(Duration::from_millis(10));
    }
    meanwhile();
    std::fs::remove_file(&marker).unwrap();
    let output = push.join().unwrap();
    std::fs::remove_file(&hook).unwrap();
    output
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partial_push_reports_each_ref_and_records_exactly_what_moved() {
    let cluster = Cluster::start(3).await;
    let work = with_feat(&cluster, "partial.git").await;
    let url = cluster.git_url(WRITE_TOKEN, "partial.git");
    let before = cluster.record("partial.git").await.generation;
    let refs_before = replica_refs(&cluster, "partial.git").await;

    // `feat/x` cannot exist beside `feat`; main moves on.
    std::fs::write(work.path().join("more.txt"), "more\n").unwrap();
    run_git(work.path(), &["add", "."]);
    run_git(work.path(), &["commit", "-q", "-m", "more"]);
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let output = git_http(
        work.path(),
        &["push", &url, "main", "main:refs/heads/feat/x"],
    );
    let said = stderr(&output);
    println!("git push said:\n{said}");
    assert_eq!(output.status.code(), Some(1), "{said}");
    assert!(!said.contains("RPC failed"), "{said}");
    assert!(
        said.contains("! [remote rejected] main -> feat/x ("),
        "{said}"
    );
    let main_line = said
        .lines()
        .find(|line| line.contains("main -> main"))
        .unwrap_or_else(|| panic!("{said}"));
    assert!(!main_line.contains("rejected"), "{said}");

    let record = cluster.record("partial.git").await;
    assert_eq!(record.generation, before + 1);
    assert!(record.assigned.iter().all(|s| record.is_up_to_date(s)));
    for refs in replica_refs(&cluster, "partial.git").await {
        assert!(refs.contains(&format!("{main} refs/heads/main")), "{refs}");
        assert!(!refs.contains("refs/heads/feat/x"), "{refs}");
        assert!(refs.contains("refs/heads/feat\n"), "{refs}");
    }
    assert_ne!(replica_refs(&cluster, "partial.git").await, refs_before);
    // The generation's refs checksum, computed from the refs that moved, is the replicas'.
    assert_eq!(
        cluster.store().refs_checksum(record.id).await.unwrap(),
        Some(cluster.agreed_checksum(&record).await)
    );

    // All or nothing with --atomic: nothing moves, and nothing is recorded.
    std::fs::write(work.path().join("atomic.txt"), "atomic\n").unwrap();
    run_git(work.path(), &["checkout", "-q", "main"]);
    run_git(work.path(), &["add", "."]);
    run_git(work.path(), &["commit", "-q", "-m", "atomic"]);
    let refs_before = replica_refs(&cluster, "partial.git").await;
    let output = git_http(
        work.path(),
        &["push", "--atomic", &url, "main", "main:refs/heads/feat/x"],
    );
    let said = stderr(&output);
    println!("git push --atomic said:\n{said}");
    assert!(!output.status.success(), "{said}");
    assert!(!said.contains("RPC failed"), "{said}");
    assert!(said.contains("! [remote rejected] main -> main"), "{said}");
    assert_eq!(replica_refs(&cluster, "partial.git").await, refs_before);
    assert_eq!(
        cluster.record("partial.git").await.generation,
        before + 1,
        "a push that moved nothing records nothing"
    );
    assert!(cluster.store().writes_in_flight().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_race_the_write_lock_and_a_read_only_token_each_say_why() {
    let cluster = Cluster::start(3).await;
    let work = with_feat(&cluster, "race.git").await;
    let url = cluster.git_url(WRITE_TOKEN, "race.git");
    let rival = tempfile::tempdir().unwrap();
    run_git(rival.path(), &["clone", "-q", &url, "rival"]);
    let rival = rival.path().join("rival");
    let rival_main = commit_on(&rival, "main");
    std::fs::write(work.path().join("mine.txt"), "mine\n").unwrap();
    run_git(work.path(), &["add", "."]);
    run_git(work.path(), &["commit", "-q", "-m", "mine"]);

    // The rival's push lands after git read main's old value and before it sent its pack.
    let output = push_with_pause(work.path(), &["push", &url, "main"], || {
        ok(&git_http(&rival, &["push", "-q", &url, "main"]));
    });
    let said = stderr(&output);
    println!("the push that lost the race said:\n{said}");
    assert!(!output.status.success());
    assert!(!said.contains("RPC failed"), "{said}");
    assert!(
        said.contains("! [remote rejected] main -> main (failed to update ref)"),
        "{said}"
    );
    assert!(said.contains("remote: error: cannot lock ref"), "{said}");
    for refs in replica_refs(&cluster, "race.git").await {
        assert!(
            refs.contains(&format!("{rival_main} refs/heads/main")),
            "{refs}"
        );
    }

    // The write lock, turned on while the pack was on its way.
    let store = cluster.store();
    let output = push_with_pause(work.path(), &["push", "--force", &url, "main"], || {
        futures_block(store.set_write_lock(true, Some("moving disks"), "test")).unwrap();
    });
    let said = stderr(&output);
    println!("the push under the write lock said:\n{said}");
    assert!(!output.status.success());
    assert!(!said.contains("RPC failed"), "{said}");
    assert!(
        said.contains(
            "! [remote rejected] main -> main (writes are locked for maintenance: moving disks)"
        ),
        "{said}"
    );
    assert!(
        said.contains("remote: gitfleet: writes are locked for maintenance: moving disks"),
        "{said}"
    );
    for refs in replica_refs(&cluster, "race.git").await {
        assert!(
            refs.contains(&format!("{rival_main} refs/heads/main")),
            "{refs}"
        );
    }
    store.set_write_lock(false, None, "test").await.unwrap();

    // A read-only token is turned away before anything is sent.
    let output = git_http(
        work.path(),
        &["push", &cluster.git_url(READ_TOKEN, "race.git"), "main"],
    );
    let said = stderr(&output);
    println!("the push with a read-only token said:\n{said}");
    assert!(!output.status.success());
    assert!(
        said.contains("remote: the token of reader may read but not push"),
        "{said}"
    );
}

/// Runs a future to its end from a plain thread.
fn futures_block<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_trickling_push_holds_no_other_push_and_a_client_gone_mid_pack_leaves_nothing() {
    let cluster = Cluster::start(3).await;
    let work = with_feat(&cluster, "slow.git").await;
    let url = cluster.git_url(WRITE_TOKEN, "slow.git");
    let slow = commit_on(work.path(), "slow");
    let body = creating_push(work.path(), &["slow"], &slow);
    let (head, tail) = body.split_at(body.len() - 20);

    // A client sends its commands and most of its pack, and stops.
    let mut trickle = start_push(&cluster.git_http, "slow.git", WRITE_TOKEN, body.len());
    trickle.write_all(head).unwrap();

    // Another push to the same repository goes through meanwhile.
    let fast = tempfile::tempdir().unwrap();
    run_git(fast.path(), &["clone", "-q", &url, "fast"]);
    let fast = fast.path().join("fast");
    let fast_commit = commit_on(&fast, "fast");
    let started = Instant::now();
    let pushed = tokio::task::spawn_blocking({
        let (fast, url) = (fast.clone(), url.clone());
        move || git_http(&fast, &["push", "-q", &url, "fast"])
    });
    let pushed = tokio::time::timeout(Duration::from_secs(60), pushed)
        .await
        .expect("a push was held by another push's unfinished pack")
        .unwrap();
    ok(&pushed);
    println!(
        "the other push took {:.0} ms while a pack trickled",
        started.elapsed().as_secs_f64() * 1000.0
    );

    // The slow pack ends, and its push lands too, with git's own report.
    trickle.write_all(tail).unwrap();
    let mut response = Vec::new();
    trickle.read_to_end(&mut response).unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("ok refs/heads/slow"), "{response}");
    for refs in replica_refs(&cluster, "slow.git").await {
        assert!(refs.contains(&format!("{slow} refs/heads/slow")), "{refs}");
        assert!(
            refs.contains(&format!("{fast_commit} refs/heads/fast")),
            "{refs}"
        );
    }
    let generation = cluster.record("slow.git").await.generation;

    // A client that goes away mid-pack: no ref moves, nothing stays recorded.
    let gone = commit_on(work.path(), "gone");
    let body = creating_push(work.path(), &["gone"], &gone);
    let mut client = start_push(&cluster.git_http, "slow.git", WRITE_TOKEN, body.len());
    client.write_all(&body[..body.len() - 20]).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(client);
    let store = cluster.store();
    wait_for(30, "the abandoned push to be forgotten", || async {
        store.writes_in_flight().await.unwrap().is_empty()
            && store.pending_writes().await.unwrap() == 0
    })
    .await;
    for refs in replica_refs(&cluster, "slow.git").await {
        assert!(!refs.contains("refs/heads/gone"), "{refs}");
    }
    assert_eq!(cluster.record("slow.git").await.generation, generation);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_prepared_in_a_repository_moved_away_never_commits_into_its_successor() {
    let cluster = Cluster::start(3).await;
    let work = with_feat(&cluster, "again.git").await;
    let slow = commit_on(work.path(), "slow");
    let body = creating_push(work.path(), &["slow"], &slow);
    let (head, tail) = body.split_at(body.len() - 20);
    let mut client = start_push(&cluster.git_http, "again.git", WRITE_TOKEN, body.len());
    client.write_all(head).unwrap();
    let store = cluster.store();
    wait_for(30, "the push to be pending", || async {
        store.pending_writes().await.unwrap() == 1
    })
    .await;

    // Meanwhile the repository is renamed (its replicas stay where they are) and another is
    // made at its path.
    let mut repositories = gitfleet::proto::repository_service_client::RepositoryServiceClient::new(
        cluster.channel().await,
    );
    repositories
        .rename_repository(gitfleet::proto::RenameRepositoryRequest {
            repository: header("default", "again.git"),
            new_relative_path: "moved.git".into(),
        })
        .await
        .unwrap();
    cluster.create("again.git").await;
    let successor = cluster.record("again.git").await;

    client.write_all(tail).unwrap();
    let mut response = Vec::new();
    client.read_to_end(&mut response).unwrap();
    let response = String::from_utf8_lossy(&response).into_owned();
    println!("{response}");
    assert!(response.contains("ng refs/heads/slow"), "{response}");
    let after = cluster.record("again.git").await;
    assert_eq!(after.id, successor.id);
    assert_eq!(
        after.generation, 0,
        "the push was recorded in the successor"
    );
    for index in 0..3 {
        let refs = refs_of(&cluster.replica_dir(index, &after));
        assert!(!refs.contains("refs/heads/slow"), "{refs}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pack_that_never_ends_is_given_up_after_the_write_timeout() {
    let cluster = Cluster::start_with(3, 3, "[writes]\ntimeout = \"2s\"\n").await;
    let work = with_feat(&cluster, "endless.git").await;
    let generation = cluster.record("endless.git").await.generation;
    let slow = commit_on(work.path(), "slow");
    let body = creating_push(work.path(), &["slow"], &slow);
    let mut client = start_push(&cluster.git_http, "endless.git", WRITE_TOKEN, body.len());
    // All but the end of the pack, and then nothing: the push is pending meanwhile.
    client.write_all(&body[..body.len() - 20]).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // The answer ends (chunked) while the request's body never did: read up to its end.
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    while !response.ends_with(b"\r\n0\r\n\r\n") {
        match client.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(read) => response.extend_from_slice(&chunk[..read]),
        }
    }
    let response = String::from_utf8_lossy(&response).into_owned();
    println!("{response}");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("ng refs/heads/slow"), "{response}");
    assert!(
        response.contains("was not prepared within 2s"),
        "{response}"
    );
    let store = cluster.store();
    assert_eq!(store.pending_writes().await.unwrap(), 0);
    assert!(store.writes_in_flight().await.unwrap().is_empty());
    let record = cluster.record("endless.git").await;
    assert_eq!(record.generation, generation);
    for refs in replica_refs(&cluster, "endless.git").await {
        assert!(!refs.contains("refs/heads/slow"), "{refs}");
    }
}
