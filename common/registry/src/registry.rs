//! The registry contract and the lease session that keeps an instance in it.
//!
//! Key: `{prefix}/services/{service}/{instance_id}`, bound to the instance's
//! lease. Value: JSON `{"addr":"host:port","zone":…,"weight":…,"version":…,"metadata":{…}}`.
//! `service` is the fully qualified gRPC service name, so a gRPC path routes to
//! its pool without a routing table. Java and Go services join by writing the
//! same keys (see docs/REGISTRY.md).

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use etcd_client::{Client, GetOptions, PutOptions};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
    time::sleep,
};

use meshkit_base::Backoff;

use crate::error::Result;

/// One registered instance, as stored under its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// `host:port` the instance serves gRPC on.
    pub addr: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

fn default_weight() -> u32 {
    100
}

/// `{prefix}/services/{service}/`: the prefix a discovery watch reads.
pub fn service_prefix(prefix: &str, service: &str) -> String {
    crate::keys::service(prefix, service)
}

/// `{prefix}/services/{service}/{instance_id}`.
pub fn instance_key(prefix: &str, service: &str, instance_id: &str) -> String {
    crate::keys::instance(prefix, service, instance_id)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct InstanceLabels {
    instance_id: String,
}

/// What the session knows about its lease, published on a watch channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Keys are written under this lease and keepalives are answered.
    Registered { lease_id: i64 },
    /// etcd is unreachable or the lease was lost; re-registering.
    Reconnecting,
    /// The lease was revoked at shutdown.
    Closed,
}

/// Keeps a set of keys alive in etcd under one lease.
///
/// A registration is a session: grant, put every key with the lease, keep
/// alive at about a third of the TTL (with jitter, so a fleet started together
/// does not beat in step), and when the lease is lost (a keepalive answered
/// TTL 0, or one of its keys is gone) grant a new one and put every key again.
/// While etcd is unreachable or has no leader it sends a keepalive every few
/// hundred milliseconds, each through the next member, so it is back within a
/// second of etcd answering, and keeps the lease it had when that outlived the
/// outage: a leader change, a lost quorum or a replaced member re-registers
/// no instance. [`RegistrySession::close`]
/// revokes the lease, which removes the keys at once.
pub struct RegistrySession {
    state: watch::Receiver<SessionState>,
    desired: EntriesHandle,
    /// Leases granted after the first: each one a re-registration.
    reregistrations: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl RegistrySession {
    /// Grants a lease and writes `entries` under it before returning, so the
    /// caller is registered when this succeeds (riding out a leader election
    /// or a member restarting: [`crate::etcd::Patience`]); then keeps it alive.
    pub async fn start(client: Client, ttl_secs: i64, entries: Vec<(String, String)>) -> Result<Self> {
        let reregistrations = Arc::new(AtomicU64::new(0));
        let (desired, desired_rx) = watch::channel(Desired { owned: entries, carried: Vec::new() });
        let mut worker = Worker {
            client,
            ttl_secs,
            entries: Vec::new(),
            carried: Vec::new(),
            desired: desired_rx,
            lease_id: 0,
            reregistrations: reregistrations.clone(),
        };
        let mut patience = crate::etcd::Patience::starting();
        loop {
            match worker.register().await {
                Err(e) if patience.again("registering", &e).await => continue,
                result => break result?,
            }
        }
        let (state_tx, state) = watch::channel(SessionState::Registered { lease_id: worker.lease_id });
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(worker.run(state_tx, stop_rx));
        let desired = EntriesHandle(Arc::new(desired));
        Ok(Self { state, desired, reregistrations, stop: Some(stop_tx), task: Some(task) })
    }

    /// A handle that changes the session's keys while it runs
    /// ([`EntriesHandle::set_entries`]).
    pub fn entries_handle(&self) -> EntriesHandle {
        self.desired.clone()
    }

    /// How many times keys were written again: under a new lease, or one
    /// key put back after it was deleted from outside.
    pub fn reregistrations(&self) -> u64 {
        self.reregistrations.load(Ordering::Relaxed)
    }

    /// The session's `/metrics` families, labelled with `instance_id`.
    pub fn metrics_source(&self, instance: &str) -> meshkit_telemetry::metrics::Source {
        let state = self.state.clone();
        let reregistrations = self.reregistrations.clone();
        let labels = InstanceLabels { instance_id: instance.to_owned() };
        meshkit_telemetry::metrics::source(move || {
            let up = matches!(*state.borrow(), SessionState::Registered { .. });
            let count = reregistrations.load(Ordering::Relaxed);
            let labels = labels.clone();
            async move {
                let mut scrape = meshkit_telemetry::metrics::Scrape::default();
                scrape
                    .gauges::<InstanceLabels>(
                        "meshkit_registry_session_up",
                        "1 while the instance's keys are in etcd under a live lease, 0 while re-registering.",
                    )
                    .get_or_create(&labels)
                    .set(f64::from(u8::from(up)));
                scrape
                    .counters::<InstanceLabels>(
                        "meshkit_registry_reregistrations",
                        "Times the instance wrote its keys again: a new lease after losing one, or a key deleted from outside.",
                    )
                    .get_or_create(&labels)
                    .inc_by(count);
                scrape
            }
        })
    }

    /// The current state; `changed()` on the receiver wakes on every change.
    pub fn state(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    /// The lease the keys are bound to now, if registered.
    pub fn lease_id(&self) -> Option<i64> {
        match *self.state.borrow() {
            SessionState::Registered { lease_id } => Some(lease_id),
            _ => None,
        }
    }

    /// Revokes the lease (removing every key) and stops the keepalives.
    pub async fn close(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for RegistrySession {
    fn drop(&mut self) {
        // Dropped without close(): stop keepalives; the lease expires by TTL.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Changes a session's keys from another task.
#[derive(Clone)]
pub struct EntriesHandle(Arc<watch::Sender<Desired>>);

impl EntriesHandle {
    /// `owned` replaces the keys written at start (one removed is deleted
    /// if it is still under the session's lease, one new or changed is
    /// written), and `carried` are keys someone else put under the lease (an
    /// operator's control) that are written again only when the session
    /// re-registers under a new lease. Applied by the session's task within
    /// a moment; the latest call wins.
    pub fn set_entries(&self, owned: Vec<(String, String)>, carried: Vec<(String, String)>) {
        let next = Desired { owned, carried };
        self.0.send_if_modified(|d| {
            let changed = *d != next;
            *d = next;
            changed
        });
    }
}

/// The keys a session should hold.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Desired {
    owned: Vec<(String, String)>,
    carried: Vec<(String, String)>,
}

struct Worker {
    client: Client,
    ttl_secs: i64,
    /// The owned keys written under the current lease.
    entries: Vec<(String, String)>,
    /// Keys written again only with a new lease.
    carried: Vec<(String, String)>,
    desired: watch::Receiver<Desired>,
    lease_id: i64,
    reregistrations: Arc<AtomicU64>,
}

enum Outcome {
    Stop,
    /// etcd answered TTL 0: the lease expired or was revoked.
    Lost,
    /// A call failed or stalled; `answered`: a keepalive got through first.
    Broken {
        answered: bool,
    },
}

impl Worker {
    async fn register(&mut self) -> Result<()> {
        let Desired { owned, carried } = self.desired.borrow_and_update().clone();
        self.entries = owned;
        self.carried = carried;
        let lease = self.client.lease_grant(self.ttl_secs, None).await?;
        let lease_id = lease.id();
        for (key, value) in self.entries.iter().chain(&self.carried) {
            if let Err(e) =
                self.client.put(key.as_str(), value.as_str(), Some(PutOptions::new().with_lease(lease_id))).await
            {
                let _ = self.client.lease_revoke(lease_id).await;
                return Err(e.into());
            }
        }
        self.lease_id = lease_id;
        tracing::info!(lease_id, keys = self.entries.len(), "registered in etcd");
        Ok(())
    }

    fn keepalive_interval(&self) -> Duration {
        let third = Duration::from_millis((self.ttl_secs as u64 * 1000) / 3);
        let jitter = rand::rng().random_range(0.8..1.0);
        third.mul_f64(jitter)
    }

    async fn run(mut self, state: watch::Sender<SessionState>, mut stop: oneshot::Receiver<()>) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
        loop {
            let outcome = tokio::select! {
                _ = &mut stop => Outcome::Stop,
                outcome = self.keep_alive_until_trouble(&state) => outcome,
            };
            match outcome {
                Outcome::Stop => break,
                Outcome::Broken { answered } => {
                    // A failed call says nothing about the lease (a leader
                    // election, a lost quorum, a member gone, a member still
                    // catching up), and etcd expires no lease while it has no
                    // leader. Keep sending keepalives, each on a fresh stream
                    // and so through the next member, until one is answered:
                    // only an answer of TTL 0 means the lease is gone.
                    if answered {
                        backoff.reset();
                    }
                    state.send_replace(SessionState::Reconnecting);
                    tokio::select! {
                        _ = &mut stop => break,
                        _ = sleep(backoff.next_delay()) => {}
                    }
                    continue;
                }
                Outcome::Lost => {
                    tracing::warn!(lease_id = self.lease_id, "lease expired or revoked, registering again");
                    state.send_replace(SessionState::Reconnecting);
                }
            }
            // Re-grant and re-put until etcd answers.
            loop {
                let attempt = tokio::select! {
                    _ = &mut stop => { state.send_replace(SessionState::Closed); return; }
                    r = self.register() => r,
                };
                match attempt {
                    Ok(()) => {
                        backoff.reset();
                        self.reregistrations.fetch_add(1, Ordering::Relaxed);
                        state.send_replace(SessionState::Registered { lease_id: self.lease_id });
                        break;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "registration failed, retrying");
                        tokio::select! {
                            _ = &mut stop => { state.send_replace(SessionState::Closed); return; }
                            _ = sleep(backoff.next_delay()) => {}
                        }
                    }
                }
            }
        }
        if let Err(e) = self.client.lease_revoke(self.lease_id).await {
            tracing::warn!(error = %e, lease_id = self.lease_id, "revoking the lease failed; it expires by TTL");
        } else {
            tracing::info!(lease_id = self.lease_id, "lease revoked");
        }
        state.send_replace(SessionState::Closed);
    }

    /// How long a keepalive or a key check may take before the session tries
    /// another member: well inside the TTL, so a member that stalls (catching
    /// up, cut off) costs one try, not the lease.
    fn answer_timeout(&self) -> Duration {
        Duration::from_millis((self.ttl_secs as u64 * 1000) / 4)
            .clamp(Duration::from_millis(500), Duration::from_secs(2))
    }

    /// Keeps the current lease alive until it is lost or a call fails.
    async fn keep_alive_until_trouble(&mut self, state: &watch::Sender<SessionState>) -> Outcome {
        // Opening the stream sends a keepalive and waits for its answer.
        let opened = tokio::time::timeout(self.answer_timeout(), self.client.lease_keep_alive(self.lease_id)).await;
        let (mut keeper, mut stream) = match opened {
            Ok(Ok(pair)) => pair,
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(e))) if e.contains("lease not found") => {
                return Outcome::Lost;
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "keepalive stream failed to open");
                return Outcome::Broken { answered: false };
            }
            Err(_) => {
                tracing::debug!("keepalive stream did not open in time");
                return Outcome::Broken { answered: false };
            }
        };
        let lease_id = self.lease_id;
        state.send_if_modified(|s| {
            let changed = *s != SessionState::Registered { lease_id };
            *s = SessionState::Registered { lease_id };
            changed
        });
        loop {
            // A key deleted from outside while the lease lives: put it back.
            let missing = tokio::time::timeout(self.answer_timeout(), self.missing_keys()).await;
            match missing {
                Ok(Ok(missing)) if !missing.is_empty() => {
                    for (key, value) in missing {
                        tracing::warn!(key, "registered key was removed from outside, writing it again");
                        let put = self.client.put(key, value, Some(PutOptions::new().with_lease(self.lease_id)));
                        if put.await.is_err() {
                            return Outcome::Broken { answered: true };
                        }
                        self.reregistrations.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => return Outcome::Broken { answered: true },
            }
            let due = tokio::time::Instant::now() + self.keepalive_interval();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => break,
                    changed = self.desired.changed() => {
                        if changed.is_err() {
                            // The session is going away; its stop follows.
                            tokio::time::sleep_until(due).await;
                            break;
                        }
                        let applied = tokio::time::timeout(self.answer_timeout(), self.apply_desired()).await;
                        if !matches!(applied, Ok(Ok(()))) {
                            // Tried again after the session is back.
                            self.desired.mark_changed();
                            return Outcome::Broken { answered: true };
                        }
                    }
                }
            }
            if let Err(e) = keeper.keep_alive().await {
                tracing::debug!(error = %e, "keepalive send failed");
                return Outcome::Broken { answered: true };
            }
            match tokio::time::timeout(self.answer_timeout(), stream.message()).await {
                Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
                Ok(Ok(Some(_))) => return Outcome::Lost,
                Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return Outcome::Broken { answered: true },
            }
        }
    }

    /// Brings the keys under the current lease to the desired owned set.
    /// `entries` follows each step that succeeds, so a failure half way
    /// leaves it true to etcd (and the missing-key check does not write back
    /// a key this removed).
    async fn apply_desired(&mut self) -> Result<()> {
        let Desired { owned, carried } = self.desired.borrow_and_update().clone();
        self.carried = carried;
        let removed: Vec<String> =
            self.entries.iter().filter(|(k, _)| !owned.iter().any(|(o, _)| o == k)).map(|(k, _)| k.clone()).collect();
        for key in removed {
            // Only while it is still ours: an instance that re-registered
            // elsewhere with the same key keeps it.
            let ours = etcd_client::Compare::lease(key.as_str(), etcd_client::CompareOp::Equal, self.lease_id);
            let delete = etcd_client::TxnOp::delete(key.as_str(), None);
            self.client.txn(etcd_client::Txn::new().when([ours]).and_then([delete])).await?;
            self.entries.retain(|(k, _)| *k != key);
            tracing::info!(key, "registered key removed");
        }
        for (key, value) in owned {
            if self.entries.iter().any(|(k, v)| *k == key && *v == value) {
                continue;
            }
            self.client.put(key.as_str(), value.as_str(), Some(PutOptions::new().with_lease(self.lease_id))).await?;
            tracing::info!(key, "registered key written");
            self.entries.retain(|(k, _)| *k != key);
            self.entries.push((key, value));
        }
        Ok(())
    }

    async fn missing_keys(&mut self) -> Result<Vec<(String, String)>> {
        let mut missing = Vec::new();
        for (key, value) in &self.entries {
            let resp = self.client.get(key.as_str(), Some(GetOptions::new().with_count_only())).await?;
            if resp.count() == 0 {
                missing.push((key.clone(), value.clone()));
            }
        }
        Ok(missing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_json_is_the_contract() {
        let json = r#"{"addr":"127.0.0.1:5000","zone":"z1","weight":50,"version":"1.2","metadata":{"lang":"java"}}"#;
        let i: Instance = serde_json::from_str(json).unwrap();
        assert_eq!(i.addr, "127.0.0.1:5000");
        assert_eq!(i.weight, 50);
        assert_eq!(i.metadata["lang"], "java");
        // Only addr is required: other languages may write less.
        let minimal: Instance = serde_json::from_str(r#"{"addr":"h:1"}"#).unwrap();
        assert_eq!(minimal.weight, 100);
        assert!(serde_json::from_str::<Instance>(r#"{"zone":"x"}"#).is_err());
    }

    #[test]
    fn keys_follow_the_contract() {
        assert_eq!(
            instance_key("/meshkit", "meshkit.user.v1.UserService", "i-1"),
            "/meshkit/services/meshkit.user.v1.UserService/i-1"
        );
        assert!(instance_key("/m", "s", "i").starts_with(&service_prefix("/m", "s")));
    }
}
