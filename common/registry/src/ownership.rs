//! Exclusive ownership of numbered slots, shared out among live members
//! through etcd leases.
//!
//! A group has `slots` slots (the partitions of a topic, or a single slot for
//! a leader). Every member keeps `{prefix}/groups/{group}/members/{member}`
//! alive under its own lease; slot `i` belongs to the `i % n`-th of the `n`
//! live members in id order. A member takes a slot by creating
//! `{prefix}/groups/{group}/owners/{i}` under its lease, only if the key does
//! not exist, and gives it up by deleting it after its worker stopped. So a
//! slot has at most one owner in etcd, and a member that dies loses its slots
//! when its lease expires.
//!
//! etcd alone cannot stop a member that lost its lease without noticing (a
//! paused process, a partition from etcd) from working on. Every claim
//! therefore carries a [`Fence`]: the etcd cluster id and the create revision
//! of the owner key, which only grows. Whatever the slot's worker writes must
//! be refused once a newer fence was seen (the event consumer keeps the fence
//! in its offsets row and updates that row only while it still holds it).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    future::Future,
    pin::Pin,
    time::Duration,
};

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{
    error::Result,
    registry::{RegistrySession, SessionState},
};

/// Proof of ownership: writes made under an older fence must be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fence {
    /// The etcd cluster the revision belongs to: a new cluster starts counting again.
    pub cluster_id: u64,
    /// The create revision of the owner key.
    pub revision: i64,
}

/// What a slot worker is given.
#[derive(Debug, Clone)]
pub struct Slot {
    pub index: u32,
    pub fence: Fence,
    /// Cancelled when the slot must be given up: stop soon, finishing the
    /// current step if it is quick.
    pub cancel: CancellationToken,
}

/// Why a slot worker returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotEnd {
    /// It was cancelled and stopped.
    Stopped,
    /// It found a newer fence: someone else owns the slot now.
    Fenced,
}

type BoxFuture = Pin<Box<dyn Future<Output = SlotEnd> + Send>>;

/// Starts a worker for a slot this member now owns.
pub type SlotWorker = Box<dyn Fn(Slot) -> BoxFuture + Send + Sync>;

/// Settings of one group.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    /// etcd key prefix of the mesh (`etcd.prefix`).
    pub prefix: String,
    pub group: String,
    pub member: String,
    pub slots: u32,
    pub ttl_secs: i64,
    /// How long a worker may take to stop before its slot is released anyway.
    pub stop_timeout: Duration,
}

/// A member of a slot group. Dropping it without [`close`](Self::close)
/// cancels the workers and leaves the slots to expire with the lease.
pub struct SlotGroup {
    owned: watch::Receiver<BTreeSet<u32>>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl SlotGroup {
    /// Joins the group; returns once the member key is written. Slots are
    /// taken in the background as they become free.
    pub async fn join(client: Client, spec: GroupSpec, worker: SlotWorker) -> Result<Self> {
        let member_key = crate::keys::group_member(&spec.prefix, &spec.group, &spec.member);
        let session =
            RegistrySession::start(client.clone(), spec.ttl_secs, vec![(member_key, spec.member.clone())]).await?;
        let (owned_tx, owned) = watch::channel(BTreeSet::new());
        let cancel = CancellationToken::new();
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let coordinator = Coordinator {
            client,
            root: cancel.clone(),
            group_prefix: crate::keys::group(&spec.prefix, &spec.group),
            spec,
            session,
            lease: None,
            worker,
            running: HashMap::new(),
            ended_tx,
            ended,
            owned: owned_tx,
        };
        let task = tokio::spawn(coordinator.run(cancel.clone()));
        Ok(Self { owned, cancel, task: Some(task) })
    }

    /// The slots this member runs workers for now.
    pub fn owned(&self) -> watch::Receiver<BTreeSet<u32>> {
        self.owned.clone()
    }

    /// Stops every worker, releases their slots and leaves the group.
    pub async fn close(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for SlotGroup {
    fn drop(&mut self) {
        // Every worker's token is a child of this one.
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

struct Running {
    fence: Fence,
    cancel: CancellationToken,
    task: JoinHandle<SlotEnd>,
}

struct Coordinator {
    client: Client,
    /// The group's token: every worker's token is a child of it.
    root: CancellationToken,
    spec: GroupSpec,
    group_prefix: String,
    session: RegistrySession,
    /// The lease the running workers' owner keys are bound to.
    lease: Option<i64>,
    worker: SlotWorker,
    running: HashMap<u32, Running>,
    ended_tx: mpsc::UnboundedSender<(u32, Fence)>,
    ended: mpsc::UnboundedReceiver<(u32, Fence)>,
    owned: watch::Sender<BTreeSet<u32>>,
}

/// The group as read from etcd.
struct View {
    members: Vec<String>,
    /// slot → (member, create revision, lease)
    owners: BTreeMap<u32, (String, i64, i64)>,
    cluster_id: u64,
}

impl Coordinator {
    async fn run(mut self, cancel: CancellationToken) {
        let mut state = self.session.state();
        let mut tick = tokio::time::interval(Duration::from_millis(1_000));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stream = None;
        loop {
            if stream.is_none() {
                stream = self.open_watch().await;
            }
            if let Err(e) = self.reconcile().await {
                tracing::debug!(group = self.spec.group, error = %e, "slot reconcile failed; retrying");
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = state.changed() => {
                    if changed.is_err() { break; }
                }
                event = next_event(&mut stream) => {
                    if !event { stream = None; }
                }
                Some((slot, fence)) = self.ended.recv() => self.ended(slot, fence).await,
                _ = tick.tick() => {}
            }
        }
        let slots: Vec<u32> = self.running.keys().copied().collect();
        for slot in slots {
            self.release(slot).await;
        }
        self.publish();
        self.session.close().await;
    }

    async fn open_watch(&mut self) -> Option<etcd_client::WatchStream> {
        let options = WatchOptions::new().with_prefix();
        let open = self.client.watch(self.group_prefix.as_str(), Some(options));
        match tokio::time::timeout(Duration::from_secs(2), open).await {
            Ok(Ok(stream)) => Some(stream),
            _ => None,
        }
    }

    async fn read(&mut self) -> Result<View> {
        let resp = self.client.get(self.group_prefix.as_str(), Some(GetOptions::new().with_prefix())).await?;
        let cluster_id = resp.header().map(|h| h.cluster_id()).unwrap_or(0);
        let members_prefix = format!("{}members/", self.group_prefix);
        let owners_prefix = format!("{}owners/", self.group_prefix);
        let mut members = Vec::new();
        let mut owners = BTreeMap::new();
        for kv in resp.kvs() {
            let key = kv.key_str().unwrap_or_default();
            if let Some(member) = key.strip_prefix(&members_prefix) {
                members.push(member.to_owned());
            } else if let Some(slot) = key.strip_prefix(&owners_prefix).and_then(|s| s.parse::<u32>().ok()) {
                let owner = kv.value_str().unwrap_or_default().to_owned();
                owners.insert(slot, (owner, kv.create_revision(), kv.lease()));
            }
        }
        members.sort();
        Ok(View { members, owners, cluster_id })
    }

    fn desired(&self, view: &View) -> BTreeSet<u32> {
        let Some(me) = view.members.iter().position(|m| *m == self.spec.member) else {
            return BTreeSet::new();
        };
        let n = view.members.len() as u32;
        (0..self.spec.slots).filter(|slot| slot % n == me as u32).collect()
    }

    async fn reconcile(&mut self) -> Result<()> {
        let SessionState::Registered { lease_id: lease } = *self.session.state().borrow() else {
            // etcd unreachable: keep working; the fence guards the writes.
            return Ok(());
        };
        if self.lease != Some(lease) {
            // A new lease: every owner key of the old one is gone with it.
            if !self.running.is_empty() {
                tracing::warn!(group = self.spec.group, "lease replaced; stopping the workers of the old one");
                self.stop_all().await;
            }
            self.lease = Some(lease);
        }
        let view = self.read().await?;
        let desired = self.desired(&view);

        // Hand over what is no longer ours, and stop what someone else took.
        let held: Vec<u32> = self.running.keys().copied().collect();
        for slot in held {
            let still_ours = matches!(view.owners.get(&slot), Some((m, _, l)) if *m == self.spec.member && *l == lease);
            if !still_ours {
                tracing::warn!(group = self.spec.group, slot, "slot lost; stopping its worker");
                self.stop(slot).await;
            } else if !desired.contains(&slot) {
                tracing::info!(group = self.spec.group, slot, "handing slot over");
                self.release(slot).await;
            }
        }
        for slot in desired {
            if self.running.contains_key(&slot) {
                continue;
            }
            let fence = match view.owners.get(&slot) {
                Some((member, revision, l)) if *member == self.spec.member && *l == lease => {
                    Some(Fence { cluster_id: view.cluster_id, revision: *revision })
                }
                Some(_) => None,
                None => self.claim(slot, lease).await?,
            };
            if let Some(fence) = fence {
                self.start(slot, fence);
            }
        }
        self.publish();
        Ok(())
    }

    fn owner_key(&self, slot: u32) -> String {
        format!("{}owners/{slot}", self.group_prefix)
    }

    /// Creates the owner key if it does not exist; the fence is its create revision.
    async fn claim(&mut self, slot: u32, lease: i64) -> Result<Option<Fence>> {
        let key = self.owner_key(slot);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.as_str(), self.spec.member.as_str(), Some(PutOptions::new().with_lease(lease)))]);
        let resp = self.client.txn(txn).await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        let header = resp.header();
        let fence = Fence {
            cluster_id: header.map(|h| h.cluster_id()).unwrap_or(0),
            revision: header.map(|h| h.revision()).unwrap_or(0),
        };
        tracing::info!(group = self.spec.group, slot, revision = fence.revision, "slot taken");
        Ok(Some(fence))
    }

    fn start(&mut self, slot: u32, fence: Fence) {
        let cancel = self.root.child_token();
        let work = (self.worker)(Slot { index: slot, fence, cancel: cancel.clone() });
        let ended = self.ended_tx.clone();
        let task = tokio::spawn(async move {
            let end = work.await;
            let _ = ended.send((slot, fence));
            end
        });
        self.running.insert(slot, Running { fence, cancel, task });
    }

    /// Stops the worker of `slot` (bounded by the stop timeout).
    async fn stop(&mut self, slot: u32) -> Option<Fence> {
        let running = self.running.remove(&slot)?;
        running.cancel.cancel();
        let mut task = running.task;
        if tokio::time::timeout(self.spec.stop_timeout, &mut task).await.is_err() {
            tracing::warn!(group = self.spec.group, slot, "worker did not stop in time; aborting it");
            task.abort();
        }
        Some(running.fence)
    }

    async fn stop_all(&mut self) {
        let slots: Vec<u32> = self.running.keys().copied().collect();
        for slot in slots {
            self.stop(slot).await;
        }
    }

    /// Stops the worker, then deletes the owner key if it is still ours, so
    /// the next owner can start at once.
    async fn release(&mut self, slot: u32) {
        let Some(fence) = self.stop(slot).await else { return };
        self.delete_owner(slot, fence).await;
    }

    async fn delete_owner(&mut self, slot: u32, fence: Fence) {
        let key = self.owner_key(slot);
        let txn = Txn::new()
            .when([Compare::create_revision(key.as_str(), CompareOp::Equal, fence.revision)])
            .and_then([TxnOp::delete(key.as_str(), Some(DeleteOptions::new()))]);
        match tokio::time::timeout(Duration::from_secs(2), self.client.txn(txn)).await {
            Ok(Ok(_)) => tracing::info!(group = self.spec.group, slot, "slot released"),
            _ => tracing::debug!(group = self.spec.group, slot, "slot release failed; it expires with the lease"),
        }
    }

    /// A worker returned by itself.
    async fn ended(&mut self, slot: u32, fence: Fence) {
        // A worker stopped on purpose was removed already, or replaced by a newer one.
        if self.running.get(&slot).is_none_or(|r| r.fence != fence) {
            return;
        }
        let Some(running) = self.running.remove(&slot) else { return };
        let end = running.task.await.unwrap_or(SlotEnd::Stopped);
        tracing::warn!(group = self.spec.group, slot, ?end, "slot worker ended");
        // Give the slot up; the next reconcile takes it again if it is still ours to take.
        self.delete_owner(slot, fence).await;
        self.publish();
    }

    fn publish(&self) {
        let owned: BTreeSet<u32> = self.running.keys().copied().collect();
        self.owned.send_if_modified(|current| {
            if *current == owned {
                false
            } else {
                *current = owned;
                true
            }
        });
    }
}

/// Waits for the next event of the group watch; false when the stream ended.
async fn next_event(stream: &mut Option<etcd_client::WatchStream>) -> bool {
    match stream {
        Some(s) => matches!(s.message().await, Ok(Some(_))),
        None => std::future::pending().await,
    }
}

/// A group member that keeps trying to join while etcd is away. Dropping it
/// without [`close`](Self::close) cancels the workers and leaves the slots to
/// expire with the lease.
pub struct GroupHandle {
    owned: watch::Receiver<BTreeSet<u32>>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl GroupHandle {
    /// The slots this member runs workers for now.
    pub fn owned(&self) -> watch::Receiver<BTreeSet<u32>> {
        self.owned.clone()
    }

    /// Stops every worker, releases the slots and leaves the group.
    pub async fn close(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for GroupHandle {
    fn drop(&mut self) {
        // Aborting drops the joined SlotGroup, which cancels its workers.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl SlotGroup {
    /// Joins in the background, retrying with backoff until etcd answers.
    pub fn spawn(client: Client, spec: GroupSpec, worker: SlotWorker) -> GroupHandle {
        let worker = std::sync::Arc::new(worker);
        let name = spec.group.clone();
        Self::spawn_joining(name, move || {
            let w = worker.clone();
            SlotGroup::join(client.clone(), spec.clone(), Box::new(move |slot| w(slot)))
        })
    }

    /// Runs `join` in the background until it succeeds (with backoff), then
    /// follows the group's slots until the handle is closed. `join` may do
    /// more than [`join`](Self::join), e.g. wait for a broker first.
    pub fn spawn_joining<F, Fut, E>(name: String, join: F) -> GroupHandle
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<SlotGroup, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let cancel = CancellationToken::new();
        let (owned_tx, owned) = watch::channel(BTreeSet::new());
        let stop = cancel.clone();
        let task = tokio::spawn(async move {
            let mut backoff = meshkit_base::Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            let mut attempts = 0u32;
            let group = loop {
                let result = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = join() => r,
                };
                match result {
                    Ok(group) => {
                        if attempts > 0 {
                            tracing::info!(group = name, attempts, "joined the group");
                        }
                        break group;
                    }
                    Err(e) => {
                        // One line while it keeps failing, not one per retry.
                        if attempts == 0 {
                            tracing::warn!(group = name, error = %e, "cannot join the group yet; retrying quietly");
                        } else {
                            tracing::debug!(group = name, error = %e, attempts, "still cannot join the group");
                        }
                        attempts += 1;
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff.next_delay()) => {}
                        }
                    }
                }
            };
            let mut inner = group.owned();
            loop {
                owned_tx.send_replace(inner.borrow_and_update().clone());
                tokio::select! {
                    _ = stop.cancelled() => break,
                    changed = inner.changed() => if changed.is_err() { break },
                }
            }
            group.close().await;
            owned_tx.send_replace(BTreeSet::new());
        });
        GroupHandle { owned, cancel, task: Some(task) }
    }
}
