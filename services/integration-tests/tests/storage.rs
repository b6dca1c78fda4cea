//! The repositories behave the same on SQLite and on a real PostgreSQL.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use meshkit_common::ChannelBuilder;
use meshkit_integration_tests::{Etcd, Postgres, init_logs, mesh_config, sqlite_url};
use meshkit_proto::{
    order::{CreateOrderRequest, ListOrdersRequest, OrderItem, OrderStatus, order_service_client::OrderServiceClient},
    user::{CreateUserRequest, ListUsersRequest, user_service_client::UserServiceClient},
};
use tonic::Code;

/// Creates users and orders, pages through them and checks every rule the
/// storage enforces. Runs twice: SQLite and PostgreSQL.
async fn scenario(etcd: &Etcd, user_url: &str, order_url: &str) {
    let user = meshkit_user::start(mesh_config(etcd, user_url).into()).await.unwrap();
    let order = meshkit_order::start(mesh_config(etcd, order_url).into()).await.unwrap();
    // A second start applies no migration twice and still serves.
    let user2 = meshkit_user::start(mesh_config(etcd, user_url).into()).await.unwrap();
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit");
    let mut users = UserServiceClient::new(channels.balanced("meshkit.user.v1.UserService"));
    let mut orders = OrderServiceClient::new(channels.balanced("meshkit.order.v1.OrderService"));

    let mut ids = Vec::new();
    for i in 0..5 {
        let u = users
            .create_user(CreateUserRequest { name: format!("User {i}"), email: format!("u{i}@example.com") })
            .await
            .unwrap()
            .into_inner();
        assert!(u.create_time.is_some());
        ids.push(u.id);
    }
    let dup = users.create_user(CreateUserRequest { name: "X".into(), email: "U1@example.com".into() }).await;
    let dup = dup.unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);
    assert!(dup.message().contains("email"), "{}", dup.message());

    // Pages of 2: 2 + 2 + 1, in creation order, no repeats.
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = users.list_users(ListUsersRequest { page_size: 2, page_token: token }).await.unwrap().into_inner();
        pages += 1;
        assert!(page.users.len() <= 2);
        seen.extend(page.users.into_iter().map(|u| u.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);
    let bad = users.list_users(ListUsersRequest { page_size: -1, page_token: String::new() }).await.unwrap_err();
    assert!(bad.message().starts_with("page_size"), "{}", bad.message());
    let bad = users.list_users(ListUsersRequest { page_size: 1, page_token: "garbage".into() }).await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().starts_with("page_token"), "{}", bad.message());

    let mut placed = Vec::new();
    for n in 1..=3 {
        let o = orders
            .create_order(CreateOrderRequest {
                user_id: ids[0].clone(),
                items: vec![
                    OrderItem { sku: "book-1".into(), quantity: n },
                    OrderItem { sku: "pen".into(), quantity: 1 },
                ],
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(o.status, OrderStatus::Pending as i32);
        placed.push(o);
    }
    let first = orders
        .list_orders(ListOrdersRequest { user_id: ids[0].clone(), page_size: 2, page_token: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.orders, placed[..2]);
    let rest = orders
        .list_orders(ListOrdersRequest { user_id: ids[0].clone(), page_size: 2, page_token: first.next_page_token })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.orders, placed[2..]);
    assert!(rest.next_page_token.is_empty());
    let none = orders
        .list_orders(ListOrdersRequest { user_id: ids[1].clone(), page_size: 0, page_token: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert!(none.orders.is_empty());

    user.shutdown().await.unwrap();
    user2.shutdown().await.unwrap();
    order.shutdown().await.unwrap();
}

#[tokio::test]
async fn repositories_on_sqlite() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    scenario(&etcd, &sqlite_url(dir.path(), "user"), &sqlite_url(dir.path(), "order")).await;
}

#[tokio::test]
async fn repositories_on_postgres() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let pg = Postgres::start().unwrap();
    scenario(&etcd, &pg.url(), &pg.url()).await;
}

#[tokio::test]
async fn instances_starting_together_on_a_fresh_postgres_migrate_once() {
    init_logs();
    let pg = Postgres::start().unwrap();
    let settings = meshkit_common::db::DatabaseSettings { url: pg.url(), ..Default::default() };
    // Four instances of two components at once, as a deployment starts them.
    let runs = (0..4).map(|i| {
        let settings = settings.clone();
        tokio::spawn(async move {
            let db = meshkit_common::db::connect(&settings).await.unwrap();
            let (component, migrations) = if i % 2 == 0 {
                ("user", meshkit_user::migrations::MIGRATIONS)
            } else {
                ("order", meshkit_order::migrations::MIGRATIONS)
            };
            meshkit_common::db::migrate(&db, component, migrations).await
        })
    });
    let applied: Vec<usize> = futures::future::join_all(runs).await.into_iter().map(|r| r.unwrap().unwrap()).collect();
    // Each component's migrations applied by exactly one of its two instances.
    let user: usize = applied.iter().step_by(2).sum();
    let order: usize = applied.iter().skip(1).step_by(2).sum();
    assert_eq!(user, meshkit_user::migrations::MIGRATIONS.len(), "{applied:?}");
    assert_eq!(order, meshkit_order::migrations::MIGRATIONS.len(), "{applied:?}");
}
