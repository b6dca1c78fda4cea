//! The server builder every meshkit service starts from.
//!
//! [`MeshServer`] adds the standard health service (`grpc.health.v1`),
//! reflection in both v1 and v1alpha (grpcurl 1.8.6 speaks only v1alpha), an
//! `x-meshkit-instance` response header naming the instance, and registration
//! in etcd under the registry contract. [`RunningServer::shutdown`] drains in
//! the order watchers need: health NOT_SERVING, revoke the lease, wait for
//! watchers to drop the instance, then stop accepting and finish in-flight
//! calls (bounded).

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::Client;
use futures::StreamExt;
use http::HeaderValue;
use meshkit_balance::ChannelBuilder;
use meshkit_base::deadline::DeadlineLayer;
use meshkit_governance::{Governance, GovernanceLayer};
use meshkit_registry::{
    config_center::ConfigCenter,
    control,
    registry::{Instance, RegistrySession, instance_key},
};
use tokio::{
    net::TcpListener,
    sync::{oneshot, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{
    body::Body,
    server::NamedService,
    service::{Routes, RoutesBuilder},
    transport::Server,
};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::Service;
use tracing::Instrument;

use crate::{
    admin::AdminServer,
    config::{MeshConfig, ProcessConfig},
    error::{Error, Result},
    h2guard::{FrameGuard, GuardLimits},
    preface::PrefaceTimeout,
};

/// What a service process shares: its etcd client, the config center
/// (etcd settings over its own, watched), governance following the center's
/// `governance` section, and a channel builder that applies it. `C` is the
/// process's whole settings type (the front's [`MeshConfig`] and its own
/// sections), so the center hands it every section it reads.
pub struct Mesh<C = MeshConfig> {
    pub etcd: Client,
    pub center: Arc<ConfigCenter<C>>,
    pub governance: Arc<Governance>,
    pub channels: ChannelBuilder,
    /// The process's mTLS material when `tls.enabled` (servers and channels share it).
    pub tls: Option<Arc<meshkit_tls::Tls>>,
    /// Authorization by caller identity, following the center's `authz` section.
    pub authz: Arc<meshkit_tls::authz::Authz>,
}

impl<C: ProcessConfig> Mesh<C> {
    /// Connects etcd and starts the config center for `component`. An empty
    /// `registry.instance_id` becomes a fresh one here, the one place it is
    /// chosen: [`Mesh::config`] carries it to the servers and consumers.
    pub async fn connect(config: &C, component: &str) -> Result<Self> {
        let mut config = config.clone();
        let mesh = config.mesh_mut();
        if mesh.registry.instance_id.is_empty() {
            mesh.registry.instance_id = new_instance_id();
        }
        let mesh = config.mesh().clone();
        let tls = meshkit_tls::Tls::from_settings(&mesh.tls)?;
        let etcd = meshkit_registry::etcd::connect(&mesh.etcd).await?;
        let center = Arc::new(ConfigCenter::start(etcd.clone(), &mesh.etcd.prefix, config, component).await?);
        let governance = Governance::watching(center.section(|c| c.mesh().governance.clone()));
        let mut filter = center.section(|c| c.mesh().log.filter.clone());
        tokio::spawn(async move {
            while filter.changed().await.is_ok() {
                let directives = filter.borrow_and_update().clone();
                match meshkit_telemetry::set_filter(&directives) {
                    Ok(true) => tracing::info!(filter = directives, "log filter changed"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(filter = directives, error = e, "log filter refused"),
                }
            }
        });
        let authz = meshkit_tls::authz::Authz::watching(center.section(|c| c.mesh().authz.clone()));
        let channels = ChannelBuilder::new(etcd.clone(), mesh.etcd.prefix.clone())
            .with_governance(governance.clone())
            .with_tls(tls.clone());
        Ok(Self { etcd, center, governance, channels, tls, authz })
    }

    /// The settings in force: the process's own with etcd's over them.
    pub fn config(&self) -> C {
        (*self.center.current()).clone()
    }
}

/// Registration metadata: the component whose config-center settings
/// (and so governance rules) the instance follows.
pub const COMPONENT_METADATA: &str = "component";

/// The response header that names the instance that served a call.
pub const INSTANCE_HEADER: &str = "x-meshkit-instance";

/// Builds a gRPC server that registers itself in etcd.
pub struct MeshServer {
    config: MeshConfig,
    routes: RoutesBuilder,
    services: Vec<&'static str>,
    metadata: BTreeMap<String, String>,
    etcd: Option<Client>,
    channels: Vec<ChannelBuilder>,
    reports: Vec<Report>,
    sources: Vec<meshkit_telemetry::metrics::Source>,
    governance: Option<Arc<Governance>>,
    /// Kept alive while the server runs.
    center: Option<Arc<dyn std::any::Any + Send + Sync>>,
    tls: Option<Arc<meshkit_tls::Tls>>,
    authz: Option<Arc<meshkit_tls::authz::Authz>>,
    on_shutdown: Vec<ShutdownHook>,
}

/// A section of the admin endpoint's `/reports`: a name and what to show.
pub type Report = (String, Arc<dyn Fn() -> serde_json::Value + Send + Sync>);

type ShutdownHook = Pin<Box<dyn Future<Output = ()> + Send>>;

impl MeshServer {
    /// A server with `config`'s mesh sections (a process's whole settings, or a [`MeshConfig`]).
    pub fn new(config: impl ProcessConfig) -> Self {
        Self {
            config: config.mesh().clone(),
            routes: RoutesBuilder::default(),
            services: Vec::new(),
            metadata: BTreeMap::new(),
            etcd: None,
            channels: Vec::new(),
            reports: Vec::new(),
            sources: Vec::new(),
            governance: None,
            center: None,
            tls: None,
            authz: None,
            on_shutdown: Vec::new(),
        }
    }

    /// Shows `report()` under `name` in the admin endpoint's `/reports`.
    pub fn report(
        mut self,
        name: impl Into<String>,
        report: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    ) -> Self {
        self.reports.push((name.into(), Arc::new(report)));
        self
    }

    /// Everything a [`Mesh`] holds: its etcd client, channels, governance
    /// (hot-reloaded) and the config center's report.
    pub fn with_mesh<C: ProcessConfig>(mut self, mesh: &Mesh<C>) -> Self {
        self.etcd = Some(mesh.etcd.clone());
        self.channels.push(mesh.channels.clone());
        self.governance = Some(mesh.governance.clone());
        self.center = Some(mesh.center.clone() as Arc<dyn std::any::Any + Send + Sync>);
        self.tls = mesh.tls.clone();
        self.authz = Some(mesh.authz.clone());
        // Its settings' scope, so a console or meshctl knows where its rules live.
        self.metadata.insert(COMPONENT_METADATA.into(), mesh.center.component().to_owned());
        let center = mesh.center.clone();
        self.report("config", move || serde_json::to_value(center.status()).unwrap_or_default())
    }

    /// Serving-side governance; without it, the rules in the config's `governance` section.
    pub fn with_governance(mut self, governance: Arc<Governance>) -> Self {
        self.governance = Some(governance);
        self
    }

    /// Adds the families `source` computes to the admin endpoint's `/metrics`.
    pub fn metrics(mut self, source: meshkit_telemetry::metrics::Source) -> Self {
        self.sources.push(source);
        self
    }

    /// Runs `hook` at shutdown, after in-flight calls finished (bounded by
    /// the drain timeout): stop background workers here.
    pub fn on_shutdown(mut self, hook: impl Future<Output = ()> + Send + 'static) -> Self {
        self.on_shutdown.push(Box::pin(hook));
        self
    }

    /// Serves over mTLS with this material (without it, from the config's `tls` section).
    pub fn with_tls(mut self, tls: Option<Arc<meshkit_tls::Tls>>) -> Self {
        self.tls = tls;
        self
    }

    /// Uses an existing etcd client instead of connecting a new one.
    pub fn with_etcd(mut self, client: Client) -> Self {
        self.etcd = Some(client);
        self
    }

    /// Shows the pools of `channels` on the admin endpoint.
    pub fn with_channels(mut self, channels: ChannelBuilder) -> Self {
        self.channels.push(channels);
        self
    }

    /// Adds a generated tonic service; it is registered under its full name.
    pub fn add_service<S>(mut self, svc: S) -> Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.routes.add_service(svc);
        self.services.push(S::NAME);
        self
    }

    /// A metadata entry published with the registration.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Binds, serves, marks every service SERVING and registers in etcd.
    /// Returns once the instance is registered and answering.
    pub async fn start(mut self) -> Result<RunningServer> {
        let started = Instant::now();
        let (tls, governance) = self.resolve()?;
        let MeshServer {
            config,
            mut routes,
            services,
            mut metadata,
            etcd,
            channels,
            reports,
            sources,
            governance: _,
            center,
            tls: _,
            authz,
            on_shutdown,
        } = self;
        let authz = authz.unwrap_or_else(|| meshkit_tls::authz::Authz::new(config.authz.clone()));
        let listen: SocketAddr = config
            .server
            .listen
            .parse()
            .map_err(|_| Error::Config(format!("server.listen: {:?} is not an address", config.server.listen)))?;
        let listener = TcpListener::bind(listen).await.map_err(|source| Error::Bind { addr: listen, source })?;
        watch_peers(&listener)?;
        let local_addr = listener.local_addr()?;
        let instance_id = instance_id_of(&config);

        let (health, health_service) = tonic_health::server::health_reporter();
        routes.add_service(health_service);
        // Advertise what this process serves, not every service in the contracts.
        let reflection = || {
            let mut builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(meshkit_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health");
            for name in &services {
                builder = builder.with_service_name(*name);
            }
            builder
        };
        let reflection_v1 = reflection().build_v1().map_err(|e| Error::Config(format!("reflection: {e}")))?;
        let reflection_v1alpha = reflection().build_v1alpha().map_err(|e| Error::Config(format!("reflection: {e}")))?;
        routes.add_service(reflection_v1).add_service(reflection_v1alpha);

        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let admin = start_admin(&config, channels, reports, sources, &mut metadata).await?;
        // The contract's rules, checked on every request of a method that has them.
        let validator = meshkit_validate::Validator::for_contracts(&services)
            .map_err(|fault| Error::Config(format!("validation: {fault}")))?;
        // Static, so putting it on each response copies no bytes and counts
        // no references: one small leak per server started.
        let instance = HeaderValue::from_str(&instance_id)
            .ok()
            .map(|_| HeaderValue::from_static(Box::leak(instance_id.clone().into_boxed_str())));
        let fault_delay = Duration::from_millis(config.server.fault_delay_ms);
        let server = Server::builder()
            // No HTTP/2 keepalive: hyper's reads the clock and takes a lock
            // on every frame received (0.6 µs a call at 5,000/s). The
            // kernel's keepalive finds a vanished peer instead (`watch_peers`).
            .max_concurrent_streams(Some(config.server.max_concurrent_streams))
            .http2_max_header_list_size(Some(config.server.max_header_list_bytes))
            // tonic passes no limit here, dropping hyper's 1024: streams a
            // client makes the server reset (CVE-2025-8671, "MadeYouReset").
            .http2_max_local_error_reset_streams(Some(1024))
            // h2 sends GOAWAY `too_many_resets` when more than this many
            // streams are reset before the server has taken them (rapid
            // reset). A proxy in front (the gateway, a sidecar) relays every
            // cancellation of its clients over one shared connection: with
            // h2's default of 20, one client going away with 100 open
            // streams closed the gateway's upstream connection under load,
            // failing other clients' calls. As many as a connection may
            // have open still refuses a flood.
            .http2_max_pending_accept_reset_streams(Some(config.server.max_concurrent_streams as usize))
            .layer(MetricsLayer { instance })
            .layer(meshkit_tls::authz::AuthzLayer(authz))
            .layer(GovernanceLayer(governance))
            .layer(DeadlineLayer)
            .layer(FaultDelayLayer(fault_delay))
            .layer(meshkit_validate::ValidateLayer(validator))
            .add_routes(routes_of(routes));
        let stopped = async {
            let _ = stop_rx.await;
        };
        let preface = Duration::from_millis(config.server.preface_timeout_ms);
        let limits = GuardLimits { control_frames_per_sec: config.server.control_frames_per_sec };
        let task = match tls {
            None => {
                let incoming = TcpListenerStream::new(listener).map(move |conn| {
                    conn.map(|stream| {
                        let _ = stream.set_nodelay(true);
                        let peer = stream.peer_addr().ok();
                        PrefaceTimeout::new(FrameGuard::new(stream, peer, limits), preface)
                    })
                });
                tokio::spawn(async move {
                    server.serve_with_incoming_shutdown(incoming, stopped).await.map_err(Error::from)
                })
            }
            Some(tls) => {
                let incoming = meshkit_tls::incoming(listener, tls).map(move |conn| {
                    conn.map(|stream| {
                        let peer = tonic::transport::server::Connected::connect_info(&stream).remote;
                        PrefaceTimeout::new(FrameGuard::new(stream, peer, limits), preface)
                    })
                });
                tokio::spawn(async move {
                    server.serve_with_incoming_shutdown(incoming, stopped).await.map_err(Error::from)
                })
            }
        };

        for name in &services {
            health.set_service_status(*name, ServingStatus::Serving).await;
        }

        let presence = match Presence::register(
            admin,
            center,
            &config,
            etcd,
            Beside { addr: local_addr, instance_id, services: &services, metadata },
            Some(&health),
        )
        .await
        {
            Ok(presence) => presence,
            Err(e) => {
                let _ = stop_tx.send(());
                for hook in on_shutdown {
                    hook.await;
                }
                return Err(e);
            }
        };
        tracing::info!(
            addr = %local_addr,
            instance_id = presence.instance_id(),
            services = ?services,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "serving and registered"
        );
        Ok(RunningServer {
            presence,
            local_addr,
            services,
            health,
            stop: Some(stop_tx),
            task,
            on_shutdown,
            drain_delay: Duration::from_millis(config.server.drain_delay_ms),
            drain_timeout: Duration::from_millis(config.server.drain_timeout_ms),
        })
    }
}

impl MeshServer {
    /// The parts every start shares: the TLS material (the builder's, or
    /// from the `tls` section) and the serving-side governance, both shown
    /// on the admin endpoint, governance's metrics with them.
    fn resolve(&mut self) -> Result<(Option<Arc<meshkit_tls::Tls>>, Arc<Governance>)> {
        let tls = match self.tls.take() {
            Some(tls) => Some(tls),
            None => meshkit_tls::Tls::from_settings(&self.config.tls)?,
        };
        if let Some(tls) = tls.clone() {
            self.reports.push(("tls".into(), Arc::new(move || tls.report())));
        }
        let governance = self.governance.take().unwrap_or_else(|| Governance::new(self.config.governance.clone()));
        let report = governance.clone();
        self.reports
            .push(("governance".into(), Arc::new(move || serde_json::to_value(report.report()).unwrap_or_default())));
        self.sources.push(governance.metrics_source());
        Ok((tls, governance))
    }

    /// For a process that serves a listener of its own instead of gRPC
    /// services (the gateway's HTTP one): everything [`Self::start`] does
    /// beside its listener, nothing in it. The admin endpoint (this
    /// builder's pools, reports and metrics) starts, and `addr` is
    /// registered under `service` with the builder's metadata.
    ///
    /// Health and the operators' control keys (drain, weight) belong to the
    /// caller's listener, so they are not followed here.
    pub async fn start_beside(mut self, addr: SocketAddr, service: &'static str) -> Result<Presence> {
        self.resolve()?;
        let MeshServer { config, mut metadata, etcd, channels, reports, sources, center, .. } = self;
        let admin = start_admin(&config, channels, reports, sources, &mut metadata).await?;
        let instance_id = instance_id_of(&config);
        let beside = Beside { addr, instance_id, services: &[service], metadata };
        Presence::register(admin, center, &config, etcd, beside, None).await
    }
}

/// The admin endpoint when `admin.enabled`, its address published in
/// `metadata` (scrapers and meshctl read it from the registry, so an
/// address they can reach).
async fn start_admin(
    config: &MeshConfig,
    channels: Vec<ChannelBuilder>,
    reports: Vec<Report>,
    sources: Vec<meshkit_telemetry::metrics::Source>,
    metadata: &mut BTreeMap<String, String>,
) -> Result<Option<AdminServer>> {
    if !config.admin.enabled {
        return Ok(None);
    }
    let listen: SocketAddr = config
        .admin
        .listen
        .parse()
        .map_err(|_| Error::Config(format!("admin.listen: {:?} is not an address", config.admin.listen)))?;
    let admin = AdminServer::start(listen, channels, reports, sources).await?;
    metadata.insert("admin".into(), advertised(admin.local_addr(), &config.etcd.endpoints));
    Ok(Some(admin))
}

/// What a [`Presence`] registers: the serving address, the instance and
/// the services it answers for.
struct Beside<'a> {
    addr: SocketAddr,
    instance_id: String,
    services: &'a [&'static str],
    metadata: BTreeMap<String, String>,
}

/// A serving process's presence beside its listener: its admin endpoint
/// and its registration in etcd (the lease kept alive, and the operators'
/// control keys followed where the listener answers health). A
/// [`RunningServer`] holds one; [`MeshServer::start_beside`] makes one for a
/// listener the process serves itself.
pub struct Presence {
    admin: Option<AdminServer>,
    registry: Option<RegistrySession>,
    instance_id: String,
    /// Following the operators' control keys; stopped before the drain.
    control_tasks: Vec<JoinHandle<()>>,
    /// Kept so settings keep following etcd while the process serves.
    _center: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl Presence {
    /// Registers `beside` when `registry.enabled` and it names a service.
    /// With `health`, the instance follows its control keys, and a service
    /// an operator drains answers NOT_SERVING there.
    async fn register(
        admin: Option<AdminServer>,
        center: Option<Arc<dyn std::any::Any + Send + Sync>>,
        config: &MeshConfig,
        etcd: Option<Client>,
        beside: Beside<'_>,
        health: Option<&HealthReporter>,
    ) -> Result<Self> {
        let Beside { addr, instance_id, services, mut metadata } = beside;
        let mut presence = Presence { admin, registry: None, instance_id, control_tasks: Vec::new(), _center: center };
        if !config.registry.enabled || services.is_empty() {
            return Ok(presence);
        }
        let client = match etcd {
            Some(c) => c,
            None => meshkit_registry::etcd::connect(&config.etcd).await?,
        };
        let addr = if config.server.advertise.is_empty() {
            advertised(addr, &config.etcd.endpoints)
        } else {
            config.server.advertise.clone()
        };
        if health.is_some() {
            // It follows its control keys (drain, weight): operators may use them.
            metadata.insert(control::FOLLOWS.into(), "1".into());
        }
        let instance = Instance {
            addr,
            zone: config.registry.zone.clone(),
            weight: config.registry.weight,
            version: config.registry.version.clone(),
            metadata,
        };
        let value = serde_json::to_string(&instance).map_err(|e| Error::Config(e.to_string()))?;
        let entries = services
            .iter()
            .map(|name| (instance_key(&config.etcd.prefix, name, &presence.instance_id), value.clone()))
            .collect();
        let session = RegistrySession::start(client.clone(), config.registry.ttl_secs, entries).await?;
        if let Some(admin) = &presence.admin {
            admin.add_source(session.metrics_source(&presence.instance_id));
        }
        if let Some(health) = health {
            let names = services.iter().map(|s| (*s).to_owned()).collect();
            let (in_force, follower) =
                control::follow(client, &config.etcd.prefix, &presence.instance_id, names, instance, &session);
            presence.control_tasks.push(follower);
            presence.control_tasks.push(tokio::spawn(drained_not_serving(in_force, health.clone())));
        }
        presence.registry = Some(session);
        Ok(presence)
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The admin endpoint's address, when enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(AdminServer::local_addr)
    }

    /// The registry session, when registration is enabled.
    pub fn registry(&self) -> Option<&RegistrySession> {
        self.registry.as_ref()
    }

    /// Leaves the registry: stops following the control keys and revokes
    /// the lease, so watchers drop the instance. Says whether it was
    /// registered (then watchers need a moment before the listener stops).
    pub async fn deregister(&mut self) -> bool {
        for task in self.control_tasks.drain(..) {
            task.abort();
        }
        match self.registry.take() {
            Some(registry) => {
                registry.close().await;
                true
            }
            None => false,
        }
    }

    /// Deregisters if still registered, then stops the admin endpoint.
    pub async fn stop(mut self) {
        self.deregister().await;
        if let Some(admin) = self.admin.take() {
            admin.stop().await;
        }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        for task in &self.control_tasks {
            task.abort();
        }
    }
}

/// A service an operator drained answers NOT_SERVING to health checks while
/// it is out of rotation, and SERVING again when it is put back.
async fn drained_not_serving(mut in_force: watch::Receiver<control::InForce>, health: HealthReporter) {
    let mut drained = std::collections::BTreeSet::new();
    while in_force.changed().await.is_ok() {
        let now: std::collections::BTreeSet<String> =
            in_force.borrow_and_update().iter().filter(|(_, c)| c.drained).map(|(s, _)| s.clone()).collect();
        for service in now.symmetric_difference(&drained) {
            let status = if now.contains(service) { ServingStatus::NotServing } else { ServingStatus::Serving };
            health.set_service_status(service, status).await;
        }
        drained = now;
    }
}

/// How long a connection may stay silent before the kernel probes its peer,
/// and between probes.
const TCP_KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(10), Duration::from_secs(5), 4);
/// How long data sent may go unacknowledged before the connection is closed.
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Dead peers are found by the kernel, as Go's listeners do: keepalive
/// probes on a connection idle for 10 s (closed after 4 unanswered, 5 s
/// apart) and a 30 s limit on unacknowledged data, so a client whose host
/// died or whose network is cut is closed within about 30 s, its calls
/// cancelled. Accepted connections inherit these from the listener.
fn watch_peers(listener: &TcpListener) -> Result<()> {
    let socket = socket2::SockRef::from(listener);
    let (idle, interval, probes) = TCP_KEEPALIVE;
    let keepalive = socket2::TcpKeepalive::new().with_time(idle).with_interval(interval).with_retries(probes);
    socket.set_tcp_keepalive(&keepalive)?;
    socket.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT))?;
    Ok(())
}

fn routes_of(builder: RoutesBuilder) -> Routes {
    builder.routes()
}

/// Server layer: every call's status and latency into `meshkit_server_*`,
/// and its span, the child of the caller's; the instance's name on the
/// response ([`INSTANCE_HEADER`]).
#[derive(Debug, Clone)]
struct MetricsLayer {
    instance: Option<HeaderValue>,
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService { inner, instance: self.instance.clone() }
    }
}

#[derive(Debug, Clone)]
struct MetricsService<S> {
    inner: S,
    instance: Option<HeaderValue>,
}

impl<S, B> Service<http::Request<B>> for MetricsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let record = meshkit_telemetry::metrics::CallRecord::server(req.uri().path(), req.headers());
        let inner = self.inner.call(req).instrument(record.span().clone());
        MetricsFuture { inner, record: Some(record), instance: self.instance.clone() }
    }
}

pin_project_lite::pin_project! {
    /// The call's response, its body wrapped to record the status when the
    /// trailers come; a call that fails before answering is not recorded.
    struct MetricsFuture<F> {
        #[pin]
        inner: tracing::instrument::Instrumented<F>,
        record: Option<meshkit_telemetry::metrics::CallRecord>,
        instance: Option<HeaderValue>,
    }
}

impl<F, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll(cx))?;
        let (mut parts, body) = res.into_parts();
        if let Some(value) = this.instance.take() {
            // A ready-made name: inserting by `&str` parses it on every call.
            const INSTANCE: http::HeaderName = http::HeaderName::from_static(INSTANCE_HEADER);
            parts.headers.insert(INSTANCE, value);
        }
        let body = match this.record.take() {
            Some(record) => Body::new(meshkit_telemetry::metrics::ObservedBody::new(body, record, &parts.headers)),
            None => body,
        };
        std::task::Poll::Ready(Ok(http::Response::from_parts(parts, body)))
    }
}

/// The address to register when none is configured: the bound one, or, when
/// bound to every interface (`0.0.0.0`, `::`, as in a container), the
/// interface address that routes to etcd, which is the one the rest of the
/// mesh can reach (a UDP `connect` picks the route without sending anything).
pub fn advertised(local: SocketAddr, etcd_endpoints: &[String]) -> String {
    if !local.ip().is_unspecified() {
        return local.to_string();
    }
    use std::net::ToSocketAddrs;
    for endpoint in etcd_endpoints {
        let hostport = endpoint.trim_start_matches("http://").trim_start_matches("https://");
        let Ok(mut addrs) = hostport.to_socket_addrs() else { continue };
        let Some(target) = addrs.next() else { continue };
        let bind: SocketAddr =
            if target.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
        if let Ok(ip) = std::net::UdpSocket::bind(bind).and_then(|s| s.connect(target).and_then(|()| s.local_addr())) {
            return SocketAddr::new(ip.ip(), local.port()).to_string();
        }
    }
    local.to_string()
}

/// The configured `registry.instance_id`, or a fresh one when empty.
fn instance_id_of(config: &MeshConfig) -> String {
    if config.registry.instance_id.is_empty() { new_instance_id() } else { config.registry.instance_id.clone() }
}

/// `{pid}-{random}`: unique per process, readable in logs.
pub fn new_instance_id() -> String {
    let random = uuid::Uuid::now_v7().simple().to_string();
    format!("{}-{}", std::process::id(), &random[random.len() - 10..])
}

/// A started server; dropping it without [`shutdown`](Self::shutdown) stops
/// serving abruptly and leaves the lease to expire by TTL.
pub struct RunningServer {
    /// The admin endpoint and the registration.
    presence: Presence,
    local_addr: SocketAddr,
    services: Vec<&'static str>,
    health: HealthReporter,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<()>>,
    on_shutdown: Vec<ShutdownHook>,
    drain_delay: Duration,
    drain_timeout: Duration,
}

impl RunningServer {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn instance_id(&self) -> &str {
        self.presence.instance_id()
    }

    /// The admin endpoint's address, when enabled.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.presence.admin_addr()
    }

    /// The registry session, when registration is enabled.
    pub fn registry(&self) -> Option<&RegistrySession> {
        self.presence.registry()
    }

    /// Serves until `stop` resolves (e.g. [`Signals::recv`](meshkit_base::shutdown::Signals::recv)),
    /// then drains.
    pub async fn run_until(mut self, stop: impl std::future::Future<Output = ()>) -> Result<()> {
        tokio::select! {
            _ = stop => self.shutdown().await,
            result = &mut self.task => {
                // The server stopped on its own: report why.
                self.presence.deregister().await;
                self.run_shutdown_hooks().await;
                result.map_err(|e| Error::Io(std::io::Error::other(e)))?
            }
        }
    }

    /// Drains: NOT_SERVING, revoke the lease, give watchers `drain_delay` to
    /// drop this instance, stop accepting, then wait (up to `drain_timeout`)
    /// for in-flight calls.
    pub async fn shutdown(mut self) -> Result<()> {
        let started = Instant::now();
        self.health.set_service_status("", ServingStatus::NotServing).await;
        for name in &self.services {
            self.health.set_service_status(*name, ServingStatus::NotServing).await;
        }
        if self.presence.deregister().await {
            tokio::time::sleep(self.drain_delay).await;
        }
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let outcome = match tokio::time::timeout(self.drain_timeout, &mut self.task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(Error::Io(std::io::Error::other(join))),
            Err(_) => {
                tracing::warn!(
                    timeout_ms = self.drain_timeout.as_millis() as u64,
                    "in-flight calls outlived the drain timeout"
                );
                self.task.abort();
                Ok(())
            }
        };
        self.run_shutdown_hooks().await;
        if let Some(admin) = self.presence.admin.take() {
            admin.stop().await;
        }
        tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "drained");
        outcome
    }

    async fn run_shutdown_hooks(&mut self) {
        let hooks = std::mem::take(&mut self.on_shutdown);
        if hooks.is_empty() {
            return;
        }
        if tokio::time::timeout(self.drain_timeout, futures::future::join_all(hooks)).await.is_err() {
            tracing::warn!("background workers outlived the drain timeout");
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if self.stop.is_some() {
            self.task.abort();
        }
    }
}

/// Delays every call by a fixed time: fault injection for chaos drills.
#[derive(Debug, Clone, Copy)]
struct FaultDelayLayer(Duration);

impl<S> tower::Layer<S> for FaultDelayLayer {
    type Service = FaultDelay<S>;

    fn layer(&self, inner: S) -> Self::Service {
        FaultDelay { inner, delay: self.0 }
    }
}

#[derive(Debug, Clone)]
struct FaultDelay<S> {
    inner: S,
    delay: Duration,
}

impl<S, R> Service<R> for FaultDelay<S>
where
    S: Service<R> + Clone + Send + 'static,
    S::Future: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<S::Future, futures::future::BoxFuture<'static, Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: R) -> Self::Future {
        let fut = self.inner.call(req);
        if self.delay.is_zero() {
            return futures::future::Either::Left(fut);
        }
        let delay = self.delay;
        futures::future::Either::Right(Box::pin(async move {
            tokio::time::sleep(delay).await;
            fut.await
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_are_watched_by_the_kernel() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a listener");
        watch_peers(&listener).expect("keepalive settings");
        let _client =
            tokio::net::TcpStream::connect(listener.local_addr().expect("an address")).await.expect("a client");
        let (accepted, _) = listener.accept().await.expect("a connection");
        let socket = socket2::SockRef::from(&accepted);
        assert!(socket.keepalive().expect("SO_KEEPALIVE"), "keepalive is off on an accepted connection");
        let (idle, interval, probes) = TCP_KEEPALIVE;
        assert_eq!(socket.tcp_keepalive_time().expect("TCP_KEEPIDLE"), idle);
        assert_eq!(socket.tcp_keepalive_interval().expect("TCP_KEEPINTVL"), interval);
        assert_eq!(socket.tcp_keepalive_retries().expect("TCP_KEEPCNT"), probes);
        assert_eq!(socket.tcp_user_timeout().expect("TCP_USER_TIMEOUT"), Some(TCP_USER_TIMEOUT));
    }

    #[test]
    fn a_wildcard_bind_advertises_the_address_that_reaches_etcd() {
        let any: SocketAddr = "0.0.0.0:50051".parse().expect("an address");
        assert_eq!(advertised(any, &["127.0.0.1:2379".into()]), "127.0.0.1:50051");
        let via_url = advertised(any, &["http://127.0.0.2:2379".into()]);
        assert!(via_url.starts_with("127.") && via_url.ends_with(":50051"), "{via_url}");
        let bound: SocketAddr = "127.0.0.1:7000".parse().expect("an address");
        assert_eq!(advertised(bound, &["10.0.0.1:2379".into()]), "127.0.0.1:7000");
    }
}
