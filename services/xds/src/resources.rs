//! The xDS v3 resources of one registered service `S`, as gRPC's xDS clients
//! read them (gRFC A27, A28, A44, A52):
//!
//! - Listener `S`: an `api_listener` HttpConnectionManager that takes its
//!   routes from RDS (`S`) over ADS, with the router filter, last.
//! - RouteConfiguration `S`: one virtual host; each method the contracts mark
//!   `NO_SIDE_EFFECTS` or `IDEMPOTENT` gets an exact-path route to cluster `S`
//!   with a retry policy on UNAVAILABLE (meshkit's channels retry the same
//!   methods); a last route sends everything else to `S` without retries.
//!   A split by version replaces a route's `cluster` with `weighted_clusters`.
//! - Cluster `S`: EDS over ADS, round robin.
//! - ClusterLoadAssignment `S`: one locality per instance (zone = its zone,
//!   sub-zone = its instance id) whose weight is the instance's registered
//!   weight. gRPC's default policy for a round-robin cluster weighs localities
//!   (`xds_wrr_locality`, gRFC A52) but ignores endpoint weights, so the
//!   registered weights reach every gRPC client this way. A client whose node
//!   names a zone gets that zone's instances at priority 0 and the others at
//!   priority 1: it fails over to other zones only when its own has none ready.

use std::{sync::Arc, time::Duration};

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{Cluster, cluster},
            core::v3::{
                AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality, SocketAddress, address,
                config_source, socket_address,
            },
            endpoint::v3::{ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint},
            listener::v3::{ApiListener, Listener},
            route::v3::{
                Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
                retry_policy::RetryBackOff, route, route_action, route_match, weighted_cluster::ClusterWeight,
            },
        },
        extensions::filters::{
            http::router::v3::Router,
            network::http_connection_manager::v3::{
                HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
            },
        },
    },
    google::protobuf::{Any, UInt32Value},
};
use meshkit_common::methods::MethodTable;
use prost::Message;

use crate::catalog::Service;

pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const CONNECTION_MANAGER: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";

/// Attempts a call to an idempotent method gets in all, as meshkit's own
/// channels allow by default (`governance.retry.*.max_attempts`).
const ATTEMPTS: u32 = 3;

/// The four resource types served, in the order a client asks for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Listener,
    Route,
    Cluster,
    Endpoints,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Listener, Kind::Route, Kind::Cluster, Kind::Endpoints];

    pub fn from_type_url(url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|kind| kind.type_url() == url)
    }

    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Listener => LISTENER,
            Kind::Route => ROUTE,
            Kind::Cluster => CLUSTER,
            Kind::Endpoints => ENDPOINTS,
        }
    }

    /// The short name metrics and `meshctl xds clients` show.
    pub fn short(self) -> &'static str {
        match self {
            Kind::Listener => "lds",
            Kind::Route => "rds",
            Kind::Cluster => "cds",
            Kind::Endpoints => "eds",
        }
    }

    /// Listeners and clusters: a subscribed name left out of a response is
    /// gone. Routes and endpoints: left out says nothing.
    pub fn omission_deletes(self) -> bool {
        matches!(self, Kind::Listener | Kind::Cluster)
    }
}

fn any(type_url: &str, message: &impl Message) -> Any {
    Any { type_url: type_url.to_owned(), value: message.encode_to_vec() }
}

fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

fn duration(d: Duration) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

pub fn listener(service: &str) -> Any {
    let manager = HttpConnectionManager {
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: service.to_owned(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".into(),
            config_type: Some(http_filter::ConfigType::TypedConfig(any(ROUTER, &Router::default()))),
            ..Default::default()
        }],
        ..Default::default()
    };
    let listener = Listener {
        name: service.to_owned(),
        api_listener: Some(ApiListener { api_listener: Some(any(CONNECTION_MANAGER, &manager)) }),
        ..Default::default()
    };
    any(LISTENER, &listener)
}

/// The routes of `service`: to its cluster, or, under a traffic split, to
/// `split`'s clusters (one per version, `(cluster, weight)`) by weight.
pub fn route_config(service: &str, methods: &MethodTable, split: &[(Arc<str>, u32)]) -> Any {
    let clusters = || {
        if split.is_empty() {
            return route_action::ClusterSpecifier::Cluster(service.to_owned());
        }
        let clusters = split
            .iter()
            .map(|(name, weight)| ClusterWeight {
                name: name.to_string(),
                weight: Some(UInt32Value { value: *weight }),
                ..Default::default()
            })
            .collect();
        route_action::ClusterSpecifier::WeightedClusters(WeightedCluster { clusters, ..Default::default() })
    };
    let to_cluster = |retry: bool| RouteAction {
        cluster_specifier: Some(clusters()),
        retry_policy: retry.then(|| envoy_types::pb::envoy::config::route::v3::RetryPolicy {
            retry_on: "unavailable".into(),
            num_retries: Some(UInt32Value { value: ATTEMPTS - 1 }),
            retry_back_off: Some(RetryBackOff {
                base_interval: Some(duration(Duration::from_millis(25))),
                max_interval: Some(duration(Duration::from_millis(250))),
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let route = |path: route_match::PathSpecifier, retry: bool| Route {
        r#match: Some(RouteMatch { path_specifier: Some(path), ..Default::default() }),
        action: Some(route::Action::Route(to_cluster(retry))),
        ..Default::default()
    };
    let mut routes: Vec<Route> = methods
        .of_service(service)
        .into_iter()
        .filter(|(_, info)| info.idempotent && !info.client_streaming)
        .map(|(path, _)| route(route_match::PathSpecifier::Path(path.to_owned()), true))
        .collect();
    routes.push(route(route_match::PathSpecifier::Prefix(String::new()), false));
    let config = RouteConfiguration {
        name: service.to_owned(),
        virtual_hosts: vec![VirtualHost {
            name: service.to_owned(),
            domains: vec!["*".into()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    };
    any(ROUTE, &config)
}

pub fn cluster(service: &str) -> Any {
    let cluster = Cluster {
        name: service.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: service.to_owned(),
        }),
        lb_policy: cluster::LbPolicy::RoundRobin as i32,
        ..Default::default()
    };
    any(CLUSTER, &cluster)
}

/// The endpoints of `service` as a client in `zone` ("" for none) sees them.
pub fn load_assignment(service: &Service, zone: &str) -> Any {
    let local = !zone.is_empty() && service.endpoints.iter().any(|e| e.zone == zone);
    let endpoints = service
        .endpoints
        .iter()
        .map(|e| LocalityLbEndpoints {
            locality: Some(Locality { region: String::new(), zone: e.zone.clone(), sub_zone: e.id.clone() }),
            lb_endpoints: vec![LbEndpoint {
                health_status: HealthStatus::Healthy as i32,
                load_balancing_weight: Some(UInt32Value { value: e.weight }),
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(envoy_types::pb::envoy::config::core::v3::Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: e.addr.ip().to_string(),
                            port_specifier: Some(socket_address::PortSpecifier::PortValue(u32::from(e.addr.port()))),
                            ..Default::default()
                        })),
                    }),
                    hostname: e.id.clone(),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            load_balancing_weight: Some(UInt32Value { value: e.weight }),
            priority: u32::from(local && e.zone != zone),
            ..Default::default()
        })
        .collect();
    let assignment = ClusterLoadAssignment { cluster_name: service.name.to_string(), endpoints, ..Default::default() };
    any(ENDPOINTS, &assignment)
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::catalog::Endpoint as Instance;

    const USER: &str = "meshkit.user.v1.UserService";

    fn decode<M: Message + Default>(resource: &Any, type_url: &str) -> M {
        assert_eq!(resource.type_url, type_url);
        M::decode(resource.value.as_slice()).expect("decodes")
    }

    fn instance(id: &str, addr: &str, zone: &str, weight: u32) -> Instance {
        Instance {
            id: id.into(),
            addr: addr.parse::<SocketAddr>().unwrap(),
            zone: zone.into(),
            weight,
            version: String::new(),
        }
    }

    #[test]
    fn the_listener_takes_its_routes_from_rds_and_ends_with_the_router() {
        let listener: Listener = decode(&listener(USER), LISTENER);
        assert_eq!(listener.name, USER);
        let manager: HttpConnectionManager =
            decode(listener.api_listener.unwrap().api_listener.as_ref().unwrap(), CONNECTION_MANAGER);
        let Some(http_connection_manager::RouteSpecifier::Rds(rds)) = manager.route_specifier else {
            panic!("not RDS")
        };
        assert_eq!(rds.route_config_name, USER);
        assert!(matches!(
            rds.config_source.unwrap().config_source_specifier,
            Some(config_source::ConfigSourceSpecifier::Ads(_))
        ));
        let last = manager.http_filters.last().unwrap();
        assert_eq!(last.name, "envoy.filters.http.router");
        let Some(http_filter::ConfigType::TypedConfig(router)) = &last.config_type else { panic!("no typed config") };
        assert_eq!(router.type_url, ROUTER);
    }

    #[test]
    fn idempotent_methods_are_retried_and_the_rest_are_not() {
        let config: RouteConfiguration = decode(&route_config(USER, &MethodTable::meshkit(), &[]), ROUTE);
        let routes = &config.virtual_hosts[0].routes;
        let described: Vec<(String, Option<u32>)> = routes
            .iter()
            .map(|r| {
                let path = match r.r#match.as_ref().unwrap().path_specifier.as_ref().unwrap() {
                    route_match::PathSpecifier::Path(p) => p.clone(),
                    route_match::PathSpecifier::Prefix(p) => format!("prefix:{p}"),
                    other => panic!("unexpected {other:?}"),
                };
                let Some(route::Action::Route(action)) = &r.action else { panic!("not a route action") };
                assert_eq!(action.cluster_specifier, Some(route_action::ClusterSpecifier::Cluster(USER.into())));
                let retries = action.retry_policy.as_ref().map(|p| {
                    assert_eq!(p.retry_on, "unavailable");
                    p.num_retries.unwrap().value
                });
                (path, retries)
            })
            .collect();
        assert_eq!(
            described,
            [
                (format!("/{USER}/GetUser"), Some(2)),
                (format!("/{USER}/ListUsers"), Some(2)),
                ("prefix:".to_owned(), None),
            ]
        );
        // A service the contracts do not know: every method without retries.
        let config: RouteConfiguration = decode(&route_config("other.Service", &MethodTable::meshkit(), &[]), ROUTE);
        assert_eq!(config.virtual_hosts[0].routes.len(), 1);
    }

    #[test]
    fn a_split_routes_every_method_to_the_version_clusters_by_weight() {
        let split = [(Arc::from(format!("{USER}@spring-1")), 90), (Arc::from(format!("{USER}@0.1.0")), 10)];
        let config: RouteConfiguration = decode(&route_config(USER, &MethodTable::meshkit(), &split), ROUTE);
        let routes = &config.virtual_hosts[0].routes;
        assert_eq!(routes.len(), 3, "the same routes, retries kept");
        for r in routes {
            let Some(route::Action::Route(action)) = &r.action else { panic!("not a route action") };
            let Some(route_action::ClusterSpecifier::WeightedClusters(weighted)) = &action.cluster_specifier else {
                panic!("not weighted: {action:?}")
            };
            let clusters: Vec<(&str, u32)> =
                weighted.clusters.iter().map(|c| (c.name.as_str(), c.weight.unwrap().value)).collect();
            assert_eq!(clusters, [(&*format!("{USER}@spring-1"), 90), (&*format!("{USER}@0.1.0"), 10)]);
        }
    }

    #[test]
    fn the_cluster_reads_its_endpoints_from_eds() {
        let cluster: Cluster = decode(&cluster(USER), CLUSTER);
        assert_eq!(
            cluster.cluster_discovery_type,
            Some(cluster::ClusterDiscoveryType::Type(cluster::DiscoveryType::Eds as i32))
        );
        assert_eq!(cluster.eds_cluster_config.unwrap().service_name, USER);
        assert_eq!(cluster.lb_policy, cluster::LbPolicy::RoundRobin as i32);
    }

    #[test]
    fn each_instance_is_a_locality_weighted_as_registered_and_the_clients_zone_comes_first() {
        let service = Service::new(
            USER,
            1,
            vec![
                instance("a-1", "127.0.0.1:5001", "a", 300),
                instance("a-2", "127.0.0.1:5002", "a", 100),
                instance("b-1", "[::1]:5003", "b", 100),
            ],
        );
        let summary = |zone: &str| -> Vec<(String, String, u32, u32, String)> {
            let assignment: ClusterLoadAssignment = decode(&load_assignment(&service, zone), ENDPOINTS);
            assert_eq!(assignment.cluster_name, USER);
            assignment
                .endpoints
                .iter()
                .map(|l| {
                    let locality = l.locality.clone().unwrap();
                    let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = &l.lb_endpoints[0].host_identifier
                    else {
                        panic!("no endpoint")
                    };
                    let Some(address::Address::SocketAddress(socket)) = &endpoint.address.as_ref().unwrap().address
                    else {
                        panic!("no socket address")
                    };
                    let Some(socket_address::PortSpecifier::PortValue(port)) = socket.port_specifier else { panic!() };
                    (
                        format!("{}/{}", locality.zone, locality.sub_zone),
                        format!("{}:{port}", socket.address),
                        l.load_balancing_weight.unwrap().value,
                        l.priority,
                        endpoint.hostname.clone(),
                    )
                })
                .collect()
        };
        let row =
            |loc: &str, addr: &str, weight, priority, id: &str| (loc.into(), addr.into(), weight, priority, id.into());
        assert_eq!(
            summary("b"),
            [
                row("a/a-1", "127.0.0.1:5001", 300, 1, "a-1"),
                row("a/a-2", "127.0.0.1:5002", 100, 1, "a-2"),
                row("b/b-1", "::1:5003", 100, 0, "b-1"),
            ]
        );
        // No zone, or a zone without instances: every instance at priority 0.
        for zone in ["", "c"] {
            assert!(summary(zone).iter().all(|r| r.3 == 0), "zone {zone:?}");
        }
    }
}
