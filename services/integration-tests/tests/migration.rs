//! Moving a service from Spring Boot to Rust, as a team does it: the Spring
//! Boot UserService (`services/user-spring`, a real JVM) and the Rust one
//! serve the same contract on the same PostgreSQL tables, registered side by
//! side; `meshctl split` moves the traffic between them live, under steady
//! load through the gateway; one trace crosses both languages; one config
//! center changes both.
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use meshkit_integration_tests::{
    Etcd, LoadGen, Postgres, ServiceProcess, eventually,
    fleet::{self, USER, wait_registered},
    free_port,
    http::{json_request, send},
    meshctl,
    otlp::{Collector, Received},
    spring::{SPRING_VERSION, spawn_user_spring},
};
use meshkit_proto::user::{
    CreateUserRequest, GetUserRequest, ListUsersRequest, user_service_client::UserServiceClient,
};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tokio::time::Instant;

/// The version the Rust user-service registers (its crate's).
const RUST_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One test at a time: each starts PostgreSQL, etcd and JVMs, and three of
/// them starting together on two cores made the Rust instances miss their
/// registration deadline on a loaded machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The gateway as a process, on a free port.
fn spawn_gateway(etcd: &Etcd, dir: &std::path::Path, extra: &[(&'static str, String)]) -> (ServiceProcess, SocketAddr) {
    let port = free_port();
    let mut env = vec![
        ("MESHKIT_ETCD_ENDPOINTS", etcd.endpoint()),
        ("MESHKIT_GATEWAY_LISTEN", format!("127.0.0.1:{port}")),
        ("MESHKIT_REGISTRY_TTL_SECS", "2".to_owned()),
    ];
    env.extend_from_slice(extra);
    let gateway = ServiceProcess::spawn("meshkit-gateway", &env, dir).unwrap();
    (gateway, format!("127.0.0.1:{port}").parse().unwrap())
}

/// Creates a user through the gateway's REST route, retrying until it serves.
async fn create_user(gateway: SocketAddr, email: &str) -> String {
    let body = format!(r#"{{"name":"Grace","email":"{email}"}}"#);
    let user = eventually("the gateway serves CreateUser", Duration::from_secs(30), || async {
        let reply = send(gateway, json_request("POST", gateway, "/v1/users", &body)).await.ok()?;
        (reply.status == 200).then(|| reply.json())
    })
    .await;
    user["id"].as_str().unwrap().to_owned()
}

/// Waits for `ids` to register, failing with the processes' logs.
async fn registered(etcd: &Etcd, ids: &[&str], processes: &[&ServiceProcess], secs: u64) {
    let client = etcd.client().await;
    for _ in 0..secs * 10 {
        let now = fleet::registered(&client, USER).await;
        if ids.iter().all(|id| now.iter().any(|n| n == id)) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let logs: Vec<String> = processes.iter().map(|p| format!("--- {}:\n{}", p.name, p.log())).collect();
    panic!(
        "{ids:?} did not register in {secs} s; registered: {:?}\n{}",
        fleet::registered(&client, USER).await,
        logs.join("\n")
    );
}

/// Sets the split and checks meshctl's answer.
async fn split(etcd: &Etcd, shares: &[&str]) {
    let mut args = vec!["split", USER];
    args.extend_from_slice(shares);
    let (code, out, err) = meshctl(etcd, &args).await;
    assert_eq!(code, 0, "meshctl split {shares:?}: {out}{err}");
}

/// Which instance served each call, and when.
type Served = Arc<Mutex<Vec<(Instant, String)>>>;

/// Counts the calls `served` holds between `from` and `to` by side.
fn shares(served: &Served, from: Instant, to: Instant, java: &[&str]) -> (u64, u64) {
    let served = served.lock().unwrap();
    let window = served.iter().filter(|(at, _)| *at >= from && *at < to);
    let (mut on_java, mut on_rust) = (0, 0);
    for (_, instance) in window {
        if java.contains(&instance.as_str()) {
            on_java += 1;
        } else {
            on_rust += 1;
        }
    }
    (on_java, on_rust)
}

#[tokio::test]
async fn the_migration_walk_moves_traffic_by_version_with_no_failed_call() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let postgres = Postgres::start().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let database = [("MESHKIT_DATABASE_URL", postgres.url())];
    // The Rust instances first: their migrations own the schema.
    let rust = ["rust-1", "rust-2"].map(|id| fleet::spawn(&etcd.endpoint(), dir.path(), "user-service", id, &database));
    let client = etcd.client().await;
    registered(&etcd, &["rust-1", "rust-2"], &[&rust[0], &rust[1]], 30).await;
    // Before any Java instance joins, all traffic stays on Java: the walk's start.
    split(&etcd, &[&format!("{SPRING_VERSION}=100"), &format!("{RUST_VERSION}=0")]).await;
    let mut java =
        ["java-1", "java-2"].map(|id| spawn_user_spring(&etcd.endpoint(), dir.path(), id, &postgres.url(), &[]));
    let (_gateway, gateway) = spawn_gateway(&etcd, dir.path(), &[]);
    registered(&etcd, &["java-1", "java-2"], &[&java[0], &java[1]], 90).await;
    let user_id = create_user(gateway, "grace@example.com").await;

    // Steady load: GetUser through the gateway's gRPC passthrough, each
    // answer's instance noted with its time.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{gateway}")).unwrap().connect_lazy();
    let served: Served = Arc::default();
    let load = {
        let served = served.clone();
        LoadGen::start(4, Duration::from_millis(10), move || {
            let (mut client, served, id) = (UserServiceClient::new(channel.clone()), served.clone(), user_id.clone());
            async move {
                let response = client.get_user(GetUserRequest { id }).await?;
                let by = response.metadata().get("x-meshkit-instance").and_then(|v| v.to_str().ok()).map(str::to_owned);
                if let Some(by) = &by {
                    served.lock().unwrap().push((Instant::now(), by.clone()));
                }
                Ok(by)
            }
        })
    };

    // Each step: set the split, give it half a second to reach the gateway,
    // then judge three seconds of calls.
    let java_ids = ["java-1", "java-2"];
    let mut figures = Vec::new();
    for rust_percent in [0u32, 10, 50, 100, 0, 100] {
        let java_percent = 100 - rust_percent;
        split(&etcd, &[&format!("{SPRING_VERSION}={java_percent}"), &format!("{RUST_VERSION}={rust_percent}")]).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let from = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (on_java, on_rust) = shares(&served, from, Instant::now(), &java_ids);
        let total = on_java + on_rust;
        assert!(total >= 100, "too few calls to judge a share: {total}");
        let measured = on_rust as f64 * 100.0 / total as f64;
        figures.push(format!("Rust {rust_percent}%: {measured:.1}% of {total} calls"));
        assert!(
            (measured - f64::from(rust_percent)).abs() <= 5.0,
            "split {java_percent}/{rust_percent}: Rust served {measured:.1}% of {total} calls ({figures:?})"
        );
    }
    eprintln!("migration walk: {}", figures.join("; "));

    // Retire the Java instances: drained (NOT_SERVING, revoke, finish) and stopped.
    for process in &mut java {
        process.signal(15);
        assert!(process.wait_exit(Duration::from_secs(20)).await.is_some(), "a Spring instance did not stop");
    }
    wait_registered(&client, USER, &["rust-1", "rust-2"]).await;
    let after = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let tally = load.stop().await;
    assert_eq!(tally.failed, 0, "no call may fail during the walk: {:?}", tally.errors);
    let (on_java, on_rust) = shares(&served, after, Instant::now(), &java_ids);
    assert_eq!(on_java, 0, "the stopped Java instances served calls");
    assert!(on_rust > 0);
    let java_log = java.iter().map(ServiceProcess::log).collect::<String>();
    assert!(java_log.contains("revoked"), "the Spring instances did not say they left the registry: {java_log}");
}

/// The one span of `trace` matching `what`.
fn one<'a>(trace: &'a [Received], what: &str, pick: impl Fn(&Received) -> bool) -> &'a Received {
    let found: Vec<&Received> = trace.iter().filter(|s| pick(s)).collect();
    assert_eq!(found.len(), 1, "expected one {what} span, found {}: {trace:#?}", found.len());
    found[0]
}

#[tokio::test]
async fn one_trace_and_one_config_center_across_rust_and_java() {
    let _alone = ONE_AT_A_TIME.lock().await;
    const TRACE_ID: &str = "5bf92f3577b34da6a3ce929d0e0e4737";
    const CALLER_SPAN: &str = "10f067aa0ba902b8";
    let collector = Collector::start().await.unwrap();
    let postgres = Postgres::start().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Telemetry to the collector; log.filter, not RUST_LOG, in charge of the Rust logs.
    let otlp = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ("RUST_LOG", String::new()),
    ];
    let client = etcd.client().await;
    // The Rust user-service makes the tables and leaves, so every UserService
    // call below reaches Java.
    let mut schema = fleet::spawn(
        &etcd.endpoint(),
        dir.path(),
        "user-service",
        "schema",
        &[("MESHKIT_DATABASE_URL", postgres.url())],
    );
    wait_registered(&client, USER, &["schema"]).await;
    schema.signal(15);
    schema.wait_exit(Duration::from_secs(10)).await.unwrap();
    let java = spawn_user_spring(&etcd.endpoint(), dir.path(), "java-1", &postgres.url(), &otlp[..2]);
    let order = fleet::spawn(&etcd.endpoint(), dir.path(), "order-service", "order-1", &otlp);
    let (gateway_process, gateway) = spawn_gateway(&etcd, dir.path(), &otlp);
    eventually("the Spring instance registers", Duration::from_secs(60), || async {
        (fleet::registered(&client, USER).await == ["java-1"]).then_some(())
    })
    .await;
    let user_id = create_user(gateway, "ada@example.com").await;

    // CreateOrder through the gateway: order-service (Rust) calls GetUser on Java.
    let body = format!(r#"{{"userId":"{user_id}","items":[{{"sku":"s-1","quantity":2}}]}}"#);
    let mut request = json_request("POST", gateway, "/v1/orders", &body);
    request.headers_mut().insert("traceparent", format!("00-{TRACE_ID}-{CALLER_SPAN}-01").parse().unwrap());
    let created = send(gateway, request).await.unwrap();
    assert_eq!(created.status, 200, "{}", created.text());
    let get_user = format!("{USER}/GetUser");
    let trace = eventually("the Java server span arrives", Duration::from_secs(20), || async {
        let trace = collector.trace(TRACE_ID);
        trace.iter().any(|s| s.service == "user-spring" && s.kind() == SpanKind::Server).then_some(trace)
    })
    .await;
    let create_order = "meshkit.order.v1.OrderService/CreateOrder";
    let edge = one(&trace, "gateway server", |s| s.service == "meshkit-gateway" && s.kind() == SpanKind::Server);
    assert_eq!(edge.parent_id(), CALLER_SPAN);
    let order_span = one(&trace, "order server", |s| {
        s.service == "order-service" && s.kind() == SpanKind::Server && s.span.name == create_order
    });
    let lookup = one(&trace, "order → user client", |s| {
        s.service == "order-service" && s.kind() == SpanKind::Client && s.span.name == get_user
    });
    assert_eq!(lookup.parent_id(), order_span.span_id());
    let java_span = one(&trace, "Java server", |s| s.service == "user-spring" && s.kind() == SpanKind::Server);
    assert_eq!(java_span.span.name, get_user);
    assert_eq!(java_span.parent_id(), lookup.span_id(), "the Java span's parent is order-service's call");
    assert_eq!(java_span.attr("rpc.system").as_deref(), Some("grpc"), "{java_span:#?}");
    assert_eq!(java_span.attr("rpc.grpc.status_code").as_deref(), Some("0"), "{java_span:#?}");

    // One config center: the log level of every process, set once.
    for process in [&java, &order] {
        assert!(!process.log().contains("DEBUG"), "{} logs at debug before being told to", process.name);
    }
    let (code, out, err) = meshctl(&etcd, &["config", "set", "_global", "log.filter", "debug"]).await;
    assert_eq!(code, 0, "{out}{err}");
    // Calls after the change log at debug in both languages.
    eventually("both processes log at debug", Duration::from_secs(15), || async {
        let _ = send(gateway, json_request("GET", gateway, &format!("/v1/users/{user_id}"), "")).await;
        let _ = send(gateway, json_request("POST", gateway, "/v1/orders", &body)).await;
        let (java_log, order_log) = (java.log(), order.log());
        (java_log.contains("DEBUG") && order_log.contains("DEBUG")).then_some(())
    })
    .await;
    assert!(java.log().contains("log.filter"), "the Spring instance did not report the change: {}", java.log());
    assert!(order.log().contains("log filter changed"), "{}", order.log());
    assert!(gateway_process.log().contains("log filter changed"), "{}", gateway_process.log());
}

/// What a call answered, as a caller sees it: the code and message, or the
/// response's fields that do not depend on which row was made.
fn answer<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> String {
    match result {
        Ok(response) => format!("OK {:?}", response.into_inner()),
        // The google.rpc.BadRequest detail too, violation by violation.
        Err(status) => {
            format!("{:?}: {} {:?}", status.code(), status.message(), meshkit_validate::violations_of(&status))
        }
    }
}

#[tokio::test]
async fn the_spring_and_rust_services_answer_every_request_the_same_way() {
    let _alone = ONE_AT_A_TIME.lock().await;
    let postgres = Postgres::start().unwrap();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let client = etcd.client().await;
    let _rust = fleet::spawn(
        &etcd.endpoint(),
        dir.path(),
        "user-service",
        "rust-1",
        &[("MESHKIT_DATABASE_URL", postgres.url())],
    );
    wait_registered(&client, USER, &["rust-1"]).await;
    let _java = spawn_user_spring(&etcd.endpoint(), dir.path(), "java-1", &postgres.url(), &[]);
    eventually("the Spring instance registers", Duration::from_secs(60), || async {
        (fleet::registered(&client, USER).await.len() == 2).then_some(())
    })
    .await;
    let connect = |id: &'static str| {
        let client = client.clone();
        async move {
            let addr = fleet::instance(&client, USER, id).await.addr;
            UserServiceClient::connect(format!("http://{addr}")).await.unwrap()
        }
    };
    let (mut rust, mut java) = (connect("rust-1").await, connect("java-1").await);

    // Bad input, and lookups that find nothing: the same code and message,
    // naming the same field.
    let long = "x".repeat(201);
    let creates = [
        ("", "a@example.com"),
        ("   ", "a@example.com"),
        (long.as_str(), "a@example.com"),
        ("a\u{7}b", "a@example.com"),
        ("Ada", ""),
        ("Ada", "ada"),
        ("Ada", "ada@example"),
        ("Ada", "a da@example.com"),
        ("Ada", "ada@-x.com"),
        ("Ada", "\"quoted\"\n@example.com"),
    ];
    let mut compared = 0;
    for (name, email) in creates {
        let request = || CreateUserRequest { name: name.into(), email: email.into() };
        let (r, j) = (answer(rust.create_user(request()).await), answer(java.create_user(request()).await));
        assert_eq!(r, j, "CreateUser {name:?} {email:?}");
        assert!(r.starts_with("InvalidArgument: name:") || r.starts_with("InvalidArgument: email:"), "{r}");
        compared += 1;
    }
    for id in ["", "42", "0193f0f6-0000-7000-8000-000000000000", " 0193F0F6-0000-7000-8000-000000000000"] {
        let request = || GetUserRequest { id: id.into() };
        let (r, j) = (answer(rust.get_user(request()).await), answer(java.get_user(request()).await));
        assert_eq!(r, j, "GetUser {id:?}");
        compared += 1;
    }
    for (page_size, page_token) in [(-1, ""), (1001, ""), (0, "not-a-token")] {
        let request = || ListUsersRequest { page_size, page_token: page_token.into() };
        let (r, j) = (answer(rust.list_users(request()).await), answer(java.list_users(request()).await));
        assert_eq!(r, j, "ListUsers {page_size} {page_token:?}");
        compared += 1;
    }

    // Rows made by either are the other's: an email taken on one side is
    // taken on the other, a user made by one is read the same by both, and
    // pages walk the same ids in creation order.
    let ada =
        rust.create_user(CreateUserRequest { name: " Ada ".into(), email: "Ada@Example.com".into() }).await.unwrap();
    let taken = || CreateUserRequest { name: "Ada".into(), email: "ada@example.com".into() };
    let (r, j) = (answer(rust.create_user(taken()).await), answer(java.create_user(taken()).await));
    assert_eq!(r, j, "a taken email");
    assert!(r.starts_with("AlreadyExists: email:"), "{r}");
    let bo = java.create_user(CreateUserRequest { name: "Bo".into(), email: "bo@example.com".into() }).await.unwrap();
    for id in [&ada.get_ref().id, &bo.get_ref().id] {
        let request = || GetUserRequest { id: id.clone() };
        let (r, j) = (answer(rust.get_user(request()).await), answer(java.get_user(request()).await));
        assert_eq!(r, j, "GetUser {id}");
    }
    let page = |token: &str| ListUsersRequest { page_size: 1, page_token: token.into() };
    let (r, j) =
        (rust.list_users(page("")).await.unwrap().into_inner(), java.list_users(page("")).await.unwrap().into_inner());
    assert_eq!(r, j, "the first page");
    assert_eq!(r.users[0].id, ada.get_ref().id, "creation order");
    let token = r.next_page_token;
    let (r, j) = (
        rust.list_users(page(&token)).await.unwrap().into_inner(),
        java.list_users(page(&token)).await.unwrap().into_inner(),
    );
    assert_eq!(r, j, "the second page");
    assert_eq!((r.users[0].id.as_str(), r.next_page_token.as_str()), (bo.get_ref().id.as_str(), ""));
    eprintln!("{compared} refusals and 5 successful answers compared: the same from Rust and Java");
}
