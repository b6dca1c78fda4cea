//! One instance of a service as the balancer sees it.
//!
//! Load is the cost p2c compares: a peak-EWMA of latency (a slow response
//! raises it at once, fast ones lower it gradually), never below the age of
//! the oldest unanswered call, times the calls in flight plus one, times a
//! penalty for recent failures (UNAVAILABLE, RESOURCE_EXHAUSTED, broken
//! connections), divided by the instance's registered weight.
//!
//! Ejection: an endpoint whose connection is refused or reset leaves the
//! rotation at once; one that fails `eject_after` times in a row leaves it for
//! a backoff that doubles with each ejection. When the backoff ends, the next
//! call is a probe: success brings it back, failure ejects it again. The last
//! endpoint in rotation is never ejected: with nowhere else to go, trying is
//! better than refusing.
//!
//! Connections: calls go to the least-busy HTTP/2 connection, and another is
//! opened (up to `max_connections`) when every one carries more than
//! `streams_per_connection` calls, since one h2 connection serialises on a lock.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, OnceLock, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use http::{HeaderMap, uri::Authority};
use pin_project_lite::pin_project;
use serde::Serialize;
use tower::{BoxError, Service, load::Load};

use super::{
    body::TrackedBody,
    connection::{self, ConnectSettings, Connection as H2Connection},
};

type Request = http::Request<tonic::body::Body>;

/// Settings of each endpoint; part of [`ChannelConfig`](super::ChannelConfig).
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// RTT assumed before the first answer.
    pub default_rtt: Duration,
    /// How fast the latency estimate forgets a peak.
    pub rtt_decay: Duration,
    /// How fast the failure penalty fades.
    pub failure_decay: Duration,
    /// Consecutive failures that eject an endpoint.
    pub eject_after: u32,
    /// First ejection; doubles with each one in a row.
    pub eject_base: Duration,
    pub eject_max: Duration,
    pub max_connections: usize,
    pub streams_per_connection: usize,
    /// A call abandoned (by a timeout or its caller) after this long counts
    /// as a failure: a frozen instance answers nothing and would otherwise
    /// look healthy once its calls are dropped.
    pub abandoned_after: Duration,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            default_rtt: Duration::from_millis(5),
            rtt_decay: Duration::from_secs(5),
            failure_decay: Duration::from_secs(5),
            eject_after: 5,
            eject_base: Duration::from_millis(500),
            eject_max: Duration::from_secs(15),
            max_connections: 4,
            streams_per_connection: 64,
            abandoned_after: Duration::from_millis(900),
        }
    }
}

/// How a call ended, as far as the endpoint's health is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    /// The endpoint answered badly (UNAVAILABLE, RESOURCE_EXHAUSTED, broken stream).
    Failure,
    /// The connection was refused or reset: the instance is likely gone.
    ConnectionLost,
}

impl Outcome {
    /// The outcome a `grpc-status` in headers or trailers means, if present.
    pub(crate) fn from_headers(headers: &HeaderMap) -> Option<Self> {
        Some(match meshkit_telemetry::metrics::status_of(headers)? {
            tonic::Code::Unavailable | tonic::Code::ResourceExhausted => Outcome::Failure,
            _ => Outcome::Success,
        })
    }

    /// Classifies a transport error by the io error at its root.
    pub(crate) fn from_error(err: &(dyn std::error::Error + 'static)) -> Self {
        if super::connection_lost(err) { Outcome::ConnectionLost } else { Outcome::Failure }
    }
}

/// What every endpoint of one pool shares: used to keep at least one in
/// rotation, and to tell the pool's watchers of ejections.
#[derive(Default)]
pub(crate) struct PoolCounts {
    pub endpoints: AtomicUsize,
    pub ejected: AtomicUsize,
    /// A moving average of the pool's latency (f64 bits; 0 = none yet): a new
    /// endpoint starts from it, so it competes with the others as an equal
    /// instead of looking slow (never picked) or fast (flooded).
    typical_rtt_ns: AtomicU64,
    view: OnceLock<Weak<super::PoolView>>,
}

impl PoolCounts {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    pub(crate) fn set_notify(&self, view: Weak<super::PoolView>) {
        let _ = self.view.set(view);
    }

    fn notify(&self) {
        if let Some(view) = self.view.get().and_then(Weak::upgrade) {
            view.bump();
        }
    }

    fn typical_rtt_ns(&self) -> Option<f64> {
        let bits = self.typical_rtt_ns.load(Ordering::Relaxed);
        (bits != 0).then(|| f64::from_bits(bits))
    }

    fn observe_rtt(&self, sample_ns: f64) {
        // Racy read-modify-write is fine: this only seeds new endpoints.
        let next = match self.typical_rtt_ns() {
            Some(current) => current * 0.95 + sample_ns * 0.05,
            None => sample_ns,
        };
        self.typical_rtt_ns.store(next.max(1.0).to_bits(), Ordering::Relaxed);
    }
}

impl std::fmt::Debug for PoolCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolCounts").field("endpoints", &self.endpoints).field("ejected", &self.ejected).finish()
    }
}

/// The live state of one endpoint, shared by its service, its calls and the
/// pool's introspection.
#[derive(Debug)]
pub struct EndpointStats {
    pub id: String,
    pub addr: String,
    weight: f64,
    config: Arc<EndpointConfig>,
    pool: Arc<PoolCounts>,
    inflight: AtomicUsize,
    /// Mirrors `State::ejected_until.is_some()`, so a ready endpoint's
    /// readiness check takes no lock.
    ejected: AtomicBool,
    connections: AtomicUsize,
    calls: AtomicU64,
    failures: AtomicU64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    rtt_ns: f64,
    rtt_at: Instant,
    /// The last completion, or when the first of the current calls started.
    progress_at: Instant,
    failure_score: f64,
    failure_at: Instant,
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
    ejections: u32,
    probing: bool,
}

/// A point-in-time view of an endpoint, for `/pools` and `meshctl`.
#[derive(Debug, Clone, Serialize)]
pub struct EndpointSnapshot {
    pub id: String,
    pub addr: String,
    /// `ready`, `ejected` or `probing`.
    pub state: &'static str,
    pub ejected_for_ms: u64,
    pub inflight: usize,
    pub connections: usize,
    pub rtt_ms: f64,
    pub load: f64,
    pub failure_score: f64,
    pub consecutive_failures: u32,
    pub calls: u64,
    pub failures: u64,
}

impl EndpointStats {
    pub(crate) fn new(
        id: String,
        addr: String,
        weight: u32,
        config: Arc<EndpointConfig>,
        pool: Arc<PoolCounts>,
    ) -> Self {
        let now = Instant::now();
        pool.endpoints.fetch_add(1, Ordering::Relaxed);
        let rtt_ns = pool.typical_rtt_ns().unwrap_or(config.default_rtt.as_nanos() as f64);
        Self {
            id,
            addr,
            weight: f64::from(weight.clamp(1, 10_000)) / 100.0,
            state: Mutex::new(State {
                rtt_ns,
                rtt_at: now,
                progress_at: now,
                failure_score: 0.0,
                failure_at: now,
                consecutive_failures: 0,
                ejected_until: None,
                ejections: 0,
                probing: false,
            }),
            config,
            pool,
            inflight: AtomicUsize::new(0),
            ejected: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cost p2c compares; lower is better.
    pub fn load(&self, now: Instant) -> f64 {
        self.load_at(|| now)
    }

    /// [`Self::load`], reading the clock only when the load depends on it
    /// (calls in flight or a failure not yet forgotten): p2c reads two loads
    /// on every pick.
    fn load_at(&self, clock: impl FnOnce() -> Instant) -> f64 {
        let inflight = self.inflight.load(Ordering::Relaxed);
        let mut s = self.lock();
        let typical = self.pool.typical_rtt_ns().unwrap_or(s.rtt_ns);
        let slow = s.rtt_ns > 2.0 * typical;
        if inflight == 0 && s.failure_score == 0.0 && !slow {
            return s.rtt_ns / self.weight;
        }
        let now = clock();
        let mut rtt = if slow { self.faded_rtt(&s, typical, now) } else { s.rtt_ns };
        if inflight > 0 {
            // An endpoint that stopped answering cannot look fast.
            rtt = rtt.max(now.saturating_duration_since(s.progress_at).as_nanos() as f64);
        }
        let penalty = if s.failure_score == 0.0 {
            1.0
        } else {
            let score = decayed(s.failure_score, now - s.failure_at.min(now), self.config.failure_decay);
            if score < 1e-3 {
                // Long forgotten: no more decay to compute on every pick.
                s.failure_score = 0.0;
            }
            1.0 + 4.0 * score
        };
        rtt * (inflight as f64 + 1.0) * penalty / self.weight
    }

    /// An estimate well above the pool's typical latency, faded back toward
    /// it over `rtt_decay` since its last sample. Without this, an endpoint
    /// that was slow once (a timed-out attempt, a delayed link) keeps that
    /// estimate for good: p2c always prefers its peers, so no new sample ever
    /// corrects it, even after it has recovered. Faded, it is tried again in
    /// time (from 100 times the typical latency, about 25 s with the default
    /// 5 s decay), and a fast answer brings it back at once.
    fn faded_rtt(&self, s: &State, typical: f64, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(s.rtt_at).as_secs_f64();
        typical + (s.rtt_ns - typical) * (-elapsed / self.config.rtt_decay.as_secs_f64()).exp()
    }

    /// When the current ejection ends, if ejected now. An ejection that has
    /// ended turns the endpoint into a probe.
    fn ejected_until(&self) -> Option<Instant> {
        if !self.ejected.load(Ordering::Acquire) {
            return None;
        }
        let now = Instant::now();
        let mut s = self.lock();
        match s.ejected_until {
            Some(until) if until > now => Some(until),
            Some(_) => {
                s.ejected_until = None;
                self.ejected.store(false, Ordering::Release);
                s.probing = true;
                self.pool.ejected.fetch_sub(1, Ordering::Relaxed);
                drop(s);
                self.pool.notify();
                None
            }
            None => None,
        }
    }

    fn started(&self, now: Instant) {
        if self.inflight.fetch_add(1, Ordering::Relaxed) == 0 {
            self.lock().progress_at = now;
        }
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection to the endpoint could not be made: a failure, and an
    /// ejection. Whether the endpoint is now ejected (not when it is the
    /// last one in rotation).
    fn connect_failed(&self, now: Instant) -> bool {
        let mut s = self.lock();
        let ejected_now = self.failed(&mut s, now, true);
        let ejected = s.ejected_until.is_some();
        drop(s);
        if ejected_now {
            self.pool.notify();
        }
        ejected
    }

    /// Counts a failure; ejects the endpoint when `lost` (its connection
    /// went), when it was a probe, or after `eject_after` in a row. Whether
    /// it ejected it now: the pool is to be told, once the lock is dropped.
    fn failed(&self, s: &mut State, now: Instant, lost: bool) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        s.failure_score =
            decayed(s.failure_score, now.saturating_duration_since(s.failure_at), self.config.failure_decay) + 1.0;
        s.failure_at = now;
        s.consecutive_failures += 1;
        let eject = lost || s.probing || s.consecutive_failures >= self.config.eject_after;
        eject && s.ejected_until.is_none() && self.eject(s, now)
    }

    fn finished(&self, outcome: Option<Outcome>, latency: Duration, now: Instant) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
        let sample = latency.as_nanos() as f64;
        let outcome = match outcome {
            Some(outcome) => outcome,
            // Abandoned: it took at least this long, and no answer came.
            None => {
                let mut s = self.lock();
                s.rtt_ns = s.rtt_ns.max(sample);
                s.rtt_at = now;
                if latency < self.config.abandoned_after {
                    return;
                }
                drop(s);
                Outcome::Failure
            }
        };
        let mut s = self.lock();
        if outcome == Outcome::Success {
            s.progress_at = now;
        }
        if outcome == Outcome::Success {
            let elapsed = now.saturating_duration_since(s.rtt_at);
            s.rtt_ns = if sample > s.rtt_ns {
                sample
            } else {
                let keep = (-(elapsed.as_secs_f64() / self.config.rtt_decay.as_secs_f64())).exp();
                s.rtt_ns * keep + sample * (1.0 - keep)
            };
            s.rtt_at = now;
            self.pool.observe_rtt(sample);
            s.consecutive_failures = 0;
            if s.probing {
                s.probing = false;
                s.ejections = 0;
            }
            return;
        }
        if self.failed(&mut s, now, outcome == Outcome::ConnectionLost) {
            drop(s);
            self.pool.notify();
        }
    }

    /// Takes the endpoint out of rotation unless it is the last one in it.
    fn eject(&self, s: &mut State, now: Instant) -> bool {
        let endpoints = self.pool.endpoints.load(Ordering::Relaxed);
        let ejected = self.pool.ejected.load(Ordering::Relaxed);
        if ejected + 1 >= endpoints {
            return false;
        }
        let factor = 2u32.saturating_pow(s.ejections.min(16));
        let backoff = (self.config.eject_base * factor).min(self.config.eject_max);
        s.ejected_until = Some(now + backoff);
        self.ejected.store(true, Ordering::Release);
        s.ejections += 1;
        s.probing = false;
        self.pool.ejected.fetch_add(1, Ordering::Relaxed);
        tracing::info!(endpoint = %self.id, addr = %self.addr, backoff_ms = backoff.as_millis() as u64, "endpoint ejected");
        true
    }

    #[cfg(test)]
    pub(crate) fn test_started(&self, now: Instant) {
        self.started(now);
    }

    #[cfg(test)]
    pub(crate) fn test_finished(&self, outcome: Option<Outcome>, latency: Duration, now: Instant) {
        self.finished(outcome, latency, now);
    }

    #[cfg(test)]
    pub(crate) fn test_ejected_until(&self) -> Option<Instant> {
        self.ejected_until()
    }

    pub fn snapshot(&self) -> EndpointSnapshot {
        let now = Instant::now();
        let load = self.load(now);
        let s = self.lock();
        let (state, ejected_for_ms) = match s.ejected_until {
            Some(until) if until > now => ("ejected", (until - now).as_millis() as u64),
            Some(_) => ("probing", 0),
            None if s.probing => ("probing", 0),
            None => ("ready", 0),
        };
        EndpointSnapshot {
            id: self.id.clone(),
            addr: self.addr.clone(),
            state,
            ejected_for_ms,
            inflight: self.inflight.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            rtt_ms: s.rtt_ns / 1e6,
            load,
            failure_score: decayed(
                s.failure_score,
                now.saturating_duration_since(s.failure_at),
                self.config.failure_decay,
            ),
            consecutive_failures: s.consecutive_failures,
            calls: self.calls.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }
}

impl Drop for EndpointStats {
    fn drop(&mut self) {
        self.pool.endpoints.fetch_sub(1, Ordering::Relaxed);
        let s = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if s.ejected_until.is_some() {
            self.pool.ejected.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn decayed(score: f64, elapsed: Duration, tau: Duration) -> f64 {
    score * (-(elapsed.as_secs_f64() / tau.as_secs_f64().max(1e-3))).exp()
}

/// Holds a call's place in the in-flight counts until the call ends.
#[derive(Debug)]
pub struct CallGuard {
    stats: Arc<EndpointStats>,
    connection: Arc<AtomicUsize>,
    started: Instant,
    done: bool,
}

impl CallGuard {
    fn new(stats: Arc<EndpointStats>, connection: Arc<AtomicUsize>) -> Self {
        let started = Instant::now();
        stats.started(started);
        connection.fetch_add(1, Ordering::Relaxed);
        Self { stats, connection, started, done: false }
    }

    pub(crate) fn finish(mut self, outcome: Outcome) {
        self.end(Some(outcome));
    }

    fn end(&mut self, outcome: Option<Outcome>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.connection.fetch_sub(1, Ordering::Relaxed);
        let now = Instant::now();
        self.stats.finished(outcome, now - self.started, now);
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        // Dropped without an outcome: the caller gave up (see `abandoned_after`).
        self.end(None);
    }
}

struct Connection {
    channel: H2Connection,
    inflight: Arc<AtomicUsize>,
}

/// The balancer's view of one instance: a `tower::Service` with a [`Load`].
pub struct EndpointService {
    stats: Arc<EndpointStats>,
    authority: Authority,
    settings: ConnectSettings,
    connections: Vec<Connection>,
    ready: Option<usize>,
    eject_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl EndpointService {
    pub(crate) fn new(authority: Authority, settings: ConnectSettings, stats: Arc<EndpointStats>) -> Self {
        let mut svc = Self { stats, authority, settings, connections: Vec::new(), ready: None, eject_timer: None };
        svc.open_connection();
        svc
    }

    fn open_connection(&mut self) -> usize {
        let channel = H2Connection::lazy(self.authority.clone(), self.settings.clone());
        self.connections.push(Connection { channel, inflight: Arc::default() });
        self.stats.connections.store(self.connections.len(), Ordering::Relaxed);
        self.connections.len() - 1
    }

    fn pick_connection(&mut self) -> usize {
        let (index, busiest) = self
            .connections
            .iter()
            .enumerate()
            .map(|(i, c)| (i, c.inflight.load(Ordering::Relaxed)))
            .min_by_key(|(_, n)| *n)
            .unwrap_or((0, 0));
        if self.connections.is_empty()
            || (busiest >= self.stats.config.streams_per_connection
                && self.connections.len() < self.stats.config.max_connections)
        {
            return self.open_connection();
        }
        index
    }
}

impl Load for EndpointService {
    type Metric = f64;

    fn load(&self) -> f64 {
        self.stats.load_at(Instant::now)
    }
}

impl Service<Request> for EndpointService {
    type Response = http::Response<TrackedBody<tonic::body::Body>>;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            if let Some(until) = self.stats.ejected_until() {
                let timer = self.eject_timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until.into())));
                timer.as_mut().reset(until.into());
                ready!(timer.as_mut().poll(cx));
                // The timer fired: ask again, which turns the endpoint into a probe.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let index = match self.ready {
                Some(i) => i,
                None => self.pick_connection(),
            };
            // A connection never fails readiness: lost connections reach
            // the next call, where the endpoint counts them.
            ready!(self.connections[index].channel.poll_ready(cx))?;
            // Connecting failed (refused, timed out): the endpoint counts it
            // and is ejected without spending a caller's call on it. Only
            // the last endpoint in rotation, which is never ejected, hands
            // the error to the call, so it fails at once.
            if self.connections[index].channel.failed() && self.stats.connect_failed(Instant::now()) {
                self.connections[index].channel.forget_failure();
                self.ready = None;
                continue;
            }
            self.ready = Some(index);
            return Poll::Ready(Ok(()));
        }
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let index = self.ready.take().unwrap_or(0);
        let connection = &mut self.connections[index];
        let guard = CallGuard::new(self.stats.clone(), connection.inflight.clone());
        ResponseFuture { inner: connection.channel.call(req), guard: Some(guard) }
    }
}

pin_project! {
    /// The future of one call to one endpoint.
    pub struct ResponseFuture {
        #[pin]
        inner: connection::ResponseFuture,
        guard: Option<CallGuard>,
    }
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<TrackedBody<tonic::body::Body>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match ready!(this.inner.poll(cx)) {
            Ok(response) => {
                let mut guard = this.guard.take();
                // A trailers-only response (how errors come back) carries its
                // status in the headers: the call is over.
                if let Some(outcome) = Outcome::from_headers(response.headers()) {
                    if let Some(g) = guard.take() {
                        g.finish(outcome);
                    }
                }
                Poll::Ready(Ok(response.map(|body| TrackedBody::new(body, guard))))
            }
            Err(e) => {
                let err: BoxError = e;
                if let Some(guard) = this.guard.take() {
                    guard.finish(Outcome::from_error(err.as_ref()));
                }
                Poll::Ready(Err(err))
            }
        }
    }
}

/// Snapshots of a pool's endpoints, by instance id.
pub type PoolSnapshot = BTreeMap<String, EndpointSnapshot>;
