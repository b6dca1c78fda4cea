//! One echo server process, for `make bench`'s server and peers
//! comparisons: the same handler behind meshkit's server or tonic's alone.
//!
//! - `ECHO_SERVER=mesh`: `MeshServer` with its default layers, as every
//!   meshkit service runs: registration in etcd, gRPC health and
//!   reflection, the RED metrics and trace span of each call, the request's
//!   deadline, the contract's validation rules, authorization and governance
//!   (both off until a rule is set), drain on SIGTERM, the admin endpoint.
//! - `ECHO_SERVER=bare`: `tonic::transport::Server` with the echo service
//!   and nothing else.
//!
//! A sick instance, for the peers phase: `ECHO_DELAY_MS` adds that much to
//! every Echo call; `ECHO_FAIL_EVERY=n` fails every nth one UNAVAILABLE.
//!
//! Both listen on `MESHKIT_SERVER_LISTEN`; the mesh one reads every other
//! `MESHKIT_*` setting as a service does.

use meshkit_common::{MeshConfig, config::ProcessEnv, shutdown::Signals, telemetry};
use meshkit_integration_tests::echo;

fn env_number(name: &str) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) => v.parse().map_err(|e| anyhow::anyhow!("{name}={v:?}: {e}")),
        Err(_) => Ok(0),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let config = MeshConfig::load("echo", &ProcessEnv)?;
    let _telemetry = telemetry::init(&config.log, "echo-server");
    let faults = echo::Faults::sick(
        std::time::Duration::from_millis(env_number("ECHO_DELAY_MS")?),
        env_number("ECHO_FAIL_EVERY")?,
    );
    match std::env::var("ECHO_SERVER").as_deref() {
        Ok("bare") => {
            let addr: std::net::SocketAddr = config.server.listen.parse()?;
            tonic::transport::Server::builder()
                .add_service(echo::echo_service("bare", faults))
                .serve_with_shutdown(addr, signals.recv())
                .await?;
        }
        Ok("mesh") => {
            let server = echo::start_echo_with(config, faults).await?;
            server.run_until(signals.recv()).await?;
        }
        other => anyhow::bail!("ECHO_SERVER must be `mesh` or `bare`, not {other:?}"),
    }
    Ok(())
}
