//! `/metrics` beyond RED: the registry session, the database pool, the
//! outbox and its relay, the consumer's lag per partition, retries and the
//! gateway's rejections, read after a real order flow.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{collections::HashMap, time::Duration};

use meshkit_common::{ChannelBuilder, admin::http_get};
use meshkit_integration_tests::TestConfig;
use meshkit_integration_tests::{
    Broker, Etcd, create_user, eventually, fleet,
    http::{json_request, send},
    init_logs, mesh_config,
    prometheus::parse,
    sqlite_url,
};
use meshkit_proto::order::{CreateOrderRequest, OrderItem, order_service_client::OrderServiceClient};

async fn scrape(admin: std::net::SocketAddr) -> HashMap<String, f64> {
    parse(&http_get(&admin.to_string(), "/metrics").await.unwrap())
}

/// The sum of every series of `name` whose labels contain all of `having`.
fn sum(m: &HashMap<String, f64>, name: &str, having: &[&str]) -> Option<f64> {
    let found: Vec<f64> = m
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{name}{{")) || k.as_str() == name)
        .filter(|(k, _)| having.iter().all(|h| k.contains(h)))
        .map(|(_, v)| *v)
        .collect();
    (!found.is_empty()).then(|| found.iter().sum())
}

#[tokio::test]
async fn components_report_their_state_after_an_order_flow() {
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
    let user = meshkit_user::start(config("user").into()).await.unwrap();
    let order = meshkit_order::start(config("order").into()).await.unwrap();
    let notification = meshkit_notification::start(config("notification").into()).await.unwrap();
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit");
    let ada = create_user(&channels.balanced("meshkit.user.v1.UserService"), "Ada", "ada@example.com").await;
    let mut orders = OrderServiceClient::new(channels.balanced("meshkit.order.v1.OrderService"));
    for i in 0..5 {
        let item = OrderItem { sku: format!("c-{i}"), quantity: 1 };
        orders.create_order(CreateOrderRequest { user_id: ada.id.clone(), items: vec![item] }).await.unwrap();
    }

    // order-service: everything published, by the one relay, nothing waiting.
    let order_admin = order.admin_addr().unwrap();
    let m = eventually("the relay published all five", Duration::from_secs(15), || async {
        let m = scrape(order_admin).await;
        let done = sum(&m, "meshkit_outbox_published_total", &[]) == Some(5.0)
            && sum(&m, "meshkit_outbox_backlog", &[]) == Some(0.0);
        done.then_some(m)
    })
    .await;
    assert_eq!(sum(&m, "meshkit_outbox_oldest_unsent_age_seconds", &[]), Some(0.0));
    assert_eq!(sum(&m, "meshkit_outbox_relay_leading", &[]), Some(1.0));
    assert_eq!(sum(&m, "meshkit_outbox_publish_failures_total", &[]), Some(0.0));
    let lag = sum(&m, "meshkit_outbox_relay_lag_seconds", &[]).unwrap();
    assert!(lag > 0.0 && lag < 5.0, "relay lag {lag}");
    // The database pool: open connections within the maximum.
    let max = sum(&m, "meshkit_db_pool_max_connections", &["component=\"order\""]).unwrap();
    let open = sum(&m, "meshkit_db_pool_connections", &["component=\"order\""]).unwrap();
    assert!(max >= 1.0 && open >= 1.0 && open <= max, "open {open} of {max}");
    // The channel to user-service counts its retries (none were needed).
    assert_eq!(
        sum(&m, "meshkit_client_retries_total", &["meshkit.user.v1.UserService", "outcome=\"retried\""]),
        Some(0.0)
    );

    // notification-service: five applied across its partitions, no lag left.
    let notification_admin = notification.admin_addr().unwrap();
    let m = eventually("the consumer applied all five", Duration::from_secs(15), || async {
        let m = scrape(notification_admin).await;
        (sum(&m, "meshkit_consumer_events_total", &["outcome=\"applied\""]) == Some(5.0)).then_some(m)
    })
    .await;
    assert_eq!(sum(&m, "meshkit_consumer_events_total", &["outcome=\"duplicate\""]), Some(0.0));
    let partitions = m.keys().filter(|k| k.starts_with("meshkit_consumer_lag{")).count();
    assert!(partitions >= 1, "one lag series per owned partition");
    assert_eq!(sum(&m, "meshkit_consumer_lag", &["group=\"notification\"", "topic=\"order-events\""]), Some(0.0));
    assert!(sum(&m, "meshkit_db_pool_connections", &["component=\"notification\""]).is_some());

    // user-service: registered; a lease revoked from outside is counted
    // once the instance has registered again.
    let user_admin = user.admin_addr().unwrap();
    let instance = format!("instance_id=\"{}\"", user.instance_id());
    let m = scrape(user_admin).await;
    assert_eq!(sum(&m, "meshkit_registry_session_up", &[&instance]), Some(1.0));
    assert_eq!(sum(&m, "meshkit_registry_reregistrations_total", &[&instance]), Some(0.0));
    let lease = user.registry().unwrap().lease_id().unwrap();
    etcd.client().await.lease_revoke(lease).await.unwrap();
    eventually("the re-registration is counted", Duration::from_secs(10), || async {
        let m = scrape(user_admin).await;
        (sum(&m, "meshkit_registry_reregistrations_total", &[&instance]) == Some(1.0)
            && sum(&m, "meshkit_registry_session_up", &[&instance]) == Some(1.0))
        .then_some(())
    })
    .await;

    // The gateway: requests over its rate limit are refused and counted.
    let mut gateway_config = mesh_config(&etcd, "sqlite::memory:");
    gateway_config.gateway.listen = "127.0.0.1:0".into();
    gateway_config.gateway.rate_limit_per_sec = 1;
    gateway_config.gateway.rate_limit_burst = 2;
    let gateway = meshkit_gateway::start(gateway_config.into()).await.unwrap();
    let addr = gateway.local_addr();
    let mut refused = 0;
    for _ in 0..5 {
        let reply = send(addr, json_request("GET", addr, &format!("/v1/users/{}", ada.id), "")).await.unwrap();
        refused += u32::from(reply.status == 429);
    }
    assert!(refused >= 2, "{refused} of 5 refused");
    let m = scrape(gateway.admin_addr().unwrap()).await;
    assert_eq!(sum(&m, "meshkit_gateway_rejections_total", &["reason=\"rate_limited\""]), Some(f64::from(refused)));
    assert!(sum(&m, "meshkit_client_requests_total", &["UserService/GetUser", "code=\"OK\""]).unwrap() >= 1.0);
    // It starts from the shared server builder: registered with its
    // component and admin endpoint, whose reports show the config center
    // and governance, and whose metrics its registry session, as every
    // process's do.
    let client = etcd.client().await;
    let ids = fleet::registered(&client, meshkit_gateway::server::GATEWAY_SERVICE).await;
    assert_eq!(ids.len(), 1, "{ids:?}");
    let instance = fleet::instance(&client, meshkit_gateway::server::GATEWAY_SERVICE, &ids[0]).await;
    let admin = gateway.admin_addr().unwrap();
    assert_eq!(instance.addr, addr.to_string());
    assert_eq!(instance.metadata.get("component").map(String::as_str), Some("gateway"));
    assert_eq!(instance.metadata.get("admin"), Some(&admin.to_string()));
    let reports: serde_json::Value =
        serde_json::from_str(&http_get(&admin.to_string(), "/reports").await.unwrap()).unwrap();
    assert!(reports["config"]["applied_revision"].as_i64().is_some(), "{reports}");
    assert!(reports["governance"].is_object(), "{reports}");
    assert_eq!(sum(&m, "meshkit_registry_session_up", &[&ids[0]]), Some(1.0));

    gateway.shutdown().await;
    assert!(fleet::registered(&client, meshkit_gateway::server::GATEWAY_SERVICE).await.is_empty(), "deregistered");
    for server in [notification, order, user] {
        server.shutdown().await.unwrap();
    }
}
