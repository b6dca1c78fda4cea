//! A resumable prefix watch per service, emitting tower `Change`s.
//!
//! The watch starts from a full read of the prefix, then follows events from
//! the next revision. A broken stream is re-opened from the last revision seen
//! (with backoff); a compaction, a cancelled watch or a failed resume falls back
//! to a full read, and only the difference from what was last emitted goes out.
//! While etcd is unreachable nothing is removed: the last known endpoints stay
//! in every pool.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::{mpsc, watch};
use tower::discover::Change;

use meshkit_base::Backoff;

use crate::registry::Instance;

/// Instance id (the last key segment) → instance.
pub type Instances = HashMap<String, Instance>;

/// A running watch over one service prefix.
pub struct ServiceWatch {
    /// Changes in the order they happened. Dropping it stops the watch.
    pub changes: mpsc::Receiver<Change<String, Instance>>,
    /// Turns true once the first full read has been sent on `changes`.
    pub synced: watch::Receiver<bool>,
    /// Full reads after the first: compactions, cancelled watches.
    pub resyncs: Arc<AtomicU64>,
    /// Broken streams resumed from the revision after the last one seen (an
    /// etcd member lost, a leader election, a network cut).
    pub resumes: Arc<AtomicU64>,
}

/// Starts watching `prefix` (as made by [`crate::registry::service_prefix`]).
pub fn watch_prefix(client: Client, prefix: String) -> ServiceWatch {
    watch(client, prefix, 1)
}

/// Starts watching every service under `services` (as made by
/// [`crate::keys::services`]): the changes' ids are `{service}/{instance_id}`.
pub fn watch_services(client: Client, services: String) -> ServiceWatch {
    watch(client, services, 2)
}

fn watch(client: Client, prefix: String, segments: usize) -> ServiceWatch {
    let (tx, changes) = mpsc::channel(256);
    let (synced_tx, synced) = watch::channel(false);
    let resyncs = Arc::new(AtomicU64::new(0));
    let resumes = Arc::new(AtomicU64::new(0));
    let task = Watcher {
        client,
        prefix,
        segments,
        known: Instances::new(),
        revision: 0,
        synced: synced_tx,
        resyncs: resyncs.clone(),
        resumes: resumes.clone(),
        tx,
    };
    tokio::spawn(task.run());
    ServiceWatch { changes, synced, resyncs, resumes }
}

struct Watcher {
    client: Client,
    prefix: String,
    /// Key segments after the prefix: 1 for an instance id, 2 for `service/id`.
    segments: usize,
    known: Instances,
    /// The revision everything in `known` is current to.
    revision: i64,
    synced: watch::Sender<bool>,
    resyncs: Arc<AtomicU64>,
    resumes: Arc<AtomicU64>,
    tx: mpsc::Sender<Change<String, Instance>>,
}

/// Why a watch stream ended.
enum End {
    /// The receiver is gone: stop.
    Closed,
    /// The stream broke: resume from `revision + 1`.
    Broken,
    /// The history we need is gone (compaction, cancel): read it all again.
    Resync,
}

impl Watcher {
    async fn run(mut self) {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        let mut need_full_read = true;
        loop {
            if self.tx.is_closed() {
                return;
            }
            if need_full_read {
                match self.full_read().await {
                    Ok(true) => need_full_read = false,
                    Ok(false) => return,
                    Err(e) => {
                        tracing::debug!(prefix = %self.prefix, error = %e, "discovery read failed, keeping last known endpoints");
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                }
            }
            match self.follow(&mut backoff).await {
                End::Closed => return,
                End::Broken => {
                    tracing::debug!(prefix = %self.prefix, revision = self.revision, "watch broke, resuming");
                    self.resumes.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                End::Resync => {
                    tracing::info!(prefix = %self.prefix, "watch history compacted, reading the prefix again");
                    self.resyncs.fetch_add(1, Ordering::Relaxed);
                    need_full_read = true;
                }
            }
        }
    }

    /// Reads the prefix and emits the difference from what is known.
    /// Returns false when the receiver is gone.
    async fn full_read(&mut self) -> Result<bool, etcd_client::Error> {
        let resp = self.client.get(self.prefix.as_str(), Some(GetOptions::new().with_prefix())).await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let mut fresh = Instances::new();
        for kv in resp.kvs() {
            if let Some((id, instance)) = self.parse(kv.key(), kv.value()) {
                fresh.insert(id, instance);
            }
        }
        let mut changes = Vec::new();
        for id in self.known.keys() {
            if !fresh.contains_key(id) {
                changes.push(Change::Remove(id.clone()));
            }
        }
        for (id, instance) in &fresh {
            if self.known.get(id) != Some(instance) {
                changes.push(Change::Insert(id.clone(), instance.clone()));
            }
        }
        self.known = fresh;
        self.revision = revision;
        if !changes.is_empty() {
            tracing::info!(prefix = %self.prefix, revision, changes = changes.len(), known = self.known.len(), "discovery full read");
        }
        for change in changes {
            if self.tx.send(change).await.is_err() {
                return Ok(false);
            }
        }
        self.synced.send_replace(true);
        Ok(true)
    }

    async fn follow(&mut self, backoff: &mut Backoff) -> End {
        let options = WatchOptions::new().with_prefix().with_start_revision(self.revision + 1).with_progress_notify();
        let mut stream = match self.client.watch(self.prefix.as_str(), Some(options)).await {
            Ok(stream) => stream,
            Err(_) => return End::Broken,
        };
        loop {
            let resp = tokio::select! {
                _ = self.tx.closed() => return End::Closed,
                resp = stream.message() => resp,
            };
            let resp = match resp {
                Ok(Some(resp)) => resp,
                Ok(None) | Err(_) => return End::Broken,
            };
            if resp.compact_revision() > 0 || resp.canceled() {
                return End::Resync;
            }
            backoff.reset();
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                self.revision = self.revision.max(kv.mod_revision());
                let change = match event.event_type() {
                    EventType::Put => match self.parse(kv.key(), kv.value()) {
                        Some((id, instance)) => {
                            if self.known.get(&id) == Some(&instance) {
                                continue;
                            }
                            self.known.insert(id.clone(), instance.clone());
                            Change::Insert(id, instance)
                        }
                        // An unreadable value replaces a readable one: drop it.
                        None => match self.id_of(kv.key()).and_then(|id| self.known.remove_entry(&id)) {
                            Some((id, _)) => Change::Remove(id),
                            None => continue,
                        },
                    },
                    EventType::Delete => match self.id_of(kv.key()).and_then(|id| self.known.remove_entry(&id)) {
                        Some((id, _)) => Change::Remove(id),
                        None => continue,
                    },
                };
                match &change {
                    Change::Insert(id, i) => {
                        tracing::info!(prefix = %self.prefix, instance = %id, addr = %i.addr, "instance joined")
                    }
                    Change::Remove(id) => tracing::info!(prefix = %self.prefix, instance = %id, "instance left"),
                }
                if self.tx.send(change).await.is_err() {
                    return End::Closed;
                }
            }
            if let Some(header) = resp.header() {
                // Progress notifications move the revision on with no events.
                if resp.events().is_empty() {
                    self.revision = self.revision.max(header.revision());
                }
            }
        }
    }

    fn id_of(&self, key: &[u8]) -> Option<String> {
        id_of(&self.prefix, self.segments, key)
    }

    fn parse(&self, key: &[u8], value: &[u8]) -> Option<(String, Instance)> {
        let id = self.id_of(key)?;
        match serde_json::from_slice::<Instance>(value) {
            Ok(instance) => Some((id, instance)),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(key), error = %e, "ignoring a registry value that breaks the contract");
                None
            }
        }
    }
}

/// The part of `key` after `prefix` if it is `segments` non-empty segments.
fn id_of(prefix: &str, segments: usize, key: &[u8]) -> Option<String> {
    let key = std::str::from_utf8(key).ok()?;
    let id = key.strip_prefix(prefix)?;
    let mut parts = id.split('/');
    let whole = parts.by_ref().take(segments).filter(|part| !part.is_empty()).count() == segments;
    (whole && parts.next().is_none()).then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::id_of;

    #[test]
    fn ids_have_exactly_the_segments_asked_for() {
        let one = |key: &str| id_of("/m/services/S/", 1, key.as_bytes());
        assert_eq!(one("/m/services/S/i-1").as_deref(), Some("i-1"));
        assert_eq!(one("/m/services/S/"), None);
        assert_eq!(one("/m/services/S/a/b"), None);
        assert_eq!(one("/m/services/T/i-1"), None);
        let two = |key: &str| id_of("/m/services/", 2, key.as_bytes());
        assert_eq!(two("/m/services/S/i-1").as_deref(), Some("S/i-1"));
        assert_eq!(two("/m/services/S/"), None);
        assert_eq!(two("/m/services/S"), None);
        assert_eq!(two("/m/services//i-1"), None);
        assert_eq!(two("/m/services/S/i-1/x"), None);
    }
}
