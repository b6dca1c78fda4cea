//! Apache Kafka for the tests: KRaft nodes (broker and controller each) on
//! free loopback ports with their data in temp dirs, run by
//! `deploy/local/kafka.sh` from the jars `deploy/local/install-deps.sh --test`
//! resolved.
//!
//! A test binary shares one broker ([`Broker::shared`]) and gives each test
//! its own topics ([`Broker::topic_prefix`] into `events.topic_prefix`); a
//! test that stops the broker starts its own ([`Broker::start`]), one that
//! needs TLS or SASL a secured one ([`Broker::start_secured`]), one that
//! loses a leader a cluster ([`KafkaCluster::start`]).

use std::{
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, bail};
use meshkit_common::events::{EventSettings, kafka::broker_tls, kafka::sasl};
use tempfile::TempDir;
use tokio::sync::OnceCell;

use crate::free_port;

/// How a node's client listener is secured, and so what a client needs.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// TLS with `kafka.pem` / `kafka.key` from this directory, issued by its
    /// `ca.pem` (`meshkit_meshctl::certs::issue(dir, …, &["kafka"], …)`).
    pub tls_dir: Option<PathBuf>,
    /// Clients must show a certificate of that CA.
    pub client_auth: bool,
    /// SASL SCRAM-SHA-512 users, created when the node is formatted; the
    /// brokers (and the readiness check) authenticate as the first.
    pub scram_users: Vec<(String, String)>,
}

impl Security {
    /// `events.*` that reach a node secured so, as `user` (its password
    /// from [`Security::scram_users`]); with client auth, as the
    /// certificate `NAME.pem` in the TLS directory, `client_cert` naming it.
    pub fn client(&self, brokers: Vec<String>, user: Option<&str>, client_cert: Option<&str>) -> EventSettings {
        let mut settings = EventSettings { brokers, ..EventSettings::default() };
        if let Some(dir) = &self.tls_dir {
            settings.tls_ca_file = dir.join("ca.pem").display().to_string();
            if let Some(name) = client_cert {
                settings.tls_cert_file = dir.join(format!("{name}.pem")).display().to_string();
                settings.tls_key_file = dir.join(format!("{name}.key")).display().to_string();
            }
        }
        if let Some(user) = user {
            let password = self.scram_users.iter().find(|(u, _)| u == user).map(|(_, p)| p.clone());
            settings.sasl_mechanism = "SCRAM-SHA-512".into();
            settings.sasl_username = user.into();
            settings.sasl_password = password.unwrap_or_default();
        }
        settings
    }

    /// `kafka.sh run`'s environment for this.
    fn env(&self) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if let Some(dir) = &self.tls_dir {
            for (key, file) in [("CA", "ca.pem"), ("CERT", "kafka.pem"), ("KEY", "kafka.key")] {
                env.push((format!("MESHKIT_KAFKA_TLS_{key}"), dir.join(file).display().to_string()));
            }
            let auth = if self.client_auth { "required" } else { "none" };
            env.push(("MESHKIT_KAFKA_CLIENT_AUTH".into(), auth.into()));
        }
        if !self.scram_users.is_empty() {
            let users: Vec<String> = self.scram_users.iter().map(|(u, p)| format!("{u}:{p}")).collect();
            env.push(("MESHKIT_KAFKA_SCRAM_USERS".into(), users.join(",")));
        }
        env
    }
}

/// One Kafka node. The JVM runs under a small shell that kills it when this
/// process lets go of its stdin: on [`Broker::kill`], on drop, and when the
/// test binary exits without dropping (the shared broker is a static).
pub struct Broker {
    child: Option<(Child, ChildStdin)>,
    dir: PathBuf,
    // Removes the data when dropped; the shared broker's shell removes it instead.
    _temp: Option<TempDir>,
    /// The address of its client listener.
    host: std::net::Ipv4Addr,
    port: u16,
    controller_port: u16,
    /// `kafka.sh run`'s environment beyond the ports: security, cluster membership.
    env: Vec<(String, String)>,
    /// What the readiness check connects with.
    client: EventSettings,
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
        Self::start_secured(Security::default()).await
    }

    /// A broker of this test's own whose client listener is secured so.
    pub async fn start_secured(security: Security) -> anyhow::Result<Self> {
        let temp = tempfile::Builder::new().prefix("meshkit-kafka-").tempdir()?;
        let dir = temp.path().to_path_buf();
        Self::start_in(dir, Some(temp), false, security, std::net::Ipv4Addr::LOCALHOST).await
    }

    /// A broker of this test's own whose clients reach it on `host` (an
    /// address of this machine's, such as a test network's bridge) instead
    /// of loopback.
    pub async fn start_on(host: std::net::Ipv4Addr) -> anyhow::Result<Self> {
        let temp = tempfile::Builder::new().prefix("meshkit-kafka-").tempdir()?;
        let dir = temp.path().to_path_buf();
        Self::start_in(dir, Some(temp), false, Security::default(), host).await
    }

    /// The broker every test of this binary shares; started by the first
    /// caller. Give each test its own topics with [`Broker::topic_prefix`].
    pub async fn shared() -> &'static Broker {
        SHARED
            .get_or_init(|| async {
                let temp = tempfile::Builder::new().prefix("meshkit-kafka-").tempdir().expect("a temp dir");
                // The static is never dropped: the shell removes the data when the binary exits.
                let dir = temp.keep();
                Self::start_in(dir, None, true, Security::default(), std::net::Ipv4Addr::LOCALHOST)
                    .await
                    .expect("the shared Kafka broker starts")
            })
            .await
    }

    /// A fresh `events.topic_prefix`: topics no other test of this binary uses.
    pub fn topic_prefix() -> String {
        format!("test{}-{}.", std::process::id(), TOPICS.fetch_add(1, Ordering::Relaxed))
    }

    async fn start_in(
        dir: PathBuf,
        temp: Option<TempDir>,
        remove_on_exit: bool,
        security: Security,
        host: std::net::Ipv4Addr,
    ) -> anyhow::Result<Self> {
        let mut errors = Vec::new();
        // A port found free can be taken before the JVM binds it: try again on others.
        for attempt in 1..=3 {
            std::fs::create_dir_all(&dir)?;
            let [port, controller_port] = distinct_ports();
            let readiness_user = security.scram_users.first().map(|(u, _)| u.as_str());
            let cert = security.client_auth.then_some("kafka");
            let client = security.client(vec![format!("{host}:{port}")], readiness_user, cert);
            let mut env = security.env();
            if !host.is_loopback() {
                env.push((
                    "MESHKIT_KAFKA_PROPERTIES".into(),
                    format!(
                        "listeners=CLIENT://{host}:{port},CONTROLLER://127.0.0.1:{controller_port}\n\
                         advertised.listeners=CLIENT://{host}:{port}"
                    ),
                ));
            }
            let mut broker =
                Broker { child: None, dir: dir.clone(), _temp: None, host, port, controller_port, env, client };
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

    /// `127.0.0.1:PORT` (or its host's address), as `events.brokers` takes it.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host, self.port)
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

    /// Whether its JVM runs (it may not answer yet).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// The directory of its data, logs and `admin.properties`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("broker.log")
    }

    async fn spawn_and_wait(&mut self, remove_on_exit: bool) -> anyhow::Result<()> {
        self.spawn(remove_on_exit)?;
        self.wait_ready().await
    }

    fn spawn(&mut self, remove_on_exit: bool) -> anyhow::Result<()> {
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
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting deploy/local/kafka.sh (deploy/local/install-deps.sh --test installs Kafka)")?;
        let stdin = child.stdin.take().context("the broker shell's stdin")?;
        self.child = Some((child, stdin));
        Ok(())
    }

    /// Until it answers, within 60 s; fails at once if it exits.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
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
        let mut builder = rskafka::client::ClientBuilder::new(vec![self.endpoint()]);
        match broker_tls(&self.client) {
            Ok(Some(tls)) => builder = builder.tls_config(tls),
            Ok(None) => {}
            Err(_) => return false,
        }
        if let Some(sasl) = sasl(&self.client) {
            builder = builder.sasl_config(sasl);
        }
        let ready = builder.build();
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

/// Whether a meshkit client with `settings` gets in within 3 s: connects
/// (TLS, SASL) and finds or creates `topic`.
pub async fn kafka_admits(settings: &EventSettings, topic: &str) -> bool {
    let settings = EventSettings { request_timeout_ms: 3_000, ..settings.clone() };
    meshkit_common::events::Kafka::new(settings, "probe").ensure_topic(topic).await.is_ok()
}

/// Two loopback ports free now, not the same.
fn distinct_ports<const N: usize>() -> [u16; N] {
    let mut ports = [0u16; N];
    for i in 0..N {
        ports[i] = std::iter::repeat_with(free_port).find(|p| !ports[..i].contains(p)).unwrap_or_default();
    }
    ports
}

/// Several KRaft nodes, each broker and controller, in one cluster: the
/// controller quorum is all of them, so it survives losing one.
pub struct KafkaCluster {
    nodes: Vec<Broker>,
    _temp: TempDir,
}

impl KafkaCluster {
    /// `n` nodes (at most 8); `properties` are more `server.properties`
    /// lines for each (replication, `min.insync.replicas`).
    pub async fn start(n: usize, properties: &str) -> anyhow::Result<Self> {
        anyhow::ensure!((1..=8).contains(&n), "a test cluster has 1 to 8 nodes, not {n}");
        let temp = tempfile::Builder::new().prefix("meshkit-kafka-cluster-").tempdir()?;
        let mut errors = Vec::new();
        // A port found free can be taken before a JVM binds it: try again on others.
        for attempt in 1..=3 {
            let flat: [u16; 16] = distinct_ports();
            let ports: Vec<(u16, u16)> = flat.chunks(2).take(n).map(|c| (c[0], c[1])).collect();
            let voters: Vec<String> =
                ports.iter().enumerate().map(|(i, (_, ctrl))| format!("{}@127.0.0.1:{ctrl}", i + 1)).collect();
            let cluster_id = cluster_id()?;
            let mut nodes = Vec::new();
            for (i, &(port, controller_port)) in ports.iter().enumerate() {
                let dir = temp.path().join(format!("attempt{attempt}-node{}", i + 1));
                std::fs::create_dir_all(&dir)?;
                let env = vec![
                    ("MESHKIT_KAFKA_NODE_ID".into(), (i + 1).to_string()),
                    ("MESHKIT_KAFKA_VOTERS".into(), voters.join(",")),
                    ("MESHKIT_KAFKA_CLUSTER_ID".into(), cluster_id.clone()),
                    ("MESHKIT_KAFKA_PROPERTIES".into(), properties.to_owned()),
                ];
                let client = EventSettings { brokers: vec![format!("127.0.0.1:{port}")], ..EventSettings::default() };
                nodes.push(Broker {
                    child: None,
                    dir,
                    _temp: None,
                    host: std::net::Ipv4Addr::LOCALHOST,
                    port,
                    controller_port,
                    env,
                    client,
                });
            }
            match start_together(&mut nodes).await {
                Ok(()) => return Ok(KafkaCluster { nodes, _temp: temp }),
                Err(e) => errors.push(format!("attempt {attempt}: {e:#}")),
            }
        }
        bail!("the cluster did not start: {}", errors.join("; "))
    }

    /// Every node's `127.0.0.1:PORT`, as `events.brokers` takes them.
    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(Broker::endpoint).collect()
    }

    /// Node `id` (1-based, as Kafka numbers them).
    pub fn node(&mut self, id: i32) -> &mut Broker {
        let n = self.nodes.len();
        let index = usize::try_from(id - 1).ok().filter(|i| *i < n);
        &mut self.nodes[index.unwrap_or_else(|| panic!("no node {id} in a cluster of {n}"))]
    }

    /// Stops every node abruptly.
    pub fn kill_all(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }

    /// Starts every stopped node again, together: one alone has no quorum.
    pub async fn restart_stopped(&mut self) -> anyhow::Result<()> {
        let mut stopped: Vec<&mut Broker> = self.nodes.iter_mut().filter(|n| !n.running()).collect();
        for node in &mut stopped {
            node.spawn(false)?;
        }
        for node in stopped {
            node.wait_ready().await?;
        }
        Ok(())
    }

    /// Kafka's own `kafka-topics --describe` of `topic`: a line per
    /// partition with its leader, replicas, ISR and eligible leaders.
    pub async fn describe(&self, topic: &str) -> anyhow::Result<String> {
        let live: Vec<String> = self.nodes.iter().filter(|n| n.running()).map(Broker::endpoint).collect();
        let described = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new(kafka_script())
                .args(["topics", "--bootstrap-server", &live.join(","), "--describe", "--topic", topic])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .context("kafka-topics --describe: timed out")??;
        anyhow::ensure!(
            described.status.success(),
            "kafka-topics --describe: {}",
            String::from_utf8_lossy(&described.stderr)
        );
        Ok(String::from_utf8_lossy(&described.stdout).into_owned())
    }

    /// The leader of each partition of `topic` that has one, by node id
    /// (rskafka keeps leaders to itself).
    pub async fn leaders(&self, topic: &str) -> anyhow::Result<std::collections::BTreeMap<i32, i32>> {
        let out = self.describe(topic).await?;
        // "Topic: t	Partition: 0	Leader: 2	Replicas: 2,3,1	Isr: 2,3,1	Elr: 	LastKnownElr: "
        let field = |line: &str, name: &str| -> Option<i32> {
            let rest = &line[line.find(name)? + name.len()..];
            rest.split_whitespace().next()?.parse().ok()
        };
        Ok(out.lines().filter_map(|line| Some((field(line, "Partition:")?, field(line, "Leader:")?))).collect())
    }
}

/// Spawns every node, then waits for each: they need each other's votes.
async fn start_together(nodes: &mut [Broker]) -> anyhow::Result<()> {
    let mut result = Ok(());
    for node in nodes.iter_mut() {
        if let Err(e) = node.spawn(false) {
            result = Err(e);
        }
    }
    if result.is_ok() {
        for node in nodes.iter_mut() {
            if let Err(e) = node.wait_ready().await {
                result = Err(e.context(format!("node at {}", node.endpoint())));
                break;
            }
        }
    }
    if result.is_err() {
        for node in nodes.iter_mut() {
            node.kill();
        }
    }
    result
}

/// A Kafka cluster id: 16 random bytes, base64url without padding.
fn cluster_id() -> anyhow::Result<String> {
    use base64::Engine;
    use std::io::Read;
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Every record of `topic` on the broker at `endpoint`, partition by partition.
pub async fn records(endpoint: &str, topic: &str) -> Vec<rskafka::record::Record> {
    use rskafka::client::partition::UnknownTopicHandling;
    let client = rskafka::client::ClientBuilder::new(vec![endpoint.to_owned()]).build().await.expect("a Kafka client");
    let topics = client.list_topics().await.expect("the broker lists its topics");
    let Some(t) = topics.into_iter().find(|t| t.name == topic) else { return vec![] };
    let mut out = Vec::new();
    for partition in t.partitions {
        let pc =
            client.partition_client(topic, partition, UnknownTopicHandling::Retry).await.expect("a partition client");
        let (records, _) = pc.fetch_records(0, 1..10_000_000, 100).await.expect("the partition's records");
        out.extend(records.into_iter().map(|r| r.record));
    }
    out
}
