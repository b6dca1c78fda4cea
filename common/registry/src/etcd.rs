//! Connecting to etcd with the timeouts every meshkit process wants.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::{
    error::{Error, Result},
    settings::EtcdSettings,
};

/// Connects to the configured endpoints. Every unary request carries a
/// timeout, so a stopped or frozen etcd fails a call instead of hanging it;
/// HTTP/2 keepalives notice a dead connection under an idle watch.
///
/// With `etcd.ca_file` the endpoints are `https://` and etcd's certificate is
/// checked against that CA (plus a client certificate when one is set); with
/// `etcd.username` the client authenticates (etcd auth enabled). A refusal
/// names the problem; the password is never in an error or a log.
pub async fn connect(settings: &EtcdSettings) -> Result<Client> {
    let tls = !settings.ca_file.is_empty();
    let scheme = if tls { "https" } else { "http" };
    let endpoints: Vec<String> = settings
        .endpoints
        .iter()
        .map(|e| if e.contains("://") { e.clone() } else { format!("{scheme}://{e}") })
        .collect();
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .with_timeout(Duration::from_millis(settings.request_timeout_ms))
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if !settings.username.is_empty() {
        options = options.with_user(settings.username.clone(), settings.password.clone());
    }
    if tls {
        let read = |setting: &'static str, path: &str| {
            std::fs::read(path).map_err(|source| Error::ReadFile { setting, path: path.to_owned(), source })
        };
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read("etcd.ca_file", &settings.ca_file)?));
        if !settings.cert_file.is_empty() {
            tls = tls.identity(etcd_client::Identity::from_pem(
                read("etcd.cert_file", &settings.cert_file)?,
                read("etcd.key_file", &settings.key_file)?,
            ));
        }
        options = options.with_tls(tls);
    }
    Ok(Client::connect(endpoints, Some(options)).await?)
}
