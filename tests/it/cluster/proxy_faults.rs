//! The proxy when things go wrong: bad input, dead nodes, a majority out of reach, a write that
//! arrives twice or lands on a minority, PostgreSQL going away, a shutdown mid-push.

use std::time::{Duration, Instant};

use crate::common::cluster::{Cluster, STORAGES};
use crate::common::stall::Stall;
use crate::common::worker::{start_worker, wait_for, worker_config};
use crate::common::*;
use gitfleet::dev::postgres::{Durability, PrivatePostgres};
use gitfleet::node::fence::FENCE_HEADER;
use gitfleet::proto::node_service_client::NodeServiceClient;
use gitfleet::proto::ref_service_client::RefServiceClient;
use gitfleet::proto::repository_service_client::RepositoryServiceClient;
use gitfleet::proto::*;
use gitfleet::worker::{Hooks, JobType};

/// Everything a call could have changed in the catalog.
async fn catalog_state(cluster: &Cluster) -> (i64, i64, i64, i64, i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM repositories),
                (SELECT coalesce(sum(generation), 0)::bigint FROM repositories),
                (SELECT coalesce(sum(lease_token), 0)::bigint FROM repositories),
                (SELECT count(*) FROM write_intents),
                (SELECT count(*) FROM jobs),
                (SELECT last_value FROM repositories_id_seq)",
    )
    .fetch_one(cluster.store().pool())
    .await
    .unwrap()
}

fn update(name: &str, old: &str, new: &str) -> RefUpdate {
    RefUpdate {
        name: name.into(),
        old_target: old.into(),
        new_target: new.into(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let cluster = Cluster::start(3).await;
    cluster.create("exists.git").await;
    let before = catalog_state(&cluster).await;
    let channel = cluster.channel().await;
    let mut repositories = RepositoryServiceClient::new(channel.clone());
    let mut refs = RefServiceClient::new(channel.clone());

    let error = refs
        .find_default_branch(FindDefaultBranchRequest {
            repository: header("nowhere", "exists.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(
        error.message().contains("\"nowhere\""),
        "{}",
        error.message()
    );
    assert_eq!(
        error.metadata().get("gitfleet-error-source").unwrap(),
        "proxy"
    );

    let error = refs
        .list_refs(ListRefsRequest {
            repository: header("default", "missing.git"),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::NotFound);
    assert!(
        error.message().contains("default/missing.git"),
        "{}",
        error.message()
    );

    let error = repositories
        .create_repository(CreateRepositoryRequest {
            repository: header("default", "exists.git"),
            default_branch: "main".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::AlreadyExists);

    for bad in [
        "../escape.git",
        "/abs.git",
        "a/\0.git",
        ".gitfleet/x.git",
        "",
    ] {
        let error = repositories
            .create_repository(CreateRepositoryRequest {
                repository: header("default", bad),
                default_branch: "main".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), tonic::Code::InvalidArgument, "{bad:?}");
    }
    let error = repositories
        .create_repository(CreateRepositoryRequest {
            repository: None,
            default_branch: "main".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);
    assert!(
        error.message().contains("no repository header"),
        "{}",
        error.message()
    );

    let error = refs
        .update_refs(UpdateRefsRequest {
            repository: header("default", "exists.git"),
            updates: vec![update("refs/heads/x", "nonsense", &"1".repeat(40))],
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::InvalidArgument);

    // Larger than max_message_bytes (4 MiB by default).
    let error = repositories
        .create_repository(CreateRepositoryRequest {
            repository: header("default", "huge.git"),
            default_branch: "b".repeat(5 << 20),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            error.code(),
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
        ),
        "{error:?}"
    );

    // The node-internal API is not reachable through the proxy.
    let error = NodeServiceClient::new(channel.clone())
        .disk_usage(DiskUsageRequest {
            storage: Some(StorageHeader {
                storage: STORAGES[0].into(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unimplemented);

    // Without a token nothing is served.
    let unsigned = gitfleet::client::endpoint(&cluster.address)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let error = RefServiceClient::new(unsigned)
        .find_default_branch(FindDefaultBranchRequest {
            repository: header("default", "exists.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unauthenticated);

    assert_eq!(catalog_state(&cluster).await, before);
    let stray = std::fs::read_dir(cluster.nodes[0].storage_path(STORAGES[0]).join("@cluster"))
        .unwrap()
        .count();
    assert_eq!(stray, 1, "one directory for the one repository");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_arriving_twice_is_refused_the_second_time_and_changes_nothing() {
    let cluster = Cluster::start(3).await;
    cluster.create("twice.git").await;
    let work = cluster.push_main("twice.git");
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let request = UpdateRefsRequest {
        repository: header("default", "twice.git"),
        updates: vec![update("refs/heads/copy", &"0".repeat(40), &main)],
    };
    let mut refs = RefServiceClient::new(cluster.channel().await);
    refs.update_refs(request.clone()).await.unwrap();
    let state = catalog_state(&cluster).await;
    let error = refs.update_refs(request).await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::Aborted, "{error:?}");
    assert!(
        error.message().contains("nothing was changed"),
        "{}",
        error.message()
    );
    assert_eq!(
        error.metadata().get("gitfleet-error-source").unwrap(),
        "node"
    );
    let after = catalog_state(&cluster).await;
    assert_eq!(
        (after.0, after.1, after.3, after.4),
        (state.0, state.1, state.3, state.4)
    );
    let record = cluster.record("twice.git").await;
    assert_eq!(record.generation, 2);
    assert_eq!(record.up_to_date().count(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_only_a_minority_makes_leaves_that_minority_behind() {
    let cluster = Cluster::start(3).await;
    cluster.create("minority.git").await;
    let work = cluster.push_main("minority.git");
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let feature = run_git(work.path(), &["rev-parse", "feature"])
        .trim()
        .to_owned();
    run_git(
        work.path(),
        &["push", "-q", &cluster.url("minority.git"), "feature"],
    );
    let record = cluster.record("minority.git").await;
    assert_eq!(record.generation, 2);

    // Two replicas are moved behind the proxy's back, so the write's compare-and-swap holds
    // on one replica only: all three prepare it (they have its objects), one makes it, and two
    // refuse it.
    for index in [1, 2] {
        RefServiceClient::new(cluster.nodes[index].channel().await)
            .update_refs(UpdateRefsRequest {
                repository: header(STORAGES[index], record.replica_path.as_str()),
                updates: vec![update("refs/heads/feature", &feature, &main)],
            })
            .await
            .unwrap();
    }
    let catalog_before = cluster.store().refs_checksum(record.id).await.unwrap();
    let error = RefServiceClient::new(cluster.channel().await)
        .update_refs(UpdateRefsRequest {
            repository: header("default", "minority.git"),
            updates: vec![update("refs/heads/feature", &feature, &"0".repeat(40))],
        })
        .await
        .unwrap_err();
    // The majority's answer is the caller's: a lost compare-and-swap, and the catalog agrees.
    assert_eq!(error.code(), tonic::Code::Aborted, "{error:?}");
    assert!(
        error.message().contains("nothing was changed"),
        "{}",
        error.message()
    );
    let record = cluster.record("minority.git").await;
    assert_eq!(
        record.generation, 3,
        "the refusing majority is the next generation"
    );
    let current: Vec<&str> = record
        .up_to_date()
        .map(|storage| storage.as_str())
        .collect();
    assert_eq!(current, [STORAGES[1], STORAGES[2]]);
    let queued: Vec<String> = sqlx::query_scalar(
        "SELECT target_storage FROM jobs WHERE repository_id = $1 AND state = 'queued'",
    )
    .bind(record.id.0)
    .fetch_all(cluster.store().pool())
    .await
    .unwrap();
    assert_eq!(
        queued,
        [STORAGES[0]],
        "the replica that made it is repaired"
    );
    let served = run_git(
        work.path(),
        &[
            "ls-remote",
            &cluster.url("minority.git"),
            "refs/heads/feature",
        ],
    );
    assert!(served.starts_with(&main), "{served}");
    let intents: i64 = sqlx::query_scalar("SELECT count(*) FROM write_intents")
        .fetch_one(cluster.store().pool())
        .await
        .unwrap();
    assert_eq!(intents, 0);
    // Nothing was made by the generation's replicas: its checksum is the one before.
    assert_eq!(
        cluster.store().refs_checksum(record.id).await.unwrap(),
        catalog_before
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_fails_at_once_when_a_majority_of_replicas_is_unhealthy() {
    let mut cluster = Cluster::start(3).await;
    cluster.create("quorum.git").await;
    let work = cluster.push_main("quorum.git");
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    cluster.nodes[1].kill();
    cluster.nodes[2].kill();
    cluster.wait_for_health(1, false).await;
    cluster.wait_for_health(2, false).await;
    let state = catalog_state(&cluster).await;

    let started = Instant::now();
    let error = RefServiceClient::new(cluster.channel().await)
        .update_refs(UpdateRefsRequest {
            repository: header("default", "quorum.git"),
            updates: vec![update("refs/heads/copy", &"0".repeat(40), &main)],
        })
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(error.code(), tonic::Code::Unavailable);
    assert!(
        error.message().contains(STORAGES[1]) && error.message().contains(STORAGES[2]),
        "{}",
        error.message()
    );
    assert_eq!(catalog_state(&cluster).await, state);

    // A push fails the same way.
    commit_branch(work.path(), "late");
    let output = try_git(
        work.path(),
        &["push", "-q", &cluster.url("quorum.git"), "late"],
    );
    assert!(!output.status.success());
    assert_eq!(catalog_state(&cluster).await, state);

    // Creating needs a majority too.
    let error = RepositoryServiceClient::new(cluster.channel().await)
        .create_repository(CreateRepositoryRequest {
            repository: header("default", "new.git"),
            default_branch: "main".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unavailable);
    assert_eq!(catalog_state(&cluster).await, state);

    // Reads go on from the healthy replica.
    let answer = RefServiceClient::new(cluster.channel().await)
        .find_default_branch(FindDefaultBranchRequest {
            repository: header("default", "quorum.git"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.target, main);
}

/// Commits 24 MB of incompressible data on main in `work`.
fn commit_noise(work: &std::path::Path) {
    let noise: Vec<u8> = (0..24_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(work.join("noise.bin"), noise).unwrap();
    run_git(work, &["add", "noise.bin"]);
    run_git(work, &["commit", "-q", "-m", "noise"]);
}

/// Waits until node `index` receives the pack of a push: a git process of the node's that
/// reads a pack. (A ref advertisement or a refs checksum runs git too, but no pack reader.)
async fn wait_for_pack_on(cluster: &Cluster, index: usize) {
    for _ in 0..1000 {
        let receiving = git_processes_of(cluster.nodes[index].pid())
            .into_iter()
            .any(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                    let cmdline = String::from_utf8_lossy(&cmdline);
                    cmdline.contains("unpack-objects") || cmdline.contains("index-pack")
                })
            });
        if receiving {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the push's pack never reached node {index}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_dies_mid_push_is_left_behind_and_the_push_succeeds() {
    let mut cluster = Cluster::start(3).await;
    cluster.create("big.git").await;
    let work = cluster.push_main("big.git");
    commit_noise(work.path());
    let push = {
        let (dir, url) = (work.path().to_owned(), cluster.url("big.git"));
        std::thread::spawn(move || try_git(&dir, &["push", "-q", &url, "main"]))
    };
    wait_for_pack_on(&cluster, 2).await;
    cluster.nodes[2].kill();
    let output = push.join().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let record = cluster.record("big.git").await;
    assert_eq!(record.generation, 2);
    let current: Vec<&str> = record
        .up_to_date()
        .map(|storage| storage.as_str())
        .collect();
    assert_eq!(current, [STORAGES[0], STORAGES[1]]);
    let jobs: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE repository_id = $1 AND target_storage = $2 AND state = 'queued'",
    )
    .bind(record.id.0)
    .bind(STORAGES[2])
    .fetch_one(cluster.store().pool())
    .await
    .unwrap();
    assert_eq!(jobs, 1);
    assert_eq!(
        cluster.node_checksum(0, &record).await,
        cluster.node_checksum(1, &record).await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_shutdown_lets_a_push_in_flight_commit() {
    let mut cluster = Cluster::start(3).await;
    cluster.create("inflight.git").await;
    let work = cluster.push_main("inflight.git");
    commit_noise(work.path());
    let push = {
        let (dir, url) = (work.path().to_owned(), cluster.url("inflight.git"));
        std::thread::spawn(move || try_git(&dir, &["push", "-q", &url, "main"]))
    };
    wait_for_pack_on(&cluster, 0).await;
    cluster.stop_proxy().await.unwrap();
    let output = push.join().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let record = cluster.record("inflight.git").await;
    assert_eq!(record.generation, 2);
    assert_eq!(record.up_to_date().count(), 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_postgresql_every_call_fails_fast_and_no_node_is_written() {
    let scratch = tempfile::Builder::new()
        .prefix("gf-pg")
        .tempdir_in("/tmp")
        .unwrap();
    let start = || {
        PrivatePostgres::start(
            &scratch.path().join("data"),
            &scratch.path().join("sock"),
            &scratch.path().join("log"),
            Durability::Throwaway,
        )
        .unwrap()
    };
    let mut postgres = start();
    let cluster = Cluster::start_on(postgres.url("postgres"), 3, 3, "", "").await;
    cluster.create("db.git").await;
    let work = cluster.push_main("db.git");
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let record = cluster.record("db.git").await;
    let checksums: Vec<String> =
        futures_util::future::join_all((0..3).map(|index| cluster.node_checksum(index, &record)))
            .await;

    postgres.stop();
    let channel = cluster.channel().await;
    let started = Instant::now();
    let error = RefServiceClient::new(channel.clone())
        .update_refs(UpdateRefsRequest {
            repository: header("default", "db.git"),
            updates: vec![update("refs/heads/copy", &"0".repeat(40), &main)],
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    assert!(error.message().contains("database"), "{}", error.message());
    let error = RepositoryServiceClient::new(channel.clone())
        .create_repository(CreateRepositoryRequest {
            repository: header("default", "during-outage.git"),
            default_branch: "main".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    // Once the proxy knows notifications stopped, reads are not served from memory either.
    for _ in 0..100 {
        if !cluster.proxy.state().routing.is_listening() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let error = RefServiceClient::new(channel.clone())
        .find_default_branch(FindDefaultBranchRequest {
            repository: header("default", "db.git"),
        })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Unavailable, "{error:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    for index in 0..3 {
        assert_eq!(
            cluster.node_checksum(index, &record).await,
            checksums[index]
        );
        let placed = std::fs::read_dir(
            cluster.nodes[index]
                .storage_path(STORAGES[index])
                .join("@cluster"),
        )
        .unwrap()
        .count();
        assert_eq!(placed, 1, "a replica was created without its row");
    }

    // PostgreSQL comes back: so does the proxy, with a fresh cache.
    postgres = start();
    cluster.wait_until_listening().await;
    RefServiceClient::new(channel.clone())
        .update_refs(UpdateRefsRequest {
            repository: header("default", "db.git"),
            updates: vec![update("refs/heads/copy", &"0".repeat(40), &main)],
        })
        .await
        .unwrap();
    assert_eq!(cluster.record("db.git").await.generation, 2);
    drop(cluster);
    drop(postgres);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_next_write_settles_a_write_whose_proxy_died() {
    let cluster = Cluster::start(3).await;
    cluster.create("r.git").await;
    let work = cluster.push_main("r.git");
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let record = cluster.record("r.git").await;

    // Another proxy recorded a write, reached two replicas, and died before its commit.
    let store = cluster.store();
    let all: Vec<_> = (0..3).map(Cluster::storage).collect();
    let change = gitfleet::store::RefChange {
        name: "refs/heads/half-written".into(),
        old: "0".repeat(40),
        new: main.clone(),
    };
    let started = store
        .begin_write(
            &Cluster::virtual_storage(),
            &record.relative_path,
            "dead-proxy",
            Duration::from_secs(1),
            "/gitfleet.v1.RefService/UpdateRefs",
            std::slice::from_ref(&change),
            &all,
        )
        .await
        .unwrap();
    assert!(matches!(started, gitfleet::store::WriteStart::Leased(_)));
    for index in [0, 1] {
        RefServiceClient::new(cluster.nodes[index].channel().await)
            .update_refs(UpdateRefsRequest {
                repository: header(STORAGES[index], record.replica_path.as_str()),
                updates: vec![update(&change.name, &change.old, &change.new)],
            })
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;

    // The next write waits for nothing more than the dead proxy's lease, and settles its
    // write first: never acknowledged, it is undone everywhere.
    commit_branch(work.path(), "next");
    run_git(work.path(), &["push", "-q", &cluster.url("r.git"), "next"]);
    let advertised = run_git(work.path(), &["ls-remote", "--refs", &cluster.url("r.git")]);
    assert!(advertised.contains("refs/heads/next"), "{advertised}");
    assert!(!advertised.contains("half-written"), "{advertised}");
    let record = cluster.record("r.git").await;
    assert_eq!(
        record.generation, 3,
        "the push, the settlement, the next push"
    );
    assert_eq!(record.up_to_date().count(), 3);
    cluster.agreed_checksum(&record).await;
    let intents: i64 = sqlx::query_scalar("SELECT count(*) FROM write_intents")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(intents, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repository_created_while_a_node_is_down_is_served_and_its_missing_replica_queued() {
    let mut cluster = Cluster::start(3).await;
    cluster.nodes[2].kill();
    cluster.wait_for_health(2, false).await;
    cluster.create("partial.git").await;
    let record = cluster.record("partial.git").await;
    assert_eq!(record.assigned.len(), 3, "every storage is assigned");
    let current: Vec<&str> = record
        .up_to_date()
        .map(|storage| storage.as_str())
        .collect();
    assert_eq!(current, [STORAGES[0], STORAGES[1]]);
    let jobs: Vec<(String, String)> = sqlx::query_as(
        "SELECT kind, target_storage FROM jobs WHERE repository_id = $1 AND state = 'queued'",
    )
    .bind(record.id.0)
    .fetch_all(cluster.store().pool())
    .await
    .unwrap();
    assert_eq!(jobs, [("replicate".to_owned(), STORAGES[2].to_owned())]);

    // The repository works: a push lands on the two replicas it has.
    let work = cluster.push_main("partial.git");
    let record = cluster.record("partial.git").await;
    assert_eq!(record.generation, 1);
    assert_eq!(
        cluster.node_checksum(0, &record).await,
        cluster.node_checksum(1, &record).await
    );
    let advertised = run_git(
        work.path(),
        &["ls-remote", "--refs", &cluster.url("partial.git")],
    );
    assert!(advertised.contains("refs/heads/main"), "{advertised}");

    // The default branch is a write like any other.
    RefServiceClient::new(cluster.channel().await)
        .set_default_branch(SetDefaultBranchRequest {
            repository: header("default", "partial.git"),
            branch: "feature".into(),
        })
        .await
        .unwrap();
    assert_eq!(cluster.record("partial.git").await.generation, 2);
    for index in [0, 1] {
        let head = RefServiceClient::new(cluster.nodes[index].channel().await)
            .find_default_branch(FindDefaultBranchRequest {
                repository: header(STORAGES[index], record.replica_path.as_str()),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(head.name, "refs/heads/feature");
    }
    // Its checksum is computed from the change: HEAD's old branch to its new one.
    assert_eq!(
        cluster.store().refs_checksum(record.id).await.unwrap(),
        Some(cluster.node_checksum(0, &record).await)
    );

    // Removing it with a node down: the row goes at once, the reachable replicas too.
    RepositoryServiceClient::new(cluster.channel().await)
        .remove_repository(RemoveRepositoryRequest {
            repository: header("default", "partial.git"),
        })
        .await
        .unwrap();
    assert!(!cluster.replica_dir(0, &record).exists());
    assert!(!cluster.replica_dir(1, &record).exists());
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM repositories")
        .fetch_one(cluster.store().pool())
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

/// A write reads no replica's refs: a replica that diverged behind the catalog's back takes the
/// write like the others, and the catalog's checksum, computed from the change, is the clean
/// replicas'. Finding the divergence is the verifier's work (see `repair.rs`).
#[tokio::test(flavor = "multi_thread")]
async fn a_write_computes_its_checksum_from_the_change_not_from_a_diverged_replica() {
    let cluster = Cluster::start(3).await;
    cluster.create("diverged.git").await;
    let work = cluster.push_main("diverged.git");
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let record = cluster.record("diverged.git").await;
    // Node 2 holds a ref the others do not.
    RefServiceClient::new(cluster.nodes[1].channel().await)
        .update_refs(UpdateRefsRequest {
            repository: header(STORAGES[1], record.replica_path.as_str()),
            updates: vec![update("refs/heads/stray", &"0".repeat(40), &main)],
        })
        .await
        .unwrap();
    RefServiceClient::new(cluster.channel().await)
        .update_refs(UpdateRefsRequest {
            repository: header("default", "diverged.git"),
            updates: vec![update("refs/heads/copy", &"0".repeat(40), &main)],
        })
        .await
        .unwrap();
    let record = cluster.record("diverged.git").await;
    assert_eq!(record.generation, 2);
    assert_eq!(record.up_to_date().count(), 3);
    let catalog = cluster.store().refs_checksum(record.id).await.unwrap();
    assert_eq!(catalog, Some(cluster.node_checksum(0, &record).await));
    assert_eq!(catalog, Some(cluster.node_checksum(2, &record).await));
    assert_ne!(catalog, Some(cluster.node_checksum(1, &record).await));
    for index in 0..3 {
        let copy = run_git(
            &cluster.replica_dir(index, &record),
            &["rev-parse", "refs/heads/copy"],
        );
        assert_eq!(copy.trim(), main, "replica {index}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_refuses_a_client_that_sends_a_fencing_token() {
    let cluster = Cluster::start(3).await;
    cluster.create("fenced.git").await;
    let mut request = tonic::Request::new(SetDefaultBranchRequest {
        repository: Some(RepositoryHeader {
            storage: "default".into(),
            relative_path: "fenced.git".into(),
        }),
        branch: "main".into(),
    });
    request
        .metadata_mut()
        .insert(FENCE_HEADER, "99999".parse().unwrap());
    let refused = RefServiceClient::new(cluster.channel().await)
        .set_default_branch(request)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        refused.message(),
        format!("{FENCE_HEADER} is set by the cluster, never by a client")
    );
    // Nothing was recorded.
    assert_eq!(cluster.record("fenced.git").await.generation, 0);
}

/// git takes object ids in upper case too, and writes them in lower case: the catalog's
/// checksum, computed from the change, must be computed from what the replicas hold.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_given_in_upper_case_ids_keeps_the_catalog_checksum_true() {
    let cluster = Cluster::start(3).await;
    cluster.create("case.git").await;
    let work = cluster.push_main("case.git");
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    RefServiceClient::new(cluster.channel().await)
        .update_refs(UpdateRefsRequest {
            repository: header("default", "case.git"),
            updates: vec![update(
                "refs/heads/shouted",
                &"0".repeat(40),
                &main.to_uppercase(),
            )],
        })
        .await
        .unwrap();
    let record = cluster.record("case.git").await;
    assert_eq!(record.generation, 2);
    assert_eq!(
        cluster.store().refs_checksum(record.id).await.unwrap(),
        Some(cluster.agreed_checksum(&record).await)
    );
}

/// A reference change whose commit stalls on one replica (its `update-ref` paused, as SIGSTOP
/// would) is committed by the other two once they answer, and the stalled replica is left
/// behind. The repository moves on meanwhile; when the stalled change resumes, long after its
/// lease, the replica is still only outdated, and its repair brings it to the latest
/// generation.
#[tokio::test(flavor = "multi_thread")]
async fn a_reference_change_stalled_on_one_replica_commits_on_the_others_and_it_is_repaired() {
    let mut cluster = Cluster::start_with(3, 3, "[writes]\nstraggler_timeout = \"300ms\"\n").await;
    cluster.create("stalled.git").await;
    let work = cluster.push_main("stalled.git");
    let main = run_git(work.path(), &["rev-parse", "main"])
        .trim()
        .to_owned();
    let stall = Stall::new("update-ref");
    cluster.nodes[2].restart_with(&stall.node_config());
    cluster.wait_for_health(2, true).await;

    stall.arm();
    let started = Instant::now();
    RefServiceClient::new(cluster.channel().await)
        .update_refs(UpdateRefsRequest {
            repository: header("default", "stalled.git"),
            updates: vec![update("refs/heads/copy", &"0".repeat(40), &main)],
        })
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the stalled replica held the change for {:?}",
        started.elapsed()
    );
    stall.stalled().await;
    let record = cluster.record("stalled.git").await;
    assert_eq!(record.generation, 2);
    let current: Vec<&str> = record
        .up_to_date()
        .map(|storage| storage.as_str())
        .collect();
    assert_eq!(current, [STORAGES[0], STORAGES[1]]);

    // The repository moves on without it.
    commit_branch(work.path(), "later");
    run_git(
        work.path(),
        &["push", "-q", &cluster.url("stalled.git"), "later"],
    );
    assert_eq!(cluster.record("stalled.git").await.generation, 3);

    // The stalled change resumes, then the replica is repaired.
    stall.release();
    let worker = start_worker(
        worker_config(&cluster),
        &[JobType::Replicator],
        Hooks::default(),
    );
    wait_for(60, "every replica up to date", || async {
        cluster.record("stalled.git").await.up_to_date().count() == 3
    })
    .await;
    let record = cluster.record("stalled.git").await;
    let agreed = cluster.agreed_checksum(&record).await;
    assert_eq!(
        cluster.store().refs_checksum(record.id).await.unwrap(),
        Some(agreed)
    );
    let refs = refs_of(&cluster.replica_dir(2, &record));
    assert!(refs.contains("refs/heads/copy"), "{refs}");
    assert!(refs.contains("refs/heads/later"), "{refs}");
    worker.stop().await;
}

/// A replica dropped as a straggler may still apply the write after the proxy judged it. Here
/// its receive-pack ran on, out of its node's reach, after the write had failed (one replica
/// applied it, one refused) and had been undone. No definitive answer, no credit: the replica
/// is recorded outdated, repaired under a newer token, and its late update is refused by the
/// fence that repair raised.
#[tokio::test(flavor = "multi_thread")]
async fn a_straggler_s_late_update_is_fenced_out_and_its_replica_repaired() {
    let mut cluster = Cluster::start_with(3, 3, "[writes]\nstraggler_timeout = \"300ms\"\n").await;
    cluster.create("late.git").await;
    let work = cluster.push_main("late.git");
    let before = run_git(work.path(), &["rev-parse", "HEAD"])
        .trim()
        .to_owned();
    let failing = Stall::failing("receive-pack");
    let late = Stall::detached("receive-pack");
    cluster.nodes[1].restart_with(&failing.node_config());
    cluster.nodes[2].restart_with(&late.node_config());
    cluster.wait_for_health(1, true).await;
    cluster.wait_for_health(2, true).await;

    failing.arm();
    late.arm();
    std::fs::write(work.path().join("late.txt"), "late\n").unwrap();
    run_git(work.path(), &["add", "late.txt"]);
    run_git(work.path(), &["commit", "-q", "-m", "late"]);
    let pushed = std::process::Command::new("git")
        .current_dir(work.path())
        .args(["push", "-q", &cluster.url("late.git"), "main"])
        .output()
        .unwrap();
    assert!(!pushed.status.success(), "the push was acknowledged");
    late.stalled().await;

    // Whatever the write left is repaired.
    let worker = start_worker(
        worker_config(&cluster),
        &[JobType::Replicator],
        Hooks::default(),
    );
    wait_for(30, "every replica up to date", || async {
        cluster.record("late.git").await.up_to_date().count() == 3
    })
    .await;

    // The straggler's receive-pack runs now, to its end.
    late.release();
    let status = late.finished().await;
    let record = cluster.record("late.git").await;
    assert_eq!(record.up_to_date().count(), 3, "{record:?}");
    for index in 0..3 {
        let main = run_git(
            &cluster.replica_dir(index, &record),
            &["rev-parse", "refs/heads/main"],
        );
        assert_eq!(
            main.trim(),
            before,
            "replica {index} holds the unacknowledged push (the late receive-pack exited {status})"
        );
    }
    cluster.agreed_checksum(&record).await;
    worker.stop().await;
}
