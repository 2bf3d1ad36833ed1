use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

use super::jobs::{ReconcilerConfig, StatusConfig, VerifierConfig, WalkerConfig, WorkerConfig};
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
    /// commit decisions and the statement that commits it.
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
    /// How long a write that has run on the replicas keeps trying to record its outcome while
    /// PostgreSQL cannot be reached (a restart). After that the caller gets an error and the
    /// recovery job rolls the write back.
    #[serde(default = "default_commit_retry")]
    pub commit_retry: Duration,
    /// How long a write waits for the remaining replicas once a majority has answered. A
    /// replica still busy then is left out of the write and repaired from the others.
    #[serde(default = "default_straggler_timeout")]
    pub straggler_timeout: Duration,
}

impl Default for WritesConfig {
    fn default() -> Self {
        Self {
            lease: default_lease(),
            lease_wait: default_lease_wait(),
            timeout: default_write_timeout(),
            commit_retry: default_commit_retry(),
            straggler_timeout: default_straggler_timeout(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_max_connections() -> u32 {
    16
}
fn default_acquire_timeout() -> Duration {
    Duration::secs(2)
}
fn default_health_interval() -> Duration {
    Duration::secs(2)
}
fn default_health_timeout() -> Duration {
    Duration::secs(1)
}
fn default_lease() -> Duration {
    Duration::secs(60)
}
fn default_lease_wait() -> Duration {
    Duration::secs(60)
}
fn default_write_timeout() -> Duration {
    Duration::secs(3600)
}
fn default_commit_retry() -> Duration {
    Duration::secs(30)
}
fn default_straggler_timeout() -> Duration {
    Duration::secs(10)
}
fn default_node_connections() -> usize {
    4
}
fn default_max_message_bytes() -> usize {
    4 << 20
}
fn default_shutdown_delay() -> Duration {
    Duration::secs(1)
}
fn default_shutdown_grace() -> Duration {
    Duration::secs(30)
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
