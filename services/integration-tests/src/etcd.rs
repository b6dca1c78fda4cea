//! A real etcd member for one test.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::free_port;

/// One etcd member on free loopback ports with its data in a temp dir.
/// Killed when dropped.
pub struct Etcd {
    child: Option<Child>,
    dir: TempDir,
    client_port: u16,
    peer_port: u16,
    tls: Option<EtcdTls>,
}

/// TLS for an etcd member: its certificate and key, and the CA client
/// certificates must chain to (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub cert_file: String,
    pub key_file: String,
    pub ca_file: String,
    /// A client certificate the harness itself connects with.
    pub client_cert_file: String,
    pub client_key_file: String,
}

impl Etcd {
    /// Starts etcd and waits until it answers. Elections are tuned short
    /// (heartbeat 50 ms, election 250 ms), so leases as short as 1 s work.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(None).await
    }

    /// Starts etcd serving clients over TLS only, asking for client certificates.
    pub async fn start_tls(tls: EtcdTls) -> anyhow::Result<Self> {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<EtcdTls>) -> anyhow::Result<Self> {
        // A port taken between free_port() and etcd's bind fails the start: retry.
        let mut last_error = None;
        for _ in 0..3 {
            let dir = tempfile::Builder::new().prefix("meshkit-etcd-").tempdir()?;
            let mut etcd =
                Etcd { child: None, dir, client_port: free_port(), peer_port: free_port(), tls: tls.clone() };
            match etcd.spawn_and_wait().await {
                Ok(()) => return Ok(etcd),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    /// `127.0.0.1:PORT`, as `etcd.endpoints` takes it.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// Settings that reach this member (TLS with the harness's client certificate when on).
    pub fn settings(&self) -> meshkit_common::config::EtcdSettings {
        let mut settings =
            meshkit_common::config::EtcdSettings { endpoints: vec![self.endpoint()], ..Default::default() };
        if let Some(tls) = &self.tls {
            settings.ca_file = tls.ca_file.clone();
            settings.cert_file = tls.client_cert_file.clone();
            settings.key_file = tls.client_key_file.clone();
        }
        settings
    }

    /// A client with the same timeouts the services use.
    pub async fn client(&self) -> etcd_client::Client {
        meshkit_common::etcd::connect(&self.settings()).await.expect("connect to the test etcd")
    }

    /// Stops etcd abruptly (SIGKILL), keeping its data for [`restart`](Self::restart).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn_and_wait().await
    }

    async fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut tls_args: Vec<String> = Vec::new();
        if let Some(tls) = &self.tls {
            tls_args = vec![
                "--cert-file".into(),
                tls.cert_file.clone(),
                "--key-file".into(),
                tls.key_file.clone(),
                "--trusted-ca-file".into(),
                tls.ca_file.clone(),
                "--client-cert-auth".into(),
            ];
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("etcd.log"))?;
        let child = Command::new("etcd")
            .args(["--name", "test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("test={peer}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "250"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .args(&tls_args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting etcd (install Debian's etcd-server)")?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
                    bail!("etcd exited with {status}: {}", log.lines().last().unwrap_or(""));
                }
            }
            if let Ok(mut c) = meshkit_common::etcd::connect(&self.settings()).await {
                if c.put("/meshkit-test/ready", "1", None).await.is_ok() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("etcd did not answer within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
