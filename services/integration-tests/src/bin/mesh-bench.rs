//! `make bench`: measures the mesh on real processes, and prints each figure
//! beside its baseline and goal. Loopback only; every loop is bounded.
//!
//! 1. Start-up: spawn → SERVING and registered in etcd (migrations applied),
//!    and idle RSS, of the release user-service.
//! 2. Balanced channel vs direct tonic channels to the same two instances,
//!    side by side in one run: throughput, p50/p99 latency, client CPU per call.
//!
//! 3. Pool changes: registration, SIGTERM and kill -9 to the pool's reaction.
//! 4. Events: outbox relay throughput, and order → notification latency and
//!    consumer lag at a steady 500 orders/s (see `bench/events.rs`).
//! 5. Gateway: gRPC passthrough vs nginx `grpc_pass`, REST/JSON transcoding
//!    vs passthrough, then every load shape against nginx and HAProxy in
//!    cleartext, and over TLS with Spring Cloud Gateway beside them (see
//!    `bench/gateway.rs`).
//! 6. xDS: registry change → grpc-go and grpc-java calls, 1,000 ADS clients,
//!    grpc-java through xDS vs to the address (see `bench/xds.rs`).
//! 7. Spring Boot vs meshkit: the same UserService on the same PostgreSQL,
//!    start, memory, throughput on one core, latency, CPU per call (see
//!    `bench/spring.rs`).
//! 8. Servers: `MeshServer` with its default layers vs tonic's server alone,
//!    the same echo handler on one core each (see `bench/servers.rs`).
//! 9. Governance: every rule on (none refusing) against none, end to end,
//!    both sides loaded at once (see `bench/governance.rs`); then rule by
//!    rule, in process: what each adds per call on the serving and the
//!    calling side (see `bench/rules.rs`).
//! 10. Peers: meshkit's balanced channel beside go-zero's zrpc, grpc-go's
//!     round_robin and tonic's balanced channel, on the same three backends,
//!     healthy, slow, failing, killed and stopped (see `bench/peers.rs`).
//!
//! `MESHKIT_BENCH_SECS` (default 5) sets the length of each load phase.

#[path = "../bench/events.rs"]
mod events;
#[path = "../bench/gateway.rs"]
mod gateway;
#[path = "../bench/governance.rs"]
mod governance;
#[path = "../bench/peers.rs"]
mod peers;
#[path = "../bench/rules.rs"]
mod rules;
#[path = "../bench/servers.rs"]
mod servers;
#[path = "../bench/spring.rs"]
mod spring;
#[path = "../bench/validate.rs"]
mod validate;
#[path = "../bench/xds.rs"]
mod xds;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use etcd_client::{EventType, GetOptions, WatchOptions};
use hdrhistogram::Histogram;
use meshkit_common::ChannelBuilder;
use meshkit_integration_tests::{Etcd, ServiceProcess, free_port, sqlite_url};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const USER: &str = "meshkit.user.v1.UserService";
const CONCURRENCY: usize = 32;
/// Alternations of the direct and balanced phases in the comparison: many
/// short rounds, so a burst of noise on the host lands in one round of one
/// side, and the median of the per-round figures sets it aside.
const ROUNDS: usize = 10;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let secs: u64 = std::env::var("MESHKIT_BENCH_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(5).clamp(1, 60);
    let etcd = Etcd::start().await?;
    let dir = tempfile::tempdir()?;
    let db = sqlite_url(dir.path(), "user");
    println!("meshkit bench ({} cores, {secs} s per load phase, concurrency {CONCURRENCY})", num_cpus());

    // MESHKIT_BENCH_PHASES=startup,compare,pool (default: all), e.g. to profile one.
    let phases = std::env::var("MESHKIT_BENCH_PHASES").unwrap_or_else(|_| {
        "startup,compare,pool,events,gateway,governance,rules,tls,servers,peers,xds,spring,validate".into()
    });
    let run = |phase: &str| phases.split(',').any(|p| p.trim() == phase);
    if run("startup") {
        startup(&etcd, &db, dir.path()).await?;
    }
    if std::env::var("MESHKIT_BENCH_DEBUG").is_ok() {
        let mut c = etcd.client().await;
        for kv in c.get("/meshkit/services/", Some(GetOptions::new().with_prefix())).await?.kvs() {
            eprintln!("left after start-up: {} {} lease {}", kv.key_str()?, kv.value_str()?, kv.lease());
        }
    }
    if run("compare") {
        balanced_vs_direct(&etcd, &db, dir.path(), Duration::from_secs(secs)).await?;
    }
    if run("pool") {
        pool_changes(&etcd, &db, dir.path()).await?;
    }
    if run("events") {
        events::run(&etcd, secs).await?;
    }
    if run("gateway") {
        gateway::run(&etcd, dir.path(), secs).await?;
    }
    if run("governance") {
        governance::run(&etcd, dir.path(), secs).await?;
    }
    if run("rules") {
        rules::run().await?;
    }
    if run("tls") {
        tls_overhead(&etcd, &db, dir.path(), Duration::from_secs(secs)).await?;
    }
    if run("servers") {
        servers::run(&etcd, dir.path(), secs).await?;
    }
    if run("peers") {
        peers::run(&etcd, dir.path(), secs).await?;
    }
    if run("xds") {
        xds::run(&etcd, dir.path()).await?;
    }
    if run("spring") {
        spring::run(&etcd, dir.path(), secs).await?;
    }
    if run("validate") {
        validate::run(secs)?;
    }
    Ok(())
}

/// Prints two load runs side by side: rate, latency, and CPU per call in the
/// caller (this process), the servers (`server`: their CPU over the run) and
/// both; then the second against the first (with the latency gaps when `latency`).
fn print_side_by_side(title: &str, base: (&str, &Stats, Duration), other: (&str, &Stats, Duration), latency: bool) {
    let per_call = |cpu: Duration, s: &Stats| cpu.as_secs_f64() * 1e6 / s.calls.max(1) as f64;
    let total = |(_, s, server): (&str, &Stats, Duration)| s.cpu_per_call_us() + per_call(server, s);
    println!("\n== {title}");
    println!(
        "  {:<10} {:>10} {:>8} {:>8} {:>12} {:>12} {:>12}",
        "", "calls/s", "p50 µs", "p99 µs", "caller µs", "servers µs", "total µs"
    );
    for (name, s, server) in [base, other] {
        println!(
            "  {:<10} {:>10.0} {:>8} {:>8} {:>12.1} {:>12.1} {:>12.1}",
            name,
            s.rate(),
            s.hist.value_at_quantile(0.5),
            s.hist.value_at_quantile(0.99),
            s.cpu_per_call_us(),
            per_call(server, s),
            total((name, s, server)),
        );
    }
    let (off, on) = (base.1, other.1);
    let gaps = if latency {
        let q = |s: &Stats, q: f64| s.hist.value_at_quantile(q) as i64;
        format!(", p50 {:+} µs, p99 {:+} µs", q(on, 0.5) - q(off, 0.5), q(on, 0.99) - q(off, 0.99))
    } else {
        String::new()
    };
    println!(
        "  ratio      CPU/call x{:.3} ({:+.1} µs per call){gaps}, throughput x{:.3}, errors {} / {}",
        total(other) / total(base),
        total(other) - total(base),
        on.rate() / off.rate(),
        off.errors,
        on.errors
    );
}

/// What mTLS costs on the balanced path: two user-service instances in
/// plaintext and two with mTLS (each pair under its own etcd prefix), the same
/// load on each, alternated so drift hits both alike. Connections are reused,
/// so the handshake stays off the hot path; CPU is counted in this process
/// (the caller) and the two servers of each pair.
async fn tls_overhead(etcd: &Etcd, db: &str, logs: &std::path::Path, phase: Duration) -> anyhow::Result<()> {
    let certs = logs.join("tls");
    meshkit_meshctl::certs::issue(&certs, "meshkit", &["user-service", "bench"], 1)?;
    let file = |name: &str| certs.join(name).display().to_string();
    let spawn = |prefix: &str, tls: bool| {
        let mut env = service_env(etcd, db, free_port());
        env.push(("MESHKIT_ETCD_PREFIX", prefix.to_owned()));
        if tls {
            env.push(("MESHKIT_TLS_ENABLED", "true".into()));
            env.push(("MESHKIT_TLS_CERT_FILE", file("user-service.pem")));
            env.push(("MESHKIT_TLS_KEY_FILE", file("user-service.key")));
            env.push(("MESHKIT_TLS_CA_FILE", file("ca.pem")));
        }
        ServiceProcess::spawn("user-service", &env, logs)
    };
    let plain_servers = vec![spawn("/bench-plain", false)?, spawn("/bench-plain", false)?];
    let tls_servers = vec![spawn("/bench-tls", true)?, spawn("/bench-tls", true)?];
    let mut client = etcd.client().await;
    for prefix in ["/bench-plain", "/bench-tls"] {
        for _ in 0..200 {
            let key = format!("{prefix}/services/{USER}/");
            if client.get(key, Some(GetOptions::new().with_prefix().with_count_only())).await?.count() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let identity = meshkit_common::tls::Tls::load(&meshkit_common::config::TlsSettings {
        enabled: true,
        cert_file: file("bench.pem"),
        key_file: file("bench.key"),
        ca_file: file("ca.pem"),
        reload_ms: 1000,
        ..Default::default()
    })?;
    let plain = ChannelBuilder::new(etcd.client().await, "/bench-plain").balanced(USER);
    let secure = ChannelBuilder::new(etcd.client().await, "/bench-tls").with_tls(Some(identity)).balanced(USER);
    let cpu = |servers: &[ServiceProcess]| {
        servers.iter().map(|s| gateway::stat_cpu(s.pid()).map(|(_, cpu)| cpu).unwrap_or_default()).sum::<Duration>()
    };
    run_balanced(&plain, Duration::from_millis(500)).await?;
    run_balanced(&secure, Duration::from_millis(500)).await?;
    let (mut off, mut on) = (Stats::default(), Stats::default());
    let (mut off_server, mut on_server) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..2 {
        let before = cpu(&plain_servers);
        off.merge(run_balanced(&plain, phase / 2).await?);
        off_server += cpu(&plain_servers) - before;
        let before = cpu(&tls_servers);
        on.merge(run_balanced(&secure, phase / 2).await?);
        on_server += cpu(&tls_servers) - before;
    }
    let title = format!(
        "mTLS: balanced channel over mTLS vs plaintext (health Check on 2 instances, concurrency {CONCURRENCY})"
    );
    print_side_by_side(&title, ("plaintext", &off, off_server), ("mTLS", &on, on_server), true);
    for s in plain_servers.into_iter().chain(tls_servers) {
        stop(s).await;
    }
    Ok(())
}

/// Registration, graceful stop and kill -9, each to the moment this process's
/// pool reflects it (the instance joins; leaves; is ejected or leaves).
async fn pool_changes(etcd: &Etcd, db: &str, logs: &std::path::Path) -> anyhow::Result<()> {
    let runs = 10;
    let channel = ChannelBuilder::new(etcd.client().await, "/meshkit").balanced(USER);
    // A steady instance, so the pool is never empty and light traffic flows.
    let steady = ServiceProcess::spawn("user-service", &with_id(service_env(etcd, db, free_port()), "steady"), logs)?;
    let view = channel.view().clone();
    wait_for(&view, |ids, _| ids.contains(&"steady".to_owned())).await?;
    let traffic = {
        let client = HealthClient::new(channel.clone());
        tokio::spawn(async move {
            for _ in 0..200_000 {
                let mut c = client.clone();
                let _ = c.check(HealthCheckRequest { service: USER.into() }).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    let mut client = etcd.client().await;
    let (mut joined, mut stopped, mut killed) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let id = format!("b{i}");
        let key = format!("/meshkit/services/{USER}/{id}");
        let mut watch = client.watch(key.as_str(), None).await?;
        let process = ServiceProcess::spawn("user-service", &with_id(service_env(etcd, db, free_port()), &id), logs)?;
        let registered = loop {
            let resp =
                tokio::time::timeout(Duration::from_secs(10), watch.message()).await.context("registration")??;
            if resp.is_some_and(|r| r.events().iter().any(|e| e.event_type() == EventType::Put)) {
                break Instant::now();
            }
        };
        wait_for(&view, |ids, _| ids.contains(&id)).await?;
        joined.push(registered.elapsed());

        if i % 2 == 0 {
            let t = Instant::now();
            process.signal(15);
            wait_for(&view, |ids, _| !ids.contains(&id)).await?;
            stopped.push(t.elapsed());
            let mut p = process;
            let _ = p.wait_exit(Duration::from_secs(10)).await;
        } else {
            let t = Instant::now();
            process.signal(9);
            wait_for(&view, |ids, snapshot| {
                !ids.contains(&id) || snapshot.get(&id).is_some_and(|e| e.state != "ready")
            })
            .await?;
            killed.push(t.elapsed());
            // Let its lease lapse before the next run.
            wait_for(&view, |ids, _| !ids.contains(&id)).await?;
        }
    }
    traffic.abort();
    stop(steady).await;
    println!("\n== pool changes ({runs} runs, light traffic of ~400 calls/s through the pool)");
    for (name, mut times) in [
        ("registration -> in the pool", joined),
        ("SIGTERM -> out of the pool", stopped),
        ("kill -9 -> out of rotation", killed),
    ] {
        times.sort();
        let p50 = times[times.len() / 2];
        let p99 = times[times.len() - 1];
        println!("  {name:<30} p50 {:>8.1} ms   p99(max) {:>8.1} ms", ms(p50), ms(p99));
    }
    Ok(())
}

fn with_id(mut env: Vec<(&'static str, String)>, id: &str) -> Vec<(&'static str, String)> {
    env.push(("MESHKIT_REGISTRY_INSTANCE_ID", id.to_owned()));
    env.push(("MESHKIT_REGISTRY_TTL_SECS", "3".to_owned()));
    env
}

/// Waits (up to 15 s) until the pool's ids and endpoint snapshot satisfy `done`.
async fn wait_for(
    view: &Arc<meshkit_common::balance::PoolView>,
    done: impl Fn(&Vec<String>, &meshkit_common::balance::PoolSnapshot) -> bool,
) -> anyhow::Result<()> {
    let mut changes = view.subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if done(&view.ids(), &view.snapshot()) {
            return Ok(());
        }
        // Ejection shows in the snapshot without a membership change: look every ms too.
        let _ = tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(1)),
            changes.changed(),
        )
        .await;
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "pool did not change within 15 s");
    }
}

fn service_env(etcd: &Etcd, db: &str, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("MESHKIT_ETCD_ENDPOINTS", etcd.endpoint()),
        ("MESHKIT_SERVER_LISTEN", format!("127.0.0.1:{port}")),
        ("MESHKIT_DATABASE_URL", db.to_owned()),
        ("MESHKIT_SERVER_DRAIN_DELAY_MS", "50".into()),
    ]
}

/// Until `n` user-service instances are registered (5 s at most).
async fn wait_users(client: &mut etcd_client::Client, n: i64) -> anyhow::Result<()> {
    for _ in 0..200 {
        let prefix = format!("/meshkit/services/{USER}/");
        if client.get(prefix, Some(GetOptions::new().with_prefix().with_count_only())).await?.count() == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

/// Spawn → the instance's key appears in etcd, watched (not polled).
async fn startup(etcd: &Etcd, db: &str, logs: &std::path::Path) -> anyhow::Result<()> {
    let mut client = etcd.client().await;
    // Apply migrations once so the runs measure a restart.
    let first = ServiceProcess::spawn("user-service", &service_env(etcd, db, free_port()), logs)?;
    wait_registered(&mut client, None).await?;
    stop(first).await;

    let runs = 15;
    let mut times = Vec::with_capacity(runs);
    let mut rss = Vec::new();
    for i in 0..runs {
        let revision =
            client.get("/", Some(GetOptions::new().with_count_only())).await?.header().map_or(0, |h| h.revision());
        let started = Instant::now();
        let process = ServiceProcess::spawn("user-service", &service_env(etcd, db, free_port()), logs)?;
        wait_registered(&mut client, Some(revision + 1)).await?;
        times.push(started.elapsed());
        if i < 3 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            rss.push(rss_kib(process.pid()).context("reading VmRSS")?);
        }
        stop(process).await;
    }
    times.sort();
    let p50 = times[runs / 2];
    let max = times[runs - 1];
    let rss_max = rss.iter().copied().max().unwrap_or(0);
    println!("\n== start-up (release user-service, migrations applied, {runs} runs)");
    println!("  spawn -> SERVING + registered   p50 {:>7.1} ms   max {:>7.1} ms   goal < 100 ms", ms(p50), ms(max));
    println!(
        "  idle RSS after 2 s                {:>7.1} MiB                     goal < 15 MiB",
        rss_max as f64 / 1024.0
    );
    Ok(())
}

async fn wait_registered(client: &mut etcd_client::Client, from_revision: Option<i64>) -> anyhow::Result<()> {
    let prefix = format!("/meshkit/services/{USER}/");
    let mut options = WatchOptions::new().with_prefix();
    if let Some(rev) = from_revision {
        options = options.with_start_revision(rev);
    }
    let mut stream = client.watch(prefix.as_str(), Some(options)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout_at(deadline, stream.message()).await.context("not registered within 10 s")??;
        let Some(resp) = msg else { anyhow::bail!("watch ended") };
        if resp.events().iter().any(|e| e.event_type() == EventType::Put) {
            return Ok(());
        }
    }
}

async fn stop(mut process: ServiceProcess) {
    process.signal(15);
    let _ = process.wait_exit(Duration::from_secs(10)).await;
}

async fn balanced_vs_direct(etcd: &Etcd, db: &str, logs: &std::path::Path, phase: Duration) -> anyhow::Result<()> {
    let ports = [free_port(), free_port()];
    let servers: Vec<ServiceProcess> = ports
        .iter()
        .map(|p| ServiceProcess::spawn("user-service", &service_env(etcd, db, *p), logs))
        .collect::<Result<_, _>>()?;
    let mut client = etcd.client().await;
    wait_users(&mut client, 2).await?;

    let direct: Vec<Channel> = ports
        .iter()
        .map(|p| Endpoint::from_shared(format!("http://127.0.0.1:{p}")).map(|e| e.tcp_nodelay(true).connect_lazy()))
        .collect::<Result<_, _>>()?;
    let balanced = ChannelBuilder::new(etcd.client().await, "/meshkit").balanced(USER);

    // Warm both paths, then alternate phases so drift hits both alike.
    run_direct(&direct, Duration::from_millis(500)).await?;
    run_balanced(&balanced, Duration::from_millis(500)).await?;
    let mut d = Stats::default();
    let mut b = Stats::default();
    let mut rounds = Vec::new();
    let calls_before = endpoint_calls(&balanced);
    for _ in 0..ROUNDS {
        let round = phase * 2 / ROUNDS as u32;
        let (dr, br) = (run_direct(&direct, round).await?, run_balanced(&balanced, round).await?);
        rounds.push(br.rate() / dr.rate());
        d.merge(dr);
        b.merge(br);
    }
    let split: Vec<String> = endpoint_calls(&balanced)
        .iter()
        .zip(&calls_before)
        .map(|(after, before)| format!("{:.0}%", 100.0 * (after - before) as f64 / b.calls.max(1) as f64))
        .collect();
    println!("\n== balanced channel vs direct tonic channels (health Check on 2 instances, concurrency {CONCURRENCY})");
    print_table(&d, &b);
    rounds.sort_by(f64::total_cmp);
    println!(
        "  rounds     throughput ratio per round, sorted: {}   (balanced calls per instance {})",
        rounds.iter().map(|r| format!("{r:.2}")).collect::<Vec<_>>().join(" "),
        split.join(" / ")
    );
    println!(
        "  ratio      throughput {:.3} overall, {:.3} median of rounds (goal >= 0.95)   added p50 {:+} µs   added p99 {:+} µs   CPU/call x{:.2}",
        b.rate() / d.rate(),
        median(&rounds),
        b.hist.value_at_quantile(0.5) as i64 - d.hist.value_at_quantile(0.5) as i64,
        b.hist.value_at_quantile(0.99) as i64 - d.hist.value_at_quantile(0.99) as i64,
        b.cpu_per_call_us() / d.cpu_per_call_us()
    );

    // Latency at a steady offered load well below saturation, so it measures
    // the path a call takes rather than the queue in front of a busy CPU.
    let rate = 5_000u64;
    let mut d = Stats::default();
    let mut b = Stats::default();
    let mut rounds = Vec::new();
    for _ in 0..ROUNDS {
        let direct_clients: Vec<HealthClient<Channel>> = direct.iter().cloned().map(HealthClient::new).collect();
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let round = phase * 2 / ROUNDS as u32;
        let dr = paced(rate, round, move || {
            let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % direct_clients.len();
            let mut c = direct_clients[i].clone();
            async move { c.check(HealthCheckRequest { service: USER.into() }).await.map(|_| ()) }
        })
        .await?;
        let client = HealthClient::new(balanced.clone());
        let br = paced(rate, round, move || {
            let mut c = client.clone();
            async move { c.check(HealthCheckRequest { service: USER.into() }).await.map(|_| ()) }
        })
        .await?;
        let added = |q: f64| br.hist.value_at_quantile(q) as i64 - dr.hist.value_at_quantile(q) as i64;
        rounds.push((added(0.5), added(0.99)));
        d.merge(dr);
        b.merge(br);
    }
    println!("\n== the same at a steady {rate} calls/s (open loop, below saturation)");
    print_table(&d, &b);
    println!(
        "  rounds     added p50/p99 µs per round {}",
        rounds.iter().map(|(p50, p99)| format!("{p50:+}/{p99:+}")).collect::<Vec<_>>().join("  ")
    );
    let p50s: Vec<f64> = rounds.iter().map(|r| r.0 as f64).collect();
    let p99s: Vec<f64> = rounds.iter().map(|r| r.1 as f64).collect();
    println!(
        "  added      p50 {:+} µs overall, {:+.0} median of rounds (goal <= 20)   p99 {:+} µs overall, {:+.0} median of rounds (goal <= 50)   CPU/call {:+.1} µs",
        b.hist.value_at_quantile(0.5) as i64 - d.hist.value_at_quantile(0.5) as i64,
        median(&p50s),
        b.hist.value_at_quantile(0.99) as i64 - d.hist.value_at_quantile(0.99) as i64,
        median(&p99s),
        b.cpu_per_call_us() - d.cpu_per_call_us()
    );
    for s in servers {
        stop(s).await;
    }
    Ok(())
}

/// The middle value (the mean of the two middle ones for an even count).
/// The lowest and highest of `values`, to show the spread of rounds.
fn spread(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Calls each endpoint of the pool has answered so far, by instance id.
fn endpoint_calls(channel: &meshkit_common::BalancedChannel) -> Vec<u64> {
    channel.view().snapshot().values().map(|e| e.calls).collect()
}

fn print_table(direct: &Stats, balanced: &Stats) {
    println!("  {:<10} {:>12} {:>10} {:>10} {:>14}", "", "calls/s", "p50 µs", "p99 µs", "client CPU µs/call");
    for (name, s) in [("direct", direct), ("balanced", balanced)] {
        println!(
            "  {:<10} {:>12.0} {:>10} {:>10} {:>14.1}",
            name,
            s.rate(),
            s.hist.value_at_quantile(0.5),
            s.hist.value_at_quantile(0.99),
            s.cpu_per_call_us()
        );
    }
}

/// Starts `rate` calls per second for `phase`, each on its own task (open
/// loop: a slow call does not hold back the next), and records their latency.
async fn paced<F, Fut>(rate: u64, phase: Duration, call: F) -> anyhow::Result<Stats>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send + 'static,
{
    let interval = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<u64, ()>>();
    let cpu0 = process_cpu();
    let started = Instant::now();
    let mut issued = 0u64;
    while started.elapsed() < phase {
        ticker.tick().await;
        let fut = call();
        let tx = tx.clone();
        issued += 1;
        tokio::spawn(async move {
            let t = Instant::now();
            let outcome = fut.await.map(|()| t.elapsed().as_micros() as u64).map_err(|_| ());
            let _ = tx.send(outcome);
        });
    }
    drop(tx);
    let mut stats = Stats::default();
    while let Some(outcome) = rx.recv().await {
        match outcome {
            Ok(us) => {
                stats.hist.record(us.max(1))?;
                stats.calls += 1;
            }
            Err(()) => stats.errors += 1,
        }
    }
    stats.wall = started.elapsed();
    stats.cpu = process_cpu().saturating_sub(cpu0);
    anyhow::ensure!(stats.errors == 0 && stats.calls == issued, "{} of {issued} calls failed", stats.errors);
    Ok(stats)
}

struct Stats {
    hist: Histogram<u64>,
    calls: u64,
    errors: u64,
    wall: Duration,
    cpu: Duration,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
            calls: 0,
            errors: 0,
            wall: Duration::ZERO,
            cpu: Duration::ZERO,
        }
    }
}

impl Stats {
    fn merge(&mut self, other: Stats) {
        let _ = self.hist.add(&other.hist);
        self.calls += other.calls;
        self.errors += other.errors;
        self.wall += other.wall;
        self.cpu += other.cpu;
    }
    fn rate(&self) -> f64 {
        self.calls as f64 / self.wall.as_secs_f64()
    }
    fn cpu_per_call_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.calls.max(1) as f64
    }
}

async fn run_direct(channels: &[Channel], phase: Duration) -> anyhow::Result<Stats> {
    let clients: Vec<HealthClient<Channel>> = channels.iter().cloned().map(HealthClient::new).collect();
    let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    load(phase, move || {
        // Round-robin over the instances: the simplest client a team would write.
        let i = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % clients.len();
        let mut c = clients[i].clone();
        async move { c.check(HealthCheckRequest { service: USER.into() }).await.map(|_| ()) }
    })
    .await
}

async fn run_balanced(channel: &meshkit_common::BalancedChannel, phase: Duration) -> anyhow::Result<Stats> {
    let client = HealthClient::new(channel.clone());
    load(phase, move || {
        let mut c = client.clone();
        async move { c.check(HealthCheckRequest { service: USER.into() }).await.map(|_| ()) }
    })
    .await
}

/// CONCURRENCY workers issue calls back to back until `phase` ends.
async fn load<F, Fut>(phase: Duration, call: F) -> anyhow::Result<Stats>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let call = Arc::new(call);
    let cpu0 = process_cpu();
    let started = Instant::now();
    let deadline = started + phase;
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let call = call.clone();
            tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
                let (mut calls, mut errors) = (0u64, 0u64);
                while Instant::now() < deadline {
                    let t = Instant::now();
                    match call().await {
                        Ok(()) => {
                            let _ = hist.record(t.elapsed().as_micros() as u64);
                            calls += 1;
                        }
                        Err(status) => {
                            if errors == 0 {
                                eprintln!("first failed call: {status:?}");
                            }
                            errors += 1;
                        }
                    }
                }
                (hist, calls, errors)
            })
        })
        .collect();
    let mut stats = Stats::default();
    for w in workers {
        let (hist, calls, errors) = w.await?;
        stats.hist.add(&hist)?;
        stats.calls += calls;
        stats.errors += errors;
    }
    stats.wall = started.elapsed();
    stats.cpu = process_cpu().saturating_sub(cpu0);
    anyhow::ensure!(stats.errors == 0, "{} calls failed", stats.errors);
    Ok(stats)
}

/// utime + stime of this process, from /proc/self/stat.
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / 100.0)
}

fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
