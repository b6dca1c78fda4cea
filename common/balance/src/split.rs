//! Traffic split by version: a weighted choice of version group, then p2c
//! within it.
//!
//! p2c alone follows latency, not weight, so it cannot hold a share: a fast
//! new version would take most calls. With a split set for the service
//! (`governance.split`), the pool keeps one p2c balancer per named version
//! beside the one over every instance, and picks a group for each call by
//! smooth weighted round robin (nginx's), which holds the percents exactly
//! over any run of calls. Groups with no instance are skipped, so a version
//! whose instances are all gone never fails calls; when no named version has
//! an instance, the whole pool serves as if no split were set.
//!
//! The groups' endpoints come from the same discovery changes as the pool's
//! ([`GroupFeed`]); a group balancer has endpoints of its own (their own lazy
//! connections) sharing each instance's load and ejection state, so p2c in a
//! group and in the whole pool see the same load.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use futures::StreamExt;
use http::uri::Authority;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tower::{balance::p2c::Balance, discover::Change};

use crate::{
    EndpointStream, Request,
    connection::ConnectSettings,
    endpoint::{EndpointService, EndpointStats},
};
use meshkit_governance::VersionSplit;

struct Member {
    version: Arc<str>,
    authority: Authority,
    stats: Arc<EndpointStats>,
    key: u64,
}

struct Subscriber {
    version: Arc<str>,
    tx: mpsc::UnboundedSender<Change<u64, EndpointService>>,
    members: Arc<AtomicUsize>,
}

struct FeedState {
    members: HashMap<String, Member>,
    subscribers: Vec<Subscriber>,
}

/// The pool's instances by version, and the group balancers fed from them.
pub(crate) struct GroupFeed {
    settings: ConnectSettings,
    state: Mutex<FeedState>,
}

impl GroupFeed {
    pub(crate) fn new(settings: ConnectSettings) -> Self {
        Self { settings, state: Mutex::new(FeedState { members: HashMap::new(), subscribers: Vec::new() }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An instance joined, or came back with another address or version.
    pub(crate) fn insert(&self, id: &str, version: &str, authority: Authority, stats: Arc<EndpointStats>, key: u64) {
        let mut state = self.lock();
        if let Some(old) = state.members.remove(id) {
            send(&mut state.subscribers, &old.version, || Change::Remove(old.key), -1);
        }
        let version: Arc<str> = Arc::from(version);
        let member = Member { version: version.clone(), authority, stats, key };
        let settings = &self.settings;
        send(
            &mut state.subscribers,
            &version,
            || {
                Change::Insert(
                    key,
                    EndpointService::new(member.authority.clone(), settings.clone(), member.stats.clone()),
                )
            },
            1,
        );
        state.members.insert(id.to_owned(), member);
    }

    /// An instance left.
    pub(crate) fn remove(&self, id: &str) {
        let mut state = self.lock();
        if let Some(old) = state.members.remove(id) {
            send(&mut state.subscribers, &old.version, || Change::Remove(old.key), -1);
        }
    }

    /// A balancer over the instances of `version`, fed from now on.
    fn subscribe(&self, version: &Arc<str>) -> (Balance<EndpointStream, Request>, Arc<AtomicUsize>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let members = Arc::new(AtomicUsize::new(0));
        let mut state = self.lock();
        state.subscribers.retain(|s| !s.tx.is_closed());
        for member in state.members.values().filter(|m| m.version == *version) {
            let endpoint = EndpointService::new(member.authority.clone(), self.settings.clone(), member.stats.clone());
            if tx.send(Change::Insert(member.key, endpoint)).is_ok() {
                members.fetch_add(1, Ordering::Relaxed);
            }
        }
        state.subscribers.push(Subscriber { version: version.clone(), tx, members: members.clone() });
        let endpoints: EndpointStream = Box::pin(UnboundedReceiverStream::new(rx).map(Ok));
        (Balance::new(endpoints), members)
    }
}

/// Sends a change to every live subscriber of `version`, dropping closed ones.
fn send(
    subscribers: &mut Vec<Subscriber>,
    version: &str,
    change: impl Fn() -> Change<u64, EndpointService>,
    delta: isize,
) {
    subscribers.retain(|s| {
        if &*s.version != version {
            return !s.tx.is_closed();
        }
        if s.tx.send(change()).is_err() {
            return false;
        }
        if delta > 0 {
            s.members.fetch_add(1, Ordering::Relaxed);
        } else {
            // Never below zero: a removal only follows an insertion.
            let _ = s.members.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
        true
    });
}

pub(crate) struct Group {
    pub(crate) version: Arc<str>,
    percent: u32,
    /// Smooth weighted round robin's running weight.
    current: i64,
    members: Arc<AtomicUsize>,
    pub(crate) balance: Balance<EndpointStream, Request>,
}

impl Group {
    pub(crate) fn members(&self) -> usize {
        self.members.load(Ordering::Relaxed)
    }
}

/// The groups of the split in force.
pub(crate) struct Groups {
    pub(crate) split: Arc<VersionSplit>,
    pub(crate) groups: Vec<Group>,
}

impl Groups {
    /// Groups for `split`, keeping the balancers (and their connections) of
    /// versions `old` had.
    pub(crate) fn new(split: Arc<VersionSplit>, old: Option<Groups>, feed: &GroupFeed) -> Self {
        let mut kept: HashMap<Arc<str>, Group> =
            old.map(|o| o.groups.into_iter().map(|g| (g.version.clone(), g)).collect()).unwrap_or_default();
        let groups = split
            .groups
            .iter()
            .map(|(version, percent)| match kept.remove(version) {
                Some(group) => Group { percent: *percent, current: 0, ..group },
                None => {
                    let (balance, members) = feed.subscribe(version);
                    Group { version: version.clone(), percent: *percent, current: 0, members, balance }
                }
            })
            .collect();
        Self { split, groups }
    }

    /// The next group by smooth weighted round robin over the groups that
    /// have an instance and a share; none when no such group exists.
    pub(crate) fn pick(&mut self) -> Option<usize> {
        let mut total = 0i64;
        let mut best: Option<(usize, i64)> = None;
        for (i, group) in self.groups.iter_mut().enumerate() {
            if group.percent == 0 || group.members() == 0 {
                continue;
            }
            group.current += i64::from(group.percent);
            total += i64::from(group.percent);
            if best.is_none_or(|(_, current)| group.current > current) {
                best = Some((i, group.current));
            }
        }
        let (chosen, _) = best?;
        self.groups[chosen].current -= total;
        Some(chosen)
    }
}
