//! The job queue's figures, printed as a table: claim-and-complete throughput of no-op jobs
//! with 1, 4 and 16 workers against a local PostgreSQL, and the replication lag (job created
//! -> target up to date) after a one-commit push. Run with `cargo bench --bench jobs`.
//!
//! PostgreSQL is found as the tests find it: DATABASE_URL, or a throwaway server.

#[path = "../tests/it/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::time::{Duration, Instant};

use common::cluster::{Cluster, STORAGES};
use gitfleet::config::ProxyConfig;
use gitfleet::store::Store;
use gitfleet::worker::{Hooks, JobType, Worker};
use tokio_util::sync::CancellationToken;

const JOBS: i64 = 3000;

fn main() {
    common::bench_runtime().block_on(async {
        println!("gitfleet job queue ({JOBS} no-op jobs per run; each worker runs 8 at once)");
        println!("{:<28} {:>12} {:>12}", "workers", "jobs/s", "seconds");
        for workers in [1, 4, 16] {
            let (rate, took) = throughput(workers).await;
            println!(
                "{:<28} {:>12.0} {:>12.2}",
                workers,
                rate,
                took.as_secs_f64()
            );
        }
        println!();
        let lags = replication_lag(7).await;
        let mut sorted = lags.clone();
        sorted.sort();
        println!(
            "replication lag after a one-commit push (job created -> target up to date), 7 runs"
        );
        println!(
            "median {:.1} ms   min {:.1} ms   max {:.1} ms",
            ms(sorted[sorted.len() / 2]),
            ms(sorted[0]),
            ms(sorted[sorted.len() - 1])
        );
    });
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A config for workers that touch no node.
fn queue_only_config(database_url: &str, dir: &std::path::Path) -> ProxyConfig {
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\n\
             [auth]\ntoken = \"bench-secret-0123456789\"\n\
             [database]\nurl = \"{database_url}\"\nmax_connections = 4\n\
             [worker]\nconcurrency = 8\npoll_interval = \"50ms\"\n\
             [[virtual_storages]]\nname = \"default\"\nreplication_factor = 1\n\
             [[virtual_storages.nodes]]\nstorage = \"unused\"\naddress = \"http://127.0.0.1:9\"\n\
             token = \"bench-secret-0123456789\"\n"
        ),
    )
    .unwrap();
    ProxyConfig::load(&path).unwrap()
}

async fn throughput(workers: usize) -> (f64, Duration) {
    let database_url = common::db::fresh_database().await;
    let store = Store::connect_lazy(&database_url, 2, Duration::from_secs(10)).unwrap();
    store.migrate().await.unwrap();
    sqlx::query(
        "INSERT INTO jobs (kind, repository_id, target_storage)
         SELECT 'noop', n, 'nowhere' FROM generate_series(1, $1) AS n",
    )
    .bind(JOBS)
    .execute(store.pool())
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = queue_only_config(&database_url, dir.path());
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let worker = Worker::new(config.clone(), &[JobType::Noop]).unwrap();
        tasks.push(tokio::spawn(worker.run(None, shutdown.clone())));
    }
    loop {
        let done: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'done'")
            .fetch_one(store.pool())
            .await
            .unwrap();
        if done == JOBS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    shutdown.cancel();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    (JOBS as f64 / took.as_secs_f64(), took)
}

async fn replication_lag(runs: usize) -> Vec<Duration> {
    let cluster = Cluster::start(3).await;
    cluster.create("lag.git").await;
    let work = cluster.push_main("lag.git");
    let record = cluster.record("lag.git").await;
    let store = cluster.store();
    let worker = Worker::new(
        ProxyConfig::load(&cluster.config_path).unwrap(),
        &[JobType::Replicator],
    )
    .unwrap()
    .with_hooks(Hooks::default());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(None, shutdown.clone()));
    let mut lags = Vec::new();
    for run in 0..runs {
        // The third replica is recorded one behind, so the push goes to the other two and
        // queues a replication for it, as after a node was briefly out of reach.
        sqlx::query(
            "UPDATE replicas SET generation = generation - 1
             WHERE repository_id = $1 AND storage = $2",
        )
        .bind(record.id.0)
        .bind(STORAGES[2])
        .execute(store.pool())
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let name = format!("lag-{run}");
        std::fs::write(work.path().join(&name), &name).unwrap();
        common::run_git(work.path(), &["add", "."]);
        common::run_git(work.path(), &["commit", "-q", "-m", &name]);
        common::run_git(
            work.path(),
            &["push", "-q", &cluster.url("lag.git"), "main"],
        );
        let lag = loop {
            let row: Option<(f64,)> = sqlx::query_as(
                "SELECT extract(epoch FROM j.finished_at - j.created_at)::float8
                 FROM jobs j
                 JOIN replicas p ON p.repository_id = j.repository_id AND p.storage = j.target_storage
                 JOIN repositories r ON r.id = j.repository_id AND r.generation = p.generation
                 WHERE j.repository_id = $1 AND j.state = 'done'
                 ORDER BY j.id DESC LIMIT 1",
            )
            .bind(record.id.0)
            .fetch_optional(store.pool())
            .await
            .unwrap();
            if let Some((seconds,)) = row
                && lags.len() == run
                && done_jobs(&store, record.id.0).await == run as i64 + 1
            {
                break Duration::from_secs_f64(seconds);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        lags.push(lag);
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
    lags
}

async fn done_jobs(store: &Store, repository: i64) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM jobs WHERE repository_id = $1 AND state = 'done'")
        .bind(repository)
        .fetch_one(store.pool())
        .await
        .unwrap()
}
