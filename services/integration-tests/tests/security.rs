//! Security on real parts: mTLS between services with identities from a
//! development CA, authorization by identity from the config center,
//! certificates rotated under load, etcd with TLS and auth on, and an order
//! placed over HTTPS through the gateway with mTLS on every hop.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{path::Path, sync::Arc, time::Duration};

use meshkit_common::{ChannelBuilder, config::TlsSettings, tls::Tls};
use meshkit_integration_tests::TestConfig;
use meshkit_integration_tests::{
    Etcd, EtcdTls, LoadGen, ServiceProcess,
    echo::{ECHO, EchoRequest, EchoServiceClient, start_echo},
    eventually, free_port, init_logs, mesh_config, sqlite_url, tls_files,
};
use meshkit_meshctl::certs::issue;

/// The certificates checked for a change every 100 ms, for the rotation tests.
fn tls(dir: &Path, name: &str) -> TlsSettings {
    TlsSettings { reload_ms: 100, ..tls_files(dir, name) }
}

fn echo_config(etcd: &Etcd, dir: &Path, name: &str) -> TestConfig {
    let mut config = mesh_config(etcd, "sqlite::memory:");
    config.tls = tls(dir, name);
    config
}

async fn echo_via(channels: &ChannelBuilder) -> Result<String, tonic::Status> {
    let mut client = EchoServiceClient::new(channels.balanced(ECHO));
    let reply = client.echo(EchoRequest { text: "hi".into(), ..Default::default() }).await?.into_inner();
    Ok(reply.request.and_then(|r| r.payload).map(|p| p.note).unwrap_or_default())
}

async fn channels(etcd: &Etcd, tls: Option<Arc<Tls>>) -> ChannelBuilder {
    ChannelBuilder::new(etcd.client().await, "/meshkit").with_tls(tls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_refuses_strangers_and_authorizes_callers_by_identity() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (ca, other) = (dir.path().join("ca"), dir.path().join("other"));
    issue(&ca, "meshkit", &["echo", "order-service", "gateway"], 1).unwrap();
    issue(&other, "meshkit", &["order-service"], 1).unwrap();

    // Only order-service may call Echo; everything else is denied.
    let mut config = echo_config(&etcd, &ca, "echo");
    config.authz.enabled = true;
    config.authz.default = "deny".into();
    config
        .authz
        .rules
        .insert("/meshkit.echo.v1.EchoService/Echo".into(), vec!["spiffe://meshkit/order-service".into()]);
    let server = start_echo(config).await.unwrap();
    let addr = server.local_addr().to_string();

    // A plaintext client: the handshake never happens.
    let plain = channels(&etcd, None).await;
    let err = echo_via(&plain).await.unwrap_err();
    // Refused at the transport: the server closes the connection at the first
    // bytes, which the channel reports as UNAVAILABLE naming the service.
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("meshkit.echo.v1.EchoService"), "{err:?}");

    // A client whose certificate another CA signed (it trusts the server's CA): refused.
    let mut stranger = tls(&other, "order-service");
    stranger.ca_file = ca.join("ca.pem").display().to_string();
    let stranger = Tls::load(&stranger).unwrap();
    let channel = meshkit_common::tls::connect(&addr, Some(stranger)).await;
    let refused = match channel {
        Err(e) => e.to_string(),
        Ok(channel) => EchoServiceClient::new(channel)
            .echo(EchoRequest::default())
            .await
            .map(|_| "answered".to_string())
            .unwrap_or_else(|s| s.to_string()),
    };
    assert_ne!(refused, "answered", "a certificate from another CA must be refused");

    // The allowed identity passes, and the handler sees who called.
    let order = channels(&etcd, Some(Tls::load(&tls(&ca, "order-service")).unwrap())).await;
    assert_eq!(echo_via(&order).await.unwrap(), "caller=spiffe://meshkit/order-service");

    // Another identity of the same CA: PERMISSION_DENIED naming the method and the caller.
    let gateway = channels(&etcd, Some(Tls::load(&tls(&ca, "gateway")).unwrap())).await;
    let denied = echo_via(&gateway).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert_eq!(
        denied.message(),
        "caller spiffe://meshkit/gateway may not call /meshkit.echo.v1.EchoService/Echo \
         (rule \"/meshkit.echo.v1.EchoService/Echo\")"
    );

    // The rules follow the config center: allowing the gateway takes effect live.
    let mut client = etcd.client().await;
    client
        .put(
            "/meshkit/config/echo/authz.rules",
            r#"{"/meshkit.echo.v1.EchoService/Echo": ["spiffe://meshkit/order-service", "spiffe://meshkit/gateway"]}"#,
            None,
        )
        .await
        .unwrap();
    let note =
        eventually("the gateway is allowed", Duration::from_secs(5), || async { echo_via(&gateway).await.ok() }).await;
    assert_eq!(note, "caller=spiffe://meshkit/gateway");

    // Refusals are counted.
    let admin = server.admin_addr().unwrap().to_string();
    let metrics = meshkit_common::admin::http_get(&admin, "/metrics").await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("meshkit_authz_denied_total{") && l.contains("caller=\"spiffe://meshkit/gateway\"")),
        "{metrics}"
    );
    assert!(metrics.contains("meshkit_tls_handshake_failures_total{side=\"server\"}"), "{metrics}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_steady_traffic_without_a_failed_call() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().to_path_buf();
    issue(&ca, "meshkit", &["echo", "order-service"], 1).unwrap();
    let server = start_echo(echo_config(&etcd, &ca, "echo")).await.unwrap();
    let addr = server.local_addr().to_string();
    let client_tls = Tls::load(&tls(&ca, "order-service")).unwrap();
    client_tls.spawn_reloader();
    let channels = channels(&etcd, Some(client_tls.clone())).await;
    let balanced = channels.balanced(ECHO);
    echo_via(&channels).await.unwrap();

    let served_cert = || async {
        // What a new connection is shown: the leaf certificate's DER.
        let probe = Tls::load(&tls(&ca, "order-service")).unwrap();
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let stream = probe.connect("127.0.0.1", tcp).await.unwrap();
        stream.get_ref().1.peer_certificates().unwrap()[0].as_ref().to_vec()
    };
    let before = served_cert().await;

    let load = LoadGen::start(4, Duration::from_millis(2), move || {
        let mut client = EchoServiceClient::new(balanced.clone());
        async move {
            client.echo(EchoRequest::default()).await?;
            Ok(None)
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Both sides' certificates are issued again (new keys) while calls go on.
    issue(&ca, "meshkit", &["echo", "order-service"], 1).unwrap();
    let new_leaf = {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let pem = std::fs::read(ca.join("echo.pem")).unwrap();
        CertificateDer::pem_slice_iter(&pem).next().unwrap().unwrap().as_ref().to_vec()
    };
    eventually("new connections see the new certificate", Duration::from_secs(5), || async {
        (served_cert().await == new_leaf).then_some(())
    })
    .await;
    assert_ne!(before, new_leaf);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let tally = load.stop().await;
    assert_eq!(tally.failed, 0, "calls failed during the rotation: {:?}", tally.errors);
    assert!(tally.ok > 100, "the load ran: {tally:?}");
    let report = client_tls.report();
    assert!(report["reloads"].as_u64().unwrap() >= 1, "the client reloaded its certificate: {report}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_works_on_etcd_with_tls_and_auth_and_wrong_credentials_are_named() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path();
    issue(ca, "meshkit", &["etcd", "root", "user-service", "order-service"], 1).unwrap();
    let file = |name: &str| ca.join(name).display().to_string();
    let etcd = Etcd::start_tls(EtcdTls {
        cert_file: file("etcd.pem"),
        key_file: file("etcd.key"),
        ca_file: file("ca.pem"),
        client_cert_file: file("root.pem"),
        client_key_file: file("root.key"),
    })
    .await
    .unwrap();

    // Auth on: root, and a user per component whose role writes only its own keys.
    let mut admin = etcd.client().await;
    meshkit_meshctl::etcd_user(&mut admin, "/meshkit", "user", &["meshkit.user.v1.UserService"], "user-secret-1")
        .await
        .unwrap();
    meshkit_meshctl::etcd_auth_enable(&mut admin, "root-secret-1").await.unwrap();
    let as_user = |user: &str, password: &str, cert: &str| {
        let mut settings = etcd.settings();
        settings.username = user.into();
        settings.password = password.into();
        settings.cert_file = file(&format!("{cert}.pem"));
        settings.key_file = file(&format!("{cert}.key"));
        settings
    };

    // Wrong password: a clear error, and the password is not in it.
    let err = meshkit_common::etcd::connect(&as_user("user", "not-the-password", "user-service")).await.err().unwrap();
    let message = err.to_string();
    assert!(message.contains("authentication failed"), "{message}");
    assert!(!message.contains("not-the-password"), "{message}");

    // user-service registers with its own credentials over TLS...
    let mut config = mesh_config(&etcd, &sqlite_url(dir.path(), "user"));
    config.etcd = as_user("user", "user-secret-1", "user-service");
    let user = meshkit_user::start(config.into()).await.unwrap();
    // ...and root discovers it and calls it through a balanced channel.
    let root = meshkit_common::etcd::connect(&as_user("root", "root-secret-1", "root")).await.unwrap();
    let users = ChannelBuilder::new(root, "/meshkit").balanced("meshkit.user.v1.UserService");
    let created = meshkit_integration_tests::create_user(&users, "Ada", "ada@example.com").await;
    assert!(!created.id.is_empty());

    // The user's role keeps it under its own prefix.
    let mut scoped = meshkit_common::etcd::connect(&as_user("user", "user-secret-1", "user-service")).await.unwrap();
    let refused = scoped.put("/meshkit/services/meshkit.order.v1.OrderService/fake", "{}", None).await.unwrap_err();
    assert!(refused.to_string().contains("permission denied"), "{refused}");
    scoped.get("/meshkit/services/", Some(etcd_client::GetOptions::new().with_prefix())).await.expect("reads the mesh");
    user.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_goes_through_the_gateway_over_https_with_mtls_on_every_hop() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("tls");
    issue(&ca, "meshkit", &["user-service", "order-service", "gateway"], 1).unwrap();
    // Each service admits only the callers it expects.
    let authz = [
        ("/meshkit.user.v1.UserService/*", r#"["spiffe://meshkit/gateway", "spiffe://meshkit/order-service"]"#),
        ("/meshkit.order.v1.OrderService/*", r#"["spiffe://meshkit/gateway"]"#),
    ];
    let mut client = etcd.client().await;
    client.put("/meshkit/config/_global/authz.enabled", "true", None).await.unwrap();
    client.put("/meshkit/config/_global/authz.default", "\"deny\"", None).await.unwrap();
    let rules: serde_json::Map<String, serde_json::Value> =
        authz.iter().map(|(k, v)| ((*k).to_owned(), serde_json::from_str(v).unwrap())).collect();
    client
        .put("/meshkit/config/_global/authz.rules", serde_json::Value::Object(rules).to_string(), None)
        .await
        .unwrap();

    let env = |name: &str| -> Vec<(&'static str, String)> {
        vec![
            ("MESHKIT_ETCD_ENDPOINTS", etcd.endpoint()),
            ("MESHKIT_SERVER_LISTEN", format!("127.0.0.1:{}", free_port())),
            ("MESHKIT_TLS_ENABLED", "true".into()),
            ("MESHKIT_TLS_CERT_FILE", ca.join(format!("{name}.pem")).display().to_string()),
            ("MESHKIT_TLS_KEY_FILE", ca.join(format!("{name}.key")).display().to_string()),
            ("MESHKIT_TLS_CA_FILE", ca.join("ca.pem").display().to_string()),
        ]
    };
    let port = free_port();
    let mut gateway_env = env("gateway");
    gateway_env.push(("MESHKIT_GATEWAY_LISTEN", format!("127.0.0.1:{port}")));
    gateway_env.push(("MESHKIT_GATEWAY_TLS_CERT_FILE", ca.join("gateway.pem").display().to_string()));
    gateway_env.push(("MESHKIT_GATEWAY_TLS_KEY_FILE", ca.join("gateway.key").display().to_string()));
    let mut user_env = env("user-service");
    user_env.push(("MESHKIT_DATABASE_URL", sqlite_url(dir.path(), "user")));
    let mut order_env = env("order-service");
    order_env.push(("MESHKIT_DATABASE_URL", sqlite_url(dir.path(), "order")));
    user_env.push(("RUST_LOG", "info".into()));
    order_env.push(("RUST_LOG", "info".into()));
    gateway_env.push(("RUST_LOG", "info".into()));
    let processes = [
        ServiceProcess::spawn("user-service", &user_env, dir.path()).unwrap(),
        ServiceProcess::spawn("order-service", &order_env, dir.path()).unwrap(),
        ServiceProcess::spawn("meshkit-gateway", &gateway_env, dir.path()).unwrap(),
    ];
    // What each process went through, should a step below fail.
    let _logs = DumpOnPanic(&processes);
    let cacert = ca.join("ca.pem");
    let curl = |args: Vec<String>| curl(cacert.clone(), args);
    let base = format!("https://127.0.0.1:{port}");
    let user: serde_json::Value = eventually("a user created over HTTPS", Duration::from_secs(20), || {
        let body = r#"{"name":"Ada","email":"ada@example.com"}"#.to_owned();
        let url = format!("{base}/v1/users");
        async move {
            let (out, _) = curl(vec![
                "-X".into(),
                "POST".into(),
                url,
                "-H".into(),
                "content-type: application/json".into(),
                "-d".into(),
                body,
            ])
            .await;
            serde_json::from_str::<serde_json::Value>(&out).ok().filter(|v| v["id"].is_string())
        }
    })
    .await;
    let order_body =
        format!(r#"{{"userId":"{}","items":[{{"sku":"book-1","quantity":2}}]}}"#, user["id"].as_str().unwrap());
    // order-service may register after user-service: until the gateway
    // knows it, the answer is "no live instance", so ask until it does. A
    // process waits up to 10 s for etcd at each start-up step.
    let order: serde_json::Value = eventually("an order created over HTTP/2", Duration::from_secs(60), || {
        let (url, body) = (format!("{base}/v1/orders"), order_body.clone());
        async move {
            let args = ["--http2", "-X", "POST", &url, "-H", "content-type: application/json", "-d", &body];
            let (out, err) = curl(args.iter().map(|a| (*a).to_owned()).collect()).await;
            let order: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
            (order["code"] != 14).then_some(order)
        }
    })
    .await;
    assert_eq!(order["status"], "ORDER_STATUS_PENDING", "{order}");
    let (out, _) = curl(vec![format!("{base}/v1/orders/{}", order["id"].as_str().unwrap())]).await;
    assert!(out.contains(order["id"].as_str().unwrap()), "{out}");
    // The rules hold on the services themselves: order-service's identity may
    // not call OrderService directly (only the gateway may).
    let as_order = Tls::load(&tls(&ca, "order-service")).unwrap();
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit").with_tls(Some(as_order));
    let mut orders = meshkit_proto::order::order_service_client::OrderServiceClient::new(
        channels.balanced("meshkit.order.v1.OrderService"),
    );
    let denied = orders
        .get_order(meshkit_proto::order::GetOrderRequest { id: order["id"].as_str().unwrap().into() })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().starts_with("caller spiffe://meshkit/order-service may not call"), "{denied:?}");
    // Plain HTTP to the HTTPS listener gets nothing.
    let (out, _) = curl(vec![format!("http://127.0.0.1:{port}/v1/orders/x")]).await;
    assert!(!out.contains("status"), "{out}");
}

async fn curl(cacert: std::path::PathBuf, args: Vec<String>) -> (String, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(cacert)
        .args(&args)
        .output()
        .await
        .unwrap();
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Prints the processes' logs when the test panics while it is alive.
struct DumpOnPanic<'a>(&'a [ServiceProcess]);

impl Drop for DumpOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in self.0 {
                eprintln!("--- {} log\n{}", p.name, p.log());
            }
        }
    }
}
