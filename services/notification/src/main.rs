//! notification-service: settings from `MESHKIT_CONFIG` and `MESHKIT_*`, then
//! serve and consume until SIGTERM/SIGINT, and drain.

use meshkit_common::{
    config::{ProcessEnv, load_process},
    shutdown::Signals,
    telemetry,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // First, so a SIGTERM during start-up still drains and revokes.
    let signals = Signals::install()?;
    let config: meshkit_notification::Config = load_process(meshkit_notification::COMPONENT, &ProcessEnv)?;
    let telemetry = telemetry::init(&config.log, "notification-service");
    let server = meshkit_notification::start(config).await?;
    server.run_until(signals.recv()).await?;
    telemetry.shutdown();
    Ok(())
}
