//! The gateway's listener and its dispatch.
//!
//! One listener speaks HTTP/1.1 and HTTP/2 cleartext. By content type:
//!
//! - `application/grpc-web*` → grpc-web translation (tonic-web), then as gRPC;
//! - `application/grpc*` → reflection and health answered here, every other
//!   `/package.Service/Method` passed through, bytes unchanged, to that
//!   service's balanced channel;
//! - anything else → `/openapi.json`, `/healthz`, or a REST route from the
//!   `google.api.http` annotations, transcoded to a unary gRPC call.
//!
//! Every call, whatever its protocol, passes the same per-client rate limit
//! and JWT policy, and gets an upstream deadline (`gateway.request_timeout_ms`,
//! or the client's own `grpc-timeout` if sooner).

use meshkit_common::h2guard::{FrameGuard, GuardLimits};
use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter, clock::Clock};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use meshkit_common::{
    BalancedChannel, ChannelBuilder, Mesh, MeshServer, deadline,
    metrics::{CallRecord, ObservedBody},
    server::Presence,
};
use serde_json::json;

use crate::settings::{GatewayConfig, GatewaySettings};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::body::Body;
use tower::{Layer, Service, ServiceExt, util::BoxCloneSyncService};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;

use crate::{
    auth::Auth,
    contracts::Contracts,
    errors::{json_response, refusal, status_response},
    openapi,
    routes::{RouteMatch, Router},
    transcode,
};

type LocalService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// Largest upstream response the gateway transcodes to JSON.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Metadata passed from a REST request to the upstream call.
const FORWARDED_HEADERS: &[&str] = &["traceparent", "tracestate", "x-request-id"];

/// Counts a request the gateway refused before any upstream call, by reason:
/// `rate_limited`, `unauthenticated`, `permission_denied`, `too_large`.
fn rejected(reason: &'static str) {
    REJECTIONS.get_or_create(&RejectionLabels { reason }).inc();
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RejectionLabels {
    reason: &'static str,
}

/// `meshkit_gateway_rejections_total{reason}`.
static REJECTIONS: std::sync::LazyLock<meshkit_common::metrics::CounterFamily<RejectionLabels>> =
    std::sync::LazyLock::new(|| {
        meshkit_common::metrics::counters(
            "meshkit_gateway_rejections",
            "Requests the gateway refused before calling upstream, by reason.",
        )
    });

/// Counts an authorization refusal by its status.
fn auth_refused(status: &tonic::Status) {
    rejected(if status.code() == tonic::Code::Unauthenticated { "unauthenticated" } else { "permission_denied" });
}

/// The per-client rate limiter, shared by every worker of a process.
pub type Limiter = DefaultKeyedRateLimiter<IpAddr>;

/// The limiter `settings` ask for, if any.
pub fn limiter(settings: &GatewaySettings) -> Option<Arc<Limiter>> {
    NonZeroU32::new(settings.rate_limit_per_sec).map(|rate| {
        let burst = NonZeroU32::new(settings.rate_limit_burst).unwrap_or(rate);
        Arc::new(RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)))
    })
}

/// What every connection of a worker shares.
pub struct Gateway {
    contracts: Contracts,
    router: Router,
    channels: HashMap<String, BalancedChannel>,
    auth: Auth,
    limiter: Option<Arc<Limiter>>,
    settings: GatewaySettings,
    openapi: Bytes,
    /// `request_timeout_ms` as a `grpc-timeout`, formatted once.
    timeout_header: HeaderValue,
    reflection_v1: LocalService,
    reflection_v1alpha: LocalService,
    health: LocalService,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Contracts(#[from] crate::contracts::ContractsError),
    #[error("a google.api.http annotation is wrong: {0}")]
    Route(#[from] crate::routes::RouteError),
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error(transparent)]
    Mesh(#[from] meshkit_common::Error),
}

impl From<meshkit_registry::Error> for StartError {
    fn from(err: meshkit_registry::Error) -> Self {
        StartError::Mesh(err.into())
    }
}

impl From<meshkit_common::tls::Error> for StartError {
    fn from(err: meshkit_common::tls::Error) -> Self {
        StartError::Mesh(err.into())
    }
}

impl Gateway {
    /// Reads the contracts and builds the routes, the auth policy and a
    /// balanced channel for every service the contracts define.
    pub fn new(
        settings: &GatewaySettings,
        channels: &ChannelBuilder,
        contracts: Contracts,
        limiter: Option<Arc<Limiter>>,
    ) -> Result<Self, StartError> {
        let router = Router::from_contracts(&contracts)?;
        let auth = Auth::from_settings(&settings.jwt).map_err(StartError::Config)?;
        let reflection = || {
            let mut builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET);
            for set in contracts.encoded() {
                builder = builder.register_encoded_file_descriptor_set(set);
            }
            // The services it fronts (not the mesh-internal ones), and what it
            // answers itself: health and reflection.
            for service in contracts.services() {
                builder = builder.with_service_name(service.full_name());
            }
            builder
                .with_service_name("grpc.health.v1.Health")
                .with_service_name("grpc.reflection.v1.ServerReflection")
                .with_service_name("grpc.reflection.v1alpha.ServerReflection")
        };
        let config_error = |e: tonic_reflection::server::Error| StartError::Config(format!("reflection: {e}"));
        let reflection_v1 = BoxCloneSyncService::new(reflection().build_v1().map_err(config_error)?);
        let reflection_v1alpha = BoxCloneSyncService::new(reflection().build_v1alpha().map_err(config_error)?);
        let (_reporter, health) = tonic_health::server::health_reporter();
        let upstreams =
            contracts.services().map(|s| (s.full_name().to_owned(), channels.balanced(s.full_name()))).collect();
        let openapi =
            Bytes::from(serde_json::to_vec_pretty(&openapi::document(&contracts, &router)).unwrap_or_default());
        Ok(Self {
            contracts,
            router,
            channels: upstreams,
            auth,
            limiter,
            settings: settings.clone(),
            openapi,
            timeout_header: deadline::format_grpc_timeout(Duration::from_millis(settings.request_timeout_ms)),
            reflection_v1,
            reflection_v1alpha,
            health: BoxCloneSyncService::new(health),
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.settings.request_timeout_ms)
    }

    /// Takes one request from `peer`'s allowance, or says how long to wait.
    fn admit(&self, peer: IpAddr) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        limiter.check_key(&peer).map_err(|not_until| {
            rejected("rate_limited");
            // The limiter's own clock: building one calibrates a new TSC
            // clock (about 15 µs), too dear for every refused request.
            not_until.wait_time_from(limiter.clock().now())
        })
    }

    /// The upstream deadline: the client's `grpc-timeout` if sooner than the
    /// configured one (then as the client wrote it).
    fn set_deadline(&self, headers: &mut HeaderMap) {
        deadline::cap_grpc_timeout(headers, self.timeout(), &self.timeout_header);
    }
}

// === dispatch ===

/// The tower service of one connection.
#[derive(Clone)]
pub struct Dispatch {
    gateway: Arc<Gateway>,
    peer: Peer,
}

/// A connection's client: its address, and that address as an
/// `x-forwarded-for` value, formatted once per connection rather than per
/// request.
#[derive(Clone)]
struct Peer {
    addr: SocketAddr,
    forwarded: Option<HeaderValue>,
}

impl Peer {
    fn new(addr: SocketAddr) -> Self {
        Self { addr, forwarded: HeaderValue::from_str(&addr.ip().to_string()).ok() }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Service<Request<Incoming>> for Dispatch {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let grpc = GrpcCall { gateway: self.gateway.clone(), peer: self.peer.clone() };
        if content_type.starts_with("application/grpc-web") {
            let mut web = tonic_web::GrpcWebLayer::new().layer(grpc);
            return Box::pin(async move { web.call(req).await });
        }
        if content_type.starts_with("application/grpc") {
            let mut grpc = grpc;
            return Box::pin(async move { grpc.call(req.map(Body::new)).await });
        }
        let gateway = self.gateway.clone();
        let peer = self.peer.clone();
        let span = meshkit_common::trace::http_server_span(req.method(), req.uri().path(), req.headers());
        Box::pin(async move {
            let res = rest(gateway, peer, req).instrument(span.clone()).await;
            meshkit_common::trace::record_http_status(&span, res.status());
            Ok(res)
        })
    }
}

/// A gRPC call (native, or translated from grpc-web).
#[derive(Clone)]
struct GrpcCall {
    gateway: Arc<Gateway>,
    peer: Peer,
}

impl Service<Request<Body>> for GrpcCall {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let gateway = self.gateway.clone();
        let peer = self.peer.clone();
        // The gateway's own hop: RED metrics and a server span whose child
        // is the upstream call.
        let record = CallRecord::server(req.uri().path(), req.headers());
        let span = record.span().clone();
        Box::pin(async move {
            let res = grpc(gateway, peer, req).instrument(span).await;
            let (parts, body) = res.into_parts();
            let body = Body::new(ObservedBody::new(body, record, &parts.headers));
            Ok(Response::from_parts(parts, body))
        })
    }
}

async fn grpc(gateway: Arc<Gateway>, peer: Peer, mut req: Request<Body>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let local = if path.starts_with("/grpc.reflection.v1.ServerReflection/") {
        Some(&gateway.reflection_v1)
    } else if path.starts_with("/grpc.reflection.v1alpha.ServerReflection/") {
        Some(&gateway.reflection_v1alpha)
    } else if path.starts_with("/grpc.health.v1.Health/") {
        Some(&gateway.health)
    } else {
        None
    };
    if let Some(service) = local {
        return match service.clone().oneshot(req).await {
            Ok(res) => res,
            Err(never) => match never {},
        };
    }
    let service = path.trim_start_matches('/').split('/').next().unwrap_or_default();
    let Some(channel) = gateway.channels.get(service) else {
        return tonic::Status::unimplemented(format!(
            "unknown service {service:?}: the gateway fronts {}",
            gateway.channels.keys().cloned().collect::<Vec<_>>().join(", ")
        ))
        .into_http();
    };
    if let Err(wait) = gateway.admit(peer.addr.ip()) {
        return rate_limited_status(&gateway, peer.addr, wait).into_http();
    }
    if let Err(status) = gateway.auth.authorize(&path, req.headers_mut()) {
        auth_refused(&status);
        return status.into_http();
    }
    gateway.set_deadline(req.headers_mut());
    forwarded_for(req.headers_mut(), &peer);
    // A unary request is read here, bounded, so an oversized one is refused
    // with a clear status instead of a reset mid-stream.
    let client_streaming = gateway.contracts.method(&path).is_none_or(|m| m.is_client_streaming());
    if !client_streaming {
        let (parts, body) = req.into_parts();
        let limit = gateway.settings.max_body_bytes as usize + 5;
        let bytes = match Limited::new(body, limit).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                rejected("too_large");
                return tonic::Status::resource_exhausted(format!(
                    "request message larger than gateway.max_body_bytes ({} bytes)",
                    gateway.settings.max_body_bytes
                ))
                .into_http();
            }
            Err(e) => return tonic::Status::cancelled(format!("reading the request failed: {e}")).into_http(),
        };
        req = Request::from_parts(parts, Body::new(Full::new(bytes)));
    }
    match channel.clone().oneshot(req).await {
        Ok(res) => res.map(Body::new),
        Err(e) => tonic::Status::from_error(e).into_http(),
    }
}

fn rate_limited_status(gateway: &Gateway, peer: SocketAddr, wait: Duration) -> tonic::Status {
    tonic::Status::resource_exhausted(format!(
        "rate limit of {} requests/s for {} exceeded; retry in {} ms",
        gateway.settings.rate_limit_per_sec,
        peer.ip(),
        wait.as_millis().max(1)
    ))
}

fn forwarded_for(headers: &mut HeaderMap, peer: &Peer) {
    const X_FORWARDED_FOR: http::HeaderName = http::HeaderName::from_static("x-forwarded-for");
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => HeaderValue::from_str(&format!("{prior}, {}", peer.addr.ip())).ok(),
        None => peer.forwarded.clone(),
    };
    if let Some(value) = value {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

// === REST ===

async fn rest(gateway: Arc<Gateway>, peer: Peer, req: Request<Incoming>) -> Response<Body> {
    let pool = gateway.contracts.pool();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    if method == Method::GET && path == "/openapi.json" {
        let mut res = Response::new(Body::new(Full::new(gateway.openapi.clone())));
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return res;
    }
    if method == Method::GET && path == "/healthz" {
        return json_response(StatusCode::OK, &json!({"status": "ok"}));
    }
    if let Err(wait) = gateway.admit(peer.addr.ip()) {
        let mut res = status_response(&rate_limited_status(&gateway, peer.addr, wait), None);
        let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
        res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        return res;
    }
    if percent_encoding::percent_decode_str(&path).decode_utf8().is_err() {
        return refusal(
            StatusCode::BAD_REQUEST,
            tonic::Code::InvalidArgument,
            format!("the path {path} is not valid UTF-8 once percent-decoded"),
        );
    }
    let (route, captures) = match gateway.router.find(&method, &path) {
        RouteMatch::Found(route, captures) => {
            meshkit_common::trace::record_route(&tracing::Span::current(), &method, &route.template);
            (route, captures)
        }
        RouteMatch::MethodNotAllowed(allowed) => {
            let names: Vec<&str> = allowed.iter().map(Method::as_str).collect();
            let mut res = refusal(
                StatusCode::METHOD_NOT_ALLOWED,
                tonic::Code::Unimplemented,
                format!("{method} is not allowed on {path}; allowed: {}", names.join(", ")),
            );
            if let Ok(v) = HeaderValue::from_str(&names.join(", ")) {
                res.headers_mut().insert(header::ALLOW, v);
            }
            return res;
        }
        RouteMatch::NotFound => {
            return refusal(StatusCode::NOT_FOUND, tonic::Code::NotFound, format!("no route for {method} {path}"));
        }
    };
    let (mut parts, body) = req.into_parts();
    let limit = gateway.settings.max_body_bytes as usize;
    let body = match Limited::new(body, limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            rejected("too_large");
            return refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                tonic::Code::ResourceExhausted,
                format!("request body larger than gateway.max_body_bytes ({limit} bytes)"),
            );
        }
        Err(e) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                tonic::Code::Cancelled,
                format!("reading the request body failed: {e}"),
            );
        }
    };
    if !body.iter().all(u8::is_ascii_whitespace) {
        let content_type = parts.headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
        if !(essence.is_empty() || essence == "application/json" || essence.ends_with("+json")) {
            return refusal(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                tonic::Code::InvalidArgument,
                format!("content type {content_type:?} is not accepted; send application/json"),
            );
        }
    }
    if let Err(status) = gateway.auth.authorize(&route.grpc_path, &mut parts.headers) {
        auth_refused(&status);
        let mut res = status_response(&status, None);
        if status.code() == tonic::Code::Unauthenticated {
            res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        return res;
    }
    let message = match transcode::request_message(route, captures, parts.uri.query(), &body) {
        Ok(m) => m,
        Err(bad) => return status_response(&tonic::Status::invalid_argument(bad.0), None),
    };
    let Some(channel) = gateway.channels.get(route.method.parent_service().full_name()) else {
        return status_response(&tonic::Status::unimplemented("no channel for the route's service"), None);
    };
    let mut upstream = Request::new(Body::new(Full::new(transcode::frame(&message))));
    *upstream.method_mut() = Method::POST;
    *upstream.uri_mut() = match route.grpc_path.parse() {
        Ok(uri) => uri,
        Err(_) => return status_response(&tonic::Status::internal("unroutable method path"), None),
    };
    *upstream.version_mut() = http::Version::HTTP_2;
    let headers = upstream.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    for name in
        FORWARDED_HEADERS.iter().chain(&[crate::auth::SUBJECT_HEADER, crate::auth::CLAIMS_HEADER, "grpc-timeout"])
    {
        if let Some(v) = parts.headers.get(*name) {
            headers.insert(*name, v.clone());
        }
    }
    // `Grpc-Metadata-X: v` from a REST client becomes metadata `x: v`.
    for (name, value) in &parts.headers {
        if let Some(key) = name.as_str().strip_prefix("grpc-metadata-") {
            if let Ok(key) = http::HeaderName::from_bytes(key.as_bytes()) {
                headers.append(key, value.clone());
            }
        }
    }
    gateway.set_deadline(headers);
    forwarded_for(headers, &peer);
    let guard = gateway.timeout() + Duration::from_secs(1);
    let response = match tokio::time::timeout(guard, channel.clone().oneshot(upstream)).await {
        Ok(Ok(res)) => res,
        Ok(Err(e)) => return status_response(&tonic::Status::from_error(e), Some(pool)),
        Err(_) => {
            return status_response(
                &tonic::Status::deadline_exceeded(format!("{} did not answer in time", route.grpc_path)),
                None,
            );
        }
    };
    let (head, body) = response.into_parts();
    if let Some(status) = tonic::Status::from_header_map(&head.headers) {
        if status.code() != tonic::Code::Ok {
            return status_response(&status, Some(pool));
        }
    }
    let collected = match tokio::time::timeout(guard, Limited::new(body, MAX_RESPONSE_BYTES).collect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return status_response(
                &tonic::Status::unavailable(format!("reading the upstream response failed: {e}")),
                None,
            );
        }
        Err(_) => {
            return status_response(
                &tonic::Status::deadline_exceeded("the upstream response did not finish in time"),
                None,
            );
        }
    };
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status = tonic::Status::from_header_map(&trailers)
        .unwrap_or_else(|| tonic::Status::internal("the upstream ended the call without a grpc-status"));
    if status.code() != tonic::Code::Ok {
        return status_response(&status, Some(pool));
    }
    let rendered = transcode::split_frames(collected.to_bytes()).and_then(|frames| transcode::render(route, &frames));
    match rendered {
        Ok(json) => {
            let mut res = Response::new(Body::new(Full::new(Bytes::from(json))));
            res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            if let Some(instance) = head.headers.get(meshkit_common::server::INSTANCE_HEADER) {
                res.headers_mut().insert(meshkit_common::server::INSTANCE_HEADER, instance.clone());
            }
            res
        }
        Err(problem) => status_response(&tonic::Status::internal(problem), None),
    }
}

// === the listener ===

/// A started gateway.
pub struct RunningGateway {
    addr: SocketAddr,
    /// The admin endpoint and the registration (the first worker's).
    presence: Option<Presence>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    /// Keeps the config center following etcd.
    _mesh: Mesh<GatewayConfig>,
}

impl RunningGateway {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.presence.as_ref().and_then(Presence::admin_addr)
    }

    /// Serves until `stop` resolves, then shuts down.
    pub async fn run_until(self, stop: impl Future<Output = ()>) {
        stop.await;
        self.shutdown().await;
    }

    /// Stops accepting, lets open requests finish (bounded by
    /// `server.drain_timeout_ms`), closes the connections.
    pub async fn shutdown(mut self) {
        let mut presence = self.presence.take();
        if let Some(presence) = &mut presence {
            presence.deregister().await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
        if let Some(presence) = presence {
            presence.stop().await;
        }
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects etcd, reads the contracts, binds `gateway.listen` and serves on
/// the current runtime. The binary runs one of these per core instead (see
/// [`crate::workers`]).
pub async fn start(config: GatewayConfig) -> Result<RunningGateway, StartError> {
    let listen = config.gateway.listen.clone();
    let limiter = limiter(&config.gateway);
    start_worker(config, &listen, false, true, limiter).await
}

/// One worker: its own etcd client, balanced channels and listener on
/// `listen` (shared with the other workers through SO_REUSEPORT when
/// `reuse_port`), so a connection and its upstream calls stay on one thread.
pub(crate) async fn start_worker(
    config: GatewayConfig,
    listen: &str,
    reuse_port: bool,
    first: bool,
    limiter: Option<Arc<Limiter>>,
) -> Result<RunningGateway, StartError> {
    let contracts = Contracts::load(&config.gateway.descriptor_sets)?;
    // What every process starts from: etcd, the config center, the
    // calling-side governance of the upstream channels (breakers,
    // throttling, method timeouts, retries and traffic splits; with no rule
    // set a call pays one atomic read), mTLS to the services with the
    // gateway's own identity when `tls` is on, and the live log filter. The
    // per-client limit is the gateway's own.
    let mesh = Mesh::connect(&config, COMPONENT).await?;
    let config = mesh.config();
    let channels = mesh.channels.clone().with_methods(contracts.method_table());
    let edge_tls = if config.gateway.tls_cert_file.is_empty() {
        None
    } else {
        Some(meshkit_common::tls::EdgeTls::load(
            "gateway",
            &config.gateway.tls_cert_file,
            &config.gateway.tls_key_file,
            &[b"h2", b"http/1.1"],
        )?)
    };
    let gateway = Arc::new(Gateway::new(&config.gateway, &channels, contracts, limiter)?);
    let listen_error = |source| StartError::Listen { addr: listen.to_owned(), source };
    let listener = bind(listen, reuse_port).map_err(listen_error)?;
    let addr = listener.local_addr().map_err(listen_error)?;
    // One admin endpoint and one registration per process (the first
    // worker's), from the shared server builder: the gateway shows in
    // `meshctl instances` and scrape-target discovery, with its pools,
    // governance and config-center status on the admin endpoint.
    let presence = if first {
        Some(MeshServer::new(config.clone()).with_mesh(&mesh).start_beside(addr, GATEWAY_SERVICE).await?)
    } else {
        None
    };
    if gateway.limiter.is_some() && first {
        // Forget idle clients now and then so the limiter's memory stays bounded.
        let weak = Arc::downgrade(&gateway);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tick.tick().await;
                let Some(gateway) = weak.upgrade() else { return };
                if let Some(limiter) = &gateway.limiter {
                    limiter.retain_recent();
                    limiter.shrink_to_fit();
                }
            }
        });
    }
    let cors = cors_layer(&config.gateway.cors_origins).map_err(StartError::Config)?;
    let drain = Duration::from_millis(config.server.drain_timeout_ms);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let header_limit = config.gateway.max_header_bytes as usize;
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(header_limit.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(header_limit as u32)
        .max_concurrent_streams(config.gateway.max_concurrent_streams)
        // A peer that stops answering (gone, or never reading) is closed.
        .keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .max_send_buf_size(64 * 1024);
    let limits = GuardLimits { control_frames_per_sec: config.server.control_frames_per_sec };
    let (stop_tx, stop_rx) = oneshot::channel();
    let connections = Connections { builder, limits, edge_tls };
    let task = tokio::spawn(serve(listener, connections, gateway, cors, stop_rx, drain));
    tracing::debug!(%addr, admin = ?presence.as_ref().and_then(Presence::admin_addr), "gateway worker listening");
    Ok(RunningGateway { addr, presence, stop: Some(stop_tx), task, _mesh: mesh })
}

/// The component name the gateway reads its settings under.
pub const COMPONENT: &str = "gateway";

/// The service name the gateway registers under.
pub const GATEWAY_SERVICE: &str = "meshkit.gateway";

fn bind(listen: &str, reuse_port: bool) -> std::io::Result<TcpListener> {
    let addr: SocketAddr =
        listen.parse().map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not an address"))?;
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

fn cors_layer(origins: &[String]) -> Result<Option<CorsLayer>, String> {
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        let values = origins
            .iter()
            .map(|o| HeaderValue::from_str(o).map_err(|_| format!("gateway.cors_origins: {o:?} is not an origin")))
            .collect::<Result<Vec<_>, _>>()?;
        AllowOrigin::list(values)
    };
    let header = |names: &[&'static str]| names.iter().map(|n| http::HeaderName::from_static(n)).collect::<Vec<_>>();
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH, Method::DELETE, Method::OPTIONS])
            .allow_headers(header(&[
                "content-type",
                "authorization",
                "x-grpc-web",
                "x-user-agent",
                "grpc-timeout",
                "x-request-id",
                "traceparent",
                "tracestate",
            ]))
            .expose_headers(header(&["grpc-status", "grpc-message", "grpc-status-details-bin", "x-meshkit-instance"]))
            .max_age(Duration::from_secs(86_400)),
    ))
}

/// How the listener's connections are served: HTTP (both versions), the
/// frame guard's limits and, for HTTPS, the edge certificate.
struct Connections {
    builder: auto::Builder<TokioExecutor>,
    limits: GuardLimits,
    edge_tls: Option<Arc<meshkit_common::tls::EdgeTls>>,
}

async fn serve(
    listener: TcpListener,
    connections: Connections,
    gateway: Arc<Gateway>,
    cors: Option<CorsLayer>,
    mut stop: oneshot::Receiver<()>,
    drain: Duration,
) {
    let Connections { builder, limits, edge_tls } = connections;
    let graceful = GracefulShutdown::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let dispatch = Dispatch { gateway: gateway.clone(), peer: Peer::new(peer) };
        let service = tower::util::option_layer(cors.clone()).layer(dispatch);
        let Some(edge) = edge_tls.clone() else {
            let stream = FrameGuard::new(stream, Some(peer), limits);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service));
            let conn = graceful.watch(conn.into_owned());
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
            });
            continue;
        };
        // HTTPS: the handshake on the connection's own task (bounded), then
        // HTTP/2 or HTTP/1.1 as ALPN chose.
        let watcher = graceful.watcher();
        let builder = builder.clone();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(Duration::from_secs(10), edge.accept(stream)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    meshkit_common::tls::handshake_failed("edge");
                    tracing::debug!(%peer, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    meshkit_common::tls::handshake_failed("edge");
                    return;
                }
            };
            let stream = FrameGuard::new(stream, Some(peer), limits);
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service));
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown()).await.is_err() {
        tracing::warn!(?drain, "connections still open after the drain timeout; closing them");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_forwarded_for_names_the_client_after_any_proxies_before_it() {
        let peer = Peer::new("10.0.0.7:41000".parse().expect("address"));
        let after = |prior: Option<&'static str>| {
            let mut headers = HeaderMap::new();
            if let Some(prior) = prior {
                headers.insert("x-forwarded-for", HeaderValue::from_static(prior));
            }
            forwarded_for(&mut headers, &peer);
            let all: Vec<_> = headers.get_all("x-forwarded-for").iter().map(|v| v.to_str().unwrap_or("?")).collect();
            all.join(" | ")
        };
        assert_eq!(after(None), "10.0.0.7");
        assert_eq!(after(Some("203.0.113.9")), "203.0.113.9, 10.0.0.7");
        assert_eq!(after(Some("203.0.113.9, 198.51.100.2")), "203.0.113.9, 198.51.100.2, 10.0.0.7");
        let v6 = Peer::new("[2001:db8::1]:443".parse().expect("address"));
        let mut headers = HeaderMap::new();
        forwarded_for(&mut headers, &v6);
        assert_eq!(headers.get("x-forwarded-for").map(|v| v.to_str().unwrap_or("?")), Some("2001:db8::1"));
    }
}
