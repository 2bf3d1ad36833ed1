use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use super::node::{AuthConfig, MIN_TOKEN_LEN};
use super::{ConfigError, Duration};
use crate::model::StorageName;

/// `gitfleet proxy --config proxy.toml`; also read by `gitfleet migrate` and `gitfleet admin`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Address of the gRPC server, such as "0.0.0.0:2305". Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Address of the HTTP server: git's smart HTTP protocol, /metrics, /healthz and /readyz.
    /// None: no HTTP server.
    #[serde(default)]
    pub http_listen: Option<SocketAddr>,
    /// Who may use git over HTTP: HTTP Basic auth, with the token as the password.
    #[serde(default)]
    pub access_tokens: Vec<AccessToken>,
    /// The secret that callers of the proxy sign their tokens with. It is not a node's secret.
    pub auth: AuthConfig,
    pub database: DatabaseConfig,
    /// The virtual storages the proxy serves.
    pub virtual_storages: Vec<VirtualStorageConfig>,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub writes: WritesConfig,
    /// `gitfleet worker`, which reads this same file.
    #[serde(default)]
    pub worker: WorkerConfig,
    /// The storage walker, a job of `gitfleet worker`.
    #[serde(default)]
    pub walker: WalkerConfig,
    /// The verifier, a job of `gitfleet worker`.
    #[serde(default)]
    pub verifier: VerifierConfig,
    /// The reconciler, a job of `gitfleet worker`.
    #[serde(default)]
    pub reconciler: ReconcilerConfig,
    /// What `admin status`, `/status` and the metrics call stuck.
    #[serde(default)]
    pub status: StatusConfig,
    /// Connections the proxy keeps to each node; calls take them in turn, and each carries
    /// many calls at once.
    #[serde(default = "default_node_connections")]
    pub node_connections: usize,
    /// The largest gRPC message accepted from a client or a node, in bytes.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// After SIGTERM, how long the proxy keeps accepting calls while its health checks say
    /// NOT_SERVING.
    #[serde(default = "default_shutdown_delay")]
    pub shutdown_delay: Duration,
    /// Then, how long calls in flight may go on. A write in flight is never cut between its
    /// fan-out and its second transaction.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessToken {
    /// Who the token belongs to: the user name in logs. Any user name is accepted with it.
    pub name: String,
    /// The secret, given as the HTTP Basic password. Keep it out of the file with
    /// GITFLEET__ACCESS_TOKENS__0__TOKEN.
    pub token: String,
    /// "read" (clone and fetch) or "read-write" (push too).
    pub scope: TokenScope,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenScope {
    Read,
    ReadWrite,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// A PostgreSQL URL, such as "postgres://gitfleet@db.internal/gitfleet". Keep a password
    /// out of the file with GITFLEET__DATABASE__URL.
    pub url: String,
    /// Connections in the pool.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// How long a call waits for a connection before it fails with UNAVAILABLE.
    #[serde(default = "default_acquire_timeout")]
    pub acquire_timeout: Duration,
    /// Apply the migrations at start (under an advisory lock, so proxies starting together
    /// take turns). Turn off to apply them only with `gitfleet migrate`.
    #[serde(default = "default_true")]
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtualStorageConfig {
    pub name: String,
    /// How many storages hold each repository. At most the number of nodes.
    pub replication_factor: usize,
    /// Whether a git push over HTTP to a repository that does not exist creates it.
    #[serde(default)]
    pub push_to_create: bool,
    pub nodes: Vec<NodeEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEntry {
    /// The storage's name on its node. Unique across the whole proxy config.
    pub storage: String,
    /// The node's gRPC address, such as "http://10.0.0.5:9001".
    pub address: String,
    /// The node's secret (its auth.token).
    pub token: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// How often each node's health service is asked.
    #[serde(default = "default_health_interval")]
    pub interval: Duration,
    /// How long one check may take before it counts as a failure.
    #[serde(default = "default_health_timeout")]
    pub timeout: Duration,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: default_health_interval(),
            timeout: default_health_timeout(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WritesConfig {
    /// How long a write lease lasts. A proxy that dies mid-write holds the repository for at
    /// most this long.
    #[serde(default = "default_lease")]
    pub lease: Duration,
    /// How long a write waits for another write to the same repository to finish.
    #[serde(default = "default_lease_wait")]
    pub lease_wait: Duration,
    /// The longest a write may take on the replicas, whatever deadline its caller gave.
    #[serde(default = "default_write_timeout")]
    pub timeout: Duration,
}

impl Default for WritesConfig {
    fn default() -> Self {
        Self {
            lease: default_lease(),
            lease_wait: default_lease_wait(),
            timeout: default_write_timeout(),
        }
    }
}

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
    secs(30)
}
fn default_poll_interval() -> Duration {
    secs(1)
}
fn default_job_concurrency() -> usize {
    4
}
fn default_max_attempts() -> i32 {
    8
}
fn default_retry_backoff() -> Duration {
    secs(5)
}
fn default_max_backoff() -> Duration {
    secs(600)
}
fn default_restart_backoff() -> Duration {
    secs(1)
}
fn default_worker_shutdown_grace() -> Duration {
    secs(30)
}
fn default_keep_finished() -> Duration {
    secs(7 * 24 * 3600)
}
fn default_replication_timeout() -> Duration {
    secs(3600)
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
    secs(7 * 86_400)
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
    secs(5)
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
    secs(300)
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
    secs(3600)
}

fn default_grace_period() -> Duration {
    secs(3600)
}

fn default_quarantine_retention() -> Duration {
    secs(7 * 86_400)
}

fn secs(seconds: u64) -> Duration {
    Duration(std::time::Duration::from_secs(seconds))
}
fn default_true() -> bool {
    true
}
fn default_max_connections() -> u32 {
    16
}
fn default_acquire_timeout() -> Duration {
    secs(2)
}
fn default_health_interval() -> Duration {
    secs(2)
}
fn default_health_timeout() -> Duration {
    secs(1)
}
fn default_lease() -> Duration {
    secs(60)
}
fn default_lease_wait() -> Duration {
    secs(60)
}
fn default_write_timeout() -> Duration {
    secs(3600)
}
fn default_node_connections() -> usize {
    4
}
fn default_max_message_bytes() -> usize {
    4 << 20
}
fn default_shutdown_delay() -> Duration {
    secs(1)
}
fn default_shutdown_grace() -> Duration {
    secs(30)
}

impl ProxyConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = super::load(path, std::env::vars())?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if self.auth.token.len() < MIN_TOKEN_LEN {
            return invalid(format!(
                "auth.token must be at least {MIN_TOKEN_LEN} bytes long"
            ));
        }
        if self.virtual_storages.is_empty() {
            return invalid("no [[virtual_storages]] configured".into());
        }
        if !(1..=64).contains(&self.node_connections) {
            return invalid("node_connections must be between 1 and 64".into());
        }
        if !(1024..=(64 << 20)).contains(&self.max_message_bytes) {
            return invalid("max_message_bytes must be between 1 KiB and 64 MiB".into());
        }
        let worker = &self.worker;
        if !(1..=256).contains(&worker.concurrency) {
            return invalid("worker.concurrency must be between 1 and 256".into());
        }
        if !(1..=1000).contains(&worker.max_attempts) {
            return invalid("worker.max_attempts must be between 1 and 1000".into());
        }
        if worker.lease.0 < std::time::Duration::from_secs(1) {
            return invalid("worker.lease must be at least 1s".into());
        }
        if worker.poll_interval.0.is_zero() || worker.retry_backoff.0.is_zero() {
            return invalid("worker.poll_interval and worker.retry_backoff must not be 0".into());
        }
        for access in &self.access_tokens {
            if access.token.len() < MIN_TOKEN_LEN {
                return invalid(format!(
                    "access token {:?}: token must be at least {MIN_TOKEN_LEN} bytes long",
                    access.name
                ));
            }
        }
        let mut names = HashSet::new();
        let mut storages = HashSet::new();
        for virtual_storage in &self.virtual_storages {
            let name = &virtual_storage.name;
            StorageName::parse(name).map_err(|error| {
                ConfigError::Invalid(format!("virtual storage {name:?}: {error}"))
            })?;
            if !names.insert(name.as_str()) {
                return invalid(format!("virtual storage {name:?} is configured twice"));
            }
            let nodes = virtual_storage.nodes.len();
            if virtual_storage.replication_factor == 0 || virtual_storage.replication_factor > nodes
            {
                return invalid(format!(
                    "virtual storage {name:?}: replication_factor must be between 1 and its {nodes} nodes"
                ));
            }
            for node in &virtual_storage.nodes {
                StorageName::parse(&node.storage).map_err(|error| {
                    ConfigError::Invalid(format!("virtual storage {name:?}: {error}"))
                })?;
                if !storages.insert(node.storage.as_str()) {
                    return invalid(format!(
                        "storage {:?} is configured twice: storage names must be unique across virtual storages",
                        node.storage
                    ));
                }
                crate::client::endpoint(&node.address).map_err(|error| {
                    ConfigError::Invalid(format!("storage {:?}: {error}", node.storage))
                })?;
                if node.token.len() < MIN_TOKEN_LEN {
                    return invalid(format!(
                        "storage {:?}: token must be at least {MIN_TOKEN_LEN} bytes long",
                        node.storage
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/proxy.toml");
        let config: ProxyConfig = super::super::load(&path, std::iter::empty()).unwrap();
        config.validate().unwrap();
        assert_eq!(config.virtual_storages[0].name, "default");
        assert_eq!(config.virtual_storages[0].replication_factor, 3);
        assert!(config.database.migrate_on_start);
    }

    #[test]
    fn a_replication_factor_above_the_node_count_is_refused() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/proxy.toml");
        let mut config: ProxyConfig = super::super::load(&path, std::iter::empty()).unwrap();
        config.virtual_storages[0].replication_factor = 4;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("replication_factor"), "{error}");
    }
}
