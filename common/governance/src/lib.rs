//! Governance: flow control, circuit breaking, adaptive throttling, load
//! shedding and per-method timeouts, as tower layers on both sides of a call,
//! with rules from [`GovernanceSettings`] (hot-reloaded from the config
//! center when given a watch).
//!
//! Serving side ([`GovernanceLayer`], in every [`crate::MeshServer`]): load
//! shedding, then the most specific rule of the method: `qps` (token bucket
//! with `burst`), `caller_qps` (one bucket per value of the `caller_key`
//! metadata), `concurrency`, `timeout_ms` (a deadline the handler and its
//! downstream calls inherit). A refused call gets RESOURCE_EXHAUSTED naming
//! the limit, with a `grpc-retry-pushback-ms` hint.
//!
//! Calling side (every [`crate::BalancedChannel`] built by a
//! [`crate::ChannelBuilder`] that has it): adaptive throttling per service,
//! then a breaker per (service, method) when the method's rule enables one,
//! and the rule's `timeout_ms`. An open breaker answers UNAVAILABLE naming
//! itself, without a network call. Per endpoint, the pool's ejection is the
//! breaker (consecutive failures open it for a growing backoff, then a probe).
//!
//! Every refusal is counted (`meshkit_governance_rejections_total`) and shown
//! with the rules, breakers and shedder in the admin endpoint's `/reports`
//! (`governance`), which `meshctl governance` prints.

pub mod breaker;
pub mod settings;
pub mod shed;
pub mod throttle;

use std::{
    collections::{BTreeMap, HashMap},
    num::NonZeroU32,
    pin::Pin,
    sync::{
        Arc, LazyLock, Mutex, RwLock,
        atomic::{AtomicU8, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};
use http::HeaderValue;
use serde::Serialize;
use tokio::sync::{Semaphore, watch};
use tonic::body::Body;
use tower::{Layer, Service};

use meshkit_base::methods::{MethodMap, MethodPattern};
use meshkit_telemetry::metrics::{self, CounterFamily, Scrape};
use prometheus_client::encoding::EncodeLabelSet;

use crate::settings::MethodRule;
pub use breaker::Breaker;
pub use settings::GovernanceSettings;
pub use shed::Shedder;
pub use throttle::Throttle;

/// The header a refusal carries: how long to wait before trying again.
pub const PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";

/// One method rule with its limiters.
struct ServerRule {
    pattern: String,
    rule: MethodRule,
    qps: Option<DefaultDirectRateLimiter>,
    caller: Option<CallerLimit>,
    concurrency: Option<Arc<Semaphore>>,
    /// `timeout_ms` and its `grpc-timeout` value, formatted once: the same
    /// value on every call stays one byte in HPACK's header table.
    timeout: Option<(Duration, HeaderValue)>,
}

fn quota(per_sec: f64, burst: u32) -> Option<Quota> {
    if per_sec <= 0.0 {
        return None;
    }
    let burst = NonZeroU32::new(if burst == 0 { per_sec.ceil() as u32 } else { burst })?;
    let period = Duration::from_secs_f64(1.0 / per_sec);
    Quota::with_period(period).map(|q| q.allow_burst(burst))
}

impl ServerRule {
    fn new(pattern: &str, rule: &MethodRule) -> Self {
        Self {
            pattern: pattern.to_owned(),
            qps: quota(rule.qps, rule.burst).map(RateLimiter::direct),
            caller: quota(rule.caller_qps, rule.caller_burst).map(|quota| CallerLimit {
                // Validated settings hold a header name here.
                key: http::HeaderName::from_bytes(rule.caller_key.as_bytes()).ok(),
                hasher: std::hash::RandomState::new(),
                limiter: RateLimiter::keyed(quota),
                calls: AtomicU64::new(0),
            }),
            concurrency: (rule.concurrency > 0).then(|| Arc::new(Semaphore::new(rule.concurrency as usize))),
            timeout: (rule.timeout_ms > 0).then(|| {
                let limit = Duration::from_millis(rule.timeout_ms);
                (limit, meshkit_base::deadline::format_grpc_timeout(limit))
            }),
            rule: rule.clone(),
        }
    }
}

/// `caller_qps`: one bucket per caller. Callers are keyed by a hash of the
/// metadata value (random keys per process, so no caller can aim at
/// another's bucket), and the buckets of callers gone quiet are dropped now
/// and then, so made-up caller names cannot grow the map without end.
struct CallerLimit {
    key: Option<http::HeaderName>,
    hasher: std::hash::RandomState,
    limiter: DefaultKeyedRateLimiter<u64>,
    calls: AtomicU64,
}

/// Calls between two sweeps of quiet callers' buckets.
const CALLER_SWEEP: u64 = 1 << 16;

impl CallerLimit {
    fn check(&self, caller: &[u8]) -> Result<(), governor::NotUntil<governor::clock::QuantaInstant>> {
        use std::hash::BuildHasher;
        if self.calls.fetch_add(1, Ordering::Relaxed) % CALLER_SWEEP == CALLER_SWEEP - 1 {
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        self.limiter.check_key(&self.hasher.hash_one(caller))
    }
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The rules in force, compiled.
struct Compiled {
    settings: GovernanceSettings,
    rules: MethodMap<Arc<ServerRule>>,
    shedder: Option<Arc<Shedder>>,
    /// Calling side, created on first use: service → method → breaker.
    /// Looked up on every call, so with a fast hash: the keys are the
    /// process's own services and bounded paths.
    breakers: Mutex<FastMap<String, FastMap<String, Arc<Breaker>>>>,
    throttles: Mutex<FastMap<String, Arc<Throttle>>>,
    splits: HashMap<String, Arc<VersionSplit>>,
}

/// A called service's traffic split: version groups and their percents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionSplit {
    /// `(version, percent)`, by version; the percents add up to 100.
    pub groups: Vec<(Arc<str>, u32)>,
}

impl VersionSplit {
    /// `spring-1=90 0.1.0=10`.
    pub fn describe(&self) -> String {
        let shares: Vec<String> = self.groups.iter().map(|(v, p)| format!("{v}={p}")).collect();
        shares.join(" ")
    }
}

impl Compiled {
    fn new(settings: GovernanceSettings) -> Self {
        let mut rules = MethodMap::default();
        for (pattern, rule) in &settings.methods {
            // Validated settings only hold patterns that parse.
            if let Ok(p) = MethodPattern::parse(pattern) {
                rules.insert(&p, Arc::new(ServerRule::new(pattern, rule)));
            }
        }
        let shedder = settings.shedding.enabled.then(|| Arc::new(Shedder::new(settings.shedding.clone())));
        let splits = settings
            .split
            .iter()
            .map(|(service, versions)| {
                let groups = versions.iter().map(|(v, p)| (Arc::from(v.as_str()), *p)).collect();
                (service.clone(), Arc::new(VersionSplit { groups }))
            })
            .collect();
        Self { settings, rules, shedder, breakers: Mutex::default(), throttles: Mutex::default(), splits }
    }

    /// The most specific rule for `/pkg.Service/Method`.
    fn rule(&self, path: &str) -> Option<&Arc<ServerRule>> {
        self.rules.get(path)
    }

    fn breaker(&self, service: &str, path: &str, rule: &MethodRule) -> Arc<Breaker> {
        let mut breakers = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = breakers.get(service).and_then(|m| m.get(path)) {
            return b.clone();
        }
        // Bounded like the metrics: made-up paths share one breaker.
        let total: usize = breakers.values().map(FastMap::len).sum();
        let key = if total >= 1_000 { "other" } else { path };
        let methods = breakers.entry(service.to_owned()).or_default();
        methods.entry(key.to_owned()).or_insert_with(|| Arc::new(Breaker::new(rule.breaker.clone()))).clone()
    }

    fn throttle(&self, service: &str) -> Arc<Throttle> {
        let mut throttles = self.throttles.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = throttles.get(service) {
            return t.clone();
        }
        throttles
            .entry(service.to_owned())
            .or_insert_with(|| Arc::new(Throttle::new(&self.settings.throttling)))
            .clone()
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectionLabels {
    side: String,
    target: String,
    rule: String,
}

/// `meshkit_governance_rejections_total{side, target, rule}`.
static REJECTIONS: LazyLock<CounterFamily<RejectionLabels>> = LazyLock::new(|| {
    metrics::counters(
        "meshkit_governance_rejections",
        "Calls refused by governance, by side (server, client), rule pattern or service, and rule.",
    )
});

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    service: String,
    method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

/// A process's governance: the compiled rules, swapped when they change.
pub struct Governance {
    compiled: RwLock<Arc<Compiled>>,
    rejections: Mutex<BTreeMap<(String, String, String), u64>>,
    /// Bumped whenever the rules are replaced, so a balanced channel checks
    /// its split with one atomic read per call.
    generation: AtomicU64,
    /// What the rules in force leave nothing to do for ([`IDLE_SERVING`],
    /// [`IDLE_CALLING`]): a process without rules pays one atomic read per
    /// call, not a snapshot and a lookup.
    idle: AtomicU8,
}

/// No shedding and no method rule: nothing to check on a call served.
const IDLE_SERVING: u8 = 1;
/// No throttling and no method rule: nothing to check on a call made.
const IDLE_CALLING: u8 = 2;

impl Compiled {
    fn idle(&self) -> u8 {
        let mut idle = 0;
        if self.rules.is_empty() {
            if self.shedder.is_none() {
                idle |= IDLE_SERVING;
            }
            if !self.settings.throttling.enabled {
                idle |= IDLE_CALLING;
            }
        }
        idle
    }
}

impl std::fmt::Debug for Governance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Governance").field("settings", &self.snapshot().settings).finish()
    }
}

impl Governance {
    /// Fixed rules.
    pub fn new(settings: GovernanceSettings) -> Arc<Self> {
        let compiled = Compiled::new(settings);
        Arc::new(Self {
            idle: AtomicU8::new(compiled.idle()),
            compiled: RwLock::new(Arc::new(compiled)),
            rejections: Mutex::default(),
            generation: AtomicU64::new(1),
        })
    }

    /// Rules that follow `settings` (from [`meshkit_registry::config_center::ConfigCenter::section`]):
    /// each change is compiled and swapped in; limiter and breaker state start afresh.
    pub fn watching(mut settings: watch::Receiver<GovernanceSettings>) -> Arc<Self> {
        let governance = Self::new(settings.borrow_and_update().clone());
        let weak = Arc::downgrade(&governance);
        tokio::spawn(async move {
            while settings.changed().await.is_ok() {
                let Some(governance) = weak.upgrade() else { return };
                let next = settings.borrow_and_update().clone();
                tracing::info!(
                    rules = next.methods.len(),
                    shedding = next.shedding.enabled,
                    "governance rules changed"
                );
                governance.replace(next);
            }
        });
        governance
    }

    /// Swaps in new rules.
    pub fn replace(&self, settings: GovernanceSettings) {
        let compiled = Arc::new(Compiled::new(settings));
        let idle = compiled.idle();
        {
            let mut slot = self.compiled.write().unwrap_or_else(|p| p.into_inner());
            *slot = compiled;
            // Under the lock: a reader that sees this also sees the rules.
            self.idle.store(idle, Ordering::Release);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Changes with every replacement of the rules (never 0).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The traffic split of calls to `service`, if one is set.
    pub fn split(&self, service: &str) -> Option<Arc<VersionSplit>> {
        self.snapshot().splits.get(service).cloned()
    }

    fn is_idle(&self, side: u8) -> bool {
        self.idle.load(Ordering::Acquire) & side != 0
    }

    fn snapshot(&self) -> Arc<Compiled> {
        self.compiled.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The settings in force.
    pub fn settings(&self) -> GovernanceSettings {
        self.snapshot().settings.clone()
    }

    fn count(&self, side: &str, what: &str, rule: &str) {
        REJECTIONS
            .get_or_create(&RejectionLabels { side: side.to_owned(), target: what.to_owned(), rule: rule.to_owned() })
            .inc();
        let mut map = self.rejections.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry((side.to_owned(), what.to_owned(), rule.to_owned())).or_default() += 1;
    }

    /// What `/reports` and `meshctl governance` show.
    pub fn report(&self) -> Report {
        let compiled = self.snapshot();
        let breakers = compiled
            .breakers
            .lock()
            .map(|m| {
                m.iter()
                    .flat_map(|(service, methods)| {
                        methods.iter().map(move |(method, b)| BreakerReport {
                            service: service.clone(),
                            method: method.clone(),
                            state: b.state().as_str(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let throttling = compiled
            .throttles
            .lock()
            .map(|m| m.iter().map(|(s, t)| (s.clone(), t.reject_probability())).collect())
            .unwrap_or_default();
        let shedding = compiled.shedder.as_ref().map(|s| SheddingReport {
            in_flight: s.in_flight(),
            capacity: s.capacity(),
            cpu: shed::cpu_usage(),
            shed: s.refused.load(std::sync::atomic::Ordering::Relaxed),
        });
        let rejections = self
            .rejections
            .lock()
            .map(|m| {
                m.iter()
                    .map(|((side, target, rule), n)| RejectionReport {
                        side: side.clone(),
                        target: target.clone(),
                        rule: rule.clone(),
                        count: *n,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Report { rules: compiled.settings.clone(), breakers, throttling, shedding, rejections }
    }

    /// The `/metrics` families of governance state: each breaker's state,
    /// throttling probability per service, the shedder's in-flight calls and
    /// capacity (refusals are the `meshkit_governance_rejections_total` counter).
    pub fn metrics_source(self: &Arc<Self>) -> metrics::Source {
        let weak = Arc::downgrade(self);
        metrics::source(move || {
            let report = weak.upgrade().map(|g| g.report());
            async move {
                let mut scrape = Scrape::default();
                let Some(report) = report else { return scrape };
                let breakers = scrape.gauges::<BreakerLabels>(
                    "meshkit_breaker_state",
                    "Circuit breaker per called (service, method): 0 closed, 1 open, 2 half-open.",
                );
                for b in &report.breakers {
                    let state = match b.state {
                        "closed" => 0.0,
                        "open" => 1.0,
                        _ => 2.0,
                    };
                    breakers
                        .get_or_create(&BreakerLabels { service: b.service.clone(), method: b.method.clone() })
                        .set(state);
                }
                let throttling = scrape.gauges::<ServiceLabels>(
                    "meshkit_throttling_reject_probability",
                    "Adaptive throttling: the probability a call to the service is refused locally now.",
                );
                for (service, p) in &report.throttling {
                    throttling.get_or_create(&ServiceLabels { service: service.clone() }).set(*p);
                }
                if let Some(s) = &report.shedding {
                    scrape
                        .gauge("meshkit_shedding_in_flight", "Calls in flight, as load shedding counts them.")
                        .set(s.in_flight as f64);
                    scrape
                        .gauge(
                            "meshkit_shedding_capacity",
                            "Calls the process can have in flight at its current latency (max completions x min latency).",
                        )
                        .set(s.capacity.unwrap_or(0) as f64);
                    scrape
                        .gauge(
                            "meshkit_process_cpu_usage",
                            "The process's CPU use as a share of its cores (load shedding's input).",
                        )
                        .set(s.cpu);
                }
                scrape
            }
        })
    }

    // === the calling side ===

    /// Checks a call about to go to `service`; on success, the guard to
    /// finish with the call's outcome. Sets the rule's deadline on `headers`.
    pub fn before_call(
        self: &Arc<Self>,
        service: &str,
        path: &str,
        headers: &mut http::HeaderMap,
    ) -> Result<Option<CallGuard>, tonic::Status> {
        if self.is_idle(IDLE_CALLING) {
            return Ok(None);
        }
        let compiled = self.snapshot();
        let rule = compiled.rule(path);
        if let Some((limit, value)) = rule.and_then(|r| r.timeout.as_ref()) {
            meshkit_base::deadline::cap_grpc_timeout(headers, *limit, value);
        }
        let breaker_rule = rule.map(|r| &r.rule).filter(|r| r.breaker.enabled);
        let throttling = compiled.settings.throttling.enabled;
        if !throttling && breaker_rule.is_none() {
            return Ok(None);
        }
        // One reading of the clock for the throttle, the breaker and the guard.
        let now = Instant::now();
        let throttle = throttling.then(|| compiled.throttle(service));
        if let Some(throttle) = &throttle {
            if let Some(p) = throttle.refuse_at(rand::random::<f64>(), now) {
                throttle.record_at(false, now);
                self.count("client", service, "throttling");
                return Err(tonic::Status::unavailable(format!(
                    "adaptive throttling of {service}: refused locally (probability {p:.2}) while it turns calls away"
                )));
            }
        }
        let breaker = match breaker_rule.map(|r| compiled.breaker(service, path, r)) {
            Some(b) => match b.acquire_at(now) {
                Ok(permit) => Some((b, permit)),
                Err(refused) => {
                    self.count("client", service, "breaker");
                    return Err(tonic::Status::unavailable(format!(
                        "circuit breaker on {path} is open ({}); retry in {} ms",
                        refused.reason,
                        refused.retry_in.as_millis().max(1)
                    )));
                }
            },
            None => None,
        };
        Ok(Some(CallGuard { throttle, breaker, started: now }))
    }

    // === the serving side ===

    /// Admits a call served, or refuses it with the status to answer.
    fn admit(&self, path: &str, headers: &mut http::HeaderMap) -> Result<Admitted, Refusal> {
        let compiled = self.snapshot();
        let in_flight = match &compiled.shedder {
            Some(shedder) => match shedder.admit(shed::cpu_usage()) {
                Ok(guard) => Some(guard),
                Err(shed) => {
                    self.count("server", path_or_other(&compiled, path), "shedding");
                    return Err(Refusal {
                        status: tonic::Status::resource_exhausted(format!(
                            "overloaded: {} calls in flight exceed the {} this process serves at its current latency (CPU {:.0}%); load shed",
                            shed.in_flight,
                            shed.capacity,
                            shed.cpu * 100.0
                        )),
                        pushback: Duration::from_millis(100),
                    });
                }
            },
            None => None,
        };
        let Some(rule) = compiled.rule(path) else {
            return Ok(Admitted { _in_flight: in_flight, _permit: None, timeout: None });
        };
        // The limiters' own clock: building one (`DefaultClock::default()`)
        // calibrates a new TSC clock, about 15 µs, and must not happen per call.
        if let Some(limiter) = &rule.qps {
            if let Err(not_until) = limiter.check() {
                self.count("server", &rule.pattern, "qps");
                return Err(Refusal {
                    status: tonic::Status::resource_exhausted(format!(
                        "rate limit of {}/s on {path} exceeded (rule {:?})",
                        rule.rule.qps, rule.pattern
                    )),
                    pushback: not_until.wait_time_from(limiter.clock().now()),
                });
            }
        }
        if let Some(limit) = &rule.caller {
            let caller = limit.key.as_ref().and_then(|k| headers.get(k)).map_or(&b""[..], |v| v.as_bytes());
            if let Err(not_until) = limit.check(caller) {
                self.count("server", &rule.pattern, "caller_qps");
                return Err(Refusal {
                    status: tonic::Status::resource_exhausted(format!(
                        "rate limit of {}/s per caller on {path} exceeded by {:?} ({})",
                        rule.rule.caller_qps,
                        String::from_utf8_lossy(caller),
                        rule.rule.caller_key
                    )),
                    pushback: not_until.wait_time_from(limit.limiter.clock().now()),
                });
            }
        }
        let permit = match &rule.concurrency {
            Some(semaphore) => match semaphore.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    self.count("server", &rule.pattern, "concurrency");
                    return Err(Refusal {
                        status: tonic::Status::resource_exhausted(format!(
                            "concurrency limit of {} calls on {path} reached (rule {:?})",
                            rule.rule.concurrency, rule.pattern
                        )),
                        pushback: Duration::from_millis(10),
                    });
                }
            },
            None => None,
        };
        // The handler and its downstream calls see the deadline (grpc-timeout
        // → the task's deadline); this layer enforces it when it is the
        // rule's. A caller's sooner deadline is already enforced by the
        // server's own grpc-timeout timer, outside this layer: no second
        // timer for it.
        let timeout = rule
            .timeout
            .as_ref()
            .filter(|(limit, value)| meshkit_base::deadline::cap_grpc_timeout(headers, *limit, value))
            .map(|t| t.0);
        Ok(Admitted { _in_flight: in_flight, _permit: permit, timeout })
    }
}

fn path_or_other<'a>(compiled: &'a Compiled, path: &str) -> &'a str {
    compiled.rule(path).map_or("*", |r| r.pattern.as_str())
}

/// Server codes a breaker or throttle counts as the backend failing.
pub fn is_failure(code: tonic::Code) -> bool {
    use tonic::Code::*;
    matches!(code, Unknown | DeadlineExceeded | Internal | Unavailable | DataLoss | ResourceExhausted)
}

/// A call let through on the calling side: report its outcome.
pub struct CallGuard {
    throttle: Option<Arc<Throttle>>,
    breaker: Option<(Arc<Breaker>, breaker::Permit)>,
    started: Instant,
}

impl CallGuard {
    pub fn finish(self, code: tonic::Code) {
        self.finish_at(code, Instant::now());
    }

    /// [`Self::finish`] with the caller's reading of the clock at the call's end.
    pub fn finish_at(self, code: tonic::Code, now: Instant) {
        if let Some(throttle) = &self.throttle {
            throttle.record_at(!matches!(code, tonic::Code::Unavailable | tonic::Code::ResourceExhausted), now);
        }
        if let Some((breaker, permit)) = self.breaker {
            breaker.record_at(permit, is_failure(code), now.saturating_duration_since(self.started), now);
        }
    }
}

/// Held until the call's response is ready: the shedder's in-flight count
/// and the concurrency permit.
struct Admitted {
    _in_flight: Option<shed::InFlight>,
    _permit: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The rule's deadline, enforced here.
    timeout: Option<Duration>,
}

struct Refusal {
    status: tonic::Status,
    pushback: Duration,
}

/// `/reports` → `governance`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub rules: GovernanceSettings,
    pub breakers: Vec<BreakerReport>,
    /// Service → the current probability of refusing a call locally.
    pub throttling: BTreeMap<String, f64>,
    pub shedding: Option<SheddingReport>,
    pub rejections: Vec<RejectionReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BreakerReport {
    pub service: String,
    pub method: String,
    pub state: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct SheddingReport {
    pub in_flight: i64,
    pub capacity: Option<u64>,
    pub cpu: f64,
    pub shed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RejectionReport {
    pub side: String,
    pub target: String,
    pub rule: String,
    pub count: u64,
}

/// The serving-side layer.
#[derive(Clone)]
pub struct GovernanceLayer(pub Arc<Governance>);

impl<S> Layer<S> for GovernanceLayer {
    type Service = GovernanceService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GovernanceService { inner, governance: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct GovernanceService<S> {
    inner: S,
    governance: Arc<Governance>,
}

impl<S, B> Service<http::Request<B>> for GovernanceService<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = GovernedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if self.governance.is_idle(IDLE_SERVING) {
            return GovernedFuture { state: Governed::Passed { fut: self.inner.call(req) } };
        }
        let (mut parts, body) = req.into_parts();
        let state = match self.governance.admit(parts.uri.path(), &mut parts.headers) {
            Err(refusal) => {
                let mut res = refusal.status.into_http::<Body>();
                let ms = refusal.pushback.as_millis().max(1).to_string();
                if let Ok(v) = HeaderValue::from_str(&ms) {
                    res.headers_mut().insert(PUSHBACK_HEADER, v);
                }
                Governed::Refused { res: Some(res) }
            }
            Ok(admitted) => match admitted.timeout {
                None => {
                    let fut = self.inner.call(http::Request::from_parts(parts, body));
                    Governed::Admitted { fut, admitted: Some(admitted) }
                }
                Some(limit) => {
                    // The path, for the message should the rule's time run out.
                    let uri = parts.uri.clone();
                    let fut = tokio::time::timeout(limit, self.inner.call(http::Request::from_parts(parts, body)));
                    Governed::Timed { fut, admitted: Some(admitted), uri, limit }
                }
            },
        };
        GovernedFuture { state }
    }
}

pin_project_lite::pin_project! {
    /// A call through the serving layer: passed on (no rule), admitted
    /// (holding its in-flight count and permit until the response), bounded
    /// by the rule's timeout, or refused.
    pub struct GovernedFuture<F> {
        #[pin]
        state: Governed<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = GovernedProj]
    enum Governed<F> {
        Passed { #[pin] fut: F },
        Admitted { #[pin] fut: F, admitted: Option<Admitted> },
        Timed { #[pin] fut: tokio::time::Timeout<F>, admitted: Option<Admitted>, uri: http::Uri, limit: Duration },
        Refused { res: Option<http::Response<Body>> },
    }
}

impl<F, E> std::future::Future for GovernedFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            GovernedProj::Passed { fut } => fut.poll(cx),
            GovernedProj::Admitted { fut, admitted } => {
                let res = std::task::ready!(fut.poll(cx));
                admitted.take();
                Poll::Ready(res)
            }
            GovernedProj::Timed { fut, admitted, uri, limit } => {
                let res = std::task::ready!(fut.poll(cx));
                admitted.take();
                Poll::Ready(res.unwrap_or_else(|_| {
                    Ok(tonic::Status::deadline_exceeded(format!(
                        "{} did not finish within its {} ms timeout",
                        uri.path(),
                        limit.as_millis()
                    ))
                    .into_http())
                }))
            }
            GovernedProj::Refused { res } => Poll::Ready(Ok(res
                .take()
                .unwrap_or_else(|| tonic::Status::internal("a refused call was polled again").into_http()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn governance(rule: MethodRule) -> Arc<Governance> {
        let mut settings = GovernanceSettings::default();
        settings.methods.insert("/pkg.Svc/Call".into(), rule);
        Governance::new(settings)
    }

    fn headers(timeout: Option<&'static str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(t) = timeout {
            h.insert(meshkit_base::deadline::GRPC_TIMEOUT, HeaderValue::from_static(t));
        }
        h
    }

    #[test]
    fn a_rule_timeout_is_enforced_here_only_when_it_is_sooner_than_the_callers() {
        let g = governance(MethodRule { timeout_ms: 200, ..MethodRule::default() });
        // No deadline from the caller: the rule's is set and enforced here.
        let mut h = headers(None);
        let admitted = g.admit("/pkg.Svc/Call", &mut h).map_err(|r| r.status).unwrap();
        assert_eq!(admitted.timeout, Some(Duration::from_millis(200)));
        assert_eq!(
            h.get("grpc-timeout").and_then(meshkit_base::deadline::parse_grpc_timeout),
            Some(Duration::from_millis(200))
        );
        // A later deadline from the caller is shortened to the rule's.
        let mut h = headers(Some("5S"));
        let admitted = g.admit("/pkg.Svc/Call", &mut h).map_err(|r| r.status).unwrap();
        assert_eq!(admitted.timeout, Some(Duration::from_millis(200)));
        assert_eq!(
            h.get("grpc-timeout").and_then(meshkit_base::deadline::parse_grpc_timeout),
            Some(Duration::from_millis(200))
        );
        // A sooner one stands, enforced by the server's own grpc-timeout
        // timer: no second timer here.
        let mut h = headers(Some("50m"));
        let admitted = g.admit("/pkg.Svc/Call", &mut h).map_err(|r| r.status).unwrap();
        assert_eq!(admitted.timeout, None);
        assert_eq!(h.get("grpc-timeout").map(|v| v.to_str().unwrap()), Some("50m"));
    }

    #[test]
    fn a_rate_limit_refusal_says_when_to_come_back() {
        let g = governance(MethodRule { qps: 1.0, burst: 1, ..MethodRule::default() });
        assert!(g.admit("/pkg.Svc/Call", &mut headers(None)).is_ok());
        let refusal =
            g.admit("/pkg.Svc/Call", &mut headers(None)).err().expect("the second call in a second is refused");
        assert_eq!(refusal.status.code(), tonic::Code::ResourceExhausted);
        assert!(refusal.status.message().contains("rate limit of 1/s"), "{}", refusal.status.message());
        assert!(
            refusal.pushback > Duration::from_millis(500) && refusal.pushback <= Duration::from_secs(1),
            "{:?}",
            refusal.pushback
        );
    }

    #[test]
    fn each_caller_has_its_own_bucket_and_quiet_callers_are_swept() {
        let g = governance(MethodRule { caller_qps: 1.0, caller_burst: 1, ..MethodRule::default() });
        let from = |caller: &'static str| {
            let mut h = headers(None);
            h.insert("x-meshkit-caller", HeaderValue::from_static(caller));
            h
        };
        assert!(g.admit("/pkg.Svc/Call", &mut from("orders")).is_ok());
        let refusal = g.admit("/pkg.Svc/Call", &mut from("orders")).err().expect("orders' second call is refused");
        assert!(refusal.status.message().contains("exceeded by \"orders\""), "{}", refusal.status.message());
        assert!(g.admit("/pkg.Svc/Call", &mut from("billing")).is_ok(), "another caller has its own bucket");
        assert!(g.admit("/pkg.Svc/Call", &mut headers(None)).is_ok(), "no caller metadata is one caller too");
        // Made-up callers, a sweep's worth: once their buckets are full
        // again (1 ms at 1,000/s), the next sweep drops them.
        let g = governance(MethodRule { caller_qps: 1_000.0, caller_burst: 1, ..MethodRule::default() });
        let compiled = g.snapshot();
        let limit = compiled.rule("/pkg.Svc/Call").and_then(|r| r.caller.as_ref()).expect("a caller limit");
        for i in 0..CALLER_SWEEP / 2 {
            let _ = limit.check(format!("caller-{i}").as_bytes());
        }
        assert_eq!(limit.limiter.len(), CALLER_SWEEP as usize / 2);
        std::thread::sleep(Duration::from_millis(20));
        for _ in 0..CALLER_SWEEP / 2 {
            let _ = limit.check(b"steady");
        }
        assert!(limit.limiter.len() <= 1, "{} buckets kept", limit.limiter.len());
    }

    #[tokio::test]
    async fn the_serving_layer_passes_calls_through_until_a_rule_is_set_and_checks_them_after() {
        use tower::ServiceExt;
        let g = Governance::new(GovernanceSettings::default());
        let ok = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        });
        let svc = GovernanceLayer(g.clone()).layer(ok);
        let call = || http::Request::builder().uri("/pkg.Svc/Call").body(()).expect("a request");
        let status = |res: &http::Response<Body>| {
            res.headers().get("grpc-status").map(|v| v.to_str().unwrap_or_default().to_owned())
        };
        for _ in 0..3 {
            let res = svc.clone().oneshot(call()).await.expect("infallible");
            assert_eq!(status(&res), None, "refused with no rule set");
        }
        let mut settings = GovernanceSettings::default();
        settings.methods.insert("/pkg.Svc/Call".into(), MethodRule { qps: 1.0, burst: 1, ..MethodRule::default() });
        g.replace(settings);
        assert_eq!(status(&svc.clone().oneshot(call()).await.expect("infallible")), None);
        let res = svc.clone().oneshot(call()).await.expect("infallible");
        assert_eq!(status(&res).as_deref(), Some("8"), "the rule set later was not applied");
        assert!(res.headers().contains_key(PUSHBACK_HEADER));
        // And back to none: nothing refused.
        g.replace(GovernanceSettings::default());
        assert_eq!(status(&svc.clone().oneshot(call()).await.expect("infallible")), None);
    }
}
