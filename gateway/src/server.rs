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
//! Every call, whatever its protocol, passes the same admission layers
//! ([`crate::admission`]): the per-client rate limit, the JWT policy, and an
//! upstream deadline (`gateway.request_timeout_ms`, or the client's own
//! `grpc-timeout` if sooner) with `x-forwarded-for`.

use meshkit_common::h2guard::{FrameGuard, GuardLimits};
use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    num::NonZeroU32,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use governor::{Quota, RateLimiter};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use meshkit_common::{
    BalancedChannel, ChannelBuilder, Mesh, MeshServer,
    metrics::{CallRecord, ObservedBody},
    server::Presence,
};
use serde_json::json;

use crate::settings::{GatewayConfig, GatewaySettings};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::body::Body;
use tower::{Layer, Service, ServiceBuilder, ServiceExt, util::BoxCloneSyncService};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::Instrument;

use crate::{
    admission::{
        Admit, AdmitLayer, Admitted, AsGrpc, Jwt, Limiter, MethodPath, Peer, RateLimit, Refusal, Refuse, Upstream,
        UpstreamLayer, rejected,
    },
    auth::Auth,
    contracts::Contracts,
    errors::{json_response, refusal, status_response},
    openapi,
    routes::{Route, RouteMatch, Router},
    template::Captures,
    transcode,
};

type LocalService = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// Largest upstream response the gateway transcodes to JSON.
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// Metadata passed from a REST request to the upstream call.
const FORWARDED_HEADERS: &[&str] = &["traceparent", "tracestate", "x-request-id"];

/// The limiter `settings` ask for, if any.
fn limiter(settings: &GatewaySettings) -> Option<Arc<Limiter>> {
    NonZeroU32::new(settings.rate_limit_per_sec).map(|rate| {
        let burst = NonZeroU32::new(settings.rate_limit_burst).unwrap_or(rate);
        Arc::new(RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)))
    })
}

/// What every worker of a process shares, built once from the contracts
/// and the settings (by the first worker to start, with the config
/// center's settings in force then): the routes, the auth policy, the
/// per-client limiter, the OpenAPI document, and health and reflection.
/// Only the balanced channels are a worker's own.
pub struct Frontage {
    contracts: Contracts,
    router: Router,
    auth: Arc<Auth>,
    limiter: Option<Arc<Limiter>>,
    settings: GatewaySettings,
    openapi: Bytes,
    reflection_v1: LocalService,
    reflection_v1alpha: LocalService,
    health: LocalService,
}

/// Where the workers of a process find their [`Frontage`]: empty until the
/// first worker builds it.
pub type SharedFrontage = Arc<std::sync::Mutex<Option<Arc<Frontage>>>>;

/// What every connection of a worker shares: the process's frontage and
/// the worker's balanced channel for every service the contracts define.
pub struct Gateway {
    front: Arc<Frontage>,
    channels: HashMap<String, BalancedChannel>,
}

impl std::ops::Deref for Gateway {
    type Target = Frontage;

    fn deref(&self) -> &Frontage {
        &self.front
    }
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

impl Frontage {
    /// Reads the contracts and builds the routes, the auth policy, the
    /// limiter, the OpenAPI document, health and reflection.
    pub fn new(settings: &GatewaySettings) -> Result<Self, StartError> {
        let contracts = Contracts::load(&settings.descriptor_sets)?;
        let router = Router::from_contracts(&contracts)?;
        let auth = Arc::new(Auth::from_settings(&settings.jwt).map_err(StartError::Config)?);
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
        let openapi =
            Bytes::from(serde_json::to_vec_pretty(&openapi::document(&contracts, &router)).unwrap_or_default());
        Ok(Self {
            contracts,
            router,
            auth,
            limiter: limiter(settings),
            settings: settings.clone(),
            openapi,
            reflection_v1,
            reflection_v1alpha,
            health: BoxCloneSyncService::new(health),
        })
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.settings.request_timeout_ms)
    }

    /// The process's frontage: `shared`'s, or built from `settings` and
    /// kept there when this is the first worker to ask.
    pub fn shared(shared: &SharedFrontage, settings: &GatewaySettings) -> Result<Arc<Self>, StartError> {
        let mut slot = shared.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(front) = &*slot {
            return Ok(front.clone());
        }
        let front = Arc::new(Self::new(settings)?);
        *slot = Some(front.clone());
        Ok(front)
    }
}

impl Gateway {
    /// A worker's gateway: a balanced channel for every service the
    /// contracts define.
    pub fn new(front: Arc<Frontage>, channels: &ChannelBuilder) -> Self {
        let channels =
            front.contracts.services().map(|s| (s.full_name().to_owned(), channels.balanced(s.full_name()))).collect();
        Self { front, channels }
    }
}

// === dispatch ===

/// The tower service of one connection: gRPC, grpc-web and REST, each
/// through the shared admission layers ([`crate::admission`]) built once
/// for the connection's client.
#[derive(Clone)]
pub struct Dispatch {
    gateway: Arc<Gateway>,
    grpc: GrpcCall,
    rest: RestStack,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type CallFuture = BoxFuture<Result<Response<Body>, Infallible>>;

/// A passthrough call after admission: client → rate limit → JWT →
/// upstream metadata → the balanced channel.
type GrpcStack = Admit<Admit<Upstream<Passthrough>, Jwt, AsGrpc>, RateLimit, AsGrpc>;

/// A REST call: rate limit → route → JWT (the policy of the route's
/// method) → transcode → upstream metadata → the balanced channel.
type RestStack = Admit<RestRoute<Admit<RestCall, Jwt, AsJson>>, RateLimit, AsJson>;

impl Dispatch {
    pub fn new(gateway: Arc<Gateway>, client: SocketAddr) -> Self {
        let peer = Peer::new(client);
        let settings = &gateway.settings;
        let rate_limit = RateLimit::new(gateway.limiter.clone(), settings.rate_limit_per_sec, client.ip());
        let jwt = Jwt(gateway.auth.clone());
        let upstream = UpstreamLayer::new(gateway.timeout(), peer);
        let passthrough = |collect_unary| Passthrough { gateway: gateway.clone(), collect_unary };
        let grpc = ServiceBuilder::new()
            .layer(AdmitLayer::new(rate_limit.clone(), AsGrpc))
            .layer(AdmitLayer::new(jwt.clone(), AsGrpc))
            .layer(upstream.clone())
            .service(passthrough(true));
        let rest = ServiceBuilder::new()
            .layer(AdmitLayer::new(rate_limit, AsJson))
            .layer_fn(|inner| RestRoute { gateway: gateway.clone(), inner })
            .layer(AdmitLayer::new(jwt, AsJson))
            .service(RestCall { gateway: gateway.clone(), upstream: upstream.layer(passthrough(false)) });
        Self { gateway: gateway.clone(), grpc: GrpcCall { gateway: gateway.clone(), admitted: grpc }, rest }
    }
}

impl Service<Request<Incoming>> for Dispatch {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if content_type.starts_with("application/grpc-web") {
            let mut web = tonic_web::GrpcWebLayer::new().layer(self.grpc.clone());
            return Box::pin(async move { web.call(req).await });
        }
        if content_type.starts_with("application/grpc") {
            return self.grpc.call(req.map(Body::new));
        }
        let gateway = self.gateway.clone();
        let rest = self.rest.clone();
        let span = meshkit_common::trace::http_server_span(req.method(), req.uri().path(), req.headers());
        Box::pin(async move {
            let res = rest_or_local(gateway, rest, req).instrument(span.clone()).await;
            meshkit_common::trace::record_http_status(&span, res.status());
            Ok(res)
        })
    }
}

/// A gRPC call (native, or translated from grpc-web): health and
/// reflection answered here, every other call admitted and passed through.
#[derive(Clone)]
struct GrpcCall {
    gateway: Arc<Gateway>,
    admitted: GrpcStack,
}

impl Service<Request<Body>> for GrpcCall {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        // The gateway's own hop: RED metrics and a server span whose child
        // is the upstream call.
        let record = CallRecord::server(req.uri().path(), req.headers());
        let span = record.span().clone();
        let path = req.uri().path();
        let local = if path.starts_with("/grpc.reflection.v1.ServerReflection/") {
            Some(&self.gateway.reflection_v1)
        } else if path.starts_with("/grpc.reflection.v1alpha.ServerReflection/") {
            Some(&self.gateway.reflection_v1alpha)
        } else if path.starts_with("/grpc.health.v1.Health/") {
            Some(&self.gateway.health)
        } else {
            None
        };
        // Passthrough runs the admission steps here, inside the call's span
        // (each is ready at once: none holds capacity); the future they
        // return is awaited below without a box of its own.
        let answer = match local {
            Some(service) => Err((service.clone(), req)),
            None => {
                let _entered = span.enter();
                Ok(self.admitted.call(req))
            }
        };
        Box::pin(async move {
            let answered = match answer {
                Ok(admitted) => admitted.instrument(span).await,
                Err((local, req)) => local.oneshot(req).instrument(span).await,
            };
            let res = match answered {
                Ok(res) => res,
                Err(never) => match never {},
            };
            let (parts, body) = res.into_parts();
            let body = Body::new(ObservedBody::new(body, record, &parts.headers));
            Ok(Response::from_parts(parts, body))
        })
    }
}

/// The innermost service of every protocol: the balanced channel of the
/// service the path names. With `collect_unary`, a unary request is read
/// here first, bounded, so an oversized one is refused with a clear status
/// instead of a reset mid-stream.
#[derive(Clone)]
pub struct Passthrough {
    gateway: Arc<Gateway>,
    collect_unary: bool,
}

impl Service<Request<Body>> for Passthrough {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let gateway = self.gateway.clone();
        let collect_unary = self.collect_unary;
        Box::pin(async move { Ok(passthrough(gateway, collect_unary, req).await) })
    }
}

async fn passthrough(gateway: Arc<Gateway>, collect_unary: bool, mut req: Request<Body>) -> Response<Body> {
    let path = req.uri().path();
    let service = path.trim_start_matches('/').split('/').next().unwrap_or_default();
    let Some(channel) = gateway.channels.get(service) else {
        return tonic::Status::unimplemented(format!(
            "unknown service {service:?}: the gateway fronts {}",
            gateway.channels.keys().cloned().collect::<Vec<_>>().join(", ")
        ))
        .into_http();
    };
    if collect_unary && gateway.contracts.method(path).is_some_and(|m| !m.is_client_streaming()) {
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

// === REST ===

/// REST refusals: the status as a JSON error with its HTTP code, with
/// `Retry-After` on a rate-limit refusal and `WWW-Authenticate` when a
/// token is missing or invalid.
#[derive(Debug, Clone, Copy)]
pub struct AsJson;

impl Refuse for AsJson {
    fn refuse(&self, refusal: Refusal) -> Response<Body> {
        let mut res = status_response(refusal.status(), None);
        match refusal {
            Refusal::RateLimited { wait, .. } => {
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            Refusal::Auth(status) if status.code() == tonic::Code::Unauthenticated => {
                res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Refusal::Auth(_) => {}
        }
        res
    }
}

/// What the gateway answers itself, unlimited: the OpenAPI document and
/// its own health. Everything else is a REST call.
async fn rest_or_local(gateway: Arc<Gateway>, rest: RestStack, req: Request<Incoming>) -> Response<Body> {
    let method = req.method();
    let path = req.uri().path();
    if method == Method::GET && path == "/openapi.json" {
        let mut res = Response::new(Body::new(Full::new(gateway.openapi.clone())));
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        return res;
    }
    if method == Method::GET && path == "/healthz" {
        return json_response(StatusCode::OK, &json!({"status": "ok"}));
    }
    match rest.oneshot(req).await {
        Ok(res) => res,
        Err(never) => match never {},
    }
}

/// The route a REST request matched, for the steps after routing.
#[derive(Clone)]
struct Routed {
    route: Arc<Route>,
    captures: Captures,
}

/// Finds the REST request's route, or answers 400, 404 or 405; the route
/// and its method (for the JWT policy) go on as request extensions.
#[derive(Clone)]
pub struct RestRoute<S> {
    gateway: Arc<Gateway>,
    inner: S,
}

impl<S> Service<Request<Incoming>> for RestRoute<S>
where
    S: Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Admitted<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let refused = |res| Admitted::Refused(Some(res));
        let method = req.method().clone();
        let path = req.uri().path();
        if percent_encoding::percent_decode_str(path).decode_utf8().is_err() {
            return refused(refusal(
                StatusCode::BAD_REQUEST,
                tonic::Code::InvalidArgument,
                format!("the path {path} is not valid UTF-8 once percent-decoded"),
            ));
        }
        let routed = match self.gateway.router.find(&method, path) {
            RouteMatch::Found(route, captures) => {
                meshkit_common::trace::record_route(&tracing::Span::current(), &method, &route.template);
                Routed { route: route.clone(), captures }
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
                return refused(res);
            }
            RouteMatch::NotFound => {
                return refused(refusal(
                    StatusCode::NOT_FOUND,
                    tonic::Code::NotFound,
                    format!("no route for {method} {path}"),
                ));
            }
        };
        req.extensions_mut().insert(MethodPath(routed.route.grpc_path.clone()));
        req.extensions_mut().insert(routed);
        Admitted::Inner(self.inner.call(req))
    }
}

/// An admitted REST call: reads and checks the body, transcodes it to the
/// route's gRPC request, calls it through `upstream` and renders the
/// answer as JSON.
#[derive(Clone)]
pub struct RestCall {
    gateway: Arc<Gateway>,
    upstream: Upstream<Passthrough>,
}

impl Service<Request<Incoming>> for RestCall {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = CallFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let (gateway, upstream) = (self.gateway.clone(), self.upstream.clone());
        Box::pin(async move { Ok(rest(gateway, upstream, req).await) })
    }
}

async fn rest(gateway: Arc<Gateway>, upstream: Upstream<Passthrough>, req: Request<Incoming>) -> Response<Body> {
    let pool = gateway.contracts.pool();
    let (mut parts, body) = req.into_parts();
    let Some(Routed { route, captures }) = parts.extensions.remove::<Routed>() else {
        return status_response(&tonic::Status::internal("a REST call reached transcoding without a route"), None);
    };
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
    let message = match transcode::request_message(&route, captures, parts.uri.query(), &body) {
        Ok(m) => m,
        Err(bad) => return status_response(&tonic::Status::invalid_argument(bad.0), None),
    };
    let mut call = Request::new(Body::new(Full::new(transcode::frame(&message))));
    *call.method_mut() = Method::POST;
    *call.uri_mut() = match route.grpc_path.parse() {
        Ok(uri) => uri,
        Err(_) => return status_response(&tonic::Status::internal("unroutable method path"), None),
    };
    *call.version_mut() = http::Version::HTTP_2;
    let headers = call.headers_mut();
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
    let guard = gateway.timeout() + Duration::from_secs(1);
    let response = match tokio::time::timeout(guard, upstream.oneshot(call)).await {
        Ok(Ok(res)) => res,
        Ok(Err(never)) => match never {},
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
    let rendered = transcode::split_frames(collected.to_bytes()).and_then(|frames| transcode::render(&route, &frames));
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
    start_worker(config, &listen, false, true, SharedFrontage::default()).await
}

/// One worker: its own etcd client, balanced channels and listener on
/// `listen` (shared with the other workers through SO_REUSEPORT when
/// `reuse_port`), so a connection and its upstream calls stay on one thread.
pub(crate) async fn start_worker(
    config: GatewayConfig,
    listen: &str,
    reuse_port: bool,
    first: bool,
    front: SharedFrontage,
) -> Result<RunningGateway, StartError> {
    // What every process starts from: etcd, the config center, the
    // calling-side governance of the upstream channels (breakers,
    // throttling, method timeouts, retries and traffic splits; with no rule
    // set a call pays one atomic read), mTLS to the services with the
    // gateway's own identity when `tls` is on, and the live log filter. The
    // per-client limit is the gateway's own.
    let mesh = Mesh::connect(&config, COMPONENT).await?;
    let config = mesh.config();
    // One for the process, however many workers: the contracts and what is
    // built from them take about 4 MiB a worker.
    let front = Frontage::shared(&front, &config.gateway)?;
    let channels = mesh.channels.clone().with_methods(front.contracts.method_table());
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
    let gateway = Arc::new(Gateway::new(front, &channels));
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
        let dispatch = Dispatch::new(gateway.clone(), peer);
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
