//! The verifier, the reconciler and the status, against real PostgreSQL, real node processes
//! and real git: a node whose storage is wiped while the cluster runs is found out and
//! repaired with the status saying so; a corrupted ref is found diverged and repaired; data
//! loss is accepted from the one stale replica left; and a queue nobody works shows as stuck.

use std::time::Duration;

use crate::common::cluster::{Cluster, STORAGES};
use crate::common::worker::*;
use crate::common::*;
use gitfleet::config::ProxyConfig;
use gitfleet::worker::{Hooks, JobType};

/// The worker config with the reconciler deciding every 200 ms and at most two copies at once
/// per target.
fn repair_config(cluster: &Cluster) -> ProxyConfig {
    let mut config = worker_config(cluster);
    config.reconciler.interval = gitfleet::config::Duration(Duration::from_millis(200));
    config.worker.max_jobs_per_target = 2;
    config
}

fn status(cluster: &Cluster) -> (i32, String) {
    let output = admin(cluster, &["status"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

/// Polls `admin status` until `wanted` holds, and returns that status; on a timeout, fails
/// with the last one seen.
async fn status_until(
    cluster: &Cluster,
    seconds: u64,
    wanted: impl Fn(i32, &str) -> bool,
) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(seconds);
    loop {
        let (code, text) = status(cluster);
        if wanted(code, &text) {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out; the last status (exit {code}):\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn wipe(cluster: &Cluster, index: usize) {
    wipe_storage(&cluster.nodes[index].storage_path(STORAGES[index]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wiped_storage_is_found_out_and_repaired_and_the_status_tells_the_truth() {
    let cluster = Cluster::start(3).await;
    let names: Vec<String> = (0..12).map(|n| format!("wiped/{n}.git")).collect();
    let mut pushed = Vec::new();
    for name in &names {
        cluster.create(name).await;
        pushed.push(cluster.push_main(name));
    }
    let (code, text) = status(&cluster);
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("HEALTHY"), "{text}");

    // The verifier and the reconciler run; nothing copies yet, so the repair can be watched.
    let config = repair_config(&cluster);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = format!("http://{}", listener.local_addr().unwrap());
    let watchers = start_worker_on(
        config.clone(),
        &[JobType::Verifier, JobType::Reconciler],
        Hooks::default(),
        Some(listener),
    );
    let scrape = || {
        let (status, _, body) = crate::common::http::http_get(&metrics, "/metrics", None);
        assert_eq!(status, 200);
        body
    };
    let store = cluster.store();
    wait_for(30, "the storages' identities", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM storage_identities")
            .fetch_one(store.pool())
            .await
            .unwrap()
            == 3
    })
    .await;
    wipe(&cluster, 1);
    let during = status_until(&cluster, 60, |code, text| {
        code == 2 && text.contains("storage-2: 0 of 12 replicas up to date; 12 missing")
    })
    .await;
    println!("status during the repair:\n{during}");
    let scraped = scrape();
    for line in [
        "gitfleet_replicas{storage=\"storage-2\",state=\"missing\"} 12",
        "gitfleet_replicas{storage=\"storage-2\",state=\"up_to_date\"} 0",
        "gitfleet_replicas{storage=\"storage-1\",state=\"up_to_date\"} 12",
        "gitfleet_repositories{virtual_storage=\"default\"} 12",
        "gitfleet_status 1",
    ] {
        assert!(scraped.contains(line), "{line} not in\n{scraped}");
    }
    assert!(during.starts_with("REPAIRING"), "{during}");
    let dataloss = admin(&cluster, &["dataloss", "--json"]);
    let listed: serde_json::Value =
        serde_json::from_slice(&dataloss.stdout).expect("dataloss --json");
    assert_eq!(listed.as_array().unwrap().len(), 12, "{listed}");
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|entry| entry["state"] == "degraded")
    );
    // Reads go on from the other replicas meanwhile.
    let refs = run_git(pushed[0].path(), &["ls-remote", &cluster.url(&names[0])]);
    assert!(refs.contains("refs/heads/main"), "{refs}");

    // Two replicators of four slots each, but never more than two copies at once to the
    // wiped storage.
    let copiers = start_worker(config.clone(), &[JobType::Replicator], Hooks::default());
    let more = start_worker(config, &[JobType::Replicator], Hooks::default());
    let started = std::time::Instant::now();
    let most = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut most = 0;
            loop {
                let running: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM jobs WHERE state = 'running' AND target_storage = 'storage-2'",
                )
                .fetch_one(store.pool())
                .await
                .unwrap();
                most = most.max(running);
                let left: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM replicas WHERE storage = 'storage-2' AND stale",
                )
                .fetch_one(store.pool())
                .await
                .unwrap();
                if left == 0 {
                    return most;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let after = status_until(&cluster, 120, |code, _| code == 0).await;
    let most = most.await.unwrap();
    assert!((1..=2).contains(&most), "{most} copies at once");
    println!(
        "repaired {} replicas in {:.1}s",
        names.len(),
        started.elapsed().as_secs_f64()
    );
    println!("status after the repair:\n{after}");
    assert!(after.starts_with("HEALTHY"), "{after}");
    for name in &names {
        let record = cluster.record(name).await;
        assert_eq!(record.up_to_date().count(), 3, "{name}");
        assert!(
            cluster.replica_dir(1, &record).join("HEAD").is_file(),
            "{name}"
        );
        cluster.agreed_checksum(&record).await;
    }
    let scraped = scrape();
    assert!(scraped.contains("gitfleet_status 0"), "{scraped}");
    assert!(
        scraped.contains("gitfleet_replicas{storage=\"storage-2\",state=\"up_to_date\"} 12"),
        "{scraped}"
    );
    assert!(
        scraped.contains("gitfleet_verify_missing_total{storage=\"storage-2\"} 12"),
        "{scraped}"
    );
    let clean = admin(&cluster, &["dataloss"]);
    assert_eq!(clean.status.code(), Some(0));
    copiers.stop().await;
    more.stop().await;
    watchers.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_corrupted_ref_is_found_diverged_and_repaired() {
    let cluster = Cluster::start(3).await;
    cluster.create("corrupt.git").await;
    let work = cluster.push_main("corrupt.git");
    let record = cluster.record("corrupt.git").await;
    let good = cluster.agreed_checksum(&record).await;
    // storage-3's main goes back one commit, behind the catalog's back.
    let replica = cluster.replica_dir(2, &record);
    run_git(
        &replica,
        &["update-ref", "refs/heads/main", "refs/heads/main~1"],
    );
    assert_ne!(cluster.node_checksum(2, &record).await, good);

    let worker = start_worker(
        repair_config(&cluster),
        &[JobType::Verifier, JobType::Reconciler, JobType::Replicator],
        Hooks::default(),
    );
    let asked = admin(&cluster, &["verify", "default/corrupt.git"]);
    assert!(
        String::from_utf8_lossy(&asked.stdout).contains("3 replicas are first in line"),
        "{asked:?}"
    );
    let store = cluster.store();
    wait_for(60, "the divergence found", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT diverged FROM storage_verifications WHERE storage = 'storage-3'",
        )
        .fetch_optional(store.pool())
        .await
        .unwrap()
            == Some(1)
    })
    .await;
    wait_for(60, "the repair", || async {
        cluster.node_checksum(2, &record).await == good
            && cluster.record("corrupt.git").await.up_to_date().count() == 3
    })
    .await;
    let main = run_git(&replica, &["rev-parse", "refs/heads/main"]);
    let expected = run_git(work.path(), &["rev-parse", "main"]);
    assert_eq!(main, expected);
    let replicas = admin(&cluster, &["replicas", "default/corrupt.git", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&replicas.stdout).unwrap();
    for replica in report["replicas"].as_array().unwrap() {
        assert_eq!(replica["state"], "up-to-date", "{report}");
        assert_eq!(replica["checksum"], good.as_str(), "{report}");
    }
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn accepting_data_loss_makes_the_one_stale_replica_left_the_truth() {
    let cluster = Cluster::start(3).await;
    cluster.create("lost.git").await;
    let work = cluster.push_main("lost.git");
    let record = cluster.record("lost.git").await;
    let old_main = run_git(work.path(), &["rev-parse", "main"]);
    // A second push that storage-3 never got: it stays behind at the first generation.
    let store = cluster.store();
    std::fs::write(work.path().join("later.txt"), "later\n").unwrap();
    run_git(work.path(), &["add", "."]);
    run_git(work.path(), &["commit", "-q", "-m", "later"]);
    run_git(
        work.path(),
        &["push", "-q", &cluster.url("lost.git"), "main"],
    );
    sqlx::query(
        "UPDATE replicas SET generation = generation - 1
         WHERE repository_id = $1 AND storage = 'storage-3'",
    )
    .bind(record.id.0)
    .execute(store.pool())
    .await
    .unwrap();
    run_git(
        &cluster.replica_dir(2, &record),
        &["update-ref", "refs/heads/main", old_main.trim()],
    );
    // Then both up-to-date replicas are lost.
    std::fs::remove_dir_all(cluster.replica_dir(0, &record)).unwrap();
    std::fs::remove_dir_all(cluster.replica_dir(1, &record)).unwrap();

    let worker = start_worker(
        repair_config(&cluster),
        &[JobType::Verifier, JobType::Reconciler, JobType::Replicator],
        Hooks::default(),
    );
    admin(&cluster, &["verify", "default/lost.git"]);
    wait_for(60, "the repository reported unavailable", || async {
        let output = admin(&cluster, &["dataloss", "--json"]);
        let listed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        output.status.code() == Some(2)
            && listed[0]["repository"] == "default/lost.git"
            && listed[0]["state"] == "unavailable"
    })
    .await;
    let (code, text) = status(&cluster);
    assert_eq!(code, 2, "{text}");

    let accept = |storage| {
        [
            "accept-dataloss",
            "default/lost.git",
            "--authoritative",
            storage,
        ]
    };
    admin_refuses(&cluster, &accept("storage-1"), "holds no replica");
    admin_says(
        &cluster,
        &accept("storage-3"),
        "is the truth at generation 3",
    );
    wait_for(60, "every replica repaired from storage-3", || async {
        cluster.record("lost.git").await.up_to_date().count() == 3
    })
    .await;
    let record = cluster.record("lost.git").await;
    let checksum = cluster.agreed_checksum(&record).await;
    // The refs checksum recorded for the lost generation is no longer claimed.
    let recorded = store.refs_checksum(record.id).await.unwrap();
    assert!(
        recorded.is_none() || recorded.as_deref() == Some(checksum.as_str()),
        "{recorded:?} is not the replicas' {checksum}"
    );
    let refs = run_git(work.path(), &["ls-remote", &cluster.url("lost.git")]);
    assert!(
        refs.contains(&format!("{}\trefs/heads/main", old_main.trim())),
        "{refs}"
    );
    // The repository takes writes again.
    run_git(
        work.path(),
        &["push", "-q", "-f", &cluster.url("lost.git"), "main"],
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_nobody_works_shows_as_stuck() {
    let cluster = Cluster::start(2).await;
    cluster.create("stuck.git").await;
    let record = cluster.record("stuck.git").await;
    let store = cluster.store();
    let (source, target) = (Cluster::storage(0), Cluster::storage(1));
    store
        .enqueue(&gitfleet::store::NewJob {
            kind: "replicate",
            repository: record.id,
            source: Some(&source),
            target: &target,
        })
        .await
        .unwrap();
    let output = admin(&cluster, &["status", "--stall-after", "1s"]);
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let output = admin(&cluster, &["status", "--stall-after", "1s"]);
    let text = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(3), "{text}");
    assert!(
        text.starts_with("ATTENTION: STUCK: 1 jobs are ready"),
        "{text}"
    );
    assert!(text.contains("are the workers running?"), "{text}");
    let json = admin(&cluster, &["status", "--stall-after", "1s", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["verdict"], "attention");
    assert_eq!(report["figures"]["jobs"]["ready"], 1);

    // A worker takes it: the queue moves, and the status is healthy again.
    let worker = start_worker(
        worker_config(&cluster),
        &[JobType::Replicator],
        Hooks::default(),
    );
    wait_for(30, "a healthy status", || async {
        admin(&cluster, &["status", "--stall-after", "1s"])
            .status
            .code()
            == Some(0)
    })
    .await;
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn replication_factors_change_per_repository_and_by_the_reconcilers_sweep() {
    // Three storages, two replicas per repository.
    let cluster = Cluster::start_with(3, 2, "").await;
    cluster.create("factor.git").await;
    let work = cluster.push_main("factor.git");
    let record = cluster.record("factor.git").await;
    assert_eq!(record.assigned.len(), 2);
    let worker = start_worker(
        repair_config(&cluster),
        &[JobType::Reconciler, JobType::Replicator],
        Hooks::default(),
    );

    // Raised for this repository: a third replica is made.
    let factor = |n| ["set-replication-factor", "default/factor.git", n];
    admin_says(
        &cluster,
        &factor("3"),
        "replication factor 3; assigned to storage-1, storage-2, storage-3",
    );
    wait_for(60, "a third replica", || async {
        cluster.record("factor.git").await.up_to_date().count() == 3
    })
    .await;
    cluster
        .agreed_checksum(&cluster.record("factor.git").await)
        .await;

    // Lowered to one: the primary stays assigned.
    admin_says(&cluster, &factor("1"), "replication factor 1");
    let record = cluster.record("factor.git").await;
    assert_eq!(record.assigned, std::slice::from_ref(&record.primary));
    admin_refuses(&cluster, &factor("4"), "cannot keep 4 replicas");

    // The virtual storage's factor goes up in the config: the sweep assigns every older
    // repository a third storage, and the copies follow.
    admin_says(&cluster, &factor("default"), "(the default)");
    cluster.create("older.git").await;
    cluster.push_main("older.git");
    let store = cluster.store();
    sqlx::query("UPDATE repositories SET created_at = now() - interval '1 hour'")
        .execute(store.pool())
        .await
        .unwrap();
    worker.stop().await;
    let mut config = repair_config(&cluster);
    config.virtual_storages[0].replication_factor = 3;
    let worker = start_worker(
        config,
        &[JobType::Reconciler, JobType::Replicator],
        Hooks::default(),
    );
    for name in ["factor.git", "older.git"] {
        wait_for(60, "three replicas by the sweep", || async {
            let record = cluster.record(name).await;
            record.assigned.len() == 3 && record.up_to_date().count() == 3
        })
        .await;
        cluster.agreed_checksum(&cluster.record(name).await).await;
    }
    let refs = run_git(work.path(), &["ls-remote", &cluster.url("older.git")]);
    assert!(refs.contains("refs/heads/main"), "{refs}");
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repository_found_on_disk_is_tracked_and_replicated() {
    let cluster = Cluster::start(2).await;
    // A repository made on storage-1 behind the catalog's back.
    let work = tempfile::tempdir().unwrap();
    make_history(work.path());
    let on_disk = cluster.nodes[0].repo_path(STORAGES[0], "imported/found.git");
    std::fs::create_dir_all(on_disk.parent().unwrap()).unwrap();
    run_git(
        work.path(),
        &["clone", "-q", "--bare", ".", on_disk.to_str().unwrap()],
    );
    let worker = start_worker(
        repair_config(&cluster),
        &[JobType::Replicator],
        Hooks::default(),
    );
    let track = |name, path| {
        [
            "track-repository",
            name,
            "--storage",
            "storage-1",
            "--replica-path",
            path,
        ]
    };
    admin_refuses(
        &cluster,
        &track("default/adopted.git", "imported/nothing.git"),
        "holds no repository at",
    );
    admin_says(
        &cluster,
        &track("default/adopted.git", "imported/found.git"),
        "replicating to storage-2",
    );
    let refs = run_git(work.path(), &["ls-remote", &cluster.url("adopted.git")]);
    assert!(refs.contains("refs/heads/main"), "{refs}");
    wait_for(60, "the copy on storage-2", || async {
        cluster.record("adopted.git").await.up_to_date().count() == 2
    })
    .await;
    cluster
        .agreed_checksum(&cluster.record("adopted.git").await)
        .await;
    admin_refuses(
        &cluster,
        &track("default/again.git", "imported/found.git"),
        "already the replica path",
    );
    worker.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_that_finds_its_replica_gone_has_it_verified_and_repaired_at_once() {
    let cluster = Cluster::start(3).await;
    cluster.create("vanished.git").await;
    let work = cluster.push_main("vanished.git");
    let record = cluster.record("vanished.git").await;
    let primary = STORAGES
        .iter()
        .position(|storage| *storage == record.primary.as_str())
        .unwrap();
    // Verified a while ago, with the next verification days away.
    let mut config = repair_config(&cluster);
    config.verifier.interval = gitfleet::config::Duration(Duration::from_secs(7 * 86_400));
    let worker = start_worker(
        config,
        &[JobType::Verifier, JobType::Reconciler, JobType::Replicator],
        Hooks::default(),
    );
    let store = cluster.store();
    wait_for(30, "the first verification", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM replicas WHERE verified_at IS NULL")
            .fetch_one(store.pool())
            .await
            .unwrap()
            == 0
    })
    .await;
    // One replica disappears from its disk: the storage keeps its identity.
    std::fs::remove_dir_all(cluster.replica_dir(primary, &record)).unwrap();

    // A read routed to it fails once, and puts it in the verifier's line.
    let mut refs =
        gitfleet::proto::ref_service_client::RefServiceClient::new(cluster.channel().await);
    let mut request = tonic::Request::new(gitfleet::proto::FindDefaultBranchRequest {
        repository: header("default", "vanished.git"),
    });
    request
        .metadata_mut()
        .insert("gitfleet-route", "primary".parse().unwrap());
    let failed = refs.find_default_branch(request).await.unwrap_err();
    assert_eq!(failed.code(), tonic::Code::NotFound, "{failed:?}");
    wait_for(60, "the replica repaired", || async {
        cluster.replica_dir(primary, &record).join("HEAD").is_file()
            && cluster.record("vanished.git").await.up_to_date().count() == 3
    })
    .await;
    cluster
        .agreed_checksum(&cluster.record("vanished.git").await)
        .await;
    let found: i64 =
        sqlx::query_scalar("SELECT missing FROM storage_verifications WHERE storage = $1")
            .bind(STORAGES[primary])
            .fetch_one(store.pool())
            .await
            .unwrap();
    assert_eq!(found, 1);
    let refs_now = run_git(work.path(), &["ls-remote", &cluster.url("vanished.git")]);
    assert!(refs_now.contains("refs/heads/main"), "{refs_now}");
    worker.stop().await;
}

/// Deletes `default/RELATIVE_PATH`'s row as the proxy does, its removal jobs due after
/// `remove_after`, and leaves the disks alone.
async fn delete_row(
    store: &gitfleet::store::Store,
    relative_path: &str,
    remove_after: Duration,
) -> gitfleet::store::RemovedRepository {
    use gitfleet::store::{Deleted, Deletion, Which};
    let deleted = store
        .delete_repository(
            Which::Path(
                &Cluster::virtual_storage(),
                &gitfleet::model::RelativePath::parse(relative_path).unwrap(),
            ),
            Deletion {
                force: false,
                remove_after: Some(remove_after),
                unwritten_only: false,
            },
        )
        .await
        .unwrap();
    let Deleted::Removed(removed) = deleted else {
        panic!("not removed: {deleted:?}");
    };
    removed
}

/// The proxy's removal (with the token taken as the row was deleted) and a walk's quarantine
/// (with one taken under the replica path's lock) can reach the node late: after the path was
/// adopted again. Adoption raises the replica's fence, so the late call is refused
/// and the adopted repository keeps its replica.
#[tokio::test(flavor = "multi_thread")]
async fn a_removal_or_quarantine_delivered_after_an_adoption_removes_nothing() {
    use gitfleet::proto::node_service_client::NodeServiceClient;
    use gitfleet::proto::repository_service_client::RepositoryServiceClient;
    use gitfleet::proto::{QuarantineRepositoryRequest, RemoveRepositoryRequest};
    let cluster = Cluster::start(2).await;
    cluster.create("late.git").await;
    let work = cluster.push_main("late.git");
    let pushed = run_git(work.path(), &["rev-parse", "main"]);
    let store = cluster.store();
    let removed = delete_row(&store, "late.git", Duration::from_secs(3600)).await;
    let replica_path = removed.replica_path.to_string();
    // A walk decides to quarantine the untracked replica, with a token of its own.
    let mut lock = store.lock_replica_path(&replica_path).await.unwrap();
    assert!(!lock.in_use().await.unwrap());
    let walk_token = lock.fence_token().await.unwrap();
    lock.release().await.unwrap();
    assert!(walk_token > removed.fence);

    admin_says(
        &cluster,
        &[
            "track-repository",
            "default/back.git",
            "--storage",
            STORAGES[0],
            "--replica-path",
            &replica_path,
        ],
        "tracked",
    );

    // Both calls arrive now: refused, with the reason.
    let channel = cluster.nodes[0].channel().await;
    let refused = RepositoryServiceClient::new(channel.clone())
        .remove_repository(gitfleet::fleet::fenced(
            RemoveRepositoryRequest {
                repository: header(STORAGES[0], &replica_path),
            },
            removed.fence,
        ))
        .await
        .unwrap_err();
    assert!(gitfleet::fleet::is_fenced(&refused), "{refused:?}");
    let refused = NodeServiceClient::new(channel)
        .quarantine_repository(gitfleet::fleet::fenced(
            QuarantineRepositoryRequest {
                repository: header(STORAGES[0], &replica_path),
            },
            walk_token,
        ))
        .await
        .unwrap_err();
    assert!(gitfleet::fleet::is_fenced(&refused), "{refused:?}");

    // The adopted repository is whole, and serves its push.
    let refs = run_git(work.path(), &["ls-remote", &cluster.url("back.git")]);
    assert!(
        refs.contains(&format!("{}\trefs/heads/main", pushed.trim())),
        "{refs}"
    );
}

/// An adoption that raised the replica's fence and then never committed (the operator's
/// command failed or died) must not keep the removal job from removing the replica: the job
/// looks at the catalog under the replica path's lock and takes a newer token there.
#[tokio::test(flavor = "multi_thread")]
async fn a_fence_raised_by_an_adoption_that_never_committed_does_not_stop_the_removal() {
    let cluster = Cluster::start(2).await;
    cluster.create("orphan.git").await;
    let _work = cluster.push_main("orphan.git");
    let record = cluster.record("orphan.git").await;
    let on_disk = cluster.replica_dir(0, &record);
    assert!(on_disk.exists());
    let store = cluster.store();
    let removed = delete_row(&store, "orphan.git", Duration::ZERO).await;
    // The adoption's first step, with a token newer than the deletion's; no row follows.
    let mut lock = store
        .lock_replica_path(removed.replica_path.as_str())
        .await
        .unwrap();
    let token = lock.fence_token().await.unwrap();
    lock.release().await.unwrap();
    assert!(token > removed.fence);
    gitfleet::proto::node_service_client::NodeServiceClient::new(cluster.nodes[0].channel().await)
        .raise_fence(gitfleet::fleet::fenced(
            gitfleet::proto::RaiseFenceRequest {
                repository: header(STORAGES[0], removed.replica_path.as_str()),
            },
            token,
        ))
        .await
        .unwrap();

    let worker = start_worker(
        repair_config(&cluster),
        &[JobType::Remover],
        Hooks::default(),
    );
    wait_for(60, "the removal jobs done", || async {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM jobs WHERE kind = 'remove' AND state <> 'done'",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        open == 0
    })
    .await;
    worker.stop().await;
    assert!(!on_disk.exists(), "{} is still there", on_disk.display());
}

/// `quarantine restore --track` adopts the path it restores. A row that still references that
/// path could be deleted after the restore raised the replica's fence, with a newer token, and
/// its removal would then take the adopted replica: the restore refuses a referenced path before
/// any byte moves.
#[tokio::test(flavor = "multi_thread")]
async fn a_restore_that_would_adopt_a_path_a_repository_still_references_is_refused() {
    use gitfleet::proto::QuarantineRepositoryRequest;
    use gitfleet::proto::node_service_client::NodeServiceClient;

    let cluster = Cluster::start(2).await;
    cluster.create("held.git").await;
    let _work = cluster.push_main("held.git");
    let record = cluster.record("held.git").await;
    // The replica on storage-1 goes to quarantine while its row stays.
    let id = NodeServiceClient::new(cluster.nodes[0].channel().await)
        .quarantine_repository(QuarantineRepositoryRequest {
            repository: header(STORAGES[0], record.replica_path.as_str()),
        })
        .await
        .unwrap()
        .into_inner()
        .quarantine_id;
    let on_disk = cluster.replica_dir(0, &record);
    assert!(!on_disk.exists());

    admin_refuses(
        &cluster,
        &[
            "quarantine",
            "restore",
            "--storage",
            STORAGES[0],
            &id,
            "--track",
            "default/again.git",
        ],
        "is the replica path of a repository",
    );
    // Nothing moved: the entry is still in quarantine, and no row was made.
    assert!(!on_disk.exists());
    let listed = admin_says(
        &cluster,
        &["quarantine", "list", "--storage", STORAGES[0]],
        &id,
    );
    assert!(listed.contains(record.replica_path.as_str()), "{listed}");
    let store = cluster.store();
    assert!(
        store
            .find_repository(
                &Cluster::virtual_storage(),
                &gitfleet::model::RelativePath::parse("again.git").unwrap()
            )
            .await
            .unwrap()
            .is_none()
    );
}
