//! Balanced channels: a service name in, a tonic-compatible `tower::Service` out.
//!
//! ```text
//! etcd prefix watch (discovery) ──Change<id, Instance>──▶ per-endpoint stack
//!                                                            │
//!   caller ─▶ BalancedChannel (Buffer) ─▶ Pool (fail fast) ─▶ p2c Balance ─▶ PeakEwma ─▶ tonic Channel ─▶ h2
//! ```
//!
//! Layer order, outermost first (the full stack as the mesh grows):
//! tracing and metrics → deadline → retry with budget → circuit breaker →
//! **balancer** → per-endpoint concurrency limit and timeout → **transport**.
//! The balancer and transport are here; the rest wrap [`BalancedChannel`] from
//! outside or each endpoint from inside, at these positions.
//!
//! Load is real: peak EWMA of latency, weighted by calls in flight, where a
//! call stays in flight until its response body ends (see [`body`]). tonic's
//! own `balance_channel` reports no load at all.

pub mod body;

use std::{
    collections::HashMap,
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
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tower::{
    BoxError, Service,
    balance::p2c::Balance,
    buffer::Buffer,
    discover::Change,
    load::{PeakEwmaDiscover, peak_ewma::Handle},
};

use self::body::{CompleteOnBodyEnd, TrackedBody};
use crate::{
    discovery::{self, ServiceWatch},
    registry::{Instance, service_prefix},
};

type Request = http::Request<tonic::body::Body>;
/// The body of a balanced channel's responses.
pub type ResponseBody = TrackedBody<tonic::body::Body, Handle>;
type Response = http::Response<ResponseBody>;
type BoxFuture = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;
type EndpointStream = Pin<Box<dyn Stream<Item = Result<Change<String, Channel>, BoxError>> + Send>>;

/// Settings of every balanced channel a builder makes.
#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// TCP connect timeout per endpoint.
    pub connect_timeout: Duration,
    /// RTT assumed for an endpoint before it has answered.
    pub default_rtt: Duration,
    /// How fast the latency estimate forgets a peak.
    pub ewma_decay: Duration,
    /// Calls queued in front of the balancer.
    pub buffer: usize,
    /// How long a call waits for the first discovery read before failing.
    pub discovery_wait: Duration,
    /// HTTP/2 keepalive ping interval on each connection.
    pub http2_keepalive: Duration,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_millis(500),
            default_rtt: Duration::from_millis(5),
            ewma_decay: Duration::from_secs(5),
            buffer: 1024,
            discovery_wait: Duration::from_secs(3),
            http2_keepalive: Duration::from_secs(10),
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
}

/// Makes balanced channels, one pool per service shared by every caller.
#[derive(Clone)]
pub struct ChannelBuilder {
    client: Client,
    prefix: String,
    config: ChannelConfig,
    pools: Arc<Mutex<HashMap<String, BalancedChannel>>>,
}

impl ChannelBuilder {
    /// `prefix` is the etcd root (`/meshkit` by default).
    pub fn new(client: Client, prefix: impl Into<String>) -> Self {
        Self { client, prefix: prefix.into(), config: ChannelConfig::default(), pools: Arc::default() }
    }

    pub fn with_config(mut self, config: ChannelConfig) -> Self {
        self.config = config;
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
        let channel = BalancedChannel::from_watch(service, watch, &self.config);
        pools.insert(service.to_owned(), channel.clone());
        channel
    }
}

/// A load-balanced channel to one service; use it wherever a tonic client
/// takes a channel: `UserServiceClient::new(channel)`.
#[derive(Clone)]
pub struct BalancedChannel {
    inner: Buffer<Request, BoxFuture>,
}

impl BalancedChannel {
    /// A channel over any discovery source; `synced` says the first full read
    /// has been delivered. [`ChannelBuilder::balanced`] feeds it from etcd.
    pub fn from_watch(service: &str, watch: ServiceWatch, config: &ChannelConfig) -> Self {
        let ServiceWatch { changes, synced } = watch;
        let config_ = config.clone();
        let service_name: Arc<str> = Arc::from(service);
        let name = service_name.clone();
        let endpoints: EndpointStream = Box::pin(ReceiverStream::new(changes).filter_map(move |change| {
            let result = match change {
                Change::Remove(id) => Some(Ok(Change::Remove(id))),
                Change::Insert(id, instance) => match endpoint(&instance, &config_) {
                    Ok(ep) => Some(Ok(Change::Insert(id, ep.connect_lazy()))),
                    Err(e) => {
                        tracing::warn!(service = %name, instance = %id, addr = %instance.addr, error = %e, "skipping an instance with an unusable address");
                        None
                    }
                },
            };
            std::future::ready(result)
        }));
        let discover =
            PeakEwmaDiscover::new::<Request>(endpoints, config.default_rtt, config.ewma_decay, CompleteOnBodyEnd);
        let pool = Pool {
            balance: Balance::new(discover),
            synced,
            wait: Box::pin(tokio::time::sleep(config.discovery_wait)),
            waited: false,
            route_to_balance: false,
            service: service_name,
        };
        Self { inner: Buffer::new(pool, config.buffer) }
    }
}

fn endpoint(instance: &Instance, config: &ChannelConfig) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{}", instance.addr))?
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(config.http2_keepalive)
        .keep_alive_while_idle(true))
}

impl Service<Request> for BalancedChannel {
    type Response = Response;
    type Error = BoxError;
    type Future = tower::buffer::future::ResponseFuture<BoxFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        self.inner.call(req)
    }
}

/// The balancer, answering UNAVAILABLE at once when the service has no
/// instance (after the first discovery read) instead of queueing forever.
struct Pool {
    balance: Balance<PeakEwmaDiscover<EndpointStream, CompleteOnBodyEnd>, Request>,
    synced: Arc<AtomicBool>,
    wait: Pin<Box<tokio::time::Sleep>>,
    waited: bool,
    route_to_balance: bool,
    service: Arc<str>,
}

impl Pool {
    fn discovery_settled(&mut self, cx: &mut Context<'_>) -> bool {
        if self.synced.load(Ordering::Acquire) || self.waited {
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
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Errors are never returned from here: a Buffer whose service fails
        // readiness closes for good. Failures go to the call instead.
        match self.balance.poll_ready(cx) {
            Poll::Ready(Ok(())) => {
                self.route_to_balance = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => {
                tracing::debug!(service = %self.service, error = %e, "balancer not ready");
                self.route_to_balance = false;
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.balance.is_empty() && self.discovery_settled(cx) => {
                self.route_to_balance = false;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, req: Request) -> Self::Future {
        if std::mem::take(&mut self.route_to_balance) {
            Box::pin(self.balance.call(req))
        } else {
            let status = tonic::Status::unavailable(format!("no live instance of {}", self.service));
            Box::pin(std::future::ready(Err(status.into())))
        }
    }
}

#[cfg(test)]
mod tests;
