//! meshkit-gateway: settings from `MESHKIT_CONFIG` and `MESHKIT_*` (the
//! `[gateway]` section), then serve until SIGTERM/SIGINT and drain.

use meshkit_common::{MeshConfig, config::ProcessEnv, shutdown::Signals, telemetry};

/// mimalloc: the proxy path allocates and frees small buffers per request,
/// where it costs markedly less CPU than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The main thread only waits for signals; the workers (one per core by
/// default, `gateway.workers`) serve on their own threads.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let config = MeshConfig::load("gateway", &ProcessEnv)?;
    let telemetry = telemetry::init(&config.log, "meshkit-gateway");
    meshkit_gateway::workers::run(config, signals.recv()).await?;
    telemetry.shutdown();
    Ok(())
}
