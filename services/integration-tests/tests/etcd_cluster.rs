//! The mesh on a 3-member etcd cluster of the version the deploy files ship:
//! the leader killed, the quorum lost, a member replaced, each under steady
//! load through order-service → user-service. The data plane keeps serving
//! on its last known state while the control plane is gone (static
//! stability), and nothing is re-registered or left stale afterwards.
//!
//! The slow tier: `make test-system` runs these (`--ignored`); durations are
//! printed for docs/RELIABILITY.md, the assertions are on counts, shares and
//! deadlines.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use meshkit_common::{BalancedChannel, ChannelBuilder, discovery::watch_prefix, registry::Instance};
use meshkit_integration_tests::{
    EtcdCluster, LoadGen, ServiceProcess, create_user, eventually,
    fleet::{self, ORDER, USER, order_load, user_load},
    init_logs, meshctl_at,
};
use tower::discover::Change;

const SIGKILL: i32 = 9;
/// Lease TTL of the instances in the leader and quorum drills: short, so an
/// expiry is seen quickly (etcd's default election timeout of 1 s allows
/// leases down to 2 s).
const TTL_SECS: u64 = 3;
/// The default TTL, for the member replacements: while a new member joins,
/// etcd answered no keepalive for up to about 5 s in our runs, longer than a
/// 3 s lease lives (docs/RELIABILITY.md).
const DEFAULT_TTL_SECS: u64 = 10;

struct Mesh {
    ttl_secs: u64,
    etcd: EtcdCluster,
    dir: tempfile::TempDir,
    client: etcd_client::Client,
    users: Vec<(String, ServiceProcess)>,
    _order: ServiceProcess,
    order_admin: String,
    channels: ChannelBuilder,
}

impl Mesh {
    async fn start(user_instances: usize, ttl_secs: u64) -> Self {
        init_logs();
        let etcd = EtcdCluster::start(3).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let client = etcd.client().await;
        let endpoints = etcd.endpoints_env();
        let users: Vec<(String, ServiceProcess)> = (1..=user_instances)
            .map(|i| {
                let id = format!("user-{i}");
                let p = spawn(&endpoints, dir.path(), "user-service", &id, ttl_secs);
                (id, p)
            })
            .collect();
        let order = spawn(&endpoints, dir.path(), "order-service", "order-1", ttl_secs);
        let ids: Vec<&str> = users.iter().map(|(id, _)| id.as_str()).collect();
        fleet::wait_registered(&client, USER, &ids).await;
        fleet::wait_registered(&client, ORDER, &["order-1"]).await;
        let order_admin = fleet::admin_addr(&client, ORDER, "order-1").await;
        eventually("order-service to see every user instance", Duration::from_secs(10), || async {
            let pool = fleet::pool_of(&order_admin, USER).await;
            ids.iter().all(|id| pool.iter().any(|p| p == id)).then_some(())
        })
        .await;
        let channels = ChannelBuilder::new(client.clone(), "/meshkit");
        Mesh { ttl_secs, etcd, dir, client, users, _order: order, order_admin, channels }
    }

    /// CreateOrder through order-service and GetUser from this process's own
    /// pool, running: the user pool, and the two loads.
    async fn steady_load(&self, email: &str) -> (BalancedChannel, LoadGen, LoadGen) {
        let users = self.channels.balanced(USER);
        let user_id = create_user(&users, "Load", email).await.id;
        let orders = order_load(self.channels.balanced(ORDER), user_id.clone());
        let direct = user_load(users.clone(), user_id, Duration::from_millis(5));
        eventually("traffic", Duration::from_secs(5), || async { (orders.ok_so_far() > 50).then_some(()) }).await;
        (users, orders, direct)
    }

    /// Each instance kept its first lease and is registered now.
    async fn assert_never_reregistered(&self, admins: &[(String, String)]) {
        for (id, admin) in admins {
            let again = fleet::metric(admin, "meshkit_registry_reregistrations_total", &[]).await;
            let up = fleet::metric(admin, "meshkit_registry_session_up", &[]).await;
            if again != Some(0.0) || up != Some(1.0) {
                self.dump_logs();
                panic!("{id} registered again ({again:?} times) or is not registered now (up: {up:?})");
            }
        }
    }

    /// What every process logged, for a failure's message.
    fn dump_logs(&self) {
        for (id, p) in &self.users {
            eprintln!("--- {id}\n{}", p.log());
        }
        eprintln!("--- order-1\n{}", self._order.log());
    }

    fn spawn_user(&self, id: &str) -> ServiceProcess {
        spawn(&self.etcd.endpoints_env(), self.dir.path(), "user-service", id, self.ttl_secs)
    }

    /// Every instance's admin address, by instance id.
    async fn admins(&self, ids: &[&str]) -> Vec<(String, String)> {
        let mut admins = Vec::new();
        for id in ids {
            let service = if id.starts_with("order") { ORDER } else { USER };
            admins.push((id.to_string(), fleet::admin_addr(&self.client, service, id).await));
        }
        admins
    }
}

fn spawn(endpoints: &str, dir: &std::path::Path, binary: &str, id: &str, ttl_secs: u64) -> ServiceProcess {
    let env = [
        ("MESHKIT_REGISTRY_TTL_SECS", ttl_secs.to_string()),
        // What the sessions and watches went through, for a failure's message.
        ("RUST_LOG", "warn,meshkit_registry=debug".to_owned()),
    ];
    fleet::spawn(endpoints, dir, binary, id, &env)
}

/// A discovery watch that must see every change once, in order: a writer
/// puts one key over and over with a rising sequence number while the watch
/// (the one every balanced channel uses) follows it through the failure.
struct Witness {
    stop: Arc<AtomicBool>,
    writer: tokio::task::JoinHandle<u64>,
    written: Arc<AtomicU64>,
    seen: Arc<Mutex<Vec<u64>>>,
    resyncs: Arc<AtomicU64>,
    resumes: Arc<AtomicU64>,
    _reader: tokio::task::JoinHandle<()>,
}

impl Witness {
    const SERVICE: &'static str = "meshkit.test.v1.Witness";

    /// Watches on `member`: the failure under test must break its stream.
    async fn start(etcd: &EtcdCluster, member: usize) -> Self {
        let prefix = format!("/meshkit/services/{}/", Self::SERVICE);
        // The full read goes to the first member, the watch to the second.
        let client = etcd.client_in_order(&[(member + 1) % 3, member, (member + 2) % 3]).await;
        let mut watch = watch_prefix(client.clone(), prefix.clone());
        watch.synced.wait_for(|s| *s).await.unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Some(change) = watch.changes.recv().await {
                    match change {
                        Change::Insert(_, instance) => {
                            let seq = instance.metadata.get("seq").and_then(|s| s.parse().ok()).unwrap_or(0);
                            seen.lock().unwrap().push(seq);
                        }
                        Change::Remove(id) => panic!("the witness key {id} was removed"),
                    }
                }
            })
        };
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let writer = {
            let (stop, written, mut client) = (stop.clone(), written.clone(), etcd.client().await);
            tokio::spawn(async move {
                let key = format!("{prefix}w");
                let cap = Instant::now() + Duration::from_secs(240);
                let (mut seq, mut revision) = (0, 0);
                while !stop.load(Ordering::Relaxed) && Instant::now() < cap {
                    seq += 1;
                    let mut instance = Instance {
                        addr: "127.0.0.1:1".into(),
                        zone: String::new(),
                        weight: 100,
                        version: String::new(),
                        metadata: Default::default(),
                    };
                    instance.metadata.insert("seq".into(), seq.to_string());
                    let value = serde_json::to_string(&instance).unwrap();
                    revision = write_once(&mut client, &key, &value, revision).await;
                    written.store(seq, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                seq
            })
        };
        Witness { stop, writer, written, seen, resyncs: watch.resyncs, resumes: watch.resumes, _reader: reader }
    }

    /// Waits for `more` writes past what is written now.
    async fn wait_writes(&self, more: u64) {
        let target = self.written.load(Ordering::Relaxed) + more;
        eventually("witness writes", Duration::from_secs(15), || async {
            (self.written.load(Ordering::Relaxed) >= target).then_some(())
        })
        .await;
    }

    /// Stops writing and checks the watch saw 1..=last, each once, in order,
    /// with no full read after the first.
    async fn check(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let last = self.writer.await.unwrap();
        let seen = self.seen.clone();
        eventually("the watch to see the last write", Duration::from_secs(15), || async {
            (seen.lock().unwrap().last() == Some(&last)).then_some(())
        })
        .await;
        let seen = self.seen.lock().unwrap().clone();
        let expected: Vec<u64> = (1..=last).collect();
        if seen != expected {
            let missed: Vec<u64> = expected.iter().filter(|s| !seen.contains(s)).copied().collect();
            let first_off = seen.iter().zip(1..).position(|(s, e)| *s != e).unwrap_or(seen.len());
            let around = &seen[first_off.saturating_sub(3)..(first_off + 4).min(seen.len())];
            panic!(
                "the watch missed {missed:?} or repeated some of {last} writes: saw {} changes, {around:?} around #{}",
                seen.len(),
                first_off + 1
            );
        }
        assert_eq!(self.resyncs.load(Ordering::Relaxed), 0, "the watch fell back to a full read");
        assert!(self.resumes.load(Ordering::Relaxed) > 0, "the failure never broke the watch's stream");
        last
    }
}

/// Puts `value` at `key` exactly once, over the write at `revision` (0: none
/// yet); its mod revision. A put whose answer is lost may still be applied
/// later, after the ones that follow it (etcd's "request timed out, possibly
/// due to previous leader failure"): compare-and-swap on the last revision
/// keeps such a late copy from landing, so the key's history is 1, 2, 3…
async fn write_once(client: &mut etcd_client::Client, key: &str, value: &str, revision: i64) -> i64 {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp};
    loop {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, revision)])
            .and_then([TxnOp::put(key, value, None)]);
        if let Ok(resp) = client.txn(txn).await {
            if resp.succeeded() {
                return resp.header().map(|h| h.revision()).unwrap_or(0);
            }
        }
        // Refused or unanswered: an earlier attempt may have landed.
        if let Ok(resp) = client.get(key, None).await {
            if let Some(kv) = resp.kvs().first().filter(|kv| kv.value() == value.as_bytes()) {
                return kv.mod_revision();
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
#[ignore = "the slow tier: make test-system"]
async fn the_leader_killed_under_load_fails_no_call_and_re_registers_no_one() {
    let mut m = Mesh::start(2, TTL_SECS).await;
    let (users, orders, direct) = m.steady_load("leader@example.com").await;
    let admins = m.admins(&["user-1", "user-2", "order-1"]).await;
    let leader = m.etcd.wait_leader(Duration::from_secs(10)).await.unwrap();
    let witness = Witness::start(&m.etcd, leader).await;
    witness.wait_writes(25).await;

    m.etcd.kill(leader);
    let killed = Instant::now();
    // Registered while the members elect a new leader.
    let _user3 = m.spawn_user("user-3");
    let new_leader = eventually("a new leader", Duration::from_secs(15), || async {
        m.etcd.leader().await.filter(|&l| l != leader)
    })
    .await;
    let elected = killed.elapsed();
    fleet::wait_registered(&m.client, USER, &["user-3"]).await;
    let registered = killed.elapsed();
    // Seen by every channel: order-service's and this process's.
    eventually("user-3 in order-service's pool", Duration::from_secs(15), || async {
        fleet::pool_of(&m.order_admin, USER).await.contains(&"user-3".to_owned()).then_some(())
    })
    .await;
    eventually("user-3 in this process's pool", Duration::from_secs(15), || async {
        users.view().ids().contains(&"user-3".to_owned()).then_some(())
    })
    .await;
    let seen_everywhere = killed.elapsed();
    eventually("user-3 to serve this process's calls", Duration::from_secs(10), || async {
        users.view().snapshot().get("user-3").is_some_and(|e| e.calls > 0).then_some(())
    })
    .await;

    m.etcd.restart(leader).unwrap();
    witness.wait_writes(25).await;
    let before = orders.ok_so_far();
    eventually("more traffic", Duration::from_secs(10), || async { (orders.ok_so_far() > before + 100).then_some(()) })
        .await;
    let orders = orders.stop().await;
    let direct = direct.stop().await;
    let writes = witness.check().await;
    eprintln!(
        "leader m{leader} killed: new leader m{new_leader} after {elected:?}; user-3 registered after {registered:?}, \
         in every pool after {seen_everywhere:?}; {} orders, {} GetUser, {writes} watched writes",
        orders.ok, direct.ok
    );
    assert_eq!(orders.failed, 0, "CreateOrder failures: {:?}", orders.errors);
    assert_eq!(direct.failed, 0, "GetUser failures: {:?}", direct.errors);
    assert!(orders.ok > 100, "too little traffic to mean anything: {}", orders.ok);
    m.assert_never_reregistered(&admins).await;
}

#[tokio::test]
#[ignore = "the slow tier: make test-system"]
async fn the_quorum_lost_for_30_s_fails_no_call_and_leaves_nothing_stale() {
    let mut m = Mesh::start(3, TTL_SECS).await;
    let (users, orders, direct) = m.steady_load("quorum@example.com").await;
    let admins = m.admins(&["user-1", "user-2", "order-1"]).await;

    // The leader and one follower go; the survivor has no leader.
    let leader = m.etcd.wait_leader(Duration::from_secs(10)).await.unwrap();
    let gone = [leader, (leader + 1) % 3];
    for member in gone {
        m.etcd.kill(member);
    }
    let lost = Instant::now();

    // An instance dies while no lease can expire.
    m.users[2].1.signal(SIGKILL);
    let _ = m.users[2].1.wait_exit(Duration::from_secs(5)).await;

    // meshctl says so instead of hanging.
    let asked = Instant::now();
    let (code, _, stderr) = meshctl_at(&m.etcd.endpoints_env(), &["instances"]).await;
    let answered = asked.elapsed();
    assert_ne!(code, 0, "meshctl succeeded without a quorum");
    assert!(stderr.contains("etcd is unavailable"), "meshctl said: {stderr}");
    assert!(answered < Duration::from_secs(10), "meshctl took {answered:?}");

    // No live instance leaves any pool while the quorum is gone.
    let mut checks = 0;
    while lost.elapsed() < Duration::from_secs(30) {
        let theirs = fleet::pool_of(&m.order_admin, USER).await;
        let ours = users.view().ids();
        for id in ["user-1", "user-2"] {
            assert!(theirs.iter().any(|p| p == id), "{id} left order-service's pool after {:?}", lost.elapsed());
            assert!(ours.iter().any(|p| p == id), "{id} left this process's pool after {:?}", lost.elapsed());
        }
        checks += 1;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(checks > 20, "pools checked {checks} times");

    for member in gone {
        m.etcd.restart(member).unwrap();
    }
    m.etcd.wait_leader(Duration::from_secs(20)).await.unwrap();
    let back = Instant::now();
    // The dead instance's lease runs out once there is a leader to expire it.
    eventually("user-3's key to expire", Duration::from_secs(TTL_SECS + 10), || async {
        (!fleet::registered(&m.client, USER).await.contains(&"user-3".to_owned())).then_some(())
    })
    .await;
    let expired_after = back.elapsed();
    eventually("user-3 to leave every pool", Duration::from_secs(10), || async {
        let theirs = fleet::pool_of(&m.order_admin, USER).await;
        let ours = users.view().ids();
        (!theirs.contains(&"user-3".to_owned()) && !ours.contains(&"user-3".to_owned())).then_some(())
    })
    .await;
    let left_after = back.elapsed();
    // One TTL, plus the election timeout (1 s) etcd adds to every lease when
    // a new leader takes over, plus its half-second expiry sweep and polling.
    let deadline = Duration::from_secs(TTL_SECS + 2);
    assert!(expired_after <= deadline, "user-3 expired {expired_after:?} after the quorum returned");

    // Nothing stale: the registry and every pool hold the live instances only.
    let mut registered = fleet::registered(&m.client, USER).await;
    registered.sort();
    assert_eq!(registered, ["user-1", "user-2"]);
    let mut theirs = fleet::pool_of(&m.order_admin, USER).await;
    theirs.sort();
    assert_eq!(theirs, ["user-1", "user-2"]);
    let before = orders.ok_so_far();
    eventually("more traffic", Duration::from_secs(10), || async { (orders.ok_so_far() > before + 100).then_some(()) })
        .await;
    let orders = orders.stop().await;
    let direct = direct.stop().await;
    eprintln!(
        "quorum lost 30 s: live instances in every pool at {checks} checks; meshctl answered in {answered:?}; user-3 (killed during the outage) expired \
         {expired_after:?} and left every pool {left_after:?} after a leader was back; {} orders, {} GetUser",
        orders.ok, direct.ok
    );
    assert_eq!(orders.failed, 0, "CreateOrder failures: {:?}", orders.errors);
    assert_eq!(direct.failed, 0, "GetUser failures: {:?}", direct.errors);
    m.assert_never_reregistered(&admins).await;
}

#[tokio::test]
#[ignore = "the slow tier: make test-system"]
async fn members_replaced_one_by_one_under_load_go_unnoticed() {
    let mut m = Mesh::start(2, DEFAULT_TTL_SECS).await;
    let (_users, orders, direct) = m.steady_load("replace@example.com").await;
    let admins = m.admins(&["user-1", "user-2", "order-1"]).await;
    let leader = m.etcd.wait_leader(Duration::from_secs(10)).await.unwrap();
    let witness = Witness::start(&m.etcd, (leader + 1) % 3).await;

    // A follower first, then the leader: remove, wipe, add back empty.
    let mut took = Vec::new();
    for member in [(leader + 1) % 3, leader] {
        let started = Instant::now();
        m.etcd.replace(member).await.unwrap();
        let leader_now = m.etcd.wait_leader(Duration::from_secs(15)).await.unwrap();
        // Caught up: the new member has applied what the leader has.
        let target = m.etcd.revision_of(leader_now).await.unwrap();
        eventually(&format!("m{member} to catch up"), Duration::from_secs(30), || async {
            (m.etcd.revision_of(member).await.ok()? >= target).then_some(())
        })
        .await;
        took.push(started.elapsed());
        witness.wait_writes(25).await;
    }
    // The mesh still registers and finds instances.
    let _user3 = m.spawn_user("user-3");
    eventually("user-3 in order-service's pool", Duration::from_secs(15), || async {
        fleet::pool_of(&m.order_admin, USER).await.contains(&"user-3".to_owned()).then_some(())
    })
    .await;
    let orders = orders.stop().await;
    let direct = direct.stop().await;
    let writes = witness.check().await;
    eprintln!(
        "members replaced (follower, then leader) in {took:?}; {} orders, {} GetUser, {writes} watched writes",
        orders.ok, direct.ok
    );
    if orders.failed + direct.failed > 0 {
        m.dump_logs();
    }
    assert_eq!(orders.failed, 0, "CreateOrder failures: {:?}", orders.errors);
    assert_eq!(direct.failed, 0, "GetUser failures: {:?}", direct.errors);
    m.assert_never_reregistered(&admins).await;
}
