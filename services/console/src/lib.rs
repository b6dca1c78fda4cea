//! meshkit's web console: the live mesh in a browser, for people who sign in.
//!
//! A process of its own (`console`), like the xDS server, rather than the
//! admin side of a service: it holds operator credentials (etcd write on the
//! whole prefix), is scaled and restarted apart from the services, and stays
//! up when a service is down. Its pages are written out on the server (no
//! script, no build step, no CDN: the stylesheet is compiled into the
//! binary), so a new engineer changes a page in one Rust function, and every
//! read and change goes through `meshkit-meshctl`'s library, the same calls
//! `meshctl` makes, with the same validation and the same audit log.
//!
//! - Sign-in: the console's passwords (`admin`, `viewer`), or a JWT from the
//!   issuer the gateway trusts (`console.jwt`; `admin_role` makes an admin).
//!   A session is a random id in an `HttpOnly`, `SameSite=Strict` cookie
//!   (`Secure` under HTTPS), kept in memory until it expires or is signed
//!   out. Every page needs one; a stale or forged id is sent to sign-in.
//! - Changes: POST forms carrying the session's CSRF token, refused (403)
//!   without it, from another origin, or for the read-only role.
//! - etcd: every page reads it within `console.etcd_timeout_ms`; when it does
//!   not answer, the page says so instead of hanging or showing stale data.
#![forbid(unsafe_code)]

mod html;
#[macro_use]
mod pages;
mod events;
mod governance;
mod jobs;
pub mod series;
pub mod session;
pub mod settings;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    routing::{get, post},
};
use etcd_client::Client;
use meshkit_common::{config::EtcdSettings, tls::EdgeTls};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

pub use settings::{ConsoleConfig, ConsoleSettings};

use session::Sessions;

/// The component name: config scope and logs.
pub const COMPONENT: &str = "console";

/// The cookie that carries the session id.
pub const COOKIE: &str = "meshkit_console";

/// What every handler shares.
pub(crate) struct App {
    pub settings: ConsoleSettings,
    pub etcd: EtcdSettings,
    pub client: tokio::sync::Mutex<Option<Client>>,
    pub sessions: Sessions,
    pub verifier: Option<meshkit_jwt::Verifier>,
    /// mTLS to the instances (health checks), when the mesh runs it.
    pub mesh_tls: Option<Arc<meshkit_common::tls::Tls>>,
    pub https: bool,
    /// The brokers, for dead letters and replays.
    pub kafka: meshkit_common::events::Kafka,
    /// The Governance page's points, by component.
    pub series: std::sync::Mutex<std::collections::HashMap<String, series::Series>>,
}

impl App {
    /// An etcd client, connected on first use and kept; `Err` says why etcd
    /// cannot be reached within the console's timeout.
    pub async fn etcd(&self) -> Result<Client, String> {
        if let Some(c) = self.client.lock().await.as_ref() {
            return Ok(c.clone());
        }
        // Connected outside the lock: with etcd down, each page waits its
        // own timeout, not the sum of everyone's.
        let timeout = self.timeout();
        match tokio::time::timeout(timeout, meshkit_common::etcd::connect(&self.etcd)).await {
            Ok(Ok(c)) => {
                let mut held = self.client.lock().await;
                Ok(held.get_or_insert(c).clone())
            }
            Ok(Err(e)) => Err(self.down(&e.to_string())),
            Err(_) => Err(self.down(&format!("no answer within {} ms", timeout.as_millis()))),
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.settings.etcd_timeout_ms)
    }

    /// The banner's text for etcd not answering.
    pub fn down(&self, why: &str) -> String {
        format!(
            "etcd cannot be reached at {}: {why}. Nothing here is shown from memory; the page reads again when reloaded.",
            self.etcd.endpoints.join(",")
        )
    }
}

/// A running console.
pub struct RunningConsole {
    local_addr: SocketAddr,
    https: bool,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl RunningConsole {
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Its URL: `http://` or `https://` and the bound address.
    pub fn url(&self) -> String {
        format!("{}://{}", if self.https { "https" } else { "http" }, self.local_addr)
    }

    /// Serves until `stop`, then stops accepting and gives open requests a moment.
    pub async fn run_until(self, stop: impl Future<Output = ()>) {
        stop.await;
        self.shutdown().await;
    }

    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

/// Binds `console.listen` and serves.
pub async fn start(config: ConsoleConfig) -> anyhow::Result<RunningConsole> {
    let settings = config.console.clone();
    let verifier = if settings.jwt.enabled() {
        let j = &settings.jwt;
        let source = meshkit_jwt::TokenSource {
            hs256_secret: &j.hs256_secret,
            jwks_file: &j.jwks_file,
            issuer: &j.issuer,
            audience: &j.audience,
            roles_claim: &j.roles_claim,
        };
        Some(meshkit_jwt::Verifier::new(&source, "console.jwt").map_err(anyhow::Error::msg)?)
    } else {
        None
    };
    let edge = if settings.tls_cert_file.is_empty() {
        None
    } else {
        Some(EdgeTls::load("console", &settings.tls_cert_file, &settings.tls_key_file, &[b"h2", b"http/1.1"])?)
    };
    let mesh_tls = if config.mesh.tls.enabled { Some(meshkit_common::tls::Tls::load(&config.mesh.tls)?) } else { None };
    let app = Arc::new(App {
        sessions: Sessions::new(Duration::from_secs(settings.session_ttl_secs)),
        etcd: config.mesh.etcd.clone(),
        client: tokio::sync::Mutex::new(None),
        verifier,
        mesh_tls,
        https: edge.is_some(),
        kafka: meshkit_common::events::Kafka::new(config.events.clone(), "console"),
        series: std::sync::Mutex::default(),
        settings,
    });
    let router = router(app.clone());
    let listener = TcpListener::bind(&app.settings.listen)
        .await
        .map_err(|e| anyhow::anyhow!("console.listen {}: {e}", app.settings.listen))?;
    let local_addr = listener.local_addr()?;
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(serve(listener, edge, router, stopped));
    tracing::info!(addr = %local_addr, https = app.https, "console serving");
    Ok(RunningConsole { local_addr, https: app.https, stop, task })
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(pages::home))
        .route("/assets/console.css", get(pages::stylesheet))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/login", get(pages::login_page).post(pages::login))
        .route("/logout", post(pages::logout))
        .route("/services", get(pages::services))
        .route("/pools/{instance}", get(pages::pools))
        .route("/instances/control", post(pages::instance_control))
        .route("/config", get(pages::components))
        .route("/config/{component}", get(pages::component))
        .route("/config/{component}/set", post(pages::config_set))
        .route("/config/{component}/delete", post(pages::config_delete))
        .route("/config/{component}/history", get(pages::history))
        .route("/config/{component}/rollback", post(pages::rollback))
        .route("/config/{component}/diff", get(pages::diff))
        .route("/audit", get(pages::audit))
        .route("/assets/charts.js", get(governance::charts_js))
        .route("/governance", get(governance::index))
        .route("/governance/{component}", get(governance::component))
        .route("/governance/{component}/rule", post(governance::set_rule))
        .route("/governance/{component}/remove", post(governance::remove_rule))
        .route("/governance/{component}/series", get(governance::series))
        .route("/events", get(events::page))
        .route("/events/replay", post(events::replay))
        .route("/jobs", get(jobs::page))
        .route("/jobs/trigger", post(jobs::trigger))
        .route("/jobs/pause", post(jobs::pause))
        .fallback(pages::not_found)
        .with_state(app)
}

/// Accepts connections (TLS first when configured) and serves HTTP/1.1 and
/// HTTP/2 on each until `stopped`.
async fn serve(listener: TcpListener, edge: Option<Arc<EdgeTls>>, router: Router, mut stopped: watch::Receiver<bool>) {
    use hyper_util::{
        rt::{TokioExecutor, TokioIo},
        server::conn::auto::Builder,
        service::TowerToHyperService,
    };
    let service = TowerToHyperService::new(router);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let (service, edge, mut stopped) = (service.clone(), edge.clone(), stopped.clone());
        tokio::spawn(async move {
            let builder = Builder::new(TokioExecutor::new());
            let result = match edge {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(tcp), service);
                    tokio::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => r,
                        _ = stopped.changed() => { conn.as_mut().graceful_shutdown(); conn.await }
                    }
                }
                Some(edge) => {
                    let tls = match tokio::time::timeout(Duration::from_secs(10), edge.accept(tcp)).await {
                        Ok(Ok(tls)) => tls,
                        _ => {
                            tracing::debug!(%peer, "TLS handshake refused or timed out");
                            return;
                        }
                    };
                    let conn = builder.serve_connection(TokioIo::new(tls), service);
                    tokio::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => r,
                        _ = stopped.changed() => { conn.as_mut().graceful_shutdown(); conn.await }
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}
