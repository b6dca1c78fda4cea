//! meshctl against a live mesh: registry listings from etcd, pools from a
//! process's admin endpoint, and clear errors for bad input.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use meshkit_common::ChannelBuilder;
use meshkit_integration_tests::{Etcd, create_user, init_logs, mesh_config, meshctl, sqlite_url};

#[tokio::test]
async fn lists_services_instances_leases_and_pools() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let user = meshkit_user::start(mesh_config(&etcd, &sqlite_url(dir.path(), "user")).into()).await.unwrap();
    let order = meshkit_order::start(mesh_config(&etcd, &sqlite_url(dir.path(), "order")).into()).await.unwrap();
    // Traffic through order-service's pool, so it has something to show.
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit");
    create_user(&channels.balanced("meshkit.user.v1.UserService"), "Ada", "ada@example.com").await;

    let (code, out, err) = meshctl(&etcd, &["services"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("meshkit.user.v1.UserService") && out.contains("meshkit.order.v1.OrderService"), "{out}");

    let (code, out, _) = meshctl(&etcd, &["instances"]).await;
    assert_eq!(code, 0);
    assert!(out.contains(user.instance_id()) && out.contains(&user.local_addr().to_string()), "{out}");
    let lease = user.registry().unwrap().lease_id().unwrap().to_string();
    assert!(out.contains(&lease), "lease id missing: {out}");
    let (_, only_orders, _) = meshctl(&etcd, &["instances", "meshkit.order.v1.OrderService"]).await;
    assert!(only_orders.contains(order.instance_id()) && !only_orders.contains(user.instance_id()), "{only_orders}");

    let (code, out, _) = meshctl(&etcd, &["leases"]).await;
    assert_eq!(code, 0);
    assert!(out.contains(&lease), "{out}");

    // order-service's pool of user-service, by instance id and by address.
    let (code, out, err) = meshctl(&etcd, &["pools", order.instance_id()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("meshkit.user.v1.UserService") && out.contains(user.instance_id()), "{out}");
    assert!(out.contains("ready"), "{out}");
    let admin = order.admin_addr().unwrap().to_string();
    let (code, by_addr, _) = meshctl(&etcd, &["pools", &admin]).await;
    assert_eq!(code, 0);
    assert!(by_addr.contains(user.instance_id()), "{by_addr}");

    let (code, _, err) = meshctl(&etcd, &["pools", "no-such-instance"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no-such-instance"), "{err}");
    let (code, _, err) = meshctl(&etcd, &["frobnicate"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("unknown command") && err.contains("usage"), "{err}");

    user.shutdown().await.unwrap();
    order.shutdown().await.unwrap();
}

/// meshctl checks `config set` against the sections each reference service
/// reads without linking the services: those sections must be the services' own.
#[test]
fn meshctl_checks_each_component_against_the_sections_it_reads() {
    use meshkit_common::config::{Settings, defaults};
    fn sections<C: Settings>() -> std::collections::BTreeSet<String> {
        defaults::<C>().expect("defaults form a table").keys().cloned().collect()
    }
    for (component, own) in [
        ("user", sections::<meshkit_user::Config>()),
        ("order", sections::<meshkit_order::Config>()),
        ("notification", sections::<meshkit_notification::Config>()),
        ("scheduler", sections::<meshkit_scheduler::Config>()),
        ("gateway", sections::<meshkit_gateway::GatewayConfig>()),
    ] {
        assert_eq!(meshkit_meshctl::sections_of(component), Some(own), "{component}");
    }
    assert_eq!(meshkit_meshctl::sections_of("payments"), None, "an unknown component");
}

/// Polls `check` every 50 ms for up to 10 s.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "not within 10 s: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn health_of(addr: std::net::SocketAddr, service: &str) -> i32 {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect_lazy();
    let mut client = HealthClient::new(channel);
    let resp = client.check(HealthCheckRequest { service: service.into() }).await.unwrap();
    resp.into_inner().status
}

/// An operator drains an instance, puts it back and changes its weight from
/// meshctl: the instance rewrites its own registration, callers' pools follow,
/// health says it, and each change is in the audit log.
#[tokio::test]
async fn drain_undrain_and_weight_reach_the_instance_and_its_callers() {
    const USER: &str = "meshkit.user.v1.UserService";
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path(), "user");
    let a = meshkit_user::start(mesh_config(&etcd, &url).into()).await.unwrap();
    let b = meshkit_user::start(mesh_config(&etcd, &url).into()).await.unwrap();
    let order = meshkit_order::start(mesh_config(&etcd, &sqlite_url(dir.path(), "order")).into()).await.unwrap();
    let mut client = etcd.client().await;
    let key = meshkit_common::keys::instance("/meshkit", USER, a.instance_id());
    let pool_has = async |id: &str| {
        let (code, out, err) = meshctl(&etcd, &["pools", order.instance_id()]).await;
        assert_eq!(code, 0, "{err}");
        out.contains(id)
    };
    eventually("order-service's pool has both", async || {
        pool_has(a.instance_id()).await && pool_has(b.instance_id()).await
    })
    .await;

    let (code, out, err) = meshctl(&etcd, &["instances", "drain", a.instance_id()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("{USER}/{}: drained", a.instance_id())), "{out}");
    eventually("the registration is withdrawn", async || {
        client.get(key.as_str(), None).await.unwrap().kvs().is_empty()
    })
    .await;
    eventually("order-service's pool drops it", async || !pool_has(a.instance_id()).await).await;
    assert!(pool_has(b.instance_id()).await);
    eventually("health says NOT_SERVING", async || health_of(a.local_addr(), USER).await == 2).await;
    let (_, listed, _) = meshctl(&etcd, &["instances", USER]).await;
    let line = listed.lines().find(|l| l.contains(a.instance_id())).unwrap_or_default();
    assert!(line.contains("drained"), "a drained instance is still listed, as drained: {listed}");
    // Still up: a direct call is answered.
    let mut direct = meshkit_proto::user::user_service_client::UserServiceClient::new(
        tonic::transport::Channel::from_shared(format!("http://{}", a.local_addr())).unwrap().connect_lazy(),
    );
    let made = direct
        .create_user(meshkit_proto::user::CreateUserRequest {
            name: "Direct".into(),
            email: "direct@example.com".into(),
        })
        .await;
    assert!(made.is_ok(), "a drained instance still answers: {made:?}");
    // Draining again is harmless; undraining puts it back.
    assert_eq!(meshctl(&etcd, &["instances", "drain", a.instance_id()]).await.0, 0);
    let (code, out, err) = meshctl(&etcd, &["instances", "undrain", a.instance_id(), "--service", USER]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("in rotation"), "{out}");
    eventually("order-service's pool has it again", async || pool_has(a.instance_id()).await).await;
    eventually("health says SERVING", async || health_of(a.local_addr(), USER).await == 1).await;

    let weight_of = async |client: &mut etcd_client::Client| {
        let resp = client.get(key.as_str(), None).await.unwrap();
        resp.kvs().first().map(|kv| serde_json::from_slice::<meshkit_common::Instance>(kv.value()).unwrap().weight)
    };
    let (code, _, err) = meshctl(&etcd, &["instances", "weight", a.instance_id(), "300"]).await;
    assert_eq!(code, 0, "{err}");
    eventually("the registration carries weight 300", async || weight_of(&mut client).await == Some(300)).await;
    let (_, listed, _) = meshctl(&etcd, &["instances", USER]).await;
    let line = listed.lines().find(|l| l.contains(a.instance_id())).unwrap_or_default();
    assert!(line.contains(" 300 ") && line.contains("serving"), "{listed}");
    assert_eq!(meshctl(&etcd, &["instances", "weight", a.instance_id(), "default"]).await.0, 0);
    eventually("back to the configured weight", async || weight_of(&mut client).await == Some(100)).await;

    // Bad input: named, nothing written.
    let (code, _, err) = meshctl(&etcd, &["instances", "weight", a.instance_id(), "0"]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("within 1..=10000"), "{err}");
    let (code, _, err) = meshctl(&etcd, &["instances", "drain", "no-such-instance"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no live instance no-such-instance"), "{err}");

    let (code, audit, err) = meshctl(&etcd, &["audit"]).await;
    assert_eq!(code, 0, "{err}");
    let target = format!("{USER}/{}", a.instance_id());
    for action in ["drain", "undrain", "weight"] {
        assert!(
            audit.lines().any(|l| l.contains(&target) && l.split_whitespace().any(|w| w == action)),
            "{action} missing from the audit log: {audit}"
        );
    }
    assert!(audit.contains("(meshctl)"), "who made the change: {audit}");

    // A drain lasts as long as the process: its control key ends with its lease.
    assert_eq!(meshctl(&etcd, &["instances", "drain", a.instance_id()]).await.0, 0);
    let control = meshkit_common::keys::control("/meshkit", USER, a.instance_id());
    a.shutdown().await.unwrap();
    assert!(client.get(control.as_str(), None).await.unwrap().kvs().is_empty(), "the control key went with the lease");
    b.shutdown().await.unwrap();
    order.shutdown().await.unwrap();
}

/// Settings changes are recorded with who made them, kept past etcd's
/// compaction, compared between revisions and rolled back, each checked as
/// `config set` checks; a running process follows a rollback.
#[tokio::test]
async fn config_history_diff_and_rollback_outlive_compaction() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let user = meshkit_user::start(mesh_config(&etcd, &sqlite_url(dir.path(), "user")).into()).await.unwrap();
    let revision_of = |out: &str| -> i64 {
        let at = out.rfind("(revision ").unwrap_or_else(|| panic!("no revision in {out:?}"));
        out[at + 10..].trim_end().trim_end_matches(')').parse().unwrap()
    };
    let set = async |path: &str, value: &str| {
        let (code, out, err) = meshctl(&etcd, &["config", "set", "user", path, value]).await;
        assert_eq!(code, 0, "{err}");
        revision_of(&out)
    };
    let first = set("log.filter", "debug").await;
    let second = set("log.filter", "warn").await;
    let limits = set("server.max_concurrent_streams", "64").await;
    let (code, out, err) = meshctl(&etcd, &["config", "delete", "user", "server.max_concurrent_streams"]).await;
    assert_eq!(code, 0, "{err}");
    let deleted = revision_of(&out);

    // Refused: named, and nothing recorded.
    let (code, _, err) = meshctl(&etcd, &["config", "set", "user", "registry.ttl_secs", "1"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("refused, nothing written") && err.contains("registry.ttl_secs"), "{err}");
    let (code, _, err) = meshctl(&etcd, &["config", "set", "user", "log.filter", "warn"]).await;
    assert_eq!(code, 1, "the same value again is said, not recorded");
    assert!(err.contains("already"), "{err}");

    // Compact everything etcd keeps of the past.
    let mut client = etcd.client().await;
    let now = client.get("/", None).await.unwrap().header().unwrap().revision();
    client.compact(now, None).await.unwrap();

    let (code, history, err) = meshctl(&etcd, &["config", "history", "user", "log.filter"]).await;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = history.lines().skip(1).collect();
    assert_eq!(lines.len(), 2, "{history}");
    assert!(lines[0].starts_with(&format!("{second:>8}")) && lines[0].ends_with("\"warn\""), "{history}");
    assert!(lines[1].starts_with(&format!("{first:>8}")) && lines[1].contains("(meshctl)"), "{history}");
    let (code, _, err) = meshctl(&etcd, &["config", "history", "user", "registry.ttl_secs"]).await;
    assert_eq!(code, 1, "the refused value left no record");
    assert!(err.contains("has no recorded changes"), "{err}");

    let (code, diff, err) = meshctl(&etcd, &["config", "diff", "user", &first.to_string(), &limits.to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(diff.contains("~ log.filter: \"debug\" → \"warn\""), "{diff}");
    assert!(diff.contains("+ server.max_concurrent_streams = 64"), "{diff}");
    assert!(diff.contains("rebuilt from the recorded changes"), "compacted: {diff}");
    let (_, diff, _) = meshctl(&etcd, &["config", "diff", "user", &limits.to_string(), &deleted.to_string()]).await;
    assert!(diff.contains("- server.max_concurrent_streams = 64"), "{diff}");

    let (code, out, err) = meshctl(&etcd, &["config", "rollback", "user", "log.filter", &first.to_string()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("log.filter = \"debug\""), "{out}");
    let (_, history, _) = meshctl(&etcd, &["config", "history", "user", "log.filter"]).await;
    let newest = history.lines().nth(1).unwrap_or_default();
    assert!(newest.contains(&format!("[rollback to {first}]")) && newest.contains("\"debug\""), "{history}");
    // Rolling back to before the setting existed removes it.
    let (code, out, err) =
        meshctl(&etcd, &["config", "rollback", "user", "server.max_concurrent_streams", &(limits - 1).to_string()])
            .await;
    assert_eq!(code, 1, "it is not set now, and was not then: {out}");
    assert!(err.contains("is not set"), "{err}");

    // The running process follows the rolled-back value.
    let admin = user.admin_addr().unwrap();
    let in_force = async || {
        let req = meshkit_integration_tests::http::json_request("GET", admin, "/reports", "");
        let reports = meshkit_integration_tests::http::send(admin, req).await.unwrap().json();
        reports["config"]["entries"].as_array().into_iter().flatten().any(|e| {
            e["path"] == "log.filter" && e["value"] == "\"debug\"" && e["mod_revision"].as_i64() > Some(deleted)
        })
    };
    eventually("user-service applies the rolled-back filter", in_force).await;

    let (_, audit, _) = meshctl(&etcd, &["audit", "--limit", "10"]).await;
    for (action, target) in [
        ("config set", "user/log.filter"),
        ("config delete", "user/server.max_concurrent_streams"),
        ("config rollback", "user/log.filter"),
    ] {
        assert!(audit.lines().any(|l| l.contains(action) && l.contains(target)), "{action} {target}: {audit}");
    }
    user.shutdown().await.unwrap();
}
