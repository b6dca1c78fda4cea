//! What meshctl reads of the settings every process reads: `[etcd]`,
//! `[tls]` and `[events]` (the brokers, for dead letters), from `MESHKIT_CONFIG` and `MESHKIT_ETCD_*` / `MESHKIT_TLS_*`
//! through the same loader as every process.

use std::sync::Arc;

use meshkit_common::{
    config::{EtcdSettings, ProcessEnv, Settings, TlsSettings, load_process},
    events::EventSettings,
    tls::Tls,
};
use serde::{Deserialize, Serialize};

/// meshctl's settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CtlConfig {
    pub etcd: EtcdSettings,
    pub tls: TlsSettings,
    pub events: EventSettings,
}

impl Settings for CtlConfig {
    fn validate(&self) -> meshkit_common::config::Result<()> {
        self.etcd.validate()?;
        self.tls.validate()?;
        self.events.validate()
    }
}

impl CtlConfig {
    /// From the process's file and environment, read once per process.
    pub fn load() -> meshkit_common::config::Result<Self> {
        static LOADED: std::sync::OnceLock<meshkit_common::config::Result<CtlConfig>> = std::sync::OnceLock::new();
        LOADED.get_or_init(|| load_process("meshctl", &ProcessEnv)).clone()
    }
}

/// mTLS for meshctl's own calls (`MESHKIT_TLS_ENABLED`, `MESHKIT_TLS_CERT_FILE`,
/// `MESHKIT_TLS_KEY_FILE`, `MESHKIT_TLS_CA_FILE`).
pub fn client_tls() -> anyhow::Result<Option<Arc<Tls>>> {
    let settings = CtlConfig::load()?.tls;
    if !settings.enabled {
        return Ok(None);
    }
    Ok(Some(Tls::load(&settings)?))
}
