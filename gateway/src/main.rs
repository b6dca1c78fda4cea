//! meshkit-gateway: settings from `MESHKIT_CONFIG` and `MESHKIT_*` (the
//! `[gateway]` section), then serve until SIGTERM/SIGINT and drain.

use meshkit_common::{
    config::{ProcessEnv, load_process},
    shutdown::Signals,
    telemetry,
};
use meshkit_gateway::GatewayConfig;

/// mimalloc: the proxy path allocates and frees small buffers per request,
/// where it costs markedly less CPU than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The main thread only waits for signals; the workers (one per core by
/// default, `gateway.workers`) serve on their own threads.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let config: GatewayConfig = load_process("gateway", &ProcessEnv)?;
    let telemetry = telemetry::init(&config.log, "meshkit-gateway");
    meshkit_gateway::workers::run(config, signals.recv()).await?;
    telemetry.shutdown();
    Ok(())
}
