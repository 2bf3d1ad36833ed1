//! The configuration of the background jobs that `gitfleet worker` runs from the proxy's
//! config file: the queue, the walker, the verifier, the reconciler, and what the status
//! calls stuck.

use std::net::SocketAddr;

use serde::Deserialize;

use super::Duration;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// Address of the worker's HTTP server: /metrics and /healthz. None: no HTTP server.
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// How long a job's lease lasts. A running job renews it every third of this; a worker
    /// that dies holds its jobs for at most this long before another worker takes them.
    #[serde(default = "default_job_lease")]
    pub lease: Duration,
    /// How often an idle job type looks for ready jobs.
    #[serde(default = "default_poll_interval")]
    pub poll_interval: Duration,
    /// How many jobs of one type a worker runs at once.
    #[serde(default = "default_job_concurrency")]
    pub concurrency: usize,
    /// Runs a job may fail before it is dead (kept for operators, never deleted).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: i32,
    /// The first retry's delay; each further one doubles it, with jitter, up to max_backoff.
    /// Waiting for a node that is down grows the same way.
    #[serde(default = "default_retry_backoff")]
    pub retry_backoff: Duration,
    #[serde(default = "default_max_backoff")]
    pub max_backoff: Duration,
    /// The first delay before a crashed job type is restarted; doubles up to a minute.
    #[serde(default = "default_restart_backoff")]
    pub restart_backoff: Duration,
    /// On SIGTERM, how long running jobs may go on before their leases are handed back.
    #[serde(default = "default_worker_shutdown_grace")]
    pub shutdown_grace: Duration,
    /// Done and cancelled jobs are deleted this long after they finished.
    #[serde(default = "default_keep_finished")]
    pub keep_finished: Duration,
    /// The longest one replication may take.
    #[serde(default = "default_replication_timeout")]
    pub replication_timeout: Duration,
    /// The most jobs running at once against one target storage, across all workers: a node
    /// that comes back with many replicas to repair takes them this many at a time and goes on
    /// serving.
    #[serde(default = "default_max_jobs_per_target")]
    pub max_jobs_per_target: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            http_listen: None,
            lease: default_job_lease(),
            poll_interval: default_poll_interval(),
            concurrency: default_job_concurrency(),
            max_attempts: default_max_attempts(),
            retry_backoff: default_retry_backoff(),
            max_backoff: default_max_backoff(),
            restart_backoff: default_restart_backoff(),
            shutdown_grace: default_worker_shutdown_grace(),
            keep_finished: default_keep_finished(),
            replication_timeout: default_replication_timeout(),
            max_jobs_per_target: default_max_jobs_per_target(),
        }
    }
}

fn default_job_lease() -> Duration {
    Duration::secs(30)
}
fn default_poll_interval() -> Duration {
    Duration::secs(1)
}
fn default_job_concurrency() -> usize {
    4
}
fn default_max_attempts() -> i32 {
    8
}
fn default_retry_backoff() -> Duration {
    Duration::secs(5)
}
fn default_max_backoff() -> Duration {
    Duration::secs(600)
}
fn default_restart_backoff() -> Duration {
    Duration::secs(1)
}
fn default_worker_shutdown_grace() -> Duration {
    Duration::secs(30)
}
fn default_keep_finished() -> Duration {
    Duration::secs(7 * 24 * 3600)
}
fn default_replication_timeout() -> Duration {
    Duration::secs(3600)
}
fn default_max_jobs_per_target() -> usize {
    4
}

/// The verifier: checks that each replica exists on its node and holds the same refs as the
/// other replicas of its generation.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifierConfig {
    /// How long a verification holds: a replica is checked again this long after its last
    /// check. A storage that comes back with a new identity (wiped) is checked at once.
    #[serde(default = "default_verify_interval")]
    pub interval: Duration,
    /// Replicas leased at a time by one worker.
    #[serde(default = "default_verify_batch")]
    pub batch: usize,
}

impl Default for VerifierConfig {
    fn default() -> Self {
        Self {
            interval: default_verify_interval(),
            batch: default_verify_batch(),
        }
    }
}

fn default_verify_interval() -> Duration {
    Duration::secs(7 * 86_400)
}
fn default_verify_batch() -> usize {
    100
}

/// The reconciler: queues the replication that brings every assigned replica up to date, and
/// carries out changes of assignment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReconcilerConfig {
    /// The time between two rounds.
    #[serde(default = "default_reconcile_interval")]
    pub interval: Duration,
    /// The most replication jobs one round queues.
    #[serde(default = "default_reconcile_batch")]
    pub batch: usize,
    /// Repositories whose assignments one round compares with their replication factor; the
    /// sweep goes on from there in the next round.
    #[serde(default = "default_reconcile_sweep")]
    pub sweep: usize,
}

impl Default for ReconcilerConfig {
    fn default() -> Self {
        Self {
            interval: default_reconcile_interval(),
            batch: default_reconcile_batch(),
            sweep: default_reconcile_sweep(),
        }
    }
}

fn default_reconcile_interval() -> Duration {
    Duration::secs(5)
}
fn default_reconcile_batch() -> usize {
    1000
}
fn default_reconcile_sweep() -> usize {
    10_000
}

/// When queued work counts as stuck.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Work is stuck when jobs are ready and none has started or finished for this long.
    #[serde(default = "default_stall_after")]
    pub stall_after: Duration,
}

impl Default for StatusConfig {
    fn default() -> Self {
        Self {
            stall_after: default_stall_after(),
        }
    }
}

fn default_stall_after() -> Duration {
    Duration::secs(300)
}

/// The storage walker: finds replicas on the nodes that nothing references and moves them to
/// quarantine, and purges old quarantine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalkerConfig {
    /// How often each storage is walked. Workers share the storages: one walk per storage per
    /// interval, whatever the number of workers.
    #[serde(default = "default_walk_interval")]
    pub interval: Duration,
    /// A replica nothing references is left alone until it was last modified this long ago.
    #[serde(default = "default_grace_period")]
    pub grace_period: Duration,
    /// Quarantined replicas are purged this long after they were quarantined; until then
    /// `gitfleet admin quarantine restore` brings them back.
    #[serde(default = "default_quarantine_retention")]
    pub quarantine_retention: Duration,
}

impl Default for WalkerConfig {
    fn default() -> Self {
        Self {
            interval: default_walk_interval(),
            grace_period: default_grace_period(),
            quarantine_retention: default_quarantine_retention(),
        }
    }
}

fn default_walk_interval() -> Duration {
    Duration::secs(3600)
}

fn default_grace_period() -> Duration {
    Duration::secs(3600)
}

fn default_quarantine_retention() -> Duration {
    Duration::secs(7 * 86_400)
}
