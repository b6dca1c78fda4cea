//! Retries that cannot duplicate work, within a budget and the caller's deadline.
//!
//! A call is tried again only when it never reached the application (the
//! connection was refused, the stream was refused or the request was never
//! sent, no instance was live) or when its method is marked idempotent in the
//! contracts (then also after a lost connection, a per-call UNAVAILABLE, or
//! an attempt that timed out). Retries draw on a budget of about 20% of
//! recent traffic plus a small floor per second, so a failing dependency is
//! not hit with three times its load. No attempt outlives the deadline: each
//! goes out with the time that is left as its `grpc-timeout`.

use std::{
    sync::{Arc, LazyLock},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use meshkit_telemetry::metrics::{self, CounterFamily};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use tower::{BoxError, Service, ServiceExt};

use super::{BoxFuture, Request, Response, connection_lost, never_sent};
use meshkit_base::deadline;
use meshkit_base::methods::{MethodInfo, MethodTable};

/// Retry settings; part of [`ChannelConfig`](super::ChannelConfig).
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// Attempts per call, the first included.
    pub max_attempts: u32,
    /// Share of recent calls that may be retries.
    pub budget_percent: f32,
    /// Retries always allowed per second, whatever the traffic.
    pub budget_min_per_sec: u32,
    /// Pause before a retry (jittered, doubled per attempt).
    pub backoff: Duration,
    /// The longest an attempt of an idempotent call waits before it is
    /// abandoned for another instance (a frozen instance answers nothing).
    pub attempt_timeout: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            budget_percent: 0.2,
            budget_min_per_sec: 10,
            backoff: Duration::from_millis(5),
            attempt_timeout: Duration::from_secs(1),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Retry<S> {
    inner: S,
    // One allocation for everything a call reads, so a call (and a clone of
    // the channel) touches one reference count, not four.
    state: Arc<RetryState>,
}

struct RetryState {
    methods: Arc<MethodTable>,
    budget: RetryBudget,
    config: RetryConfig,
    counters: RetryCounters,
}

/// `meshkit_client_retries_total{service, outcome}`: retries made, and
/// retries the budget refused.
struct RetryCounters {
    retried: Counter,
    refused: Counter,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    service: String,
    outcome: &'static str,
}

static RETRIES: LazyLock<CounterFamily<RetryLabels>> = LazyLock::new(|| {
    metrics::counters(
        "meshkit_client_retries",
        "Retries through balanced channels: made (retried), or not made because the retry budget was spent (budget_exhausted).",
    )
});

impl RetryCounters {
    fn new(service: &str) -> Self {
        let counter = |outcome| RETRIES.get_or_create(&RetryLabels { service: service.to_owned(), outcome }).clone();
        Self { retried: counter("retried"), refused: counter("budget_exhausted") }
    }
}

impl<S> Retry<S> {
    pub(crate) fn new(inner: S, methods: Arc<MethodTable>, config: RetryConfig, service: &str) -> Self {
        let budget = RetryBudget::new(config.budget_min_per_sec, config.budget_percent);
        let counters = RetryCounters::new(service);
        Self { inner, state: Arc::new(RetryState { methods, budget, config, counters }) }
    }
}

impl<S> Service<Request> for Retry<S>
where
    S: Service<Request, Response = Response, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The service made ready goes with the call (tower's contract); a
        // clone stays for the next one. Later attempts wait for readiness again.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let state = self.state.clone();
        Box::pin(async move {
            let started = Instant::now();
            let deadline = deadline::call_deadline(&req, started);
            // A request whose own grpc-timeout is its deadline goes out with
            // that header on its first attempt: the same value call after
            // call stays one byte in HPACK's table.
            let own = deadline.is_some_and(|d| d.own);
            let deadline = deadline.map(|d| d.at);
            let method = state.methods.get(req.uri().path());
            state.budget.deposit_at(started.into_std());
            match method {
                Some(info) if !info.client_streaming => {
                    replayable(inner, req, info, started, deadline, own, &state).await
                }
                // Unknown or streaming requests cannot be replayed: one attempt.
                _ => {
                    let path = req.uri().path().to_owned();
                    let mut inner = inner;
                    attempt(&mut inner, true, own, req, started, deadline, None).await.unwrap_or_else(|_| {
                        Err(tonic::Status::deadline_exceeded(format!("deadline exceeded calling {path}")).into())
                    })
                }
            }
        })
    }
}

async fn replayable(
    mut inner: impl Service<Request, Response = Response, Error = BoxError>,
    req: Request,
    info: MethodInfo,
    started: Instant,
    deadline: Option<Instant>,
    own: bool,
    state: &RetryState,
) -> Result<Response, BoxError> {
    let RetryState { budget, config, counters, .. } = state;
    let (parts, body) = req.into_parts();
    let bytes: Bytes = body.collect().await.map_err(|e| -> BoxError { e.into() })?.to_bytes();
    let attempt_timeout = info.idempotent.then_some(config.attempt_timeout);
    // The first attempt takes the request's own parts (extensions included);
    // a replay is built from this copy.
    let replay = Replay::of(&parts);
    let mut first = Some(parts);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let body = tonic::body::Body::new(Full::new(bytes.clone()));
        let req = match first.take() {
            Some(parts) => http::Request::from_parts(parts, body),
            None => replay.request(body),
        };

        let now = if attempts == 1 { started } else { Instant::now() };
        let result =
            match attempt(&mut inner, attempts == 1, own && attempts == 1, req, now, deadline, attempt_timeout).await {
                Ok(result) => result,
                Err(_) if deadline.is_some_and(|d| Instant::now() + Duration::from_millis(1) >= d) => {
                    return Err(tonic::Status::deadline_exceeded(format!(
                        "deadline exceeded calling {} after {attempts} attempt(s)",
                        replay.uri.path()
                    ))
                    .into());
                }
                // Only the attempt timed out: an idempotent call may go elsewhere.
                Err(attempt_timed_out) => Err(attempt_timed_out),
            };
        let retry = match &result {
            Ok(resp) => {
                info.idempotent
                    && meshkit_telemetry::metrics::status_of(resp.headers()) == Some(tonic::Code::Unavailable)
            }
            Err(e) => {
                never_sent(e.as_ref()) || (info.idempotent && (connection_lost(e.as_ref()) || is_timeout(e.as_ref())))
            }
        };
        if !retry || attempts >= config.max_attempts {
            return result;
        }
        let pause = config.backoff * 2u32.pow(attempts - 1);
        if deadline.is_some_and(|d| Instant::now() + pause >= d) {
            return result;
        }
        if !budget.withdraw() {
            counters.refused.inc();
            return result;
        }
        counters.retried.inc();
        tracing::debug!(path = replay.uri.path(), attempts, "retrying");
        tokio::time::sleep(pause.mul_f64(rand::random_range(0.5..=1.0))).await;
    }
}

/// What a retried request is built from: the first attempt's head without
/// its extensions.
struct Replay {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl Replay {
    fn of(parts: &http::request::Parts) -> Self {
        Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        }
    }

    fn request(&self, body: tonic::body::Body) -> Request {
        let mut req = http::Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// One attempt, bounded by the deadline and, for idempotent calls, the
/// attempt timeout. `Err` means the attempt timed out. Its `grpc-timeout`
/// is set to what is left of the deadline unless `header_current` (the
/// first attempt of a request whose own header is its deadline).
async fn attempt<S>(
    inner: &mut S,
    already_ready: bool,
    header_current: bool,
    mut req: Request,
    now: Instant,
    deadline: Option<Instant>,
    attempt_timeout: Option<Duration>,
) -> Result<Result<Response, BoxError>, BoxError>
where
    S: Service<Request, Response = Response, Error = BoxError>,
{
    let limit = match (deadline, attempt_timeout.map(|t| now + t)) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    if let Some(d) = deadline {
        // Checked against a fresh reading: `now` may be from before the
        // request was collected, and a deadline already past must fail here
        // rather than race the call.
        let sent = Instant::now();
        if d <= sent {
            return Err(AttemptTimedOut.into());
        }
        if !header_current {
            req.headers_mut().insert(deadline::GRPC_TIMEOUT, deadline::remaining_grpc_timeout(d - sent));
        }
    }
    let call = async {
        if !already_ready {
            inner.ready().await?;
        }
        inner.call(req).await
    };
    match limit {
        Some(limit) => tokio::time::timeout_at(limit, call).await.map_err(|_| AttemptTimedOut.into()),
        None => Ok(call.await),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("attempt timed out")]
struct AttemptTimedOut;

fn is_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    err.downcast_ref::<AttemptTimedOut>().is_some()
}

/// How many retries recent traffic allows: `percent` of the calls of the last
/// ten seconds plus `min_per_sec` per second, less the retries already made.
/// Lock-free: a deposit is one relaxed increment in the current second's slot.
pub(crate) struct RetryBudget {
    origin: std::time::Instant,
    slots: [Slot; WINDOW],
    min_per_sec: u64,
    /// The share of calls, in thousandths.
    permille: u64,
}

const WINDOW: usize = 10;

#[derive(Default)]
struct Slot {
    second: std::sync::atomic::AtomicU64,
    deposits: std::sync::atomic::AtomicU64,
    withdrawals: std::sync::atomic::AtomicU64,
}

impl RetryBudget {
    pub(crate) fn new(min_per_sec: u32, percent: f32) -> Self {
        Self {
            origin: std::time::Instant::now(),
            slots: Default::default(),
            min_per_sec: u64::from(min_per_sec),
            permille: (f64::from(percent.clamp(0.0, 10.0)) * 1000.0).round() as u64,
        }
    }

    /// The slot of the second `at` falls in, cleared if it still holds an old one.
    fn slot(&self, at: std::time::Instant) -> (&Slot, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        // Seconds from 1, so a fresh slot (second 0) is never current.
        let now = at.saturating_duration_since(self.origin).as_secs() + 1;
        let slot = &self.slots[(now as usize) % WINDOW];
        let seen = slot.second.load(Relaxed);
        if seen != now && slot.second.compare_exchange(seen, now, Relaxed, Relaxed).is_ok() {
            slot.deposits.store(0, Relaxed);
            slot.withdrawals.store(0, Relaxed);
        }
        (slot, now)
    }

    #[cfg(test)]
    pub(crate) fn deposit(&self) {
        self.deposit_at(std::time::Instant::now());
    }

    /// Counts a call made at `at` (the caller's clock reading: no read here).
    pub(crate) fn deposit_at(&self, at: std::time::Instant) {
        self.slot(at).0.deposits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn withdraw(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let (current, now) = self.slot(std::time::Instant::now());
        let (mut deposits, mut withdrawals) = (0u64, 0u64);
        for slot in &self.slots {
            if now.saturating_sub(slot.second.load(Relaxed)) < WINDOW as u64 {
                deposits += slot.deposits.load(Relaxed);
                withdrawals += slot.withdrawals.load(Relaxed);
            }
        }
        let allowed = self.min_per_sec * WINDOW as u64 + deposits * self.permille / 1000;
        if withdrawals < allowed {
            current.withdrawals.fetch_add(1, Relaxed);
            true
        } else {
            false
        }
    }
}
