use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{ConfigError, Duration};
use crate::model::StorageName;

/// `gitfleet node --config node.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Address of the gRPC server, such as "0.0.0.0:9001". Port 0 picks a free port.
    pub listen: SocketAddr,
    pub auth: AuthConfig,
    /// The storages this node serves.
    pub storages: Vec<StorageConfig>,
    #[serde(default)]
    pub git: GitConfig,
    /// After SIGTERM, how long the node keeps accepting calls while its health checks say
    /// NOT_SERVING, so that load balancers stop sending it work.
    #[serde(default = "default_shutdown_delay")]
    pub shutdown_delay: Duration,
    /// Then, how long running calls and their git commands may go on before they are killed.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The shared secret that callers sign their tokens with. Keep it out of the file with
    /// GITFLEET__AUTH__TOKEN.
    pub token: String,
    /// How far a token's timestamp may be from this node's clock.
    #[serde(default = "default_token_validity")]
    pub validity: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    pub name: String,
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GitConfig {
    /// The git binary to run.
    #[serde(default = "default_git_binary")]
    pub binary: PathBuf,
    /// The largest pack one push may send, in bytes (git's receive.maxInputSize).
    #[serde(default = "default_max_push_bytes")]
    pub max_push_bytes: u64,
}

impl Default for GitConfig {
    fn default() -> Self {
        Self {
            binary: default_git_binary(),
            max_push_bytes: default_max_push_bytes(),
        }
    }
}

fn default_max_push_bytes() -> u64 {
    4 << 30
}

fn default_git_binary() -> PathBuf {
    PathBuf::from("git")
}

fn default_shutdown_delay() -> Duration {
    Duration::secs(1)
}

fn default_shutdown_grace() -> Duration {
    Duration::secs(10)
}

pub fn default_token_validity() -> Duration {
    Duration::secs(60)
}

/// The shortest shared secret accepted, in bytes.
pub const MIN_TOKEN_LEN: usize = 16;

impl NodeConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let config: Self = super::load(path, std::env::vars())?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.auth.token.len() < MIN_TOKEN_LEN {
            return Err(ConfigError::Invalid(format!(
                "auth.token must be at least {MIN_TOKEN_LEN} bytes long"
            )));
        }
        if self.storages.is_empty() {
            return Err(ConfigError::Invalid("no [[storages]] configured".into()));
        }
        let mut names = HashSet::new();
        for storage in &self.storages {
            StorageName::parse(&storage.name)
                .map_err(|error| ConfigError::Invalid(error.to_string()))?;
            if !names.insert(storage.name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "storage {:?} is configured twice",
                    storage.name
                )));
            }
            if !storage.path.is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "storage {:?}: path {} must be absolute",
                    storage.name,
                    storage.path.display()
                )));
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
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/node.toml");
        let config: NodeConfig = super::super::load(&path, std::iter::empty()).unwrap();
        config.validate().unwrap();
        assert_eq!(config.storages[0].name, "storage-1");
        assert_eq!(config.auth.validity.0, std::time::Duration::from_secs(60));
    }
}
