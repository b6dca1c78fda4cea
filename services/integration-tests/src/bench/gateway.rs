//! The gateway's benchmarks, side by side in one run:
//!
//! 1. gRPC passthrough vs nginx 1.22 `grpc_pass` (Debian) in front of the
//!    same echo backend, and the backend called directly: throughput at
//!    saturation (closed loop), latency at a steady rate below saturation
//!    (added latency = proxy − direct), and the proxy process's CPU per
//!    request at that rate (nginx: master and workers together).
//! 2. REST/JSON transcoding vs passthrough through the same gateway, to the
//!    same method: CPU per request and throughput.
//! 3. Every load shape (h2load): the gateway, nginx and HAProxy 2.6 in
//!    cleartext, with `h2-floor` (the h2 crate alone relaying each stream)
//!    as the yardstick of what the gateway adds; then all of them over TLS
//!    both ways, with Spring Cloud Gateway 5 beside them (it proxies gRPC
//!    over TLS only). Proxy and whole-system CPU per request, added
//!    latency, proxy memory.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use meshkit_integration_tests::{
    Etcd, ServiceProcess,
    echo::{ECHO, ECHO_DESCRIPTOR_SET, EchoRequest, EchoServiceClient},
    free_port,
};
use tonic::transport::{Channel, Endpoint};

use super::{CONCURRENCY, Stats, load, paced};

/// The steady rate of the latency and CPU phases, well below saturation.
const RATE: u64 = 2_000;

pub async fn run(etcd: &Etcd, logs: &Path, secs: u64) -> anyhow::Result<()> {
    // `MESHKIT_BENCH_GATEWAY=tls`: the TLS table alone (Spring Cloud Gateway's).
    if std::env::var("MESHKIT_BENCH_GATEWAY").as_deref() == Ok("tls") {
        std::fs::write(logs.join("echo.binpb"), ECHO_DESCRIPTOR_SET)?;
        return over_tls(etcd, logs).await;
    }
    let phase = Duration::from_secs(secs);
    // The backend is a process of its own (`echo-server`, `MeshServer` with
    // its default layers), so its CPU is read apart from the load generators'.
    let backend_port = free_port();
    let backend = ServiceProcess::spawn(
        "echo-server",
        &[
            ("ECHO_SERVER", "mesh".to_owned()),
            ("MESHKIT_SERVER_LISTEN", format!("127.0.0.1:{backend_port}")),
            ("MESHKIT_ETCD_ENDPOINTS", etcd.endpoint()),
            ("MESHKIT_ADMIN_ENABLED", "false".to_owned()),
            ("MESHKIT_REGISTRY_INSTANCE_ID", "bench-echo".to_owned()),
        ],
        logs,
    )?;
    // Registered, not only listening (it binds first): the gateway's first
    // call must find it.
    meshkit_integration_tests::fleet::wait_registered(&etcd.client().await, ECHO, &["bench-echo"]).await;
    let backend_addr = std::net::SocketAddr::from(([127, 0, 0, 1], backend_port));
    let descriptors = logs.join("echo.binpb");
    std::fs::write(&descriptors, ECHO_DESCRIPTOR_SET)?;

    let gateway_port = free_port();
    let mut env = vec![
        ("MESHKIT_ETCD_ENDPOINTS", etcd.endpoint()),
        ("MESHKIT_GATEWAY_LISTEN", format!("127.0.0.1:{gateway_port}")),
        ("MESHKIT_GATEWAY_DESCRIPTOR_SETS", descriptors.display().to_string()),
        ("MESHKIT_ADMIN_ENABLED", "false".into()),
    ];
    // `MESHKIT_BENCH_GATEWAY_THREADS=N` runs the gateway on N runtime threads.
    if let Ok(n) = std::env::var("MESHKIT_BENCH_GATEWAY_THREADS") {
        env.push(("TOKIO_WORKER_THREADS", n));
    }
    let gateway = ServiceProcess::spawn("meshkit-gateway", &env, logs)?;
    let nginx = Nginx::start(logs, backend_addr.port(), None)?;

    let direct = channel(backend_addr.port()).await?;
    let haproxy = Haproxy::start(logs, backend_addr.port(), None)?;
    let via_nginx = channel(nginx.port).await?;
    let via_haproxy = channel(haproxy.port).await?;
    let via_gateway = channel(gateway_port).await?;
    // The first call through the gateway waits for its pool's first etcd read.
    let paths = [&direct, &via_nginx, &via_gateway, &via_haproxy];
    for c in paths {
        echo_once(c.clone()).await.context("warm-up call")?;
    }

    // Saturation: closed loop, alternating so drift hits every path alike.
    let mut sat: [Stats; 4] = Default::default();
    for _ in 0..2 {
        for (i, c) in paths.into_iter().enumerate() {
            let c = c.clone();
            sat[i].merge(load(phase / 2, move || echo_once(c.clone())).await?);
        }
    }
    // A steady rate: latency, and the proxy's CPU per request.
    let mut steady: [Stats; 4] = Default::default();
    // Each proxy's CPU in user space and in the kernel (its system calls and
    // the loopback TCP work done on its behalf).
    let mut proxy_user = [Duration::ZERO; 4];
    let mut proxy_kernel = [Duration::ZERO; 4];
    let pids = [None, Some(nginx.pid()), Some(gateway.pid()), Some(haproxy.pid())];
    for _ in 0..2 {
        for (i, c) in paths.into_iter().enumerate() {
            let c = c.clone();
            let before = pids[i].map(tree_times).unwrap_or_default();
            steady[i].merge(paced(RATE, phase / 2, move || echo_once(c.clone())).await?);
            let after = pids[i].map(tree_times).unwrap_or_default();
            proxy_user[i] += after.0.saturating_sub(before.0);
            proxy_kernel[i] += after.1.saturating_sub(before.1);
        }
    }
    let per_req = |cpu: Duration, i: usize| cpu.as_secs_f64() * 1e6 / steady[i].calls.max(1) as f64;
    let per_call = |i: usize| per_req(proxy_user[i] + proxy_kernel[i], i);
    let p = |s: &Stats, q: f64| s.hist.value_at_quantile(q) as i64;
    println!(
        "\n== gateway gRPC passthrough vs nginx 1.22 grpc_pass and HAProxy 2.6 (unary Echo, one backend; tonic client, one connection, concurrency {CONCURRENCY}; steady rate: calls evenly spaced)"
    );
    println!(
        "  {:<9} {:>14} {:>10} {:>10} {:>10} {:>10} {:>16} {:>22}",
        "", "sat. calls/s", "p50 µs", "p99 µs", "+p50 µs", "+p99 µs", "proxy CPU µs/req", "of which user / kernel"
    );
    for (i, name) in ["direct", "nginx", "gateway", "haproxy"].into_iter().enumerate() {
        println!(
            "  {:<9} {:>14.0} {:>10} {:>10} {:>10} {:>10} {:>16} {:>22}",
            name,
            sat[i].rate(),
            p(&steady[i], 0.5),
            p(&steady[i], 0.99),
            if i == 0 { "-".into() } else { format!("{:+}", p(&steady[i], 0.5) - p(&steady[0], 0.5)) },
            if i == 0 { "-".into() } else { format!("{:+}", p(&steady[i], 0.99) - p(&steady[0], 0.99)) },
            if i == 0 { "-".into() } else { format!("{:.1}", per_call(i)) },
            if i == 0 {
                "-".into()
            } else {
                format!("{:.1} / {:.1}", per_req(proxy_user[i], i), per_req(proxy_kernel[i], i))
            },
        );
    }
    let added = |i: usize, q: f64| p(&steady[i], q) - p(&steady[0], q);
    println!(
        "  gateway: CPU per request x{:.2} nginx, x{:.2} HAProxy (goal <= 1 of the better); added p50 {:+} µs vs {:+} and {:+}, p99 {:+} vs {:+} and {:+} (goal <= both); throughput x{:.2} nginx, x{:.2} HAProxy (latency and CPU at a steady {RATE}/s)",
        per_call(2) / per_call(1),
        per_call(2) / per_call(3),
        added(2, 0.5),
        added(1, 0.5),
        added(3, 0.5),
        added(2, 0.99),
        added(1, 0.99),
        added(3, 0.99),
        sat[2].rate() / sat[1].rate(),
        sat[2].rate() / sat[3].rate(),
    );
    println!(
        "  kernel time alone: nginx {:.1} µs, HAProxy {:.1} µs, gateway {:.1} µs",
        per_req(proxy_kernel[1], 1),
        per_req(proxy_kernel[3], 3),
        per_req(proxy_kernel[2], 2),
    );

    // REST/JSON vs passthrough, same gateway, same method.
    let rest_client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = format!("http://127.0.0.1:{gateway_port}/v1/echo/bench").parse()?;
    let rest_call = {
        let client = rest_client.clone();
        let uri = uri.clone();
        move || {
            let client = client.clone();
            let uri = uri.clone();
            async move {
                let res = client.get(uri).await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                let status = res.status();
                let body = res.into_body().collect().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                if status != 200 {
                    return Err(tonic::Status::unknown(format!("{status}: {:?}", body.to_bytes())));
                }
                Ok(())
            }
        }
    };
    rest_call().await.context("warm-up REST call")?;
    let mut rest_sat = Stats::default();
    let mut grpc_sat = Stats::default();
    let mut rest_steady = Stats::default();
    let mut grpc_steady = Stats::default();
    let (mut rest_cpu, mut grpc_cpu) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..2 {
        rest_sat.merge(load(phase / 2, rest_call.clone()).await?);
        let c = via_gateway.clone();
        grpc_sat.merge(load(phase / 2, move || echo_once(c.clone())).await?);
        let before = tree_cpu(gateway.pid());
        rest_steady.merge(paced(RATE, phase / 2, rest_call.clone()).await?);
        rest_cpu += tree_cpu(gateway.pid()).saturating_sub(before);
        let c = via_gateway.clone();
        let before = tree_cpu(gateway.pid());
        grpc_steady.merge(paced(RATE, phase / 2, move || echo_once(c.clone())).await?);
        grpc_cpu += tree_cpu(gateway.pid()).saturating_sub(before);
    }
    let rest_per = rest_cpu.as_secs_f64() * 1e6 / rest_steady.calls.max(1) as f64;
    let grpc_per = grpc_cpu.as_secs_f64() * 1e6 / grpc_steady.calls.max(1) as f64;
    println!(
        "\n== gateway REST/JSON transcoding vs gRPC passthrough (GET /v1/echo/bench vs Echo, HTTP/1.1 keep-alive)"
    );
    println!("  {:<12} {:>14} {:>10} {:>10} {:>18}", "", "sat. calls/s", "p50 µs", "p99 µs", "gateway CPU µs/req");
    for (name, sat, steady, per) in
        [("passthrough", &grpc_sat, &grpc_steady, grpc_per), ("REST/JSON", &rest_sat, &rest_steady, rest_per)]
    {
        println!("  {:<12} {:>14.0} {:>10} {:>10} {:>18.1}", name, sat.rate(), p(steady, 0.5), p(steady, 0.99), per);
    }
    println!(
        "  REST/passthrough: CPU per request x{:.2}   throughput x{:.2}",
        rest_per / grpc_per,
        rest_sat.rate() / grpc_sat.rate()
    );
    let floor = H2Floor::start(logs, backend_addr.port())?;
    let targets = [
        Target { name: "direct", port: backend_addr.port(), pid: None },
        Target { name: "gateway", port: gateway_port, pid: Some(gateway.pid()) },
        Target { name: "nginx", port: nginx.port, pid: Some(nginx.pid()) },
        Target { name: "haproxy", port: haproxy.port, pid: Some(haproxy.pid()) },
        Target { name: "h2-floor", port: floor.port, pid: Some(floor.pid()) },
    ];
    println!(
        "\n== gRPC passthrough by load shape, cleartext (h2load, unary Echo; medians of {ROUNDS} alternating rounds, spread = max - min)"
    );
    println!(
        "  proxies: the gateway (2 runtime threads), nginx 1.22 grpc_pass (2 workers), HAProxy 2.6 (2 threads, h2 both sides); the backend: echo-server (MeshServer), a process of its own; no CPU pinning"
    );
    println!(
        "  h2-floor: the h2 crate alone relaying each request on one thread (no routing, admission, metrics, balancing, retries): what the gateway spends above it is its own"
    );
    shapes(logs, "http", &targets, backend.pid())?;
    drop(floor);
    drop(haproxy);
    drop(nginx);
    drop(gateway);
    drop(backend);
    over_tls(etcd, logs).await
}

/// Every proxy over TLS, downstream and upstream, with Spring Cloud Gateway
/// 5 beside them (it proxies gRPC over TLS only): a backend of its own with
/// TLS on, under an etcd prefix of its own so the gateway finds only it.
async fn over_tls(etcd: &Etcd, logs: &Path) -> anyhow::Result<()> {
    let certs = logs.join("tls");
    meshkit_meshctl::certs::issue(&certs, "meshkit", &["echo", "gateway", "proxy"], 1)?;
    let pem = |name: &str| certs.join(name).display().to_string();
    const PREFIX: &str = "/bench-tls";
    let mesh_tls = |name: &str, extra: Vec<(&'static str, String)>| {
        let mut env = vec![
            ("MESHKIT_ETCD_ENDPOINTS", etcd.endpoint()),
            ("MESHKIT_ETCD_PREFIX", PREFIX.to_owned()),
            ("MESHKIT_ADMIN_ENABLED", "false".to_owned()),
            ("MESHKIT_TLS_ENABLED", "true".to_owned()),
            ("MESHKIT_TLS_CERT_FILE", pem(&format!("{name}.pem"))),
            ("MESHKIT_TLS_KEY_FILE", pem(&format!("{name}.key"))),
            ("MESHKIT_TLS_CA_FILE", pem("ca.pem")),
        ];
        env.extend(extra);
        env
    };
    let backend_port = free_port();
    // nginx, HAProxy and Spring Cloud Gateway present no client certificate.
    let backend = ServiceProcess::spawn(
        "echo-server",
        &mesh_tls(
            "echo",
            vec![
                ("ECHO_SERVER", "mesh".to_owned()),
                ("MESHKIT_SERVER_LISTEN", format!("127.0.0.1:{backend_port}")),
                ("MESHKIT_REGISTRY_INSTANCE_ID", "bench-echo-tls".to_owned()),
                ("MESHKIT_TLS_CLIENT_AUTH", "optional".to_owned()),
            ],
        ),
        logs,
    )?;
    let key = meshkit_common::registry::instance_key(PREFIX, ECHO, "bench-echo-tls");
    let client = etcd.client().await;
    meshkit_integration_tests::eventually("the TLS backend registered", Duration::from_secs(15), || {
        let (mut client, key) = (client.clone(), key.clone());
        async move { client.get(key, None).await.ok().filter(|r| !r.kvs().is_empty()).map(|_| ()) }
    })
    .await;
    let descriptors = logs.join("echo.binpb");
    let gateway_port = free_port();
    let gateway = ServiceProcess::spawn(
        "meshkit-gateway",
        &mesh_tls(
            "gateway",
            vec![
                ("MESHKIT_GATEWAY_LISTEN", format!("127.0.0.1:{gateway_port}")),
                ("MESHKIT_GATEWAY_DESCRIPTOR_SETS", descriptors.display().to_string()),
                ("MESHKIT_GATEWAY_TLS_CERT_FILE", pem("proxy.pem")),
                ("MESHKIT_GATEWAY_TLS_KEY_FILE", pem("proxy.key")),
            ],
        ),
        logs,
    )?;
    wait_listening(gateway_port, Duration::from_secs(10), || None).context("the TLS gateway")?;
    let proxy = Certs { cert: certs.join("proxy.pem"), key: certs.join("proxy.key") };
    let nginx = Nginx::start(logs, backend_port, Some(&proxy))?;
    let haproxy = Haproxy::start(logs, backend_port, Some(&proxy))?;
    let scg = Scg::start(logs, backend_port, &proxy)?;
    let targets = [
        Target { name: "direct", port: backend_port, pid: None },
        Target { name: "gateway", port: gateway_port, pid: Some(gateway.pid()) },
        Target { name: "nginx", port: nginx.port, pid: Some(nginx.pid()) },
        Target { name: "haproxy", port: haproxy.port, pid: Some(haproxy.pid()) },
        Target { name: "scg", port: scg.port, pid: Some(scg.pid()) },
    ];
    // The JVM compiles its hot paths after some thousands of calls: every
    // target gets the same warm-up before anything is measured.
    let warm_up = Shape { name: "warm-up", connections: 4, streams: 16, rate_per_connection: None, requests: 40_000 };
    let body = request_body(logs)?;
    for target in &targets {
        tokio::task::block_in_place(|| h2load("https", target.port, &warm_up, &body, target.pid, backend.pid()))
            .with_context(|| format!("warming up {}", target.name))?;
    }
    println!(
        "\n== gRPC passthrough by load shape, over TLS both ways (h2load, unary Echo; medians of {ROUNDS} alternating rounds, spread = max - min)"
    );
    println!(
        "  proxies as above, and Spring Cloud Gateway 5.0 (WebFlux, Spring Boot 4.0, one route, JVM defaults); TLS 1.3 to each proxy; upstream: the gateway mTLS, the others TLS without a client certificate; the backend: echo-server with TLS; no CPU pinning"
    );
    shapes(logs, "https", &targets, backend.pid())?;
    drop(scg);
    drop(haproxy);
    drop(nginx);
    drop(gateway);
    drop(backend);
    Ok(())
}

/// One target of h2load: a proxy (its process, for its CPU and memory) or
/// the backend itself (`direct`, no pid).
struct Target {
    name: &'static str,
    port: u16,
    pid: Option<i32>,
}

/// A proxy's certificate and key (PEM).
struct Certs {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

/// A load shape for h2load: connections, streams per connection, and a
/// request rate per connection (none: as fast as it goes).
struct Shape {
    name: &'static str,
    connections: u32,
    streams: u32,
    rate_per_connection: Option<u32>,
    requests: u32,
}

const SHAPES: [Shape; 4] = [
    Shape {
        name: "1 connection x 16 streams, 2,000/s",
        connections: 1,
        streams: 16,
        rate_per_connection: Some(2_000),
        requests: 16_000,
    },
    Shape {
        name: "4 connections x 16 streams, 2,000/s",
        connections: 4,
        streams: 16,
        rate_per_connection: Some(500),
        requests: 16_000,
    },
    Shape {
        name: "64 connections x 4 streams, 1,920/s",
        connections: 64,
        streams: 4,
        rate_per_connection: Some(30),
        requests: 15_360,
    },
    Shape {
        name: "saturation, 4 connections x 64 streams",
        connections: 4,
        streams: 64,
        rate_per_connection: None,
        requests: 60_000,
    },
];

/// What one h2load run did, and what it cost.
#[derive(Clone, Copy, Default)]
struct Run {
    calls: f64,
    rate: f64,
    mean_us: f64,
    /// Request time, from h2load's per-request log: median and 99th percentile.
    p50_us: f64,
    p99_us: f64,
    proxy_user: Duration,
    proxy_kernel: Duration,
    backend: Duration,
    loadgen: Duration,
    /// The proxy's resident memory (its workers' too) after the run.
    proxy_rss_kib: u64,
}

impl Run {
    fn per_call(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.calls.max(1.0)
    }
    fn proxy(&self) -> f64 {
        self.per_call(self.proxy_user + self.proxy_kernel)
    }
    fn system(&self) -> f64 {
        self.per_call(self.proxy_user + self.proxy_kernel + self.backend + self.loadgen)
    }
}

/// h2load (nghttp2) against `port`: unary Echo calls in `shape`. Its CPU is
/// what bash's `times` reports for its child; the backend's is its
/// process's (`backend`, the echo-server's pid).
fn h2load(
    scheme: &str,
    port: u16,
    shape: &Shape,
    body: &Path,
    proxy: Option<i32>,
    backend: i32,
) -> anyhow::Result<Run> {
    let mut args = vec![
        format!("-c{}", shape.connections),
        format!("-m{}", shape.streams),
        format!("-n{}", shape.requests),
        "-t1".to_owned(),
    ];
    if let Some(rate) = shape.rate_per_connection {
        args.push(format!("--rps={rate}"));
    }
    // Every request's time, for the percentiles h2load does not print.
    let log = tempfile::NamedTempFile::new().context("a temp file for h2load's request log")?;
    args.push(format!("--log-file={}", log.path().display()));
    let proxy_before = proxy.map(tree_times).unwrap_or_default();
    let backend_before = tree_times(backend);
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(r#"h2load "$@" -H 'content-type: application/grpc' -H 'te: trailers' && times"#)
        .arg("h2load")
        .args(&args)
        .arg("-d")
        .arg(body)
        .arg(format!("{scheme}://127.0.0.1:{port}/meshkit.echo.v1.EchoService/Echo"))
        .output()
        .context("running h2load (deploy/local/install-deps.sh --bench installs it)")?;
    let backend_after = tree_times(backend);
    let proxy_after = proxy.map(tree_times).unwrap_or_default();
    let proxy_rss_kib = proxy.map(tree_rss_kib).unwrap_or(0);
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(out.status.success(), "h2load failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    let after =
        |needle: &str| text.lines().find_map(|l| l.trim_start().strip_prefix(needle).map(str::trim).map(str::to_owned));
    let succeeded: f64 = text
        .lines()
        .find(|l| l.starts_with("requests:"))
        .and_then(|l| l.split(',').find(|p| p.contains("succeeded")))
        .and_then(|p| p.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .context("h2load printed no requests line")?;
    anyhow::ensure!(succeeded as u32 == shape.requests, "h2load: {succeeded} of {} succeeded: {text}", shape.requests);
    let rate = after("finished in")
        .and_then(|l| l.split(", ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|r| r.parse().ok()))
        .unwrap_or(0.0);
    // "time for request:   469us   5.82ms   1.76ms   583us   79.10%": min, max, mean, sd.
    let micros = |v: &str| -> Option<f64> {
        if let Some(n) = v.strip_suffix("us") {
            n.parse().ok()
        } else if let Some(n) = v.strip_suffix("ms") {
            n.parse::<f64>().ok().map(|n| n * 1e3)
        } else {
            v.strip_suffix('s').and_then(|n| n.parse::<f64>().ok()).map(|n| n * 1e6)
        }
    };
    let mean_us =
        after("time for request:").and_then(|l| l.split_whitespace().nth(2).and_then(micros)).unwrap_or(f64::NAN);
    let (p50_us, p99_us) = request_percentiles(log.path())?;
    // `times`: the shell's own line, then its children's: "0m0.512s 0m0.208s".
    let seconds = |v: &str| -> Option<f64> {
        let (m, s) = v.strip_suffix('s')?.split_once('m')?;
        Some(m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
    };
    let loadgen = text
        .lines()
        .next_back()
        .map(|l| l.split_whitespace().filter_map(seconds).sum::<f64>())
        .map(Duration::from_secs_f64)
        .unwrap_or_default();
    Ok(Run {
        calls: succeeded,
        rate,
        mean_us,
        p50_us,
        p99_us,
        proxy_user: proxy_after.0.saturating_sub(proxy_before.0),
        proxy_kernel: proxy_after.1.saturating_sub(proxy_before.1),
        backend: (backend_after.0 + backend_after.1).saturating_sub(backend_before.0 + backend_before.1),
        loadgen,
        proxy_rss_kib,
    })
}

/// The median and 99th percentile (nearest rank) of the request times in
/// h2load's `--log-file`: start (µs since the epoch), status, µs to the end
/// of the response, tab-separated.
fn request_percentiles(log: &Path) -> anyhow::Result<(f64, f64)> {
    let text = std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let mut times: Vec<u64> =
        text.lines().filter_map(|l| l.split('\t').nth(2)).filter_map(|t| t.trim().parse().ok()).collect();
    anyhow::ensure!(!times.is_empty(), "h2load's request log {} has no request", log.display());
    times.sort_unstable();
    let rank = |q: f64| times[((q * times.len() as f64).ceil() as usize).clamp(1, times.len()) - 1] as f64;
    Ok((rank(0.50), rank(0.99)))
}

/// The framed Echo request h2load sends.
fn request_body(logs: &Path) -> anyhow::Result<std::path::PathBuf> {
    let body = logs.join("echo-request.bin");
    let message = prost::Message::encode_to_vec(&EchoRequest { text: "bench".into(), ..Default::default() });
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    std::fs::write(&body, framed)?;
    Ok(body)
}

/// Rounds of each load shape, the targets alternating within a round.
const ROUNDS: usize = 3;

/// gRPC passthrough in every load shape, h2load driving each target (the
/// direct path first) in alternating rounds: CPU per request of the proxy
/// and of the whole system (load generator, proxy, backend), and the
/// proxy's memory.
fn shapes(logs: &Path, scheme: &str, targets: &[Target], backend: i32) -> anyhow::Result<()> {
    let body = request_body(logs)?;
    let at = |name: &str| targets.iter().position(|t| t.name == name);
    for shape in &SHAPES {
        let mut runs: Vec<Vec<Run>> = targets.iter().map(|_| Vec::new()).collect();
        for _ in 0..ROUNDS {
            for (i, target) in targets.iter().enumerate() {
                let run =
                    tokio::task::block_in_place(|| h2load(scheme, target.port, shape, &body, target.pid, backend))
                        .with_context(|| format!("{}: {}", target.name, shape.name))?;
                runs[i].push(run);
            }
        }
        let median = |v: &mut Vec<f64>| -> f64 {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        println!("\n  {}", shape.name);
        println!(
            "    {:<8} {:>10} {:>14} {:>8} {:>14} {:>13} {:>9} {:>9} {:>10} {:>9}",
            "",
            "proxy µs",
            "user / kernel",
            "spread",
            "system µs",
            "mean req µs",
            "p50 µs",
            "p99 µs",
            "calls/s",
            "RSS MiB"
        );
        let mut proxy_med = vec![0.0; targets.len()];
        let mut system_med = vec![0.0; targets.len()];
        let mut mean_med = vec![0.0; targets.len()];
        let mut p50_med = vec![0.0; targets.len()];
        let mut p99_med = vec![0.0; targets.len()];
        for (i, target) in targets.iter().enumerate() {
            let r = &runs[i];
            let mut proxy: Vec<f64> = r.iter().map(Run::proxy).collect();
            let spread =
                proxy.iter().copied().fold(f64::MIN, f64::max) - proxy.iter().copied().fold(f64::MAX, f64::min);
            proxy_med[i] = median(&mut proxy);
            system_med[i] = median(&mut r.iter().map(Run::system).collect());
            mean_med[i] = median(&mut r.iter().map(|x| x.mean_us).collect());
            p50_med[i] = median(&mut r.iter().map(|x| x.p50_us).collect());
            p99_med[i] = median(&mut r.iter().map(|x| x.p99_us).collect());
            let user = median(&mut r.iter().map(|x| x.per_call(x.proxy_user)).collect());
            let kernel = median(&mut r.iter().map(|x| x.per_call(x.proxy_kernel)).collect());
            let rate = median(&mut r.iter().map(|x| x.rate).collect());
            let rss = r.iter().map(|x| x.proxy_rss_kib).max().unwrap_or(0) as f64 / 1024.0;
            let name = target.name;
            if target.pid.is_none() {
                println!(
                    "    {name:<8} {:>10} {:>14} {:>8} {:>14.1} {:>13.0} {:>9.0} {:>9.0} {:>10.0} {:>9}",
                    "-", "-", "-", system_med[i], mean_med[i], p50_med[i], p99_med[i], rate, "-"
                );
            } else {
                println!(
                    "    {name:<8} {:>10.1} {:>14} {:>8.1} {:>14.1} {:>13.0} {:>9.0} {:>9.0} {:>10.0} {:>9.0}",
                    proxy_med[i],
                    format!("{user:.0} / {kernel:.0}"),
                    spread,
                    system_med[i],
                    mean_med[i],
                    p50_med[i],
                    p99_med[i],
                    rate,
                    rss
                );
            }
        }
        let (Some(direct), Some(gateway)) = (at("direct"), at("gateway")) else { continue };
        let added = |med: &[f64], i: usize| med[i] - med[direct];
        let mut line = String::from("    gateway:");
        if let Some(floor) = at("h2-floor") {
            line += &format!(" {:+.1} µs per request above the h2 floor;", proxy_med[gateway] - proxy_med[floor]);
        }
        for (peer, label) in [("nginx", "nginx"), ("haproxy", "HAProxy"), ("scg", "Spring Cloud Gateway")] {
            if let Some(p) = at(peer) {
                line += &format!(
                    " x{:.2} {label}'s proxy CPU, x{:.2} its system CPU, ",
                    proxy_med[gateway] / proxy_med[p],
                    system_med[gateway] / system_med[p],
                );
                // Latency is compared at the steady rates; saturated, throughput.
                line += &if shape.rate_per_connection.is_some() {
                    format!(
                        "added p50 {:+.0} µs vs {:+.0}, p99 {:+.0} vs {:+.0};",
                        added(&p50_med, gateway),
                        added(&p50_med, p),
                        added(&p99_med, gateway),
                        added(&p99_med, p),
                    )
                } else {
                    let rate = |i: usize| median(&mut runs[i].iter().map(|x| x.rate).collect());
                    format!("x{:.2} its calls/s;", rate(gateway) / rate(p))
                };
            }
        }
        println!(
            "{} (goals: proxy CPU <= 1 of the better of nginx and HAProxy, aim 0.6 / 0.8; added p50 and p99 <= both)",
            line.trim_end_matches(';')
        );
    }
    Ok(())
}

/// Resident memory (VmRSS, KiB) of `pid` and its direct children.
fn tree_rss_kib(pid: i32) -> u64 {
    let rss = |pid: i32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
            .unwrap_or(0)
    };
    let mut total = rss(pid);
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            if stat_times(child).is_some_and(|(ppid, _, _)| ppid == pid) {
                total += rss(child);
            }
        }
    }
    total
}

/// A proxy process of the bench, on `port`; stopped when dropped (first
/// with `stop_signal` when it has a graceful stop, then killed).
struct Proxy {
    child: std::process::Child,
    port: u16,
    stop_signal: Option<&'static str>,
}

impl Proxy {
    fn spawn(
        mut command: std::process::Command,
        port: u16,
        stop_signal: Option<&'static str>,
        name: &str,
    ) -> anyhow::Result<Self> {
        let child = command.stdin(std::process::Stdio::null()).spawn().with_context(|| format!("starting {name}"))?;
        Ok(Self { child, port, stop_signal })
    }

    /// Until the proxy listens, within `within`; it fails at once if the
    /// process exits first. `log` says where to look.
    fn wait_listening(&mut self, within: Duration, log: &str) -> anyhow::Result<()> {
        let child = &mut self.child;
        wait_listening(self.port, within, || child.try_wait().ok().flatten()).with_context(|| format!("see {log}"))
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(signal) = self.stop_signal {
            let _ = std::process::Command::new("kill").arg(signal).arg(self.child.id().to_string()).status();
            for _ in 0..100 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `h2-floor` (src/bin/h2-floor.rs) in front of the backend.
struct H2Floor;

impl H2Floor {
    fn start(dir: &Path, backend_port: u16) -> anyhow::Result<Proxy> {
        let port = free_port();
        let log_path = dir.join("h2-floor.log");
        let mut command = std::process::Command::new(meshkit_integration_tests::bin_dir().join("h2-floor"));
        command
            .arg(port.to_string())
            .arg(backend_port.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log_path)?);
        let mut proxy = Proxy::spawn(command, port, None, "h2-floor")?;
        proxy.wait_listening(Duration::from_secs(10), &log_path.display().to_string())?;
        Ok(proxy)
    }
}

/// Spring Cloud Gateway 5 (services/integration-tests/clients/scg, built by
/// the one Maven build) with one route to the backend over TLS.
struct Scg;

impl Scg {
    fn start(dir: &Path, backend_port: u16, certs: &Certs) -> anyhow::Result<Proxy> {
        let module = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/scg/target");
        let classpath = std::fs::read_to_string(module.join("classpath"))
            .context("Spring Cloud Gateway is not built: run deploy/local/install-deps.sh --bench")?;
        let port = free_port();
        let log_path = dir.join("scg.log");
        let log = std::fs::File::create(&log_path)?;
        let mut command = std::process::Command::new("java");
        command
            .arg("-cp")
            .arg(format!("{}:{}", classpath.trim(), module.join("meshkit-scg-peer-0.1.0.jar").display()))
            .arg("io.meshkit.scg.GatewayApplication")
            .arg(format!("--server.port={port}"))
            .arg("--server.address=127.0.0.1")
            .arg(format!("--backend=https://127.0.0.1:{backend_port}"))
            .arg(format!("--server.ssl.certificate=file:{}", certs.cert.display()))
            .arg(format!("--server.ssl.certificate-private-key=file:{}", certs.key.display()))
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut scg = Proxy::spawn(command, port, None, "Spring Cloud Gateway (java)")?;
        // The JVM starts slower than the others.
        scg.wait_listening(Duration::from_secs(60), &log_path.display().to_string()).context("Spring Cloud Gateway")?;
        Ok(scg)
    }
}

/// HAProxy 2.6 in front of one backend: HTTP/2 on both sides, upstream
/// connections reused across clients; with `tls`, TLS both sides (the
/// backend's certificate not checked).
struct Haproxy;

impl Haproxy {
    fn start(dir: &Path, backend_port: u16, tls: Option<&Certs>) -> anyhow::Result<Proxy> {
        let haproxy = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("haproxy is missing: run deploy/local/install-deps.sh --bench")?;
        let port = free_port();
        let (bind, server) = match tls {
            None => ("proto h2".to_owned(), "proto h2".to_owned()),
            Some(certs) => {
                // HAProxy reads the certificate and its key from one file.
                let both = dir.join("haproxy-tls.pem");
                std::fs::write(&both, [std::fs::read(&certs.cert)?, std::fs::read(&certs.key)?].concat())?;
                (format!("ssl crt {} alpn h2", both.display()), "ssl verify none alpn h2".to_owned())
            }
        };
        let conf = format!(
            "global
    maxconn 4096
    nbthread 2
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend grpc
    bind 127.0.0.1:{port} {bind}
    default_backend echo
backend echo
    http-reuse always
    server echo 127.0.0.1:{backend_port} {server}
"
        );
        let conf_path = dir.join(if tls.is_some() { "haproxy-tls.cfg" } else { "haproxy.cfg" });
        std::fs::write(&conf_path, conf)?;
        let mut command = std::process::Command::new(haproxy);
        command.arg("-f").arg(&conf_path).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::inherit());
        let mut proxy = Proxy::spawn(command, port, None, "haproxy")?;
        proxy.wait_listening(Duration::from_secs(10), "its messages above").context("haproxy")?;
        Ok(proxy)
    }
}

/// A connection to `port`, waiting (up to 10 s) for a process just spawned
/// to start listening.
async fn channel(port: u16) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?.tcp_nodelay(true);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(anyhow::Error::new(e).context(format!("nothing listens on 127.0.0.1:{port}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn echo_once(channel: Channel) -> Result<(), tonic::Status> {
    EchoServiceClient::new(channel).echo(EchoRequest { text: "bench".into(), ..Default::default() }).await.map(|_| ())
}

/// utime + stime of `pid` and its direct children (nginx's workers).
fn tree_cpu(pid: i32) -> Duration {
    let (user, kernel) = tree_times(pid);
    user + kernel
}

/// (utime, stime) of `pid` and its direct children.
fn tree_times(pid: i32) -> (Duration, Duration) {
    let (mut user, mut kernel) = stat_times(pid).map(|(_, u, k)| (u, k)).unwrap_or_default();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            if let Some((ppid, u, k)) = stat_times(child) {
                if ppid == pid {
                    user += u;
                    kernel += k;
                }
            }
        }
    }
    (user, kernel)
}

/// (parent pid, utime + stime) from /proc/PID/stat.
pub(crate) fn stat_cpu(pid: i32) -> Option<(i32, Duration)> {
    stat_times(pid).map(|(ppid, user, kernel)| (ppid, user + kernel))
}

/// (parent pid, utime, stime) from /proc/PID/stat.
fn stat_times(pid: i32) -> Option<(i32, Duration, Duration)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let ticks = |i: usize| -> Option<Duration> {
        Some(Duration::from_secs_f64(fields.get(i)?.parse::<u64>().ok()? as f64 / 100.0))
    };
    Some((ppid, ticks(11)?, ticks(12)?))
}

/// nginx with `grpc_pass` to one backend, keepalive to it, on its own port
/// and prefix directory; with `tls`, TLS both sides (`grpcs://`, the
/// backend's certificate not checked).
struct Nginx;

impl Nginx {
    fn start(dir: &Path, backend_port: u16, tls: Option<&Certs>) -> anyhow::Result<Proxy> {
        let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .context("nginx is missing: run deploy/local/install-deps.sh --bench")?;
        let prefix = dir.join(if tls.is_some() { "nginx-tls" } else { "nginx" });
        std::fs::create_dir_all(prefix.join("tmp"))?;
        let port = free_port();
        let p = prefix.display();
        let user = if std::env::var("USER").as_deref() == Ok("root") || is_root() { "user root;" } else { "" };
        let (listen, upstream) = match tls {
            None => ("http2;".to_owned(), "grpc_pass grpc://backend;".to_owned()),
            Some(certs) => (
                format!(
                    "ssl http2;\n        ssl_certificate {};\n        ssl_certificate_key {};",
                    certs.cert.display(),
                    certs.key.display()
                ),
                "grpc_pass grpcs://backend; grpc_ssl_verify off; grpc_ssl_session_reuse on;".to_owned(),
            ),
        };
        let conf = format!(
            "{user}
worker_processes 2;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    keepalive_requests 100000000;
    upstream backend {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port} {listen}
        location / {{ {upstream} }}
    }}
}}
"
        );
        let conf_path = prefix.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let mut command = std::process::Command::new(nginx);
        command
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit());
        // SIGQUIT: nginx's graceful stop, which also ends its workers.
        let mut proxy = Proxy::spawn(command, port, Some("-QUIT"), "nginx")?;
        proxy.wait_listening(Duration::from_secs(10), &format!("{p}/error.log")).context("nginx")?;
        Ok(proxy)
    }
}

/// Until something accepts on 127.0.0.1:`port`, within `within`; fails at
/// once when `exited` says the process meant to listen there has ended.
fn wait_listening(
    port: u16,
    within: Duration,
    mut exited: impl FnMut() -> Option<std::process::ExitStatus>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = exited() {
            anyhow::bail!("exited ({status}) before listening on {port}");
        }
        anyhow::ensure!(started.elapsed() < within, "nothing listened on {port} within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(1) == Some("0")))
        .unwrap_or(false)
}
