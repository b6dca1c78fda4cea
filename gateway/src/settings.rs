//! The gateway's settings: its own `gateway` section beside the mesh's.

use meshkit_common::{
    MeshConfig,
    config::{Result, Settings, bad},
};
use serde::{Deserialize, Serialize};

/// Everything the gateway process reads: the mesh's sections and `[gateway]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewayConfig {
    #[serde(flatten)]
    pub mesh: MeshConfig,
    pub gateway: GatewaySettings,
}

meshkit_common::compose_settings!(GatewayConfig { gateway });

/// The edge gateway: one listener for REST/JSON, grpc-web and gRPC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewaySettings {
    /// Address of the gateway's listener (HTTP/1.1 and HTTP/2 cleartext).
    pub listen: String,
    /// Worker threads, each with its own listener (SO_REUSEPORT), etcd client
    /// and upstream connections; 0 means one per core.
    pub workers: u32,
    /// Extra encoded `FileDescriptorSet` files (`protoc --include_imports
    /// --descriptor_set_out`) for services beyond meshkit's own, so the gateway
    /// routes, transcodes and reflects them too.
    pub descriptor_sets: Vec<String>,
    /// Largest request body (REST) or request message (gRPC, grpc-web) accepted.
    pub max_body_bytes: u64,
    /// Largest request header block accepted.
    pub max_header_bytes: u64,
    /// Streams one client connection may have open at once (the services'
    /// own listeners take `server.max_concurrent_streams`): each stalled
    /// stream may hold up to ~0.6 MiB here (its upstream window and its send
    /// buffer), so this bounds what one connection can pin.
    pub max_concurrent_streams: u32,
    /// Upstream deadline of a call whose client sets none, and the upper bound
    /// on one a client sets (`grpc-timeout`).
    pub request_timeout_ms: u64,
    /// Requests per second allowed per client address; 0 turns the limit off.
    pub rate_limit_per_sec: u32,
    /// Requests a client may send at once above its rate.
    pub rate_limit_burst: u32,
    /// Origins allowed to call from a browser (CORS); `*` allows any.
    pub cors_origins: Vec<String>,
    pub jwt: JwtSettings,
    /// HTTPS at the edge (HTTP/2 through ALPN, and HTTP/1.1): the gateway's
    /// certificate chain and key (PEM), read again when they change. Empty: cleartext.
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

/// JWT bearer authentication at the gateway, with a policy per method.
/// `Debug` leaves the secret out.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JwtSettings {
    /// HS256 shared secret; empty means HS256 tokens are not accepted.
    pub hs256_secret: String,
    /// A JWKS file of RSA public keys (RS256), chosen by the token's `kid`.
    pub jwks_file: String,
    /// Required `iss`, if not empty.
    pub issuer: String,
    /// Required `aud`, if not empty.
    pub audience: String,
    /// The claim holding a token's roles (a string or a list of strings).
    pub roles_claim: String,
    /// Policy of every method no rule names: `public` or `authenticated`.
    pub default_policy: String,
    /// Per-method rules, first match wins.
    pub rules: Vec<AuthRule>,
}

/// Who may call the methods a rule names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthRule {
    /// `package.Service/Method`, `package.Service/*` or `*`.
    pub methods: Vec<String>,
    /// `public` (no token needed), or `authenticated` (a valid token needed).
    #[serde(default = "default_rule_policy")]
    pub policy: String,
    /// The token must carry at least one of these roles (403 otherwise).
    #[serde(default)]
    pub roles: Vec<String>,
}

impl std::fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSettings")
            .field("hs256_secret", &if self.hs256_secret.is_empty() { "" } else { "<redacted>" })
            .field("jwks_file", &self.jwks_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("roles_claim", &self.roles_claim)
            .field("default_policy", &self.default_policy)
            .field("rules", &self.rules)
            .finish()
    }
}

fn default_rule_policy() -> String {
    "authenticated".into()
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            workers: 0,
            descriptor_sets: Vec::new(),
            max_concurrent_streams: 128,
            max_body_bytes: 4 << 20,
            max_header_bytes: 16 << 10,
            request_timeout_ms: 15_000,
            rate_limit_per_sec: 0,
            rate_limit_burst: 100,
            cors_origins: Vec::new(),
            jwt: JwtSettings::default(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            hs256_secret: String::new(),
            jwks_file: String::new(),
            issuer: String::new(),
            audience: String::new(),
            roles_claim: "roles".into(),
            default_policy: "public".into(),
            rules: Vec::new(),
        }
    }
}

impl Settings for GatewaySettings {
    fn validate(&self) -> Result<()> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad("gateway.listen", format!("{:?} is not an address like 127.0.0.1:8080", self.listen));
        }
        if self.workers > 256 {
            return bad("gateway.workers", format!("{} is above 256", self.workers));
        }
        if self.max_body_bytes < 1024 {
            return bad("gateway.max_body_bytes", format!("{} is below 1024", self.max_body_bytes));
        }
        if self.max_concurrent_streams == 0 {
            return bad("gateway.max_concurrent_streams", "0 would refuse every call");
        }
        if !(8192..=1 << 20).contains(&self.max_header_bytes) {
            return bad("gateway.max_header_bytes", format!("{} is outside 8192..=1048576", self.max_header_bytes));
        }
        if self.request_timeout_ms == 0 {
            return bad("gateway.request_timeout_ms", "must be at least 1");
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            return bad("gateway.tls_cert_file", "gateway.tls_cert_file and gateway.tls_key_file go together");
        }
        if self.rate_limit_per_sec > 0 && self.rate_limit_burst == 0 {
            return bad("gateway.rate_limit_burst", "must be at least 1 when a rate limit is set");
        }
        self.jwt.validate()
    }
}

impl Settings for JwtSettings {
    fn validate(&self) -> Result<()> {
        let policy_ok = |p: &str| matches!(p, "public" | "authenticated");
        if !policy_ok(&self.default_policy) {
            return bad(
                "gateway.jwt.default_policy",
                format!("{:?} is neither public nor authenticated", self.default_policy),
            );
        }
        for (i, rule) in self.rules.iter().enumerate() {
            if !policy_ok(&rule.policy) {
                return bad(
                    format!("gateway.jwt.rules[{i}].policy"),
                    format!("{:?} is neither public nor authenticated", rule.policy),
                );
            }
            if rule.methods.is_empty() {
                return bad(format!("gateway.jwt.rules[{i}].methods"), "must name at least one method");
            }
            if let Some(m) = rule.methods.iter().find(|m| meshkit_common::methods::MethodPattern::parse(m).is_err()) {
                return bad(
                    format!("gateway.jwt.rules[{i}].methods"),
                    format!("{m:?} is not package.Service/Method, package.Service/* or *"),
                );
            }
            if rule.policy == "public" && !rule.roles.is_empty() {
                return bad(format!("gateway.jwt.rules[{i}].roles"), "a public rule cannot require roles");
            }
        }
        let needs_tokens =
            self.default_policy == "authenticated" || self.rules.iter().any(|r| r.policy == "authenticated");
        if needs_tokens && self.hs256_secret.is_empty() && self.jwks_file.is_empty() {
            return bad("gateway.jwt", "a policy requires tokens but neither hs256_secret nor jwks_file is set");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn load(toml: &str) -> Result<GatewayConfig> {
        let file = std::env::temp_dir().join(format!("meshkit-gateway-{}.toml", std::process::id()));
        std::fs::write(&file, toml).expect("a writable temp dir");
        let env: HashMap<String, String> =
            [("MESHKIT_CONFIG".to_owned(), file.to_string_lossy().into_owned())].into_iter().collect();
        let result = meshkit_common::config::load_process("gateway", &env);
        let _ = std::fs::remove_file(&file);
        result
    }

    #[test]
    fn settings_are_checked_naming_the_key() {
        for (toml, expect) in [
            ("[gateway]\ntls_cert_file = \"c\"\n", "gateway.tls_cert_file"),
            ("[gateway]\nlisten = \"nowhere\"\n", "gateway.listen"),
            ("[gateway.jwt]\ndefault_policy = \"maybe\"\n", "gateway.jwt.default_policy"),
            ("[gateway.jwt]\ndefault_policy = \"authenticated\"\n", "neither hs256_secret nor jwks_file"),
            ("[gateway]\nlisen = \"127.0.0.1:1\"\n", "unknown setting `gateway.lisen`"),
            ("[registry]\nttl_secs = 1\n", "registry.ttl_secs"),
        ] {
            let err = load(toml).expect_err(toml);
            assert!(err.to_string().contains(expect), "{toml}: {err}");
        }
        let config = load("[gateway]\nworkers = 2\n[database]\nurl = \"sqlite://x\"\n").expect("valid");
        assert_eq!(config.gateway.workers, 2, "the gateway reads its section and leaves the database's alone");
    }

    #[test]
    fn the_jwt_secret_never_shows_in_debug_output() {
        let mut config = GatewayConfig::default();
        config.gateway.jwt.hs256_secret = "jwt-secret-789".into();
        let shown = format!("{config:?} {config:#?}");
        assert!(!shown.contains("jwt-secret-789") && shown.contains("<redacted>"), "{shown}");
    }
}
