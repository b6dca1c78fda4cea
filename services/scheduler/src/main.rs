//! scheduler-service: settings from `MESHKIT_CONFIG` and `MESHKIT_*`, jobs
//! from the config center; serves until SIGTERM/SIGINT, then hands the
//! leadership over and drains.

use meshkit_common::{
    config::{ProcessEnv, load_process},
    shutdown::Signals,
    telemetry,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let config: meshkit_scheduler::Config = load_process(meshkit_scheduler::COMPONENT, &ProcessEnv)?;
    let telemetry = telemetry::init(&config.log, "scheduler-service");
    let server = meshkit_scheduler::start(config).await?;
    server.run_until(signals.recv()).await?;
    telemetry.shutdown();
    Ok(())
}
