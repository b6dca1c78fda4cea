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
//! that is present (one left out is gone); routes and endpoints hold every
//! present name after a subscription change, else only those that changed.
//! Endpoints depend on the client's zone (its node's locality).

use std::{
    collections::BTreeMap,
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
    #[serde(serialize_with = "as_slice")]
    pub subscribed: Names,
    pub sent_version: String,
    pub acked_version: String,
    pub nacks: u64,
    pub last_nack: String,
}

/// Resource names, sorted and without duplicates; each name is shared by
/// every stream that asks for it (see [`Ads::intern`]).
pub type Names = Arc<[Arc<str>]>;

fn as_slice<S: serde::Serializer>(names: &Names, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(names.iter().map(|n| &**n))
}

/// Names interned at most; past it, a stream keeps its own copies.
const INTERNED: usize = 100_000;

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
    /// One copy of each resource name however many streams subscribe to it:
    /// a thousand clients of fifty services hold fifty strings, not 200,000.
    interned: Arc<Mutex<std::collections::HashSet<Arc<str>>>>,
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
            interned: Arc::default(),
        }
    }

    /// `names` (sorted, without duplicates), each one the shared copy.
    fn intern(&self, names: Vec<String>) -> Names {
        let mut interned = self.interned.lock().unwrap_or_else(|p| p.into_inner());
        names
            .into_iter()
            .map(|name| match interned.get(name.as_str()) {
                Some(shared) => shared.clone(),
                None => {
                    let shared: Arc<str> = name.into();
                    if interned.len() < INTERNED {
                        interned.insert(shared.clone());
                    }
                    shared
                }
            })
            .collect()
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
        // Boxed: a channel keeps blocks of 32 slots per stream, and a slot of
        // the unboxed pair takes about 300 bytes.
        let (tx, rx) = mpsc::channel::<Result<Box<DiscoveryResponse>, Box<Status>>>(16);
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
        let responses = ReceiverStream::new(rx).map(|item| item.map(|r| *r).map_err(|s| *s));
        Ok(Response::new(Box::pin(responses)))
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
    /// Sorted, without duplicates; empty with `wildcard`: every present
    /// service (listeners and clusters). Shared with the client's view.
    names: Names,
    wildcard: bool,
    /// What the last response held: (name, revision) of each resource.
    sent: Option<Vec<(Arc<str>, u64)>>,
    version: u64,
    nonce: String,
}

struct AdsStream {
    id: u64,
    ads: Ads,
    tx: mpsc::Sender<Result<Box<DiscoveryResponse>, Box<Status>>>,
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
                    let _ = self.tx.send(Err(Box::new(Status::unavailable("the xDS server is shutting down; reconnect")))).await;
                    break "server shutting down".to_owned();
                }
            }
        };
        tracing::debug!(stream = self.id, node = self.node, end, "xDS stream ended");
        self.ads.clients.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }

    /// Changes this stream's entry in the clients' view, in place.
    fn view(&self, change: impl FnOnce(&mut ClientView)) {
        if let Some(view) = self.ads.clients.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&self.id) {
            change(view);
        }
    }

    async fn on_request(&mut self, request: DiscoveryRequest, snapshot: &Snapshot) -> Result<(), String> {
        if self.node.is_empty()
            && let Some(node) = &request.node
        {
            self.node = node.id.clone();
            self.zone = node.locality.as_ref().map(|l| l.zone.clone()).unwrap_or_default();
            let (node, zone) = (self.node.clone(), self.zone.clone());
            self.view(|v| {
                v.node = node;
                v.zone = zone;
            });
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
                    self.ads.stats.nacks[k].fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        node = self.node,
                        r#type = kind.short(),
                        refused = state.version,
                        kept = request.version_info,
                        error = error.message,
                        "an xDS client refused a response (NACK); it keeps its last accepted version"
                    );
                    let why = error.message.clone();
                    self.view(|v| {
                        let t = v.types.entry(kind.short()).or_default();
                        t.nacks += 1;
                        t.last_nack = why;
                    });
                }
                None => {
                    self.ads.stats.acks[k].fetch_add(1, Ordering::Relaxed);
                    let version = &request.version_info;
                    self.view(|v| v.types.entry(kind.short()).or_default().acked_version.clone_from(version));
                }
            }
        }
        let mut requested = request.resource_names;
        requested.sort_unstable();
        requested.dedup();
        let wildcard = requested.is_empty() && kind.omission_deletes();
        let state = self.types.entry(kind).or_default();
        let first = state.sent.is_none() && state.nonce.is_empty();
        // An ACK names what it named before: compared, not interned again.
        let same = state.names.len() == requested.len() && state.names.iter().zip(&requested).all(|(a, b)| **a == **b);
        if !same {
            state.names = self.ads.intern(requested);
        }
        state.wildcard = wildcard;
        if first || !same {
            let subscribed: Names = if wildcard { Arc::from(vec![Arc::from("*")]) } else { state.names.clone() };
            self.view(|v| v.types.entry(kind.short()).or_default().subscribed = subscribed);
            if snapshot.synced {
                self.send(kind, snapshot, true).await?;
            }
        }
        Ok(())
    }

    async fn push_changes(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        if !snapshot.synced {
            return Ok(());
        }
        let kinds: Vec<Kind> = self.types.keys().copied().collect();
        for kind in kinds {
            self.send(kind, snapshot, false).await?;
        }
        Ok(())
    }

    /// Sends `kind`'s resources if they differ from the last response (or
    /// always, with `force`).
    async fn send(&mut self, kind: Kind, snapshot: &Snapshot, force: bool) -> Result<(), String> {
        let Some(state) = self.types.get_mut(&kind) else { return Ok(()) };
        let revision = |service: &crate::catalog::Service| match kind {
            Kind::Endpoints => service.revision,
            Kind::Route => service.route_revision,
            Kind::Listener | Kind::Cluster => 0,
        };
        let names = state.names.clone();
        // What a response would hold now, borrowed: (name, service, revision).
        let held: Vec<(&Arc<str>, &crate::catalog::Service, u64)> = if state.wildcard {
            snapshot.services.values().map(|service| (&service.name, &**service, revision(service))).collect()
        } else {
            names
                .iter()
                .filter_map(|name| snapshot.services.get(&**name).map(|service| (name, &**service, revision(service))))
                .collect()
        };
        let unchanged = state.sent.as_ref().is_some_and(|sent| {
            sent.len() == held.len() && sent.iter().zip(&held).all(|((a, r), (b, _, q))| a == *b && r == q)
        });
        if !force && unchanged {
            return Ok(());
        }
        let owned = || held.iter().map(|(name, _, revision)| ((*name).clone(), *revision)).collect::<Vec<_>>();
        // Nothing held and nothing to delete: routes and endpoints need no answer.
        if !kind.omission_deletes() && held.is_empty() && state.sent.as_ref().is_none_or(|s| s.is_empty()) {
            state.sent = Some(Vec::new());
            return Ok(());
        }
        // Routes and endpoints: only what changed (a name left out says
        // nothing), so one instance's change costs one resource per client.
        let before: std::collections::HashMap<&str, u64> = match (&state.sent, force || kind.omission_deletes()) {
            (Some(sent), false) => sent.iter().map(|(n, r)| (&**n, *r)).collect(),
            _ => Default::default(),
        };
        let resources: Vec<_> = held
            .iter()
            .filter(|(name, _, revision)| before.get(&***name) != Some(revision))
            .map(|(_, service, _)| service.resource(kind, &self.zone, &self.ads.methods))
            .collect();
        if resources.is_empty() && !force && !kind.omission_deletes() {
            state.sent = Some(owned());
            return Ok(());
        }
        self.nonce += 1;
        state.version += 1;
        state.nonce = self.nonce.to_string();
        state.sent = Some(owned());
        let version = state.version.to_string();
        let response = DiscoveryResponse {
            version_info: version.clone(),
            resources,
            type_url: kind.type_url().to_owned(),
            nonce: state.nonce.clone(),
            control_plane: Some(ControlPlane { identifier: self.ads.identifier.clone() }),
            ..Default::default()
        };
        self.ads.stats.responses[kind as usize].fetch_add(1, Ordering::Relaxed);
        self.view(|v| v.types.entry(kind.short()).or_default().sent_version = version);
        self.tx.send(Ok(Box::new(response))).await.map_err(|_| "client went away".to_owned())
    }
}
