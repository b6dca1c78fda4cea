//! `/metrics` on the admin port: RED per method on the server and the client
//! side, and the pool's endpoints, in the Prometheus text format. Alone in
//! its test binary, so the process's counters hold this test's calls only.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use meshkit_common::{ChannelBuilder, admin::http_get};
use meshkit_integration_tests::{Etcd, create_user, init_logs, mesh_config, prometheus::parse, sqlite_url};
use meshkit_proto::order::{CreateOrderRequest, OrderItem, order_service_client::OrderServiceClient};
use meshkit_proto::user::{GetUserRequest, user_service_client::UserServiceClient};

#[tokio::test]
async fn metrics_count_every_call_on_both_sides() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let users: Vec<_> = futures::future::join_all(
        (0..2).map(|_| meshkit_user::start(mesh_config(&etcd, &sqlite_url(dir.path(), "user")).into())),
    )
    .await
    .into_iter()
    .map(Result::unwrap)
    .collect();
    let order = meshkit_order::start(mesh_config(&etcd, &sqlite_url(dir.path(), "order")).into()).await.unwrap();
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit");
    let user = create_user(&channels.balanced("meshkit.user.v1.UserService"), "M", "m@example.com").await;
    let mut orders = OrderServiceClient::new(channels.balanced("meshkit.order.v1.OrderService"));
    for i in 0..10 {
        let item = OrderItem { sku: format!("m-{i}"), quantity: 1 };
        orders.create_order(CreateOrderRequest { user_id: user.id.clone(), items: vec![item] }).await.unwrap();
    }
    let mut users_client = UserServiceClient::new(channels.balanced("meshkit.user.v1.UserService"));
    for _ in 0..3 {
        let missing = GetUserRequest { id: "0190c3a4-0000-7000-8000-000000000000".into() };
        assert_eq!(users_client.get_user(missing).await.unwrap_err().code(), tonic::Code::NotFound);
    }

    let text = http_get(&order.admin_addr().unwrap().to_string(), "/metrics").await.unwrap();
    let m = parse(&text);
    let get = |series: &str| *m.get(series).unwrap_or_else(|| panic!("{series} missing from\n{text}"));
    const CREATE: &str = "/meshkit.order.v1.OrderService/CreateOrder";
    const GET_USER: &str = "/meshkit.user.v1.UserService/GetUser";
    const USER: &str = "meshkit.user.v1.UserService";
    // Server side: every CreateOrder, and the three NOT_FOUNDs the user instances answered.
    assert_eq!(get(&format!("meshkit_server_requests_total{{method=\"{CREATE}\",code=\"OK\"}}")), 10.0);
    assert_eq!(get(&format!("meshkit_server_requests_total{{method=\"{GET_USER}\",code=\"NOT_FOUND\"}}")), 3.0);
    assert_eq!(get(&format!("meshkit_server_request_duration_seconds_count{{method=\"{CREATE}\"}}")), 10.0);
    // Client side: order-service's user checks and this test's own calls, by code.
    assert!(
        get(&format!("meshkit_client_requests_total{{service=\"{USER}\",method=\"{GET_USER}\",code=\"OK\"}}")) >= 10.0
    );
    assert_eq!(
        get(&format!("meshkit_client_requests_total{{service=\"{USER}\",method=\"{GET_USER}\",code=\"NOT_FOUND\"}}")),
        3.0
    );
    // Buckets are cumulative and end at the count.
    let mut last = 0.0;
    for le in [
        "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5",
        "5", "10", "+Inf",
    ] {
        let v = get(&format!("meshkit_server_request_duration_seconds_bucket{{method=\"{CREATE}\",le=\"{le}\"}}"));
        assert!(v >= last, "bucket {le} went down");
        last = v;
    }
    assert_eq!(last, 10.0);
    assert!(get(&format!("meshkit_server_request_duration_seconds_sum{{method=\"{CREATE}\"}}")) > 0.0);
    // The pool order-service keeps to user-service: both endpoints up.
    let up: Vec<f64> = m
        .iter()
        .filter(|(k, _)| k.starts_with("meshkit_pool_endpoint_up{") && k.contains(USER))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(up, vec![1.0; 2], "{text}");
    order.shutdown().await.unwrap();
    for u in users {
        u.shutdown().await.unwrap();
    }
}
