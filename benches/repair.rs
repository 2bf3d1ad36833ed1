//! How long a storage wiped while the cluster runs takes to repair, with 1,000 repositories:
//! real node processes, the proxy, PostgreSQL, and a worker running the verifier, the
//! reconciler and the replicator with their default concurrency. Prints `admin status` during
//! and after the repair, and the times. Run with `cargo bench --bench repair`.
//!
//! PostgreSQL is found as the tests find it: DATABASE_URL, or a throwaway server.

#[path = "../tests/it/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::{Duration, Instant};

use common::cluster::{Cluster, STORAGES};
use common::worker::{admin, start_worker, worker_config};
use futures_util::StreamExt as _;
use gitfleet::worker::{Hooks, JobType};

const REPOSITORIES: usize = 1000;

fn status(cluster: &Cluster) -> (i32, String) {
    let output = admin(cluster, &["status"]);
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn main() {
    common::bench_runtime().block_on(async {
        let cluster = Cluster::start(3).await;
        let made = Instant::now();
        let names: Vec<String> = (0..REPOSITORIES).map(|n| format!("bench/{n}.git")).collect();
        futures_util::stream::iter(names.iter())
            .for_each_concurrent(8, |name| cluster.create(name))
            .await;
        let work = tempfile::tempdir().unwrap();
        common::make_history(work.path());
        let urls: Vec<String> = names.iter().map(|name| cluster.url(name)).collect();
        std::thread::scope(|scope| {
            for chunk in urls.chunks(REPOSITORIES.div_ceil(4)) {
                let work = work.path();
                scope.spawn(move || {
                    for url in chunk {
                        common::run_git(work, &["push", "-q", url, "main", "feature", "--tags"]);
                    }
                });
            }
        });
        println!(
            "made {REPOSITORIES} repositories with a pushed history on 3 storages in {:.1}s",
            made.elapsed().as_secs_f64()
        );
        let (code, text) = status(&cluster);
        assert_eq!(code, 0, "{text}");

        let mut config = worker_config(&cluster);
        config.worker.max_attempts = 8;
        config.reconciler.interval = gitfleet::config::Duration(Duration::from_secs(1));
        let worker = start_worker(
            config.clone(),
            &[JobType::Verifier, JobType::Reconciler, JobType::Replicator],
            Hooks::default(),
        );
        // Everything verified once, as in a cluster that has been running.
        let store = cluster.store();
        loop {
            let unverified: i64 =
                sqlx::query_scalar("SELECT count(*) FROM replicas WHERE verified_at IS NULL")
                    .fetch_one(store.pool())
                    .await
                    .unwrap();
            if unverified == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        let root = cluster.nodes[1].storage_path(STORAGES[1]);
        let wiping = Instant::now();
        common::wipe_storage(&root);
        let wiped = Instant::now();
        println!(
            "wiped {} in {:.1}s (the node and the worker go on meanwhile)",
            STORAGES[1],
            wiping.elapsed().as_secs_f64()
        );
        let mut detected = None;
        let mut shown_during = false;
        let (after, repaired) = loop {
            let (code, text) = status(&cluster);
            if code == 0 {
                break (text, wiped.elapsed());
            }
            if detected.is_none() && code == 2 {
                detected = Some(wiped.elapsed());
            }
            let copied = sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM replicas WHERE storage = $1 AND NOT stale",
            )
            .bind(STORAGES[1])
            .fetch_one(store.pool())
            .await
            .unwrap();
            if !shown_during && copied as usize >= REPOSITORIES / 3 {
                println!(
                    "\nadmin status {:.1}s after the wipe (exit {code}):\n{text}",
                    wiped.elapsed().as_secs_f64()
                );
                shown_during = true;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        println!(
            "admin status {:.1}s after the wipe (exit 0):\n{after}",
            repaired.as_secs_f64()
        );
        for name in names.iter().step_by(97) {
            let record = cluster.record(name).await;
            cluster.agreed_checksum(&record).await;
        }
        println!(
            "repair of {REPOSITORIES} repositories: the status said REPAIRING {} after the wipe; HEALTHY {:.1}s after the wipe",
            detected.map_or("(never)".to_owned(), |d| format!("{:.1}s", d.as_secs_f64())),
            repaired.as_secs_f64()
        );
        println!(
            "worker: {} replicator, {} per target; the verifier leases {} replicas at a time",
            config.worker.concurrency, config.worker.max_jobs_per_target, config.verifier.batch
        );
        worker.stop().await;
    });
}
