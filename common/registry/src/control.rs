//! Operator control of a live instance: drain it out of rotation, or change
//! its weight, from `meshctl` or the console, without touching the process.
//!
//! How the instance is told: the operator writes
//! `{prefix}/control/{service}/{instance_id}` (JSON [`Control`]) under the
//! instance's own lease, read from its registration. Every meshkit server
//! follows its control keys ([`follow`]) and rewrites its registration: a
//! weight replaces the configured one in the value every balancer and xDS
//! client reads; a drain deletes the registration, so callers drop the
//! instance from their pools, while the process keeps serving what is in
//! flight and stays up, ready to be put back. Because the key lives on the
//! instance's lease, a drain or weight lasts as long as the process: one that
//! stops or is restarted comes back with its configured weight, in rotation.
//! When the instance re-registers under a new lease (after an outage longer
//! than its TTL) it writes its control key again under the new one.
//!
//! Who may tell it: whoever may write `{prefix}/control/` in etcd. With etcd
//! auth on, the components' roles (`meshctl etcd-user`) may read it but
//! write only their own services' keys there; operators (meshctl as root, the
//! console) write any.

use std::{
    collections::BTreeMap,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use etcd_client::{Client, Compare, CompareOp, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::{sync::watch, task::JoinHandle};

use meshkit_base::Backoff;

use crate::{
    error::{Error, Result},
    keys,
    registry::{Instance, RegistrySession},
};

/// What an operator set for one registration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Control {
    /// Out of rotation: the registration is withdrawn while the process runs.
    #[serde(default)]
    pub drained: bool,
    /// Replaces the configured weight (1 to 10,000; 100 is the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Who changed it last.
    #[serde(default)]
    pub by: String,
    /// When, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub at_ms: u64,
    /// The instance's address when the control was written: a drained
    /// instance has no registration to read it from (a console checks its
    /// health there).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub addr: String,
}

/// The registration metadata key by which an instance says it follows its
/// control keys (every meshkit server does); a control for an instance
/// without it is refused rather than recorded and ignored.
pub const FOLLOWS: &str = "control";

/// An operator's change to a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Drain,
    Undrain,
    /// `None` goes back to the configured weight.
    Weight(Option<u32>),
}

/// The weights an operator may set.
pub const WEIGHTS: std::ops::RangeInclusive<u32> = 1..=10_000;

/// Applies `change` to the control of `service`'s instance `instance_id`, as
/// `by`, and returns the control now in force. Refused (`NotFound`) when the
/// instance holds no live lease: a gone instance cannot be told anything.
pub async fn set(
    client: &mut Client,
    prefix: &str,
    service: &str,
    instance_id: &str,
    change: Change,
    by: &str,
) -> Result<Control> {
    if let Change::Weight(Some(w)) = change
        && !WEIGHTS.contains(&w)
    {
        return Err(Error::Refused(format!("weight {w} is outside {}..={}", WEIGHTS.start(), WEIGHTS.end())));
    }
    let instance_key = keys::instance(prefix, service, instance_id);
    let control_key = keys::control(prefix, service, instance_id);
    // Read and write in one compare-and-swap, so two operators changing the
    // same instance at once do not lose one change.
    for _ in 0..5 {
        // A drained instance has no registration left; its control key holds the lease.
        let registered = client.get(instance_key.as_str(), None).await?;
        let held = client.get(control_key.as_str(), None).await?;
        let registration = registered.kvs().first();
        let lease = registration.or(held.kvs().first()).map_or(0, etcd_client::KeyValue::lease);
        if lease == 0 {
            return Err(Error::NotFound(format!("no live instance {instance_id} of {service}")));
        }
        let current: Option<Instance> = registration.and_then(|kv| serde_json::from_slice(kv.value()).ok());
        if let Some(i) = &current
            && !i.metadata.contains_key(FOLLOWS)
        {
            return Err(Error::Refused(format!(
                "instance {instance_id} of {service} does not follow operator controls (not a meshkit server); \
                 stop it, or change its own settings"
            )));
        }
        let held_revision = held.kvs().first().map_or(0, etcd_client::KeyValue::mod_revision);
        let mut control: Control =
            held.kvs().first().and_then(|kv| serde_json::from_slice(kv.value()).ok()).unwrap_or_default();
        match change {
            Change::Drain => control.drained = true,
            Change::Undrain => control.drained = false,
            Change::Weight(w) => control.weight = w,
        }
        control.by = by.to_owned();
        control.at_ms = now_ms();
        if let Some(i) = current {
            control.addr = i.addr;
        }
        let value = serde_json::to_string(&control).map_err(|e| Error::Refused(e.to_string()))?;
        let unchanged = Compare::mod_revision(control_key.as_str(), CompareOp::Equal, held_revision);
        let put = TxnOp::put(control_key.as_str(), value, Some(PutOptions::new().with_lease(lease)));
        match client.txn(Txn::new().when([unchanged]).and_then([put])).await {
            Ok(resp) if resp.succeeded() => return Ok(control),
            Ok(_) => continue,
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease not found") => {
                return Err(Error::NotFound(format!("instance {instance_id} of {service} is gone (its lease ended)")));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Refused(format!("the control of {instance_id} kept changing under us; try again")))
}

/// Every control in the mesh: `(service, instance_id)` → the control and
/// the lease it lives under (the instance's).
pub async fn list(client: &mut Client, prefix: &str) -> Result<BTreeMap<(String, String), (Control, i64)>> {
    let root = keys::controls(prefix);
    let resp = client.get(root.as_str(), Some(GetOptions::new().with_prefix())).await?;
    let mut out = BTreeMap::new();
    for kv in resp.kvs() {
        let key = kv.key_str().unwrap_or_default();
        let Some((service, id)) = key.strip_prefix(&root).and_then(|r| r.split_once('/')) else { continue };
        if let Ok(control) = serde_json::from_slice::<Control>(kv.value()) {
            out.insert((service.to_owned(), id.to_owned()), (control, kv.lease()));
        }
    }
    Ok(out)
}

/// The controls in force for one process, by service.
pub type InForce = BTreeMap<String, Control>;

/// Follows the control keys of `instance_id`'s registrations of `services`
/// and keeps `session`'s keys to them: each service's registration is
/// `instance` with the operator's weight, or withdrawn while drained. The
/// receiver tells the caller what is in force (a server marks a drained
/// service NOT_SERVING). Stops when the task is aborted.
pub fn follow(
    client: Client,
    prefix: &str,
    instance_id: &str,
    services: Vec<String>,
    instance: Instance,
    session: &RegistrySession,
) -> (watch::Receiver<InForce>, JoinHandle<()>) {
    let (tx, rx) = watch::channel(InForce::new());
    let follower = Follower {
        client,
        root: keys::controls(prefix),
        prefix: prefix.to_owned(),
        instance_id: instance_id.to_owned(),
        services,
        instance,
        session: session.entries_handle(),
        raw: BTreeMap::new(),
        tx,
    };
    (rx, tokio::spawn(follower.run()))
}

struct Follower {
    client: Client,
    root: String,
    prefix: String,
    instance_id: String,
    services: Vec<String>,
    instance: Instance,
    session: crate::registry::EntriesHandle,
    /// The last control value seen per service. Kept when the key goes: a
    /// control key is only ever deleted with the lease it was written under
    /// (operators write `undrain` or `weight default` to undo), and the
    /// session writes it again under its next lease.
    raw: BTreeMap<String, String>,
    tx: watch::Sender<InForce>,
}

impl Follower {
    async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            if let Err(e) = self.follow_once().await {
                tracing::debug!(error = %e, "control watch broke, reading again");
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// A full read, then the watch from the revision after it.
    async fn follow_once(&mut self) -> Result<()> {
        let resp = self.client.get(self.root.as_str(), Some(GetOptions::new().with_prefix())).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        for kv in resp.kvs() {
            if let Some(service) = self.ours(kv.key_str().unwrap_or_default()) {
                self.raw.insert(service, String::from_utf8_lossy(kv.value()).into_owned());
            }
        }
        self.apply();
        let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
        let mut stream = self.client.watch(self.root.as_str(), Some(options)).await?;
        while let Some(resp) = stream.message().await? {
            if resp.canceled() {
                return Ok(());
            }
            let mut touched = false;
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                if event.event_type() != EventType::Put {
                    continue;
                }
                if let Some(service) = self.ours(kv.key_str().unwrap_or_default()) {
                    self.raw.insert(service, String::from_utf8_lossy(kv.value()).into_owned());
                    touched = true;
                }
            }
            if touched {
                self.apply();
            }
        }
        Ok(())
    }

    /// The service of one of this instance's control keys.
    fn ours(&self, key: &str) -> Option<String> {
        let (service, id) = key.strip_prefix(&self.root)?.split_once('/')?;
        (id == self.instance_id && self.services.iter().any(|s| s == service)).then(|| service.to_owned())
    }

    fn apply(&self) {
        let raw = &self.raw;
        let mut in_force = InForce::new();
        let mut owned = Vec::new();
        let mut carried = Vec::new();
        for service in &self.services {
            let control = match raw.get(service).map(|v| serde_json::from_str::<Control>(v)) {
                Some(Ok(c)) => {
                    carried.push((keys::control(&self.prefix, service, &self.instance_id), raw[service].clone()));
                    c
                }
                Some(Err(e)) => {
                    tracing::warn!(service, error = %e, "ignoring an unreadable control value");
                    Control::default()
                }
                None => Control::default(),
            };
            if !control.drained {
                let mut instance = self.instance.clone();
                if let Some(w) = control.weight.filter(|w| WEIGHTS.contains(w)) {
                    instance.weight = w;
                }
                if let Ok(value) = serde_json::to_string(&instance) {
                    owned.push((keys::instance(&self.prefix, service, &self.instance_id), value));
                }
            }
            in_force.insert(service.clone(), control);
        }
        let before = self.tx.borrow().clone();
        for (service, control) in &in_force {
            let was = before.get(service).cloned().unwrap_or_default();
            if was.drained != control.drained {
                let state = if control.drained { "drained: registration withdrawn" } else { "back in rotation" };
                tracing::info!(service, by = control.by, "{state}");
            }
            if was.weight != control.weight {
                let weight = control.weight.unwrap_or(self.instance.weight);
                tracing::info!(service, by = control.by, weight, "weight changed");
            }
        }
        self.session.set_entries(owned, carried);
        self.tx.send_replace(in_force);
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}
