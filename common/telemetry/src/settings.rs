//! The `log` section.

use meshkit_config::{Result, Settings, bad};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// An `EnvFilter` directive; `RUST_LOG` overrides it. The default hides
    /// the Kafka client's own lines (rskafka logs every reconnect attempt):
    /// meshkit logs broker trouble itself, once per outage; add
    /// `rskafka=info` to see them.
    pub filter: String,
    /// `text` or `json`.
    pub format: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self { filter: "info,rskafka=off".into(), format: "text".into() }
    }
}

impl Settings for LogSettings {
    fn validate(&self) -> Result<()> {
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.filter) {
            return bad("log.filter", format!("{:?} is not a filter: {e}", self.filter));
        }
        if !matches!(self.format.as_str(), "text" | "json") {
            return bad("log.format", format!("{:?} is neither text nor json", self.format));
        }
        Ok(())
    }
}
