//! Connecting to etcd with the timeouts every meshkit process wants.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::{config::EtcdSettings, error::Result};

/// Connects to the configured endpoints. Every unary request carries a
/// timeout, so a stopped or frozen etcd fails a call instead of hanging it;
/// HTTP/2 keepalives notice a dead connection under an idle watch.
pub async fn connect(settings: &EtcdSettings) -> Result<Client> {
    let endpoints: Vec<String> =
        settings.endpoints.iter().map(|e| if e.contains("://") { e.clone() } else { format!("http://{e}") }).collect();
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .with_timeout(Duration::from_millis(settings.request_timeout_ms))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    Ok(Client::connect(endpoints, Some(options)).await?)
}
