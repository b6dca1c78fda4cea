//! The registry as the xDS server serves it: every service with at least one
//! instance, kept current by one resumable watch over all of
//! `{prefix}/services/` (the discovery every balanced channel uses). Bursts
//! of changes are taken together, so a client sees one update per burst.
//!
//! A service is present while it has an instance; a name with none is absent
//! (listeners and clusters left out of responses). Instances registered by
//! host name are resolved here: gRPC clients take EDS addresses as IPs.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use envoy_types::pb::google::protobuf::Any;
use etcd_client::Client;
use meshkit_common::{Instance, discovery, keys, methods::MethodTable};
use tokio::sync::watch;
use tower::discover::Change;

use crate::resources::{self, Kind};

/// One instance as clients get it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub id: String,
    pub addr: SocketAddr,
    pub zone: String,
    pub weight: u32,
    pub version: String,
}

/// A service's instances at one moment, with its resources made once.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    /// Grows whenever the instances change (unique across services).
    pub revision: u64,
    /// By instance id.
    pub endpoints: Vec<Endpoint>,
    fixed: [OnceLock<Any>; 3],
    by_zone: Mutex<HashMap<String, Any>>,
}

impl Service {
    pub fn new(name: &str, revision: u64, mut endpoints: Vec<Endpoint>) -> Self {
        endpoints.sort_by(|a, b| a.id.cmp(&b.id));
        Self { name: name.into(), revision, endpoints, fixed: Default::default(), by_zone: Mutex::default() }
    }

    /// The resource of `kind` named after this service, for a client in `zone`.
    pub fn resource(&self, kind: Kind, zone: &str, methods: &MethodTable) -> Any {
        let fixed = |i: usize, make: &dyn Fn() -> Any| self.fixed[i].get_or_init(make).clone();
        match kind {
            Kind::Listener => fixed(0, &|| resources::listener(&self.name)),
            Kind::Route => fixed(1, &|| resources::route_config(&self.name, methods)),
            Kind::Cluster => fixed(2, &|| resources::cluster(&self.name)),
            Kind::Endpoints => {
                let mut cache = self.by_zone.lock().unwrap_or_else(|p| p.into_inner());
                cache.entry(zone.to_owned()).or_insert_with(|| resources::load_assignment(self, zone)).clone()
            }
        }
    }
}

/// Every present service.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// False until the first full read of the registry: nothing is answered
    /// before, so no client hears "absent" for a service that is there.
    pub synced: bool,
    pub services: BTreeMap<String, Arc<Service>>,
}

/// Follows the registry; [`Catalog::subscribe`] gives its snapshots.
#[derive(Debug, Clone)]
pub struct Catalog {
    snapshot: watch::Receiver<Arc<Snapshot>>,
}

impl Catalog {
    /// Watches every service under `prefix` (the registry's root, `/meshkit`).
    pub fn start(client: Client, prefix: &str) -> Self {
        let (tx, snapshot) = watch::channel(Arc::new(Snapshot::default()));
        let watch = discovery::watch_services(client, keys::services(prefix));
        tokio::spawn(follow(watch, tx));
        Self { snapshot }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }
}

async fn follow(mut watch: discovery::ServiceWatch, tx: watch::Sender<Arc<Snapshot>>) {
    // service → instance id → where it is (None: its name did not resolve).
    let mut instances: BTreeMap<String, BTreeMap<String, (Instance, Option<SocketAddr>)>> = BTreeMap::new();
    let mut revision = 0u64;
    let mut synced = false;
    loop {
        let mut changed = Vec::new();
        tokio::select! {
            change = watch.changes.recv() => match change {
                Some(change) => changed.push(change),
                None => return,
            },
            ready = async { watch.synced.wait_for(|s| *s).await.is_ok() }, if !synced => {
                if !ready {
                    return;
                }
            }
        }
        // Take the whole burst: a full read or several keys at once.
        while let Ok(change) = watch.changes.try_recv() {
            changed.push(change);
        }
        let mut dirty = Vec::new();
        for change in changed {
            let (key, instance) = match change {
                Change::Insert(key, instance) => (key, Some(instance)),
                Change::Remove(key) => (key, None),
            };
            let Some((service, id)) = key.split_once('/') else { continue };
            let known = instances.entry(service.to_owned()).or_default();
            match instance {
                Some(instance) => {
                    let addr = resolve(&instance.addr).await;
                    known.insert(id.to_owned(), (instance, addr));
                }
                None => {
                    known.remove(id);
                }
            }
            dirty.push(service.to_owned());
        }
        let now_synced = *watch.synced.borrow();
        if dirty.is_empty() && (synced || !now_synced) {
            continue;
        }
        synced = synced || now_synced;
        let previous = tx.borrow().clone();
        let mut services = previous.services.clone();
        dirty.sort();
        dirty.dedup();
        for name in dirty {
            let endpoints: Vec<Endpoint> = instances
                .get(&name)
                .into_iter()
                .flatten()
                .filter_map(|(id, (instance, addr))| {
                    Some(Endpoint {
                        id: id.clone(),
                        addr: (*addr)?,
                        zone: instance.zone.clone(),
                        weight: instance.weight.clamp(1, 10_000),
                        version: instance.version.clone(),
                    })
                })
                .collect();
            if endpoints.is_empty() {
                instances.remove(&name);
                services.remove(&name);
                continue;
            }
            if services.get(&name).is_some_and(|s| {
                let mut sorted = endpoints.clone();
                sorted.sort_by(|a, b| a.id.cmp(&b.id));
                s.endpoints == sorted
            }) {
                continue;
            }
            revision += 1;
            services.insert(name.clone(), Arc::new(Service::new(&name, revision, endpoints)));
        }
        tracing::debug!(services = services.len(), revision, "registry changed");
        tx.send_replace(Arc::new(Snapshot { synced, services }));
    }
}

/// `host:port` as a socket address; a name is looked up (the first address).
async fn resolve(addr: &str) -> Option<SocketAddr> {
    if let Ok(addr) = addr.parse() {
        return Some(addr);
    }
    match tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(addr)).await {
        Ok(Ok(mut found)) => found.next(),
        Ok(Err(e)) => {
            tracing::warn!(addr, error = %e, "an instance's address does not resolve; it is left out of EDS");
            None
        }
        Err(_) => {
            tracing::warn!(addr, "resolving an instance's address timed out; it is left out of EDS");
            None
        }
    }
}
