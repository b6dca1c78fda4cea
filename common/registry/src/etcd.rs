//! Connecting to etcd with the timeouts every meshkit process wants, over
//! every member, failing over between them ([`failover`]).

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::{
    error::{Error, Result},
    settings::EtcdSettings,
};

mod failover;

/// Connects to the configured endpoints. Every unary request carries a
/// timeout, so a stopped or frozen etcd fails a call instead of hanging it;
/// HTTP/2 keepalives notice a dead connection under an idle watch. Calls go
/// only to members that answer, and pass over one that has lost its leader
/// ([`failover`]); every request asks for a leader, so a member cut off from
/// the quorum refuses at once instead of serving stale reads.
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
    Ok(Client::connect_with_balanced_channel(endpoints, Some(options), failover::Failover).await?)
}

/// How long a process that is starting waits for etcd to serve it again
/// (a leader election, a member restarting) before it gives up.
pub const START_PATIENCE: Duration = Duration::from_secs(10);

/// What a process does with etcd on its way up: it tries again while etcd is
/// unavailable, for up to [`START_PATIENCE`], so that one started during a
/// leader election comes up once there is a leader instead of exiting.
///
/// ```ignore
/// let mut patience = Patience::starting();
/// let value = loop {
///     match op().await {
///         Err(e) if patience.again("reading", &e).await => continue,
///         result => break result?,
///     }
/// };
/// ```
pub struct Patience {
    deadline: tokio::time::Instant,
    backoff: meshkit_base::Backoff,
}

impl Patience {
    pub fn starting() -> Self {
        Self {
            deadline: tokio::time::Instant::now() + START_PATIENCE,
            backoff: meshkit_base::Backoff::new(Duration::from_millis(50), Duration::from_millis(500)),
        }
    }

    /// Whether to try again after `error`: true (after a pause) for an outage
    /// before the deadline, false for anything else.
    pub async fn again(&mut self, what: &str, error: &Error) -> bool {
        let Error::Etcd(e) = error else { return false };
        let Some(reason) = unavailable(e) else { return false };
        if tokio::time::Instant::now() >= self.deadline {
            return false;
        }
        tracing::info!(what, reason, error = %e, "etcd is unavailable, trying again");
        tokio::time::sleep(self.backoff.next_delay()).await;
        true
    }
}

/// When `error` means etcd could not serve the call (no leader, no member
/// answering, a timeout), why, in an operator's words; `None` for a refusal
/// etcd decided on (a bad request, a permission).
pub fn unavailable(error: &etcd_client::Error) -> Option<&'static str> {
    match error {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => Some("no member could be reached"),
        etcd_client::Error::GRpcStatus(status) => match status.code() {
            tonic::Code::Unavailable if status.message().contains("no leader") => {
                Some("the cluster has no leader: it has lost its quorum, or an election is under way")
            }
            tonic::Code::Unavailable => Some("no member could be reached"),
            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => Some("no member answered in time"),
            tonic::Code::Unknown if status.message().contains("connect") || status.message().contains("transport") => {
                Some("no member could be reached")
            }
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_told_apart_from_refusals() {
        let status = |code, message: &str| etcd_client::Error::GRpcStatus(tonic::Status::new(code, message));
        assert_eq!(
            unavailable(&status(tonic::Code::Unavailable, "etcdserver: no leader")),
            Some("the cluster has no leader: it has lost its quorum, or an election is under way")
        );
        assert_eq!(
            unavailable(&status(tonic::Code::DeadlineExceeded, "timeout expired")),
            Some("no member answered in time")
        );
        assert_eq!(unavailable(&status(tonic::Code::PermissionDenied, "etcdserver: permission denied")), None);
        assert_eq!(unavailable(&status(tonic::Code::InvalidArgument, "etcdserver: key is not provided")), None);
    }
}
