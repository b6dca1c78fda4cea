//! The xDS server on real etcd: the ADS protocol driven by hand (ACK, NACK,
//! stale nonces, absent names, zones, many streams), then grpc-go and
//! grpc-java programs calling `xds:///meshkit.user.v1.UserService` over real
//! user-service processes while instances are killed, drained and added,
//! weighted, zoned, and while the xDS server itself is down.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{collections::BTreeMap, path::Path, time::Duration};

use etcd_client::{Client, PutOptions};
use meshkit_common::{ChannelBuilder, Instance};
use meshkit_integration_tests::{
    Etcd, ServiceProcess, create_user, eventually,
    fleet::{self, USER},
    free_port, init_logs, mesh_config,
    xds::{self, AdsClient, CLUSTER, ENDPOINTS, LISTENER, Lang, ROUTE, XdsCaller},
};

const SIGKILL: i32 = 9;
const SIGTERM: i32 = 15;
const WAIT: Duration = Duration::from_secs(10);

/// Registers a made-up instance of `service` under `lease`.
async fn register(etcd: &mut Client, lease: i64, service: &str, id: &str, addr: &str, zone: &str, weight: u32) {
    let instance =
        Instance { addr: addr.into(), zone: zone.into(), weight, version: "test".into(), metadata: Default::default() };
    let key = format!("/meshkit/services/{service}/{id}");
    etcd.put(key, serde_json::to_string(&instance).unwrap(), Some(PutOptions::new().with_lease(lease))).await.unwrap();
}

async fn start_xds(etcd: &Etcd) -> meshkit_xds::XdsServer {
    let mut config = mesh_config(etcd, "sqlite::memory:").mesh;
    config.registry.instance_id = "xds-test".into();
    meshkit_xds::start(config).await.unwrap()
}

#[tokio::test]
async fn ads_answers_subscriptions_acks_nacks_and_zones() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let mut client = etcd.client().await;
    let lease = client.lease_grant(30, None).await.unwrap().id();
    register(&mut client, lease, USER, "u-a", "127.0.0.1:7001", "a", 300).await;
    register(&mut client, lease, USER, "u-b", "localhost:7002", "b", 100).await;
    let server = start_xds(&etcd).await;
    let addr = server.server.local_addr().to_string();

    let mut ads = AdsClient::connect(&addr, "node-1", "b").await.unwrap();
    // Listeners: every subscribed name that is registered; an unknown one is left out (absent).
    ads.subscribe(LISTENER, &[USER, "no.such.Service"]).await.unwrap();
    let lds = ads.next(WAIT).await.unwrap();
    assert_eq!(lds.type_url, LISTENER);
    assert_eq!(xds::names(&lds), [USER]);
    // The same names in another order (and twice) are the same subscription.
    ads.ack(&lds, &["no.such.Service", USER, USER]).await.unwrap();
    for (type_url, _) in [(ROUTE, 0), (CLUSTER, 0), (ENDPOINTS, 0)] {
        ads.subscribe(type_url, &[USER]).await.unwrap();
        let response = ads.next(WAIT).await.unwrap();
        assert_eq!(response.type_url, type_url);
        assert_eq!(xds::names(&response), [USER]);
        if type_url == ENDPOINTS {
            // The client's zone first; a host name resolved to an address; weights as registered.
            let mut got = xds::endpoints(&response)[USER].clone();
            got.sort_by(|a, b| a.sub_zone.cmp(&b.sub_zone));
            let summary: Vec<(String, &str, u32, u32)> =
                got.iter().map(|e| (e.addr.clone(), e.zone.as_str(), e.weight, e.priority)).collect();
            assert_eq!(summary.len(), 2, "{got:?}");
            assert_eq!(summary[0], ("127.0.0.1:7001".into(), "a", 300, 1));
            assert!(summary[1].0.ends_with(":7002") && !summary[1].0.starts_with("localhost"), "{summary:?}");
            assert_eq!((summary[1].1, summary[1].2, summary[1].3), ("b", 100, 0));
        }
        ads.ack(&response, &[USER]).await.unwrap();
    }
    assert!(ads.quiet_for(Duration::from_millis(300)).await.is_ok(), "an ACK asks for nothing new");

    // A new instance: only the endpoints change.
    register(&mut client, lease, USER, "u-c", "127.0.0.1:7003", "b", 100).await;
    let eds = ads.next(WAIT).await.unwrap();
    assert_eq!(eds.type_url, ENDPOINTS);
    assert_eq!(xds::endpoints(&eds)[USER].len(), 3);
    // The client refuses it: the server counts the NACK and sends nothing more
    // until something changes; the version accepted stays the one before.
    let accepted_before = eds.version_info.parse::<u64>().unwrap() - 1;
    ads.nack(&eds, &[USER], "refused for the test").await.unwrap();
    assert!(ads.quiet_for(Duration::from_millis(300)).await.is_ok(), "a NACK is not answered by resending the same");
    let view = eventually("the NACK recorded", WAIT, || {
        let clients = server.ads.clients();
        async move { clients.into_iter().find(|c| c.types.get("eds").is_some_and(|t| t.nacks == 1)) }
    })
    .await;
    let eds_view = &view.types["eds"];
    assert_eq!(eds_view.last_nack, "refused for the test");
    assert_eq!(eds_view.acked_version, accepted_before.to_string());
    assert_eq!(view.node, "node-1");
    assert_eq!(view.zone, "b");
    assert_eq!(server.ads.stats().nacks[3].load(std::sync::atomic::Ordering::Relaxed), 1);
    // A request with a nonce the server never sent is ignored.
    ads.stale(LISTENER, &[]).await.unwrap();
    assert!(ads.quiet_for(Duration::from_millis(300)).await.is_ok(), "a stale request changes nothing");
    assert_eq!(server.ads.stats().stale.load(std::sync::atomic::Ordering::Relaxed), 1);

    // Many clients at once: each gets the next change.
    let mut many = Vec::new();
    for i in 0..50 {
        let mut c = AdsClient::connect(&addr, &format!("many-{i}"), "").await.unwrap();
        c.subscribe(ENDPOINTS, &[USER]).await.unwrap();
        let first = c.next(WAIT).await.unwrap();
        assert_eq!(xds::endpoints(&first)[USER].len(), 3);
        assert!(xds::endpoints(&first)[USER].iter().all(|e| e.priority == 0), "no zone: one priority");
        c.ack(&first, &[USER]).await.unwrap();
        many.push(c);
    }
    client.delete(format!("/meshkit/services/{USER}/u-c"), None).await.unwrap();
    for c in &mut many {
        let next = c.next(WAIT).await.unwrap();
        assert_eq!(xds::endpoints(&next)[USER].len(), 2);
    }
    // The first client hears of it too, after its NACK.
    let after = ads.next(WAIT).await.unwrap();
    assert_eq!(xds::endpoints(&after)[USER].len(), 2);
    ads.ack(&after, &[USER]).await.unwrap();

    // The last instance gone: the listener and cluster are absent (left out).
    client.lease_revoke(lease).await.unwrap();
    let mut gone = BTreeMap::new();
    while gone.len() < 2 {
        let response = ads.next(WAIT).await.unwrap();
        if response.type_url == LISTENER || response.type_url == CLUSTER {
            gone.insert(response.type_url.clone(), xds::names(&response));
        }
        ads.ack(&response, &[USER]).await.unwrap();
    }
    assert!(gone.values().all(|names| names.is_empty()), "{gone:?}");

    // The server drains with streams open.
    drop(many);
    server.shutdown().await.unwrap();
}

/// Three user-service processes sharing one SQLite file, and a user they all know.
struct Users {
    etcd: Etcd,
    dir: tempfile::TempDir,
    instances: BTreeMap<String, ServiceProcess>,
    user_id: String,
}

impl Users {
    async fn start(specs: &[(&str, &str, u32)]) -> Self {
        let etcd = Etcd::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut users = Self { etcd, dir, instances: BTreeMap::new(), user_id: String::new() };
        // One after the other: they share one SQLite file and its migrations.
        for (id, zone, weight) in specs {
            users.add(id, zone, *weight);
            users.wait_registered(id).await;
        }
        let channels = ChannelBuilder::new(users.etcd.client().await, "/meshkit");
        let channel = channels.balanced(USER);
        users.user_id = create_user(&channel, "Ada", &format!("ada-{}@example.com", free_port())).await.id;
        users
    }

    fn add(&mut self, id: &str, zone: &str, weight: u32) {
        let extra = [("MESHKIT_REGISTRY_ZONE", zone.to_owned()), ("MESHKIT_REGISTRY_WEIGHT", weight.to_string())];
        self.add_with(id, &extra);
    }

    fn add_with(&mut self, id: &str, extra: &[(&'static str, String)]) {
        let process = fleet::spawn(&self.etcd.endpoint(), self.dir.path(), "user-service", id, extra);
        self.instances.insert(id.to_owned(), process);
    }

    /// Waits for `id` to register, failing with its log.
    async fn wait_registered(&self, id: &str) {
        let client = self.etcd.client().await;
        for _ in 0..150 {
            if fleet::registered(&client, USER).await.iter().any(|r| r == id) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{id} did not register in 15 s; its log:\n{}", self.instances[id].log());
    }

    fn xds_server(&self) -> (ServiceProcess, String) {
        let addr = format!("127.0.0.1:{}", free_port());
        let env = [
            ("MESHKIT_ETCD_ENDPOINTS", self.etcd.endpoint()),
            ("MESHKIT_SERVER_LISTEN", addr.clone()),
            ("MESHKIT_REGISTRY_TTL_SECS", "2".to_owned()),
        ];
        (ServiceProcess::spawn("xds-server", &env, self.dir.path()).unwrap(), addr)
    }

    fn bootstrap(&self, server: &str, node: &str, zone: &str) -> std::path::PathBuf {
        xds::bootstrap(self.dir.path(), node, server, node, zone)
    }

    /// A grpc-go and a grpc-java client in `zone` calling at `rate`.
    async fn callers(&self, server: &str, node: &str, zone: &str, rate: u32) -> Vec<XdsCaller> {
        let mut callers = Vec::new();
        for lang in [Lang::Go, Lang::Java] {
            let bootstrap = self.bootstrap(server, &format!("{lang:?}-{node}"), zone);
            callers.push(XdsCaller::start(lang, &bootstrap, &self.user_id, rate, self.path()).await.unwrap());
        }
        callers
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

async fn wait_xds_serving(etcd: &Etcd) {
    eventually("the xDS server registered", WAIT, || async {
        (!fleet::registered(&etcd.client().await, meshkit_xds::SERVICE).await.is_empty()).then_some(())
    })
    .await;
}

/// Waits for `n` good calls from each caller; then each one's clock.
async fn after_good_calls(callers: &[XdsCaller], n: usize) -> Vec<f64> {
    for caller in callers {
        caller.wait_ok(n, Duration::from_secs(30)).await.unwrap();
    }
    callers.iter().map(|c| c.now_ms().unwrap()).collect()
}

/// The share of good calls in `calls` that `instance` served.
fn share(calls: &[xds::Call], instance: &str) -> f64 {
    let counts = xds::by_instance(calls);
    let total: usize = counts.values().sum();
    counts.get(instance).copied().unwrap_or(0) as f64 / total.max(1) as f64
}

#[tokio::test]
async fn grpc_go_and_grpc_java_balance_over_instances_that_come_and_go() {
    init_logs();
    let mut users = Users::start(&[("u1", "", 100), ("u2", "", 100), ("u3", "", 100)]).await;
    let (_xds, server) = users.xds_server();
    wait_xds_serving(&users.etcd).await;
    let callers = users.callers(&server, "client", "", 100).await;
    // Spread is judged after every connection is up.
    let warm = after_good_calls(&callers, 100).await;
    after_good_calls(&callers, 400).await;
    // meshctl sees both clients and what they subscribed to.
    let (code, out, err) = meshkit_integration_tests::meshctl(&users.etcd, &["xds", "clients"]).await;
    assert_eq!(code, 0, "{err}");
    for expected in ["Go-client", "Java-client", "eds", USER] {
        assert!(out.contains(expected), "meshctl xds clients lacks {expected}:\n{out}");
    }

    // A kill -9, a drain, a new instance: the clients' views follow, no call fails.
    let marks = |callers: &[XdsCaller]| callers.iter().map(|c| c.now_ms().unwrap()).collect::<Vec<_>>();
    let killed_at = marks(&callers);
    users.instances["u1"].signal(SIGKILL);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let drained_at = marks(&callers);
    users.instances["u2"].signal(SIGTERM);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let added_at = marks(&callers);
    users.add("u4", "", 100);
    users.wait_registered("u4").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, caller) in callers.into_iter().enumerate() {
        let lang = caller.lang;
        // Calls started while the client was still starting (a cold JVM
        // resolving its first xDS resources can take seconds) are left out.
        let calls: Vec<_> = caller.finish().await.unwrap().into_iter().filter(|c| c.t >= warm[i]).collect();
        // grpc-java reports a call written to a connection the kill just
        // reset as UNKNOWN "channel closed" (grpc-java#10120), a status no
        // xDS retry policy can name. Such calls are let through, and said,
        // while they started within 250 ms of the kill: until the client has
        // read the reset (one call at 100/s on an idle machine, two or three
        // when the machine is busy). Everything else: no failure at all.
        let (known, failed): (Vec<_>, Vec<_>) = xds::failures(&calls).into_iter().partition(|c| {
            lang == Lang::Java
                && c.code == "UNKNOWN"
                && c.msg.contains("channel closed")
                && (killed_at[i]..killed_at[i] + 250.0).contains(&c.t)
        });
        assert!(
            failed.is_empty(),
            "{lang:?}: {} of {} calls failed: {:?}",
            failed.len(),
            calls.len(),
            &failed[..failed.len().min(5)]
        );
        if !known.is_empty() {
            let at: Vec<String> = known.iter().map(|c| format!("+{:.0} ms", c.t - killed_at[i])).collect();
            println!(
                "{lang:?}: {} call(s) written before the reset was read failed at the kill ({}): {} {}",
                known.len(),
                at.join(", "),
                known[0].code,
                known[0].msg
            );
        }
        let before: Vec<_> = calls.iter().filter(|c| c.t > warm[i] && c.t < killed_at[i]).cloned().collect();
        for id in ["u1", "u2", "u3"] {
            assert!(
                share(&before, id) > 0.2,
                "{lang:?}: {id} had {:.2} of the calls before the kill",
                share(&before, id)
            );
        }
        println!("{lang:?}: {} calls, by instance {:?}", calls.len(), xds::by_instance(&calls));
        // Calls started 1 s after each change no longer reach the instance gone.
        let late = |from: f64, id: &str| calls.iter().filter(|c| c.t > from + 1000.0 && c.instance == id).count();
        assert_eq!(late(killed_at[i], "u1"), 0, "{lang:?}: calls still reached the killed instance");
        assert_eq!(late(drained_at[i], "u2"), 0, "{lang:?}: calls still reached the drained instance");
        let new = calls.iter().filter(|c| c.t > added_at[i] && c.instance == "u4").count();
        assert!(new > 20, "{lang:?}: the new instance got {new} calls");
    }
}

#[tokio::test]
async fn registered_weights_and_zones_reach_grpc_clients() {
    init_logs();
    let users =
        Users::start(&[("heavy", "a", 300), ("light-1", "a", 100), ("light-2", "a", 100), ("far", "b", 100)]).await;
    let (_xds, server) = users.xds_server();
    wait_xds_serving(&users.etcd).await;
    // Zone a first: `far` (zone b) gets nothing while zone a has instances.
    let callers = users.callers(&server, "a", "a", 200).await;
    // Leave out the start, while connections come up.
    let from = after_good_calls(&callers, 200).await;
    let until = after_good_calls(&callers, 1700).await;
    // Zone a lost at once (kill -9): the clients fail over to zone b.
    for id in ["heavy", "light-1", "light-2"] {
        users.instances[id].signal(SIGKILL);
    }
    for caller in &callers {
        eventually("calls failing over to zone b", Duration::from_secs(20), || {
            let calls = caller.calls();
            async move { (calls.iter().filter(|c| c.instance == "far").count() >= 100).then_some(()) }
        })
        .await;
    }
    for (i, caller) in callers.into_iter().enumerate() {
        let lang = caller.lang;
        let all = caller.finish().await.unwrap();
        // Calls over before the kill: one still in flight when zone a is
        // killed is retried on `far` and counts there (grpc-go's call
        // started 1.7 ms before the kill and took 91 ms).
        let calls: Vec<_> = all.iter().filter(|c| c.t >= from[i] && c.t + c.ms < until[i]).cloned().collect();
        // Calls started while a cold client was still starting are left out.
        let judged: Vec<_> = calls.iter().filter(|c| c.t >= from[i]).cloned().collect();
        let failed = xds::failures(&judged);
        assert!(failed.is_empty(), "{lang:?}: {} failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
        let heavy = share(&calls, "heavy");
        println!("{lang:?}: {} calls, by instance {:?}, heavy {heavy:.3}", calls.len(), xds::by_instance(&calls));
        assert!((0.55..=0.65).contains(&heavy), "{lang:?}: weight 300 of 500 got {heavy:.3} of the calls");
        // Neither client leaves zone a while it has instances. (Both once
        // sent 1 call in about 1,400 to zone b: a call in flight at the kill,
        // counted before the window ended where its call did.)
        let far = xds::by_instance(&calls).get("far").copied().unwrap_or(0);
        assert_eq!(far, 0, "{lang:?}: a client in zone a called zone b");
        let after: Vec<_> = all.iter().filter(|c| c.t >= until[i]).collect();
        let first_far = after.iter().filter(|c| c.instance == "far").map(|c| c.t).fold(f64::MAX, f64::min);
        let failed: Vec<_> = after.iter().filter(|c| c.code != "OK").collect();
        println!(
            "{lang:?}: zone a killed; first call served in zone b {:.0} ms later; {} of {} calls failed meanwhile: {:?}",
            first_far - until[i],
            failed.len(),
            after.len(),
            failed.iter().map(|c| format!("{} {}", c.code, c.msg)).collect::<std::collections::BTreeSet<_>>()
        );
        assert!(first_far - until[i] < 5_000.0, "{lang:?}: zone b served its first call after {first_far} ms");
    }
}

#[tokio::test]
async fn clients_keep_calling_while_the_xds_server_is_down_and_resync_when_it_returns() {
    init_logs();
    let mut users = Users::start(&[("u1", "", 100), ("u2", "", 100)]).await;
    let (mut xds_server, server) = users.xds_server();
    wait_xds_serving(&users.etcd).await;
    let bootstrap = users.bootstrap(&server, "go-static", "");
    let caller = XdsCaller::start(Lang::Go, &bootstrap, &users.user_id, 100, users.path()).await.unwrap();
    caller.wait_ok(100, Duration::from_secs(20)).await.unwrap();
    let warm = caller.now_ms().unwrap();
    xds_server.signal(SIGKILL);
    xds_server.wait_exit(WAIT).await;
    let down_at = caller.now_ms().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    // A new instance while no xDS server runs: not seen yet.
    users.add("u3", "", 100);
    users.wait_registered("u3").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let back_at = caller.now_ms().unwrap();
    // The same address again: the client reconnects and resyncs.
    let env = [
        ("MESHKIT_ETCD_ENDPOINTS", users.etcd.endpoint()),
        ("MESHKIT_SERVER_LISTEN", server.clone()),
        ("MESHKIT_REGISTRY_TTL_SECS", "2".to_owned()),
    ];
    let _xds_again = ServiceProcess::spawn("xds-server", &env, users.path()).unwrap();
    eventually("the new instance called after the xDS server returned", Duration::from_secs(30), || {
        let calls = caller.calls();
        async move { calls.iter().any(|c| c.t > back_at && c.instance == "u3").then_some(()) }
    })
    .await;
    let calls: Vec<_> = caller.finish().await.unwrap().into_iter().filter(|c| c.t >= warm).collect();
    assert!(xds::failures(&calls).is_empty(), "{:?}", xds::failures(&calls));
    let while_down: Vec<_> = calls.iter().filter(|c| c.t > down_at && c.t < back_at).cloned().collect();
    assert!(while_down.len() > 300, "{} calls while the xDS server was down", while_down.len());
    assert_eq!(share(&while_down, "u3"), 0.0, "the client saw u3 with no xDS server");
    assert!(share(&while_down, "u1") > 0.3 && share(&while_down, "u2") > 0.3, "{:?}", xds::by_instance(&while_down));
}

#[tokio::test]
async fn a_traffic_split_by_version_reaches_grpc_clients_as_weighted_clusters() {
    init_logs();
    let mut users = Users::start(&[("old-1", "", 100), ("old-2", "", 100)]).await;
    users.add_with("new-1", &[("MESHKIT_REGISTRY_VERSION", "0.2.0".to_owned())]);
    users.wait_registered("new-1").await;
    let old = env!("CARGO_PKG_VERSION");
    let split = |shares: [String; 2]| {
        let etcd = &users.etcd;
        async move {
            let (code, out, err) =
                meshkit_integration_tests::meshctl(etcd, &["split", USER, &shares[0], &shares[1]]).await;
            assert_eq!(code, 0, "{out}{err}");
        }
    };
    // One new instance beside two old ones: 20% of the calls, not a third.
    split([format!("{old}=80"), "0.2.0=20".into()]).await;
    let (_xds, server) = users.xds_server();
    wait_xds_serving(&users.etcd).await;
    let callers = users.callers(&server, "split", "", 200).await;
    let from = after_good_calls(&callers, 200).await;
    let until = after_good_calls(&callers, 800).await;
    // Then every call to the new version, live.
    split([format!("{old}=0"), "0.2.0=100".into()]).await;
    let moved = callers.iter().map(|c| c.now_ms().unwrap()).collect::<Vec<_>>();
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (i, caller) in callers.into_iter().enumerate() {
        let lang = caller.lang;
        let calls = caller.finish().await.unwrap();
        let window: Vec<_> = calls.iter().filter(|c| c.t >= from[i] && c.t < until[i]).cloned().collect();
        let new = share(&window, "new-1");
        println!("{lang:?}: at 80/20 the new version served {:.1}% of {} calls", new * 100.0, window.len());
        assert!((0.15..=0.25).contains(&new), "{lang:?}: the new version served {new:.3} at 80/20");
        let late: Vec<_> = calls.iter().filter(|c| c.t > moved[i] + 1000.0).cloned().collect();
        assert!(late.len() > 100, "{lang:?}: {} calls after the move", late.len());
        assert_eq!(share(&late, "new-1"), 1.0, "{lang:?}: {:?}", xds::by_instance(&late));
        // Calls started while a cold client was still starting are left out.
        let judged: Vec<_> = calls.iter().filter(|c| c.t >= from[i]).cloned().collect();
        let failed = xds::failures(&judged);
        assert!(failed.is_empty(), "{lang:?}: {} failed: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    }
}
