//! Authorization by the caller's mTLS identity, per method, hot-reloaded
//! from the config center (`authz.*`).
//!
//! Rules map a method pattern (`/pkg.Service/Method`, `/pkg.Service/*`, `*`;
//! the most specific applies) to the identities allowed to call it (`*`: any
//! caller with a certificate). A method no rule names follows
//! `authz.default`. Health checks and reflection are always allowed. A refusal
//! is PERMISSION_DENIED naming the method and the caller, and is counted.

use std::{
    sync::{
        Arc, RwLock,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use futures::future::Either;
use tokio::sync::watch;
use tonic::body::Body;
use tower::{Layer, Service};

use meshkit_base::methods::{MethodMap, MethodPattern};

use crate::settings::AuthzSettings;

/// The rules in force: the settings, and their patterns compiled.
struct Rules {
    settings: Arc<AuthzSettings>,
    /// Pattern → (the pattern as written, the callers it allows).
    by_method: MethodMap<(String, Vec<String>)>,
}

impl Rules {
    fn new(settings: AuthzSettings) -> Self {
        let mut by_method = MethodMap::default();
        for (pattern, callers) in &settings.rules {
            // Validated settings only hold patterns that parse.
            if let Ok(p) = MethodPattern::parse(pattern) {
                by_method.insert(&p, (pattern.clone(), callers.clone()));
            }
        }
        Self { settings: Arc::new(settings), by_method }
    }
}

pub struct Authz {
    rules: RwLock<Arc<Rules>>,
    /// Read without the lock: calls pay nothing while authorization is off.
    enabled: AtomicBool,
}

impl Authz {
    pub fn new(settings: AuthzSettings) -> Arc<Self> {
        Arc::new(Self {
            enabled: AtomicBool::new(settings.enabled),
            rules: RwLock::new(Arc::new(Rules::new(settings))),
        })
    }

    /// Follows `settings` (a config-center section) while the `Authz` lives.
    pub fn watching(mut settings: watch::Receiver<AuthzSettings>) -> Arc<Self> {
        let authz = Self::new(settings.borrow_and_update().clone());
        let weak = Arc::downgrade(&authz);
        tokio::spawn(async move {
            while settings.changed().await.is_ok() {
                let Some(authz) = weak.upgrade() else { return };
                let new = settings.borrow_and_update().clone();
                tracing::info!(enabled = new.enabled, rules = new.rules.len(), "authorization rules changed");
                authz.enabled.store(new.enabled, Ordering::Relaxed);
                *authz.rules.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Rules::new(new));
            }
        });
        authz
    }

    pub fn settings(&self) -> Arc<AuthzSettings> {
        self.rules().settings.clone()
    }

    fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether `caller` may call `path`; the error says why not.
    pub fn check(&self, path: &str, caller: Option<&str>) -> Result<(), String> {
        if !self.enabled.load(Ordering::Relaxed) {
            return Ok(());
        }
        let rules = self.rules();
        let settings = &rules.settings;
        if !settings.enabled || path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.") {
            return Ok(());
        }
        let (rule, allowed) = match rules.by_method.get(path) {
            Some((rule, allowed)) => (format!("rule {rule:?}"), Some(allowed)),
            None => ("authz.default".to_owned(), None),
        };
        let permitted = match (allowed, caller) {
            (Some(allowed), Some(caller)) => allowed.iter().any(|a| a == "*" || a == caller),
            (Some(_), None) => false,
            (None, _) => settings.default == "allow",
        };
        if permitted {
            return Ok(());
        }
        let who = caller.map_or_else(|| "a caller without a client certificate".to_owned(), |c| format!("caller {c}"));
        Err(format!("{who} may not call {path} ({rule})"))
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct DeniedLabels {
    method: String,
    caller: String,
}

/// `meshkit_authz_denied_total{method, caller}`.
static DENIED: std::sync::LazyLock<meshkit_telemetry::metrics::CounterFamily<DeniedLabels>> =
    std::sync::LazyLock::new(|| {
        meshkit_telemetry::metrics::counters(
            "meshkit_authz_denied",
            "Calls refused by the authorization rules, by method and caller identity.",
        )
    });

/// The server layer that applies [`Authz`] to every call.
#[derive(Clone)]
pub struct AuthzLayer(pub Arc<Authz>);

impl<S> Layer<S> for AuthzLayer {
    type Service = AuthzService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthzService { inner, authz: self.0.clone() }
    }
}

#[derive(Clone)]
pub struct AuthzService<S> {
    inner: S,
    authz: Arc<Authz>,
}

impl<S, B> Service<http::Request<B>> for AuthzService<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, std::future::Ready<Result<Self::Response, Self::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if !self.authz.enabled.load(Ordering::Relaxed) {
            return Either::Left(self.inner.call(req));
        }
        let caller = req.extensions().get::<crate::ConnectInfo>().and_then(|c| c.identity.clone());
        match self.authz.check(req.uri().path(), caller.as_ref().map(|c| &*c.0)) {
            Ok(()) => Either::Left(self.inner.call(req)),
            Err(message) => {
                let caller = caller.as_ref().map_or("none", |c| &*c.0);
                DENIED
                    .get_or_create(&DeniedLabels { method: req.uri().path().to_owned(), caller: caller.to_owned() })
                    .inc();
                tracing::warn!(method = req.uri().path(), caller, "call refused by authorization");
                Either::Right(std::future::ready(Ok(tonic::Status::permission_denied(message).into_http::<Body>())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authz(default: &str, rules: &[(&str, &[&str])]) -> Arc<Authz> {
        Authz::new(AuthzSettings {
            enabled: true,
            default: default.into(),
            rules: rules.iter().map(|(k, v)| ((*k).to_owned(), v.iter().map(|s| (*s).to_owned()).collect())).collect(),
        })
    }

    #[test]
    fn the_most_specific_rule_decides_and_refusals_name_method_and_caller() {
        let order = Some("spiffe://meshkit/order-service");
        let gateway = Some("spiffe://meshkit/gateway");
        let a = authz(
            "deny",
            &[
                ("/meshkit.user.v1.UserService/*", &["spiffe://meshkit/order-service", "spiffe://meshkit/gateway"]),
                ("/meshkit.user.v1.UserService/CreateUser", &["spiffe://meshkit/gateway"]),
                ("/meshkit.order.v1.OrderService/GetOrder", &["*"]),
            ],
        );
        assert!(a.check("/meshkit.user.v1.UserService/GetUser", order).is_ok());
        assert!(a.check("/meshkit.user.v1.UserService/CreateUser", gateway).is_ok());
        let refused = a.check("/meshkit.user.v1.UserService/CreateUser", order).unwrap_err();
        assert_eq!(
            refused,
            "caller spiffe://meshkit/order-service may not call /meshkit.user.v1.UserService/CreateUser \
             (rule \"/meshkit.user.v1.UserService/CreateUser\")"
        );
        assert!(
            a.check("/meshkit.order.v1.OrderService/GetOrder", Some("spiffe://other/x")).is_ok(),
            "* is any caller"
        );
        assert!(
            a.check("/meshkit.order.v1.OrderService/GetOrder", None)
                .unwrap_err()
                .contains("without a client certificate")
        );
        assert!(a.check("/meshkit.order.v1.OrderService/CreateOrder", gateway).unwrap_err().contains("authz.default"));
        assert!(a.check("/grpc.health.v1.Health/Check", None).is_ok(), "health is always allowed");
        assert!(authz("allow", &[]).check("/x.Y/Z", None).is_ok());
    }
}
