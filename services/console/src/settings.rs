//! The `console` section, beside the mesh's (`etcd`, `log`, `tls`).

use meshkit_common::{
    MeshConfig,
    config::{Result, Settings, bad},
    events::EventSettings,
};
use serde::{Deserialize, Serialize};

/// The console's settings: `MESHKIT_CONSOLE_*` or `[console]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConsoleConfig {
    #[serde(flatten)]
    pub mesh: MeshConfig,
    pub console: ConsoleSettings,
    /// The brokers (and their TLS and SASL), as the services read them:
    /// the Events page reads dead letters and writes replays.
    pub events: EventSettings,
}

meshkit_common::compose_settings!(ConsoleConfig { console, events });

/// Where the console listens and who may sign in. `Debug` leaves the
/// passwords and the secret out.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleSettings {
    /// The console's address (HTTP, or HTTPS with the certificate below).
    pub listen: String,
    /// Signs in the user `admin` (every page, every change); empty: nobody
    /// signs in as admin with a password. At least 12 characters.
    pub admin_password: String,
    /// Signs in the user `viewer` (every page, no change); empty: off.
    pub viewer_password: String,
    /// How long a session lasts from sign-in.
    pub session_ttl_secs: u64,
    /// How long a page waits for etcd before it shows it cannot be reached.
    pub etcd_timeout_ms: u64,
    /// Sign-in with a JWT from the issuer the gateway trusts.
    pub jwt: ConsoleJwt,
    /// HTTPS: the certificate chain and key (PEM), read again when they change.
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// A trace UI's page of one trace, `{trace_id}` standing for the id
    /// (Jaeger: `http://127.0.0.1:16686/trace/{trace_id}`, Zipkin:
    /// `http://127.0.0.1:9411/zipkin/traces/{trace_id}`); empty: no links.
    pub trace_url: String,
}

/// Tokens the console accepts at sign-in, and which of their roles make an admin.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleJwt {
    pub hs256_secret: String,
    pub jwks_file: String,
    pub issuer: String,
    pub audience: String,
    pub roles_claim: String,
    /// A token with this role signs in as admin.
    pub admin_role: String,
    /// A token with this role signs in read-only; empty: any other valid token does.
    pub viewer_role: String,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8090".into(),
            admin_password: String::new(),
            viewer_password: String::new(),
            session_ttl_secs: 8 * 3600,
            etcd_timeout_ms: 2_000,
            jwt: ConsoleJwt::default(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            trace_url: String::new(),
        }
    }
}

impl Default for ConsoleJwt {
    fn default() -> Self {
        Self {
            hs256_secret: String::new(),
            jwks_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
            roles_claim: "roles".into(),
            admin_role: "admin".into(),
            viewer_role: String::new(),
        }
    }
}

impl ConsoleSettings {
    /// The trace UI's page of `trace_id`, when one is configured.
    pub fn trace_link(&self, trace_id: &str) -> Option<String> {
        (!self.trace_url.is_empty() && !trace_id.is_empty()).then(|| self.trace_url.replace("{trace_id}", trace_id))
    }
}

impl ConsoleJwt {
    /// Whether tokens can sign in at all.
    pub fn enabled(&self) -> bool {
        !self.hs256_secret.is_empty() || !self.jwks_file.is_empty()
    }
}

fn redacted(s: &str) -> &'static str {
    if s.is_empty() { "" } else { "<redacted>" }
}

impl std::fmt::Debug for ConsoleSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSettings")
            .field("listen", &self.listen)
            .field("admin_password", &redacted(&self.admin_password))
            .field("viewer_password", &redacted(&self.viewer_password))
            .field("session_ttl_secs", &self.session_ttl_secs)
            .field("etcd_timeout_ms", &self.etcd_timeout_ms)
            .field("jwt", &self.jwt)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("trace_url", &self.trace_url)
            .finish()
    }
}

impl std::fmt::Debug for ConsoleJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleJwt")
            .field("hs256_secret", &redacted(&self.hs256_secret))
            .field("jwks_file", &self.jwks_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("roles_claim", &self.roles_claim)
            .field("admin_role", &self.admin_role)
            .field("viewer_role", &self.viewer_role)
            .finish()
    }
}

impl Settings for ConsoleSettings {
    fn validate(&self) -> Result<()> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad("console.listen", format!("{:?} is not an address like 127.0.0.1:8090", self.listen));
        }
        for (setting, password) in
            [("console.admin_password", &self.admin_password), ("console.viewer_password", &self.viewer_password)]
        {
            if !password.is_empty() && password.chars().count() < 12 {
                return bad(setting, "is shorter than 12 characters");
            }
        }
        if self.admin_password.is_empty() && !self.jwt.enabled() {
            return bad(
                "console",
                "nobody could sign in as admin: set console.admin_password, or console.jwt.hs256_secret or jwks_file",
            );
        }
        if !(60..=7 * 24 * 3600).contains(&self.session_ttl_secs) {
            return bad("console.session_ttl_secs", format!("{} is outside 60..=604800", self.session_ttl_secs));
        }
        if !(100..=60_000).contains(&self.etcd_timeout_ms) {
            return bad("console.etcd_timeout_ms", format!("{} is outside 100..=60000", self.etcd_timeout_ms));
        }
        if self.jwt.enabled() && self.jwt.admin_role.is_empty() {
            return bad("console.jwt.admin_role", "must name the role that makes an admin");
        }
        if !self.trace_url.is_empty()
            && (!self.trace_url.contains("{trace_id}")
                || !(self.trace_url.starts_with("http://") || self.trace_url.starts_with("https://")))
        {
            return bad(
                "console.trace_url",
                format!("{:?} is not an http(s) address with {{trace_id}} in it", self.trace_url),
            );
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            return bad("console.tls_cert_file", "console.tls_cert_file and console.tls_key_file go together");
        }
        Ok(())
    }
}
