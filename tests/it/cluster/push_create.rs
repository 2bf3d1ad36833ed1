//! Push-to-create: a push makes its repository, a push that fails leaves nothing behind, and
//! first pushes at once all land.

use std::io::{Read as _, Write as _};
use std::time::Duration;

use crate::common::cluster::{Cluster, STORAGES, WRITE_TOKEN};
use crate::common::http::*;
use crate::common::worker::wait_for;
use crate::common::*;

async fn open_cluster() -> Cluster {
    Cluster::start_on(
        crate::common::db::fresh_database().await,
        3,
        3,
        "",
        "push_to_create = true",
    )
    .await
}

/// Every replica directory on every node.
fn replica_dirs(cluster: &Cluster) -> Vec<String> {
    let mut dirs = Vec::new();
    for (index, storage) in STORAGES[..3].iter().enumerate() {
        let root = cluster.nodes[index].storage_path(storage).join("@cluster");
        if !root.exists() {
            continue;
        }
        for first in std::fs::read_dir(&root).unwrap().flatten() {
            for second in std::fs::read_dir(first.path()).unwrap().flatten() {
                for replica in std::fs::read_dir(second.path()).unwrap().flatten() {
                    dirs.push(replica.path().display().to_string());
                }
            }
        }
    }
    dirs
}

/// Sends a receive-pack request body over plain HTTP, optionally stopping after `send` bytes
/// of it and going away; returns the status line and body when it waited for them.
fn post_push(cluster: &Cluster, relative_path: &str, body: &[u8], send: usize) -> Option<String> {
    let mut stream = start_push(&cluster.git_http, relative_path, WRITE_TOKEN, body.len());
    stream.write_all(&body[..send]).unwrap();
    if send < body.len() {
        std::thread::sleep(Duration::from_millis(300));
        return None;
    }
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    Some(String::from_utf8_lossy(&response).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_push_that_fails_leaves_no_repository_behind() {
    let cluster = open_cluster().await;
    let work = tempfile::tempdir().unwrap();
    make_history(work.path());
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let body = creating_push(work.path(), &["main"], &main);
    let zero = "0".repeat(40);
    let mut forbidden = gitfleet::git::pktline::encode(
        format!("{zero} {main} refs/heads/a..b\0report-status\n").as_bytes(),
    );
    forbidden.extend_from_slice(b"0000");
    let mut garbage = b"0032this is not a command list at all, not at all\n".to_vec();
    garbage.extend_from_slice(b"0000PACKgarbage");

    let cases: Vec<(&str, Vec<u8>, usize)> = vec![
        ("garbage.git", garbage.clone(), garbage.len()),
        ("empty.git", Vec::new(), 0),
        ("forbidden.git", forbidden.clone(), forbidden.len()),
        // Commands and most of the pack, then an end that says it is whole.
        (
            "truncated.git",
            body[..body.len() - 30].to_vec(),
            body.len() - 30,
        ),
        // Commands and most of the pack, then the client goes away.
        ("gone.git", body.clone(), body.len() - 30),
    ];
    let store = cluster.store();
    for (path, body, send) in &cases {
        let answer = tokio::task::block_in_place(|| post_push(&cluster, path, body, *send));
        println!("{path}: {answer:?}");
        if let Some(answer) = answer {
            assert!(!answer.contains("ok refs/heads/main"), "{answer}");
        }
    }
    wait_for(30, "every failed push to leave nothing", || async {
        for (path, _, _) in &cases {
            let found = store
                .find_repository(
                    &Cluster::virtual_storage(),
                    &gitfleet::model::RelativePath::parse(path).unwrap(),
                )
                .await
                .unwrap();
            if found.is_some() {
                return false;
            }
        }
        replica_dirs(&cluster).is_empty() && store.pending_writes().await.unwrap() == 0
    })
    .await;
    assert!(store.writes_in_flight().await.unwrap().is_empty());

    // A good push still makes its repository.
    let url = cluster.git_url(WRITE_TOKEN, "good.git");
    ok(&git_http(work.path(), &["push", "-q", &url, "main"]));
    let record = cluster.record("good.git").await;
    assert_eq!(record.generation, 1);
    assert_eq!(record.up_to_date().count(), 3);
    assert_eq!(replica_dirs(&cluster).len(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_first_pushes_at_once_all_land() {
    let cluster = open_cluster().await;
    let work = tempfile::tempdir().unwrap();
    make_history(work.path());
    let url = cluster.git_url(WRITE_TOKEN, "together.git");
    let mut branches = Vec::new();
    for n in 0..10 {
        let branch = format!("b{n}");
        commit_branch(work.path(), &branch);
        branches.push(branch);
    }
    let pushes: Vec<_> = branches
        .iter()
        .map(|branch| {
            let (dir, url, branch) = (work.path().to_owned(), url.clone(), branch.clone());
            std::thread::spawn(move || git_http(&dir, &["push", "-q", &url, &branch]))
        })
        .collect();
    for (branch, push) in branches.iter().zip(pushes) {
        let output = push.join().unwrap();
        assert!(
            output.status.success(),
            "{branch}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let record = cluster.record("together.git").await;
    assert_eq!(record.generation, 10);
    assert_eq!(record.up_to_date().count(), 3);
    for index in 0..3 {
        let refs = refs_of(&cluster.replica_dir(index, &record));
        for branch in &branches {
            let tip = run_git(work.path(), &["rev-parse", branch])
                .trim()
                .to_owned();
            assert!(
                refs.contains(&format!("{tip} refs/heads/{branch}\n")),
                "{refs}"
            );
        }
    }
    assert_eq!(replica_dirs(&cluster).len(), 3);
    // Ten pushes each advanced the refs checksum from the empty repository's: it is the
    // replicas'.
    assert_eq!(
        cluster.store().refs_checksum(record.id).await.unwrap(),
        Some(cluster.agreed_checksum(&record).await)
    );

    // Two first pushes of the same branch truly conflict: one lands, the other is told why.
    let url = cluster.git_url(WRITE_TOKEN, "clash.git");
    let other = tempfile::tempdir().unwrap();
    make_history(other.path());
    commit_on(other.path(), "main");
    let pushes: Vec<_> = [work.path().to_owned(), other.path().to_owned()]
        .into_iter()
        .map(|dir| {
            let url = url.clone();
            std::thread::spawn(move || git_http(&dir, &["push", &url, "main"]))
        })
        .collect();
    let outputs: Vec<_> = pushes.into_iter().map(|p| p.join().unwrap()).collect();
    let landed = outputs.iter().filter(|o| o.status.success()).count();
    assert_eq!(landed, 1, "{outputs:?}");
    let refused = outputs.iter().find(|o| !o.status.success()).unwrap();
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("main -> main"), "{said}");
    assert!(!said.contains("RPC failed"), "{said}");
    assert_eq!(cluster.record("clash.git").await.generation, 1);
}

/// The repository a first push makes exists for nobody else until the push's refs commit: a
/// clone meanwhile finds nothing, `RepositoryExists` says no, and once the push lands both see
/// it.
#[tokio::test(flavor = "multi_thread")]
async fn a_repository_a_first_push_makes_is_not_there_until_the_push_commits() {
    use gitfleet::proto::RepositoryExistsRequest;
    use gitfleet::proto::repository_service_client::RepositoryServiceClient;

    let cluster = open_cluster().await;
    let work = tempfile::tempdir().unwrap();
    make_history(work.path());
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let body = creating_push(work.path(), &["main"], &main);
    let url = cluster.git_url(WRITE_TOKEN, "unborn.git");
    let exists = || async {
        RepositoryServiceClient::new(cluster.channel().await)
            .repository_exists(RepositoryExistsRequest {
                repository: header("default", "unborn.git"),
            })
            .await
            .unwrap()
            .into_inner()
            .exists
    };

    // The push sends its commands and most of its pack, and waits: its repository is made.
    let mut stream = start_push(&cluster.git_http, "unborn.git", WRITE_TOKEN, body.len());
    stream.write_all(&body[..body.len() - 30]).unwrap();
    let store = cluster.store();
    wait_for(30, "the push to make its repository", || async {
        store.pending_writes().await.unwrap() == 1
    })
    .await;
    assert!(
        store
            .find_repository(
                &Cluster::virtual_storage(),
                &gitfleet::model::RelativePath::parse("unborn.git").unwrap(),
            )
            .await
            .unwrap()
            .is_some(),
        "the push made no row"
    );
    let clone = tempfile::tempdir().unwrap();
    let cloned = git_http(clone.path(), &["clone", "-q", &url, "c"]);
    assert!(!cloned.status.success(), "{cloned:?}");
    assert!(
        String::from_utf8_lossy(&cloned.stderr).contains("not found"),
        "{cloned:?}"
    );
    assert!(!exists().await);

    // The rest of the pack: the push lands, and the repository is there.
    stream.write_all(&body[body.len() - 30..]).unwrap();
    let mut answer = Vec::new();
    tokio::task::block_in_place(|| stream.read_to_end(&mut answer)).unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.contains("ok refs/heads/main"), "{answer}");
    assert!(exists().await);
    let cloned = ok(&git_http(clone.path(), &["clone", "-q", &url, "c"]));
    assert!(cloned.is_empty() || !cloned.contains("fatal"), "{cloned}");
    assert_eq!(
        run_git(&clone.path().join("c"), &["rev-parse", "HEAD"]).trim(),
        main
    );
}
