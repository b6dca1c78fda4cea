//! Aggregated discovery (ADS), state of the world, over the [`Catalog`].
//!
//! Each stream keeps, per resource type, the names the client subscribed to,
//! the version and nonce of the last response, and the last version the
//! client accepted. A request carrying the last nonce acknowledges (ACK) or
//! refuses (NACK, with `error_detail`) that response; a NACK is logged and
//! counted, and the client keeps the version it accepted before, as the
//! server records. A request with an older nonce is stale and ignored. A
//! response goes out when a type's subscription changes and whenever what it
//! would hold changes: listeners and clusters list every subscribed name
//! that is present (one left out is gone), routes and endpoints only those
//! present. Endpoints depend on the client's zone (its node's locality).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use envoy_types::pb::envoy::{
    config::core::v3::ControlPlane,
    service::discovery::v3::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_server::AggregatedDiscoveryService,
    },
};
use futures::{Stream, StreamExt};
use meshkit_common::methods::MethodTable;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::{
    catalog::{Catalog, Snapshot},
    resources::Kind,
};

/// What `meshctl xds clients` and the admin endpoint show of one stream.
#[derive(Debug, Clone, Serialize)]
pub struct ClientView {
    pub stream: u64,
    pub node: String,
    pub zone: String,
    pub peer: String,
    /// Seconds since the Unix epoch.
    pub connected_at: u64,
    pub types: BTreeMap<&'static str, TypeView>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TypeView {
    pub subscribed: Vec<String>,
    pub sent_version: String,
    pub acked_version: String,
    pub nacks: u64,
    pub last_nack: String,
}

/// Counts by resource type (in [`Kind::ALL`]'s order).
#[derive(Debug, Default)]
pub struct Stats {
    pub responses: [AtomicU64; 4],
    pub acks: [AtomicU64; 4],
    pub nacks: [AtomicU64; 4],
    /// Requests with an outdated nonce, ignored.
    pub stale: AtomicU64,
    pub streams: AtomicU64,
}

/// The ADS service: many clients at once, each on its own task.
#[derive(Debug, Clone)]
pub struct Ads {
    catalog: Catalog,
    methods: Arc<MethodTable>,
    identifier: String,
    clients: Arc<Mutex<BTreeMap<u64, ClientView>>>,
    stats: Arc<Stats>,
    closing: watch::Receiver<bool>,
}

impl Ads {
    /// Serves `catalog`; routes retry the idempotent methods of `methods`.
    /// Streams end (UNAVAILABLE) once `closing` turns true.
    pub fn new(catalog: Catalog, methods: MethodTable, identifier: String, closing: watch::Receiver<bool>) -> Self {
        Self {
            catalog,
            methods: Arc::new(methods),
            identifier,
            clients: Arc::default(),
            stats: Arc::default(),
            closing,
        }
    }

    pub fn clients(&self) -> Vec<ClientView> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Ads {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let id = self.stats.streams.fetch_add(1, Ordering::Relaxed) + 1;
        let stream = AdsStream {
            id,
            ads: self.clone(),
            tx,
            node: String::new(),
            zone: String::new(),
            types: BTreeMap::new(),
            nonce: 0,
        };
        tokio::spawn(stream.run(inbound, peer));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn delta_aggregated_resources(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented("incremental (delta) xDS is not served: use state-of-the-world ADS"))
    }
}

/// One type's state on one stream.
#[derive(Debug, Default)]
struct TypeState {
    /// Empty with `wildcard`: every present service (listeners and clusters).
    names: BTreeSet<String>,
    wildcard: bool,
    /// What the last response held: (name, revision) of each resource.
    sent: Option<Vec<(String, u64)>>,
    version: u64,
    nonce: String,
    acked: String,
    nacks: u64,
    last_nack: String,
}

struct AdsStream {
    id: u64,
    ads: Ads,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    node: String,
    zone: String,
    types: BTreeMap<Kind, TypeState>,
    nonce: u64,
}

impl AdsStream {
    async fn run(mut self, mut inbound: Streaming<DiscoveryRequest>, peer: Option<SocketAddr>) {
        let connected_at = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let view = ClientView {
            stream: self.id,
            node: String::new(),
            zone: String::new(),
            peer: peer.map(|p| p.to_string()).unwrap_or_default(),
            connected_at,
            types: BTreeMap::new(),
        };
        self.ads.clients.lock().unwrap_or_else(|p| p.into_inner()).insert(self.id, view);
        let mut snapshots = self.ads.catalog.subscribe();
        let mut closing = self.ads.closing.clone();
        let end = loop {
            tokio::select! {
                request = inbound.next() => match request {
                    Some(Ok(request)) => {
                        let snapshot = snapshots.borrow_and_update().clone();
                        if let Err(end) = self.on_request(request, &snapshot).await {
                            break end;
                        }
                    }
                    Some(Err(status)) => break format!("stream error: {}", status.message()),
                    None => break "client closed the stream".to_owned(),
                },
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break "registry watch stopped".to_owned();
                    }
                    let snapshot = snapshots.borrow_and_update().clone();
                    if let Err(end) = self.push_changes(&snapshot).await {
                        break end;
                    }
                },
                _ = async { closing.wait_for(|c| *c).await.is_ok() } => {
                    let _ = self.tx.send(Err(Status::unavailable("the xDS server is shutting down; reconnect"))).await;
                    break "server shutting down".to_owned();
                }
            }
        };
        tracing::debug!(stream = self.id, node = self.node, end, "xDS stream ended");
        self.ads.clients.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }

    async fn on_request(&mut self, request: DiscoveryRequest, snapshot: &Snapshot) -> Result<(), String> {
        if self.node.is_empty()
            && let Some(node) = &request.node
        {
            self.node = node.id.clone();
            self.zone = node.locality.as_ref().map(|l| l.zone.clone()).unwrap_or_default();
        }
        let Some(kind) = Kind::from_type_url(&request.type_url) else {
            tracing::debug!(node = self.node, type_url = request.type_url, "a request for a type not served; ignored");
            return Ok(());
        };
        let k = kind as usize;
        let state = self.types.entry(kind).or_default();
        if !request.response_nonce.is_empty() {
            if request.response_nonce != state.nonce {
                self.ads.stats.stale.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            match &request.error_detail {
                Some(error) => {
                    state.nacks += 1;
                    state.last_nack = error.message.clone();
                    self.ads.stats.nacks[k].fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        node = self.node,
                        r#type = kind.short(),
                        refused = state.version,
                        kept = request.version_info,
                        error = error.message,
                        "an xDS client refused a response (NACK); it keeps its last accepted version"
                    );
                }
                None => {
                    state.acked = request.version_info.clone();
                    self.ads.stats.acks[k].fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let names: BTreeSet<String> = request.resource_names.iter().cloned().collect();
        let wildcard = names.is_empty() && kind.omission_deletes();
        let first = state.sent.is_none() && state.nonce.is_empty();
        let subscription_changed = first || names != state.names || wildcard != state.wildcard;
        state.names = names;
        state.wildcard = wildcard;
        if subscription_changed && snapshot.synced {
            self.send(kind, snapshot, true).await?;
        }
        self.publish_view();
        Ok(())
    }

    async fn push_changes(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        if !snapshot.synced {
            return Ok(());
        }
        let kinds: Vec<Kind> = self.types.keys().copied().collect();
        let mut sent = false;
        for kind in kinds {
            sent |= self.send(kind, snapshot, false).await?;
        }
        if sent {
            self.publish_view();
        }
        Ok(())
    }

    /// Sends `kind`'s resources if they differ from the last response (or
    /// always, with `force`). Returns whether it sent.
    async fn send(&mut self, kind: Kind, snapshot: &Snapshot, force: bool) -> Result<bool, String> {
        let Some(state) = self.types.get_mut(&kind) else { return Ok(false) };
        let names: Vec<&String> = if state.wildcard {
            snapshot.services.keys().collect()
        } else {
            state.names.iter().filter(|name| snapshot.services.contains_key(*name)).collect()
        };
        let held: Vec<(String, u64)> = names
            .iter()
            .map(|name| {
                let revision = if kind == Kind::Endpoints { snapshot.services[*name].revision } else { 0 };
                ((*name).clone(), revision)
            })
            .collect();
        if !force && state.sent.as_ref() == Some(&held) {
            return Ok(false);
        }
        // Nothing held and nothing to delete: routes and endpoints need no answer.
        if !kind.omission_deletes() && held.is_empty() && state.sent.as_ref().is_none_or(|s| s.is_empty()) {
            state.sent = Some(held);
            return Ok(false);
        }
        let resources =
            names.iter().map(|name| snapshot.services[*name].resource(kind, &self.zone, &self.ads.methods)).collect();
        self.nonce += 1;
        state.version += 1;
        state.nonce = self.nonce.to_string();
        state.sent = Some(held);
        let response = DiscoveryResponse {
            version_info: state.version.to_string(),
            resources,
            type_url: kind.type_url().to_owned(),
            nonce: state.nonce.clone(),
            control_plane: Some(ControlPlane { identifier: self.ads.identifier.clone() }),
            ..Default::default()
        };
        self.ads.stats.responses[kind as usize].fetch_add(1, Ordering::Relaxed);
        self.tx.send(Ok(response)).await.map_err(|_| "client went away".to_owned())?;
        Ok(true)
    }

    fn publish_view(&self) {
        let types = self
            .types
            .iter()
            .map(|(kind, state)| {
                let view = TypeView {
                    subscribed: if state.wildcard { vec!["*".into()] } else { state.names.iter().cloned().collect() },
                    sent_version: if state.version == 0 { String::new() } else { state.version.to_string() },
                    acked_version: state.acked.clone(),
                    nacks: state.nacks,
                    last_nack: state.last_nack.clone(),
                };
                (kind.short(), view)
            })
            .collect();
        if let Some(view) = self.ads.clients.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&self.id) {
            view.node.clone_from(&self.node);
            view.zone.clone_from(&self.zone);
            view.types = types;
        }
    }
}
