//! An in-process `gitfleet worker` for tests, with short leases and backoffs, the small waits
//! and commands the worker tests share, and bulk-made repositories for measuring walks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::path::Path;

use gitfleet::config::ProxyConfig;
use gitfleet::store::Store;
use gitfleet::worker::{Hooks, JobType, Metrics, Worker};
use tokio_util::sync::CancellationToken;

use super::BINARY;
use super::cluster::Cluster;

/// A worker running in this process; stopped when dropped.
pub struct RunningWorker {
    pub shutdown: CancellationToken,
    pub metrics: Arc<Metrics>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl RunningWorker {
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }
}

impl Drop for RunningWorker {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The cluster's config, with a worker tuned for tests: short leases and backoffs.
pub fn worker_config(cluster: &Cluster) -> ProxyConfig {
    let mut config = ProxyConfig::load(&cluster.config_path).unwrap();
    let worker = &mut config.worker;
    worker.lease = gitfleet::config::Duration(Duration::from_secs(2));
    worker.poll_interval = gitfleet::config::Duration(Duration::from_millis(100));
    worker.retry_backoff = gitfleet::config::Duration(Duration::from_millis(100));
    worker.max_backoff = gitfleet::config::Duration(Duration::from_millis(800));
    worker.restart_backoff = gitfleet::config::Duration(Duration::from_millis(100));
    worker.max_attempts = 3;
    worker.shutdown_grace = gitfleet::config::Duration(Duration::from_secs(5));
    config
}

pub fn start_worker(config: ProxyConfig, jobs: &[JobType], hooks: Hooks) -> RunningWorker {
    start_worker_on(config, jobs, hooks, None)
}

pub fn start_worker_on(
    config: ProxyConfig,
    jobs: &[JobType],
    hooks: Hooks,
    http: Option<tokio::net::TcpListener>,
) -> RunningWorker {
    let worker = Worker::new(config, jobs).unwrap().with_hooks(hooks);
    let metrics = worker.metrics();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(worker.run(http, shutdown.clone()));
    RunningWorker {
        shutdown,
        metrics,
        task: Some(task),
    }
}

/// Polls `condition` every 50 ms for up to `seconds`.
pub async fn wait_for<F, Fut>(seconds: u64, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(seconds);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs `gitfleet admin` with the cluster's config.
pub fn admin(cluster: &Cluster, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BINARY)
        .args(["admin", "--config"])
        .arg(&cluster.config_path)
        .args(args)
        .output()
        .unwrap()
}

/// Runs `gitfleet admin`, which must succeed and say `says` on stdout; returns stdout.
pub fn admin_says(cluster: &Cluster, args: &[&str], says: &str) -> String {
    let output = admin(cluster, args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{args:?}: {output:?}");
    assert!(
        stdout.contains(says),
        "{args:?} did not say {says:?}: {output:?}"
    );
    stdout
}

/// Runs `gitfleet admin`, which must exit 1 and say `says` on stderr.
pub fn admin_refuses(cluster: &Cluster, args: &[&str], says: &str) {
    let output = admin(cluster, args);
    assert_eq!(output.status.code(), Some(1), "{args:?}: {output:?}");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(says),
        "{args:?} did not say {says:?}: {output:?}"
    );
}

/// Makes `count` minimal bare repositories on a storage, tracked in the catalog in one
/// statement: for measuring a walk, not for serving.
pub async fn bulk_repositories(store: &Store, root: &Path, count: usize) {
    // Four threads, one thousand repositories to a directory.
    std::thread::scope(|scope| {
        for thread in 0..4 {
            scope.spawn(move || {
                for shard in (thread..count.div_ceil(1000)).step_by(4) {
                    let dir = root.join(format!("bulk/{shard}"));
                    std::fs::create_dir_all(&dir).unwrap();
                    for n in shard * 1000..((shard + 1) * 1000).min(count) {
                        let repository = dir.join(format!("{n}.git"));
                        std::fs::create_dir(&repository).unwrap();
                        std::fs::create_dir(repository.join("objects")).unwrap();
                        std::fs::create_dir(repository.join("refs")).unwrap();
                        std::fs::write(repository.join("HEAD"), "ref: refs/heads/main\n").unwrap();
                    }
                }
            });
        }
    });
    // In one transaction without the routing triggers: a bulk load, not 100,000 creations.
    let mut transaction = store.pool().begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *transaction)
        .await
        .unwrap();
    sqlx::query(
        "WITH made AS (
             INSERT INTO repositories (virtual_storage, relative_path, replica_path, primary_storage)
             SELECT 'default', 'bulk-' || n || '.git', 'bulk/' || n / 1000 || '/' || n || '.git',
                    'storage-1'
             FROM generate_series(0, $1 - 1) AS n
             RETURNING id
         )
         INSERT INTO assignments (repository_id, storage) SELECT id, 'storage-1' FROM made",
    )
    .bind(count as i64)
    .execute(&mut *transaction)
    .await
    .unwrap();
    transaction.commit().await.unwrap();
}
