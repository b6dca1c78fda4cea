//! meshkit's reference order-service: places orders for existing users.
//!
//! CreateOrder checks the user through a balanced channel to
//! `meshkit.user.v1.UserService` discovered from etcd, never a fixed address.
#![forbid(unsafe_code)]

pub mod api;
pub mod entity;
pub mod migrations;
pub mod validate;

use meshkit_common::{ChannelBuilder, MeshConfig, MeshServer, RunningServer, db, etcd};
use meshkit_proto::{order::order_service_server::OrderServiceServer, user::user_service_client::UserServiceClient};

pub use api::OrderApi;

/// The component name: default database file and migration records.
pub const COMPONENT: &str = "order";

/// The service order-service calls to check users.
pub const USER_SERVICE: &str = "meshkit.user.v1.UserService";

/// Connects the database and etcd, applies migrations, serves and registers.
pub async fn start(config: MeshConfig) -> meshkit_common::Result<RunningServer> {
    let database = db::connect(&config.database).await?;
    db::migrate(&database, COMPONENT, migrations::MIGRATIONS).await?;
    let client = etcd::connect(&config.etcd).await?;
    let channels = ChannelBuilder::new(client.clone(), config.etcd.prefix.clone());
    let users = UserServiceClient::new(channels.balanced(USER_SERVICE));
    MeshServer::new(config)
        .with_etcd(client)
        .with_channels(channels)
        .metadata("component", COMPONENT)
        .add_service(OrderServiceServer::new(OrderApi::new(database, users)))
        .start()
        .await
}
