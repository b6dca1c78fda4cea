//! The `governance` section: rules by method, shedding, throttling, retries.

use meshkit_base::methods::MethodPattern;
use meshkit_config::{Result, Settings, bad};
use serde::{Deserialize, Serialize};

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
    /// Traffic split by version, by called service (`pkg.Service`): version →
    /// percent of the calls, summing to 100. Every balanced channel picks a
    /// version group by these weights, then p2c within it; xDS clients get the
    /// same as `weighted_clusters`. Versions not named get no calls while a
    /// named one has an instance. `meshctl split` writes it.
    pub split: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u32>>,
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

impl Settings for GovernanceSettings {
    /// Checks every rule; the error names it (`governance.methods."…".qps`).
    fn validate(&self) -> Result<()> {
        for (pattern, rule) in &self.methods {
            let at = |field: &str| format!("governance.methods.{pattern:?}.{field}");
            if let Err(problem) = MethodPattern::parse(pattern) {
                return bad(format!("governance.methods.{pattern:?}"), problem);
            }
            for (field, value) in [("qps", rule.qps), ("caller_qps", rule.caller_qps)] {
                if !(0.0..=1e7).contains(&value) {
                    return bad(at(field), format!("{value} is outside 0..=10000000"));
                }
            }
            if rule.caller_qps > 0.0 && rule.caller_key.trim().is_empty() {
                return bad(at("caller_key"), "must name a metadata key when caller_qps is set");
            }
            if rule.caller_key.chars().any(|c| c.is_ascii_uppercase() || c.is_whitespace())
                || http::HeaderName::from_bytes(rule.caller_key.as_bytes()).is_err()
            {
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
                return bad(at("breaker"), "an enabled breaker needs error_ratio or slow_ratio above 0");
            }
            if b.enabled && (b.window_ms < 100 || b.open_ms == 0 || b.probes == 0) {
                return bad(at("breaker"), "window_ms must be at least 100, open_ms and probes at least 1");
            }
        }
        let s = &self.shedding;
        if !(0.0..=1.0).contains(&s.cpu_threshold) {
            return bad("governance.shedding.cpu_threshold", format!("{} is outside 0..=1", s.cpu_threshold));
        }
        if s.buckets == 0 || s.window_ms < u64::from(s.buckets) {
            return bad("governance.shedding", "buckets must be at least 1 and window_ms at least 1 ms per bucket");
        }
        let th = &self.throttling;
        if !(th.k >= 1.0 && th.k <= 100.0) || th.window_ms < 100 {
            return bad("governance.throttling", "k must be within 1..=100 and window_ms at least 100");
        }
        for (service, r) in &self.retry {
            if r.max_attempts == 0 || r.max_attempts > 10 || !(0.0..=1.0).contains(&r.budget_percent) {
                return bad(
                    format!("governance.retry.{service:?}"),
                    "max_attempts must be within 1..=10 and budget_percent within 0..=1",
                );
            }
        }
        for (service, versions) in &self.split {
            validate_split(versions).or_else(|problem| bad(format!("governance.split.{service:?}"), problem))?;
        }
        Ok(())
    }
}

/// A split names at least one version, no blank one, and its percents add up to 100.
pub fn validate_split(versions: &std::collections::BTreeMap<String, u32>) -> std::result::Result<(), String> {
    if versions.is_empty() {
        return Err("names no version".into());
    }
    if let Some(blank) = versions.keys().find(|v| v.trim().is_empty() || v.trim() != v.as_str()) {
        return Err(format!("{blank:?} is not a version"));
    }
    let total: u64 = versions.values().map(|p| u64::from(*p)).sum();
    if total != 100 {
        let shares: Vec<String> = versions.iter().map(|(v, p)| format!("{v}={p}")).collect();
        return Err(format!("percents add up to {total}, not 100 ({})", shares.join(" ")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_split_must_add_up_to_100_and_name_real_versions() {
        let mut settings = GovernanceSettings::default();
        settings
            .split
            .insert("meshkit.user.v1.UserService".into(), [("spring-1".into(), 90), ("0.1.0".into(), 10)].into());
        settings.validate().expect("90 + 10");
        settings
            .split
            .insert("meshkit.user.v1.UserService".into(), [("spring-1".into(), 90), ("0.1.0".into(), 20)].into());
        let err = settings.validate().expect_err("110").to_string();
        assert!(err.contains("governance.split.\"meshkit.user.v1.UserService\"") && err.contains("110"), "{err}");
        settings.split.clear();
        settings.split.insert("s.S".into(), [(" ".into(), 100)].into());
        assert!(settings.validate().expect_err("blank").to_string().contains("is not a version"));
        settings.split.insert("s.S".into(), Default::default());
        assert!(settings.validate().expect_err("empty").to_string().contains("names no version"));
    }
}
