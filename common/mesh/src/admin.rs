//! The admin endpoint every meshkit process serves beside its gRPC port:
//! `/healthz`, and `/pools` (the state of each balanced channel's pool:
//! endpoints, ready or ejected, load, calls in flight), read by `meshctl`, and
//! `/reports` (what the process's components add: consumer partitions and lag,
//! the outbox relay).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, RwLock},
};

use axum::{Json, Router, extract::State, routing::get};
use meshkit_balance::{ChannelBuilder, EndpointSnapshot, PoolSnapshot};
use meshkit_telemetry::metrics::{Scrape, Source};
use serde::Serialize;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use crate::{
    error::{Error, Result},
    server::Report,
};

/// The JSON `/pools` answers: service → pool.
pub type PoolsReport = BTreeMap<String, PoolReport>;

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PoolReport {
    pub ejected: usize,
    pub endpoints: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Default)]
struct AdminState {
    channels: Vec<ChannelBuilder>,
    reports: Vec<Report>,
    sources: Arc<RwLock<Vec<Source>>>,
}

/// A running admin endpoint.
pub struct AdminServer {
    addr: SocketAddr,
    sources: Arc<RwLock<Vec<Source>>>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl AdminServer {
    /// Binds `listen` and serves the pools of `channels`.
    pub async fn start(
        listen: SocketAddr,
        channels: Vec<ChannelBuilder>,
        reports: Vec<Report>,
        sources: Vec<Source>,
    ) -> Result<Self> {
        let listener = TcpListener::bind(listen).await.map_err(|source| Error::Bind { addr: listen, source })?;
        let addr = listener.local_addr()?;
        let sources = Arc::new(RwLock::new(sources));
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/pools", get(pools))
            .route("/metrics", get(metrics_text))
            .route("/reports", get(reports_json))
            .with_state(AdminState { channels, reports, sources: sources.clone() });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                tracing::warn!(error = %e, "admin endpoint stopped");
            }
        });
        Ok(Self { addr, sources, stop: Some(stop), task })
    }

    /// Adds families to `/metrics` (a component started after the endpoint).
    pub fn add_source(&self, source: Source) {
        self.sources.write().unwrap_or_else(|p| p.into_inner()).push(source);
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn reports_json(State(state): State<AdminState>) -> Json<BTreeMap<String, serde_json::Value>> {
    Json(state.reports.iter().map(|(name, report)| (name.clone(), report())).collect())
}

/// `/metrics`: the process's RED families and counters, each pool's
/// endpoints, then what the components' sources add; OpenMetrics (with
/// exemplars) when the scraper's `Accept` asks for it, else Prometheus text.
async fn metrics_text(
    State(state): State<AdminState>,
    headers: axum::http::HeaderMap,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    let mut rows: Vec<(String, EndpointSnapshot)> = Vec::new();
    for builder in &state.channels {
        for view in builder.pools() {
            for (_, e) in view.snapshot() {
                rows.push((view.service().to_owned(), e));
            }
        }
    }
    rows.sort_by(|a, b| (&a.0, &a.1.id).cmp(&(&b.0, &b.1.id)));
    let mut pools = Scrape::default();
    let up = pools.gauges::<EndpointLabels>(
        "meshkit_pool_endpoint_up",
        "1 when the endpoint takes calls (ready or probing), 0 when ejected.",
    );
    let in_flight =
        pools.gauges::<EndpointLabels>("meshkit_pool_endpoint_in_flight", "Calls in flight on the endpoint.");
    let connections =
        pools.gauges::<EndpointLabels>("meshkit_pool_endpoint_connections", "HTTP/2 connections open to the endpoint.");
    let load = pools.gauges::<EndpointLabels>(
        "meshkit_pool_endpoint_load",
        "The load p2c compares (peak EWMA latency x in-flight, with failure penalty).",
    );
    let rtt =
        pools.gauges::<EndpointLabels>("meshkit_pool_endpoint_rtt_seconds", "Peak EWMA of the endpoint's latency.");
    let failures = pools.counters::<EndpointLabels>("meshkit_pool_endpoint_failures", "Failed calls on the endpoint.");
    for (service, e) in &rows {
        let at = EndpointLabels { service: service.clone(), endpoint: e.id.clone(), addr: e.addr.clone() };
        up.get_or_create(&at).set(f64::from(u8::from(e.state != "ejected")));
        in_flight.get_or_create(&at).set(e.inflight as f64);
        connections.get_or_create(&at).set(e.connections as f64);
        load.get_or_create(&at).set(e.load);
        rtt.get_or_create(&at).set(e.rtt_ms / 1000.0);
        failures.get_or_create(&at).inc_by(e.failures);
    }
    let mut scrapes = vec![meshkit_telemetry::metrics::process_scrape(), pools];
    let sources: Vec<Source> = state.sources.read().unwrap_or_else(|p| p.into_inner()).clone();
    for source in sources {
        scrapes.push(source().await);
    }
    let mut out = String::with_capacity(16 << 10);
    let accept = headers.get(axum::http::header::ACCEPT).and_then(|a| a.to_str().ok()).unwrap_or_default();
    if meshkit_telemetry::metrics::wants_openmetrics(accept) {
        meshkit_telemetry::metrics::encode_openmetrics(&mut out, &scrapes);
        return ([(axum::http::header::CONTENT_TYPE, meshkit_telemetry::metrics::OPENMETRICS_CONTENT_TYPE)], out);
    }
    meshkit_telemetry::metrics::encode(&mut out, &scrapes);
    ([(axum::http::header::CONTENT_TYPE, meshkit_telemetry::metrics::CONTENT_TYPE)], out)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct EndpointLabels {
    service: String,
    endpoint: String,
    addr: String,
}

async fn pools(State(state): State<AdminState>) -> Json<PoolsReport> {
    let mut report = PoolsReport::new();
    for builder in &state.channels {
        for view in builder.pools() {
            let snapshot: PoolSnapshot = view.snapshot();
            let endpoints = snapshot
                .into_iter()
                .map(|(id, e)| (id, serde_json::to_value(e).unwrap_or(serde_json::Value::Null)))
                .collect();
            report.insert(view.service().to_owned(), PoolReport { ejected: view.ejected(), endpoints });
        }
    }
    Json(report)
}

/// Reads `/pools` from the admin endpoint at `addr` (plain HTTP/1.1 on
/// loopback or a private network; used by `meshctl` and the tests).
pub async fn fetch_pools(addr: &str) -> Result<PoolsReport> {
    let body = http_get(addr, "/pools").await?;
    serde_json::from_str(&body).map_err(|e| Error::Io(std::io::Error::other(format!("{addr}/pools: {e}"))))
}

/// A minimal GET: one request, `Connection: close`, body as text.
pub async fn http_get(addr: &str, path: &str) -> Result<String> {
    http_get_accept(addr, path, "*/*").await
}

/// As [`http_get`], asking for `accept` (`/metrics` answers OpenMetrics,
/// with exemplars, to `application/openmetrics-text`).
pub async fn http_get_accept(addr: &str, path: &str, accept: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    let response = tokio::time::timeout(std::time::Duration::from_secs(5), fetch)
        .await
        .map_err(|_| Error::Io(std::io::Error::other(format!("{addr}: no answer within 5 s"))))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") {
        let status = head.lines().next().unwrap_or("no status line");
        return Err(Error::Io(std::io::Error::other(format!("{addr}{path}: {status}"))));
    }
    Ok(body.to_owned())
}
