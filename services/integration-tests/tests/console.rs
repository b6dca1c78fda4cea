//! The console against a live mesh (real etcd, two instances each of
//! user-service and order-service): its guards over HTTP (no session, a
//! forged one, the read-only role, a missing CSRF token, another origin, etcd
//! down), then every page in headless Chromium (Debian's, driven by
//! playwright-core: services/console/browser-tests/console.mjs). Screenshots
//! go to target/console-shots.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{net::SocketAddr, time::Duration};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use meshkit_console::{ConsoleConfig, RunningConsole};
use meshkit_integration_tests::{Etcd, bin_dir, http::send, init_logs, mesh_config, sqlite_url};

const USER: &str = "meshkit.user.v1.UserService";
const ORDER: &str = "meshkit.order.v1.OrderService";
const ADMIN_PASSWORD: &str = "console-admin-pass-1";
const VIEWER_PASSWORD: &str = "console-viewer-pass-1";
const JWT_SECRET: &str = "console-test-jwt-secret";

async fn console(etcd: &Etcd) -> RunningConsole {
    let mut config = ConsoleConfig::default();
    config.mesh.etcd = etcd.settings();
    config.console.listen = "127.0.0.1:0".into();
    config.console.admin_password = ADMIN_PASSWORD.into();
    config.console.viewer_password = VIEWER_PASSWORD.into();
    config.console.etcd_timeout_ms = 1_000;
    config.console.jwt.hs256_secret = JWT_SECRET.into();
    config.console.jwt.issuer = "meshkit-test".into();
    meshkit_console::start(config).await.unwrap()
}

fn form(addr: SocketAddr, path: &str, cookie: Option<&str>, body: &str) -> Request<Full<Bytes>> {
    let mut req = Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("host", addr.to_string())
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    req.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
}

fn get(addr: SocketAddr, path: &str, cookie: Option<&str>) -> Request<Full<Bytes>> {
    let mut req = Request::builder().uri(format!("http://{addr}{path}")).header("host", addr.to_string());
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    req.body(Full::new(Bytes::new())).unwrap()
}

/// Signs in with a password; the session cookie (`name=value`).
async fn sign_in(addr: SocketAddr, user: &str, password: &str) -> String {
    let reply = send(addr, form(addr, "/login", None, &format!("user={user}&password={password}"))).await.unwrap();
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "{}", reply.text());
    let set = reply.headers.get("set-cookie").unwrap().to_str().unwrap().to_owned();
    assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"), "{set}");
    set.split(';').next().unwrap().to_owned()
}

/// The CSRF token in a page's forms.
fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a form with a CSRF token") + 19;
    page[at..at + 64].to_owned()
}

#[tokio::test]
async fn the_console_signs_in_guards_changes_and_drives_the_mesh_in_a_browser() {
    init_logs();
    let mut etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let user_url = sqlite_url(dir.path(), "user");
    let order_url = sqlite_url(dir.path(), "order");
    let user_a = meshkit_user::start(mesh_config(&etcd, &user_url).into()).await.unwrap();
    let user_b = meshkit_user::start(mesh_config(&etcd, &user_url).into()).await.unwrap();
    let order_a = meshkit_order::start(mesh_config(&etcd, &order_url).into()).await.unwrap();
    let order_b = meshkit_order::start(mesh_config(&etcd, &order_url).into()).await.unwrap();
    let console = console(&etcd).await;
    let addr = console.local_addr();

    // Guards, over plain HTTP.
    let reply = send(addr, get(addr, "/services", None)).await.unwrap();
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "no session: sent to sign in");
    assert_eq!(reply.headers["location"], "/login?next=%2Fservices");
    let reply = send(addr, get(addr, "/services", Some("meshkit_console=forged"))).await.unwrap();
    assert_eq!(reply.status, StatusCode::SEE_OTHER, "a forged session: sent to sign in");
    assert!(reply.headers["set-cookie"].to_str().unwrap().contains("Max-Age=0"), "and the cookie is cleared");
    let drain = format!("service={USER}&instance={}&action=drain", user_a.instance_id());
    let reply = send(addr, form(addr, "/instances/control", None, &drain)).await.unwrap();
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED, "a change without a session");

    let admin = sign_in(addr, "admin", ADMIN_PASSWORD).await;
    let page = send(addr, get(addr, "/services", Some(&admin))).await.unwrap();
    assert_eq!(page.status, StatusCode::OK);
    let csrf = csrf_of(&page.text());
    let reply = send(addr, form(addr, "/instances/control", Some(&admin), &drain)).await.unwrap();
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "no CSRF token");
    assert!(reply.text().contains("CSRF"), "{}", reply.text());
    let mut from_elsewhere = form(addr, "/instances/control", Some(&admin), &format!("{drain}&csrf={csrf}"));
    from_elsewhere.headers_mut().insert("origin", "http://evil.example".parse().unwrap());
    let reply = send(addr, from_elsewhere).await.unwrap();
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "a form posted from another site");
    let viewer = sign_in(addr, "viewer", VIEWER_PASSWORD).await;
    let page = send(addr, get(addr, "/config/user", Some(&viewer))).await.unwrap();
    let viewer_csrf = csrf_of(&page.text());
    let reply = send(addr, form(addr, "/instances/control", Some(&viewer), &format!("{drain}&csrf={viewer_csrf}")))
        .await
        .unwrap();
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "the read-only role");
    assert!(reply.text().contains("read-only"), "{}", reply.text());
    let mut client = etcd.client().await;
    let control = meshkit_common::keys::control("/meshkit", USER, user_a.instance_id());
    assert!(client.get(control.as_str(), None).await.unwrap().kvs().is_empty(), "nothing refused was written");
    let reply = send(addr, form(addr, "/login", None, "user=admin&password=wrong-password-1")).await.unwrap();
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);

    // The pages, in a browser.
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({"sub": "ann", "iss": "meshkit-test", "roles": ["admin"],
            "exp": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 600}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    let browser_env = [
        ("CONSOLE_URL", format!("http://{addr}")),
        ("ADMIN_PASSWORD", ADMIN_PASSWORD.to_owned()),
        ("VIEWER_PASSWORD", VIEWER_PASSWORD.to_owned()),
        ("ADMIN_TOKEN", token),
        ("MESHCTL", bin_dir().join("meshctl").display().to_string()),
        ("ETCD", etcd.endpoint()),
        ("USER_SERVICE", USER.to_owned()),
        ("USER_A", user_a.instance_id().to_string()),
        ("USER_B", user_b.instance_id().to_string()),
        ("ORDER_SERVICE", ORDER.to_owned()),
        ("ORDER_A", order_a.instance_id().to_string()),
    ];
    meshkit_integration_tests::browser::run("console.mjs", &browser_env).await;

    // etcd gone: a page says so within the console's timeout instead of hanging.
    etcd.kill();
    let started = std::time::Instant::now();
    let admin = sign_in(addr, "admin", ADMIN_PASSWORD).await;
    let reply = send(addr, get(addr, "/services", Some(&admin))).await.unwrap();
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
    assert!(reply.text().contains("etcd cannot be reached"), "{}", reply.text());
    assert!(started.elapsed() < Duration::from_secs(5), "answered in {:?}", started.elapsed());

    console.shutdown().await;
    drop((user_a, user_b, order_a, order_b));
}
