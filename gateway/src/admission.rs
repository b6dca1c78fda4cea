//! What every call passes before its upstream call, whatever its protocol:
//! the per-client rate limit, the JWT policy of the method it calls, and
//! the upstream metadata (the deadline and `x-forwarded-for`).
//!
//! Each step is a tower layer, stacked the same way for gRPC, grpc-web
//! (translated to gRPC first) and REST (after its route is found, so the
//! policy of the method the route maps to applies). A protocol says only
//! how a refusal looks to its clients ([`Refuse`]): a gRPC status, or a JSON
//! error with its HTTP code.

use std::{
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use governor::{DefaultKeyedRateLimiter, clock::Clock};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use meshkit_common::deadline;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::auth::Auth;

/// The per-client rate limiter, shared by every worker of a process.
pub type Limiter = DefaultKeyedRateLimiter<IpAddr>;

/// Why a call was refused before any upstream call.
#[derive(Debug)]
pub enum Refusal {
    /// Over the client's allowance; it may try again after `wait`.
    RateLimited { status: tonic::Status, wait: Duration },
    /// No valid token, or not one the method's policy accepts.
    Auth(tonic::Status),
}

impl Refusal {
    pub fn status(&self) -> &tonic::Status {
        match self {
            Refusal::RateLimited { status, .. } | Refusal::Auth(status) => status,
        }
    }
}

/// How a protocol answers a refused call.
pub trait Refuse: Clone {
    fn refuse(&self, refusal: Refusal) -> Response<Body>;
}

/// gRPC and grpc-web: the status, trailers-only.
#[derive(Debug, Clone, Copy)]
pub struct AsGrpc;

impl Refuse for AsGrpc {
    fn refuse(&self, refusal: Refusal) -> Response<Body> {
        match refusal {
            Refusal::RateLimited { status, .. } | Refusal::Auth(status) => status.into_http(),
        }
    }
}

/// The future of an admission step: the refusal, ready, or the inner call.
pub enum Admitted<F> {
    Refused(Option<Response<Body>>),
    Inner(F),
}

impl<F> Future for Admitted<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>> + Unpin,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Admitted::Refused(res) => match res.take() {
                Some(res) => Poll::Ready(Ok(res)),
                None => Poll::Pending,
            },
            Admitted::Inner(inner) => Pin::new(inner).poll(cx),
        }
    }
}

/// Counts a request the gateway refused before any upstream call, by reason:
/// `rate_limited`, `unauthenticated`, `permission_denied`, `too_large`.
pub fn rejected(reason: &'static str) {
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

// === the client ===

/// A connection's client: its address, and that address as an
/// `x-forwarded-for` value, formatted once per connection rather than per
/// request.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    forwarded: Option<HeaderValue>,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, forwarded: HeaderValue::from_str(&addr.ip().to_string()).ok() }
    }
}

// === admission steps ===

/// One admission step: passes a request on (perhaps amended), or refuses it.
pub trait Check {
    fn check<B>(&self, req: Request<B>) -> Result<Request<B>, Refusal>;
}

/// A [`Check`] as a layer; `refuse` renders its refusals for the protocol.
#[derive(Clone)]
pub struct AdmitLayer<C, R> {
    check: C,
    refuse: R,
}

impl<C, R> AdmitLayer<C, R> {
    pub fn new(check: C, refuse: R) -> Self {
        Self { check, refuse }
    }
}

impl<S, C: Clone, R: Clone> Layer<S> for AdmitLayer<C, R> {
    type Service = Admit<S, C, R>;

    fn layer(&self, inner: S) -> Self::Service {
        Admit { inner, check: self.check.clone(), refuse: self.refuse.clone() }
    }
}

#[derive(Clone)]
pub struct Admit<S, C, R> {
    inner: S,
    check: C,
    refuse: R,
}

impl<S, C, R, B> Service<Request<B>> for Admit<S, C, R>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
    S::Future: Unpin,
    C: Check,
    R: Refuse,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Admitted<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match self.check.check(req) {
            Ok(req) => Admitted::Inner(self.inner.call(req)),
            Err(refusal) => Admitted::Refused(Some(self.refuse.refuse(refusal))),
        }
    }
}

/// Takes one request from the client's allowance, or refuses it with how
/// long to wait.
#[derive(Clone)]
pub struct RateLimit {
    limiter: Option<Arc<Limiter>>,
    per_sec: u32,
    client: IpAddr,
}

impl RateLimit {
    /// `per_sec` names the limit in the refusal; no `limiter`, no limit.
    pub fn new(limiter: Option<Arc<Limiter>>, per_sec: u32, client: IpAddr) -> Self {
        Self { limiter, per_sec, client }
    }
}

impl Check for RateLimit {
    fn check<B>(&self, req: Request<B>) -> Result<Request<B>, Refusal> {
        let Some(limiter) = &self.limiter else { return Ok(req) };
        let not_until = match limiter.check_key(&self.client) {
            Ok(()) => return Ok(req),
            Err(not_until) => not_until,
        };
        rejected("rate_limited");
        // The limiter's own clock: building one calibrates a new TSC clock
        // (about 15 µs), too dear for every refused request.
        let wait = not_until.wait_time_from(limiter.clock().now());
        let status = tonic::Status::resource_exhausted(format!(
            "rate limit of {} requests/s for {} exceeded; retry in {} ms",
            self.per_sec,
            self.client,
            wait.as_millis().max(1)
        ));
        Err(Refusal::RateLimited { status, wait })
    }
}

/// The method a request calls, when its path is not the method's own (a
/// REST route's `/package.Service/Method`); a gRPC request's path is.
#[derive(Debug, Clone)]
pub struct MethodPath(pub String);

/// The JWT policy of the method called: strips forged identity headers,
/// verifies the bearer token, refuses what the policy does not accept and
/// adds the verified identity as metadata.
#[derive(Clone)]
pub struct Jwt(pub Arc<Auth>);

impl Check for Jwt {
    fn check<B>(&self, req: Request<B>) -> Result<Request<B>, Refusal> {
        let (mut parts, body) = req.into_parts();
        let path = match parts.extensions.get::<MethodPath>() {
            Some(MethodPath(path)) => path.as_str(),
            None => parts.uri.path(),
        };
        if let Err(status) = self.0.authorize(path, &mut parts.headers) {
            let unauthenticated = status.code() == tonic::Code::Unauthenticated;
            rejected(if unauthenticated { "unauthenticated" } else { "permission_denied" });
            return Err(Refusal::Auth(status));
        }
        Ok(Request::from_parts(parts, body))
    }
}

// === upstream metadata ===

/// What the upstream call carries from the gateway: its deadline (the
/// client's `grpc-timeout` if sooner than `gateway.request_timeout_ms`,
/// then as the client wrote it) and the client's address appended to
/// `x-forwarded-for`.
#[derive(Clone)]
pub struct UpstreamLayer {
    timeout: Duration,
    /// `timeout` as a `grpc-timeout`, formatted once.
    timeout_header: HeaderValue,
    peer: Peer,
}

impl UpstreamLayer {
    pub fn new(timeout: Duration, peer: Peer) -> Self {
        Self { timeout, timeout_header: deadline::format_grpc_timeout(timeout), peer }
    }
}

impl<S> Layer<S> for UpstreamLayer {
    type Service = Upstream<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Upstream { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct Upstream<S> {
    inner: S,
    layer: UpstreamLayer,
}

impl<S, B> Service<Request<B>> for Upstream<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let headers = req.headers_mut();
        deadline::cap_grpc_timeout(headers, self.layer.timeout, &self.layer.timeout_header);
        forwarded_for(headers, &self.layer.peer);
        self.inner.call(req)
    }
}

fn forwarded_for(headers: &mut HeaderMap, peer: &Peer) {
    const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) => HeaderValue::from_str(&format!("{prior}, {}", peer.addr.ip())).ok(),
        None => peer.forwarded.clone(),
    };
    if let Some(value) = value {
        headers.insert(X_FORWARDED_FOR, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::{Quota, RateLimiter};
    use std::num::NonZeroU32;
    use tower::ServiceExt;

    type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    /// Answers 200 with the request's headers copied onto the response.
    fn echo_headers()
    -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future = Answer> + Clone {
        tower::service_fn(|req: Request<Body>| -> Answer {
            let mut res = Response::new(Body::empty());
            *res.headers_mut() = req.headers().clone();
            Box::pin(std::future::ready(Ok(res)))
        })
    }

    fn grpc_status(res: &Response<Body>) -> Option<String> {
        res.headers().get("grpc-status").map(|v| v.to_str().unwrap_or("?").to_owned())
    }

    #[tokio::test]
    async fn the_rate_limit_refuses_past_the_burst_and_says_when_to_retry() {
        let limiter = Arc::new(RateLimiter::keyed(
            Quota::per_second(NonZeroU32::new(1).expect("1")).allow_burst(NonZeroU32::new(2).expect("2")),
        ));
        let client: IpAddr = "10.0.0.7".parse().expect("address");
        let layer = AdmitLayer::new(RateLimit::new(Some(limiter), 1, client), AsGrpc);
        let mut service = layer.layer(echo_headers());
        let mut codes = Vec::new();
        for _ in 0..3 {
            let res = service.ready().await.expect("ready").call(Request::new(Body::empty())).await.expect("answer");
            codes.push(grpc_status(&res));
            if let Some(message) = res.headers().get("grpc-message") {
                let message = percent_encoding::percent_decode(message.as_bytes()).decode_utf8_lossy();
                assert!(message.contains("10.0.0.7") && message.contains("retry in"), "{message}");
            }
        }
        assert_eq!(codes, [None, None, Some("8".to_owned())], "two in the burst, the third refused");
        // Without a limiter nothing is refused.
        let mut open = AdmitLayer::new(RateLimit::new(None, 0, client), AsGrpc).layer(echo_headers());
        for _ in 0..10 {
            let res = open.ready().await.expect("ready").call(Request::new(Body::empty())).await.expect("answer");
            assert_eq!(grpc_status(&res), None);
        }
    }

    #[tokio::test]
    async fn the_jwt_policy_is_the_called_methods_and_forged_identities_are_dropped() {
        let settings = crate::settings::JwtSettings {
            hs256_secret: "test-secret".into(),
            rules: vec![crate::settings::AuthRule {
                methods: vec!["meshkit.echo.v1.EchoService/*".into()],
                policy: "authenticated".into(),
                roles: vec![],
            }],
            ..Default::default()
        };
        let auth = Arc::new(Auth::from_settings(&settings).expect("settings"));
        let service = AdmitLayer::new(Jwt(auth), AsGrpc).layer(echo_headers());
        let request = |path: &str, method: Option<&str>| {
            let mut req = Request::post(path).body(Body::empty()).expect("request");
            req.headers_mut().insert(crate::auth::SUBJECT_HEADER, HeaderValue::from_static("root"));
            if let Some(method) = method {
                req.extensions_mut().insert(MethodPath(method.to_owned()));
            }
            req
        };
        // A gRPC call: the policy of its path.
        let res = service.clone().oneshot(request("/meshkit.echo.v1.EchoService/Echo", None)).await.expect("answer");
        assert_eq!(grpc_status(&res).as_deref(), Some("16"), "no token: UNAUTHENTICATED");
        let res = service.clone().oneshot(request("/meshkit.user.v1.UserService/GetUser", None)).await.expect("answer");
        assert_eq!(grpc_status(&res), None, "a public method passes");
        assert!(res.headers().get(crate::auth::SUBJECT_HEADER).is_none(), "the forged subject is dropped");
        // A REST call: the policy of the method its route maps to, not its URL.
        let res = service
            .clone()
            .oneshot(request("/v1/echo/x", Some("/meshkit.echo.v1.EchoService/Echo")))
            .await
            .expect("answer");
        assert_eq!(grpc_status(&res).as_deref(), Some("16"));
    }

    #[tokio::test]
    async fn the_upstream_layer_sets_the_deadline_and_names_the_client() {
        let peer = Peer::new("10.0.0.7:41000".parse().expect("address"));
        let service = UpstreamLayer::new(Duration::from_secs(2), peer).layer(echo_headers());
        let mut req = Request::new(Body::empty());
        req.headers_mut().insert("grpc-timeout", HeaderValue::from_static("1H"));
        req.headers_mut().insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9"));
        let res = service.oneshot(req).await.expect("answer");
        assert_eq!(
            deadline::parse_grpc_timeout(&res.headers()["grpc-timeout"]),
            Some(Duration::from_secs(2)),
            "a later client deadline is capped"
        );
        assert_eq!(res.headers()["x-forwarded-for"], "203.0.113.9, 10.0.0.7");
    }

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
