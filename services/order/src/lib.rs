//! meshkit's reference order-service: places orders for existing users.
//!
//! CreateOrder checks the user through a balanced channel to
//! `meshkit.user.v1.UserService` discovered from etcd, never a fixed address,
//! and writes the order and its `OrderCreated` event in one transaction; the
//! outbox relay publishes the event to the `order-events` topic.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod entity;
pub mod jobs;
pub mod migrations;

use meshkit_common::{
    Mesh, MeshServer, RunningServer, db,
    events::{Kafka, Relay, outbox},
};
use meshkit_proto::{order::order_service_server::OrderServiceServer, user::user_service_client::UserServiceClient};

pub use api::OrderApi;
pub use config::Config;

/// The component name: default database file and migration records.
pub const COMPONENT: &str = "order";

/// The service order-service calls to check users.
pub const USER_SERVICE: &str = meshkit_proto::user::user_service_server::SERVICE_NAME;

/// Connects the database and etcd, applies migrations, serves and registers.
pub async fn start(config: Config) -> meshkit_common::Result<RunningServer> {
    let mesh = Mesh::connect(&config, COMPONENT).await?;
    let config = mesh.config();
    let database = db::connect(&config.database).await?;
    db::migrate(&database, COMPONENT, migrations::MIGRATIONS).await?;
    db::migrate(&database, outbox::COMPONENT, outbox::MIGRATIONS).await?;
    let client = mesh.etcd.clone();
    let users = UserServiceClient::new(mesh.channels.balanced(USER_SERVICE));

    // One relay per service publishes the outbox; the instances elect it.
    let instance = config.registry.instance_id.clone();
    let kafka = Kafka::new(config.events.clone(), format!("order-service-{instance}"));
    let relay = outbox::RelayHandle::spawn(
        client.clone(),
        Relay::new(database.clone(), kafka),
        &config.etcd.prefix,
        COMPONENT,
        &instance,
        config.registry.ttl_secs,
    );
    let relay_stats = relay.reporter();
    let relay_metrics = relay.metrics_source();
    let pool_metrics = db::metrics_source(&database, COMPONENT);
    let executor = {
        let db = database.clone();
        meshkit_common::jobs::Executor::new(mesh.etcd.clone(), &config.etcd.prefix)
            .handler_fn(jobs::CANCEL_UNPAID, move |ctx| jobs::cancel_unpaid(db.clone(), ctx))
    };
    let api =
        OrderApi::new(database, users, Some(relay.relay().clone())).with_topic(config.events.topic(api::ORDER_EVENTS));
    MeshServer::new(config)
        .with_mesh(&mesh)
        .metadata("component", COMPONENT)
        .add_service(OrderServiceServer::new(api))
        .add_service(executor.into_service())
        .report("outbox_relay", move || serde_json::to_value(relay_stats()).unwrap_or_default())
        .metrics(relay_metrics)
        .metrics(pool_metrics)
        .on_shutdown(relay.close())
        .start()
        .await
}
