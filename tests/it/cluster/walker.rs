//! Removal and the storage walker against real PostgreSQL, real nodes and real git: removal
//! with a node down, a path created again at once, quarantine after the grace period, purge
//! after the retention period (by an injected clock), restore, extra copies, and a storm of
//! creations and removals while the walker runs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, SystemTime};

use crate::common::cluster::{Cluster, STORAGES};
use crate::common::http::ok;
use crate::common::worker::*;
use crate::common::*;
use gitfleet::config::ProxyConfig;
use gitfleet::proto::repository_service_client::RepositoryServiceClient;
use gitfleet::proto::{RemoveRepositoryRequest, RepositoryExistsRequest};
use gitfleet::store::{RepositoryRecord, Store, WalkRecord};
use gitfleet::worker::{Hooks, JobType};

const HOUR: i64 = 3600;
const DAY: i64 = 86_400;

/// A clock that runs `offset` seconds ahead of the system's.
fn shifted_clock() -> (Arc<AtomicI64>, Hooks) {
    let offset = Arc::new(AtomicI64::new(0));
    let read = offset.clone();
    let hooks = Hooks {
        clock: Some(Arc::new(move || {
            SystemTime::now() + Duration::from_secs(read.load(Ordering::SeqCst) as u64)
        })),
        ..Hooks::default()
    };
    (offset, hooks)
}

/// The worker config with the walker walking every 200 ms.
fn walker_config(cluster: &Cluster, grace: Duration) -> ProxyConfig {
    let mut config = worker_config(cluster);
    config.walker.interval = gitfleet::config::Duration(Duration::from_millis(200));
    config.walker.grace_period = gitfleet::config::Duration(grace);
    config.walker.quarantine_retention =
        gitfleet::config::Duration(Duration::from_secs(7 * DAY as u64));
    config
}

async fn walk_of(store: &Store, storage: &str) -> Option<WalkRecord> {
    store
        .storage_walks()
        .await
        .unwrap()
        .into_iter()
        .find(|walk| walk.storage == storage)
}

/// Waits for a walk of `storage` that finished after the `after`-th one, and returns it.
async fn next_walk(store: &Store, storage: &str, after: i64) -> WalkRecord {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(walk) = walk_of(store, storage).await.filter(|w| w.walks > after) {
            return walk;
        }
        assert!(std::time::Instant::now() < deadline, "no walk of {storage}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn walks_so_far(store: &Store, storage: &str) -> i64 {
    walk_of(store, storage).await.map_or(0, |walk| walk.walks)
}

/// A bare repository made by hand on node `index`, with one commit, at `relative_path`.
fn orphan(cluster: &Cluster, index: usize, relative_path: &str) -> PathBuf {
    let path = cluster.nodes[index].repo_path(STORAGES[index], relative_path);
    std::fs::create_dir_all(&path).unwrap();
    run_git(&path, &["init", "-q", "--bare", "-b", "main"]);
    let work = tempfile::tempdir().unwrap();
    make_history(work.path());
    run_git(work.path(), &["push", "-q", path.to_str().unwrap(), "main"]);
    path
}

fn is_repository(path: &Path) -> bool {
    path.join("HEAD").is_file() && path.join("objects").is_dir()
}

async fn exists(cluster: &Cluster, relative_path: &str) -> bool {
    RepositoryServiceClient::new(cluster.channel().await)
        .repository_exists(RepositoryExistsRequest {
            repository: header("default", relative_path),
        })
        .await
        .unwrap()
        .into_inner()
        .exists
}

async fn remove(cluster: &Cluster, relative_path: &str) -> Result<(), tonic::Status> {
    RepositoryServiceClient::new(cluster.channel().await)
        .remove_repository(RemoveRepositoryRequest {
            repository: header("default", relative_path),
        })
        .await
        .map(|_| ())
}

/// (storage, state) of the removal jobs of a repository, by storage.
async fn removal_jobs(store: &Store, record: &RepositoryRecord) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT target_storage, state FROM jobs WHERE kind = 'remove' AND repository_id = $1
         ORDER BY target_storage",
    )
    .bind(record.id.0)
    .fetch_all(store.pool())
    .await
    .unwrap()
}

/// Removal jobs wait out a delay so as not to race the proxy's own attempt; the tests do not.
async fn removal_jobs_due_now(store: &Store) {
    sqlx::query("UPDATE jobs SET run_after = now() WHERE kind = 'remove' AND state = 'queued'")
        .execute(store.pool())
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removal_with_a_node_down_succeeds_and_its_job_cleans_the_node_when_it_returns() {
    let mut cluster = Cluster::start(3).await;
    let store = cluster.store();
    cluster.create("doomed.git").await;
    let work = cluster.push_main("doomed.git");
    let old = cluster.record("doomed.git").await;

    cluster.nodes[2].kill();
    cluster.wait_for_health(2, false).await;
    remove(&cluster, "doomed.git").await.unwrap();
    assert!(!exists(&cluster, "doomed.git").await);
    assert!(
        store
            .find_repository(&Cluster::virtual_storage(), &old.relative_path)
            .await
            .unwrap()
            .is_none()
    );
    assert!(!cluster.replica_dir(0, &old).exists());
    assert!(!cluster.replica_dir(1, &old).exists());
    assert!(
        is_repository(&cluster.replica_dir(2, &old)),
        "the down node kept its copy"
    );
    assert_eq!(
        removal_jobs(&store, &old).await,
        [
            ("storage-1".to_string(), "done".to_string()),
            ("storage-2".to_string(), "done".to_string()),
            ("storage-3".to_string(), "queued".to_string()),
        ]
    );
    let gone = try_git(work.path(), &["ls-remote", &cluster.url("doomed.git")]);
    assert!(!gone.status.success(), "a removed repository answered");

    // The same path again, at once, while the old bytes are still on the down node: a new,
    // empty repository with a new replica path.
    cluster.create("doomed.git").await;
    let new = cluster.record("doomed.git").await;
    assert!(new.id > old.id);
    assert_ne!(new.replica_path, old.replica_path);
    assert_eq!(
        run_git(work.path(), &["ls-remote", &cluster.url("doomed.git")]),
        ""
    );

    // The node returns: its leftover is removed by the job, and the new repository is
    // replicated to it.
    let worker = start_worker(
        worker_config(&cluster),
        &[JobType::Remover, JobType::Replicator],
        Hooks::default(),
    );
    removal_jobs_due_now(&store).await;
    cluster.nodes[2].restart();
    cluster.wait_for_health(2, true).await;
    wait_for(30, "the leftover's removal", || async {
        removal_jobs(&store, &old)
            .await
            .iter()
            .all(|(_, state)| state == "done")
    })
    .await;
    assert!(!cluster.replica_dir(2, &old).exists());
    wait_for(30, "the new repository on every node", || async {
        cluster.record("doomed.git").await.up_to_date().count() == 3
    })
    .await;
    run_git(
        work.path(),
        &["push", "-q", &cluster.url("doomed.git"), "main"],
    );
    let new = cluster.record("doomed.git").await;
    assert_eq!(new.generation, 1);
    cluster.agreed_checksum(&new).await;
    assert!(
        run_git(work.path(), &["ls-remote", &cluster.url("doomed.git")])
            .contains("refs/heads/main")
    );
    // The old repository never came back.
    for index in 0..3 {
        assert!(!cluster.replica_dir(index, &old).exists());
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removal_waits_for_a_write_in_flight_and_never_leaves_a_row_on_deleted_data() {
    let cluster = Cluster::start(3).await;
    let store = cluster.store();
    cluster.create("busy.git").await;
    let _work = cluster.push_main("busy.git");
    let record = cluster.record("busy.git").await;
    // Another proxy's write holds the lease.
    sqlx::query(
        "UPDATE repositories SET lease_owner = 'another-proxy', lease_token = nextval('repository_lease_tokens'),
                lease_expires_at = now() + interval '1 hour'
         WHERE id = $1",
    )
    .bind(record.id.0)
    .execute(store.pool())
    .await
    .unwrap();
    let removal = {
        let channel = cluster.channel().await;
        tokio::spawn(async move {
            RepositoryServiceClient::new(channel)
                .remove_repository(RemoveRepositoryRequest {
                    repository: header("default", "busy.git"),
                })
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !removal.is_finished(),
        "the removal did not wait for the write"
    );
    // While it waits, the row and the data it points at are both there.
    assert!(exists(&cluster, "busy.git").await);
    for index in 0..3 {
        assert!(is_repository(&cluster.replica_dir(index, &record)));
    }
    // The write finishes: the removal goes through.
    sqlx::query(
        "UPDATE repositories SET lease_owner = NULL, lease_expires_at = NULL WHERE id = $1",
    )
    .bind(record.id.0)
    .execute(store.pool())
    .await
    .unwrap();
    removal.await.unwrap().unwrap();
    assert!(!exists(&cluster, "busy.git").await);
    for index in 0..3 {
        assert!(!cluster.replica_dir(index, &record).exists());
    }
    let error = remove(&cluster, "busy.git").await.unwrap_err();
    assert_eq!(error.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_walker_quarantines_orphans_after_the_grace_period_and_purges_them_after_retention() {
    let cluster = Cluster::start(3).await;
    let store = cluster.store();
    cluster.create("kept.git").await;
    let work = cluster.push_main("kept.git");
    let kept = cluster.record("kept.git").await;
    let lost = orphan(&cluster, 0, "abandoned/lost.git");
    let found = orphan(&cluster, 0, "abandoned/found.git");

    let (offset, hooks) = shifted_clock();
    // A grace period of an hour and a retention of seven days, by the shifted clock.
    let config = walker_config(&cluster, Duration::from_secs(HOUR as u64));
    let worker = start_worker(config, &[JobType::Walker, JobType::Replicator], hooks);

    // Within the grace period: seen, counted, left alone.
    let walk = next_walk(&store, "storage-1", 0).await;
    assert_eq!((walk.results.seen, walk.results.untracked), (3, 2));
    assert_eq!(walk.results.quarantined, 0);
    assert!(is_repository(&lost) && is_repository(&found));
    let listed = admin(
        &cluster,
        &["list-untracked", "--storage", "storage-1", "--json"],
    );
    let untracked: serde_json::Value = serde_json::from_str(&ok(&listed)).unwrap();
    let mut paths: Vec<&str> = untracked
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["relative_path"].as_str().unwrap())
        .collect();
    paths.sort();
    assert_eq!(paths, ["abandoned/found.git", "abandoned/lost.git"]);
    let young = admin(
        &cluster,
        &[
            "list-untracked",
            "--storage",
            "storage-1",
            "--older-than",
            "1h",
        ],
    );
    assert_eq!(
        ok(&young).lines().count(),
        1,
        "only the header: {}",
        ok(&young)
    );

    // Two hours later, by the walker's clock: both go to quarantine, the tracked one stays.
    offset.store(2 * HOUR, Ordering::SeqCst);
    let before = walks_so_far(&store, "storage-1").await;
    let mut walk = next_walk(&store, "storage-1", before).await;
    if walk.results.quarantined == 0 {
        // That walk began before the clock moved.
        walk = next_walk(&store, "storage-1", walk.walks).await;
    }
    assert_eq!(walk.results.quarantined, 2);
    assert!(!lost.exists() && !found.exists());
    for index in 0..3 {
        assert!(is_repository(&cluster.replica_dir(index, &kept)));
    }
    assert!(
        run_git(work.path(), &["ls-remote", &cluster.url("kept.git")]).contains("refs/heads/main")
    );
    let listed = admin(
        &cluster,
        &["quarantine", "list", "--storage", "storage-1", "--json"],
    );
    let entries: serde_json::Value = serde_json::from_str(&ok(&listed)).unwrap();
    let entries = entries.as_array().unwrap();
    assert_eq!(entries.len(), 2);
    let id_of = |path: &str| {
        entries
            .iter()
            .find(|entry| entry["relative_path"] == path)
            .unwrap()["quarantine_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    // Restore one and track it as a repository: it is served, and replicated.
    let restored = admin(
        &cluster,
        &[
            "quarantine",
            "restore",
            "--storage",
            "storage-1",
            &id_of("abandoned/found.git"),
            "--track",
            "default/recovered.git",
        ],
    );
    let said = ok(&restored);
    assert!(
        said.contains("restored storage-1/abandoned/found.git")
            && said.contains("tracked as default/recovered.git"),
        "{said}"
    );
    assert!(is_repository(&found));
    let refs = run_git(work.path(), &["ls-remote", &cluster.url("recovered.git")]);
    assert!(refs.contains("refs/heads/main"), "{refs}");
    wait_for(30, "the restored repository on every node", || async {
        cluster.record("recovered.git").await.up_to_date().count() == 3
    })
    .await;
    cluster
        .agreed_checksum(&cluster.record("recovered.git").await)
        .await;
    let again = admin(
        &cluster,
        &[
            "quarantine",
            "restore",
            "--storage",
            "storage-1",
            "no-such-entry",
        ],
    );
    assert_eq!(again.status.code(), Some(1));

    // Eight days later: the other one is purged; the tracked ones are untouched.
    offset.store(8 * DAY, Ordering::SeqCst);
    wait_for(30, "the purge", || async {
        walk_of(&store, "storage-1")
            .await
            .is_some_and(|walk| walk.results.purged == 1)
    })
    .await;
    let listed = admin(&cluster, &["quarantine", "list", "--storage", "storage-1"]);
    assert!(
        ok(&listed).contains("(quarantine is empty)"),
        "{}",
        ok(&listed)
    );
    assert!(is_repository(&found));
    for index in 0..3 {
        assert!(is_repository(&cluster.replica_dir(index, &kept)));
    }
    worker.stop().await;

    // The walk's figures are the worker's metrics too.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let worker = start_worker_on(
        worker_config(&cluster),
        &[JobType::Noop],
        Hooks::default(),
        Some(listener),
    );
    let (status, _, body) =
        crate::common::http::http_get(&format!("http://{address}"), "/metrics", None);
    assert_eq!(status, 200);
    assert!(
        body.contains("gitfleet_walk_last_purged{storage=\"storage-1\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("gitfleet_walk_last_seen{storage=\"storage-1\"} 2"),
        "{body}"
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_extra_copy_goes_only_once_every_assigned_replica_is_up_to_date() {
    let cluster = Cluster::start(3).await;
    let store = cluster.store();
    cluster.create("extra.git").await;
    let work = cluster.push_main("extra.git");
    let record = cluster.record("extra.git").await;
    // The repository no longer wants storage-3 (a lowered replication factor), and its
    // replica on storage-2 is behind.
    sqlx::query("DELETE FROM assignments WHERE repository_id = $1 AND storage = 'storage-3'")
        .bind(record.id.0)
        .execute(store.pool())
        .await
        .unwrap();
    sqlx::query(
        "UPDATE replicas SET generation = 0 WHERE repository_id = $1 AND storage = 'storage-2'",
    )
    .bind(record.id.0)
    .execute(store.pool())
    .await
    .unwrap();
    let worker = start_worker(
        walker_config(&cluster, Duration::ZERO),
        &[JobType::Walker],
        Hooks::default(),
    );
    let walk = next_walk(&store, "storage-3", 0).await;
    assert_eq!((walk.results.extra, walk.results.quarantined), (1, 0));
    assert!(
        is_repository(&cluster.replica_dir(2, &record)),
        "the only spare copy was taken"
    );

    sqlx::query(
        "UPDATE replicas SET generation = 1 WHERE repository_id = $1 AND storage = 'storage-2'",
    )
    .bind(record.id.0)
    .execute(store.pool())
    .await
    .unwrap();
    wait_for(30, "the extra copy's quarantine", || async {
        !cluster.replica_dir(2, &record).exists()
    })
    .await;
    let record = cluster.record("extra.git").await;
    assert_eq!(record.assigned, [Cluster::storage(0), Cluster::storage(1)]);
    assert!(
        !record
            .replicas
            .iter()
            .any(|(storage, _)| *storage == Cluster::storage(2)),
        "{record:?}"
    );
    for index in 0..2 {
        assert!(is_repository(&cluster.replica_dir(index, &record)));
    }
    assert!(
        run_git(work.path(), &["ls-remote", &cluster.url("extra.git")]).contains("refs/heads/main")
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_storm_of_creations_and_removals_never_loses_a_tracked_repository_to_the_walker() {
    let cluster = Arc::new(Cluster::start(3).await);
    let store = cluster.store();
    let stray = orphan(&cluster, 1, "stray/orphan.git");
    // No grace at all: only the catalog protects a replica.
    let worker = start_worker(
        walker_config(&cluster, Duration::ZERO),
        &[JobType::Walker, JobType::Remover],
        Hooks::default(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let storms: Vec<_> = (0..4)
        .map(|task| {
            let (cluster, stop) = (cluster.clone(), stop.clone());
            tokio::spawn(async move {
                let mut kept = Vec::new();
                let mut round = 0;
                while !stop.load(Ordering::SeqCst) {
                    let path = format!("storm/{task}/{round}.git");
                    cluster.create(&path).await;
                    if round % 3 == 0 {
                        kept.push(path);
                    } else {
                        remove(&cluster, &path).await.unwrap();
                    }
                    round += 1;
                }
                (kept, round)
            })
        })
        .collect();
    let before = walks_so_far(&store, "storage-1").await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, Ordering::SeqCst);
    let mut kept = Vec::new();
    let mut rounds = 0;
    for storm in storms {
        let (paths, count) = storm.await.unwrap();
        kept.extend(paths);
        rounds += count;
    }
    let walks = walks_so_far(&store, "storage-1").await - before;
    worker.stop().await;
    assert!(walks >= 5, "the walker walked storage-1 only {walks} times");
    assert!(rounds >= 30, "only {rounds} creations");
    assert!(
        !stray.exists(),
        "the walker was not acting: the stray orphan is still there"
    );

    // Every tracked repository is intact on every replica the catalog records.
    let tracked: i64 = sqlx::query_scalar("SELECT count(*) FROM repositories")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(tracked as usize, kept.len());
    let probe = tempfile::tempdir().unwrap();
    for path in &kept {
        let record = cluster.record(path).await;
        assert_eq!(record.up_to_date().count(), 3, "{path}: {record:?}");
        for (index, storage) in STORAGES[..3].iter().enumerate() {
            assert!(
                is_repository(&cluster.replica_dir(index, &record)),
                "{path} lost its replica on {storage}"
            );
        }
        let answer = try_git(probe.path(), &["ls-remote", &cluster.url(path)]);
        assert!(
            answer.status.success(),
            "{path}: {}",
            String::from_utf8_lossy(&answer.stderr)
        );
    }
    println!(
        "storm: {rounds} creations, {} kept, {walks} walks of storage-1",
        kept.len()
    );
}

/// Runs `gitfleet admin walk --dry-run --json` and returns its report and its peak memory.
fn measured_walk(cluster: &Cluster) -> (serde_json::Value, u64) {
    let mut command = std::process::Command::new(BINARY);
    command
        .args(["admin", "--config"])
        .arg(&cluster.config_path)
        .args(["walk", "--storage", "storage-1", "--dry-run", "--json"]);
    let (output, peak) = crate::common::run_with_peak_memory(command);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    (report[0].clone(), peak)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_walker_memory_stays_flat_from_1k_to_100k_replicas() {
    let cluster = Cluster::start_with(1, 1, "").await;
    let store = cluster.store();
    let root = cluster.nodes[0].storage_path(STORAGES[0]);
    let started = std::time::Instant::now();
    bulk_repositories(&store, &root, 1000).await;
    let (small, small_peak) = measured_walk(&cluster);
    assert_eq!(small["seen"], 1000);
    assert_eq!(small["untracked"], 0);

    sqlx::query("TRUNCATE repositories CASCADE")
        .execute(store.pool())
        .await
        .unwrap();
    std::fs::remove_dir_all(root.join("bulk")).unwrap();
    bulk_repositories(&store, &root, 100_000).await;
    println!("made 101,000 repositories in {:?}", started.elapsed());
    let (large, large_peak) = measured_walk(&cluster);
    assert_eq!(large["seen"], 100_000);
    assert_eq!(large["untracked"], 0);
    // One statement per batch of 1,000, whatever the size.
    let statements = large["database_statements"].as_u64().unwrap();
    assert!(
        statements <= 110,
        "{statements} statements for 100,000 replicas"
    );
    println!(
        "walk: 1k replicas peak {} KiB; 100k replicas peak {} KiB, {:.2}s, {statements} statements",
        small_peak / 1024,
        large_peak / 1024,
        large["duration_seconds"].as_f64().unwrap()
    );
    assert!(
        large_peak < small_peak + 32 * 1024 * 1024,
        "peak memory grew from {small_peak} to {large_peak} bytes"
    );
    assert!(large_peak < 100 * 1024 * 1024, "{large_peak} bytes");
}
