//! The echo service of the gateway tests: a meshkit server for the test
//! contract, registered in etcd like any other service.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use std::sync::{
    Arc,
    atomic::{AtomicI32, AtomicU64, Ordering},
};

use meshkit_common::{Mesh, MeshServer, ProcessConfig, RunningServer};
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    tonic::include_proto!("meshkit.echo.v1");
}

pub use pb::{
    EchoReply, EchoRequest, ExpandRequest, FailRequest,
    echo_service_client::EchoServiceClient,
    echo_service_server::{EchoService, EchoServiceServer},
};

/// The test contract's descriptors (with imports), as the gateway loads them.
pub const ECHO_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/echo_descriptor.bin"));

/// Service name of the echo contract in the registry.
pub const ECHO: &str = "meshkit.echo.v1.EchoService";

struct Echo {
    instance: String,
    faults: Faults,
}

/// Faults a test sets while an echo instance runs (in-process).
#[derive(Clone, Default)]
pub struct Faults {
    /// A gRPC code `Echo` answers with instead of echoing (0: none).
    pub fail_with: Arc<AtomicI32>,
    /// A bottleneck every `Echo` call passes through: `permits` at a time,
    /// each holding one for `service_ms` (a pool of connections to a slow
    /// database, say): beyond it, calls queue and latency grows.
    pub bottleneck: Option<(Arc<tokio::sync::Semaphore>, std::time::Duration)>,
    /// Added to every `Echo` call (a slow instance).
    pub delay: std::time::Duration,
    /// Every `fail_every`th `Echo` call answers UNAVAILABLE (0: none), so a
    /// share of exactly 1/n fails, the same in every run.
    pub fail_every: u64,
    calls: Arc<AtomicU64>,
}

impl Faults {
    /// An instance that answers `delay` late, and fails one Echo call in
    /// every `fail_every` UNAVAILABLE (0: none).
    pub fn sick(delay: std::time::Duration, fail_every: u64) -> Self {
        Self { delay, fail_every, ..Self::default() }
    }

    pub fn with_bottleneck(permits: usize, service_ms: u64) -> Self {
        Self {
            bottleneck: Some((
                Arc::new(tokio::sync::Semaphore::new(permits)),
                std::time::Duration::from_millis(service_ms),
            )),
            ..Self::default()
        }
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl EchoService for Echo {
    async fn echo(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let code = self.faults.fail_with.load(Ordering::Relaxed);
        if code != 0 {
            return Err(Status::new(tonic::Code::from_i32(code), "failing on purpose"));
        }
        if self.faults.fail_every > 0 && self.faults.calls.fetch_add(1, Ordering::Relaxed) % self.faults.fail_every == 0
        {
            return Err(Status::unavailable("failing one call in every few on purpose"));
        }
        if !self.faults.delay.is_zero() {
            tokio::time::sleep(self.faults.delay).await;
        }
        if let Some((permits, service)) = &self.faults.bottleneck {
            let _permit = permits.acquire().await.map_err(|_| Status::internal("closed"))?;
            tokio::time::sleep(*service).await;
        }
        let mut reply =
            EchoReply { request: Some(request.get_ref().clone()), served_by: self.instance.clone(), count: 1 };
        // The mTLS caller's identity comes back in the reply's text.
        if let Some(caller) = meshkit_common::tls::caller(&request) {
            if let Some(r) = reply.request.as_mut() {
                r.payload.get_or_insert_with(Default::default).note = format!("caller={caller}");
            }
        }
        // Identity metadata the gateway adds comes back in the reply's text.
        if let Some(subject) = request.metadata().get("x-meshkit-subject") {
            if let Some(r) = reply.request.as_mut() {
                r.payload.get_or_insert_with(Default::default).note =
                    format!("subject={}", subject.to_str().unwrap_or(""));
            }
        }
        Ok(Response::new(reply))
    }

    type ExpandStream = ReplyStream;

    async fn expand(&self, request: Request<ExpandRequest>) -> Result<Response<Self::ExpandStream>, Status> {
        let ExpandRequest { text, times } = request.into_inner();
        if !(0..=10_000).contains(&times) {
            return Err(Status::invalid_argument(format!("times: {times} is outside 0..=10000")));
        }
        let instance = self.instance.clone();
        let stream = futures::stream::iter((0..times).map(move |i| {
            Ok(EchoReply {
                request: Some(EchoRequest { text: format!("{text}-{i}"), ..Default::default() }),
                served_by: instance.clone(),
                count: i64::from(i) + 1,
            })
        }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn collect(&self, request: Request<Streaming<EchoRequest>>) -> Result<Response<EchoReply>, Status> {
        let mut stream = request.into_inner();
        let mut count = 0;
        let mut texts = Vec::new();
        while let Some(item) = stream.next().await {
            let item = item?;
            count += 1;
            texts.push(item.text);
        }
        Ok(Response::new(EchoReply {
            request: Some(EchoRequest { text: texts.join(","), ..Default::default() }),
            served_by: self.instance.clone(),
            count,
        }))
    }

    type ChatStream = ReplyStream;

    async fn chat(&self, request: Request<Streaming<EchoRequest>>) -> Result<Response<Self::ChatStream>, Status> {
        let instance = self.instance.clone();
        let mut n = 0;
        let stream = request.into_inner().map(move |item| {
            n += 1;
            item.map(|r| EchoReply { request: Some(r), served_by: instance.clone(), count: n })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fail(&self, request: Request<FailRequest>) -> Result<Response<EchoReply>, Status> {
        let FailRequest { code, message } = request.into_inner();
        Err(Status::new(tonic::Code::from_i32(code), message))
    }
}

/// The echo service alone, for a server built without meshkit's layers.
pub fn echo_service(instance: &str, faults: Faults) -> EchoServiceServer<impl EchoService> {
    EchoServiceServer::new(Echo { instance: instance.to_owned(), faults })
}

/// Starts an echo instance registered in etcd.
pub async fn start_echo(config: impl ProcessConfig) -> meshkit_common::Result<RunningServer> {
    start_echo_with(config, Faults::default()).await
}

/// The component name echo instances read their settings under.
pub const COMPONENT: &str = "echo";

/// Starts an echo instance with `faults`, under the config center
/// (component `echo`): its governance follows etcd.
pub async fn start_echo_with(config: impl ProcessConfig, faults: Faults) -> meshkit_common::Result<RunningServer> {
    let mesh = Mesh::connect(config.mesh(), COMPONENT).await?;
    let config = mesh.config();
    let instance = config.registry.instance_id.clone();
    MeshServer::new(config)
        .with_mesh(&mesh)
        .add_service(EchoServiceServer::new(Echo { instance, faults }))
        .start()
        .await
}

/// An echo instance on `etcd` with these governance rules and faults.
pub async fn start_governed(
    etcd: &crate::Etcd,
    governance: meshkit_common::config::GovernanceSettings,
    faults: Faults,
) -> meshkit_common::Result<RunningServer> {
    let mut config = crate::mesh_config(etcd, "sqlite::memory:");
    config.governance = governance;
    start_echo_with(config, faults).await
}

/// A client on one plain tonic channel straight to `server` (no balancer,
/// no calling-side governance).
pub async fn direct_client(server: &RunningServer) -> anyhow::Result<EchoServiceClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.local_addr()))?.connect().await?;
    Ok(EchoServiceClient::new(channel))
}
