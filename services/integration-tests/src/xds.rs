//! xDS for the tests and the bench: a client of the ADS protocol itself (to
//! check ACK/NACK, nonces and many streams at once), bootstrap files, and the
//! grpc-go and grpc-java programs (`clients/go`, `io.meshkit.xds.Client`)
//! that call `xds:///{service}` and print one JSON line per call.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context;
use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::Cluster,
            core::v3::{Locality, Node, address, socket_address},
            endpoint::v3::{ClusterLoadAssignment, lb_endpoint},
            listener::v3::Listener,
            route::v3::RouteConfiguration,
        },
        service::discovery::v3::{
            DiscoveryRequest, DiscoveryResponse, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::rpc::Status as RpcStatus,
};
use prost::Message;
use serde::Deserialize;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;

pub use meshkit_xds::resources::{CLUSTER, ENDPOINTS, LISTENER, ROUTE};

/// One ADS stream, driven by hand.
pub struct AdsClient {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: tonic::Streaming<DiscoveryResponse>,
    node: Node,
    /// Per type: (accepted version, last nonce).
    state: HashMap<String, (String, String)>,
}

/// An endpoint of a ClusterLoadAssignment: where, its locality, weight, priority.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EdsEndpoint {
    pub addr: String,
    pub zone: String,
    pub sub_zone: String,
    pub weight: u32,
    pub priority: u32,
}

impl AdsClient {
    /// Opens a stream to `addr` (`host:port`) as node `id` in `zone`.
    pub async fn connect(addr: &str, id: &str, zone: &str) -> anyhow::Result<Self> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?;
        Self::on(channel, id, zone).await
    }

    /// Opens a stream on `channel` (streams may share a connection).
    pub async fn on(channel: tonic::transport::Channel, id: &str, zone: &str) -> anyhow::Result<Self> {
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let (requests, rx) = mpsc::channel(16);
        let responses = client.stream_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
        let node = Node {
            id: id.to_owned(),
            locality: Some(Locality { zone: zone.to_owned(), ..Default::default() }),
            ..Default::default()
        };
        Ok(Self { requests, responses, node, state: HashMap::new() })
    }

    async fn send(&mut self, type_url: &str, names: &[&str], error: Option<&str>) -> anyhow::Result<()> {
        let (version, nonce) = self.state.get(type_url).cloned().unwrap_or_default();
        let request = DiscoveryRequest {
            version_info: version,
            node: Some(self.node.clone()),
            resource_names: names.iter().map(|n| (*n).to_owned()).collect(),
            type_url: type_url.to_owned(),
            response_nonce: nonce,
            error_detail: error.map(|message| RpcStatus { code: 3, message: message.to_owned(), details: vec![] }),
            ..Default::default()
        };
        self.requests.send(request).await.context("the ADS stream is closed")
    }

    /// Subscribes to `names` of `type_url` (the whole set, as SotW requires).
    pub async fn subscribe(&mut self, type_url: &str, names: &[&str]) -> anyhow::Result<()> {
        self.send(type_url, names, None).await
    }

    /// Accepts `response`, staying subscribed to `names`.
    pub async fn ack(&mut self, response: &DiscoveryResponse, names: &[&str]) -> anyhow::Result<()> {
        self.state.insert(response.type_url.clone(), (response.version_info.clone(), response.nonce.clone()));
        self.send(&response.type_url, names, None).await
    }

    /// Refuses `response`: the accepted version stays what it was.
    pub async fn nack(&mut self, response: &DiscoveryResponse, names: &[&str], why: &str) -> anyhow::Result<()> {
        let entry = self.state.entry(response.type_url.clone()).or_default();
        entry.1.clone_from(&response.nonce);
        self.send(&response.type_url, names, Some(why)).await
    }

    /// Sends a request with a nonce the server never sent.
    pub async fn stale(&mut self, type_url: &str, names: &[&str]) -> anyhow::Result<()> {
        let entry = self.state.entry(type_url.to_owned()).or_default();
        let saved = std::mem::replace(&mut entry.1, "no-such-nonce".into());
        let sent = self.send(type_url, names, None).await;
        self.state.entry(type_url.to_owned()).or_default().1 = saved;
        sent
    }

    /// The next response, or an error after `timeout`.
    pub async fn next(&mut self, timeout: Duration) -> anyhow::Result<DiscoveryResponse> {
        match tokio::time::timeout(timeout, self.responses.message()).await {
            Ok(Ok(Some(response))) => Ok(response),
            Ok(Ok(None)) => anyhow::bail!("the server ended the stream"),
            Ok(Err(status)) => anyhow::bail!("the stream failed: {status}"),
            Err(_) => anyhow::bail!("no response within {timeout:?}"),
        }
    }

    /// Whether a response arrives within `wait` (it is consumed).
    pub async fn quiet_for(&mut self, wait: Duration) -> Result<(), Box<DiscoveryResponse>> {
        match self.next(wait).await {
            Ok(response) => Err(Box::new(response)),
            Err(_) => Ok(()),
        }
    }
}

/// The names of the resources a response holds.
pub fn names(response: &DiscoveryResponse) -> Vec<String> {
    response
        .resources
        .iter()
        .map(|any| match any.type_url.as_str() {
            LISTENER => Listener::decode(any.value.as_slice()).map(|r| r.name),
            ROUTE => RouteConfiguration::decode(any.value.as_slice()).map(|r| r.name),
            CLUSTER => Cluster::decode(any.value.as_slice()).map(|r| r.name),
            ENDPOINTS => ClusterLoadAssignment::decode(any.value.as_slice()).map(|r| r.cluster_name),
            other => Ok(format!("<{other}>")),
        })
        .map(|name| name.unwrap_or_else(|e| format!("<undecodable: {e}>")))
        .collect()
}

/// The endpoints of every ClusterLoadAssignment in `response`, by cluster.
pub fn endpoints(response: &DiscoveryResponse) -> BTreeMap<String, Vec<EdsEndpoint>> {
    let mut out = BTreeMap::new();
    for any in &response.resources {
        let Ok(assignment) = ClusterLoadAssignment::decode(any.value.as_slice()) else { continue };
        let mut list = Vec::new();
        for locality in &assignment.endpoints {
            let place = locality.locality.clone().unwrap_or_default();
            for lb in &locality.lb_endpoints {
                let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = &lb.host_identifier else { continue };
                let Some(address::Address::SocketAddress(socket)) =
                    endpoint.address.as_ref().and_then(|a| a.address.as_ref())
                else {
                    continue;
                };
                let port = match socket.port_specifier {
                    Some(socket_address::PortSpecifier::PortValue(port)) => port,
                    _ => 0,
                };
                list.push(EdsEndpoint {
                    addr: format!("{}:{port}", socket.address),
                    zone: place.zone.clone(),
                    sub_zone: place.sub_zone.clone(),
                    weight: locality.load_balancing_weight.as_ref().map_or(0, |w| w.value),
                    priority: locality.priority,
                });
            }
        }
        out.insert(assignment.cluster_name, list);
    }
    out
}

/// Writes a gRPC xDS bootstrap for node `id` in `zone` to `dir/NAME.json`.
pub fn bootstrap(dir: &Path, name: &str, server: &str, id: &str, zone: &str) -> PathBuf {
    let text = meshkit_meshctl::xds::bootstrap(server, id, zone, None);
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, text).expect("writing a bootstrap file");
    path
}

/// Which gRPC library calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Go,
    Java,
}

/// One finished call, as the client printed it.
#[derive(Debug, Clone, Deserialize)]
pub struct Call {
    /// Milliseconds from the client's start to the call's start.
    pub t: f64,
    pub ms: f64,
    pub code: String,
    pub instance: String,
    #[serde(default)]
    pub msg: String,
}

/// A running client program calling GetUser on `xds:///meshkit.user.v1.UserService`.
pub struct XdsCaller {
    pub lang: Lang,
    child: tokio::process::Child,
    calls: Arc<Mutex<Vec<Call>>>,
    started: Arc<Mutex<Option<std::time::Instant>>>,
    stderr: PathBuf,
}

impl XdsCaller {
    /// Starts `lang`'s client at `rate` calls/s until [`XdsCaller::finish`].
    pub async fn start(lang: Lang, bootstrap: &Path, user_id: &str, rate: u32, dir: &Path) -> anyhow::Result<Self> {
        Self::start_to(lang, bootstrap, "xds:///meshkit.user.v1.UserService", user_id, rate, dir).await
    }

    /// As [`XdsCaller::start`], calling `target` (`xds:///…`, or `host:port`).
    pub async fn start_to(
        lang: Lang,
        bootstrap: &Path,
        target: &str,
        user_id: &str,
        rate: u32,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut command = match lang {
            Lang::Go => tokio::process::Command::new(crate::tool("xds-client-go")),
            Lang::Java => {
                let mut java = tokio::process::Command::new("java");
                java.arg("-cp").arg(crate::java_clients_classpath()?).arg("io.meshkit.xds.Client");
                java
            }
        };
        let stderr = dir.join(format!("xds-client-{lang:?}-{}.log", crate::free_port()));
        command
            .args([
                "--target",
                target,
                "--user-id",
                user_id,
                "--rate",
                &rate.to_string(),
                "--seconds",
                "0",
                "--deadline-ms",
                "2000",
            ])
            .env("GRPC_XDS_BOOTSTRAP", bootstrap)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr)?)
            .kill_on_drop(true);
        let mut child = command.spawn().with_context(|| format!("starting the {lang:?} xDS client"))?;
        let stdout = child.stdout.take().context("client stdout")?;
        let calls = Arc::new(Mutex::new(Vec::new()));
        let started = Arc::new(Mutex::new(None));
        let (sink, start) = (calls.clone(), started.clone());
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("\"event\":\"start\"") {
                    *start.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
                } else if let Ok(call) = serde_json::from_str::<Call>(&line) {
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(call);
                }
            }
        });
        Ok(Self { lang, child, calls, started, stderr })
    }

    /// Calls finished so far.
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Milliseconds since the client started (its calls' clock), if it has.
    pub fn now_ms(&self) -> Option<f64> {
        self.started.lock().unwrap_or_else(|p| p.into_inner()).map(|s| s.elapsed().as_secs_f64() * 1000.0)
    }

    /// Waits until `n` calls have succeeded.
    pub async fn wait_ok(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let ok = self.calls.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|c| c.code == "OK").count();
            if ok >= n {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "the {:?} client made {ok} good calls of {n} in {timeout:?}; its log:\n{}",
                    self.lang,
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Closes its stdin, waits for the calls in flight, returns every call.
    pub async fn finish(mut self) -> anyhow::Result<Vec<Call>> {
        drop(self.child.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .context("the client did not exit")??;
        anyhow::ensure!(status.success(), "the {:?} client exited with {status}: {}", self.lang, self.log());
        // The reader task drains the pipe after exit.
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(self.calls())
    }
}

/// Calls by instance.
pub fn by_instance(calls: &[Call]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for call in calls.iter().filter(|c| c.code == "OK") {
        *out.entry(call.instance.clone()).or_default() += 1;
    }
    out
}

/// The calls that failed, for a message.
pub fn failures(calls: &[Call]) -> Vec<&Call> {
    calls.iter().filter(|c| c.code != "OK").collect()
}
