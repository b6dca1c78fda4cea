//! Reference services run as processes against one etcd (a member or a
//! cluster), and what the chaos drills ask of them: who is registered, what
//! each process's pools hold, and steady load through them.

use std::{path::Path, time::Duration};

use etcd_client::{Client, GetOptions};
use meshkit_common::{BalancedChannel, admin::fetch_pools, server::INSTANCE_HEADER};
use meshkit_proto::{
    order::{CreateOrderRequest, OrderItem, order_service_client::OrderServiceClient},
    user::{GetUserRequest, user_service_client::UserServiceClient},
};

use crate::{LoadGen, ServiceProcess, eventually, free_port, netns::Host, sqlite_url};

pub const USER: &str = "meshkit.user.v1.UserService";
pub const ORDER: &str = "meshkit.order.v1.OrderService";

/// Starts `binary` (`user-service`, `order-service`…) as instance `id`
/// against `etcd_endpoints` (`MESHKIT_ETCD_ENDPOINTS`, comma-separated), on a
/// free port with its SQLite file in `dir`, a 2 s lease and a short drain.
pub fn spawn(
    etcd_endpoints: &str,
    dir: &Path,
    binary: &str,
    id: &str,
    extra: &[(&'static str, String)],
) -> ServiceProcess {
    spawn_on(None, etcd_endpoints, dir, binary, id, extra)
}

/// [`spawn`] in `host`'s network namespace, serving on its address.
pub fn spawn_in(
    host: &Host,
    etcd_endpoints: &str,
    dir: &Path,
    binary: &str,
    id: &str,
    extra: &[(&'static str, String)],
) -> ServiceProcess {
    spawn_on(Some(host), etcd_endpoints, dir, binary, id, extra)
}

fn spawn_on(
    host: Option<&Host>,
    etcd_endpoints: &str,
    dir: &Path,
    binary: &str,
    id: &str,
    extra: &[(&'static str, String)],
) -> ServiceProcess {
    let component = binary.trim_end_matches("-service");
    let listen = host.map_or_else(|| format!("127.0.0.1:{}", free_port()), |h| h.addr().to_string());
    let mut env = vec![
        ("MESHKIT_ETCD_ENDPOINTS", etcd_endpoints.to_owned()),
        ("MESHKIT_SERVER_LISTEN", listen),
        ("MESHKIT_DATABASE_URL", sqlite_url(dir, component)),
        ("MESHKIT_REGISTRY_INSTANCE_ID", id.to_owned()),
        ("MESHKIT_REGISTRY_TTL_SECS", "2".to_owned()),
        ("MESHKIT_SERVER_DRAIN_DELAY_MS", "200".to_owned()),
    ];
    env.extend_from_slice(extra);
    let started = match host {
        Some(host) => ServiceProcess::spawn_in(host, binary, &env, dir),
        None => ServiceProcess::spawn(binary, &env, dir),
    };
    match started {
        Ok(process) => process,
        Err(e) => panic!("starting {binary} {id}: {e:#}"),
    }
}

/// The instance ids registered for `service` now; empty when etcd does not answer.
pub async fn registered(etcd: &Client, service: &str) -> Vec<String> {
    let prefix = format!("/meshkit/services/{service}/");
    match etcd.clone().get(prefix.as_str(), Some(GetOptions::new().with_prefix().with_keys_only())).await {
        Ok(resp) => resp
            .kvs()
            .iter()
            .filter_map(|kv| kv.key_str().ok().map(|k| k.trim_start_matches(&prefix).to_owned()))
            .collect(),
        Err(_) => Vec::new(),
    }
}

pub async fn wait_registered(etcd: &Client, service: &str, ids: &[&str]) {
    eventually(&format!("{ids:?} registered"), Duration::from_secs(15), || async {
        let now = registered(etcd, service).await;
        ids.iter().all(|id| now.iter().any(|n| n == id)).then_some(())
    })
    .await;
}

/// The registration of instance `id` of `service`.
pub async fn instance(etcd: &Client, service: &str, id: &str) -> meshkit_common::Instance {
    let key = format!("/meshkit/services/{service}/{id}");
    let resp = match etcd.clone().get(key.as_str(), None).await {
        Ok(resp) => resp,
        Err(e) => panic!("reading {key}: {e}"),
    };
    let Some(kv) = resp.kvs().first() else { panic!("{key} is not registered") };
    match serde_json::from_slice::<meshkit_common::Instance>(kv.value()) {
        Ok(instance) => instance,
        Err(e) => panic!("{key}: {e}"),
    }
}

/// The admin address instance `id` of `service` registered.
pub async fn admin_addr(etcd: &Client, service: &str, id: &str) -> String {
    instance(etcd, service, id).await.metadata.get("admin").cloned().unwrap_or_default()
}

/// The instance ids in the pool that `admin`'s process keeps for `service`.
pub async fn pool_of(admin: &str, service: &str) -> Vec<String> {
    match fetch_pools(admin).await {
        Ok(report) => report.get(service).map(|p| p.endpoints.keys().cloned().collect()).unwrap_or_default(),
        Err(_) => Vec::new(),
    }
}

/// CreateOrder through order-service (which calls GetUser on its user pool).
pub fn order_load(orders: BalancedChannel, user_id: String) -> LoadGen {
    LoadGen::start(4, Duration::from_millis(5), move || {
        let mut client = OrderServiceClient::new(orders.clone());
        let user_id = user_id.clone();
        async move {
            let mut req = tonic::Request::new(CreateOrderRequest {
                user_id,
                items: vec![OrderItem { sku: "book-1".into(), quantity: 1 }],
            });
            req.set_timeout(Duration::from_secs(3));
            client.create_order(req).await.map(|_| None)
        }
    })
}

/// GetUser straight from this process's own pool, noting who served it.
pub fn user_load(users: BalancedChannel, user_id: String, pause: Duration) -> LoadGen {
    LoadGen::start(4, pause, move || {
        let mut client = UserServiceClient::new(users.clone());
        let id = user_id.clone();
        async move {
            let mut req = tonic::Request::new(GetUserRequest { id });
            req.set_timeout(Duration::from_secs(3));
            let resp = client.get_user(req).await?;
            Ok(resp.metadata().get(INSTANCE_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned))
        }
    })
}

/// A counter or gauge summed over the series of `name` whose labels hold every
/// one of `having`, from the admin endpoint's `/metrics`.
pub async fn metric(admin: &str, name: &str, having: &[&str]) -> Option<f64> {
    let text = meshkit_common::admin::http_get(admin, "/metrics").await.ok()?;
    let samples = crate::prometheus::parse(&text);
    let matching: Vec<f64> = samples
        .iter()
        .filter(|(series, _)| series.split('{').next() == Some(name) && having.iter().all(|h| series.contains(h)))
        .map(|(_, v)| *v)
        .collect();
    (!matching.is_empty()).then(|| matching.iter().sum())
}
