//! Partitions between hosts: user-service instances and etcd each in a
//! network namespace of their own on one bridge, the test process the client
//! host. A cut drops packets (nftables in the host's namespace), so the
//! other side sees silence, never a reset; delay is a userspace proxy (this
//! kernel has no netem). The system tier runs these (`make test-system`):
//! they need root.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use meshkit_common::{BalancedChannel, ChannelBuilder, ChannelConfig, server::INSTANCE_HEADER};
use meshkit_integration_tests::{
    Broker, Etcd, LoadGen, ServiceProcess, create_user, eventually,
    fleet::{self, ORDER, USER},
    free_port, init_logs,
    netns::{DelayProxy, Host, Network},
};
use meshkit_proto::user::{GetUserRequest, user_service_client::UserServiceClient};

/// When each instance last answered a call.
type LastServed = Arc<Mutex<HashMap<String, Instant>>>;

struct Mesh {
    // Field order is drop order: processes, then etcd, then the namespaces.
    /// The service processes (user-service, or whichever a test starts).
    users: Vec<ServiceProcess>,
    etcd: Etcd,
    labels: Vec<String>,
    hosts: Vec<Host>,
    etcd_host: Host,
    net: Network,
    dir: tempfile::TempDir,
}

impl Mesh {
    /// etcd on a host of its own, and a host for each of `labels`.
    async fn new(labels: &[&str]) -> Mesh {
        init_logs();
        let net = Network::new().unwrap();
        let etcd_host = net.host("etcd").unwrap();
        let hosts: Vec<Host> = labels.iter().map(|l| net.host(l).unwrap()).collect();
        let etcd = Etcd::start_in(&etcd_host).await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let labels = labels.iter().map(|l| (*l).to_owned()).collect();
        Mesh { users: Vec::new(), etcd, labels, hosts, etcd_host, net, dir }
    }

    /// One user-service on each host (instance `user-<label>`, a 3 s lease),
    /// with `env(label)` added; returns once all are registered.
    async fn start_users(&mut self, env: impl Fn(&str) -> Vec<(&'static str, String)>) {
        for (label, host) in self.labels.iter().zip(&self.hosts) {
            let mut extra = vec![("MESHKIT_REGISTRY_TTL_SECS", "3".to_owned())];
            extra.extend(env(label));
            let id = format!("user-{label}");
            self.users.push(fleet::spawn_in(host, &self.etcd.endpoint(), self.dir.path(), "user-service", &id, &extra));
        }
        let ids: Vec<String> = self.labels.iter().map(|l| format!("user-{l}")).collect();
        let client = self.etcd.client().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let now = fleet::registered(&client, USER).await;
            if ids.iter().all(|id| now.contains(id)) {
                return;
            }
            assert!(Instant::now() < deadline, "{ids:?} not all registered: {now:?}\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn channels(&self, config: ChannelConfig) -> ChannelBuilder {
        ChannelBuilder::new(self.etcd.client().await, "/meshkit").with_config(config)
    }

    fn logs(&self) -> String {
        self.users.iter().map(|u| format!("--- {}\n{}\n", u.name, tail(&u.log(), 20))).collect()
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// GetUser back to back on `workers` callers, each call with `deadline`,
/// noting which instance answered and when.
fn get_user_load(users: BalancedChannel, user_id: String, deadline: Duration, last: LastServed) -> LoadGen {
    LoadGen::start(4, Duration::from_millis(2), move || {
        let mut client = UserServiceClient::new(users.clone());
        let (id, last) = (user_id.clone(), last.clone());
        async move {
            let mut req = tonic::Request::new(GetUserRequest { id });
            req.set_timeout(deadline);
            let resp = client.get_user(req).await?;
            let by = resp.metadata().get(INSTANCE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
            if let Some(by) = &by {
                last.lock().unwrap().insert(by.clone(), Instant::now());
            }
            Ok(by)
        }
    })
}

fn last_served(last: &LastServed, id: &str) -> Option<Instant> {
    last.lock().unwrap().get(id).copied()
}

async fn traffic_on_all(load: &LoadGen, last: &LastServed, ids: &[&str]) {
    let since = Instant::now();
    eventually("every instance serving", Duration::from_secs(10), || async {
        (load.ok_so_far() > 50 && ids.iter().all(|id| last_served(last, id).is_some_and(|t| t > since))).then_some(())
    })
    .await;
}

#[tokio::test]
#[ignore = "system tier (make test-system): network namespaces need root and nftables"]
async fn an_instance_cut_off_from_etcd_serves_until_its_lease_lapses_then_leaves_and_returns() {
    let mut mesh = Mesh::new(&["a", "b", "c", "o"]).await;
    // An order-service on a host of its own: a second process whose pool of
    // user instances must let go of the cut-off one too (its admin endpoint
    // on its host's address, so the test can read its pools).
    let order_host = mesh.hosts.pop().unwrap();
    mesh.labels.pop();
    mesh.start_users(|_| Vec::new()).await;
    let admin_listen = format!("{}:0", order_host.ip);
    let order = fleet::spawn_in(
        &order_host,
        &mesh.etcd.endpoint(),
        mesh.dir.path(),
        "order-service",
        "order-o",
        &[("MESHKIT_ADMIN_LISTEN", admin_listen)],
    );
    let ttl = Duration::from_secs(3);
    let etcd = mesh.etcd.client().await;
    fleet::wait_registered(&etcd, ORDER, &["order-o"]).await;
    let order_admin = fleet::admin_addr(&etcd, ORDER, "order-o").await;
    eventually("order-service to see every user instance", Duration::from_secs(10), || async {
        (fleet::pool_of(&order_admin, USER).await.len() == 3).then_some(())
    })
    .await;
    let channels = mesh.channels(ChannelConfig::default()).await;
    let users = channels.balanced(USER);
    let user_id = create_user(&users, "Cut", "cut-etcd@example.com").await.id;
    let last = LastServed::default();
    let load = get_user_load(users.clone(), user_id, Duration::from_secs(2), last.clone());
    traffic_on_all(&load, &last, &["user-a", "user-b", "user-c"]).await;

    mesh.hosts[0].cut_off_from(&[mesh.etcd_host.ip]).unwrap();
    let cut_at = Instant::now();
    eventually("user-a's key gone with its lease", ttl * 3, || async {
        (!fleet::registered(&etcd, USER).await.contains(&"user-a".to_owned())).then_some(())
    })
    .await;
    let key_gone = cut_at.elapsed();
    eventually("user-a out of the pool", Duration::from_secs(5), || async {
        (!users.view().ids().contains(&"user-a".to_owned())).then_some(())
    })
    .await;
    let left_pool = cut_at.elapsed();
    eventually("user-a out of order-service's pool", Duration::from_secs(5), || async {
        (!fleet::pool_of(&order_admin, USER).await.contains(&"user-a".to_owned())).then_some(())
    })
    .await;
    let left_order_pool = cut_at.elapsed();
    // It served its callers while its lease lasted: the cut is between it and etcd only.
    let served_after_cut = last_served(&last, "user-a").unwrap().saturating_duration_since(cut_at);
    assert!(
        served_after_cut >= ttl / 3,
        "user-a stopped serving {served_after_cut:?} after the cut, long before its {ttl:?} lease lapsed ({key_gone:?})"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = last_served(&last, "user-a").unwrap();
    assert!(
        idle.saturating_duration_since(cut_at) <= left_pool + Duration::from_millis(200),
        "user-a served after leaving the pool"
    );

    mesh.hosts[0].heal().unwrap();
    let healed_at = Instant::now();
    eventually("user-a registered again", Duration::from_secs(20), || async {
        fleet::registered(&etcd, USER).await.contains(&"user-a".to_owned()).then_some(())
    })
    .await;
    let back = healed_at.elapsed();
    eventually("user-a serving again", Duration::from_secs(10), || async {
        last_served(&last, "user-a").is_some_and(|t| t > healed_at).then_some(())
    })
    .await;
    let serving = healed_at.elapsed();
    eventually("user-a back in order-service's pool", Duration::from_secs(10), || async {
        fleet::pool_of(&order_admin, USER).await.contains(&"user-a".to_owned()).then_some(())
    })
    .await;
    drop(order);
    let tally = load.stop().await;
    eprintln!(
        "cut from etcd: served {served_after_cut:?} more, key gone after {key_gone:?}, out of the pool after \
         {left_pool:?} (order-service's after {left_order_pool:?}); healed: registered after {back:?}, serving after {serving:?}; {} calls, p99 {:?}, max {:?}",
        tally.ok,
        tally.latency(0.99),
        tally.latency(1.0)
    );
    assert_eq!(tally.failed, 0, "failed calls: {:?}\n{}", tally.errors, mesh.logs());
}

#[tokio::test]
#[ignore = "system tier (make test-system): network namespaces need root and nftables"]
async fn a_client_cut_off_from_one_instance_moves_its_calls_within_the_attempt_timeout() {
    let mut mesh = Mesh::new(&["a", "b", "c"]).await;
    mesh.start_users(|_| Vec::new()).await;
    let attempt_timeout = Duration::from_millis(300);
    let deadline = Duration::from_secs(1);
    let mut config = ChannelConfig::default();
    config.retry.attempt_timeout = attempt_timeout;
    config.endpoint.rtt_decay = Duration::from_secs(1);
    let channels = mesh.channels(config).await;
    let users = channels.balanced(USER);
    let user_id = create_user(&users, "Cut", "cut-client@example.com").await.id;
    let last = LastServed::default();
    let load = get_user_load(users.clone(), user_id, deadline, last.clone());
    traffic_on_all(&load, &last, &["user-a", "user-b", "user-c"]).await;

    // The client's packets to user-b, and user-b's to the client, vanish.
    mesh.hosts[1].cut_off_from(&[mesh.net.client_ip()]).unwrap();
    let cut_at = Instant::now();
    // Its first timed-out attempt makes it the costliest endpoint: p2c sends
    // it nothing more until that estimate fades (rtt_decay, 1 s here).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = users.view().snapshot().get("user-b").cloned();
    // user-b still reaches etcd: it stays registered, only this client cannot reach it.
    let etcd = mesh.etcd.client().await;
    assert!(fleet::registered(&etcd, USER).await.contains(&"user-b".to_owned()), "user-b left the registry");
    let served_after_cut = last_served(&last, "user-b").unwrap().saturating_duration_since(cut_at);

    mesh.hosts[1].heal().unwrap();
    let healed_at = Instant::now();
    eventually("user-b serving again", Duration::from_secs(20), || async {
        last_served(&last, "user-b").is_some_and(|t| t > healed_at).then_some(())
    })
    .await;
    let back = healed_at.elapsed();
    let tally = load.stop().await;
    let slow = tally.latencies.iter().filter(|l| **l >= attempt_timeout).count();
    eprintln!(
        "client cut from user-b: {slow} of {} calls waited out an attempt; p50 {:?} p99 {:?} max {:?}; \
         user-b in the pool 3 s after the cut: {seen:?}; back {back:?} after the heal",
        tally.ok + tally.failed,
        tally.latency(0.5),
        tally.latency(0.99),
        tally.latency(1.0)
    );
    assert_eq!(tally.failed, 0, "failed calls: {:?}\n{}", tally.errors, mesh.logs());
    // A call that met the cut moved on after one attempt timeout: none waited for two, nor for its deadline.
    let max = tally.latency(1.0);
    assert!(max < attempt_timeout * 2, "a call took {max:?}: longer than one {attempt_timeout:?} attempt and a retry");
    assert!(served_after_cut < attempt_timeout, "user-b answered {served_after_cut:?} after the cut");
}

#[tokio::test]
#[ignore = "system tier (make test-system): network namespaces need root and nftables"]
async fn an_instance_behind_100_ms_and_5_percent_loss_gets_a_small_share() {
    let delay = Duration::from_millis(100);
    // user-c is reached through a proxy on the client host that holds every
    // chunk 100 ms, and its own host drops 5% of the packets to and from it.
    let mut mesh = Mesh::new(&["a", "b", "c"]).await;
    let listen = mesh.hosts[2].addr();
    let proxy = DelayProxy::start((mesh.net.client_ip(), 0).into(), listen, delay).await.unwrap();
    let advertise = proxy.addr().to_string();
    mesh.start_users(|label| match label {
        "c" => vec![("MESHKIT_SERVER_LISTEN", listen.to_string()), ("MESHKIT_SERVER_ADVERTISE", advertise.clone())],
        _ => Vec::new(),
    })
    .await;
    mesh.hosts[2].lose(5, mesh.net.client_ip()).unwrap();
    // A slow estimate fades in 1 s here (5 s by default), so that user-c is
    // tried again a few times within the run.
    let mut config = ChannelConfig::default();
    config.endpoint.rtt_decay = Duration::from_secs(1);
    let channels = mesh.channels(config).await;
    let users = channels.balanced(USER);
    let user_id = create_user(&users, "Slow", "slow-link@example.com").await.id;
    let last = LastServed::default();
    let load = get_user_load(users.clone(), user_id, Duration::from_secs(3), last.clone());
    tokio::time::sleep(Duration::from_secs(10)).await;
    let tally = load.stop().await;
    let total: u64 = tally.served_by.values().sum();
    let far = tally.served_by.get("user-c").copied().unwrap_or(0);
    let share = far as f64 / total.max(1) as f64;
    eprintln!(
        "100 ms + 5% loss to user-c: it served {far} of {total} calls ({:.2}%): {:?}; p50 {:?} p99 {:?} max {:?}",
        share * 100.0,
        tally.served_by,
        tally.latency(0.5),
        tally.latency(0.99),
        tally.latency(1.0)
    );
    assert_eq!(tally.failed, 0, "failed calls: {:?}\n{}", tally.errors, mesh.logs());
    assert!(total > 1_000, "too little traffic to judge a share: {total}");
    assert!(far > 0, "user-c was never tried again: its slow estimate should fade and p2c probe it");
    assert!(share < 0.05, "user-c served {:.2}% of the calls", share * 100.0);
    drop(proxy);
}

/// The outbox relay's owner key: the member whose relay publishes.
async fn relay_owner(etcd: &etcd_client::Client) -> Option<String> {
    let key = meshkit_common::keys::slot_owner("/meshkit", &meshkit_common::keys::outbox_group("order"), 0);
    let resp = etcd.clone().get(key, None).await.ok()?;
    resp.kvs().first().and_then(|kv| kv.value_str().ok()).map(str::to_owned)
}

#[tokio::test]
#[ignore = "system tier (make test-system): network namespaces need root and nftables"]
async fn the_relays_host_cut_off_from_etcd_is_fenced_and_no_event_is_published_twice() {
    // etcd on its host, two order-service instances on theirs (one SQLite
    // outbox, shared), and the client host's user-service and Kafka reachable
    // by both.
    let mut mesh = Mesh::new(&["r1", "r2"]).await;
    let client_ip = mesh.net.client_ip();
    let broker = Broker::start_on(client_ip).await.unwrap();
    let user = fleet::spawn(
        &mesh.etcd.endpoint(),
        mesh.dir.path(),
        "user-service",
        "user-1",
        &[("MESHKIT_SERVER_LISTEN", format!("{client_ip}:{}", free_port()))],
    );
    for (label, host) in mesh.labels.clone().iter().zip(mesh.hosts.clone()) {
        let env = [
            ("MESHKIT_REGISTRY_TTL_SECS", "3".to_owned()),
            ("MESHKIT_EVENTS_BROKERS", broker.endpoint()),
            ("MESHKIT_EVENTS_RELAY_POLL_MS", "20".to_owned()),
        ];
        let id = format!("order-{label}");
        mesh.users.push(fleet::spawn_in(&host, &mesh.etcd.endpoint(), mesh.dir.path(), "order-service", &id, &env));
    }
    mesh.users.push(user);
    let etcd = mesh.etcd.client().await;
    fleet::wait_registered(&etcd, ORDER, &["order-r1", "order-r2"]).await;
    fleet::wait_registered(&etcd, USER, &["user-1"]).await;
    let leader = eventually("a relay elected", Duration::from_secs(20), || async { relay_owner(&etcd).await }).await;
    let (leader_host, other) =
        if leader == "order-r1" { (mesh.hosts[0].clone(), "order-r2") } else { (mesh.hosts[1].clone(), "order-r1") };

    let channels = mesh.channels(ChannelConfig::default()).await;
    let user_id = create_user(&channels.balanced(USER), "Relay", "relay-cut@example.com").await.id;
    let load = fleet::order_load(channels.balanced(ORDER), user_id);
    eventually("orders", Duration::from_secs(10), || async { (load.ok_so_far() > 50).then_some(()) }).await;

    leader_host.cut_off_from(&[mesh.etcd_host.ip]).unwrap();
    let cut_at = Instant::now();
    eventually("the other relay elected", Duration::from_secs(20), || async {
        (relay_owner(&etcd).await.as_deref() == Some(other)).then_some(())
    })
    .await;
    let elected = cut_at.elapsed();
    // Orders keep coming while the new relay waits out the old one's last round and takes over.
    let before = load.ok_so_far();
    eventually("orders after the takeover", Duration::from_secs(20), || async {
        (load.ok_so_far() > before + 300).then_some(())
    })
    .await;
    let tally = load.stop().await;
    leader_host.heal().unwrap();

    let db = meshkit_common::db::connect(&meshkit_common::db::DatabaseSettings {
        url: meshkit_integration_tests::sqlite_url(mesh.dir.path(), "order"),
        ..Default::default()
    })
    .await
    .unwrap();
    eventually("the outbox drained", Duration::from_secs(30), || async {
        (meshkit_common::events::outbox::backlog(&db).await.unwrap_or(1) == 0).then_some(())
    })
    .await;
    let records = meshkit_integration_tests::broker::records(&broker.endpoint(), "order-events").await;
    let mut copies: HashMap<String, usize> = HashMap::new();
    for record in &records {
        let id = String::from_utf8(record.headers.get("event-id").cloned().unwrap_or_default()).unwrap_or_default();
        *copies.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = copies.iter().filter(|(_, n)| **n > 1).take(10).collect();
    let published_twice = copies.values().filter(|n| **n > 1).count();
    let fenced_log = mesh
        .users
        .iter()
        .map(|p| p.log())
        .find(|log| log.contains("outbox relay fenced"))
        .map(|log| log.lines().filter(|l| l.contains("outbox relay fenced")).count());
    eprintln!(
        "relay {leader} cut from etcd: {other} elected after {elected:?}; {} orders, {} events on the topic, \
         {published_twice} published twice; fenced: {fenced_log:?}",
        tally.ok,
        records.len(),
    );
    assert_eq!(tally.failed, 0, "failed orders: {:?}\n{}", tally.errors, mesh.logs());
    assert!(twice.is_empty(), "{published_twice} events published twice, among them {twice:?}");
    assert_eq!(copies.len() as u64, tally.ok, "every order's event on the topic, and no other");
    assert!(fenced_log.is_some(), "the cut-off relay never noticed the fence:\n{}", mesh.logs());
}
