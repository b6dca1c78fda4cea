//! The `etcd` and `registry` sections.

use meshkit_config::{Result, Settings, bad};
use serde::{Deserialize, Serialize};

/// `Debug` leaves the password out.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdSettings {
    /// `host:port` or `http://host:port`, one or more.
    pub endpoints: Vec<String>,
    /// Root of every meshkit key.
    pub prefix: String,
    pub connect_timeout_ms: u64,
    /// Per-request timeout, so a stopped etcd never hangs a caller.
    pub request_timeout_ms: u64,
    /// etcd user and password (auth enabled on the cluster); empty: none.
    pub username: String,
    pub password: String,
    /// TLS to etcd: the CA that signed etcd's certificate (`https://` endpoints).
    pub ca_file: String,
    /// A client certificate and key, when etcd asks for one (`--client-cert-auth`).
    pub cert_file: String,
    pub key_file: String,
}

impl std::fmt::Debug for EtcdSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSettings")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("username", &self.username)
            .field("password", &if self.password.is_empty() { "" } else { "<redacted>" })
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrySettings {
    /// Whether the server registers itself at all.
    pub enabled: bool,
    /// Lease TTL; keepalives go out at about a third of it.
    pub ttl_secs: i64,
    /// Instance id; empty means a fresh random id per process.
    pub instance_id: String,
    pub zone: String,
    pub weight: u32,
    pub version: String,
}

impl Default for EtcdSettings {
    fn default() -> Self {
        Self {
            endpoints: vec!["127.0.0.1:2379".into()],
            prefix: "/meshkit".into(),
            connect_timeout_ms: 2_000,
            request_timeout_ms: 3_000,
            username: String::new(),
            password: String::new(),
            ca_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
        }
    }
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl_secs: 10,
            instance_id: String::new(),
            zone: String::new(),
            weight: 100,
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

impl Settings for EtcdSettings {
    fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            return bad("etcd.endpoints", "at least one endpoint is required");
        }
        if let Some(e) = self.endpoints.iter().find(|e| e.is_empty() || e.contains(' ')) {
            return bad("etcd.endpoints", format!("{e:?} is not host:port"));
        }
        if !self.prefix.starts_with('/') || self.prefix.ends_with('/') {
            return bad("etcd.prefix", format!("{:?} must start with / and not end with /", self.prefix));
        }
        if !self.password.is_empty() && self.username.is_empty() {
            return bad("etcd.username", "a password is set but no user");
        }
        if self.cert_file.is_empty() != self.key_file.is_empty() {
            return bad("etcd.cert_file", "etcd.cert_file and etcd.key_file go together");
        }
        if !self.cert_file.is_empty() && self.ca_file.is_empty() {
            return bad("etcd.ca_file", "a client certificate needs the CA of etcd's certificate");
        }
        Ok(())
    }
}

impl Settings for RegistrySettings {
    fn validate(&self) -> Result<()> {
        if !(2..=3600).contains(&self.ttl_secs) {
            return bad("registry.ttl_secs", format!("{} is outside 2..=3600", self.ttl_secs));
        }
        if self.weight == 0 || self.weight > 10_000 {
            return bad("registry.weight", format!("{} is outside 1..=10000", self.weight));
        }
        if self.instance_id.contains('/') {
            return bad("registry.instance_id", "must not contain /");
        }
        Ok(())
    }
}
