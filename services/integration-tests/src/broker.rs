//! Apache Kafka for the tests: one KRaft node (broker and controller) on free
//! loopback ports with its data in a temp dir, run by `deploy/local/kafka.sh`
//! from the jars `deploy/local/install-deps.sh --test` resolved.
//!
//! A test binary shares one broker ([`Broker::shared`]) and gives each test
//! its own topics ([`Broker::topic_prefix`] into `events.topic_prefix`); a
//! test that stops the broker starts its own ([`Broker::start`]).

use std::{
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, bail};
use tempfile::TempDir;
use tokio::sync::OnceCell;

use crate::free_port;

/// One Kafka node. The JVM runs under a small shell that kills it when this
/// process lets go of its stdin: on [`Broker::kill`], on drop, and when the
/// test binary exits without dropping (the shared broker is a static).
pub struct Broker {
    child: Option<(Child, ChildStdin)>,
    dir: PathBuf,
    // Removes the data when dropped; the shared broker's shell removes it instead.
    _temp: Option<TempDir>,
    port: u16,
    controller_port: u16,
}

static SHARED: OnceCell<Broker> = OnceCell::const_new();
static TOPICS: AtomicU32 = AtomicU32::new(0);

/// `deploy/local/kafka.sh` in this checkout.
pub fn kafka_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/local/kafka.sh")
}

impl Broker {
    /// A broker of this test's own, for a test that stops or restarts it.
    pub async fn start() -> anyhow::Result<Self> {
        let temp = tempfile::Builder::new().prefix("meshkit-kafka-").tempdir()?;
        let dir = temp.path().to_path_buf();
        Self::start_in(dir, Some(temp), false).await
    }

    /// The broker every test of this binary shares; started by the first
    /// caller. Give each test its own topics with [`Broker::topic_prefix`].
    pub async fn shared() -> &'static Broker {
        SHARED
            .get_or_init(|| async {
                let temp = tempfile::Builder::new().prefix("meshkit-kafka-").tempdir().expect("a temp dir");
                // The static is never dropped: the shell removes the data when the binary exits.
                let dir = temp.keep();
                Self::start_in(dir, None, true).await.expect("the shared Kafka broker starts")
            })
            .await
    }

    /// A fresh `events.topic_prefix`: topics no other test of this binary uses.
    pub fn topic_prefix() -> String {
        format!("test{}-{}.", std::process::id(), TOPICS.fetch_add(1, Ordering::Relaxed))
    }

    async fn start_in(dir: PathBuf, temp: Option<TempDir>, remove_on_exit: bool) -> anyhow::Result<Self> {
        let mut errors = Vec::new();
        // A port found free can be taken before the JVM binds it: try again on others.
        for attempt in 1..=3 {
            std::fs::create_dir_all(&dir)?;
            let port = free_port();
            let controller_port = std::iter::repeat_with(free_port).find(|p| *p != port).unwrap_or(port + 1);
            let mut broker = Broker { child: None, dir: dir.clone(), _temp: None, port, controller_port };
            match broker.spawn_and_wait(remove_on_exit).await {
                Ok(()) => {
                    broker._temp = temp;
                    return Ok(broker);
                }
                Err(e) => {
                    broker.kill();
                    let _ = std::fs::remove_dir_all(dir.join("data"));
                    errors.push(format!("attempt {attempt} (port {}): {e:#}", broker.port));
                }
            }
        }
        bail!("the broker did not start: {}", errors.join("; "))
    }

    /// `127.0.0.1:PORT`, as `events.brokers` takes it.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops the broker abruptly (SIGKILL to the JVM).
    pub fn kill(&mut self) {
        if let Some((mut child, stdin)) = self.child.take() {
            drop(stdin);
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same ports with the same data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn_and_wait(false).await
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("broker.log")
    }

    async fn spawn_and_wait(&mut self, remove_on_exit: bool) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path())?;
        // `kafka.sh run` execs the JVM, so $! is the JVM. A watcher kills it
        // when our end of the pipe closes; the shell ends when the JVM does,
        // with its status, so a broker that dies is seen at once.
        let shell = r#"
            exec 3<&0
            "$0" run "$1" "$2" "$3" </dev/null 3<&- &
            jvm=$!
            ( read -r _ <&3; kill -KILL "$jvm" 2>/dev/null ) &
            watcher=$!
            exec 3<&-
            wait "$jvm"
            status=$?
            kill "$watcher" 2>/dev/null
            if [ "$4" = remove ]; then rm -rf "$1"; fi
            exit "$status"
        "#;
        let mut child = Command::new("bash")
            .args(["-c", shell])
            .arg(kafka_script())
            .arg(&self.dir)
            .arg(self.port.to_string())
            .arg(self.controller_port.to_string())
            .arg(if remove_on_exit { "remove" } else { "keep" })
            .env("MESHKIT_KAFKA_HEAP", "384m")
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting deploy/local/kafka.sh (deploy/local/install-deps.sh --test installs Kafka)")?;
        let stdin = child.stdin.take().context("the broker shell's stdin")?;
        self.child = Some((child, stdin));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((child, _)) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    bail!("the broker exited with {status}: {}", self.log_tail());
                }
            }
            if self.answers().await {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the broker did not answer within 60 s: {}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Metadata names this broker: it has joined its controller and serves.
    async fn answers(&self) -> bool {
        let ready = rskafka::client::ClientBuilder::new(vec![self.endpoint()]).build();
        let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(2), ready).await else {
            return false;
        };
        tokio::time::timeout(Duration::from_secs(2), client.list_topics()).await.is_ok_and(|r| r.is_ok())
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}
