//! deploy/prometheus and deploy/grafana against a real Prometheus: the
//! targets `meshctl prometheus-sd --watch` writes from the registry are every
//! process's admin endpoint (and follow a new instance), each is scraped, and
//! every query of the Grafana dashboard returns data after an order flow.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use meshkit_common::RunningServer;
use meshkit_integration_tests::TestConfig;
use meshkit_integration_tests::{
    Broker, Etcd, bin_dir, eventually,
    http::{json_request, send},
    init_logs, mesh_config,
    prometheus::Prometheus,
    sqlite_url,
};

fn deploy(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy").join(path)
}

/// `component` label → how many targets Prometheus reports up.
async fn targets_up(prometheus: &Prometheus) -> BTreeMap<String, usize> {
    let data = prometheus.api("targets?state=active").await.unwrap();
    let mut up = BTreeMap::new();
    for target in data["activeTargets"].as_array().unwrap() {
        if target["health"] == "up" {
            let component = target["labels"]["component"].as_str().unwrap_or_default().to_owned();
            *up.entry(component).or_default() += 1;
        }
    }
    up
}

#[tokio::test]
async fn prometheus_finds_every_process_and_the_dashboard_queries_return_data() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let broker = Broker::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = |db: &str| {
        let mut c: TestConfig = mesh_config(&etcd, &sqlite_url(dir.path(), db));
        c.events.brokers = vec![broker.endpoint()];
        c.events.relay_poll_ms = 20;
        c.events.fetch_max_wait_ms = 50;
        c
    };
    let mut servers: Vec<RunningServer> = vec![
        meshkit_user::start(config("user").into()).await.unwrap(),
        meshkit_order::start(config("order").into()).await.unwrap(),
        meshkit_notification::start(config("notification").into()).await.unwrap(),
    ];
    let mut gateway_config = mesh_config(&etcd, "sqlite::memory:");
    gateway_config.gateway.listen = "127.0.0.1:0".into();
    gateway_config.gateway.rate_limit_per_sec = 20;
    gateway_config.gateway.rate_limit_burst = 20;
    let gateway = meshkit_gateway::start(gateway_config.into()).await.unwrap();

    // The shipped configuration, scraping every second for the test.
    let prometheus_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(prometheus_dir.join("sd")).unwrap();
    let shipped = std::fs::read_to_string(deploy("prometheus/prometheus.yml")).unwrap();
    assert!(shipped.contains("scrape_interval: 5s") && shipped.contains("refresh_interval: 5s"));
    let fast = shipped
        .replace("scrape_interval: 5s", "scrape_interval: 1s")
        .replace("refresh_interval: 5s", "refresh_interval: 1s");
    std::fs::write(prometheus_dir.join("prometheus.yml"), fast).unwrap();
    let targets = prometheus_dir.join("sd/targets.json");
    let mut sd = tokio::process::Command::new(bin_dir().join("meshctl"))
        .args(["--etcd", &etcd.endpoint(), "prometheus-sd", "--watch", "--out"])
        .arg(&targets)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    eventually("meshctl writes the targets", Duration::from_secs(10), || async { targets.exists().then_some(()) })
        .await;
    let prometheus =
        Prometheus::start(&prometheus_dir.join("prometheus.yml"), &prometheus_dir.join("data")).await.unwrap();

    let expected = BTreeMap::from([
        ("gateway".to_owned(), 1),
        ("notification".to_owned(), 1),
        ("order".to_owned(), 1),
        ("user".to_owned(), 1),
    ]);
    eventually("every process is scraped", Duration::from_secs(20), || async {
        (targets_up(&prometheus).await == expected).then_some(())
    })
    .await;

    // A new instance becomes a target without touching any file by hand.
    servers.push(meshkit_user::start(config("user").into()).await.unwrap());
    eventually("the new instance is scraped", Duration::from_secs(20), || async {
        (targets_up(&prometheus).await.get("user") == Some(&2)).then_some(())
    })
    .await;

    // Traffic through the gateway: users, orders (events), a 404, and a
    // burst over the gateway's rate limit.
    let addr = gateway.local_addr();
    let user = send(addr, json_request("POST", addr, "/v1/users", r#"{"name":"P","email":"p@example.com"}"#))
        .await
        .unwrap()
        .json();
    let user_id = user["id"].as_str().unwrap().to_owned();
    for i in 0..5 {
        let body = format!(r#"{{"userId":"{user_id}","items":[{{"sku":"p-{i}","quantity":1}}]}}"#);
        let reply = send(addr, json_request("POST", addr, "/v1/orders", &body)).await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let missing = send(addr, json_request("GET", addr, "/v1/users/0193f0f6-0000-7000-8000-000000000000", "")).await;
    assert_eq!(missing.unwrap().status, 404);
    // A governance rule from the config center: ListUsers at 1/s on user-service.
    let mut etcd_client = etcd.client().await;
    let rule = r#"{"/meshkit.user.v1.UserService/ListUsers":{"qps":1,"burst":1}}"#;
    etcd_client.put("/meshkit/config/user/governance.methods", rule, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut limited = 0;
    for _ in 0..40 {
        limited += u32::from(send(addr, json_request("GET", addr, "/v1/users", "")).await.unwrap().status == 429);
    }
    assert!(limited > 0, "the burst went over the limits");

    // Every query of the dashboard is valid PromQL over series that exist.
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/meshkit-dashboard.json")).unwrap()).unwrap();
    let mut queries = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert!(ids.insert(panel["id"].as_i64().unwrap()), "panel ids are unique");
        assert!(panel["gridPos"]["w"].as_i64().is_some(), "{panel}");
        for target in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(target["datasource"]["uid"], "prometheus", "the provisioned datasource");
            let expr = target["expr"].as_str().unwrap().replace("$__rate_interval", "30s");
            queries.push((panel["title"].as_str().unwrap().to_owned(), expr));
        }
    }
    assert!(queries.len() >= 20, "{} queries", queries.len());
    let datasources = std::fs::read_to_string(deploy("grafana/datasources.yml")).unwrap();
    assert!(datasources.contains("uid: prometheus"));
    let empty = eventually("every dashboard query has data", Duration::from_secs(30), || async {
        let mut empty = Vec::new();
        for (title, expr) in &queries {
            match prometheus.query(expr).await {
                Ok(result) if !result.is_empty() => {}
                Ok(_) => empty.push(format!("{title}: no data for {expr}")),
                Err(e) => panic!("{title}: {expr} is not valid: {e:#}"),
            }
        }
        empty.is_empty().then_some(empty)
    })
    .await;
    assert!(empty.is_empty());

    // The values behind a few panels match what happened.
    let published = prometheus.query("sum(meshkit_outbox_published_total)").await.unwrap();
    assert_eq!(published[0]["value"][1], "5");
    // (Process-wide counters: every in-process admin endpoint reports the same.)
    let gateway_refused =
        prometheus.query("max(meshkit_gateway_rejections_total{reason=\"rate_limited\"})").await.unwrap();
    let governance_refused =
        prometheus.query("max(meshkit_governance_rejections_total{side=\"server\",rule=\"qps\"})").await.unwrap();
    let count =
        |v: &[serde_json::Value]| v.first().map_or(0, |r| r["value"][1].as_str().unwrap().parse::<u32>().unwrap());
    assert_eq!(
        count(&gateway_refused) + count(&governance_refused),
        limited,
        "every 429 is counted where it was refused"
    );
    assert!(count(&governance_refused) > 0, "user-service refused some by its rule");
    let sessions = prometheus.query("sum(meshkit_registry_session_up)").await.unwrap();
    assert_eq!(sessions[0]["value"][1], "5", "four service instances and the gateway are registered");

    let _ = sd.kill().await;
    gateway.shutdown().await;
    for server in servers {
        server.shutdown().await.unwrap();
    }
}
