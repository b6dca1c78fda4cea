//! xds-server: settings from `MESHKIT_CONFIG` and `MESHKIT_*`, then serve the
//! registry over ADS until SIGTERM/SIGINT, and drain.

use meshkit_common::{
    MeshConfig,
    config::{ProcessEnv, load_process},
    shutdown::Signals,
    telemetry,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let config: MeshConfig = load_process(meshkit_xds::COMPONENT, &ProcessEnv)?;
    let telemetry = telemetry::init(&config.log, "xds-server");
    let server = meshkit_xds::start(config).await?;
    server.run_until(signals.recv()).await?;
    telemetry.shutdown();
    Ok(())
}
