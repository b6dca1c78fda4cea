//! user-service and order-service end to end, order reaching user through
//! the balanced channel, and every validation rule of the contracts.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{collections::HashMap, time::Duration};

use meshkit_common::{ChannelBuilder, server::INSTANCE_HEADER};
use meshkit_integration_tests::{Etcd, create_user, init_logs, mesh_config, sqlite_url};
use meshkit_proto::{
    order::{CreateOrderRequest, GetOrderRequest, OrderItem, order_service_client::OrderServiceClient},
    user::{CreateUserRequest, GetUserRequest, user_service_client::UserServiceClient},
};
use tonic::Code;

const USER: &str = "meshkit.user.v1.UserService";
const ORDER: &str = "meshkit.order.v1.OrderService";

fn item(sku: &str, quantity: i32) -> OrderItem {
    OrderItem { sku: sku.into(), quantity }
}

#[tokio::test]
async fn calls_spread_over_two_instances() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path(), "user");
    let a = meshkit_user::start(mesh_config(&etcd, &url).into()).await.unwrap();
    let b = meshkit_user::start(mesh_config(&etcd, &url).into()).await.unwrap();
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit");
    let mut users = UserServiceClient::new(channels.balanced(USER));
    let created = create_user(&channels.balanced(USER), "Ada", "ada@example.com").await;

    let mut served: HashMap<String, usize> = HashMap::new();
    // Sequential and concurrent calls alike.
    for _ in 0..100 {
        let resp = users.get_user(GetUserRequest { id: created.id.clone() }).await.unwrap();
        let by = resp.metadata().get(INSTANCE_HEADER).unwrap().to_str().unwrap().to_owned();
        *served.entry(by).or_default() += 1;
    }
    let concurrent = futures::future::join_all((0..100).map(|_| {
        let mut users = users.clone();
        let id = created.id.clone();
        async move { users.get_user(GetUserRequest { id }).await }
    }))
    .await;
    for resp in concurrent {
        let resp = resp.unwrap();
        let by = resp.metadata().get(INSTANCE_HEADER).unwrap().to_str().unwrap().to_owned();
        *served.entry(by).or_default() += 1;
    }
    assert_eq!(served.len(), 2, "both instances must serve: {served:?}");
    for (instance, count) in &served {
        assert!(*count >= 20, "{instance} served only {count} of 200: {served:?}");
    }
    assert!(served.contains_key(a.instance_id()) && served.contains_key(b.instance_id()));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn create_order_checks_the_user_through_the_mesh() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let user = meshkit_user::start(mesh_config(&etcd, &sqlite_url(dir.path(), "user")).into()).await.unwrap();
    let order = meshkit_order::start(mesh_config(&etcd, &sqlite_url(dir.path(), "order")).into()).await.unwrap();
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit");
    let mut orders = OrderServiceClient::new(channels.balanced(ORDER));

    let ada = create_user(&channels.balanced(USER), "Ada", "ada@example.com").await;
    assert!(!ada.id.is_empty());
    let placed = orders
        .create_order(CreateOrderRequest { user_id: ada.id.clone(), items: vec![item("book-1", 2)] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(placed.user_id, ada.id);
    assert_eq!(placed.items, vec![item("book-1", 2)]);
    let fetched = orders.get_order(GetOrderRequest { id: placed.id.clone() }).await.unwrap().into_inner();
    assert_eq!(fetched, placed);

    // A well-formed id of nobody.
    let ghost = "01900000-0000-7000-8000-000000000000";
    let err = orders
        .create_order(CreateOrderRequest { user_id: ghost.into(), items: vec![item("book-1", 1)] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains(ghost), "message must name the user: {}", err.message());

    // With no user-service left, order-service says so instead of hanging.
    user.shutdown().await.unwrap();
    let err = tokio::time::timeout(
        Duration::from_secs(5),
        orders.create_order(CreateOrderRequest { user_id: ada.id.clone(), items: vec![item("book-1", 1)] }),
    )
    .await
    .expect("answers promptly")
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("user"), "{}", err.message());
    order.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_validation_rule_names_its_field() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let user = meshkit_user::start(mesh_config(&etcd, &sqlite_url(dir.path(), "user")).into()).await.unwrap();
    let order = meshkit_order::start(mesh_config(&etcd, &sqlite_url(dir.path(), "order")).into()).await.unwrap();
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit");
    let mut users = UserServiceClient::new(channels.balanced(USER));
    let mut orders = OrderServiceClient::new(channels.balanced(ORDER));

    let user_cases = [("", "ada@example.com", "name"), ("Ada", "not-an-email", "email"), ("Ada", "", "email")];
    for (name, email, field) in user_cases {
        let err = users.create_user(CreateUserRequest { name: name.into(), email: email.into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{name:?}/{email:?}");
        assert!(err.message().starts_with(field), "{field}: {}", err.message());
    }
    let ada = create_user(&channels.balanced(USER), "Ada", "ada@example.com").await;
    let dup = users.create_user(CreateUserRequest { name: "Eve".into(), email: "ADA@example.com".into() }).await;
    assert_eq!(dup.unwrap_err().code(), Code::AlreadyExists);

    let order_cases = [
        (ada.id.clone(), vec![], "items"),
        (ada.id.clone(), vec![item("book-1", 0)], "items[0].quantity"),
        (ada.id.clone(), vec![item("book-1", 1), item("book-2", -1)], "items[1].quantity"),
        (ada.id.clone(), vec![item("", 1)], "items[0].sku"),
        (String::new(), vec![item("book-1", 1)], "user_id"),
        ("42".into(), vec![item("book-1", 1)], "user_id"),
    ];
    for (user_id, items, field) in order_cases {
        let err = orders.create_order(CreateOrderRequest { user_id, items }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().starts_with(field), "{field}: {}", err.message());
        // The same violation in the google.rpc.BadRequest detail, with its rule.
        let violations = meshkit_validate::violations_of(&err);
        assert_eq!(violations.first().map(|v| v.field.as_str()), Some(field), "{err:?}");
        assert!(violations.iter().all(|v| !v.rule.is_empty() && !v.message.is_empty()), "{err:?}");
    }
    let err = users.get_user(GetUserRequest { id: "01900000-0000-7000-8000-000000000000".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    user.shutdown().await.unwrap();
    order.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_callers_deadline_bounds_the_calls_made_for_it() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = sqlite_url(dir.path(), "user");
    // Create the user on a prompt instance, then serve reads from a slow one.
    let prompt = meshkit_user::start(mesh_config(&etcd, &url).into()).await.unwrap();
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit");
    let ada = create_user(&channels.balanced(USER), "Ada", "ada@example.com").await;
    let mut slow_config = mesh_config(&etcd, &url);
    slow_config.server.fault_delay_ms = 1_500;
    let slow = meshkit_user::start(slow_config.into()).await.unwrap();
    prompt.shutdown().await.unwrap();
    let order = meshkit_order::start(mesh_config(&etcd, &sqlite_url(dir.path(), "order")).into()).await.unwrap();
    let mut orders = OrderServiceClient::new(channels.balanced(ORDER));

    let mut req = tonic::Request::new(CreateOrderRequest { user_id: ada.id, items: vec![item("book-1", 1)] });
    req.set_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let err = orders.create_order(req).await.unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    assert!(started.elapsed() < Duration::from_millis(900), "took {:?}", started.elapsed());

    // order-service gave up with its caller: one attempt at user-service, no
    // retries after the deadline (its attempt timeout alone would allow three).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let pools = meshkit_common::admin::fetch_pools(&order.admin_addr().unwrap().to_string()).await.unwrap();
    let calls: u64 = pools[USER].endpoints.values().map(|e| e["calls"].as_u64().unwrap()).sum();
    assert_eq!(calls, 1, "order-service made {calls} calls to user-service: {pools:?}");
    slow.shutdown().await.unwrap();
    order.shutdown().await.unwrap();
}

#[tokio::test]
async fn busy_endpoints_get_more_than_one_http2_connection() {
    use meshkit_common::{ChannelConfig, balance::EndpointConfig};
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = mesh_config(&etcd, &sqlite_url(dir.path(), "user"));
    config.server.fault_delay_ms = 200;
    let user = meshkit_user::start(config.into()).await.unwrap();
    let endpoint = EndpointConfig { streams_per_connection: 4, max_connections: 3, ..Default::default() };
    let channels =
        ChannelBuilder::new(etcd.client().await, "/meshkit").with_config(ChannelConfig::default().endpoint(endpoint));
    let channel = channels.balanced(USER);
    let calls = futures::future::join_all((0..12).map(|_| {
        let mut users = UserServiceClient::new(channel.clone());
        async move { users.get_user(GetUserRequest { id: "01900000-0000-7000-8000-000000000000".into() }).await }
    }))
    .await;
    assert!(calls.iter().all(|r| r.as_ref().is_err_and(|s| s.code() == Code::NotFound)), "{calls:?}");
    let snapshot = channel.view().snapshot();
    let connections = snapshot[user.instance_id()].connections;
    assert_eq!(connections, 3, "12 concurrent calls at 4 per connection, capped at 3: {snapshot:?}");
    user.shutdown().await.unwrap();
}
