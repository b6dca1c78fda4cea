//! meshkit's reference notification-service: turns `OrderCreated` events on
//! the `order-events` topic into notifications and serves them.
//!
//! Its instances share the topic's partitions through etcd; each stores a
//! notification and the consumed offset in one transaction, so a crash
//! replays without applying twice (see `meshkit_common::events::consumer`).
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod entity;
pub mod handler;
pub mod migrations;

use std::sync::Arc;

use meshkit_common::{
    Mesh, MeshServer, RunningServer, db,
    events::{Consumer, ConsumerSpec, Kafka, consumer},
};
use meshkit_proto::notification::notification_service_server::NotificationServiceServer;

pub use api::NotificationApi;
pub use config::Config;

/// The component name: default database file and migration records.
pub const COMPONENT: &str = "notification";

/// The topic consumed, and the consumer group its instances form.
pub use meshkit_proto::events::topics::ORDER_EVENTS;
pub const GROUP: &str = "notification";

/// Connects the database and etcd, applies migrations, serves, registers and
/// starts consuming (in the background: it waits for the broker if need be).
pub async fn start(config: Config) -> meshkit_common::Result<RunningServer> {
    let mesh = Mesh::connect(&config, COMPONENT).await?;
    let config = mesh.config();
    let instance = config.registry.instance_id.clone();
    let database = db::connect(&config.database).await?;
    db::migrate(&database, COMPONENT, migrations::MIGRATIONS).await?;
    db::migrate(&database, consumer::COMPONENT, consumer::MIGRATIONS).await?;
    let client = mesh.etcd.clone();
    let kafka = Kafka::new(config.events.clone(), format!("notification-service-{instance}"));
    let spec = ConsumerSpec {
        group: GROUP.into(),
        topic: config.events.topic(ORDER_EVENTS),
        member: instance.clone(),
        prefix: config.etcd.prefix.clone(),
        ttl_secs: config.registry.ttl_secs,
    };
    let handler = Arc::new(handler::OrderCreatedHandler { consumer: instance });
    let consumer = Consumer::spawn(client.clone(), database.clone(), kafka, spec, handler);
    let stats = consumer.stats();
    let consumer_metrics = stats.metrics_source(GROUP);
    let pool_metrics = db::metrics_source(&database, COMPONENT);
    MeshServer::new(config)
        .with_mesh(&mesh)
        .metadata("component", COMPONENT)
        .add_service(NotificationServiceServer::new(NotificationApi::new(database)))
        .report("consumer", move || serde_json::to_value(stats.snapshot()).unwrap_or_default())
        .metrics(consumer_metrics)
        .metrics(pool_metrics)
        .on_shutdown(consumer.close())
        .start()
        .await
}
