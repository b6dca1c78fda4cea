//! Hostile clients against meshkit's listeners, a `MeshServer` and the
//! gateway: what a peer that breaks the protocol on purpose gets (GOAWAY, a
//! refused stream, a gRPC error, a closed connection), that everyone else
//! keeps being served meanwhile, that memory stays bounded, and that each
//! refusal is counted in `/metrics`.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use meshkit_common::admin::http_get;
use meshkit_integration_tests::{
    Etcd, TestConfig,
    echo::{self, EchoRequest, ExpandRequest, direct_client, start_echo},
    h2raw::*,
    init_logs, mesh_config,
};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ECHO_PATH: &str = "/meshkit.echo.v1.EchoService/Echo";
const CHAT_PATH: &str = "/meshkit.echo.v1.EchoService/Chat";
const EXPAND_PATH: &str = "/meshkit.echo.v1.EchoService/Expand";

/// The limits the tests set, small enough to reach quickly.
const MAX_STREAMS: u32 = 100;
const CONTROL_PER_SEC: u32 = 200;

/// Reads until the peer closes (Ok(0) or an error); how long after `started` that was.
async fn closed_within(stream: &mut tokio::net::TcpStream, started: Instant, limit: Duration) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(tokio::time::Instant::from_std(started + limit), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn a_mesh_server_closes_a_connection_that_never_sends_its_preface() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let mut config = mesh_config(&etcd, "sqlite::memory:");
    config.mesh.server.preface_timeout_ms = 700;
    let server = start_echo(config).await.unwrap();
    let addr = server.local_addr();

    // Silent, and a few bytes short of the preface: both are cut off.
    let connected = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    for (name, stream) in [("silent", &mut silent), ("partial preface", &mut partial)] {
        let took = closed_within(stream, connected, Duration::from_secs(5)).await;
        let took = took.unwrap_or_else(|| panic!("the {name} connection was still open after 5 s"));
        assert!(took >= Duration::from_millis(600), "{name}: closed after {took:?}, before the limit");
    }

    // A client that speaks HTTP/2 is served, and stays connected past the limit.
    let mut client = direct_client(&server).await.unwrap();
    client.echo(EchoRequest { text: "a".into(), ..Default::default() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    client.echo(EchoRequest { text: "b".into(), ..Default::default() }).await.unwrap();

    let admin = server.admin_addr().unwrap().to_string();
    let metrics = http_get(&admin, "/metrics").await.unwrap();
    let counted = metrics
        .lines()
        .find(|l| l.starts_with("meshkit_server_preface_timeouts_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no meshkit_server_preface_timeouts_total in /metrics"));
    assert!(counted >= 2.0, "{counted} preface timeouts counted");
    server.shutdown().await.unwrap();
}

/// A well-behaved client calling Echo every few milliseconds on its own
/// connection while the abusers run.
struct Bystander {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Bystander {
    async fn start(addr: SocketAddr) -> Self {
        let channel =
            tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let mut client = echo::EchoServiceClient::new(channel);
        let (ok, failed, stop) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (o, f, s) = (ok.clone(), failed.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut errors = Vec::new();
            while !s.load(Ordering::Relaxed) {
                let call = client.echo(EchoRequest { text: "still here".into(), ..Default::default() });
                match tokio::time::timeout(Duration::from_secs(5), call).await {
                    Ok(Ok(_)) => o.fetch_add(1, Ordering::Relaxed),
                    Ok(Err(status)) => {
                        errors.push(status.to_string());
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => {
                        errors.push("no answer within 5 s".into());
                        f.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            errors
        });
        Self { ok, failed, stop, task }
    }

    /// Stops it; its failures (none expected) and how many calls it made.
    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.task.await.unwrap();
        assert_eq!(self.failed.load(Ordering::Relaxed) as usize, errors.len());
        (self.ok.load(Ordering::Relaxed), errors)
    }
}

/// Sends `frames` over and over (up to `rounds` times) until the server
/// refuses; what it saw, and how many rounds went out.
async fn flood(addr: SocketAddr, frames: impl Fn(u32) -> Vec<u8>, rounds: u32) -> (Seen, u32) {
    let mut conn = RawConn::open(addr).await.unwrap();
    let mut sent = 0;
    for i in 0..rounds {
        if conn.send_within(&frames(i), Duration::from_secs(5)).await.is_err() {
            break;
        }
        sent += 1;
        if i % 64 == 0 && conn.seen().goaway.is_some() {
            break;
        }
    }
    (conn.wait_for(Duration::from_secs(5), |s| s.goaway.is_some() || s.closed).await, sent)
}

fn assert_goaway(target: &str, attack: &str, seen: &Seen, debug: &str) {
    let Some((code, data)) = &seen.goaway else {
        panic!("{target}: {attack}: no GOAWAY (closed: {}, {} frames)", seen.closed, seen.frames)
    };
    assert_eq!((*code, data.as_str()), (ENHANCE_YOUR_CALM, debug), "{target}: {attack}");
}

/// A gRPC call with a hand-made request body over hyper's HTTP/2 client: the
/// grpc-status and message it ends with.
async fn raw_grpc(addr: SocketAddr, path: &str, body: Vec<u8>) -> (String, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await.unwrap().unwrap();
    let (parts, body) = res.into_parts();
    let collected = tokio::time::timeout(Duration::from_secs(10), body.collect()).await.unwrap().unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_else(|| parts.headers.clone());
    let get = |name: &str| trailers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    (get("grpc-status"), percent_decode(&get("grpc-message")))
}

fn percent_decode(s: &str) -> String {
    form_urlencoded::parse(format!("m={}", s.replace('+', "%2B")).as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default()
}

/// Every attack against the listener at `addr`; `admin` serves its /metrics.
async fn attack(target: &str, addr: SocketAddr, admin: SocketAddr) {
    let bystander = Bystander::start(addr).await;
    let rss_before = rss_kib();

    // Rapid reset (CVE-2023-44487): HEADERS then RST_STREAM, over and over.
    let (seen, sent) = flood(
        addr,
        |i| {
            let id = 2 * i + 1;
            let mut b = frame(HEADERS, END_HEADERS, id, &grpc_request(CHAT_PATH));
            b.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
            b
        },
        100_000,
    )
    .await;
    assert_goaway(target, "rapid reset", &seen, "too_many_resets");
    eprintln!("{target}: rapid reset refused after {sent} streams");

    // CONTINUATION frames that never end the header block.
    let junk = hpack(&[("x-junk", &"a".repeat(16_000))]);
    let (seen, sent) = flood(
        addr,
        |i| {
            if i == 0 { frame(HEADERS, 0, 1, &grpc_request(CHAT_PATH)) } else { frame(CONTINUATION, 0, 1, &junk) }
        },
        100_000,
    )
    .await;
    assert_goaway(target, "CONTINUATION flood", &seen, "too_many_continuations");
    eprintln!("{target}: CONTINUATION flood refused after {sent} frames");

    // SETTINGS and PING floods, read and acknowledged frame by frame.
    for (name, frames) in [
        ("SETTINGS", settings(&[(INITIAL_WINDOW_SIZE, 65_535)])),
        ("PING", frame(PING, 0, 0, &[7; 8])),
        // Unasked-for acknowledgements: h2 logs a warning for each.
        ("PING ACK", frame(PING, ACK, 0, &[7; 8])),
    ] {
        let (seen, sent) = flood(addr, |_| frames.clone(), 1_000_000).await;
        assert_goaway(target, &format!("{name} flood"), &seen, "too_many_control_frames");
        assert!(sent < 100_000, "{target}: {name} flood: {sent} frames went out before the refusal");
        eprintln!("{target}: {name} flood refused after {sent} frames");
    }

    // A PING flood from a client that never reads: refused too, not left
    // to fill the server's buffers.
    let mut conn = RawConn::open_with(addr, &settings(&[]), false).await.unwrap();
    let mut outcome = "";
    for _ in 0..1_000_000 {
        if let Err(e) = conn.send_within(&frame(PING, 0, 0, &[1; 8]), Duration::from_secs(5)).await {
            outcome = e;
            break;
        }
    }
    assert_eq!(outcome, "closed", "{target}: a PING flood that never reads was not cut off");
    drop(conn);

    // More streams than advertised: the extra ones are refused.
    let mut conn = RawConn::open(addr).await.unwrap();
    for i in 0..MAX_STREAMS + 50 {
        conn.send(&frame(HEADERS, END_HEADERS, 2 * i + 1, &grpc_request(CHAT_PATH))).await.unwrap();
    }
    let seen = conn.wait_for(Duration::from_secs(5), |s| s.resets.len() >= 50).await;
    assert!(
        seen.server_settings.contains(&(MAX_CONCURRENT_STREAMS, MAX_STREAMS)),
        "{target}: advertised {:?}",
        seen.server_settings
    );
    let refused = seen.resets.iter().filter(|(_, code)| *code == REFUSED_STREAM).count();
    assert_eq!(refused, 50, "{target}: streams past the limit: {:?}", seen.resets);
    drop(conn);

    // A header list past the limit (16 KiB): answered 431 by h2 (HEADERS
    // with END_STREAM, no DATA), never served; the connection stays usable.
    let mut conn = RawConn::open(addr).await.unwrap();
    let mut block = grpc_request(ECHO_PATH);
    block.extend(hpack(&[("x-big", &"b".repeat(40_000))]));
    let chunks: Vec<&[u8]> = block.chunks(16_384).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let flags = (if i == 0 { END_STREAM } else { 0 }) | (if i + 1 == chunks.len() { END_HEADERS } else { 0 });
        conn.send(&frame(kind, flags, 1, chunk)).await.unwrap();
    }
    let seen = conn
        .wait_for(Duration::from_secs(5), |s| s.goaway.is_some() || !s.resets.is_empty() || !s.headers.is_empty())
        .await;
    assert_eq!(seen.trailers.iter().map(|t| t.0).collect::<Vec<_>>(), [1], "{target}: a 40 KiB header list: {seen:?}");
    assert_eq!(seen.data_bytes, 0, "{target}: a request with an oversized header list was served");
    assert!(seen.goaway.is_none() && !seen.closed, "{target}: one oversized request closed the connection");
    drop(conn);

    // A slow reader: a window of 0, so nothing can be sent to it, and as
    // many streams as allowed each asking for a large answer.
    let mut slow = RawConn::open_with(addr, &settings(&[(INITIAL_WINDOW_SIZE, 0)]), true).await.unwrap();
    let request = ExpandRequest { text: "x".repeat(200), times: 10_000 }.encode_to_vec();
    for i in 0..MAX_STREAMS {
        let id = 2 * i + 1;
        slow.send(&frame(HEADERS, END_HEADERS, id, &grpc_request(EXPAND_PATH))).await.unwrap();
        slow.send(&frame(DATA, END_STREAM, id, &grpc_message(false, request.len() as u32, &request))).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = rss_kib().saturating_sub(rss_before);
    eprintln!("{target}: {MAX_STREAMS} stalled streams of 2 MiB answers each: RSS +{grown} KiB");
    // Bounded by the windows: per stream, the server's send buffer (and, for
    // the gateway, its upstream window and the backend's buffer, all in
    // this process): ~6 MiB for a MeshServer, ~90 MiB for the gateway here.
    assert!(grown < 192 * 1024, "{target}: memory grew by {grown} KiB under a slow reader");
    assert_eq!(slow.seen().data_bytes, 0, "{target}: data went past a window of 0");
    drop(slow);

    // Bad gRPC frames: each gets a clear status, the server goes on.
    let cases: [(&str, Vec<u8>, &str, &str); 3] = [
        ("a length prefix longer than the message", grpc_message(false, 1000, b"0123456789"), "13", ""),
        ("the compressed flag with no grpc-encoding", grpc_message(true, 3, b"abc"), "13", "compress"),
        // tonic answers OUT_OF_RANGE where gRPC's table says RESOURCE_EXHAUSTED.
        ("a 64 MiB message", grpc_message(false, 64 << 20, &[0; 1000]), "11", "too large"),
    ];
    for (what, body, status, message) in cases {
        let (got, text) = raw_grpc(addr, ECHO_PATH, body).await;
        assert_eq!(got, status, "{target}: {what}: grpc-status {got:?} ({text})");
        assert!(text.to_lowercase().contains(message), "{target}: {what}: message {text:?}");
    }

    let (calls, errors) = bystander.finish().await;
    assert!(errors.is_empty(), "{target}: the well-behaved client failed meanwhile: {errors:?}");
    assert!(calls > 50, "{target}: the well-behaved client made only {calls} calls");

    let metrics = http_get(&admin.to_string(), "/metrics").await.unwrap();
    for reason in ["too_many_resets", "too_many_continuations", "too_many_control_frames", "refused_stream"] {
        let line = format!("meshkit_h2_refusals_total{{reason=\"{reason}\"}}");
        assert!(metrics.lines().any(|l| l.starts_with(&line)), "{target}: no {line} in /metrics");
    }
    eprintln!(
        "{target}: the bystander made {calls} calls, none failed; RSS +{} KiB in all",
        rss_kib().saturating_sub(rss_before)
    );
}

fn limited(config: &mut TestConfig) {
    config.mesh.server.max_concurrent_streams = MAX_STREAMS;
    config.mesh.server.control_frames_per_sec = CONTROL_PER_SEC;
    config.gateway.max_concurrent_streams = MAX_STREAMS;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_server_refuses_hostile_clients_and_keeps_serving_the_others() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let mut config = mesh_config(&etcd, "sqlite::memory:");
    limited(&mut config);
    let server = start_echo(config).await.unwrap();
    attack("a MeshServer", server.local_addr(), server.admin_addr().unwrap()).await;
    server.shutdown().await.unwrap();
}

/// etcd, an echo backend and a gateway routing to it, with `tweak` applied
/// to the gateway's config.
async fn gateway_over_echo(
    tweak: impl FnOnce(&mut TestConfig),
) -> (Etcd, tempfile::TempDir, meshkit_common::RunningServer, meshkit_gateway::RunningGateway) {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let backend = start_echo(mesh_config(&etcd, "sqlite::memory:")).await.unwrap();
    let descriptors = dir.path().join("echo.binpb");
    std::fs::write(&descriptors, echo::ECHO_DESCRIPTOR_SET).unwrap();
    let mut config = mesh_config(&etcd, "sqlite::memory:");
    config.gateway.listen = "127.0.0.1:0".into();
    config.gateway.descriptor_sets = vec![descriptors.display().to_string()];
    tweak(&mut config);
    let gateway = meshkit_gateway::start(config.into()).await.unwrap();
    (etcd, dir, backend, gateway)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_refuses_hostile_clients_and_keeps_serving_the_others() {
    let (_etcd, _dir, backend, gateway) = gateway_over_echo(|config| {
        limited(config);
        config.admin.enabled = true;
        config.admin.listen = "127.0.0.1:0".into();
    })
    .await;
    attack("the gateway", gateway.local_addr(), gateway.admin_addr().unwrap()).await;
    gateway.shutdown().await;
    backend.shutdown().await.unwrap();
}

/// Sends `request` as raw bytes and reads until the gateway closes the
/// connection or 2 s pass: every response it wrote.
async fn raw_http1(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match tokio::time::timeout(deadline - Instant::now(), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// HTTP/1.1 request smuggling: forms where a front proxy and the gateway
/// could disagree on where a request ends. Each is refused with 400, except
/// Transfer-Encoding beside Content-Length, which hyper reads as chunked and
/// then closes the connection (RFC 9112 section 6.3: what follows the body on
/// that connection is never read); in no form is the request hidden behind
/// the body answered.
#[tokio::test]
async fn the_gateway_refuses_http1_request_smuggling_forms() {
    let (_etcd, _dir, backend, gateway) = gateway_over_echo(|_| {}).await;
    let addr = gateway.local_addr();
    // The request a smuggler hides: answered only if the gateway took the body's end wrongly.
    let hidden = "GET /v1/echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let body = r#"{"text":"a"}"#;
    let forms = [
        (
            "Content-Length and Transfer-Encoding (CL.TE)",
            format!(
                "PUT /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n{hidden}",
                body.len(),
                body.len()
            ),
        ),
        (
            "Transfer-Encoding and Content-Length (TE.CL)",
            format!(
                "PUT /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n{hidden}",
                body.len()
            ),
        ),
        (
            "two Content-Lengths",
            format!(
                "PUT /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nContent-Length: {}\r\n\r\n{body}{hidden}",
                body.len(),
                body.len() + hidden.len()
            ),
        ),
        (
            "an obs-folded header",
            format!(
                "PUT /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Note: a\r\n  Transfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n{body}{hidden}",
                body.len()
            ),
        ),
        (
            "a Transfer-Encoding other than chunked",
            format!(
                "PUT /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: xchunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n{hidden}",
                body.len()
            ),
        ),
        (
            "white space before a header's colon",
            format!(
                "PUT /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding : chunked\r\nContent-Length: {}\r\n\r\n{body}{hidden}",
                body.len()
            ),
        ),
    ];
    for (i, (name, request)) in forms.into_iter().enumerate() {
        let answer = raw_http1(addr, request.as_bytes()).await;
        let statuses: Vec<&str> = answer.lines().filter(|l| l.starts_with("HTTP/1.1 ")).collect();
        let both_lengths = i < 2;
        let refused = statuses.first().is_some_and(|s| s.starts_with("HTTP/1.1 400"));
        let closed = answer.to_ascii_lowercase().contains("\r\nconnection: close\r\n");
        assert!(refused || (both_lengths && closed), "{name}: answered {statuses:?}\n{answer}");
        assert_eq!(statuses.len(), 1, "{name}: the hidden request was answered too: {answer}");
        assert!(!answer.contains("smuggled"), "{name}: {answer}");
    }
    // The same connection handling serves a plain request.
    let plain = format!(
        "PUT /v1/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = raw_http1(addr, plain.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    gateway.shutdown().await;
    backend.shutdown().await.unwrap();
}

/// A client-streaming call of `messages` small messages, each in a DATA
/// frame of its own and all sent at once, as a gRPC client streaming fast
/// sends them; then a unary call on the same connection. The count the
/// server saw, and the unary call's status.
async fn stream_small_messages(addr: SocketAddr, messages: usize) -> (i64, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(64 << 20)
        .handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let framed = |text: &str| {
        let m = EchoRequest { text: text.into(), ..Default::default() }.encode_to_vec();
        Bytes::from(grpc_message(false, m.len() as u32, &m))
    };
    let message = framed("x");
    let frames =
        (0..messages).map(move |_| Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(message.clone())));
    let req = http::Request::post(format!("http://{addr}/meshkit.echo.v1.EchoService/Collect"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::StreamBody::new(futures::stream::iter(frames)).boxed())
        .unwrap();
    let res = tokio::time::timeout(Duration::from_secs(20), sender.send_request(req))
        .await
        .expect("the streaming call answered within 20 s")
        .unwrap_or_else(|e| panic!("the streaming call of {messages} messages failed: {e}"));
    let collected = tokio::time::timeout(Duration::from_secs(20), res.into_body().collect())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("the response to {messages} messages failed: {e}"));
    let status =
        collected.trailers().and_then(|t| t.get("grpc-status")).and_then(|v| v.to_str().ok()).map(str::to_owned);
    assert_eq!(status.as_deref(), Some("0"), "Collect of {messages} messages");
    let body = collected.to_bytes();
    let reply = echo::EchoReply::decode(body.get(5..).unwrap_or_default()).unwrap();

    let unary = http::Request::post(format!("http://{addr}{ECHO_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(framed("y")).map_err(|never| match never {}).boxed())
        .unwrap();
    let res = sender.send_request(unary).await.expect("the connection is still open");
    let collected = res.into_body().collect().await.unwrap();
    let unary_status =
        collected.trailers().and_then(|t| t.get("grpc-status")).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    (reply.count, unary_status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_streaming_many_small_messages_at_once_is_served_in_full() {
    init_logs();
    let (_etcd, _dir, backend, gateway) = gateway_over_echo(|_| {}).await;
    for (target, addr) in [("a MeshServer", backend.local_addr()), ("the gateway", gateway.local_addr())] {
        let (count, unary) = stream_small_messages(addr, 20_000).await;
        assert_eq!(count, 20_000, "{target}: messages the handler saw");
        assert_eq!(unary, "0", "{target}: a call after it on the same connection");
    }
    gateway.shutdown().await;
    backend.shutdown().await.unwrap();
}
