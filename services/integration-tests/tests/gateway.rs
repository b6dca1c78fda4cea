//! The gateway end to end: REST/JSON, gRPC passthrough (every streaming
//! kind), grpc-web, reflection, JWT and limits, in front of two instances of
//! each service found through real etcd.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{collections::HashSet, net::SocketAddr, path::PathBuf, time::Duration};

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use http::Request;
use http_body_util::Full;
use meshkit_common::{RunningServer, server::INSTANCE_HEADER};
use meshkit_gateway::GatewaySettings;
use meshkit_gateway::RunningGateway;
use meshkit_integration_tests::TestConfig;
use meshkit_integration_tests::{
    Broker, Etcd, ServiceProcess,
    echo::{self, ECHO_DESCRIPTOR_SET, EchoRequest, EchoServiceClient, ExpandRequest, FailRequest},
    eventually,
    http::{Reply, json_request, send, send_h2},
    init_logs, mesh_config, sqlite_url,
};
use meshkit_proto::user::{CreateUserRequest, GetUserRequest, user_service_client::UserServiceClient};
use prost::Message;
use serde_json::{Value, json};
use tonic::Code;

struct Cluster {
    addr: SocketAddr,
    _broker: Option<Broker>,
    gateway: Option<RunningGateway>,
    servers: Vec<RunningServer>,
    etcd: Etcd,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// etcd, two instances each of user, order and echo, and a gateway
    /// with `tweak` applied to its settings.
    async fn start(tweak: impl FnOnce(&mut GatewaySettings)) -> Self {
        Self::start_with(false, tweak).await
    }

    /// With `events`, also a Kafka broker and two notification instances.
    async fn start_with(events: bool, tweak: impl FnOnce(&mut GatewaySettings)) -> Self {
        init_logs();
        let etcd = Etcd::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let broker = if events { Some(Broker::start().await.unwrap()) } else { None };
        let mut servers = Vec::new();
        let notifications = if events { 2 } else { 0 };
        for (name, n) in [("user", 2), ("order", 2), ("echo", 2), ("notification", notifications)] {
            let mut config = mesh_config(&etcd, &sqlite_url(dir.path(), name));
            if let Some(b) = &broker {
                config.events.brokers = vec![b.endpoint()];
            }
            for _ in 0..n {
                let server = match name {
                    "user" => meshkit_user::start(config.clone().into()).await.unwrap(),
                    "order" => meshkit_order::start(config.clone().into()).await.unwrap(),
                    "notification" => meshkit_notification::start(config.clone().into()).await.unwrap(),
                    _ => echo::start_echo(config.clone()).await.unwrap(),
                };
                servers.push(server);
            }
        }
        let descriptors = dir.path().join("echo.binpb");
        std::fs::write(&descriptors, ECHO_DESCRIPTOR_SET).unwrap();
        let mut config: TestConfig = mesh_config(&etcd, "sqlite::memory:");
        config.gateway.listen = "127.0.0.1:0".into();
        config.gateway.descriptor_sets = vec![descriptors.display().to_string()];
        tweak(&mut config.gateway);
        let gateway = meshkit_gateway::start(config.into()).await.unwrap();
        Self { addr: gateway.local_addr(), _broker: broker, gateway: Some(gateway), servers, etcd, dir }
    }

    async fn rest(&self, method: &str, path: &str, body: &str) -> Reply {
        send(self.addr, json_request(method, self.addr, path, body)).await.unwrap()
    }

    async fn stop(mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await;
        }
        for s in self.servers.drain(..) {
            s.shutdown().await.unwrap();
        }
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

#[tokio::test]
async fn rest_creates_gets_and_pages_through_two_instances_each() {
    let c = Cluster::start(|_| {}).await;
    let user = c.rest("POST", "/v1/users", r#"{"name":"Ada","email":"ada@example.com"}"#).await;
    assert_eq!(user.status, 200, "{}", user.text());
    let user = user.json();
    let uid = user["id"].as_str().unwrap().to_owned();
    assert!(user["createTime"].as_str().unwrap().ends_with('Z'), "{user}");

    let mut served_by = HashSet::new();
    let path = format!("/v1/users/{uid}");
    for got in futures::future::join_all((0..40).map(|_| c.rest("GET", &path, ""))).await {
        assert_eq!(got.status, 200);
        assert_eq!(got.json()["email"], "ada@example.com");
        served_by.insert(got.headers[INSTANCE_HEADER].to_str().unwrap().to_owned());
    }
    assert_eq!(served_by.len(), 2, "both user instances answer: {served_by:?}");

    let mut ids = Vec::new();
    for i in 0..5 {
        // Numbers as strings and as numbers, original and lowerCamelCase names.
        let body = if i % 2 == 0 {
            json!({"userId": uid, "items": [{"sku": format!("sku-{i}"), "quantity": "2"}]})
        } else {
            json!({"user_id": uid, "items": [{"sku": format!("sku-{i}"), "quantity": 3}]})
        };
        let order = c.rest("POST", "/v1/orders", &body.to_string()).await;
        assert_eq!(order.status, 200, "{}", order.text());
        let order = order.json();
        assert_eq!(order["status"], "ORDER_STATUS_PENDING");
        ids.push(order["id"].as_str().unwrap().to_owned());
    }
    let got = c.rest("GET", &format!("/v1/orders/{}", ids[0]), "").await.json();
    assert_eq!(got["items"][0], json!({"sku": "sku-0", "quantity": 2}));

    // Paging through the user's orders, two at a time, on both bindings.
    for base in [format!("/v1/users/{uid}/orders?page_size=2"), format!("/v1/orders?userId={uid}&pageSize=2")] {
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let path = if token.is_empty() { base.clone() } else { format!("{base}&page_token={token}") };
            let page = c.rest("GET", &path, "").await;
            assert_eq!(page.status, 200, "{}", page.text());
            let page = page.json();
            for o in page["orders"].as_array().unwrap() {
                seen.push(o["id"].as_str().unwrap().to_owned());
            }
            match page["nextPageToken"].as_str() {
                Some(t) if !t.is_empty() => token = t.to_owned(),
                _ => break,
            }
        }
        assert_eq!(seen, ids, "{base}");
    }
    let users = c.rest("GET", "/v1/users?page_size=1", "").await.json();
    assert_eq!(users["users"].as_array().unwrap().len(), 1);
    c.stop().await;
}

#[tokio::test]
async fn an_order_placed_over_rest_reaches_the_users_notifications() {
    let c = Cluster::start_with(true, |_| {}).await;
    let user = c.rest("POST", "/v1/users", r#"{"name":"N","email":"n@example.com"}"#).await.json();
    let uid = user["id"].as_str().unwrap().to_owned();
    let mut orders = Vec::new();
    for i in 0..4 {
        let body = json!({"userId": uid, "items": [{"sku": format!("n-{i}"), "quantity": 1}]}).to_string();
        orders.push(c.rest("POST", "/v1/orders", &body).await.json()["id"].as_str().unwrap().to_owned());
    }
    // Through Kafka to notification-service, then read back over REST, two per page.
    let path = format!("/v1/users/{uid}/notifications?page_size=2");
    let (mut messages, pages) = eventually("four notifications", Duration::from_secs(20), || async {
        let (mut messages, mut pages, mut token) = (Vec::new(), 0, String::new());
        loop {
            let url = if token.is_empty() { path.clone() } else { format!("{path}&pageToken={token}") };
            let page = c.rest("GET", &url, "").await.json();
            pages += 1;
            for n in page["notifications"].as_array()? {
                messages.push(n["message"].as_str()?.to_owned());
            }
            match page["nextPageToken"].as_str() {
                Some(t) if !t.is_empty() => token = t.to_owned(),
                _ => break,
            }
        }
        (messages.len() == 4).then_some((messages, pages))
    })
    .await;
    assert!(pages >= 2, "two per page: {pages} page(s)");
    messages.sort();
    assert_eq!(messages.len(), 4, "{messages:?}");
    for order in &orders {
        assert!(messages.iter().any(|m| m.contains(order.as_str())), "{order} not in {messages:?}");
    }
    c.stop().await;
}

#[tokio::test]
async fn errors_map_to_http_statuses_with_a_json_body() {
    let c = Cluster::start(|g| g.max_body_bytes = 2048).await;
    // From the services themselves.
    let missing = c.rest("GET", &format!("/v1/users/{}", uuid_like()), "").await;
    assert_eq!((missing.status.as_u16(), missing.json()["code"].as_i64()), (404, Some(5)), "{}", missing.text());
    assert!(missing.json()["details"].is_array());
    let bad = c.rest("POST", "/v1/users", r#"{"name":"","email":"x@example.com"}"#).await;
    assert_eq!(bad.status, 400);
    assert!(bad.json()["message"].as_str().unwrap().starts_with("name: "), "{}", bad.text());
    // The broken rules, as the service's google.rpc.BadRequest lists them.
    let detail = &bad.json()["details"][0];
    assert_eq!(detail["@type"], "type.googleapis.com/google.rpc.BadRequest", "{}", bad.text());
    assert_eq!(detail["fieldViolations"][0]["field"], "name", "{}", bad.text());
    assert_eq!(detail["fieldViolations"][0]["reason"], "required", "{}", bad.text());
    assert_eq!(detail["fieldViolations"][0]["description"], "value is required", "{}", bad.text());
    let bad = c.rest("GET", "/v1/users?page_size=-2147483648&page_token=x", "").await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    let body = bad.json();
    let fields: Vec<&str> = body["details"][0]["fieldViolations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["page_size", "page_token"], "{}", bad.text());
    c.rest("POST", "/v1/users", r#"{"name":"B","email":"b@example.com"}"#).await;
    let dup = c.rest("POST", "/v1/users", r#"{"name":"B","email":"b@example.com"}"#).await;
    assert_eq!((dup.status.as_u16(), dup.json()["code"].as_i64()), (409, Some(6)), "{}", dup.text());
    let no_user = c
        .rest("POST", "/v1/orders", &json!({"userId": uuid_like(), "items": [{"sku": "a", "quantity": 1}]}).to_string())
        .await;
    assert_eq!((no_user.status.as_u16(), no_user.json()["code"].as_i64()), (400, Some(9)), "{}", no_user.text());

    // Every code, from a service that fails as asked.
    for (code, http) in [
        (Code::Cancelled, 499),
        (Code::Unknown, 500),
        (Code::InvalidArgument, 400),
        (Code::DeadlineExceeded, 504),
        (Code::NotFound, 404),
        (Code::AlreadyExists, 409),
        (Code::PermissionDenied, 403),
        (Code::ResourceExhausted, 429),
        (Code::FailedPrecondition, 400),
        (Code::Aborted, 409),
        (Code::OutOfRange, 400),
        (Code::Unimplemented, 501),
        (Code::Internal, 500),
        (Code::Unavailable, 503),
        (Code::DataLoss, 500),
        (Code::Unauthenticated, 401),
    ] {
        let body = json!({"code": code as i32, "message": format!("because {code:?}")}).to_string();
        let r = c.rest("POST", "/v1/fail", &body).await;
        assert_eq!(r.status.as_u16(), http, "{code:?}: {}", r.text());
        assert_eq!(r.json()["code"].as_i64(), Some(code as i64), "{code:?}");
        assert_eq!(r.json()["message"], format!("because {code:?}"));
    }

    // Bad input, refused by the gateway with a message naming the problem.
    let cases: Vec<(Reply, u16, &str)> = vec![
        (c.rest("POST", "/v1/users", "{\"name\": ").await, 400, "malformed JSON"),
        (c.rest("POST", "/v1/users", r#"{"name":"a","email":"a@b.co","age":3}"#).await, 400, "age"),
        (c.rest("PUT", "/v1/echo", r#"{"big":"twelve"}"#).await, 400, "big"),
        (c.rest("PUT", "/v1/echo", r#"{"tone":"TONE_SHOUTING"}"#).await, 400, "tone"),
        (c.rest("PUT", "/v1/echo", r#"{"at":"yesterday"}"#).await, 400, "at"),
        (c.rest("PUT", "/v1/echo", "[]").await, 400, "JSON object"),
        (c.rest("GET", "/v1/expand/x?times=lots", "").await, 400, "times"),
        (c.rest("GET", "/v1/echo/x?flag=maybe", "").await, 400, "flag"),
        (c.rest("GET", "/v1/echo/x?nope=1", "").await, 400, "nope"),
        (c.rest("GET", "/v1/echo/%FF%FE", "").await, 400, "UTF-8"),
        (c.rest("GET", "/v1/users/not-an-id", "").await, 400, "id"),
        (c.rest("PUT", "/v1/echo", &format!("{{\"text\":\"{}\"}}", "x".repeat(4096))).await, 413, "max_body_bytes"),
        (c.rest("GET", "/v2/nothing", "").await, 404, "no route for GET /v2/nothing"),
        (c.rest("DELETE", "/v1/users", "").await, 405, "not allowed"),
        (c.rest("GET", &format!("/v1/users/{}/notifications", uuid_like()), "").await, 503, "no live instance"),
    ];
    for (reply, status, needle) in cases {
        assert_eq!(reply.status.as_u16(), status, "{needle}: {}", reply.text());
        let message = reply.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }
    let wrong_type = Request::post(format!("http://{}/v1/users", c.addr))
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(b"name=a")))
        .unwrap();
    let r = send(c.addr, wrong_type).await.unwrap();
    assert_eq!(r.status, 415, "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap().contains("text/plain"));
    let deadline = Request::get(format!("http://{}/v1/echo/x", c.addr))
        .header("grpc-timeout", "1n")
        .body(Full::default())
        .unwrap();
    let r = send(c.addr, deadline).await.unwrap();
    assert_eq!(r.status, 504, "{}", r.text());
    let huge = Request::get(format!("http://{}/v1/echo/x", c.addr))
        .header("x-big", "y".repeat(64 << 10))
        .body(Full::default())
        .unwrap();
    let r = send(c.addr, huge).await.unwrap();
    assert_eq!(r.status, 431, "{}", r.text());
    c.stop().await;
}

#[tokio::test]
async fn json_mapping_and_every_binding_style() {
    let c = Cluster::start(|_| {}).await;
    let sent = json!({
        "text": "a", "big": "9007199254740993", "tone": "TONE_LOUD", "at": "2026-01-02T03:04:05Z",
        "maybe": 7, "numbers": [1, 2], "flag": true, "ratio": 0.5, "blob": "AQI=", "shelf": {"name": "s"}
    });
    let r = c.rest("PUT", "/v1/echo", &sent.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["request"], sent, "every type survives the round trip");
    assert_eq!(r.json()["count"], "1", "int64 renders as a string");

    // body: "payload", nested path variable with a segment pattern, a verb, query parameters.
    let r = c
        .rest(
            "POST",
            "/v1/shelves/s%201/echo:say?text=q&big=5&tone=TONE_QUIET&numbers=1&numbers=2&flag=true&maybe=3&at=2026-05-06T07:08:09Z",
            r#"{"note":"n","tags":["x","y"]}"#,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["request"],
        json!({"text": "q", "shelf": {"name": "shelves/s 1"}, "payload": {"note": "n", "tags": ["x", "y"]}, "big": "5",
               "tone": "TONE_QUIET", "numbers": [1, 2], "flag": true, "maybe": 3, "at": "2026-05-06T07:08:09Z"})
    );
    let r = c.rest("PATCH", "/v1/echo/t1", r#"{"note":"p"}"#).await.json();
    assert_eq!(r["request"], json!({"text": "t1", "payload": {"note": "p"}}));
    let r = c.rest("DELETE", "/v1/echo/t2", "").await.json();
    assert_eq!(r["request"], json!({"text": "t2"}));
    let r = c.rest("GET", "/v1/files/a/b/c.txt", "").await.json();
    assert_eq!(r["request"]["text"], "a/b/c.txt");
    // A server-streaming method answers a JSON array.
    let r = c.rest("GET", "/v1/expand/w?times=3", "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let items: Vec<String> =
        r.json().as_array().unwrap().iter().map(|m| m["request"]["text"].as_str().unwrap().to_owned()).collect();
    assert_eq!(items, ["w-0", "w-1", "w-2"]);

    // The OpenAPI document covers the extra contract too.
    let doc = c.rest("GET", "/openapi.json", "").await.json();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/{shelf.name}/echo:say"]["post"].is_object(), "{}", doc["paths"]);
    assert!(doc["paths"]["/v1/users/{id}"]["get"].is_object());
    c.stop().await;
}

#[tokio::test]
async fn grpc_passes_through_unchanged_with_every_streaming_kind() {
    let c = Cluster::start(|_| {}).await;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", c.addr)).unwrap();
    let channel = endpoint.connect().await.unwrap();
    let mut users = UserServiceClient::new(channel.clone());
    let created =
        users.create_user(CreateUserRequest { name: "G".into(), email: "g@example.com".into() }).await.unwrap();
    let got = users.get_user(GetUserRequest { id: created.get_ref().id.clone() }).await.unwrap();
    assert_eq!(got.get_ref(), created.get_ref());
    assert!(got.metadata().get(INSTANCE_HEADER).is_some(), "upstream headers pass through");
    let missing = users.get_user(GetUserRequest { id: uuid_like() }).await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert!(missing.message().contains(&uuid_like()), "{missing:?}");

    let mut echo = EchoServiceClient::new(channel.clone());
    let status =
        echo.fail(FailRequest { code: Code::Aborted as i32, message: "trailers intact".into() }).await.unwrap_err();
    assert_eq!((status.code(), status.message()), (Code::Aborted, "trailers intact"));
    // Server streaming: 2,000 messages, in order.
    let mut stream = echo.expand(ExpandRequest { text: "s".into(), times: 2000 }).await.unwrap().into_inner();
    let mut n = 0;
    while let Some(reply) = stream.message().await.unwrap() {
        assert_eq!(reply.count, n + 1);
        n += 1;
    }
    assert_eq!(n, 2000);
    // Client streaming.
    let requests = futures::stream::iter((0..100).map(|i| EchoRequest { text: i.to_string(), ..Default::default() }));
    let reply = echo.collect(requests).await.unwrap().into_inner();
    assert_eq!(reply.count, 100);
    // Bidirectional, one request answered before the next is sent.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = echo.chat(tokio_stream_wrapper(rx)).await.unwrap().into_inner();
    for i in 0..10 {
        tx.send(EchoRequest { text: format!("m{i}"), ..Default::default() }).await.unwrap();
        let reply = replies.message().await.unwrap().unwrap();
        assert_eq!(reply.request.unwrap().text, format!("m{i}"));
    }
    drop(tx);
    assert!(replies.message().await.unwrap().is_none());

    // An unknown service is refused by name.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let ok = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(ok.get_ref().status, 1, "the gateway answers health itself");
    let raw = send_h2(
        c.addr,
        Request::post(format!("http://{}/no.Such/Method", c.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
            .unwrap(),
    )
    .await
    .unwrap();
    let grpc_status = raw.headers.get("grpc-status").or(raw.trailers.as_ref().and_then(|t| t.get("grpc-status")));
    assert_eq!(grpc_status.unwrap(), "12");

    // grpcurl lists every fronted service through the gateway's reflection, and calls through it.
    let list = grpcurl(&["-plaintext", &c.addr.to_string(), "list"]).await;
    for service in ["meshkit.user.v1.UserService", "meshkit.order.v1.OrderService", echo::ECHO, "grpc.health.v1.Health"]
    {
        assert!(list.contains(service), "{service} not in {list}");
    }
    // Health is described too, so grpcurl can call it by name.
    let health = grpcurl(&["-plaintext", &c.addr.to_string(), "grpc.health.v1.Health/Check"]).await;
    assert!(health.contains("SERVING"), "{health}");
    let out = grpcurl(&[
        "-plaintext",
        "-d",
        &format!("{{\"id\":\"{}\"}}", created.get_ref().id),
        &c.addr.to_string(),
        "meshkit.user.v1.UserService/GetUser",
    ])
    .await;
    assert!(out.contains("g@example.com"), "{out}");
    c.stop().await;
}

#[tokio::test]
async fn calling_side_governance_applies_to_passthrough_once_a_rule_is_set() {
    let c = Cluster::start(|_| {}).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", c.addr)).unwrap().connect().await.unwrap();
    let mut echo = EchoServiceClient::new(channel);
    let fail = FailRequest { code: Code::Internal as i32, message: "failing on purpose".into() };
    // No rule: every failure comes from upstream, as it was sent.
    for _ in 0..10 {
        let status = echo.fail(fail.clone()).await.unwrap_err();
        assert_eq!((status.code(), status.message()), (Code::Internal, "failing on purpose"));
    }
    // A breaker on Fail, written to the config center for the gateway.
    let rule = r#"{"/meshkit.echo.v1.EchoService/Fail":{"breaker":{"enabled":true,"error_ratio":0.5,"min_requests":5,"window_ms":10000,"open_ms":60000}}}"#;
    let mut etcd = c.etcd.client().await;
    etcd.put("/meshkit/config/gateway/governance.methods", rule, None).await.unwrap();
    let refused = eventually("the gateway's breaker opens", Duration::from_secs(10), || {
        let mut echo = echo.clone();
        let fail = fail.clone();
        async move {
            let status = echo.fail(fail).await.unwrap_err();
            (status.code() == Code::Unavailable).then_some(status)
        }
    })
    .await;
    assert!(refused.message().contains("circuit breaker"), "{refused:?}");
    // Refused at the gateway: the other methods of the service still pass.
    let reply = echo.echo(EchoRequest { text: "still served".into(), ..Default::default() }).await.unwrap();
    assert_eq!(reply.get_ref().request.as_ref().map(|r| r.text.as_str()), Some("still served"));
    c.stop().await;
}

#[tokio::test]
async fn grpc_web_binary_and_text_with_cors() {
    let c = Cluster::start(|g| g.cors_origins = vec!["http://app.example".into()]).await;
    let request = meshkit_proto::user::CreateUserRequest { name: "W".into(), email: "w@example.com".into() };
    for (content_type, text) in [("application/grpc-web+proto", false), ("application/grpc-web-text", true)] {
        let mut request = request.clone();
        request.email = format!("{}@example.com", if text { "text" } else { "bin" });
        let mut framed = BytesMut::new();
        framed.put_u8(0);
        framed.put_u32(request.encoded_len() as u32);
        request.encode(&mut framed).unwrap();
        let body =
            if text { Bytes::from(base64::engine::general_purpose::STANDARD.encode(&framed)) } else { framed.freeze() };
        let req = Request::post(format!("http://{}/meshkit.user.v1.UserService/CreateUser", c.addr))
            .header("content-type", content_type)
            .header("accept", content_type)
            .header("x-grpc-web", "1")
            .header("origin", "http://app.example")
            .body(Full::new(body))
            .unwrap();
        let reply = send(c.addr, req).await.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.headers["access-control-allow-origin"], "http://app.example");
        let raw = if text { decode_base64_chunks(&reply.body) } else { reply.body.to_vec() };
        let (messages, trailers) = grpc_web_frames(&raw);
        assert!(trailers.contains("grpc-status:0"), "{trailers}");
        let user = meshkit_proto::user::User::decode(messages[0].as_slice()).unwrap();
        assert_eq!(user.email, request.email);
    }
    // Server streaming over grpc-web: every message, then the trailers.
    let request = ExpandRequest { text: "web".into(), times: 50 };
    let mut framed = BytesMut::new();
    framed.put_u8(0);
    framed.put_u32(request.encoded_len() as u32);
    request.encode(&mut framed).unwrap();
    let req = Request::post(format!("http://{}/meshkit.echo.v1.EchoService/Expand", c.addr))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(Full::new(framed.freeze()))
        .unwrap();
    let reply = send(c.addr, req).await.unwrap();
    let (messages, trailers) = grpc_web_frames(&reply.body);
    assert_eq!(messages.len(), 50);
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let last = echo::EchoReply::decode(messages[49].as_slice()).unwrap();
    assert_eq!(last.request.unwrap().text, "web-49");

    // Preflight.
    let preflight = Request::builder()
        .method("OPTIONS")
        .uri(format!("http://{}/meshkit.user.v1.UserService/CreateUser", c.addr))
        .header("origin", "http://app.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type,x-grpc-web")
        .body(Full::default())
        .unwrap();
    let reply = send(c.addr, preflight).await.unwrap();
    assert_eq!(reply.headers["access-control-allow-origin"], "http://app.example");
    assert!(reply.headers["access-control-allow-headers"].to_str().unwrap().contains("x-grpc-web"));
    c.stop().await;
}

#[tokio::test]
async fn jwt_policies_accept_and_refuse() {
    let jwks = fixture("jwks.json").display().to_string();
    let c = Cluster::start(|g| {
        g.jwt.hs256_secret = "test-secret".into();
        g.jwt.jwks_file = jwks;
        g.jwt.issuer = "meshkit-tests".into();
        g.jwt.rules = vec![
            meshkit_gateway::settings::AuthRule {
                methods: vec!["meshkit.user.v1.UserService/GetUser".into()],
                policy: "public".into(),
                roles: vec![],
            },
            meshkit_gateway::settings::AuthRule {
                methods: vec!["meshkit.echo.v1.EchoService/*".into()],
                policy: "authenticated".into(),
                roles: vec!["echoer".into()],
            },
            meshkit_gateway::settings::AuthRule {
                methods: vec!["*".into()],
                policy: "authenticated".into(),
                roles: vec![],
            },
        ];
    })
    .await;
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600;
    let hs = |claims: Value| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(b"test-secret"),
        )
        .unwrap()
    };
    let rs = |claims: Value| {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
        header.kid = Some("test-key-1".into());
        let pem = std::fs::read(fixture("jwt-test-rs256.pem")).unwrap();
        jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
    };
    let echoer = rs(json!({"sub": "ann", "iss": "meshkit-tests", "exp": exp, "roles": ["echoer"]}));
    let plain = hs(json!({"sub": "bob", "iss": "meshkit-tests", "exp": exp}));
    let expired = hs(json!({"sub": "bob", "iss": "meshkit-tests", "exp": 1_000}));
    let with = |method: &str, path: &str, token: Option<&str>, body: &str| {
        let mut req = json_request(method, c.addr, path, body);
        if let Some(t) = token {
            req.headers_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
        }
        req
    };
    let body = r#"{"name":"J","email":"j@example.com"}"#;
    let r = send(c.addr, with("POST", "/v1/users", None, body)).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.headers["www-authenticate"], "Bearer");
    assert!(r.json()["message"].as_str().unwrap().contains("requires a bearer token"));
    // Refused before its body is read: malformed JSON gets the same 401.
    let r = send(c.addr, with("POST", "/v1/users", None, "{\"name\": ")).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    let r = send(c.addr, with("POST", "/v1/users", Some(&expired), body)).await.unwrap();
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap().contains("invalid bearer token"), "{}", r.text());
    let r = send(c.addr, with("POST", "/v1/users", Some(&plain), body)).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let r = send(c.addr, with("GET", &format!("/v1/users/{id}"), None, "")).await.unwrap();
    assert_eq!(r.status, 200, "public method");
    let r = send(c.addr, with("GET", "/v1/echo/x", Some(&plain), "")).await.unwrap();
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.json()["message"].as_str().unwrap().contains("echoer"));
    let r = send(c.addr, with("GET", "/v1/echo/x", Some(&echoer), "")).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["request"]["payload"]["note"], "subject=ann", "verified claims reach the service as metadata");
    // A forged identity header is dropped.
    let mut forged = with("GET", "/v1/echo/x", Some(&echoer), "");
    forged.headers_mut().insert("x-meshkit-subject", "root".parse().unwrap());
    assert_eq!(send(c.addr, forged).await.unwrap().json()["request"]["payload"]["note"], "subject=ann");

    // The same policy over gRPC.
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", c.addr)).unwrap().connect().await.unwrap();
    let mut echo = EchoServiceClient::new(channel);
    let err = echo.echo(EchoRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut req = tonic::Request::new(EchoRequest::default());
    req.metadata_mut().insert("authorization", format!("Bearer {plain}").parse().unwrap());
    assert_eq!(echo.echo(req).await.unwrap_err().code(), Code::PermissionDenied);
    let mut req = tonic::Request::new(EchoRequest::default());
    req.metadata_mut().insert("authorization", format!("Bearer {echoer}").parse().unwrap());
    echo.echo(req).await.unwrap();
    c.stop().await;
}

#[tokio::test]
async fn per_client_rate_limit_refuses_the_excess() {
    let c = Cluster::start(|g| {
        g.rate_limit_per_sec = 5;
        g.rate_limit_burst = 5;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..15 {
        let r = c.rest("GET", "/v1/echo/x", "").await;
        if r.status == 429 {
            assert!(r.headers.contains_key("retry-after"));
            assert!(r.json()["message"].as_str().unwrap().contains("rate limit"), "{}", r.text());
        }
        statuses.push(r.status.as_u16());
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!((5..=7).contains(&ok) && ok + limited == 15, "{statuses:?}");
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", c.addr)).unwrap().connect().await.unwrap();
    let err = EchoServiceClient::new(channel).echo(EchoRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let _ = &c.dir;
    c.stop().await;
}

#[tokio::test]
async fn python_grpcio_and_grpc_web_clients_work_through_the_gateway() {
    let c = Cluster::start(|_| {}).await;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let proto_dir = root.join("../../proto");
    let out = tokio::process::Command::new("python3")
        .arg(root.join("clients/python/client.py"))
        .args(["--target", &c.addr.to_string(), "--proto-dir"])
        .arg(&proto_dir)
        .args(["--email", "py@example.com"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "python client: {}", String::from_utf8_lossy(&out.stderr));
    let py: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(py["order_status"], "ORDER_STATUS_PENDING");
    assert_eq!(py["listed"], json!([py["order_id"]]));
    assert_eq!(py["missing_user"], "NOT_FOUND");

    let web_dir = root.join("clients/grpc-web");
    assert!(
        web_dir.join("node_modules").exists(),
        "the grpc-web client's packages are missing: run deploy/local/install-deps.sh --test"
    );
    let descriptors = c.dir.path().join("meshkit.binpb");
    std::fs::write(&descriptors, meshkit_proto::FILE_DESCRIPTOR_SET).unwrap();
    let out = tokio::process::Command::new("node")
        .arg(web_dir.join("client.mjs"))
        .args(["--base-url", &format!("http://{}", c.addr), "--descriptors"])
        .arg(&descriptors)
        .args(["--email", "web@example.com"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "grpc-web client: {}", String::from_utf8_lossy(&out.stderr));
    let web: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(web["quantity"], 3);
    assert_eq!(web["missing_user"], "NOT_FOUND");
    // Both clients' users exist, seen over REST.
    let listed = c.rest("GET", "/v1/users?page_size=10", "").await.json();
    let emails: HashSet<&str> =
        listed["users"].as_array().unwrap().iter().map(|u| u["email"].as_str().unwrap()).collect();
    assert_eq!(emails, HashSet::from(["py@example.com", "web@example.com"]));
    c.stop().await;
}

#[tokio::test]
async fn the_gateway_binary_serves_and_drains_on_sigterm() {
    let c = Cluster::start(|_| {}).await;
    let port = meshkit_integration_tests::free_port();
    let etcd = c.etcd.endpoint();
    let env = [("MESHKIT_ETCD_ENDPOINTS", etcd.clone()), ("MESHKIT_GATEWAY_LISTEN", format!("127.0.0.1:{port}"))];
    let mut gateway = ServiceProcess::spawn("meshkit-gateway", &env, c.dir.path()).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let created = eventually("the gateway process answers", Duration::from_secs(10), || async {
        let r = send(addr, json_request("POST", addr, "/v1/users", r#"{"name":"P","email":"p@example.com"}"#))
            .await
            .ok()?;
        (r.status == 200).then_some(r)
    })
    .await;
    assert!(created.json()["id"].is_string());
    gateway.signal(15);
    let status = gateway.wait_exit(Duration::from_secs(5)).await.expect("the gateway exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "nothing listens after the drain");

    // Two workers share one listener and one per-client allowance.
    let port = meshkit_integration_tests::free_port();
    let limited = [
        ("MESHKIT_ETCD_ENDPOINTS", etcd.clone()),
        ("MESHKIT_GATEWAY_LISTEN", format!("127.0.0.1:{port}")),
        ("MESHKIT_GATEWAY_WORKERS", "2".into()),
        ("MESHKIT_GATEWAY_RATE_LIMIT_PER_SEC", "5".into()),
        ("MESHKIT_GATEWAY_RATE_LIMIT_BURST", "5".into()),
    ];
    let mut gateway = ServiceProcess::spawn("meshkit-gateway", &limited, c.dir.path()).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually("the limited gateway listens", Duration::from_secs(10), || async {
        tokio::net::TcpStream::connect(addr).await.ok()
    })
    .await;
    let mut ok = 0;
    for _ in 0..20 {
        // Each request on a new connection, so both workers take some.
        if send(addr, json_request("GET", addr, "/openapi.json", "")).await.unwrap().status == 200 {
            ok += 1;
        }
    }
    let mut admitted = 0;
    for _ in 0..20 {
        let r = send(addr, json_request("GET", addr, "/v1/users?page_size=1", "")).await.unwrap();
        if r.status != 429 {
            admitted += 1;
        }
    }
    assert_eq!(ok, 20, "the document is not rate limited");
    assert!((5..=8).contains(&admitted), "{admitted} of 20 admitted: the allowance is per client, not per worker");
    gateway.signal(15);
    assert!(gateway.wait_exit(Duration::from_secs(5)).await.expect("exits").success());

    // A bad setting stops it at once, naming the setting.
    let bad = [("MESHKIT_ETCD_ENDPOINTS", etcd), ("MESHKIT_GATEWAY_LISTEN", "nowhere".into())];
    let mut gateway = ServiceProcess::spawn("meshkit-gateway", &bad, c.dir.path()).unwrap();
    let status = gateway.wait_exit(Duration::from_secs(5)).await.expect("a bad setting stops the gateway");
    assert!(!status.success());
    let logs: String = std::fs::read_dir(c.dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("meshkit-gateway-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(logs.contains("gateway.listen"), "{logs}");
    c.stop().await;
}

// === helpers ===

fn uuid_like() -> String {
    "0190c3a4-0000-7000-8000-000000000000".to_owned()
}

/// Runs grpcurl without blocking the runtime that serves the gateway.
async fn grpcurl(args: &[&str]) -> String {
    let out =
        tokio::process::Command::new("grpcurl").args(args).output().await.expect("grpcurl is installed by make test");
    assert!(out.status.success(), "grpcurl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn tokio_stream_wrapper(rx: tokio::sync::mpsc::Receiver<EchoRequest>) -> impl futures::Stream<Item = EchoRequest> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}

/// Decodes grpc-web-text, which may be several padded base64 chunks.
fn decode_base64_chunks(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in text.chunks(4) {
        out.extend(base64::engine::general_purpose::STANDARD.decode(chunk).unwrap());
    }
    out
}

/// Splits a grpc-web body into its messages and its trailer block.
fn grpc_web_frames(mut raw: &[u8]) -> (Vec<Vec<u8>>, String) {
    let mut messages = Vec::new();
    let mut trailers = String::new();
    while raw.len() >= 5 {
        let len = u32::from_be_bytes([raw[1], raw[2], raw[3], raw[4]]) as usize;
        let payload = raw[5..5 + len].to_vec();
        if raw[0] & 0x80 != 0 {
            trailers = String::from_utf8(payload).unwrap().to_lowercase().replace(' ', "");
        } else {
            messages.push(payload);
        }
        raw = &raw[5 + len..];
    }
    (messages, trailers)
}
