//! meshkit-gateway: settings from `MESHKIT_CONFIG` and `MESHKIT_*` (the
//! `[gateway]` section), then serve until SIGTERM/SIGINT and drain.

use meshkit_common::{MeshConfig, config::ProcessEnv, shutdown::Signals, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let config = MeshConfig::load("gateway", &ProcessEnv)?;
    telemetry::init(&config.log);
    let gateway = meshkit_gateway::start(config).await?;
    gateway.run_until(signals.recv()).await;
    Ok(())
}
