//! console: settings from `MESHKIT_CONFIG` and `MESHKIT_*` (the `console`
//! section: `MESHKIT_CONSOLE_ADMIN_PASSWORD`, …), then serve until
//! SIGTERM/SIGINT.

use meshkit_common::{
    config::{ProcessEnv, load_process},
    shutdown::Signals,
    telemetry,
};
use meshkit_console::ConsoleConfig;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let config: ConsoleConfig = load_process(meshkit_console::COMPONENT, &ProcessEnv)?;
    let telemetry = telemetry::init(&config.mesh.log, "console");
    let console = meshkit_console::start(config).await?;
    tracing::info!(url = console.url(), "console ready");
    console.run_until(signals.recv()).await;
    telemetry.shutdown();
    Ok(())
}
