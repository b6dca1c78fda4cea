//! Registration, discovery and lease sessions against a real etcd.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::time::Duration;

use etcd_client::GetOptions;
use meshkit_common::{
    discovery::watch_prefix,
    registry::{Instance, SessionState, service_prefix},
};
use meshkit_integration_tests::{Etcd, TcpProxy, eventually, init_logs, mesh_config, sqlite_url};
use tower::discover::Change;

const USER: &str = "meshkit.user.v1.UserService";

async fn registered(etcd: &Etcd) -> Vec<(String, Instance, i64)> {
    let mut client = etcd.client().await;
    let resp = client.get(service_prefix("/meshkit", USER), Some(GetOptions::new().with_prefix())).await.unwrap();
    resp.kvs()
        .iter()
        .map(|kv| {
            (kv.key_str().unwrap().to_owned(), serde_json::from_slice::<Instance>(kv.value()).unwrap(), kv.lease())
        })
        .collect()
}

#[tokio::test]
async fn registration_is_bound_to_a_live_lease() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = meshkit_user::start(mesh_config(&etcd, &sqlite_url(dir.path(), "user")).into()).await.unwrap();

    let entries = registered(&etcd).await;
    assert_eq!(entries.len(), 1);
    let (key, instance, lease) = &entries[0];
    assert_eq!(key, &format!("/meshkit/services/{USER}/{}", server.instance_id()));
    assert_eq!(instance.addr, server.local_addr().to_string());
    assert_eq!(instance.metadata.get("component").map(String::as_str), Some("user"));
    assert_ne!(*lease, 0, "the key must be bound to a lease");
    assert_eq!(Some(*lease), server.registry().and_then(|r| r.lease_id()));
    let ttl = etcd.client().await.lease_time_to_live(*lease, None).await.unwrap().ttl();
    assert!(ttl > 0 && ttl <= 2, "lease TTL {ttl}");

    // Keepalives hold the key well past the TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(registered(&etcd).await.len(), 1, "key expired despite keepalives");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn graceful_shutdown_revokes_the_lease_at_once() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = mesh_config(&etcd, &sqlite_url(dir.path(), "user"));
    config.registry.ttl_secs = 30;
    let server = meshkit_user::start(config.into()).await.unwrap();
    let lease = server.registry().and_then(|r| r.lease_id()).unwrap();
    let started = tokio::time::Instant::now();
    let drain = tokio::spawn(server.shutdown());
    eventually("the key to go", Duration::from_secs(1), || async { registered(&etcd).await.is_empty().then_some(()) })
        .await;
    assert!(started.elapsed() < Duration::from_millis(500), "took {:?}, TTL is 30 s", started.elapsed());
    let ttl = etcd.client().await.lease_time_to_live(lease, None).await.unwrap().ttl();
    assert_eq!(ttl, -1, "lease must be revoked, not left to expire");
    drain.await.unwrap().unwrap();
}

#[tokio::test]
async fn discovery_sees_a_new_instance_and_loses_a_stopped_one() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path(), "user");
    let mut watch = watch_prefix(etcd.client().await, service_prefix("/meshkit", USER));

    let a = meshkit_user::start(mesh_config(&etcd, &url).into()).await.unwrap();
    let change = tokio::time::timeout(Duration::from_secs(2), watch.changes.recv()).await.unwrap().unwrap();
    let Change::Insert(id, instance) = change else { panic!("expected an insert") };
    assert_eq!(id, a.instance_id());
    assert_eq!(instance.addr, a.local_addr().to_string());

    let b = meshkit_user::start(mesh_config(&etcd, &url).into()).await.unwrap();
    let change = tokio::time::timeout(Duration::from_secs(2), watch.changes.recv()).await.unwrap().unwrap();
    assert!(matches!(&change, Change::Insert(id, _) if id == b.instance_id()));

    let a_id = a.instance_id().to_owned();
    a.shutdown().await.unwrap();
    let change = tokio::time::timeout(Duration::from_secs(2), watch.changes.recv()).await.unwrap().unwrap();
    assert!(matches!(&change, Change::Remove(id) if *id == a_id), "expected removal of {a_id}");
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_lease_revoked_from_outside_is_registered_again() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = meshkit_user::start(mesh_config(&etcd, &sqlite_url(dir.path(), "user")).into()).await.unwrap();
    let mut state = server.registry().unwrap().state();
    let old = server.registry().and_then(|r| r.lease_id()).unwrap();
    etcd.client().await.lease_revoke(old).await.unwrap();
    // The revoke deleted the key with its lease; what is found from here on
    // was written again (possibly already, if a keepalive fell in between).

    let entries = eventually("re-registration", Duration::from_secs(3), || async {
        let e = registered(&etcd).await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_ne!(entries[0].2, old, "a new lease must be granted");
    state.wait_for(|s| matches!(s, SessionState::Registered { lease_id } if *lease_id == entries[0].2)).await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_key_deleted_from_outside_is_written_again() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = meshkit_user::start(mesh_config(&etcd, &sqlite_url(dir.path(), "user")).into()).await.unwrap();
    let (key, _, lease) = registered(&etcd).await.remove(0);
    etcd.client().await.delete(key.as_str(), None).await.unwrap();
    let entries = eventually("the key to come back", Duration::from_secs(3), || async {
        let e = registered(&etcd).await;
        (!e.is_empty()).then_some(e)
    })
    .await;
    assert_eq!(entries[0].0, key);
    assert_eq!(entries[0].2, lease, "the lease was alive: keep it");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn discovery_resumes_after_etcd_restarts_and_keeps_endpoints_meanwhile() {
    init_logs();
    let mut etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path(), "user");
    let mut watch = watch_prefix(etcd.client().await, service_prefix("/meshkit", USER));
    let a = meshkit_user::start(mesh_config(&etcd, &url).into()).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(2), watch.changes.recv()).await.unwrap().unwrap();
    assert!(matches!(first, Change::Insert(..)));

    etcd.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Nothing is removed while etcd is away.
    assert!(watch.changes.try_recv().is_err(), "no change may be emitted while etcd is down");
    etcd.restart().await.unwrap();

    // A new instance registered after the restart is seen by the resumed watch.
    let b = meshkit_user::start(mesh_config(&etcd, &url).into()).await.unwrap();
    let b_id = b.instance_id().to_owned();
    let seen = eventually("the new instance", Duration::from_secs(5), || {
        let next = watch.changes.try_recv().ok();
        async move { next }
    })
    .await;
    let mut inserted = vec![seen];
    while let Ok(c) = watch.changes.try_recv() {
        inserted.push(c);
    }
    assert!(inserted.iter().any(|c| matches!(c, Change::Insert(id, _) if *id == b_id)), "missing {b_id}");
    assert!(!inserted.iter().any(|c| matches!(c, Change::Remove(id) if id == a.instance_id())));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_watch_that_resumes_past_a_compaction_reads_again_and_emits_the_difference() {
    use std::sync::atomic::Ordering;
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let proxy = TcpProxy::start(etcd.endpoint().parse().unwrap()).await.unwrap();
    let prefix = service_prefix("/meshkit", USER);
    let value = |port: u16| format!(r#"{{"addr":"127.0.0.1:{port}"}}"#);
    let mut direct = etcd.client().await;
    direct.put(format!("{prefix}a"), value(1), None).await.unwrap();
    // The watcher reaches etcd only through the proxy.
    let settings =
        meshkit_common::config::EtcdSettings { endpoints: vec![proxy.addr().to_string()], ..Default::default() };
    let through_proxy = meshkit_common::etcd::connect(&settings).await.unwrap();
    let mut watch = watch_prefix(through_proxy, prefix.clone());
    let first = tokio::time::timeout(Duration::from_secs(2), watch.changes.recv()).await.unwrap().unwrap();
    assert!(matches!(first, Change::Insert(id, _) if id == "a"));

    // Partition the watcher, change the registry and compact its history away.
    proxy.cut();
    direct.delete(format!("{prefix}a"), None).await.unwrap();
    direct.put(format!("{prefix}b"), value(2), None).await.unwrap();
    let last = direct.put("/unrelated", "x", None).await.unwrap().header().unwrap().revision();
    direct.compact(last, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(watch.changes.try_recv().is_err(), "nothing can arrive through a cut link");
    proxy.restore();

    let mut seen = Vec::new();
    while seen.len() < 2 {
        let change = tokio::time::timeout(Duration::from_secs(5), watch.changes.recv()).await.unwrap().unwrap();
        seen.push(change);
    }
    assert!(seen.iter().any(|c| matches!(c, Change::Remove(id) if id == "a")), "a must go: {seen:?}");
    assert!(
        seen.iter().any(|c| matches!(c, Change::Insert(id, i) if id == "b" && i.addr == "127.0.0.1:2")),
        "b must come: {seen:?}"
    );
    assert_eq!(watch.resyncs.load(Ordering::Relaxed), 1, "the compaction must force one full read");
}
