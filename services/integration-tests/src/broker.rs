//! A real Kafka-protocol broker (Tansu) for one test.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use tempfile::TempDir;

use crate::free_port;

/// Where the broker keeps its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// Lost when the broker stops.
    Memory,
    /// A SQLite file in the temp dir: survives [`Broker::restart`].
    Sqlite,
}

/// One Tansu broker on a free loopback port with its data in a temp dir.
/// Killed when dropped.
pub struct Broker {
    child: Option<Child>,
    dir: TempDir,
    port: u16,
    storage: Storage,
}

/// The `tansu` binary: on PATH, or where `cargo install` puts it.
pub fn tansu_bin() -> PathBuf {
    if let Some(path) =
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join("tansu")).find(|f| f.is_file()))
    {
        return path;
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_default();
    home.join("bin").join("tansu")
}

impl Broker {
    /// Starts the broker and waits until it answers Kafka requests.
    pub async fn start(storage: Storage) -> anyhow::Result<Self> {
        let mut last_error = None;
        for _ in 0..3 {
            let dir = tempfile::Builder::new().prefix("meshkit-broker-").tempdir()?;
            let mut broker = Broker { child: None, dir, port: free_port(), storage };
            match broker.spawn_and_wait().await {
                Ok(()) => return Ok(broker),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("the broker did not start")))
    }

    /// `127.0.0.1:PORT`, as `events.brokers` takes it.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker abruptly (SIGKILL).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port (and, with SQLite, the same data).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn_and_wait().await
    }

    async fn spawn_and_wait(&mut self) -> anyhow::Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let engine = match self.storage {
            Storage::Memory => "memory://tansu/".to_owned(),
            // Tansu resolves the path against its working directory.
            Storage::Sqlite => "sqlite://broker.db".to_owned(),
        };
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("broker.log"))?;
        let child = Command::new(tansu_bin())
            .arg("broker")
            .args(["--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", &engine])
            .current_dir(self.dir.path())
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("SCHEMA_REGISTRY")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting tansu (deploy/local/install-deps.sh --test installs it)")?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default();
                    bail!("tansu exited with {status}: {}", log.lines().last().unwrap_or(""));
                }
            }
            let ready = rskafka::client::ClientBuilder::new(vec![self.endpoint()]).build();
            if let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(1), ready).await {
                if tokio::time::timeout(Duration::from_secs(1), client.list_topics()).await.is_ok_and(|r| r.is_ok()) {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the broker did not answer within 20 s");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}
