//! A process's settings: the sections every meshkit process reads
//! ([`MeshConfig`]), composed by each binary with its own.
//!
//! Each concern owns its section (`etcd` and `registry` in
//! `meshkit-registry`, `log` in `meshkit-telemetry`, `tls` and `authz` in
//! `meshkit-tls`, `governance` in `meshkit-governance`, `database` in
//! `meshkit-db`, `events` in `meshkit-events`); this crate owns `server` and
//! `admin`. A service that reads more sections composes them beside
//! `MeshConfig` (flattened, so the TOML and `MESHKIT_*` names stay
//! `[database]` and `MESHKIT_DATABASE_URL`) and implements [`ProcessConfig`]
//! with [`compose_settings!`](crate::compose_settings):
//!
//! ```ignore
//! #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
//! #[serde(default)]
//! pub struct Config {
//!     #[serde(flatten)]
//!     pub mesh: MeshConfig,
//!     pub database: DatabaseSettings,
//! }
//! meshkit_common::compose_settings!(Config { database });
//! ```

use std::net::SocketAddr;

pub use meshkit_config::{Env, Error, ProcessEnv, Result, Settings, bad, defaults, from_table, load, load_process};
#[cfg(feature = "db")]
pub use meshkit_db::DatabaseSettings;
#[cfg(feature = "events")]
pub use meshkit_events::EventSettings;
pub use meshkit_governance::settings::{
    BreakerRule, GovernanceSettings, MethodRule, RetrySettings, SheddingSettings, ThrottlingSettings,
};
pub use meshkit_registry::{EtcdSettings, RegistrySettings};
pub use meshkit_telemetry::LogSettings;
pub use meshkit_tls::{AuthzSettings, TlsSettings};
use serde::{Deserialize, Serialize};

/// The sections every meshkit process reads. Sections it does not have
/// (another component's, in a shared file or under `_global` in the config
/// center) are left alone; unknown keys inside these sections are refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MeshConfig {
    pub server: ServerSettings,
    pub etcd: EtcdSettings,
    pub registry: RegistrySettings,
    pub log: LogSettings,
    pub admin: AdminSettings,
    pub governance: GovernanceSettings,
    pub tls: TlsSettings,
    pub authz: AuthzSettings,
}

/// A process's whole settings: [`MeshConfig`] and the sections of its own.
pub trait ProcessConfig: Settings {
    fn mesh(&self) -> &MeshConfig;
    fn mesh_mut(&mut self) -> &mut MeshConfig;
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSettings {
    /// Address to listen on; port 0 picks a free port.
    pub listen: String,
    /// Address registered in etcd; empty means the bound address.
    pub advertise: String,
    /// How long to wait after revoking the lease for watchers to drop us.
    pub drain_delay_ms: u64,
    /// Upper bound on finishing in-flight calls at shutdown.
    pub drain_timeout_ms: u64,
    /// Delay added to every call: fault injection for chaos drills, 0 in production.
    pub fault_delay_ms: u64,
    /// A connection that has not sent the HTTP/2 preface this long after it
    /// was accepted (after its TLS handshake, with TLS) is closed.
    pub preface_timeout_ms: u64,
    /// Streams one HTTP/2 connection may have open at once (advertised in
    /// SETTINGS); a stream past it is refused with REFUSED_STREAM.
    pub max_concurrent_streams: u32,
    /// Largest request header list (HPACK-decoded size) accepted.
    pub max_header_list_bytes: u32,
    /// PING and SETTINGS frames a client may send a second on one connection
    /// (and at once); past it the connection gets GOAWAY ENHANCE_YOUR_CALM.
    pub control_frames_per_sec: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminSettings {
    /// Whether to serve the admin endpoint (`/pools`, `/healthz`).
    pub enabled: bool,
    /// Address of the admin endpoint; port 0 picks a free port. It is
    /// published in the registration's metadata as `admin`.
    pub listen: String,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            advertise: String::new(),
            drain_delay_ms: 300,
            drain_timeout_ms: 10_000,
            fault_delay_ms: 0,
            preface_timeout_ms: 15_000,
            max_concurrent_streams: 1024,
            max_header_list_bytes: 16 * 1024,
            control_frames_per_sec: 1000,
        }
    }
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self { enabled: true, listen: "127.0.0.1:0".into() }
    }
}

// === impl MeshConfig ===

impl MeshConfig {
    /// Loads the settings of `component` from `MESHKIT_CONFIG` (a TOML file,
    /// optional) and the environment, and validates them.
    pub fn load(component: &str, env: &dyn Env) -> Result<Self> {
        load_process(component, env)
    }

    /// Settings from a TOML table shaped like them (unknown keys refused).
    pub fn deserialize_table(table: toml::Table) -> Result<Self> {
        from_table(table)
    }
}

impl Settings for MeshConfig {
    fn validate(&self) -> Result<()> {
        if self.server.listen.parse::<SocketAddr>().is_err() {
            return bad("server.listen", format!("{:?} is not an address like 127.0.0.1:0", self.server.listen));
        }
        if self.admin.enabled && self.admin.listen.parse::<SocketAddr>().is_err() {
            return bad("admin.listen", format!("{:?} is not an address like 127.0.0.1:0", self.admin.listen));
        }
        if self.server.max_concurrent_streams == 0 {
            return bad("server.max_concurrent_streams", "0 would refuse every call");
        }
        if self.server.max_header_list_bytes < 1024 {
            return bad("server.max_header_list_bytes", format!("{} is below 1024", self.server.max_header_list_bytes));
        }
        if self.server.control_frames_per_sec < 10 {
            return bad(
                "server.control_frames_per_sec",
                format!(
                    "{} is below 10: gRPC clients ping for keepalive and flow control",
                    self.server.control_frames_per_sec
                ),
            );
        }
        if self.server.preface_timeout_ms < 100 {
            return bad("server.preface_timeout_ms", format!("{} is below 100", self.server.preface_timeout_ms));
        }
        if !self.server.advertise.is_empty() && !self.server.advertise.contains(':') {
            return bad("server.advertise", format!("{:?} is not host:port", self.server.advertise));
        }
        self.etcd.validate()?;
        self.registry.validate()?;
        self.log.validate()?;
        self.governance.validate()?;
        self.authz.validate()?;
        self.tls.validate()
    }
}

impl ProcessConfig for MeshConfig {
    fn mesh(&self) -> &MeshConfig {
        self
    }

    fn mesh_mut(&mut self) -> &mut MeshConfig {
        self
    }
}

/// Implements [`Settings`], [`ProcessConfig`] and `Deref<Target = MeshConfig>`
/// for a process's settings type: a struct with a flattened `mesh:
/// MeshConfig` and the named sections of its own, each a [`Settings`].
/// Validation and resolution run over `mesh`, then each section in order.
#[macro_export]
macro_rules! compose_settings {
    ($name:ident { $($section:ident),* $(,)? }) => {
        impl $crate::config::Settings for $name {
            fn validate(&self) -> $crate::config::Result<()> {
                $crate::config::Settings::validate(&self.mesh)?;
                $($crate::config::Settings::validate(&self.$section)?;)*
                Ok(())
            }

            fn resolve(&mut self, component: &str, env: &dyn $crate::config::Env) {
                $crate::config::Settings::resolve(&mut self.mesh, component, env);
                $($crate::config::Settings::resolve(&mut self.$section, component, env);)*
            }
        }

        impl $crate::config::ProcessConfig for $name {
            fn mesh(&self) -> &$crate::MeshConfig {
                &self.mesh
            }

            fn mesh_mut(&mut self) -> &mut $crate::MeshConfig {
                &mut self.mesh
            }
        }

        // The mesh's sections read as the process's own: `config.etcd`,
        // `config.registry`, beside `config.database`.
        impl ::std::ops::Deref for $name {
            type Target = $crate::MeshConfig;

            fn deref(&self) -> &$crate::MeshConfig {
                &self.mesh
            }
        }

        impl ::std::ops::DerefMut for $name {
            fn deref_mut(&mut self) -> &mut $crate::MeshConfig {
                &mut self.mesh
            }
        }
    };
}
#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_then_file_then_env() {
        let dir = tempfile_dir();
        let file = dir.path().join("mesh.toml");
        std::fs::write(&file, "[registry]\nttl_secs = 30\nzone = \"a\"\n[etcd]\nendpoints = [\"10.0.0.1:2379\"]\n")
            .unwrap();
        let e = env(&[
            ("MESHKIT_CONFIG", file.to_str().unwrap()),
            ("MESHKIT_REGISTRY_TTL_SECS", "20"),
            ("MESHKIT_ETCD_ENDPOINTS", "127.0.0.1:1, 127.0.0.1:2"),
        ]);
        let c = MeshConfig::load("user", &e).unwrap();
        assert_eq!(c.registry.ttl_secs, 20, "env beats file");
        assert_eq!(c.registry.zone, "a", "file beats defaults");
        assert_eq!(c.etcd.endpoints, vec!["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!(c.registry.weight, 100, "default kept");
    }

    #[test]
    fn errors_name_the_setting() {
        let err = MeshConfig::load("user", &env(&[("MESHKIT_REGISTRY_TTL_SECS", "ten")])).unwrap_err();
        assert!(err.to_string().contains("MESHKIT_REGISTRY_TTL_SECS"), "{err}");
        let err = MeshConfig::load("user", &env(&[("MESHKIT_REGISTRY_TTL_SECS", "1")])).unwrap_err();
        assert!(err.to_string().contains("registry.ttl_secs"), "{err}");
        let err = MeshConfig::load("user", &env(&[("MESHKIT_SERVER_LISTEN", "nowhere")])).unwrap_err();
        assert!(err.to_string().contains("server.listen"), "{err}");
    }

    #[test]
    fn file_errors_name_the_key() {
        let dir = tempfile_dir();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "[registry]\nttl = 3\n").unwrap();
        let err = MeshConfig::load("user", &env(&[("MESHKIT_CONFIG", file.to_str().unwrap())])).unwrap_err();
        assert!(err.to_string().contains("unknown setting `registry.ttl`"), "{err}");
        std::fs::write(&file, "[registry]\nttl_secs = \"3\"\n").unwrap();
        let err = MeshConfig::load("user", &env(&[("MESHKIT_CONFIG", file.to_str().unwrap())])).unwrap_err();
        assert!(err.to_string().contains("`registry.ttl_secs` must be integer"), "{err}");
        let err = MeshConfig::load("user", &env(&[("MESHKIT_CONFIG", "/nonexistent/x.toml")])).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.toml"), "{err}");
    }

    #[test]
    fn governance_rules_load_from_a_file_and_bad_ones_are_named() {
        let dir = tempfile_dir();
        let file = dir.path().join("governance.toml");
        std::fs::write(
            &file,
            "[governance.methods.\"/meshkit.user.v1.UserService/GetUser\"]\nqps = 100.0\nburst = 20\n\
             [governance.methods.\"*\"]\nconcurrency = 64\nbreaker = { enabled = true, error_ratio = 0.5 }\n",
        )
        .unwrap();
        let c = MeshConfig::load("user", &env(&[("MESHKIT_CONFIG", file.to_str().unwrap())])).unwrap();
        assert_eq!(c.governance.methods["/meshkit.user.v1.UserService/GetUser"].burst, 20);
        assert!(c.governance.methods["*"].breaker.enabled);
        assert_eq!(c.governance.methods["*"].breaker.min_requests, 20, "unset fields keep their defaults");
        for (toml, expect) in [
            ("[governance.methods.\"GetUser\"]\nqps = 1.0\n", "the key must be"),
            ("[governance.methods.\"*\"]\nqps = -1.0\n", "qps: -1 is outside"),
            ("[governance.methods.\"*\"]\nqsp = 1.0\n", "unknown field `qsp`"),
            ("[governance.methods.\"*\"]\nbreaker = { enabled = true, error_ratio = 0.0 }\n", "needs error_ratio"),
            ("[log]\nfilter = \"info,[[[\"\n", "log.filter"),
        ] {
            std::fs::write(&file, toml).unwrap();
            let err = MeshConfig::load("user", &env(&[("MESHKIT_CONFIG", file.to_str().unwrap())])).unwrap_err();
            assert!(err.to_string().contains(expect), "{toml}: {err}");
        }
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let mut c = MeshConfig::default();
        c.etcd.username = "order".into();
        c.etcd.password = "etcd-pass-123".into();
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("etcd-pass-123"), "the etcd password leaked");
        assert!(shown.contains("<redacted>") && shown.contains("\"order\""));
    }

    #[test]
    fn security_settings_are_checked_naming_the_key() {
        for (toml, expect) in [
            ("[tls]\nenabled = true\n", "tls.cert_file: a file is required"),
            ("[authz]\ndefault = \"maybe\"\n", "authz.default"),
            ("[authz.rules]\n\"GetUser\" = [\"x\"]\n", "authz.rules.\"GetUser\""),
            ("[etcd]\npassword = \"x\"\n", "etcd.username"),
            ("[etcd]\ncert_file = \"c\"\nkey_file = \"k\"\n", "etcd.ca_file"),
        ] {
            let dir = tempfile_dir();
            let file = dir.path().join("security.toml");
            std::fs::write(&file, toml).unwrap();
            let err = MeshConfig::load("user", &env(&[("MESHKIT_CONFIG", file.to_str().unwrap())])).unwrap_err();
            assert!(err.to_string().contains(expect), "{toml}: {err}");
        }
    }

    #[test]
    fn sections_of_other_components_are_left_alone() {
        let dir = tempfile_dir();
        let file = dir.path().join("shared.toml");
        std::fs::write(
            &file,
            "[registry]\nzone = \"b\"\n[gateway]\nlisten = \"127.0.0.1:8080\"\n[database]\nurl = \"x\"\n",
        )
        .unwrap();
        let c = MeshConfig::load("user", &env(&[("MESHKIT_CONFIG", file.to_str().unwrap())])).unwrap();
        assert_eq!(c.registry.zone, "b");
    }

    /// A temp directory, removed when the test drops it.
    fn tempfile_dir() -> tempfile::TempDir {
        tempfile::Builder::new().prefix("meshkit-config-").tempdir().unwrap()
    }
}
