//! The harness for tests that span meshkit services: real etcd (Debian's
//! `etcd-server`), Apache Kafka and real PostgreSQL, each started on free loopback ports in
//! a temp dir and stopped when dropped; service processes and in-process
//! services wired to them.
#![forbid(unsafe_code)]

pub mod broker;
pub mod browser;
pub mod cluster;
pub mod echo;
pub mod etcd;
pub mod fleet;
pub mod h2raw;
pub mod http;
pub mod interop;
pub mod jobs;
pub mod load;
pub mod netns;
pub mod otlp;
pub mod postgres;
pub mod process;
pub mod prometheus;
pub mod proxy;
pub mod spring;
pub mod xds;

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    time::Duration,
};

use meshkit_common::{
    MeshConfig,
    config::{DatabaseSettings, EventSettings},
};
use meshkit_gateway::GatewaySettings;
use meshkit_scheduler::SchedulerSettings;
use serde::{Deserialize, Serialize};

pub use broker::{Broker, KafkaCluster, Security as BrokerSecurity, kafka_admits};
pub use etcd::{Etcd, EtcdCluster, EtcdTls};
pub use load::{LoadGen, Tally};
pub use postgres::Postgres;
pub use process::ServiceProcess;
pub use proxy::TcpProxy;

/// A port nothing listens on right now.
/// A test tool `deploy/local/install-deps.sh --test` builds from the Go
/// module proxy (`tools/NAME`), in `target/tools/NAME`.
pub fn tool(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let bin = target.join("tools").join(name);
    assert!(bin.is_file(), "{} is missing: deploy/local/install-deps.sh --test builds it", bin.display());
    bin
}

/// TLS on, from the files `meshkit_meshctl::certs::issue` wrote in `dir`
/// for `name` (`NAME.pem`, `NAME.key`, `ca.pem`).
pub fn tls_files(dir: &Path, name: &str) -> meshkit_common::config::TlsSettings {
    meshkit_common::config::TlsSettings {
        enabled: true,
        cert_file: dir.join(format!("{name}.pem")).display().to_string(),
        key_file: dir.join(format!("{name}.key")).display().to_string(),
        ca_file: dir.join("ca.pem").display().to_string(),
        ..Default::default()
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the loopback interface accepts a bind to port 0")
}

/// Every section the reference services read, so one test's settings start
/// any of them: `meshkit_user::start(config.into())`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TestConfig {
    #[serde(flatten)]
    pub mesh: MeshConfig,
    pub database: DatabaseSettings,
    pub events: EventSettings,
    pub gateway: GatewaySettings,
    pub scheduler: SchedulerSettings,
}

meshkit_common::compose_settings!(TestConfig { database, events, gateway, scheduler });

impl From<TestConfig> for meshkit_user::Config {
    fn from(c: TestConfig) -> Self {
        Self { mesh: c.mesh, database: c.database }
    }
}

impl From<TestConfig> for meshkit_order::Config {
    fn from(c: TestConfig) -> Self {
        Self { mesh: c.mesh, database: c.database, events: c.events }
    }
}

impl From<TestConfig> for meshkit_notification::Config {
    fn from(c: TestConfig) -> Self {
        Self { mesh: c.mesh, database: c.database, events: c.events }
    }
}

impl From<TestConfig> for meshkit_scheduler::Config {
    fn from(c: TestConfig) -> Self {
        Self { mesh: c.mesh, database: c.database, scheduler: c.scheduler }
    }
}

impl From<TestConfig> for meshkit_gateway::GatewayConfig {
    fn from(c: TestConfig) -> Self {
        Self { mesh: c.mesh, gateway: c.gateway }
    }
}

/// Settings for an in-process service: this etcd, this database, a free
/// port, a short TTL so lease tests run fast, and a short drain delay.
pub fn mesh_config(etcd: &Etcd, database_url: &str) -> TestConfig {
    let mut config = TestConfig::default();
    config.etcd.endpoints = vec![etcd.endpoint()];
    config.registry.ttl_secs = 2;
    config.server.drain_delay_ms = 100;
    config.server.drain_timeout_ms = 5_000;
    config.database.url = database_url.to_owned();
    // No broker unless a test starts one: never a broker a local cluster runs.
    config.events.brokers = vec![format!("127.0.0.1:{}", free_port())];
    config
}

/// `sqlite://DIR/NAME.db?mode=rwc`.
pub fn sqlite_url(dir: &Path, name: &str) -> String {
    format!("sqlite://{}?mode=rwc", dir.join(format!("{name}.db")).display())
}

/// The directory cargo put the workspace binaries in (`target/debug`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("own executable path");
    let dir = exe.parent().expect("an executable lives in a directory");
    // Tests run from target/<profile>/deps, binaries from target/<profile>.
    if dir.ends_with("deps") { dir.parent().unwrap_or(dir).to_path_buf() } else { dir.to_path_buf() }
}

/// The classpath of the Java test clients (`services/integration-tests/clients/java`),
/// as the Maven build (`mvn -f common/java/pom.xml package`) left it.
pub fn java_clients_classpath() -> anyhow::Result<String> {
    maven_classpath("clients/java/target", "meshkit-java-clients-0.1.0.jar", "the Java clients are")
}

/// A Maven module's jar and its runtime classpath (`target/classpath`, which
/// the module's dependency plugin writes), `target` relative to this crate.
pub(crate) fn maven_classpath(target: &str, jar: &str, what: &str) -> anyhow::Result<String> {
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join(target);
    let jar = target.join(jar);
    let deps = std::fs::read_to_string(target.join("classpath"))
        .ok()
        .filter(|_| jar.is_file())
        .ok_or_else(|| anyhow::anyhow!("{what} not built: deploy/local/install-deps.sh --test builds it with Maven"))?;
    Ok(format!("{}:{}", jar.display(), deps.trim()))
}

/// Creates a user through `users` (a balanced channel to user-service),
/// failing the test if that fails.
pub async fn create_user(
    users: &meshkit_common::BalancedChannel,
    name: &str,
    email: &str,
) -> meshkit_proto::user::User {
    let mut client = meshkit_proto::user::user_service_client::UserServiceClient::new(users.clone());
    let request = meshkit_proto::user::CreateUserRequest { name: name.into(), email: email.into() };
    match client.create_user(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => panic!("creating user {email}: {status:?}"),
    }
}

/// Logs for tests: `RUST_LOG=debug cargo test` shows them.
pub fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 20 ms until it returns `Some`, or panics naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the workspace's `meshctl` against `etcd` (as a child process, so the
/// runtime serving in-process admin endpoints is not blocked): exit code,
/// stdout, stderr.
pub async fn meshctl(etcd: &Etcd, args: &[&str]) -> (i32, String, String) {
    meshctl_at(&etcd.endpoint(), args).await
}

/// [`meshctl`] against `endpoints` (comma-separated, as `--etcd` takes them).
pub async fn meshctl_at(endpoints: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(bin_dir().join("meshctl"))
        .arg("--etcd")
        .arg(endpoints)
        .args(args)
        .output()
        .await
        .expect("meshctl runs: cargo build --workspace --bins first");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
