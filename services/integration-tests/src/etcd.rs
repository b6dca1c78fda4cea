//! Real etcd for one test: one member of Debian's etcd (3.4), or a cluster
//! of the version the deploy files ship (`target/tools/etcd`).

use std::{
    path::PathBuf,
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
    /// The network namespace it runs in, on that host's address; loopback when None.
    host: Option<crate::netns::Host>,
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

    /// Starts etcd in `host`'s network namespace, serving on its address.
    pub async fn start_in(host: &crate::netns::Host) -> anyhow::Result<Self> {
        Self::start_on(None, Some(host.clone())).await
    }

    async fn start_with(tls: Option<EtcdTls>) -> anyhow::Result<Self> {
        Self::start_on(tls, None).await
    }

    async fn start_on(tls: Option<EtcdTls>, host: Option<crate::netns::Host>) -> anyhow::Result<Self> {
        // A port taken between free_port() and etcd's bind fails the start: retry.
        let mut last_error = None;
        for _ in 0..3 {
            let dir = tempfile::Builder::new().prefix("meshkit-etcd-").tempdir()?;
            let mut etcd = Etcd {
                child: None,
                dir,
                client_port: free_port(),
                peer_port: free_port(),
                tls: tls.clone(),
                host: host.clone(),
            };
            match etcd.spawn_and_wait().await {
                Ok(()) => return Ok(etcd),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    /// `127.0.0.1:PORT` (or the host's address), as `etcd.endpoints` takes it.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.ip(), self.client_port)
    }

    fn ip(&self) -> std::net::Ipv4Addr {
        self.host.as_ref().map_or(std::net::Ipv4Addr::LOCALHOST, |h| h.ip)
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
        let client = format!("{scheme}://{}:{}", self.ip(), self.client_port);
        let peer = format!("http://{}:{}", self.ip(), self.peer_port);
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
        let mut command = match &self.host {
            Some(host) => host.command("etcd"),
            None => Command::new("etcd"),
        };
        let child = command
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

/// A cluster of etcd members on loopback, each on its own free ports with its
/// data in one temp dir, run from the etcd the deploy files ship
/// (`target/tools/etcd`; `MESHKIT_TEST_ETCD` names another binary). Elections
/// use etcd's defaults (heartbeat 100 ms, election 1 s), so a leader change
/// takes as long as it would in production. Killed when dropped.
pub struct EtcdCluster {
    binary: PathBuf,
    dir: TempDir,
    members: Vec<ClusterMember>,
}

struct ClusterMember {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts `size` members and waits until the cluster takes a write.
    /// A port another process took between its choice and etcd's bind
    /// (free ports are only free when looked at) means a fresh start on
    /// other ports, up to three times.
    pub async fn start(size: usize) -> anyhow::Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(size).await {
                Err(e) if attempt < 3 && format!("{e:#}").contains("address already in use") => {
                    eprintln!(
                        "etcd cluster, attempt {attempt}: a member's port was taken ({e:#}); starting again on other ports"
                    );
                    attempt += 1;
                }
                result => return result,
            }
        }
    }

    async fn start_once(size: usize) -> anyhow::Result<Self> {
        let binary = match std::env::var_os("MESHKIT_TEST_ETCD") {
            Some(path) => PathBuf::from(path),
            None => crate::tool("etcd"),
        };
        let dir = tempfile::Builder::new().prefix("meshkit-etcd-cluster-").tempdir()?;
        let members = (0..size)
            .map(|i| ClusterMember {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster { binary, dir, members };
        let initial = cluster.initial_cluster();
        for i in 0..size {
            cluster.spawn(i, &initial, "new")?;
        }
        cluster.wait_writable(Duration::from_secs(30)).await?;
        Ok(cluster)
    }

    /// Every member's `127.0.0.1:PORT`.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    /// `MESHKIT_ETCD_ENDPOINTS` for a process: every member, comma-separated.
    pub fn endpoints_env(&self) -> String {
        self.endpoints().join(",")
    }

    pub fn endpoint(&self, member: usize) -> String {
        format!("127.0.0.1:{}", self.members[member].client_port)
    }

    pub fn settings(&self) -> meshkit_common::config::EtcdSettings {
        meshkit_common::config::EtcdSettings { endpoints: self.endpoints(), ..Default::default() }
    }

    /// A client over every member, as the services connect.
    pub async fn client(&self) -> etcd_client::Client {
        meshkit_common::etcd::connect(&self.settings()).await.expect("connect to the test etcd cluster")
    }

    /// A client over every member in `order`: its calls go round robin from
    /// the first, so a test can put a given call on a given member (the
    /// second call lands on `order[1]`).
    pub async fn client_in_order(&self, order: &[usize]) -> etcd_client::Client {
        let settings = meshkit_common::config::EtcdSettings {
            endpoints: order.iter().map(|&i| self.endpoint(i)).collect(),
            ..Default::default()
        };
        meshkit_common::etcd::connect(&settings).await.expect("connect to the test etcd cluster")
    }

    /// A client of one member only, without asking for a leader: what that
    /// member itself says.
    async fn member_client(&self, member: usize) -> anyhow::Result<etcd_client::Client> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(500))
            .with_timeout(Duration::from_secs(2));
        Ok(etcd_client::Client::connect([format!("http://{}", self.endpoint(member))], Some(options)).await?)
    }

    /// The index of the member that is leader now, as a running member says.
    pub async fn leader(&self) -> Option<usize> {
        for i in 0..self.members.len() {
            if !self.running(i) {
                continue;
            }
            let Ok(mut client) = self.member_client(i).await else { continue };
            let Ok(status) = client.status().await else { continue };
            if status.leader() == 0 {
                continue;
            }
            let Ok(list) = client.member_list().await else { continue };
            let leader = list.members().iter().find(|m| m.id() == status.leader())?;
            return self.members.iter().position(|m| m.name == leader.name());
        }
        None
    }

    /// Waits until the running members have a leader; its index.
    pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(leader) = self.leader().await {
                return Ok(leader);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no etcd leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The revision a member has applied (to see a new member caught up).
    pub async fn revision_of(&self, member: usize) -> anyhow::Result<i64> {
        let mut client = self.member_client(member).await?;
        let status = client.status().await?;
        Ok(status.header().map(|h| h.revision()).unwrap_or(0))
    }

    pub fn running(&self, member: usize) -> bool {
        self.members[member].child.is_some()
    }

    /// kill -9, keeping its data for [`restart`](Self::restart).
    pub fn kill(&mut self, member: usize) {
        if let Some(mut child) = self.members[member].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed member again on its ports and data.
    pub fn restart(&mut self, member: usize) -> anyhow::Result<()> {
        self.kill(member);
        let initial = self.initial_cluster();
        self.spawn(member, &initial, "existing")
    }

    /// Replaces a member as an operator would: remove it from the cluster,
    /// wipe its data, add it back as a new member and start it empty. Returns
    /// once the cluster lists it as started.
    pub async fn replace(&mut self, member: usize) -> anyhow::Result<()> {
        let name = self.members[member].name.clone();
        let peer = format!("http://127.0.0.1:{}", self.members[member].peer_port);
        let other =
            (0..self.members.len()).find(|&i| i != member && self.running(i)).context("no other member runs")?;
        let mut client = self.member_client(other).await?;
        let id = client
            .member_list()
            .await?
            .members()
            .iter()
            .find(|m| m.name() == name)
            .map(|m| m.id())
            .context("the member is not listed")?;
        // etcd refuses to remove a member until every other one has been
        // connected for 5 s ("unhealthy cluster"): an operator waits too.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match client.member_remove(id).await {
                Ok(_) => break,
                Err(e) if e.to_string().contains("unhealthy cluster") && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(anyhow::Error::new(e).context("member remove")),
            }
        }
        self.kill(member);
        let data = self.data_dir(member);
        if data.exists() {
            std::fs::remove_dir_all(&data)?;
        }
        // A timed-out add may still have been applied: the member list says.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let added = client.member_add([peer.as_str()], None).await;
            let listed = || async {
                client
                    .clone()
                    .member_list()
                    .await
                    .is_ok_and(|l| l.members().iter().any(|m| m.peer_urls().contains(&peer)))
            };
            match added {
                Ok(_) => break,
                Err(_) if listed().await => break,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    return Err(anyhow::Error::new(e).context("member add"));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
        let initial = self.initial_cluster();
        self.spawn(member, &initial, "existing")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(list) = client.member_list().await {
                if list.members().iter().any(|m| m.name() == name && !m.client_urls().is_empty()) {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the new member {name} did not start within 30 s: {}", self.log_tail(member));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines a member logged, for a failure message.
    pub fn log_tail(&self, member: usize) -> String {
        let log = std::fs::read_to_string(self.log_path(member)).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn data_dir(&self, member: usize) -> PathBuf {
        self.dir.path().join(&self.members[member].name)
    }

    fn log_path(&self, member: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.members[member].name))
    }

    fn spawn(&mut self, member: usize, initial_cluster: &str, state: &str) -> anyhow::Result<()> {
        let data = self.data_dir(member);
        let log_path = self.log_path(member);
        let m = &self.members[member];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
        let child = Command::new(&self.binary)
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", initial_cluster, "--initial-cluster-state", state])
            .args(["--initial-cluster-token", "meshkit-test"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.members[member].child = Some(child);
        Ok(())
    }

    async fn wait_writable(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for (i, m) in self.members.iter_mut().enumerate() {
                if let Some(child) = m.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        let log = std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name)))
                            .unwrap_or_default();
                        bail!("etcd member {i} exited with {status}: {}", log.lines().last().unwrap_or(""));
                    }
                }
            }
            if let Ok(mut c) = meshkit_common::etcd::connect(&self.settings()).await {
                if c.put("/meshkit-test/ready", "1", None).await.is_ok() {
                    return Ok(());
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("the etcd cluster took no write within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
