//! Chaos drills on real processes: instances killed, frozen, slowed and
//! restarted, and etcd stopped, all under steady load on loopback. The mesh
//! must keep every idempotent call succeeding.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{
    path::Path,
    time::{Duration, Instant},
};

use etcd_client::{EventType, WatchOptions};
use meshkit_common::{ChannelBuilder, admin::fetch_pools};
use meshkit_integration_tests::{
    Etcd, ServiceProcess, create_user, eventually,
    fleet::{self, ORDER, USER, order_load, user_load},
    init_logs,
};

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;
const SIGCONT: i32 = 18;
const SIGSTOP: i32 = 19;

fn spawn(etcd: &Etcd, dir: &Path, binary: &str, id: &str, extra: &[(&'static str, String)]) -> ServiceProcess {
    fleet::spawn(&etcd.endpoint(), dir, binary, id, extra)
}

async fn wait_registered(etcd: &Etcd, service: &str, ids: &[&str]) {
    fleet::wait_registered(&etcd.client().await, service, ids).await
}

/// The user ids in the pool that `admin`'s process keeps for user-service.
async fn user_pool_of(admin: &str) -> Vec<String> {
    fleet::pool_of(admin, USER).await
}

struct Cluster {
    etcd: Etcd,
    dir: tempfile::TempDir,
    users: Vec<(String, ServiceProcess)>,
    _order: ServiceProcess,
    order_admin: String,
    channels: ChannelBuilder,
}

async fn cluster(user_instances: usize) -> Cluster {
    cluster_with(user_instances, &[]).await
}

async fn cluster_with(user_instances: usize, user_env: &[(&'static str, String)]) -> Cluster {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let users: Vec<(String, ServiceProcess)> = (1..=user_instances)
        .map(|i| {
            let id = format!("user-{i}");
            let p = spawn(&etcd, dir.path(), "user-service", &id, user_env);
            (id, p)
        })
        .collect();
    let order = spawn(&etcd, dir.path(), "order-service", "order-1", &[("RUST_LOG", "info".into())]);
    let ids: Vec<&str> = users.iter().map(|(id, _)| id.as_str()).collect();
    wait_registered(&etcd, USER, &ids).await;
    wait_registered(&etcd, ORDER, &["order-1"]).await;
    let order_admin = fleet::admin_addr(&etcd.client().await, ORDER, "order-1").await;
    // Load starts only once order-service itself knows every user instance.
    eventually("order-service to see every user instance", Duration::from_secs(10), || async {
        let pool = user_pool_of(&order_admin).await;
        ids.iter().all(|id| pool.iter().any(|p| p == id)).then_some(())
    })
    .await;
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit");
    Cluster { etcd, dir, users, _order: order, order_admin, channels }
}

#[tokio::test]
async fn kill_9_of_one_user_instance_fails_no_call_and_leaves_every_pool() {
    let mut c = cluster_with(3, &[("MESHKIT_REGISTRY_TTL_SECS", "5".into())]).await;
    let user_id = create_user(&c.channels.balanced(USER), "Load", "kill9@example.com").await.id;
    let own_pool = c.channels.balanced(USER);
    let load = order_load(c.channels.balanced(ORDER), user_id);
    eventually("traffic", Duration::from_secs(5), || async { (load.ok_so_far() > 50).then_some(()) }).await;
    c.users[1].1.signal(SIGKILL);
    let _ = c.users[1].1.wait_exit(Duration::from_secs(5)).await;
    let killed_at = Instant::now();
    // Out of rotation from the first refused connection, long before its 5 s lease lapses.
    eventually("user-2 ejected by order-service", Duration::from_secs(10), || async {
        let report = fetch_pools(&c.order_admin).await.ok()?;
        let state = report.get(USER)?.endpoints.get("user-2").map(|e| e["state"].as_str().unwrap_or("").to_owned());
        state.is_none_or(|s| s != "ready").then_some(())
    })
    .await;
    let ejected_after = killed_at.elapsed();
    assert!(ejected_after < Duration::from_secs(3), "ejection took {ejected_after:?}: it waited for the lease");
    eventually("user-2 out of order-service's pool", Duration::from_secs(15), || async {
        (!user_pool_of(&c.order_admin).await.contains(&"user-2".to_owned())).then_some(())
    })
    .await;
    eventually("user-2 out of this process's pool", Duration::from_secs(15), || async {
        (!own_pool.view().ids().contains(&"user-2".to_owned())).then_some(())
    })
    .await;
    eprintln!("user-2: out of rotation {ejected_after:?}, out of every pool {:?} after kill -9", killed_at.elapsed());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tally = load.stop().await;
    assert_eq!(tally.failed, 0, "failed calls: {:?}", tally.errors);
    assert!(tally.ok > 100, "too little traffic to mean anything: {}", tally.ok);
}

#[tokio::test]
async fn a_frozen_instance_is_ejected_and_comes_back_after_sigcont() {
    let c = cluster(3).await;
    let user_id = create_user(&c.channels.balanced(USER), "Load", "stop@example.com").await.id;
    let users = c.channels.balanced(USER);
    let load = user_load(users.clone(), user_id.clone(), Duration::from_millis(5));
    let orders = order_load(c.channels.balanced(ORDER), user_id.clone());
    eventually("traffic", Duration::from_secs(5), || async { (load.ok_so_far() > 50).then_some(()) }).await;

    c.users[2].1.signal(SIGSTOP);
    // Out of rotation: ejected by the balancer, or dropped when its lease lapses.
    eventually("user-3 out of rotation", Duration::from_secs(10), || async {
        let snapshot = users.view().snapshot();
        snapshot.get("user-3").is_none_or(|e| e.state != "ready").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.users[2].1.signal(SIGCONT);
    eventually("user-3 back in rotation", Duration::from_secs(15), || async {
        users.view().snapshot().get("user-3").is_some_and(|e| e.state == "ready").then_some(())
    })
    .await;
    let before = load.ok_so_far();
    eventually("more traffic", Duration::from_secs(5), || async { (load.ok_so_far() > before + 200).then_some(()) })
        .await;
    let tally = load.stop().await;
    let order_tally = orders.stop().await;
    assert_eq!(tally.failed, 0, "GetUser failures: {:?}", tally.errors);
    assert_eq!(order_tally.failed, 0, "CreateOrder failures: {:?}", order_tally.errors);
    assert!(tally.served_by.get("user-3").copied().unwrap_or(0) > 0, "user-3 never served: {:?}", tally.served_by);
}

#[tokio::test]
async fn etcd_down_for_30_s_fails_no_call_and_everyone_is_registered_again() {
    let mut c = cluster(2).await;
    let user_id = create_user(&c.channels.balanced(USER), "Load", "etcd@example.com").await.id;
    let load = order_load(c.channels.balanced(ORDER), user_id.clone());
    let direct = user_load(c.channels.balanced(USER), user_id, Duration::from_millis(10));
    eventually("traffic", Duration::from_secs(5), || async { (load.ok_so_far() > 50).then_some(()) }).await;
    c.etcd.kill();
    let during = load.ok_so_far();
    let outage: u64 = std::env::var("MESHKIT_CHAOS_ETCD_OUTAGE_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    tokio::time::sleep(Duration::from_secs(outage)).await;
    assert!(load.ok_so_far() > during + 15 * outage, "calls must go on while etcd is down");
    c.etcd.restart().await.unwrap();
    let back = Instant::now();
    wait_registered(&c.etcd, USER, &["user-1", "user-2"]).await;
    wait_registered(&c.etcd, ORDER, &["order-1"]).await;
    let took = back.elapsed();
    eprintln!("every instance registered {took:?} after etcd answered again");
    assert!(took < Duration::from_secs(1), "re-registration took {took:?}");
    // And the watches resumed: a new instance is found.
    let _user3 = spawn(&c.etcd, c.dir.path(), "user-service", "user-3", &[]);
    eventually("user-3 in order-service's pool", Duration::from_secs(10), || async {
        user_pool_of(&c.order_admin).await.contains(&"user-3".to_owned()).then_some(())
    })
    .await;
    let tally = load.stop().await;
    let direct = direct.stop().await;
    if tally.failed > 0 {
        print_logs(c.dir.path(), "order-service");
    }
    assert_eq!(tally.failed, 0, "CreateOrder failures: {:?}", tally.errors);
    assert_eq!(direct.failed, 0, "GetUser failures: {:?}", direct.errors);
}

fn print_logs(dir: &Path, prefix: &str) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with(prefix) {
            eprintln!("--- {}\n{}", entry.path().display(), std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
}

#[tokio::test]
async fn rolling_restart_of_every_user_instance_fails_no_call() {
    let mut c = cluster(3).await;
    let user_id = create_user(&c.channels.balanced(USER), "Load", "roll@example.com").await.id;
    let load = order_load(c.channels.balanced(ORDER), user_id.clone());
    let direct = user_load(c.channels.balanced(USER), user_id, Duration::from_millis(5));
    eventually("traffic", Duration::from_secs(5), || async { (load.ok_so_far() > 50).then_some(()) }).await;
    for i in 0..c.users.len() {
        let id = c.users[i].0.clone();
        c.users[i].1.signal(SIGTERM);
        let status = c.users[i].1.wait_exit(Duration::from_secs(15)).await.expect("drains and exits");
        assert!(status.success(), "{id} exited with {status}");
        let replacement = spawn(&c.etcd, c.dir.path(), "user-service", &format!("{id}-b"), &[]);
        wait_registered(&c.etcd, USER, &[&format!("{id}-b")]).await;
        c.users[i].1 = replacement;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let tally = load.stop().await;
    let direct = direct.stop().await;
    assert_eq!(tally.failed, 0, "CreateOrder failures: {:?}", tally.errors);
    assert_eq!(direct.failed, 0, "GetUser failures: {:?}", direct.errors);
    assert!(tally.ok > 100 && direct.ok > 100, "too little traffic: {} / {}", tally.ok, direct.ok);
}

#[tokio::test]
async fn a_new_instance_gets_traffic_right_after_it_registers() {
    let c = cluster(2).await;
    let user_id = create_user(&c.channels.balanced(USER), "Load", "new@example.com").await.id;
    let mut client = c.etcd.client().await;
    let mut watch = client.watch(format!("/meshkit/services/{USER}/user-9"), Some(WatchOptions::new())).await.unwrap();
    let load = user_load(c.channels.balanced(USER), user_id, Duration::from_millis(1));
    eventually("traffic", Duration::from_secs(5), || async { (load.ok_so_far() > 50).then_some(()) }).await;
    let _user9 = spawn(&c.etcd, c.dir.path(), "user-service", "user-9", &[]);
    let registered_at = loop {
        let resp = watch.message().await.unwrap().unwrap();
        if resp.events().iter().any(|e| e.event_type() == EventType::Put) {
            break Instant::now();
        }
    };
    let users = c.channels.balanced(USER);
    // The first call user-9 serves: poll the pool's per-endpoint call count.
    let first_call = eventually("user-9 to serve a call", Duration::from_secs(2), || async {
        users.view().snapshot().get("user-9").is_some_and(|e| e.calls > 0).then(Instant::now)
    })
    .await;
    let took = first_call.saturating_duration_since(registered_at);
    eprintln!("user-9 received traffic {took:?} after its registration (goal < 100 ms; see make bench)");
    let tally = load.stop().await;
    assert_eq!(tally.failed, 0, "{:?}", tally.errors);
    assert!(tally.served_by.get("user-9").copied().unwrap_or(0) > 0, "{:?}", tally.served_by);
}

#[tokio::test]
async fn an_instance_50_ms_slower_gets_under_a_tenth_of_the_calls() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _fast1 = spawn(&etcd, dir.path(), "user-service", "user-1", &[]);
    let _fast2 = spawn(&etcd, dir.path(), "user-service", "user-2", &[]);
    let _slow =
        spawn(&etcd, dir.path(), "user-service", "user-slow", &[("MESHKIT_SERVER_FAULT_DELAY_MS", "50".into())]);
    wait_registered(&etcd, USER, &["user-1", "user-2", "user-slow"]).await;
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit");
    let users = channels.balanced(USER);
    let user_id = create_user(&users, "Load", "slow@example.com").await.id;
    let load = user_load(users, user_id, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_secs(4)).await;
    let tally = load.stop().await;
    assert_eq!(tally.failed, 0, "{:?}", tally.errors);
    let total: u64 = tally.served_by.values().sum();
    let slow = tally.served_by.get("user-slow").copied().unwrap_or(0);
    eprintln!("slow instance served {slow} of {total} calls: {:?}", tally.served_by);
    assert!(total > 500, "too little traffic: {total}");
    assert!((slow as f64) < 0.10 * total as f64, "slow instance served {slow} of {total}");
}
