//! order-service: settings from `MESHKIT_CONFIG` and `MESHKIT_*`, then serve
//! until SIGTERM/SIGINT and drain.

use meshkit_common::{MeshConfig, config::ProcessEnv, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = MeshConfig::load(meshkit_order::COMPONENT, &ProcessEnv)?;
    telemetry::init(&config.log);
    let server = meshkit_order::start(config).await?;
    server.run_until_signal().await?;
    Ok(())
}
