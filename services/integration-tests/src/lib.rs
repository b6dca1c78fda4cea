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

/// A loopback port nothing listens on, for a server a test starts next.
///
/// It comes from outside the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`), so between this call and the server's
/// bind neither an outgoing connection nor another process's bind to port 0
/// (a service `cluster.sh` starts, say) can take it. A port from a bind to 0
/// could be taken that way, and once was. Each call in a process returns a
/// different port.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `n` consecutive free loopback ports, for a program that
/// places its listeners from one base port (`cluster.sh`'s three etcd members
/// take the base and the five above it).
pub fn free_ports(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

    let (low, high) = outside_ephemeral();
    let span = u32::from(high - low) + 1;
    assert!(span > u32::from(n) * 64, "no room for test ports outside the ephemeral range");
    // Start at a point of the range that differs between processes.
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos())
        ^ std::process::id().wrapping_mul(2_654_435_761);
    let _ = NEXT.compare_exchange(u32::MAX, seed % span, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span / u32::from(n) {
        let offset = NEXT.fetch_add(u32::from(n), Ordering::Relaxed) % span;
        if offset + u32::from(n) > span {
            continue;
        }
        let base = low + offset as u16;
        if (base..base + n).all(|port| TcpListener::bind(("127.0.0.1", port)).is_ok()) {
            return base;
        }
    }
    panic!("no {n} free consecutive loopback ports in {low}..={high}");
}

/// The ports tests take their listeners from: below the ephemeral range,
/// from 10000, or above it when the range starts too low to leave room.
fn outside_ephemeral() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let mut bounds = range.split_whitespace().filter_map(|b| b.parse::<u16>().ok());
    let (first, last) = (bounds.next().unwrap_or(32768), bounds.next().unwrap_or(60999));
    if first > 12_000 {
        (10_000, first - 1)
    } else {
        assert!(last < 63_000, "the ephemeral range {first}-{last} leaves no room for test ports");
        (last + 1, 65_535)
    }
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

#[cfg(test)]
mod port_tests {
    use super::*;

    #[test]
    fn free_ports_lie_outside_the_ephemeral_range_and_differ_per_call() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let bounds: Vec<u16> = range.split_whitespace().map(|b| b.parse().unwrap()).collect();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let port = free_port();
            assert!(!(bounds[0]..=bounds[1]).contains(&port), "{port} is in the ephemeral range {range}");
            assert!(seen.insert(port), "{port} was handed out twice");
        }
        let base = free_ports(6);
        assert!((base..base + 6).all(|p| !seen.contains(&p) && TcpListener::bind(("127.0.0.1", p)).is_ok()));
    }
}
