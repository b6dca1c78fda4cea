//! meshkit's reference user-service: creates and looks up users.
//!
//! The binary (`user-service`) only loads settings and calls [`start`]; the
//! handlers, entities and migrations live here so tests run them in-process.
#![forbid(unsafe_code)]

pub mod api;
pub mod config;
pub mod entity;
pub mod migrations;

use meshkit_common::{Mesh, MeshServer, RunningServer, db};
use meshkit_proto::user::user_service_server::UserServiceServer;

pub use api::UserApi;
pub use config::Config;

/// The component name: default database file and migration records.
pub const COMPONENT: &str = "user";

/// Connects the database, applies migrations, serves and registers.
pub async fn start(config: Config) -> meshkit_common::Result<RunningServer> {
    let mesh = Mesh::connect(&config, COMPONENT).await?;
    let config = mesh.config();
    let database = db::connect(&config.database).await?;
    db::migrate(&database, COMPONENT, migrations::MIGRATIONS).await?;
    let pool_metrics = db::metrics_source(&database, COMPONENT);
    MeshServer::new(config)
        .with_mesh(&mesh)
        .metadata("component", COMPONENT)
        .metrics(pool_metrics)
        .add_service(UserServiceServer::new(UserApi::new(database)))
        .start()
        .await
}
