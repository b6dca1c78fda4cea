//! One trace across the order flow: the gateway, order-service, user-service,
//! Kafka and notification-service, each a real process exporting over OTLP to
//! a receiver in this test.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{net::SocketAddr, time::Duration};

use etcd_client::GetOptions;
use meshkit_integration_tests::{
    Broker, Etcd, ServiceProcess, eventually, free_port,
    http::{json_request, send},
    otlp::{Collector, Received},
    sqlite_url,
};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

struct Flow {
    _etcd: Etcd,
    _broker: Broker,
    dir: tempfile::TempDir,
    _processes: Vec<ServiceProcess>,
    gateway: SocketAddr,
}

async fn start(collector: &Collector) -> Flow {
    let etcd = Etcd::start().await.unwrap();
    let broker = Broker::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let common = |db: &str| {
        vec![
            ("MESHKIT_ETCD_ENDPOINTS", etcd.endpoint()),
            ("MESHKIT_EVENTS_BROKERS", broker.endpoint()),
            ("MESHKIT_EVENTS_FETCH_MAX_WAIT_MS", "50".into()),
            ("MESHKIT_EVENTS_RELAY_POLL_MS", "20".into()),
            ("MESHKIT_REGISTRY_TTL_SECS", "2".into()),
            ("MESHKIT_SERVER_LISTEN", format!("127.0.0.1:{}", free_port())),
            ("MESHKIT_DATABASE_URL", sqlite_url(dir.path(), db)),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ]
    };
    let port = free_port();
    let mut gateway_env = common("unused");
    gateway_env.push(("MESHKIT_GATEWAY_LISTEN", format!("127.0.0.1:{port}")));
    let processes = vec![
        ServiceProcess::spawn("user-service", &common("user"), dir.path()).unwrap(),
        ServiceProcess::spawn("order-service", &common("order"), dir.path()).unwrap(),
        ServiceProcess::spawn("notification-service", &common("notification"), dir.path()).unwrap(),
        ServiceProcess::spawn("meshkit-gateway", &gateway_env, dir.path()).unwrap(),
    ];
    let gateway: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Every process registered (the gateway last), so no call finds a service missing.
    let client = etcd.client().await;
    eventually("every process registers", Duration::from_secs(20), || {
        let mut client = client.clone();
        async move {
            let keys =
                client.get("/meshkit/services/", Some(GetOptions::new().with_prefix().with_keys_only())).await.ok()?;
            // order-service registers its JobExecutor too.
            (keys.kvs().len() == 5).then_some(())
        }
    })
    .await;
    Flow { _etcd: etcd, _broker: broker, dir, _processes: processes, gateway }
}

/// The one span of `trace` matching `what`.
fn one<'a>(trace: &'a [Received], what: &str, pick: impl Fn(&Received) -> bool) -> &'a Received {
    let found: Vec<&Received> = trace.iter().filter(|s| pick(s)).collect();
    assert_eq!(found.len(), 1, "expected one {what} span, found {}: {trace:#?}", found.len());
    found[0]
}

fn rpc(received: &Received, service: &str, kind: SpanKind, method: &str) -> bool {
    received.service == service && received.kind() == kind && received.span.name == method
}

fn assert_rpc_attributes(span: &Received, service: &str, method: &str) {
    assert_eq!(span.attr("rpc.system").as_deref(), Some("grpc"), "{span:#?}");
    assert_eq!(span.attr("rpc.service").as_deref(), Some(service), "{span:#?}");
    assert_eq!(span.attr("rpc.method").as_deref(), Some(method), "{span:#?}");
    assert_eq!(span.attr("rpc.grpc.status_code").as_deref(), Some("0"), "{span:#?}");
}

#[tokio::test]
async fn an_order_is_one_trace_from_the_gateway_through_kafka() {
    let collector = Collector::start().await.unwrap();
    let flow = start(&collector).await;
    let addr = flow.gateway;
    let user = eventually("the cluster serves through the gateway", Duration::from_secs(20), || async {
        let r = send(addr, json_request("POST", addr, "/v1/users", r#"{"name":"T","email":"t@example.com"}"#))
            .await
            .ok()?;
        (r.status == 200).then(|| r.json())
    })
    .await;
    let user_id = user["id"].as_str().unwrap().to_owned();
    // The gateway reaches order-service too (a read, safe to repeat) before
    // the one order whose trace is checked.
    eventually("the gateway serves order-service", Duration::from_secs(20), || async {
        let path = format!("/v1/users/{user_id}/orders");
        let r = send(addr, json_request("GET", addr, &path, "")).await.ok()?;
        (r.status == 200).then_some(())
    })
    .await;

    // The caller's own trace context: every span below must join it.
    let body = format!(r#"{{"userId":"{user_id}","items":[{{"sku":"s-1","quantity":2}}]}}"#);
    let mut request = json_request("POST", addr, "/v1/orders", &body);
    request.headers_mut().insert("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01").parse().unwrap());
    let created = send(addr, request).await.unwrap();
    assert_eq!(created.status, 200, "{}", created.text());

    eventually("the notification's span arrives", Duration::from_secs(20), || async {
        collector.trace(TRACE_ID).iter().any(|s| s.service == "notification-service").then_some(())
    })
    .await;
    // Late exports (the client spans end with their response bodies).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let trace = collector.trace(TRACE_ID);

    const ORDER: &str = "meshkit.order.v1.OrderService";
    const USER: &str = "meshkit.user.v1.UserService";
    let create_order = format!("{ORDER}/CreateOrder");
    let get_user = format!("{USER}/GetUser");

    // gateway: REST server span (child of the caller) → client span.
    let edge = one(&trace, "gateway server", |s| s.service == "meshkit-gateway" && s.kind() == SpanKind::Server);
    assert_eq!(edge.parent_id(), CALLER_SPAN);
    assert_eq!(edge.span.name, "POST /v1/orders");
    assert_eq!(edge.attr("http.request.method").as_deref(), Some("POST"));
    assert_eq!(edge.attr("http.route").as_deref(), Some("/v1/orders"));
    assert_eq!(edge.attr("http.response.status_code").as_deref(), Some("200"));
    let edge_call = one(&trace, "gateway client", |s| rpc(s, "meshkit-gateway", SpanKind::Client, &create_order));
    assert_eq!(edge_call.parent_id(), edge.span_id());
    assert_rpc_attributes(edge_call, ORDER, "CreateOrder");

    // order: server span → GetUser client span → user's server span.
    let order = one(&trace, "order server", |s| rpc(s, "order-service", SpanKind::Server, &create_order));
    assert_eq!(order.parent_id(), edge_call.span_id());
    assert_rpc_attributes(order, ORDER, "CreateOrder");
    let lookup = one(&trace, "order → user client", |s| rpc(s, "order-service", SpanKind::Client, &get_user));
    assert_eq!(lookup.parent_id(), order.span_id());
    assert_rpc_attributes(lookup, USER, "GetUser");
    let user_span = one(&trace, "user server", |s| rpc(s, "user-service", SpanKind::Server, &get_user));
    assert_eq!(user_span.parent_id(), lookup.span_id());
    assert_rpc_attributes(user_span, USER, "GetUser");

    // The event: created in order's transaction, processed by notification.
    let produced = one(&trace, "producer", |s| s.service == "order-service" && s.kind() == SpanKind::Producer);
    assert_eq!(produced.parent_id(), order.span_id());
    assert_eq!(produced.span.name, "create order-events");
    let consumed = one(&trace, "consumer", |s| s.service == "notification-service" && s.kind() == SpanKind::Consumer);
    assert_eq!(consumed.parent_id(), produced.span_id(), "the record carried the producer's context");
    assert_eq!(consumed.span.name, "process order-events");
    assert_eq!(consumed.attr("messaging.system").as_deref(), Some("kafka"));
    assert_eq!(consumed.attr("messaging.destination.name").as_deref(), Some("order-events"));
    assert_eq!(consumed.attr("messaging.operation.type").as_deref(), Some("process"));
    assert_eq!(consumed.attr("messaging.message.id"), produced.attr("messaging.message.id"));
    assert_eq!(consumed.attr("meshkit.outcome").as_deref(), Some("applied"));

    for span in &trace {
        let failed = span.span.status.as_ref().is_some_and(|s| s.code == StatusCode::Error as i32);
        assert!(!failed, "no span of a successful flow failed: {span:#?}");
        assert!(span.span.end_time_unix_nano >= span.span.start_time_unix_nano);
    }
    // Nothing else joined the caller's trace.
    assert_eq!(trace.len(), 7, "{trace:#?}");
    drop(flow.dir);
}

#[tokio::test]
async fn a_failed_call_is_marked_on_both_sides_with_its_grpc_code() {
    let collector = Collector::start().await.unwrap();
    let flow = start(&collector).await;
    let addr = flow.gateway;
    eventually("the cluster serves through the gateway", Duration::from_secs(20), || async {
        let r = send(addr, json_request("POST", addr, "/v1/users", r#"{"name":"T","email":"f@example.com"}"#))
            .await
            .ok()?;
        (r.status == 200).then_some(())
    })
    .await;
    let missing = "0193f0f6-0000-7000-8000-000000000000";
    let mut request = json_request("GET", addr, &format!("/v1/users/{missing}"), "");
    request.headers_mut().insert("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01").parse().unwrap());
    let reply = send(addr, request).await.unwrap();
    assert_eq!(reply.status, 404, "{}", reply.text());

    let trace = eventually("the user-service span arrives", Duration::from_secs(10), || async {
        let trace = collector.trace(TRACE_ID);
        (trace.iter().any(|s| s.service == "user-service") && trace.len() >= 3).then_some(trace)
    })
    .await;
    let get_user = "meshkit.user.v1.UserService/GetUser";
    let client = one(&trace, "gateway client", |s| rpc(s, "meshkit-gateway", SpanKind::Client, get_user));
    let server = one(&trace, "user server", |s| rpc(s, "user-service", SpanKind::Server, get_user));
    // NOT_FOUND (5): a failure for the caller, not for the server that answered it.
    assert_eq!(client.attr("rpc.grpc.status_code").as_deref(), Some("5"));
    assert_eq!(server.attr("rpc.grpc.status_code").as_deref(), Some("5"));
    assert_eq!(client.span.status.as_ref().map(|s| s.code), Some(StatusCode::Error as i32));
    assert_ne!(server.span.status.as_ref().map(|s| s.code), Some(StatusCode::Error as i32));
    let edge = one(&trace, "gateway server", |s| s.service == "meshkit-gateway" && s.kind() == SpanKind::Server);
    assert_eq!(edge.attr("http.response.status_code").as_deref(), Some("404"));
    assert_eq!(edge.span.name, "GET /v1/users/{id}");
}
