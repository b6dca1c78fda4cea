//! Balanced channels: a service name in, a tonic-compatible `tower::Service` out.
//!
//! Layer order, outermost first, as a call goes down:
//!
//! ```text
//! BalancedChannel
//!   └─ retry with budget, bounded by the deadline    (retry.rs; deadline.rs)
//!       └─ shared: callers take turns at the pool,    (shared.rs)
//!          no queue or worker task in between
//!           └─ pool: fail fast when no instance       (Pool below)
//!               └─ p2c balancer over the endpoints    (tower::balance::p2c)
//!                   └─ endpoint: load, ejection,      (endpoint.rs)
//!                      connections
//!                       └─ connection: HTTP/2 on h2, no queue, no task per call (connection.rs)
//! ```
//!
//! Tracing and metrics wrap the channel from outside (outermost); circuit
//! breakers sit between retry and the balancer; per-endpoint concurrency
//! limits inside the endpoint. The endpoints come from a resumable etcd watch
//! ([`crate::discovery`]); load is real (see [`endpoint`]), where tonic's own
//! `balance_channel` reports none.

pub mod body;
mod connection;
pub mod endpoint;
pub mod retry;
mod shared;
mod split;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use etcd_client::Client;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tower::{BoxError, Service, balance::p2c::Balance, discover::Change};

use self::{
    body::TrackedBody,
    endpoint::{EndpointService, PoolCounts},
    retry::Retry,
    shared::Shared,
    split::{GroupFeed, Groups},
};
pub use self::{
    endpoint::{EndpointConfig, EndpointSnapshot, EndpointStats, PoolSnapshot},
    retry::RetryConfig,
};
use meshkit_base::methods::MethodTable;
use meshkit_registry::discovery::{self, ServiceWatch};
use meshkit_registry::registry::service_prefix;

type Request = http::Request<tonic::body::Body>;
/// The body of a balanced channel's responses.
pub type ResponseBody = meshkit_telemetry::metrics::ObservedBody<TrackedBody<tonic::body::Body>>;
/// What the layers under the channel answer: the body without the call's metrics.
type InnerBody = TrackedBody<tonic::body::Body>;
type Response = http::Response<InnerBody>;
type BoxFuture = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;
type PoolFuture = futures::future::Either<
    <Balance<EndpointStream, Request> as Service<Request>>::Future,
    std::future::Ready<Result<Response, BoxError>>,
>;
/// Endpoints reach the balancer keyed by a number, not the instance id: the
/// balancer hashes its key on every call.
type EndpointStream = Pin<Box<dyn Stream<Item = Result<Change<u64, EndpointService>, BoxError>> + Send>>;

/// Settings of every balanced channel a builder makes.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// TCP connect timeout per connection.
    pub connect_timeout: Duration,
    /// How long a call waits for the first discovery read before failing.
    pub discovery_wait: Duration,
    /// HTTP/2 keepalive ping interval; a silent peer is dropped after 2 s more.
    pub http2_keepalive: Duration,
    pub endpoint: EndpointConfig,
    pub retry: RetryConfig,
    /// mTLS on every connection when set (certificates reloaded as they change).
    pub tls: Option<Arc<meshkit_tls::Tls>>,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_millis(500),
            discovery_wait: Duration::from_secs(3),
            http2_keepalive: Duration::from_secs(5),
            endpoint: EndpointConfig::default(),
            retry: RetryConfig::default(),
            tls: None,
        }
    }
}

impl ChannelConfig {
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    pub fn discovery_wait(mut self, wait: Duration) -> Self {
        self.discovery_wait = wait;
        self
    }

    pub fn endpoint(mut self, endpoint: EndpointConfig) -> Self {
        self.endpoint = endpoint;
        self
    }

    pub fn retry(mut self, retry: RetryConfig) -> Self {
        self.retry = retry;
        self
    }
}

/// Makes balanced channels, one pool per service shared by every caller.
#[derive(Clone)]
pub struct ChannelBuilder {
    client: Client,
    prefix: String,
    config: ChannelConfig,
    methods: Arc<MethodTable>,
    governance: Option<Arc<meshkit_governance::Governance>>,
    /// Where traffic splits come from, when not from `governance`.
    splits: Option<Arc<meshkit_governance::Governance>>,
    pools: Arc<Mutex<HashMap<String, BalancedChannel>>>,
}

impl ChannelBuilder {
    /// `prefix` is the etcd root (`/meshkit` by default).
    pub fn new(client: Client, prefix: impl Into<String>) -> Self {
        Self {
            client,
            prefix: prefix.into(),
            config: ChannelConfig::default(),
            methods: Arc::new(MethodTable::meshkit()),
            governance: None,
            splits: None,
            pools: Arc::default(),
        }
    }

    /// Calling-side governance (breakers, throttling, per-method timeouts,
    /// retry policy per service) for every channel built after this.
    pub fn with_governance(mut self, governance: Arc<meshkit_governance::Governance>) -> Self {
        self.governance = Some(governance);
        self
    }

    /// Traffic splits by version (`governance.split`) from `governance`,
    /// without its other rules, for channels built after this. A builder
    /// [`Self::with_governance`] takes its splits from there already.
    pub fn with_splits(mut self, governance: Arc<meshkit_governance::Governance>) -> Self {
        self.splits = Some(governance);
        self
    }

    /// The governance channels of this builder consult, if any.
    pub fn governance(&self) -> Option<&Arc<meshkit_governance::Governance>> {
        self.governance.as_ref()
    }

    pub fn with_config(mut self, config: ChannelConfig) -> Self {
        self.config = config;
        self
    }

    /// mTLS for every channel built after this (none: plaintext).
    pub fn with_tls(mut self, tls: Option<Arc<meshkit_tls::Tls>>) -> Self {
        self.config.tls = tls;
        self
    }

    /// The TLS material channels of this builder use, if any.
    pub fn tls(&self) -> Option<&Arc<meshkit_tls::Tls>> {
        self.config.tls.as_ref()
    }

    /// Which methods may be retried after reaching a server; the workspace's
    /// contracts by default.
    pub fn with_methods(mut self, methods: MethodTable) -> Self {
        self.methods = Arc::new(methods);
        self
    }

    /// A channel to every live instance of `service` (a fully qualified gRPC
    /// service name such as `meshkit.user.v1.UserService`), kept up to date
    /// from etcd. Cheap to clone; callers of one builder share one pool.
    /// Must be called from within a Tokio runtime.
    pub fn balanced(&self, service: &str) -> BalancedChannel {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(channel) = pools.get(service) {
            return channel.clone();
        }
        let watch = discovery::watch_prefix(self.client.clone(), service_prefix(&self.prefix, service));
        let mut config = self.config.clone();
        if let Some(retry) = self.governance.as_ref().and_then(|g| g.settings().retry.get(service).cloned()) {
            config.retry.max_attempts = retry.max_attempts;
            config.retry.budget_percent = retry.budget_percent as f32;
            config.retry.budget_min_per_sec = retry.budget_min_per_sec;
        }
        let splits = self.splits.clone().or_else(|| self.governance.clone());
        let mut channel = BalancedChannel::from_watch_governed(service, watch, &config, self.methods.clone(), splits);
        channel.governance = self.governance.clone();
        pools.insert(service.to_owned(), channel.clone());
        channel
    }

    /// The pools made so far, for introspection.
    pub fn pools(&self) -> Vec<Arc<PoolView>> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.values().map(|c| c.view.clone()).collect()
    }
}

/// What a pool holds, shared with introspection.
pub struct PoolView {
    service: String,
    counts: Arc<PoolCounts>,
    endpoints: Mutex<BTreeMap<String, Arc<EndpointStats>>>,
    changed: watch::Sender<u64>,
}

impl PoolView {
    fn new(service: &str, counts: Arc<PoolCounts>) -> Self {
        Self { service: service.to_owned(), counts, endpoints: Mutex::default(), changed: watch::Sender::new(0) }
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// Every endpoint with its state, load and counters.
    pub fn snapshot(&self) -> PoolSnapshot {
        let endpoints = self.endpoints.lock().unwrap_or_else(|p| p.into_inner());
        endpoints.iter().map(|(id, stats)| (id.clone(), stats.snapshot())).collect()
    }

    /// Instance ids in the pool now, ready or ejected.
    pub fn ids(&self) -> Vec<String> {
        self.endpoints.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// How many endpoints are ejected now.
    pub fn ejected(&self) -> usize {
        self.counts.ejected.load(Ordering::Relaxed)
    }

    /// Bumped whenever an endpoint joins, leaves or is ejected.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
}

/// A load-balanced channel to one service; use it wherever a tonic client
/// takes a channel: `UserServiceClient::new(channel)`.
#[derive(Clone)]
pub struct BalancedChannel {
    inner: Retry<Shared<Pool>>,
    view: Arc<PoolView>,
    governance: Option<Arc<meshkit_governance::Governance>>,
}

impl BalancedChannel {
    /// A channel over any discovery source; [`ChannelBuilder::balanced`]
    /// feeds it from etcd.
    pub fn from_watch(service: &str, watch: ServiceWatch, config: &ChannelConfig, methods: Arc<MethodTable>) -> Self {
        Self::from_watch_governed(service, watch, config, methods, None)
    }

    /// [`Self::from_watch`] following the traffic split by version of
    /// `splits` (its `governance.split`).
    pub fn from_watch_governed(
        service: &str,
        watch: ServiceWatch,
        config: &ChannelConfig,
        methods: Arc<MethodTable>,
        splits: Option<Arc<meshkit_governance::Governance>>,
    ) -> Self {
        let counts = Arc::new(PoolCounts::new());
        let view = Arc::new(PoolView::new(service, counts.clone()));
        counts.set_notify(Arc::downgrade(&view));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let synced = Arc::new(Synced::default());
        let feed = Arc::new(GroupFeed::new(connect_settings(config)));
        tokio::spawn(forward(watch, tx, synced.clone(), view.clone(), counts, config.clone(), feed.clone()));
        let endpoints: EndpointStream = Box::pin(UnboundedReceiverStream::new(rx).map(Ok));
        let pool = Pool {
            balance: Balance::new(endpoints),
            synced,
            wait: Box::pin(tokio::time::sleep(config.discovery_wait)),
            waited: false,
            route: Route::Refuse,
            service: Arc::from(service),
            split: SplitState { governance: splits, generation: 0, groups: None, chosen: None, feed },
        };
        Self { inner: Retry::new(Shared::new(pool), methods, config.retry.clone(), service), view, governance: None }
    }

    /// The pool behind this channel.
    pub fn view(&self) -> &Arc<PoolView> {
        &self.view
    }
}

/// Applies discovery changes to the pool's view as they come, and hands the
/// endpoints to the balancer (which takes them on its next call). `synced`
/// is set once the first full read has been handed over.
async fn forward(
    watch: ServiceWatch,
    tx: mpsc::UnboundedSender<Change<u64, EndpointService>>,
    synced: Arc<Synced>,
    view: Arc<PoolView>,
    counts: Arc<PoolCounts>,
    config: ChannelConfig,
    feed: Arc<GroupFeed>,
) {
    let ServiceWatch { mut changes, synced: mut source_synced, .. } = watch;
    let endpoint_config = Arc::new(config.endpoint.clone());
    let settings = connect_settings(&config);
    let mut keys: HashMap<String, u64> = HashMap::new();
    let mut next_key = 0u64;
    loop {
        let change = tokio::select! {
            change = changes.recv() => match change {
                Some(change) => Some(change),
                None => return,
            },
            // Discovery has sent its first full read: hand it over below.
            read = source_synced.wait_for(|done| *done), if !synced.is_set() => match read {
                Ok(_) => None,
                Err(_) => return,
            },
            _ = tx.closed() => return,
        };
        let forwarded = match change {
            None => None,
            Some(Change::Remove(id)) => {
                view.endpoints.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                feed.remove(&id);
                keys.remove(&id).map(Change::Remove)
            }
            Some(Change::Insert(id, instance)) => match instance.addr.parse::<http::uri::Authority>() {
                Ok(authority) => {
                    let stats = Arc::new(EndpointStats::new(
                        id.clone(),
                        instance.addr.clone(),
                        instance.weight,
                        endpoint_config.clone(),
                        counts.clone(),
                    ));
                    view.endpoints.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), stats.clone());
                    // An instance inserted again (its address changed) keeps its key,
                    // so the balancer replaces it.
                    let key = *keys.entry(id.clone()).or_insert_with(|| {
                        next_key += 1;
                        next_key
                    });
                    feed.insert(&id, &instance.version, authority.clone(), stats.clone(), key);
                    Some(Change::Insert(key, EndpointService::new(authority, settings.clone(), stats)))
                }
                Err(e) => {
                    tracing::warn!(service = %view.service, instance = %id, addr = %instance.addr, error = %e, "skipping an instance with an unusable address");
                    None
                }
            },
        };
        if let Some(change) = forwarded {
            view.bump();
            if tx.send(change).is_err() {
                return;
            }
        }
        // Discovery sets its flag after sending the first read, so once it is
        // set and the queue is drained, the whole read is with the balancer.
        if !synced.is_set() && *source_synced.borrow() && changes.is_empty() {
            synced.set();
        }
    }
}

fn connect_settings(config: &ChannelConfig) -> connection::ConnectSettings {
    connection::ConnectSettings {
        connect_timeout: config.connect_timeout,
        keepalive_interval: config.http2_keepalive,
        keepalive_timeout: Duration::from_secs(2),
        tls: config.tls.clone(),
    }
}

impl Service<Request> for BalancedChannel {
    type Response = http::Response<ResponseBody>;
    type Error = BoxError;
    type Future = ChannelFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let mut record = meshkit_telemetry::metrics::CallRecord::client(self.view.service(), req.uri().path());
        if let Some(governance) = &self.governance {
            // The headers apart for the call, so the path is borrowed as it
            // is (no copy of the URI per call).
            let mut headers = std::mem::take(req.headers_mut());
            let checked = governance.before_call(self.view.service(), req.uri().path(), &mut headers);
            *req.headers_mut() = headers;
            match checked {
                Ok(Some(guard)) => record.on_finish(move |code, now| guard.finish_at(code, now)),
                Ok(None) => {}
                Err(status) => {
                    // Refused locally, without touching the pool.
                    record.finish(status.code());
                    let refused: BoxFuture = Box::pin(std::future::ready(Err(status.into())));
                    return ChannelFuture {
                        inner: tracing::Instrument::instrument(refused, tracing::Span::none()),
                        record: None,
                        view: self.view.clone(),
                    };
                }
            }
        }
        meshkit_telemetry::trace::inject(record.span(), req.headers_mut());
        let span = record.span().clone();
        ChannelFuture {
            inner: tracing::Instrument::instrument(self.inner.call(req), span),
            record: Some(record),
            view: self.view.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of a balanced channel's call: the retry layer's future,
    /// in the call's span, with the call's metrics recorded at its end.
    pub struct ChannelFuture {
        #[pin]
        inner: tracing::instrument::Instrumented<BoxFuture>,
        record: Option<meshkit_telemetry::metrics::CallRecord>,
        // The pool's view, for the service's name in an error.
        view: Arc<PoolView>,
    }
}

impl Future for ChannelFuture {
    type Output = Result<http::Response<ResponseBody>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        let Some(record) = this.record.take() else {
            // Refused before the pool (already recorded).
            return Poll::Ready(result.map(|res| res.map(meshkit_telemetry::metrics::ObservedBody::unrecorded)));
        };
        Poll::Ready(match result {
            Ok(res) => {
                let (parts, body) = res.into_parts();
                let body = meshkit_telemetry::metrics::ObservedBody::new(body, record, &parts.headers);
                Ok(http::Response::from_parts(parts, body))
            }
            Err(e) => {
                let status = status_of_error(e, this.view.service());
                record.finish(status.code());
                Err(status.into())
            }
        })
    }
}

/// The status a failed call reports. A connection refused, reset or closed
/// before the answer is UNAVAILABLE naming the service (as other gRPC
/// clients report it), where the bare h2 error would read as UNKNOWN or CANCELLED.
fn status_of_error(e: BoxError, service: &str) -> tonic::Status {
    if e.downcast_ref::<tonic::Status>().is_none() && connection_lost(e.as_ref()) {
        let mut status = tonic::Status::unavailable(format!("the connection to {service} was lost: {e}"));
        status.set_source(Arc::from(e));
        return status;
    }
    tonic::Status::from_error(e)
}

/// Set once the first discovery read is in the balancer's hands; wakes the
/// pool waiting on it.
#[derive(Default)]
struct Synced {
    done: AtomicBool,
    waker: futures::task::AtomicWaker,
}

impl Synced {
    fn is_set(&self) -> bool {
        self.done.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.done.store(true, Ordering::Release);
        self.waker.wake();
    }
}

/// The balancer, answering UNAVAILABLE at once when the service has no
/// instance (after the first discovery read) instead of queueing forever.
struct Pool {
    balance: Balance<EndpointStream, Request>,
    synced: Arc<Synced>,
    wait: Pin<Box<tokio::time::Sleep>>,
    waited: bool,
    /// Where the call after a ready `poll_ready` goes.
    route: Route,
    service: Arc<str>,
    split: SplitState,
}

#[derive(Clone, Copy)]
enum Route {
    /// No instance: the call fails at once.
    Refuse,
    /// p2c over every instance.
    All,
    /// p2c within one version group of the split.
    Group(usize),
}

/// The traffic split of a pool: the groups of the split in force, refreshed
/// when governance's rules change (one atomic read per call otherwise).
struct SplitState {
    governance: Option<Arc<meshkit_governance::Governance>>,
    generation: u64,
    groups: Option<Groups>,
    /// The group picked for the call being made ready, kept while it waits.
    chosen: Option<usize>,
    feed: Arc<GroupFeed>,
}

impl SplitState {
    fn refresh(&mut self, service: &str) {
        let Some(governance) = &self.governance else { return };
        let generation = governance.generation();
        if generation == self.generation {
            return;
        }
        self.generation = generation;
        let split = governance.split(service);
        if split.as_deref() == self.groups.as_ref().map(|g| &*g.split) {
            return;
        }
        self.chosen = None;
        match split {
            Some(split) => {
                tracing::info!(service, split = %split.describe(), "traffic split by version in force");
                self.groups = Some(Groups::new(split, self.groups.take(), &self.feed));
            }
            None => {
                tracing::info!(service, "traffic split removed: p2c over every instance");
                self.groups = None;
            }
        }
    }
}

impl Pool {
    fn discovery_settled(&mut self, cx: &mut Context<'_>) -> bool {
        if self.waited {
            return true;
        }
        self.synced.waker.register(cx.waker());
        if self.synced.is_set() {
            return true;
        }
        if self.wait.as_mut().poll(cx).is_ready() {
            self.waited = true;
        }
        self.waited
    }
}

impl Service<Request> for Pool {
    type Response = Response;
    type Error = BoxError;
    type Future = PoolFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Errors are never returned from here: they would fail whichever
        // caller polled. Failures go to the call instead.
        self.split.refresh(&self.service);
        if let Some(groups) = &mut self.split.groups {
            // With no named version having an instance, the whole pool serves.
            while let Some(i) = self.split.chosen.or_else(|| groups.pick()) {
                self.split.chosen = Some(i);
                let group = &mut groups.groups[i];
                match group.balance.poll_ready(cx) {
                    Poll::Ready(Ok(())) => {
                        self.route = Route::Group(i);
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::debug!(service = %self.service, version = %group.version, error = %e, "group not ready");
                        self.split.chosen = None;
                        self.route = Route::Refuse;
                        return Poll::Ready(Ok(()));
                    }
                    // The group lost its last instance while the call waited: pick again.
                    Poll::Pending if group.members() == 0 => self.split.chosen = None,
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
        match self.balance.poll_ready(cx) {
            Poll::Ready(Ok(())) => {
                self.route = Route::All;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                tracing::debug!(service = %self.service, error = %e, "balancer not ready");
                self.route = Route::Refuse;
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.balance.is_empty() && self.discovery_settled(cx) => {
                self.route = Route::Refuse;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let route = std::mem::replace(&mut self.route, Route::Refuse);
        if let Route::Group(i) = route {
            self.split.chosen = None;
            if let Some(group) = self.split.groups.as_mut().and_then(|g| g.groups.get_mut(i)) {
                return futures::future::Either::Left(group.balance.call(req));
            }
        }
        if let Route::All = route {
            futures::future::Either::Left(self.balance.call(req))
        } else {
            let status: tonic::Status = NoLiveInstance(self.service.clone()).into();
            futures::future::Either::Right(std::future::ready(Err(status.into())))
        }
    }
}

/// The pool had no instance to send the call to.
#[derive(Debug, thiserror::Error)]
#[error("no live instance of {0}")]
pub struct NoLiveInstance(Arc<str>);

impl From<NoLiveInstance> for tonic::Status {
    /// UNAVAILABLE, keeping the cause so retries can tell it was never sent.
    fn from(e: NoLiveInstance) -> Self {
        let mut status = tonic::Status::unavailable(e.to_string());
        status.set_source(Arc::new(e));
        status
    }
}

/// Whether the error says the request never left this process or was
/// refused before any application code saw it: always safe to retry.
pub(crate) fn never_sent(err: &(dyn std::error::Error + 'static)) -> bool {
    chain(err).any(|e| {
        e.downcast_ref::<NoLiveInstance>().is_some()
            || e.downcast_ref::<connection::NotSent>().is_some()
            || e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
            || e.downcast_ref::<h2::Error>().is_some_and(|h| h.reason() == Some(h2::Reason::REFUSED_STREAM))
    })
}

/// Whether the connection under the call was refused, reset or closed.
pub(crate) fn connection_lost(err: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::*;
    chain(err).any(|e| {
        e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                ConnectionRefused | ConnectionReset | ConnectionAborted | NotConnected | BrokenPipe | UnexpectedEof
            )
        }) || e.downcast_ref::<h2::Error>().is_some_and(|h| h.is_io() || h.is_go_away())
    })
}

fn chain<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |e| e.source())
}

#[cfg(test)]
mod tests;
