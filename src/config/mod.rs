//! Typed, validated configuration: a TOML file whose every key can be overridden by an
//! environment variable, with unknown keys refused.
//!
//! An override is named `GITFLEET__` followed by the key path in upper case, joined by `__`:
//! `GITFLEET__LISTEN` sets `listen`, `GITFLEET__AUTH__TOKEN` sets `auth.token`, and
//! `GITFLEET__STORAGES__0__PATH` sets `path` of the first `[[storages]]` entry. A value that
//! reads as a TOML boolean, number or array (`true`, `30`, `[1, 2]`) is taken as one unless its
//! field wants text; anything else is text, taken verbatim.

mod duration;
mod jobs;
mod node;
mod proxy;

use std::path::Path;

pub use duration::Duration;
pub use jobs::{ReconcilerConfig, StatusConfig, VerifierConfig, WalkerConfig, WorkerConfig};
pub use node::{NodeConfig, StorageConfig};
pub use proxy::{
    AccessToken, DatabaseConfig, HealthConfig, NodeEntry, ProxyConfig, TokenScope,
    VirtualStorageConfig, WritesConfig,
};
use serde::de::DeserializeOwned;

/// Prefix of every environment override.
pub const ENV_PREFIX: &str = "GITFLEET__";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {name}: {message}")]
    Env { name: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Reads `path`, applies the environment overrides in `env`, and deserializes the result.
pub fn load<T: DeserializeOwned>(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<T, ConfigError> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: display.clone(),
        source,
    })?;
    let document: toml::Table =
        text.parse()
            .map_err(|error: toml::de::Error| ConfigError::Parse {
                path: display.clone(),
                message: error.to_string(),
            })?;
    let overrides = env_overrides(env)?;
    // Overrides whose typed reading did not fit their field and are retried as text.
    let mut verbatim = vec![false; overrides.len()];
    loop {
        let mut merged = document.clone();
        for (index, entry) in overrides.iter().enumerate() {
            let value = if verbatim[index] {
                toml::Value::String(entry.raw.clone())
            } else {
                guess(&entry.raw)
            };
            set_path(&mut merged, &entry.keys, value).map_err(|message| ConfigError::Env {
                name: entry.name.clone(),
                message,
            })?;
        }
        let error = match serde_path_to_error::deserialize(toml::Value::Table(merged)) {
            Ok(config) => return Ok(config),
            Err(error) => error,
        };
        let key = error.path().to_string();
        let retry = overrides
            .iter()
            .position(|entry| entry.path() == key)
            .filter(|&index| !verbatim[index] && !guess(&overrides[index].raw).is_str());
        match retry {
            Some(index) => verbatim[index] = true,
            None => {
                let message = error.into_inner().message().to_owned();
                let message = if key == "." {
                    message
                } else {
                    format!("{key}: {message}")
                };
                return Err(ConfigError::Parse {
                    path: display,
                    message,
                });
            }
        }
    }
}

/// One `GITFLEET__...` environment variable.
struct EnvOverride {
    name: String,
    keys: Vec<String>,
    raw: String,
}

impl EnvOverride {
    /// The key path as deserialization errors print it: `storages[0].path`.
    fn path(&self) -> String {
        let mut path = String::new();
        for key in &self.keys {
            match key.parse::<usize>() {
                Ok(index) => path.push_str(&format!("[{index}]")),
                Err(_) if path.is_empty() => path.push_str(key),
                Err(_) => path.push_str(&format!(".{key}")),
            }
        }
        path
    }
}

fn env_overrides(
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<EnvOverride>, ConfigError> {
    let mut overrides: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    overrides.sort();
    overrides
        .into_iter()
        .map(|(name, raw)| {
            let keys: Vec<String> = name[ENV_PREFIX.len()..]
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect();
            if keys.iter().any(String::is_empty) {
                return Err(ConfigError::Env {
                    name,
                    message: "has an empty key".into(),
                });
            }
            Ok(EnvOverride { name, keys, raw })
        })
        .collect()
}

/// Reads an override as a boolean, number or array when it is one, and as text otherwise;
/// text is taken verbatim, quotes included.
fn guess(raw: &str) -> toml::Value {
    let typed = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut table| table.remove("v"));
    match typed {
        Some(
            value @ (toml::Value::Boolean(_)
            | toml::Value::Integer(_)
            | toml::Value::Float(_)
            | toml::Value::Array(_)),
        ) => value,
        _ => toml::Value::String(raw.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, keys: &[String], value: toml::Value) -> Result<(), String> {
    let (last, parents) = keys.split_last().expect("keys is never empty");
    let mut current = table;
    for key in parents {
        let entry = current
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match entry {
            toml::Value::Table(table) => table,
            toml::Value::Array(array) => {
                return set_in_array(array, keys, parents, key, value);
            }
            _ => return Err(format!("{key} is not a table")),
        };
    }
    current.insert(last.clone(), value);
    Ok(())
}

/// Handles `KEY__INDEX__REST` where `KEY` is an array of tables.
fn set_in_array(
    array: &mut [toml::Value],
    keys: &[String],
    parents: &[String],
    key: &str,
    value: toml::Value,
) -> Result<(), String> {
    let position = parents
        .iter()
        .position(|k| k == key)
        .expect("key is one of parents");
    let index: usize = keys[position + 1]
        .parse()
        .map_err(|_| format!("{key} is a list: the next part must be an index"))?;
    let element = array
        .get_mut(index)
        .ok_or_else(|| format!("{key} has no entry {index}"))?;
    match element {
        toml::Value::Table(table) if keys.len() > position + 2 => {
            set_path(table, &keys[position + 2..], value)
        }
        _ => Err(format!("{key}[{index}] cannot be set this way")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        listen: String,
        port: Option<u16>,
        items: Vec<Item>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Item {
        name: String,
    }

    fn load_str(text: &str, env: &[(&str, &str)]) -> Result<Sample, ConfigError> {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), text).unwrap();
        load(
            file.path(),
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    #[test]
    fn env_overrides_scalars_and_list_entries() {
        let sample = load_str(
            "listen = 'a'\n[[items]]\nname = 'x'\n",
            &[
                ("GITFLEET__LISTEN", "b"),
                ("GITFLEET__PORT", "7"),
                ("GITFLEET__ITEMS__0__NAME", "y"),
            ],
        )
        .unwrap();
        assert_eq!(sample.listen, "b");
        assert_eq!(sample.port, Some(7));
        assert_eq!(sample.items[0].name, "y");
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let error = load_str("listen = 'a'\nitems = []\nlisten_adress = 'x'\n", &[]).unwrap_err();
        assert!(error.to_string().contains("listen_adress"), "{error}");
        let error =
            load_str("listen = 'a'\nitems = []\n", &[("GITFLEET__BOGUS", "1")]).unwrap_err();
        assert!(error.to_string().contains("bogus"), "{error}");
    }

    #[test]
    fn text_overrides_are_verbatim_and_numbers_fit_text_fields() {
        let sample = load_str(
            "listen = 'a'\nitems = []\n",
            &[("GITFLEET__LISTEN", "'quoted'")],
        )
        .unwrap();
        assert_eq!(sample.listen, "'quoted'");
        let sample = load_str(
            "listen = 'a'\nitems = []\n",
            &[("GITFLEET__LISTEN", "1234567890123")],
        )
        .unwrap();
        assert_eq!(sample.listen, "1234567890123");
        let error =
            load_str("listen = 'a'\nitems = []\n", &[("GITFLEET__PORT", "lots")]).unwrap_err();
        assert!(error.to_string().contains("port"), "{error}");
    }

    #[test]
    fn bad_list_index_names_the_variable() {
        let error = load_str(
            "listen = 'a'\nitems = []\n",
            &[("GITFLEET__ITEMS__3__NAME", "y")],
        )
        .unwrap_err();
        assert!(
            error.to_string().contains("GITFLEET__ITEMS__3__NAME"),
            "{error}"
        );
    }
}
