//! Where jobs run: the live executors from the registry, the route
//! strategies, and one call to an executor.

use std::{
    collections::{BTreeMap, HashMap},
    hash::{Hash, Hasher},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use etcd_client::Client;
use meshkit_common::{Instance, discovery::watch_prefix, jobs::EXECUTOR_SERVICE, registry::service_prefix};
use meshkit_proto::scheduler::{RunJobRequest, RunJobResponse, job_executor_client::JobExecutorClient};
use tokio::sync::watch;
use tonic::{Status, transport::Channel};
use tower::discover::Change;

/// One live executor: its instance id and registration.
pub type Live = (String, Instance);

/// The executors registered in etcd, kept current by a discovery watch.
pub struct Executors {
    live: Arc<RwLock<BTreeMap<String, Instance>>>,
    synced: watch::Receiver<bool>,
    channels: Mutex<HashMap<String, Channel>>,
    turns: Mutex<HashMap<String, usize>>,
    tls: Option<Arc<meshkit_common::tls::Tls>>,
}

impl Executors {
    /// Watches `{prefix}/services/meshkit.scheduler.v1.JobExecutor/`.
    /// Calls go over mTLS when `tls` is given.
    pub fn watch(etcd: Client, prefix: &str, tls: Option<Arc<meshkit_common::tls::Tls>>) -> Arc<Self> {
        let mut watch = watch_prefix(etcd, service_prefix(prefix, EXECUTOR_SERVICE));
        let live = Arc::new(RwLock::new(BTreeMap::new()));
        let writer = live.clone();
        tokio::spawn(async move {
            while let Some(change) = watch.changes.recv().await {
                let mut live = writer.write().unwrap_or_else(|p| p.into_inner());
                match change {
                    Change::Insert(id, instance) => {
                        live.insert(id, instance);
                    }
                    Change::Remove(id) => {
                        live.remove(&id);
                    }
                }
            }
        });
        Arc::new(Self {
            live,
            synced: watch.synced,
            channels: Mutex::new(HashMap::new()),
            turns: Mutex::new(HashMap::new()),
            tls,
        })
    }

    /// Waits (bounded) for the first full read of the registry.
    pub async fn ready(&self, wait: Duration) {
        let mut synced = self.synced.clone();
        let _ = tokio::time::timeout(wait, synced.wait_for(|s| *s)).await;
    }

    /// The live executors of `component`, in instance id order.
    pub fn of(&self, component: &str) -> Vec<Live> {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        live.iter()
            .filter(|(_, i)| i.metadata.get("component").is_some_and(|c| c == component))
            .map(|(id, i)| (id.clone(), i.clone()))
            .collect()
    }

    /// Every live executor: (id, component, address).
    pub fn all(&self) -> Vec<(String, String, String)> {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        live.iter()
            .map(|(id, i)| (id.clone(), i.metadata.get("component").cloned().unwrap_or_default(), i.addr.clone()))
            .collect()
    }

    /// The executor a single-shard run of `job` goes to first.
    pub fn pick(&self, job: &str, route: &str, live: &[Live]) -> Option<Live> {
        if live.is_empty() {
            return None;
        }
        let index = match route {
            "first" | "failover" => 0,
            "last" => live.len() - 1,
            "random" => rand::random_range(0..live.len()),
            // Rendezvous hashing: a job stays on its executor while it lives,
            // and only the jobs of one that leaves move.
            "consistent_hash" => {
                let score = |id: &str| {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    (job, id).hash(&mut h);
                    h.finish()
                };
                live.iter().enumerate().max_by_key(|(_, (id, _))| score(id)).map_or(0, |(i, _)| i)
            }
            _ => {
                let mut turns = self.turns.lock().unwrap_or_else(|p| p.into_inner());
                let turn = turns.entry(job.to_owned()).or_insert(0);
                let index = *turn % live.len();
                *turn = turn.wrapping_add(1);
                index
            }
        };
        live.get(index).cloned()
    }

    /// Where a retry goes: the next executor after those tried (in id order
    /// for failover, any untried one otherwise); when every one was tried,
    /// round again.
    pub fn retry_target(&self, route: &str, live: &[Live], tried: &[String]) -> Option<Live> {
        let untried: Vec<&Live> = live.iter().filter(|(id, _)| !tried.contains(id)).collect();
        if let Some(next) = untried.first() {
            return Some(if route == "failover" || untried.len() == 1 {
                (*next).clone()
            } else {
                untried[rand::random_range(0..untried.len())].clone()
            });
        }
        if live.is_empty() {
            return None;
        }
        // All tried: the one tried longest ago.
        let last_try = |id: &str| tried.iter().rposition(|t| t == id).unwrap_or(0);
        live.iter().min_by_key(|(id, _)| last_try(id)).cloned()
    }

    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let channel = meshkit_common::tls::channel(addr, self.tls.clone())
            .map_err(|e| Status::invalid_argument(format!("executor address {addr:?}: {e}")))?;
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Forgets connections to executors that left the registry.
    pub fn prune(&self) {
        let addrs: Vec<String> = {
            let live = self.live.read().unwrap_or_else(|p| p.into_inner());
            live.values().map(|i| i.addr.clone()).collect()
        };
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).retain(|addr, _| addrs.contains(addr));
    }

    /// Calls RunJob on the executor at `addr`, bounded by `timeout` (sent as
    /// the call's deadline, and enforced here too).
    /// Calls `RunJob`, carrying `span`'s trace context to the executor.
    pub async fn run(
        &self,
        addr: &str,
        request: RunJobRequest,
        timeout: Duration,
        span: &tracing::Span,
    ) -> Result<RunJobResponse, Status> {
        let mut client = JobExecutorClient::new(self.channel(addr)?);
        let mut request = tonic::Request::new(request);
        request.set_timeout(timeout);
        for (name, value) in meshkit_common::trace::context_headers(span) {
            if let (Ok(name), Ok(value)) = (
                tonic::metadata::MetadataKey::from_bytes(name.as_bytes()),
                tonic::metadata::MetadataValue::try_from(value.as_str()),
            ) {
                request.metadata_mut().insert(name, value);
            }
        }
        match tokio::time::timeout(timeout + Duration::from_millis(500), client.run_job(request)).await {
            Ok(result) => result.map(tonic::Response::into_inner).map_err(|status| lost_connection(status, addr)),
            Err(_) => Err(Status::deadline_exceeded(format!("no answer within the job's timeout of {timeout:?}"))),
        }
    }
}

/// A call cut by a dead connection comes back as UNKNOWN "transport error":
/// say what happened, as UNAVAILABLE.
fn lost_connection(status: Status, addr: &str) -> Status {
    if status.code() != tonic::Code::Unknown {
        return status;
    }
    let Some(source) = std::error::Error::source(&status) else { return status };
    let mut cause = source.to_string();
    let mut next = source.source();
    while let Some(e) = next {
        cause = format!("{cause}: {e}");
        next = e.source();
    }
    Status::unavailable(format!("the connection to the executor at {addr} broke during the run ({cause})"))
}
