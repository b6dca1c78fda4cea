//! Layered settings: defaults < TOML file < `MESHKIT_*` environment.
//!
//! Every leaf setting `section.key` can be set from the environment as
//! `MESHKIT_SECTION_KEY` (for example `registry.ttl_secs` from
//! `MESHKIT_REGISTRY_TTL_SECS`, `etcd.endpoints` from `MESHKIT_ETCD_ENDPOINTS`,
//! a comma-separated list). Only known settings are looked up, so the mapping
//! is unambiguous, and an unknown key in the file is refused by name. The
//! environment is read through [`Env`] so tests can feed a map.

use std::{collections::HashMap, net::SocketAddr, path::Path};

use serde::{Deserialize, Serialize, de::DeserializeOwned};
use toml::{Table, Value};

use crate::error::{Error, Result};

/// Where environment variables come from.
pub trait Env {
    fn var(&self, key: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }
}

impl Env for HashMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }
}

/// A check a component adds to every validation of the settings in its
/// process (the scheduler checks cron expressions and time zones, which the
/// library does not carry).
pub type ExtraCheck = fn(&MeshConfig) -> Result<()>;

static EXTRA_CHECKS: std::sync::RwLock<Vec<ExtraCheck>> = std::sync::RwLock::new(Vec::new());

/// Adds `check` to every [`MeshConfig::validate`] in this process (once).
pub fn add_check(check: ExtraCheck) {
    let mut checks = EXTRA_CHECKS.write().unwrap_or_else(|p| p.into_inner());
    if !checks.iter().any(|c| std::ptr::fn_addr_eq(*c, check)) {
        checks.push(check);
    }
}

/// Settings shared by every meshkit process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    pub server: ServerSettings,
    pub etcd: EtcdSettings,
    pub registry: RegistrySettings,
    pub database: DatabaseSettings,
    pub log: LogSettings,
    pub admin: AdminSettings,
    pub events: EventSettings,
    pub gateway: GatewaySettings,
    pub governance: GovernanceSettings,
    pub scheduler: SchedulerSettings,
    pub tls: TlsSettings,
    pub authz: AuthzSettings,
}

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
}

impl Default for TlsSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            cert_file: String::new(),
            key_file: String::new(),
            ca_file: String::new(),
            reload_ms: 1000,
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

impl AuthzSettings {
    /// Checks patterns and identities; the error names the rule.
    pub fn validate(&self) -> Result<()> {
        let bad = |setting: String, problem: String| Err(Error::Config(format!("{setting}: {problem}")));
        if !matches!(self.default.as_str(), "allow" | "deny") {
            return bad("authz.default".into(), format!("{:?} is neither allow nor deny", self.default));
        }
        for (pattern, callers) in &self.rules {
            let ok = pattern == "*"
                || pattern
                    .strip_prefix('/')
                    .and_then(|p| p.split_once('/'))
                    .is_some_and(|(s, m)| !s.is_empty() && !m.is_empty() && !m.contains('/'));
            if !ok {
                return bad(
                    format!("authz.rules.{pattern:?}"),
                    "the key must be /package.Service/Method, /package.Service/* or *".into(),
                );
            }
            if let Some(c) = callers.iter().find(|c| c.is_empty() || c.contains(char::is_whitespace)) {
                return bad(format!("authz.rules.{pattern:?}"), format!("{c:?} is not an identity"));
            }
        }
        Ok(())
    }
}

/// The scheduler's jobs and how it fires them: hot-reloadable from the config
/// center (`scheduler.jobs.NAME`). See `docs/SCHEDULER.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerSettings {
    pub jobs: std::collections::BTreeMap<String, JobSpec>,
    /// Slots missed by less than this (a leader change, a slow tick) still
    /// fire, late; older ones follow the job's misfire policy.
    pub misfire_threshold_ms: u64,
    /// Pause between retries of a failed run.
    pub retry_backoff_ms: u64,
}

/// One job: when it fires, where it runs and what happens when it fails.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobSpec {
    /// Cron with seconds: `sec min hour day-of-month month day-of-week [year]`
    /// (Quartz style: `0/5 * * * * *`, `0 0 2 * * MON-FRI`). Or set `every_ms`.
    pub cron: String,
    /// IANA time zone the cron expression is read in (`Asia/Shanghai`).
    pub time_zone: String,
    /// Fixed rate: slots at every multiple of this many milliseconds.
    pub every_ms: u64,
    /// The executors: processes registering the `JobExecutor` service with
    /// this `component` metadata (`order`).
    pub target: String,
    /// The handler the executor runs.
    pub handler: String,
    /// Text passed to the handler.
    pub param: String,
    /// round_robin, random, first, last, consistent_hash, failover or sharding_broadcast.
    pub route: String,
    /// Shards of a sharding broadcast; 0 gives one per live executor.
    pub shards: u32,
    /// How long one run may take; the executor is told by the call's deadline.
    pub timeout_ms: u64,
    /// Further attempts after a failed one, on another executor when there is one.
    pub retries: u32,
    /// What happens to slots missed by more than the threshold: `skip` (none
    /// of them fires) or `fire_once` (the newest fires once, now).
    pub misfire: String,
    /// When a slot comes while the previous run still goes: `serial` (it
    /// waits for that run to end, then runs; at most 10 wait), `skip` it
    /// (logged as skipped) or `allow` both at once.
    pub overlap: String,
    /// Paused jobs do not fire on schedule; manual triggers still run.
    pub paused: bool,
}

impl Default for SchedulerSettings {
    fn default() -> Self {
        Self { jobs: Default::default(), misfire_threshold_ms: 5_000, retry_backoff_ms: 500 }
    }
}

impl Default for JobSpec {
    fn default() -> Self {
        Self {
            cron: String::new(),
            time_zone: "UTC".into(),
            every_ms: 0,
            target: String::new(),
            handler: String::new(),
            param: String::new(),
            route: "round_robin".into(),
            shards: 0,
            timeout_ms: 60_000,
            retries: 0,
            misfire: "skip".into(),
            overlap: "serial".into(),
            paused: false,
        }
    }
}

/// The route strategies a job may name.
pub const JOB_ROUTES: &[&str] =
    &["round_robin", "random", "first", "last", "consistent_hash", "failover", "sharding_broadcast"];

impl SchedulerSettings {
    /// Checks every job; the error names it (`scheduler.jobs.NAME.cron`).
    pub fn validate(&self) -> Result<()> {
        let bad = |setting: String, problem: String| Err(Error::Config(format!("{setting}: {problem}")));
        if self.misfire_threshold_ms > 86_400_000 {
            return bad("scheduler.misfire_threshold_ms".into(), "is above one day".into());
        }
        for (name, job) in &self.jobs {
            let at = |key: &str| format!("scheduler.jobs.{name}.{key}");
            if name.is_empty()
                || name.len() > 100
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
            {
                return bad(format!("scheduler.jobs.{name:?}"), "a job name is 1-100 of a-z, A-Z, 0-9, - and _".into());
            }
            // Cron and time zones are checked by the scheduler's own check (see `add_check`).
            if job.cron.trim().is_empty() == (job.every_ms == 0) {
                return bad(at("cron"), "set cron or every_ms (one of them)".into());
            }
            if job.every_ms > 0 && job.every_ms < 100 {
                return bad(at("every_ms"), format!("{} is below 100", job.every_ms));
            }
            if job.target.is_empty() {
                return bad(at("target"), "must name the executors' component".into());
            }
            if job.handler.is_empty() {
                return bad(at("handler"), "must name the handler to run".into());
            }
            if !JOB_ROUTES.contains(&job.route.as_str()) {
                return bad(at("route"), format!("{:?} is not one of {}", job.route, JOB_ROUTES.join(", ")));
            }
            if job.shards > 1024 {
                return bad(at("shards"), format!("{} is above 1024", job.shards));
            }
            if job.shards > 0 && job.route != "sharding_broadcast" {
                return bad(at("shards"), "only a sharding_broadcast job has shards".into());
            }
            if !(1..=86_400_000).contains(&job.timeout_ms) {
                return bad(at("timeout_ms"), format!("{} is outside 1..=86400000", job.timeout_ms));
            }
            if job.retries > 10 {
                return bad(at("retries"), format!("{} is above 10", job.retries));
            }
            if !matches!(job.misfire.as_str(), "skip" | "fire_once") {
                return bad(at("misfire"), format!("{:?} is neither skip nor fire_once", job.misfire));
            }
            if !matches!(job.overlap.as_str(), "serial" | "skip" | "allow") {
                return bad(at("overlap"), format!("{:?} is not serial, skip or allow", job.overlap));
            }
        }
        Ok(())
    }
}

/// Flow control, circuit breaking and load shedding: hot-reloadable from the
/// config center (`governance.*`). See `docs/GOVERNANCE.md`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GovernanceSettings {
    /// Rules by method: `/pkg.Service/Method`, `/pkg.Service/*` or `*`; the
    /// most specific applies. On the server side: `qps`, `concurrency`,
    /// `caller_qps`, `timeout_ms`; on the calling side: `breaker`, `timeout_ms`.
    pub methods: std::collections::BTreeMap<String, MethodRule>,
    pub shedding: SheddingSettings,
    pub throttling: ThrottlingSettings,
    /// Retry policy by called service (`pkg.Service`), applied to channels built after it is set.
    pub retry: std::collections::BTreeMap<String, RetrySettings>,
}

/// The rules of one method (or a pattern of methods).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodRule {
    /// Calls per second the server admits (token bucket); 0 = no limit.
    pub qps: f64,
    /// Calls admitted at once above the rate; 0 = `qps` rounded up.
    pub burst: u32,
    /// Calls served at the same time; 0 = no limit.
    pub concurrency: u32,
    /// Calls per second per caller, keyed by the `caller_key` metadata; 0 = off.
    pub caller_qps: f64,
    pub caller_burst: u32,
    /// The metadata naming the caller (`x-meshkit-caller`, or `x-meshkit-subject` from the gateway's JWT).
    pub caller_key: String,
    /// A deadline for the call (the caller's, if sooner, wins); 0 = none.
    pub timeout_ms: u64,
    pub breaker: BreakerRule,
}

impl Default for MethodRule {
    fn default() -> Self {
        Self {
            qps: 0.0,
            burst: 0,
            concurrency: 0,
            caller_qps: 0.0,
            caller_burst: 0,
            caller_key: "x-meshkit-caller".into(),
            timeout_ms: 0,
            breaker: BreakerRule::default(),
        }
    }
}

/// An error-ratio and slow-call-ratio circuit breaker (Sentinel's semantics).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerRule {
    pub enabled: bool,
    /// Open when at least this share of calls in the window failed (0 = off).
    pub error_ratio: f64,
    /// Open when at least this share took longer than `slow_ms` (0 = off).
    pub slow_ratio: f64,
    pub slow_ms: u64,
    /// No decision on fewer calls than this in the window.
    pub min_requests: u32,
    /// The statistics window.
    pub window_ms: u64,
    /// How long it stays open before probing.
    pub open_ms: u64,
    /// Calls let through while half-open; all must succeed to close.
    pub probes: u32,
}

impl Default for BreakerRule {
    fn default() -> Self {
        Self {
            enabled: false,
            error_ratio: 0.5,
            slow_ratio: 0.0,
            slow_ms: 1_000,
            min_requests: 20,
            window_ms: 10_000,
            open_ms: 5_000,
            probes: 3,
        }
    }
}

/// Adaptive load shedding on the server side (in the spirit of BBR).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SheddingSettings {
    pub enabled: bool,
    /// Shed only while the process uses at least this share of its CPUs
    /// (0 = whatever the CPU: in-flight calls alone decide).
    pub cpu_threshold: f64,
    /// The window the capacity (most calls completed per bucket × shortest latency) is taken over.
    pub window_ms: u64,
    pub buckets: u32,
    /// Never shed below this many calls in flight.
    pub min_in_flight: u32,
}

impl Default for SheddingSettings {
    fn default() -> Self {
        Self { enabled: false, cpu_threshold: 0.8, window_ms: 5_000, buckets: 50, min_in_flight: 16 }
    }
}

/// Google SRE adaptive throttling on the calling side: reject locally with
/// probability max(0, (requests − k·accepts) / (requests + 1)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThrottlingSettings {
    pub enabled: bool,
    pub k: f64,
    pub window_ms: u64,
}

impl Default for ThrottlingSettings {
    fn default() -> Self {
        Self { enabled: false, k: 2.0, window_ms: 10_000 }
    }
}

/// Retries through balanced channels to one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    pub max_attempts: u32,
    /// Retries allowed as a share of calls.
    pub budget_percent: f64,
    /// Retries allowed per second whatever the traffic.
    pub budget_min_per_sec: u32,
}

impl Default for RetrySettings {
    fn default() -> Self {
        Self { max_attempts: 3, budget_percent: 0.2, budget_min_per_sec: 10 }
    }
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://path?mode=rwc` or `postgres://…`; `DATABASE_URL` also sets it.
    pub url: String,
    pub max_connections: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSettings {
    /// An `EnvFilter` directive; `RUST_LOG` overrides it.
    pub filter: String,
    /// `text` or `json`.
    pub format: String,
}

/// Kafka and the event pipeline: the outbox relay and the consumers.
/// `Debug` leaves the SASL password out.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventSettings {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// Partitions of the topics this process creates when they are missing.
    pub partitions: i32,
    /// Replication factor of the topics this process creates.
    pub replication_factor: i16,
    /// Upper bound on one broker request, retries included; the relay and the
    /// consumers then back off and try again.
    pub request_timeout_ms: u64,
    /// Outbox rows published per round.
    pub relay_batch: u32,
    /// How often the relay looks for rows written by other instances.
    pub relay_poll_ms: u64,
    /// How long published outbox rows are kept before they are pruned.
    pub outbox_retention_secs: u64,
    /// Attempts of a failing handler before the event goes to the dead-letter topic.
    pub max_attempts: u32,
    /// Upper bound on the bytes of one fetch.
    pub fetch_max_bytes: i32,
    /// How long a fetch waits on the broker for new records. Kafka answers
    /// as soon as records arrive; Tansu only at the end of the wait, so this
    /// is also the delivery latency on a Tansu broker.
    pub fetch_max_wait_ms: i32,
    /// The dead-letter topic of topic `t` is `t` followed by this.
    pub dead_letter_suffix: String,
    /// TLS to the brokers, checked against this CA bundle (PEM); empty: plaintext.
    pub tls_ca_file: String,
    /// A client certificate and key for brokers that ask for one.
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// SASL: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`; empty: none.
    pub sasl_mechanism: String,
    pub sasl_username: String,
    pub sasl_password: String,
}

impl std::fmt::Debug for EventSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSettings")
            .field("brokers", &self.brokers)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("relay_batch", &self.relay_batch)
            .field("relay_poll_ms", &self.relay_poll_ms)
            .field("outbox_retention_secs", &self.outbox_retention_secs)
            .field("max_attempts", &self.max_attempts)
            .field("fetch_max_bytes", &self.fetch_max_bytes)
            .field("fetch_max_wait_ms", &self.fetch_max_wait_ms)
            .field("dead_letter_suffix", &self.dead_letter_suffix)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &if self.sasl_password.is_empty() { "" } else { "<redacted>" })
            .finish()
    }
}

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

/// Loads `T` from its defaults, then `file` (if any), then the environment.
pub fn load<T>(file: Option<&Path>, env: &dyn Env) -> Result<T>
where
    T: Serialize + DeserializeOwned + Default,
{
    let mut table = match Value::try_from(T::default()) {
        Ok(Value::Table(t)) => t,
        _ => return Err(Error::Config("defaults do not form a table".into())),
    };
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::ConfigFile { path: path.to_owned(), message: e.to_string() })?;
        let from_file: Table = text
            .parse()
            .map_err(|e: toml::de::Error| Error::ConfigFile { path: path.to_owned(), message: e.to_string() })?;
        merge(&mut table, from_file, "").map_err(|message| Error::ConfigFile { path: path.to_owned(), message })?;
    }
    apply_env(&mut table, "MESHKIT", env)?;
    T::deserialize(Value::Table(table)).map_err(|e| Error::Config(e.to_string()))
}

/// Overlays `over` on `base`, refusing keys the defaults do not have.
fn merge(base: &mut Table, over: Table, path: &str) -> Result<(), String> {
    // An empty table in the defaults is a map (rules by method, …): any key
    // goes, and deserializing checks the entries.
    if base.is_empty() && !path.is_empty() {
        base.extend(over);
        return Ok(());
    }
    for (key, value) in over {
        let full = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(o)) => merge(b, o, &full)?,
            (Some(Value::Table(_)), _) => return Err(format!("`{full}` must be a table")),
            (Some(slot), v) => {
                if std::mem::discriminant(slot) != std::mem::discriminant(&v) {
                    return Err(format!("`{full}` must be {}, found {}", slot.type_str(), v.type_str()));
                }
                *slot = v;
            }
            (None, _) => return Err(format!("unknown setting `{full}`")),
        }
    }
    Ok(())
}

fn apply_env(table: &mut Table, prefix: &str, env: &dyn Env) -> Result<()> {
    for (key, slot) in table.iter_mut() {
        let name = format!("{prefix}_{}", key.to_uppercase());
        if let Value::Table(inner) = slot {
            apply_env(inner, &name, env)?;
            continue;
        }
        let Some(raw) = env.var(&name) else { continue };
        *slot = parse_env_value(slot, &raw).map_err(|problem| Error::Config(format!("{name}={raw:?}: {problem}")))?;
    }
    Ok(())
}

fn parse_env_value(current: &Value, raw: &str) -> Result<Value, String> {
    let raw = raw.trim();
    Ok(match current {
        Value::String(_) => Value::String(raw.to_owned()),
        Value::Integer(_) => Value::Integer(raw.parse().map_err(|_| "expected a whole number".to_owned())?),
        Value::Float(_) => Value::Float(raw.parse().map_err(|_| "expected a number".to_owned())?),
        Value::Boolean(_) => Value::Boolean(match raw.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            _ => return Err("expected true or false".into()),
        }),
        Value::Array(_) => Value::Array(
            raw.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| Value::String(s.to_owned())).collect(),
        ),
        other => return Err(format!("cannot be set from the environment ({})", other.type_str())),
    })
}

// === impl MeshConfig ===

impl MeshConfig {
    /// Loads the settings of `service` (used for the default database file)
    /// from `MESHKIT_CONFIG` (a TOML file, optional) and the environment, and
    /// validates them.
    pub fn load(service: &str, env: &dyn Env) -> Result<Self> {
        let file = env.var("MESHKIT_CONFIG").filter(|s| !s.is_empty());
        let mut config: MeshConfig = load(file.as_deref().map(Path::new), env)?;
        if env.var("MESHKIT_DATABASE_URL").is_none() {
            if let Some(url) = env.var("DATABASE_URL").filter(|s| !s.is_empty()) {
                config.database.url = url;
            }
        }
        if config.database.url.is_empty() {
            config.database.url = format!("sqlite://{service}.db?mode=rwc");
        }
        config.validate()?;
        Ok(config)
    }

    /// Settings from a TOML table shaped like them (unknown keys refused).
    pub fn deserialize_table(table: Table) -> Result<Self> {
        Self::deserialize(Value::Table(table)).map_err(|e| Error::Config(e.to_string()))
    }

    /// Checks ranges and formats; the error names the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |setting: &str, problem: String| Err(Error::Config(format!("{setting}: {problem}")));
        if self.server.listen.parse::<SocketAddr>().is_err() {
            return bad("server.listen", format!("{:?} is not an address like 127.0.0.1:0", self.server.listen));
        }
        if self.admin.enabled && self.admin.listen.parse::<SocketAddr>().is_err() {
            return bad("admin.listen", format!("{:?} is not an address like 127.0.0.1:0", self.admin.listen));
        }
        if !self.server.advertise.is_empty() && !self.server.advertise.contains(':') {
            return bad("server.advertise", format!("{:?} is not host:port", self.server.advertise));
        }
        if self.etcd.endpoints.is_empty() {
            return bad("etcd.endpoints", "at least one endpoint is required".into());
        }
        if let Some(e) = self.etcd.endpoints.iter().find(|e| e.is_empty() || e.contains(' ')) {
            return bad("etcd.endpoints", format!("{e:?} is not host:port"));
        }
        if !self.etcd.prefix.starts_with('/') || self.etcd.prefix.ends_with('/') {
            return bad("etcd.prefix", format!("{:?} must start with / and not end with /", self.etcd.prefix));
        }
        if !(2..=3600).contains(&self.registry.ttl_secs) {
            return bad("registry.ttl_secs", format!("{} is outside 2..=3600", self.registry.ttl_secs));
        }
        if self.registry.weight == 0 || self.registry.weight > 10_000 {
            return bad("registry.weight", format!("{} is outside 1..=10000", self.registry.weight));
        }
        if self.registry.instance_id.contains('/') {
            return bad("registry.instance_id", "must not contain /".into());
        }
        let url = &self.database.url;
        if !(url.is_empty()
            || url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return bad("database.url", "must start with sqlite:, postgres:// or postgresql://".into());
        }
        if self.database.max_connections == 0 {
            return bad("database.max_connections", "must be at least 1".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.filter) {
            return bad("log.filter", format!("{:?} is not a filter: {e}", self.log.filter));
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return bad("log.format", format!("{:?} is neither text nor json", self.log.format));
        }
        let events = &self.events;
        if events.brokers.is_empty() {
            return bad("events.brokers", "at least one broker is required".into());
        }
        if let Some(b) = events.brokers.iter().find(|b| !b.contains(':') || b.contains(' ') || b.contains("://")) {
            return bad("events.brokers", format!("{b:?} is not host:port"));
        }
        if !(1..=10_000).contains(&events.partitions) {
            return bad("events.partitions", format!("{} is outside 1..=10000", events.partitions));
        }
        if events.replication_factor < 1 {
            return bad("events.replication_factor", "must be at least 1".into());
        }
        if events.request_timeout_ms < 100 {
            return bad("events.request_timeout_ms", format!("{} is below 100", events.request_timeout_ms));
        }
        if !(1..=10_000).contains(&events.relay_batch) {
            return bad("events.relay_batch", format!("{} is outside 1..=10000", events.relay_batch));
        }
        if events.relay_poll_ms == 0 {
            return bad("events.relay_poll_ms", "must be at least 1".into());
        }
        if events.max_attempts == 0 {
            return bad("events.max_attempts", "must be at least 1".into());
        }
        if events.fetch_max_bytes < 1024 {
            return bad("events.fetch_max_bytes", format!("{} is below 1024", events.fetch_max_bytes));
        }
        if !(0..=30_000).contains(&events.fetch_max_wait_ms) {
            return bad("events.fetch_max_wait_ms", format!("{} is outside 0..=30000", events.fetch_max_wait_ms));
        }
        if events.dead_letter_suffix.is_empty() {
            return bad("events.dead_letter_suffix", "must not be empty".into());
        }
        let gateway = &self.gateway;
        if gateway.listen.parse::<SocketAddr>().is_err() {
            return bad("gateway.listen", format!("{:?} is not an address like 127.0.0.1:8080", gateway.listen));
        }
        if gateway.workers > 256 {
            return bad("gateway.workers", format!("{} is above 256", gateway.workers));
        }
        if gateway.max_body_bytes < 1024 {
            return bad("gateway.max_body_bytes", format!("{} is below 1024", gateway.max_body_bytes));
        }
        if !(8192..=1 << 20).contains(&gateway.max_header_bytes) {
            return bad("gateway.max_header_bytes", format!("{} is outside 8192..=1048576", gateway.max_header_bytes));
        }
        if gateway.request_timeout_ms == 0 {
            return bad("gateway.request_timeout_ms", "must be at least 1".into());
        }
        self.governance.validate()?;
        self.scheduler.validate()?;
        self.authz.validate()?;
        for check in EXTRA_CHECKS.read().unwrap_or_else(|p| p.into_inner()).iter() {
            check(self)?;
        }
        let tls = &self.tls;
        if tls.enabled {
            for (key, file) in
                [("tls.cert_file", &tls.cert_file), ("tls.key_file", &tls.key_file), ("tls.ca_file", &tls.ca_file)]
            {
                if file.is_empty() {
                    return bad(key, "a file is required when tls.enabled is true".into());
                }
            }
        }
        if tls.reload_ms < 50 {
            return bad("tls.reload_ms", format!("{} is below 50", tls.reload_ms));
        }
        let etcd = &self.etcd;
        if !etcd.password.is_empty() && etcd.username.is_empty() {
            return bad("etcd.username", "a password is set but no user".into());
        }
        if etcd.cert_file.is_empty() != etcd.key_file.is_empty() {
            return bad("etcd.cert_file", "etcd.cert_file and etcd.key_file go together".into());
        }
        if !etcd.cert_file.is_empty() && etcd.ca_file.is_empty() {
            return bad("etcd.ca_file", "a client certificate needs the CA of etcd's certificate".into());
        }
        let events = &self.events;
        if !matches!(events.sasl_mechanism.as_str(), "" | "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512") {
            return bad(
                "events.sasl_mechanism",
                format!("{:?} is not PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", events.sasl_mechanism),
            );
        }
        if !events.sasl_mechanism.is_empty() && events.sasl_username.is_empty() {
            return bad("events.sasl_username", "SASL needs a user".into());
        }
        if events.tls_cert_file.is_empty() != events.tls_key_file.is_empty() {
            return bad("events.tls_cert_file", "events.tls_cert_file and events.tls_key_file go together".into());
        }
        if !events.tls_cert_file.is_empty() && events.tls_ca_file.is_empty() {
            return bad("events.tls_ca_file", "a client certificate needs the brokers' CA".into());
        }
        if gateway.tls_cert_file.is_empty() != gateway.tls_key_file.is_empty() {
            return bad("gateway.tls_cert_file", "gateway.tls_cert_file and gateway.tls_key_file go together".into());
        }
        if gateway.rate_limit_per_sec > 0 && gateway.rate_limit_burst == 0 {
            return bad("gateway.rate_limit_burst", "must be at least 1 when a rate limit is set".into());
        }
        let jwt = &gateway.jwt;
        let policy_ok = |p: &str| matches!(p, "public" | "authenticated");
        if !policy_ok(&jwt.default_policy) {
            return bad(
                "gateway.jwt.default_policy",
                format!("{:?} is neither public nor authenticated", jwt.default_policy),
            );
        }
        for (i, rule) in jwt.rules.iter().enumerate() {
            if !policy_ok(&rule.policy) {
                return bad(
                    &format!("gateway.jwt.rules[{i}].policy"),
                    format!("{:?} is neither public nor authenticated", rule.policy),
                );
            }
            if rule.methods.is_empty() {
                return bad(&format!("gateway.jwt.rules[{i}].methods"), "must name at least one method".into());
            }
            if let Some(m) = rule.methods.iter().find(|m| m.as_str() != "*" && !m.contains('/')) {
                return bad(
                    &format!("gateway.jwt.rules[{i}].methods"),
                    format!("{m:?} is not package.Service/Method, package.Service/* or *"),
                );
            }
            if rule.policy == "public" && !rule.roles.is_empty() {
                return bad(&format!("gateway.jwt.rules[{i}].roles"), "a public rule cannot require roles".into());
            }
        }
        let needs_tokens =
            jwt.default_policy == "authenticated" || jwt.rules.iter().any(|r| r.policy == "authenticated");
        if needs_tokens && jwt.hs256_secret.is_empty() && jwt.jwks_file.is_empty() {
            return bad("gateway.jwt", "a policy requires tokens but neither hs256_secret nor jwks_file is set".into());
        }
        Ok(())
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
            advertise: String::new(),
            drain_delay_ms: 300,
            drain_timeout_ms: 10_000,
            fault_delay_ms: 0,
        }
    }
}

impl Default for AdminSettings {
    fn default() -> Self {
        Self { enabled: true, listen: "127.0.0.1:0".into() }
    }
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

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self { url: String::new(), max_connections: 8 }
    }
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            brokers: vec!["127.0.0.1:9092".into()],
            partitions: 6,
            replication_factor: 1,
            request_timeout_ms: 5_000,
            relay_batch: 500,
            relay_poll_ms: 100,
            outbox_retention_secs: 3_600,
            max_attempts: 3,
            fetch_max_bytes: 1 << 20,
            fetch_max_wait_ms: 100,
            dead_letter_suffix: ".dlq".into(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            sasl_mechanism: String::new(),
            sasl_username: String::new(),
            sasl_password: String::new(),
        }
    }
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            workers: 0,
            descriptor_sets: Vec::new(),
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

impl Default for LogSettings {
    fn default() -> Self {
        Self { filter: "info".into(), format: "text".into() }
    }
}

impl GovernanceSettings {
    /// Checks every rule; the error names it (`governance.methods."…".qps`).
    pub fn validate(&self) -> Result<()> {
        let bad = |setting: String, problem: String| Err(Error::Config(format!("{setting}: {problem}")));
        for (pattern, rule) in &self.methods {
            let at = |field: &str| format!("governance.methods.{pattern:?}.{field}");
            let shape_ok = pattern == "*"
                || (pattern.starts_with('/')
                    && pattern[1..].split_once('/').is_some_and(|(s, m)| !s.is_empty() && !m.is_empty()));
            if !shape_ok {
                return bad(
                    format!("governance.methods.{pattern:?}"),
                    "the key must be /pkg.Service/Method, /pkg.Service/* or *".into(),
                );
            }
            for (field, value) in [("qps", rule.qps), ("caller_qps", rule.caller_qps)] {
                if !(0.0..=1e7).contains(&value) {
                    return bad(at(field), format!("{value} is outside 0..=10000000"));
                }
            }
            if rule.caller_qps > 0.0 && rule.caller_key.trim().is_empty() {
                return bad(at("caller_key"), "must name a metadata key when caller_qps is set".into());
            }
            if rule.caller_key.chars().any(|c| c.is_ascii_uppercase() || c.is_whitespace()) {
                return bad(at("caller_key"), format!("{:?} is not a lower-case metadata key", rule.caller_key));
            }
            if rule.timeout_ms > 3_600_000 {
                return bad(at("timeout_ms"), format!("{} is above an hour", rule.timeout_ms));
            }
            let b = &rule.breaker;
            for (field, value) in [("breaker.error_ratio", b.error_ratio), ("breaker.slow_ratio", b.slow_ratio)] {
                if !(0.0..=1.0).contains(&value) {
                    return bad(at(field), format!("{value} is outside 0..=1"));
                }
            }
            if b.enabled && b.error_ratio == 0.0 && b.slow_ratio == 0.0 {
                return bad(at("breaker"), "an enabled breaker needs error_ratio or slow_ratio above 0".into());
            }
            if b.enabled && (b.window_ms < 100 || b.open_ms == 0 || b.probes == 0) {
                return bad(at("breaker"), "window_ms must be at least 100, open_ms and probes at least 1".into());
            }
        }
        let s = &self.shedding;
        if !(0.0..=1.0).contains(&s.cpu_threshold) {
            return bad("governance.shedding.cpu_threshold".into(), format!("{} is outside 0..=1", s.cpu_threshold));
        }
        if s.buckets == 0 || s.window_ms < u64::from(s.buckets) {
            return bad(
                "governance.shedding".into(),
                "buckets must be at least 1 and window_ms at least 1 ms per bucket".into(),
            );
        }
        let th = &self.throttling;
        if !(th.k >= 1.0 && th.k <= 100.0) || th.window_ms < 100 {
            return bad("governance.throttling".into(), "k must be within 1..=100 and window_ms at least 100".into());
        }
        for (service, r) in &self.retry {
            if r.max_attempts == 0 || r.max_attempts > 10 || !(0.0..=1.0).contains(&r.budget_percent) {
                return bad(
                    format!("governance.retry.{service:?}"),
                    "max_attempts must be within 1..=10 and budget_percent within 0..=1".into(),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_then_file_then_env() {
        let dir = tempfile_dir();
        let file = dir.join("mesh.toml");
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
        assert_eq!(c.database.url, "sqlite://user.db?mode=rwc");
    }

    #[test]
    fn database_url_from_standard_variable() {
        let c = MeshConfig::load("user", &env(&[("DATABASE_URL", "postgres://u@h/db")])).unwrap();
        assert_eq!(c.database.url, "postgres://u@h/db");
    }

    #[test]
    fn errors_name_the_setting() {
        let err = MeshConfig::load("user", &env(&[("MESHKIT_REGISTRY_TTL_SECS", "ten")])).unwrap_err();
        assert!(err.to_string().contains("MESHKIT_REGISTRY_TTL_SECS"), "{err}");
        let err = MeshConfig::load("user", &env(&[("MESHKIT_REGISTRY_TTL_SECS", "1")])).unwrap_err();
        assert!(err.to_string().contains("registry.ttl_secs"), "{err}");
        let err = MeshConfig::load("user", &env(&[("MESHKIT_SERVER_LISTEN", "nowhere")])).unwrap_err();
        assert!(err.to_string().contains("server.listen"), "{err}");
        let err = MeshConfig::load("user", &env(&[("MESHKIT_DATABASE_URL", "mysql://x")])).unwrap_err();
        assert!(err.to_string().contains("database.url"), "{err}");
    }

    #[test]
    fn file_errors_name_the_key() {
        let dir = tempfile_dir();
        let file = dir.join("bad.toml");
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
        let file = dir.join("governance.toml");
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
        c.events.sasl_mechanism = "PLAIN".into();
        c.events.sasl_username = "order".into();
        c.events.sasl_password = "kafka-pass-456".into();
        c.gateway.jwt.hs256_secret = "jwt-secret-789".into();
        let shown = format!("{c:?} {c:#?}");
        for secret in ["etcd-pass-123", "kafka-pass-456", "jwt-secret-789"] {
            assert!(!shown.contains(secret), "{secret} leaked");
        }
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
            ("[events]\nsasl_mechanism = \"GSSAPI\"\n", "events.sasl_mechanism"),
            ("[events]\nsasl_mechanism = \"PLAIN\"\n", "events.sasl_username"),
            ("[gateway]\ntls_cert_file = \"c\"\n", "gateway.tls_cert_file"),
        ] {
            let dir = tempfile_dir();
            let file = dir.join("security.toml");
            std::fs::write(&file, toml).unwrap();
            let err = MeshConfig::load("user", &env(&[("MESHKIT_CONFIG", file.to_str().unwrap())])).unwrap_err();
            assert!(err.to_string().contains(expect), "{toml}: {err}");
        }
    }

    #[test]
    fn jobs_load_from_a_file_and_bad_ones_are_named() {
        let dir = tempfile_dir();
        let file = dir.join("scheduler.toml");
        std::fs::write(
            &file,
            "[scheduler.jobs.cancel-unpaid]\ncron = \"0 */5 * * * *\"\ntime_zone = \"Asia/Shanghai\"\n\
             target = \"order\"\nhandler = \"cancel-unpaid-orders\"\n",
        )
        .unwrap();
        let c = MeshConfig::load("scheduler", &env(&[("MESHKIT_CONFIG", file.to_str().unwrap())])).unwrap();
        let job = &c.scheduler.jobs["cancel-unpaid"];
        assert_eq!((job.route.as_str(), job.overlap.as_str(), job.misfire.as_str()), ("round_robin", "serial", "skip"));
        let base = "target = \"order\"\nhandler = \"h\"\n";
        for (fields, expect) in [
            ("", "scheduler.jobs.j.cron: set cron or every_ms"),
            ("cron = \"0 * * * * *\"\nevery_ms = 1000\n", "scheduler.jobs.j.cron: set cron or every_ms"),
            ("every_ms = 1000\nroute = \"nearest\"\n", "scheduler.jobs.j.route: \"nearest\" is not one of"),
            ("every_ms = 1000\nshards = 3\n", "only a sharding_broadcast job has shards"),
            ("every_ms = 1000\nmisfire = \"all\"\n", "scheduler.jobs.j.misfire"),
            ("every_ms = 1000\novrelap = \"skip\"\n", "unknown field `ovrelap`"),
        ] {
            std::fs::write(&file, format!("[scheduler.jobs.j]\n{base}{fields}")).unwrap();
            let err = MeshConfig::load("scheduler", &env(&[("MESHKIT_CONFIG", file.to_str().unwrap())])).unwrap_err();
            assert!(err.to_string().contains(expect), "{fields}: {err}");
        }
        std::fs::write(&file, "[scheduler.jobs.j]\nevery_ms = 1000\nhandler = \"h\"\n").unwrap();
        let err = MeshConfig::load("scheduler", &env(&[("MESHKIT_CONFIG", file.to_str().unwrap())])).unwrap_err();
        assert!(err.to_string().contains("scheduler.jobs.j.target"), "{err}");
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("meshkit-config-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
