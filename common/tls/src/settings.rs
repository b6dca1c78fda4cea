//! The `tls` and `authz` sections.

use meshkit_base::methods::MethodPattern;
use meshkit_config::{Result, Settings, bad};
use serde::{Deserialize, Serialize};

/// Mutual TLS on every server and balanced channel of the process. Files are
/// read again when they change (`reload_ms`). See `docs/SECURITY.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSettings {
    pub enabled: bool,
    /// PEM certificate chain of this process (leaf first); its `spiffe://`
    /// URI SAN (or CN) is the identity callers are authorized by.
    pub cert_file: String,
    /// PEM private key of the certificate.
    pub key_file: String,
    /// PEM CA bundle peers' certificates must chain to.
    pub ca_file: String,
    /// How often the files are checked for a change.
    pub reload_ms: u64,
    /// Whether a server requires callers' certificates: `required` (mutual
    /// TLS, the default) or `optional`: a caller without one is served
    /// without an identity (what `authz` then allows an anonymous caller),
    /// for clients moving to mTLS and tools that cannot present a certificate.
    pub client_auth: String,
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            cert_file: String::new(),
            key_file: String::new(),
            ca_file: String::new(),
            reload_ms: 1000,
            client_auth: "required".into(),
        }
    }
}

/// Who may call what, by the caller's mTLS identity: hot-reloadable from the
/// config center (`authz.*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthzSettings {
    pub enabled: bool,
    /// What happens to a method no rule names: `allow` or `deny`.
    pub default: String,
    /// Allowed callers by method: `/pkg.Service/Method`, `/pkg.Service/*` or
    /// `*` (the most specific applies) → identities (`spiffe://meshkit/order-service`),
    /// or `*` for any caller with a certificate.
    pub rules: std::collections::BTreeMap<String, Vec<String>>,
}

impl Default for AuthzSettings {
    fn default() -> Self {
        Self { enabled: false, default: "allow".into(), rules: Default::default() }
    }
}

impl Settings for TlsSettings {
    fn validate(&self) -> Result<()> {
        if self.enabled {
            for (key, file) in
                [("tls.cert_file", &self.cert_file), ("tls.key_file", &self.key_file), ("tls.ca_file", &self.ca_file)]
            {
                if file.is_empty() {
                    return bad(key, "a file is required when tls.enabled is true");
                }
            }
        }
        if self.reload_ms < 50 {
            return bad("tls.reload_ms", format!("{} is below 50", self.reload_ms));
        }
        if !matches!(self.client_auth.as_str(), "required" | "optional") {
            return bad("tls.client_auth", format!("{:?} is neither required nor optional", self.client_auth));
        }
        Ok(())
    }
}

impl Settings for AuthzSettings {
    /// Checks patterns and identities; the error names the rule.
    fn validate(&self) -> Result<()> {
        if !matches!(self.default.as_str(), "allow" | "deny") {
            return bad("authz.default", format!("{:?} is neither allow nor deny", self.default));
        }
        for (pattern, callers) in &self.rules {
            if let Err(problem) = MethodPattern::parse(pattern) {
                return bad(format!("authz.rules.{pattern:?}"), problem);
            }
            if let Some(c) = callers.iter().find(|c| c.is_empty() || c.contains(char::is_whitespace)) {
                return bad(format!("authz.rules.{pattern:?}"), format!("{c:?} is not an identity"));
            }
        }
        Ok(())
    }
}
