//! meshctl against a live mesh: registry listings from etcd, pools from a
//! process's admin endpoint, and clear errors for bad input.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use meshkit_common::ChannelBuilder;
use meshkit_integration_tests::{Etcd, create_user, init_logs, mesh_config, meshctl, sqlite_url};

#[tokio::test]
async fn lists_services_instances_leases_and_pools() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let user = meshkit_user::start(mesh_config(&etcd, &sqlite_url(dir.path(), "user")).into()).await.unwrap();
    let order = meshkit_order::start(mesh_config(&etcd, &sqlite_url(dir.path(), "order")).into()).await.unwrap();
    // Traffic through order-service's pool, so it has something to show.
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit");
    create_user(&channels.balanced("meshkit.user.v1.UserService"), "Ada", "ada@example.com").await;

    let (code, out, err) = meshctl(&etcd, &["services"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("meshkit.user.v1.UserService") && out.contains("meshkit.order.v1.OrderService"), "{out}");

    let (code, out, _) = meshctl(&etcd, &["instances"]).await;
    assert_eq!(code, 0);
    assert!(out.contains(user.instance_id()) && out.contains(&user.local_addr().to_string()), "{out}");
    let lease = user.registry().unwrap().lease_id().unwrap().to_string();
    assert!(out.contains(&lease), "lease id missing: {out}");
    let (_, only_orders, _) = meshctl(&etcd, &["instances", "meshkit.order.v1.OrderService"]).await;
    assert!(only_orders.contains(order.instance_id()) && !only_orders.contains(user.instance_id()), "{only_orders}");

    let (code, out, _) = meshctl(&etcd, &["leases"]).await;
    assert_eq!(code, 0);
    assert!(out.contains(&lease), "{out}");

    // order-service's pool of user-service, by instance id and by address.
    let (code, out, err) = meshctl(&etcd, &["pools", order.instance_id()]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("meshkit.user.v1.UserService") && out.contains(user.instance_id()), "{out}");
    assert!(out.contains("ready"), "{out}");
    let admin = order.admin_addr().unwrap().to_string();
    let (code, by_addr, _) = meshctl(&etcd, &["pools", &admin]).await;
    assert_eq!(code, 0);
    assert!(by_addr.contains(user.instance_id()), "{by_addr}");

    let (code, _, err) = meshctl(&etcd, &["pools", "no-such-instance"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("no-such-instance"), "{err}");
    let (code, _, err) = meshctl(&etcd, &["frobnicate"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("unknown command") && err.contains("usage"), "{err}");

    user.shutdown().await.unwrap();
    order.shutdown().await.unwrap();
}

/// meshctl checks `config set` against the sections each reference service
/// reads without linking the services: those sections must be the services' own.
#[test]
fn meshctl_checks_each_component_against_the_sections_it_reads() {
    use meshkit_common::config::{Settings, defaults};
    fn sections<C: Settings>() -> std::collections::BTreeSet<String> {
        defaults::<C>().expect("defaults form a table").keys().cloned().collect()
    }
    for (component, own) in [
        ("user", sections::<meshkit_user::Config>()),
        ("order", sections::<meshkit_order::Config>()),
        ("notification", sections::<meshkit_notification::Config>()),
        ("scheduler", sections::<meshkit_scheduler::Config>()),
        ("gateway", sections::<meshkit_gateway::GatewayConfig>()),
    ] {
        assert_eq!(meshkit_meshctl::sections_of(component), Some(own), "{component}");
    }
    assert_eq!(meshkit_meshctl::sections_of("payments"), None, "an unknown component");
}
