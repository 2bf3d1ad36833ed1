//! An in-process `gitfleet worker` for tests, with short leases and backoffs, and the small
//! waits and commands the worker tests share.

use std::sync::Arc;
use std::time::{Duration, Instant};

use gitfleet::config::ProxyConfig;
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
