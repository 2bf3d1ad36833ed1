use std::fmt;

use serde::{Deserialize, Deserializer};

/// A duration written the way people write them in config files: "30s", "5m", "1h 30m".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// A whole number of seconds, for defaults.
    pub const fn secs(seconds: u64) -> Self {
        Self(std::time::Duration::from_secs(seconds))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map(Duration)
            .map_err(|error| {
                serde::de::Error::custom(format!(
                    "{text:?} is not a duration ({error}); write it like \"30s\" or \"5m\""
                ))
            })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}
