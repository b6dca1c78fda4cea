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

/// A service's instances at one moment, with its resources made once. Under
/// a traffic split by version, each version group is a service of its own
/// too, named `{service}@{version}` (its cluster and endpoints), which the
/// service's routes name by weight.
#[derive(Debug)]
pub struct Service {
    pub name: Arc<str>,
    /// Grows whenever the instances change (unique across services).
    pub revision: u64,
    /// Changes with the split, when the routes change.
    pub route_revision: u64,
    /// By instance id.
    pub endpoints: Vec<Endpoint>,
    /// The version groups' clusters and their weights; empty: no split.
    pub split: Vec<(Arc<str>, u32)>,
    fixed: [OnceLock<Any>; 3],
    by_zone: Mutex<HashMap<String, Any>>,
}

impl Service {
    pub fn new(name: &str, revision: u64, mut endpoints: Vec<Endpoint>) -> Self {
        endpoints.sort_by(|a, b| a.id.cmp(&b.id));
        Self {
            name: name.into(),
            revision,
            route_revision: 0,
            endpoints,
            split: Vec::new(),
            fixed: Default::default(),
            by_zone: Mutex::default(),
        }
    }

    /// Routes to `split`'s clusters by weight, `route_revision` telling
    /// clients whether the routes changed.
    pub fn with_split(mut self, split: Vec<(Arc<str>, u32)>, route_revision: u64) -> Self {
        self.split = split;
        self.route_revision = route_revision;
        self
    }

    /// The resource of `kind` named after this service, for a client in `zone`.
    pub fn resource(&self, kind: Kind, zone: &str, methods: &MethodTable) -> Any {
        let fixed = |i: usize, make: &dyn Fn() -> Any| self.fixed[i].get_or_init(make).clone();
        match kind {
            Kind::Listener => fixed(0, &|| resources::listener(&self.name)),
            Kind::Route => fixed(1, &|| resources::route_config(&self.name, methods, &self.split)),
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
    /// Watches every service under `prefix` (the registry's root,
    /// `/meshkit`), and the traffic splits (`governance.split`) in `splits`.
    pub fn start(client: Client, prefix: &str, splits: watch::Receiver<Splits>) -> Self {
        let (tx, snapshot) = watch::channel(Arc::new(Snapshot::default()));
        let watch = discovery::watch_services(client, keys::services(prefix));
        tokio::spawn(follow(watch, splits, tx));
        Self { snapshot }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.snapshot.clone()
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.snapshot.borrow().clone()
    }
}

/// Traffic splits by service: version → percent.
pub type Splits = BTreeMap<String, BTreeMap<String, u32>>;

/// The separator of a version group's name, `{service}@{version}`: no
/// gRPC service name holds it.
const GROUP: char = '@';

async fn follow(
    mut watch: discovery::ServiceWatch,
    mut splits: watch::Receiver<Splits>,
    tx: watch::Sender<Arc<Snapshot>>,
) {
    // service → instance id → where it is (None: its name did not resolve).
    let mut instances: BTreeMap<String, BTreeMap<String, (Instance, Option<SocketAddr>)>> = BTreeMap::new();
    let mut revision = 0u64;
    let mut synced = false;
    let mut split_of: Splits = splits.borrow_and_update().clone();
    let mut splits_open = true;
    loop {
        let mut changed = Vec::new();
        let mut dirty = Vec::new();
        tokio::select! {
            change = watch.changes.recv() => match change {
                Some(change) => changed.push(change),
                None => return,
            },
            open = splits.changed(), if splits_open => {
                splits_open = open.is_ok();
                let next = splits.borrow_and_update().clone();
                dirty.extend(split_of.keys().chain(next.keys()).filter(|s| split_of.get(*s) != next.get(*s)).cloned());
                split_of = next;
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
            // The version groups of its split that have an instance.
            let groups: Vec<(&String, u32)> = split_of
                .get(&name)
                .into_iter()
                .flatten()
                .filter(|(version, percent)| **percent > 0 && endpoints.iter().any(|e| &e.version == *version))
                .map(|(version, percent)| (version, *percent))
                .collect();
            let stale: Vec<String> = services
                .range(format!("{name}{GROUP}")..)
                .map(|(key, _)| key)
                .take_while(|key| key.starts_with(&format!("{name}{GROUP}")))
                .filter(|key| !groups.iter().any(|(v, _)| key[name.len() + 1..] == ***v))
                .cloned()
                .collect();
            for key in stale {
                services.remove(&key);
            }
            if endpoints.is_empty() {
                instances.remove(&name);
                services.remove(&name);
                continue;
            }
            for (version, _) in &groups {
                let members: Vec<Endpoint> = endpoints.iter().filter(|e| &e.version == *version).cloned().collect();
                let group = format!("{name}{GROUP}{version}");
                if !same_endpoints(services.get(&group), &members) {
                    revision += 1;
                    services.insert(group.clone(), Arc::new(Service::new(&group, revision, members)));
                }
            }
            let split: Vec<(Arc<str>, u32)> = groups
                .iter()
                .map(|(version, percent)| (Arc::from(format!("{name}{GROUP}{version}")), *percent))
                .collect();
            let previous = services.get(&name);
            let same_split = previous.is_some_and(|s| s.split == split);
            if same_split && same_endpoints(previous, &endpoints) {
                continue;
            }
            let route_revision = match previous {
                Some(p) if same_split => p.route_revision,
                _ => revision + 1,
            };
            revision += 1;
            let service = Service::new(&name, revision, endpoints).with_split(split, route_revision);
            services.insert(name.clone(), Arc::new(service));
        }
        tracing::debug!(services = services.len(), revision, "registry changed");
        tx.send_replace(Arc::new(Snapshot { synced, services }));
    }
}

fn same_endpoints(service: Option<&Arc<Service>>, endpoints: &[Endpoint]) -> bool {
    service.is_some_and(|s| {
        let mut sorted = endpoints.to_vec();
        sorted.sort_by(|a, b| a.id.cmp(&b.id));
        s.endpoints == sorted
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &str = "meshkit.user.v1.UserService";

    fn instance(port: u16, version: &str) -> Instance {
        Instance {
            addr: format!("127.0.0.1:{port}"),
            zone: String::new(),
            weight: 100,
            version: version.into(),
            metadata: Default::default(),
        }
    }

    async fn next(snapshots: &mut watch::Receiver<Arc<Snapshot>>) -> Arc<Snapshot> {
        tokio::time::timeout(Duration::from_secs(2), snapshots.changed()).await.expect("a snapshot").expect("open");
        snapshots.borrow_and_update().clone()
    }

    fn names(snapshot: &Snapshot) -> Vec<&str> {
        snapshot.services.keys().map(String::as_str).collect()
    }

    #[tokio::test]
    async fn a_split_makes_a_cluster_per_version_with_instances_and_changes_the_routes() {
        let (changes_tx, changes) = tokio::sync::mpsc::channel(16);
        let (synced_tx, synced) = watch::channel(false);
        let registry = discovery::ServiceWatch { changes, synced, resyncs: Arc::default(), resumes: Arc::default() };
        let (splits_tx, splits) = watch::channel(Splits::new());
        let (tx, mut snapshots) = watch::channel(Arc::new(Snapshot::default()));
        tokio::spawn(follow(registry, splits, tx));
        for (id, port, version) in [("java-1", 1, "spring-1"), ("java-2", 2, "spring-1"), ("rust-1", 3, "0.1.0")] {
            changes_tx.send(Change::Insert(format!("{USER}/{id}"), instance(port, version))).await.unwrap();
        }
        synced_tx.send_replace(true);
        let plain = next(&mut snapshots).await;
        assert_eq!(names(&plain), [USER]);
        let routes = plain.services[USER].route_revision;

        // 90/10, and a version with no instance left out.
        let split = [("spring-1".to_owned(), 90), ("0.1.0".to_owned(), 10), ("0.2.0".to_owned(), 0)].into();
        splits_tx.send_replace([(USER.to_owned(), split)].into());
        let split = next(&mut snapshots).await;
        assert_eq!(names(&split), [USER, &format!("{USER}@0.1.0"), &format!("{USER}@spring-1")]);
        let user = &split.services[USER];
        assert_ne!(user.route_revision, routes, "the routes changed");
        assert_eq!(
            user.split,
            [(Arc::from(format!("{USER}@0.1.0")), 10), (Arc::from(format!("{USER}@spring-1")), 90)],
            "by version"
        );
        let java: Vec<&str> = split.services[&format!("{USER}@spring-1")].endpoints.iter().map(|e| &*e.id).collect();
        assert_eq!(java, ["java-1", "java-2"]);

        // The Rust instance leaves: its group goes, the split holds Java alone.
        changes_tx.send(Change::Remove(format!("{USER}/rust-1"))).await.unwrap();
        let java_only = next(&mut snapshots).await;
        assert_eq!(names(&java_only), [USER, &format!("{USER}@spring-1")]);
        assert_eq!(java_only.services[USER].split.len(), 1);

        // The split removed: back to one cluster.
        splits_tx.send_replace(Splits::new());
        let removed = next(&mut snapshots).await;
        assert_eq!(names(&removed), [USER]);
        assert!(removed.services[USER].split.is_empty());
    }
}
