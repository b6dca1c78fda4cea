//! One echo server process, for `make bench`'s server comparison: the same
//! handler behind meshkit's server or tonic's alone.
//!
//! - `ECHO_SERVER=mesh`: `MeshServer` with its default layers, as every
//!   meshkit service runs: registration in etcd, gRPC health and
//!   reflection, the RED metrics and trace span of each call, the request's
//!   deadline, the contract's validation rules, authorization and governance
//!   (both off until a rule is set), drain on SIGTERM, the admin endpoint.
//! - `ECHO_SERVER=bare`: `tonic::transport::Server` with the echo service
//!   and nothing else.
//!
//! Both listen on `MESHKIT_SERVER_LISTEN`; the mesh one reads every other
//! `MESHKIT_*` setting as a service does.

use meshkit_common::{MeshConfig, config::ProcessEnv, shutdown::Signals, telemetry};
use meshkit_integration_tests::echo;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let config = MeshConfig::load("echo", &ProcessEnv)?;
    let _telemetry = telemetry::init(&config.log, "echo-server");
    match std::env::var("ECHO_SERVER").as_deref() {
        Ok("bare") => {
            let addr: std::net::SocketAddr = config.server.listen.parse()?;
            tonic::transport::Server::builder()
                .add_service(echo::echo_service("bare"))
                .serve_with_shutdown(addr, signals.recv())
                .await?;
        }
        Ok("mesh") => {
            let server = echo::start_echo(config).await?;
            server.run_until(signals.recv()).await?;
        }
        other => anyhow::bail!("ECHO_SERVER must be `mesh` or `bare`, not {other:?}"),
    }
    Ok(())
}
