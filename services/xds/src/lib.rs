//! meshkit's xDS server: the registry served to gRPC's own xDS clients
//! (grpc-java with `grpc-xds`, grpc-go's `xds` package, C++, Python), so a
//! Java or Go caller balances over meshkit instances with `xds:///{service}`
//! and no meshkit code in its language.
//!
//! It is a process of its own (`xds-server`), registered like every meshkit
//! process (health, reflection, admin, metrics) under the ADS service's name,
//! rather than a part of a business service: a mesh runs one or a few,
//! scaled and restarted apart from the services, and any number can serve at
//! once since each follows etcd itself and holds no state of its own.
#![forbid(unsafe_code)]

pub mod ads;
pub mod catalog;
pub mod resources;

use std::sync::atomic::Ordering;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use meshkit_common::{Mesh, MeshConfig, MeshServer, RunningServer, methods::MethodTable, metrics};
use tokio::sync::watch;

pub use ads::{Ads, ClientView};
pub use catalog::Catalog;
use resources::Kind;

/// The component name: config scope and registration metadata.
pub const COMPONENT: &str = "xds";

/// The name the server registers under, that of the service it serves.
pub const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";

/// A running xDS server.
pub struct XdsServer {
    pub server: RunningServer,
    pub ads: Ads,
    closing: watch::Sender<bool>,
}

impl XdsServer {
    /// Serves until `stop`, then ends every stream (clients reconnect to
    /// another xDS server, or keep their last view) and drains.
    pub async fn run_until(self, stop: impl Future<Output = ()>) -> meshkit_common::Result<()> {
        let closing = self.closing;
        self.server
            .run_until(async move {
                stop.await;
                let _ = closing.send(true);
            })
            .await
    }

    /// Ends every stream and drains now.
    pub async fn shutdown(self) -> meshkit_common::Result<()> {
        let _ = self.closing.send(true);
        self.server.shutdown().await
    }
}

/// Connects etcd, follows the registry, serves ADS and registers.
pub async fn start(config: MeshConfig) -> meshkit_common::Result<XdsServer> {
    let mesh = Mesh::connect(&config, COMPONENT).await?;
    let config = mesh.config();
    let splits = mesh.center.section(|c| c.governance.split.clone());
    let catalog = Catalog::start(mesh.etcd.clone(), &config.etcd.prefix, splits);
    let (closing, closed) = watch::channel(false);
    let identifier = format!("meshkit-xds/{}", config.registry.instance_id);
    let ads = Ads::new(catalog.clone(), MethodTable::meshkit(), identifier, closed);
    let report = ads.clone();
    let server = MeshServer::new(config)
        .with_mesh(&mesh)
        .metadata("component", COMPONENT)
        .add_service(AggregatedDiscoveryServiceServer::new(ads.clone()))
        .report("xds", move || {
            serde_json::json!({
                "services": catalog.current().services.len(),
                "clients": report.clients(),
            })
        })
        .metrics(metrics_source(&ads))
        .start()
        .await?;
    Ok(XdsServer { server, ads, closing })
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct TypeLabel {
    r#type: &'static str,
}

fn metrics_source(ads: &Ads) -> metrics::Source {
    let ads = ads.clone();
    metrics::source(move || {
        let clients = ads.clients().len();
        let stats = ads.stats();
        async move {
            let mut scrape = metrics::Scrape::default();
            scrape.gauge("meshkit_xds_clients", "xDS streams open now.").set(clients as f64);
            scrape
                .counter("meshkit_xds_streams", "xDS streams opened since start.")
                .inc_by(stats.streams.load(Ordering::Relaxed));
            scrape
                .counter("meshkit_xds_stale_requests", "Requests with an outdated nonce, ignored.")
                .inc_by(stats.stale.load(Ordering::Relaxed));
            let families = [
                ("meshkit_xds_responses", "Responses sent, by resource type.", &stats.responses),
                ("meshkit_xds_acks", "Responses clients accepted (ACK), by resource type.", &stats.acks),
                ("meshkit_xds_nacks", "Responses clients refused (NACK), by resource type.", &stats.nacks),
            ];
            for (name, help, counts) in families {
                let family = scrape.counters::<TypeLabel>(name, help);
                for kind in Kind::ALL {
                    family
                        .get_or_create(&TypeLabel { r#type: kind.short() })
                        .inc_by(counts[kind as usize].load(Ordering::Relaxed));
                }
            }
            scrape
        }
    })
}
