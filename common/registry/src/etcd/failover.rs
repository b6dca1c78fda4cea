//! The channel under every meshkit etcd client: each call goes to a member
//! that answers, never to one known to be down.
//!
//! etcd-client's own channel is tonic's p2c balancer, whose lazily
//! reconnecting endpoints look ready again right after each refused
//! connection: with one of three members dead, about a third of all calls
//! failed. etcd's Go client sends calls only to members it is connected to
//! (gRPC's round_robin over READY subchannels); this does the same:
//!
//! - Calls go round robin over the members that are up.
//! - A call that fails below gRPC (refused, reset) marks its member down, and
//!   a probe task reconnects it with backoff, off the callers' path; the
//!   member is used again once a connection to it is made.
//! - A call that times out on a connected member (one still catching up
//!   after it joined, or stalled) passes that member over for a second,
//!   doubling while it keeps timing out.
//! - A member that answers "no leader" (it is cut off from the quorum, or an
//!   election is running) is passed over for a second, so a caller that
//!   retries reaches a member that still has one.
//! - When every member is down, calls go to the one due back first, so a
//!   cluster that was stopped whole is found again without waiting for a probe.
//!
//! Calls in flight on a member when it dies fail: the callers (registry
//! sessions, discovery watches, the config center) resume on another member.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use etcd_client::{BalancedChannelBuilder, Channel};
use http::{Request, Response, Uri};
use tokio::{sync::mpsc, time::Instant};
use tonic::{
    body::Body,
    transport::{Endpoint, channel::Change},
};
use tower::{BoxError, Service, ServiceExt, util::BoxCloneSyncService};

use meshkit_base::Backoff;

/// How long a member that answered "no leader" is passed over.
const NO_LEADER_PAUSE: Duration = Duration::from_secs(1);
/// How long a member whose call timed out is passed over, doubling while it
/// keeps timing out.
const SLOW_PAUSE: Duration = Duration::from_secs(1);
const SLOW_PAUSE_MAX: Duration = Duration::from_secs(8);

/// Builds the failover channel for `etcd_client::Client::connect_with_balanced_channel`.
pub(crate) struct Failover;

impl BalancedChannelBuilder for Failover {
    type Error = etcd_client::Error;

    fn balanced_channel(
        self,
        buffer_size: usize,
    ) -> Result<(Channel, mpsc::Sender<Change<Uri, Endpoint>>), Self::Error> {
        let (tx, rx) = mpsc::channel(buffer_size);
        let members = Members {
            shared: Arc::new(Shared {
                changes: Mutex::new(rx),
                members: Mutex::new(Vec::new()),
                next: AtomicUsize::new(0),
            }),
        };
        Ok((Channel::Custom(BoxCloneSyncService::new(members)), tx))
    }
}

#[derive(Clone)]
struct Members {
    shared: Arc<Shared>,
}

struct Shared {
    /// Endpoints etcd-client adds or removes; applied before each pick.
    changes: Mutex<mpsc::Receiver<Change<Uri, Endpoint>>>,
    members: Mutex<Vec<Arc<Member>>>,
    next: AtomicUsize,
}

struct Member {
    endpoint: Endpoint,
    state: Mutex<MemberState>,
}

struct MemberState {
    channel: tonic::transport::Channel,
    /// Passed over until then; `None`: up.
    down_until: Option<Instant>,
    /// A probe task is reconnecting it.
    probing: bool,
    /// Calls timed out in a row.
    slow_strikes: u32,
    removed: bool,
}

type Call = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

// === impl Members ===

impl Service<Request<Body>> for Members {
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Call;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each member's tonic channel queues the call until its connection is ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Call {
        let picked = self.shared.pick();
        let client = Arc::downgrade(&self.shared);
        Box::pin(async move {
            let Some((member, channel)) = picked else {
                return Err("no etcd endpoint is configured".into());
            };
            let result = match channel.ready_oneshot().await {
                Ok(mut channel) => channel.call(request).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(response) => {
                    if answers_no_leader(&response) {
                        member.pass_over(NO_LEADER_PAUSE);
                    } else {
                        member.answered();
                    }
                    Ok(response)
                }
                Err(e) => {
                    if timed_out(&e) {
                        member.slow();
                    } else {
                        member.failed(&e, client);
                    }
                    Err(e.into())
                }
            }
        })
    }
}

/// The call's own timeout ran out: the member is connected but slow.
fn timed_out(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// A trailers-only gRPC answer `UNAVAILABLE: etcdserver: no leader`.
fn answers_no_leader(response: &Response<Body>) -> bool {
    let headers = response.headers();
    headers.get("grpc-status").is_some_and(|s| s.as_bytes() == b"14")
        && headers.get("grpc-message").is_some_and(|m| {
            let m = m.as_bytes();
            m.windows(b"no leader".len()).any(|w| w == b"no leader")
                || m.windows(b"no%20leader".len()).any(|w| w == b"no%20leader")
        })
}

// === impl Shared ===

impl Shared {
    /// The next member that is up, round robin; when none is, the one due back first.
    fn pick(&self) -> Option<(Arc<Member>, tonic::transport::Channel)> {
        self.apply_changes();
        let members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
        if members.is_empty() {
            return None;
        }
        let now = Instant::now();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut fallback: Option<(Instant, &Arc<Member>)> = None;
        for i in 0..members.len() {
            let member = &members[(start + i) % members.len()];
            let state = member.state.lock().unwrap_or_else(PoisonError::into_inner);
            match state.down_until {
                // Down until a probe connects, or passed over for a while.
                Some(until) if state.probing || until > now => {
                    if fallback.is_none_or(|(best, _)| until < best) {
                        fallback = Some((until, member));
                    }
                }
                _ => return Some((member.clone(), state.channel.clone())),
            }
        }
        fallback.map(|(_, member)| {
            let channel = member.state.lock().unwrap_or_else(PoisonError::into_inner).channel.clone();
            (member.clone(), channel)
        })
    }

    fn apply_changes(&self) {
        let mut changes = self.changes.lock().unwrap_or_else(PoisonError::into_inner);
        while let Ok(change) = changes.try_recv() {
            let mut members = self.members.lock().unwrap_or_else(PoisonError::into_inner);
            match change {
                Change::Insert(uri, endpoint) => {
                    members.retain(|m| {
                        let same = m.endpoint.uri() == &uri;
                        if same {
                            m.state.lock().unwrap_or_else(PoisonError::into_inner).removed = true;
                        }
                        !same
                    });
                    members.push(Arc::new(Member::new(endpoint)));
                }
                Change::Remove(uri) => members.retain(|m| {
                    let same = m.endpoint.uri() == &uri;
                    if same {
                        m.state.lock().unwrap_or_else(PoisonError::into_inner).removed = true;
                    }
                    !same
                }),
            }
        }
    }
}

// === impl Member ===

impl Member {
    fn new(endpoint: Endpoint) -> Self {
        let channel = endpoint.connect_lazy();
        Self {
            endpoint,
            state: Mutex::new(MemberState {
                channel,
                down_until: None,
                probing: false,
                slow_strikes: 0,
                removed: false,
            }),
        }
    }

    /// An answer that was not a refusal: a slow member is forgiven.
    fn answered(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.slow_strikes = 0;
    }

    /// A call timed out on a connected member (catching up after it joined,
    /// overloaded, its disk stalled): pass it over for a while, longer each
    /// time in a row, up to [`SLOW_PAUSE_MAX`].
    fn slow(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let pause = (SLOW_PAUSE * 2u32.saturating_pow(state.slow_strikes)).min(SLOW_PAUSE_MAX);
        state.slow_strikes = state.slow_strikes.saturating_add(1);
        let until = Instant::now() + pause;
        if state.down_until.is_none_or(|d| d < until) {
            state.down_until = Some(until);
        }
        tracing::info!(endpoint = %self.endpoint.uri(), ?pause, "etcd member did not answer in time, calls go to the others");
    }

    /// Passed over for `pause` from now, unless it already is for longer.
    fn pass_over(&self, pause: Duration) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let until = Instant::now() + pause;
        if state.down_until.is_none_or(|d| d < until) {
            state.down_until = Some(until);
        }
    }

    /// A call failed below gRPC: down until a probe connects again. The
    /// probe ends with the member's removal or the client's last clone.
    fn failed(self: &Arc<Self>, error: &(dyn std::error::Error + 'static), client: Weak<Shared>) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // Due back in a moment if the probe finds it at once; the probe moves this on.
        state.down_until = Some(Instant::now() + Duration::from_millis(100));
        if state.probing || state.removed {
            return;
        }
        state.probing = true;
        drop(state);
        tracing::info!(endpoint = %self.endpoint.uri(), error = %error, "etcd member unreachable, calls go to the others");
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(self.clone().probe(client));
        }
    }

    /// Reconnects with backoff; the fresh connection replaces the broken one.
    async fn probe(self: Arc<Self>, client: Weak<Shared>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let delay = backoff.next_delay();
            {
                let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                if state.removed || client.strong_count() == 0 {
                    state.probing = false;
                    return;
                }
                state.down_until = Some(Instant::now() + delay);
            }
            tokio::time::sleep(delay).await;
            if let Ok(channel) = self.endpoint.connect().await {
                let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                state.channel = channel;
                state.down_until = None;
                state.probing = false;
                tracing::info!(endpoint = %self.endpoint.uri(), "etcd member reachable again");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: &str, message: &str) -> Response<Body> {
        let mut response = Response::new(Body::empty());
        response.headers_mut().insert("grpc-status", status.parse().unwrap());
        response.headers_mut().insert("grpc-message", message.parse().unwrap());
        response
    }

    #[test]
    fn no_leader_is_told_apart_from_other_refusals() {
        assert!(answers_no_leader(&response("14", "etcdserver: no leader")));
        assert!(answers_no_leader(&response("14", "etcdserver:%20no%20leader")));
        assert!(!answers_no_leader(&response("14", "etcdserver: request timed out")));
        assert!(!answers_no_leader(&response("9", "etcdserver: no leader")));
        assert!(!answers_no_leader(&Response::new(Body::empty())));
    }

    fn members(uris: &[&str]) -> Members {
        let (tx, rx) = mpsc::channel(8);
        for uri in uris {
            tx.try_send(Change::Insert(uri.parse().unwrap(), Endpoint::from_shared(uri.to_string()).unwrap())).unwrap();
        }
        Members {
            shared: Arc::new(Shared {
                changes: Mutex::new(rx),
                members: Mutex::new(Vec::new()),
                next: AtomicUsize::new(0),
            }),
        }
    }

    fn picked(m: &Members) -> String {
        m.shared.pick().unwrap().0.endpoint.uri().to_string()
    }

    #[tokio::test]
    async fn picks_round_robin_and_passes_over_a_leaderless_member() {
        let m = members(&["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]);
        let first: Vec<String> = (0..3).map(|_| picked(&m)).collect();
        let mut sorted = first.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 3, "round robin over every member: {first:?}");

        let leaderless = m.shared.members.lock().unwrap()[1].clone();
        // Once slow, long ago: that pause is over, and a new one still counts.
        leaderless.state.lock().unwrap().down_until = Instant::now().checked_sub(Duration::from_secs(1));
        leaderless.pass_over(Duration::from_secs(60));
        let uri = leaderless.endpoint.uri().to_string();
        assert!((0..9).all(|_| picked(&m) != uri), "a member without a leader is passed over");
    }

    #[tokio::test]
    async fn a_probe_ends_when_the_client_is_dropped() {
        let m = members(&["http://127.0.0.1:1"]);
        m.shared.apply_changes();
        let dead = m.shared.members.lock().unwrap()[0].clone();
        dead.failed(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused), Arc::downgrade(&m.shared));
        drop(m);
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!dead.state.lock().unwrap().probing, "the probe outlived its client");
    }

    #[tokio::test]
    async fn a_slow_member_is_passed_over_longer_each_time_until_it_answers() {
        let m = members(&["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        m.shared.apply_changes();
        let slow = m.shared.members.lock().unwrap()[0].clone();
        let pause = |member: &Member| member.state.lock().unwrap().down_until.unwrap() - Instant::now();
        slow.slow();
        let first = pause(&slow);
        slow.slow();
        let second = pause(&slow);
        assert!(first <= SLOW_PAUSE && second > SLOW_PAUSE, "{first:?} then {second:?}");
        assert!(!slow.state.lock().unwrap().probing, "a slow member is connected: no probe");
        assert!(timed_out(&tonic::TimeoutExpired(())));
        assert!(!timed_out(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused)));
        slow.answered();
        assert_eq!(slow.state.lock().unwrap().slow_strikes, 0);
    }

    #[tokio::test]
    async fn when_every_member_is_down_the_one_due_back_first_is_tried() {
        let m = members(&["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        m.shared.apply_changes();
        let all = m.shared.members.lock().unwrap().clone();
        all[0].state.lock().unwrap().down_until = Some(Instant::now() + Duration::from_secs(30));
        all[1].state.lock().unwrap().down_until = Some(Instant::now() + Duration::from_secs(5));
        assert_eq!(picked(&m), all[1].endpoint.uri().to_string());
    }

    #[tokio::test]
    async fn a_refused_member_is_probed_and_skipped_meanwhile() {
        // Port 1 on loopback refuses at once.
        let m = members(&["http://127.0.0.1:1", "http://127.0.0.1:2"]);
        m.shared.apply_changes();
        let dead = m.shared.members.lock().unwrap()[0].clone();
        dead.failed(&std::io::Error::from(std::io::ErrorKind::ConnectionRefused), Arc::downgrade(&m.shared));
        assert!(dead.state.lock().unwrap().probing);
        let uri = dead.endpoint.uri().to_string();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!((0..6).all(|_| picked(&m) != uri), "a member being probed gets no calls");
        // Removing it stops the probe.
        m.shared.members.lock().unwrap().retain(|x| !Arc::ptr_eq(x, &dead));
        dead.state.lock().unwrap().removed = true;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!dead.state.lock().unwrap().probing);
    }
}
