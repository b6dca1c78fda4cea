//! The admin endpoint every meshkit process serves beside its gRPC port:
//! `/healthz`, and `/pools` (the state of each balanced channel's pool:
//! endpoints, ready or ejected, load, calls in flight), read by `meshctl`.

use std::{collections::BTreeMap, net::SocketAddr};

use axum::{Json, Router, extract::State, routing::get};
use serde::Serialize;
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

use crate::{
    balance::{ChannelBuilder, PoolSnapshot},
    error::{Error, Result},
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
}

/// A running admin endpoint.
pub struct AdminServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl AdminServer {
    /// Binds `listen` and serves the pools of `channels`.
    pub async fn start(listen: SocketAddr, channels: Vec<ChannelBuilder>) -> Result<Self> {
        let listener = TcpListener::bind(listen).await.map_err(|source| Error::Bind { addr: listen, source })?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/pools", get(pools))
            .with_state(AdminState { channels });
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                tracing::warn!(error = %e, "admin endpoint stopped");
            }
        });
        Ok(Self { addr, stop: Some(stop), task })
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
