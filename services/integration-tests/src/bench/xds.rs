//! The xDS server's benchmarks:
//!
//! 1. etcd change → an xDS client's calls change: grpc-go and grpc-java
//!    calling at 1,000 calls/s while an instance's key is put and deleted;
//!    the time from the put to the first call it serves, and from the delete
//!    to the last call that starts on it.
//! 2. 1,000 simulated ADS clients (20 connections, 50 streams each), each
//!    subscribed to every type for 50 services, while one instance flaps
//!    every second: the server's CPU and memory, and the time until the last
//!    client has each update.
//! 3. grpc-java through xDS against grpc-java with the instance's address:
//!    latency at a steady rate and throughput at saturation, alternated.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use etcd_client::PutOptions;
use hdrhistogram::Histogram;
use meshkit_common::{ChannelBuilder, Instance};
use meshkit_integration_tests::{
    Etcd, ServiceProcess, create_user, free_port,
    xds::{self, AdsClient, CLUSTER, ENDPOINTS, LISTENER, Lang, ROUTE, XdsCaller},
};

use crate::gateway::stat_cpu;

const USER: &str = "meshkit.user.v1.UserService";

/// `MESHKIT_BENCH_XDS=propagation,many,java` (default: all) picks parts.
pub async fn run(etcd: &Etcd, dir: &Path) -> anyhow::Result<()> {
    let parts = std::env::var("MESHKIT_BENCH_XDS").unwrap_or_else(|_| "propagation,many,java".into());
    let part = |name: &str| parts.split(',').any(|p| p.trim() == name);
    if part("propagation") {
        propagation(etcd, dir).await?;
    }
    if part("many") {
        many_clients(etcd, dir).await?;
    }
    if part("java") {
        java_direct_vs_xds(etcd, dir).await?;
    }
    Ok(())
}

fn xds_server(etcd: &Etcd, dir: &Path, prefix: &str) -> anyhow::Result<(ServiceProcess, String)> {
    let addr = format!("127.0.0.1:{}", free_port());
    let env = [
        ("MESHKIT_ETCD_ENDPOINTS", etcd.endpoint()),
        ("MESHKIT_ETCD_PREFIX", prefix.to_owned()),
        ("MESHKIT_SERVER_LISTEN", addr.clone()),
        ("MESHKIT_REGISTRY_INSTANCE_ID", format!("xds-{}", free_port())),
    ];
    Ok((ServiceProcess::spawn("xds-server", &env, dir)?, addr))
}

fn user_service(
    etcd: &Etcd,
    dir: &Path,
    prefix: &str,
    id: &str,
    register: bool,
) -> anyhow::Result<(ServiceProcess, u16)> {
    let port = free_port();
    let env = [
        ("MESHKIT_ETCD_ENDPOINTS", etcd.endpoint()),
        ("MESHKIT_ETCD_PREFIX", prefix.to_owned()),
        ("MESHKIT_SERVER_LISTEN", format!("127.0.0.1:{port}")),
        ("MESHKIT_DATABASE_URL", meshkit_integration_tests::sqlite_url(dir, "xds-user")),
        ("MESHKIT_REGISTRY_INSTANCE_ID", id.to_owned()),
        ("MESHKIT_REGISTRY_ENABLED", register.to_string()),
    ];
    Ok((ServiceProcess::spawn("user-service", &env, dir)?, port))
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("nothing listens on {port}")
}

/// Two registered user-service instances under `prefix` and a user they share.
async fn users(etcd: &Etcd, dir: &Path, prefix: &str) -> anyhow::Result<(Vec<ServiceProcess>, String)> {
    let mut processes = Vec::new();
    for id in ["u1", "u2"] {
        let (process, port) = user_service(etcd, dir, prefix, id, true)?;
        wait_port(port).await?;
        processes.push(process);
    }
    let channels = ChannelBuilder::new(etcd.client().await, prefix);
    let channel = channels.balanced(USER);
    let user = create_user(&channel, "Ada", &format!("ada-xds-{}@example.com", free_port())).await;
    Ok((processes, user.id))
}

fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * q).round() as usize]
}

/// 1. Put and delete an unregistered instance's key; see when calls follow.
async fn propagation(etcd: &Etcd, dir: &Path) -> anyhow::Result<()> {
    const ROUNDS: usize = 10;
    const RATE: u32 = 1000;
    let prefix = "/bench-xds-propagation";
    let (_users, user_id) = users(etcd, dir, prefix).await?;
    let (_extra, extra_port) = user_service(etcd, dir, prefix, "extra", false)?;
    wait_port(extra_port).await?;
    let (_server, server) = xds_server(etcd, dir, prefix)?;
    wait_port(server.rsplit(':').next().unwrap_or("0").parse()?).await?;
    let key = format!("{prefix}/services/{USER}/extra");
    let value = serde_json::to_string(&Instance {
        addr: format!("127.0.0.1:{extra_port}"),
        zone: String::new(),
        weight: 100,
        version: "bench".into(),
        metadata: Default::default(),
    })?;
    println!("\n== xDS: etcd change → the client's calls ({RATE} calls/s, GetUser, {ROUNDS} puts and deletes each)");
    println!(
        "  {:<6} {:>18} {:>18} {:>18} {:>18}",
        "", "register p50 ms", "register p99 ms", "drain p50 ms", "drain p99 ms"
    );
    for lang in [Lang::Go, Lang::Java] {
        let bootstrap = xds::bootstrap(dir, &format!("bench-{lang:?}"), &server, &format!("bench-{lang:?}"), "");
        let caller = XdsCaller::start(lang, &bootstrap, &user_id, RATE, dir).await?;
        caller.wait_ok(3 * RATE as usize, Duration::from_secs(30)).await?;
        let warm = caller.now_ms().unwrap_or(0.0);
        let mut client = etcd.client().await;
        let lease = client.lease_grant(60, None).await?.id();
        let mut marks = Vec::new();
        for _ in 0..ROUNDS {
            let put = caller.now_ms().unwrap_or(0.0);
            client.put(key.as_str(), value.as_str(), Some(PutOptions::new().with_lease(lease))).await?;
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let deleted = caller.now_ms().unwrap_or(0.0);
            client.delete(key.as_str(), None).await?;
            tokio::time::sleep(Duration::from_millis(1200)).await;
            marks.push((put, deleted));
        }
        let calls = caller.finish().await?;
        // Failures after the warm-up (the JVM's first seconds), by status.
        let mut failed: BTreeMap<String, usize> = BTreeMap::new();
        for call in xds::failures(&calls).into_iter().filter(|c| c.t >= warm) {
            *failed.entry(call.code.clone()).or_default() += 1;
        }
        let counted = calls.iter().filter(|c| c.t >= warm).count();
        let (mut register, mut drain) = (Vec::new(), Vec::new());
        for (i, (put, deleted)) in marks.iter().enumerate() {
            let next_put = marks.get(i + 1).map_or(f64::MAX, |m| m.0);
            let on_extra = |c: &&xds::Call| c.instance == "extra" && c.code == "OK";
            if let Some(first) =
                calls.iter().filter(on_extra).filter(|c| c.t >= *put && c.t < *deleted).map(|c| c.t).reduce(f64::min)
            {
                register.push(first - put);
            }
            let last = calls
                .iter()
                .filter(on_extra)
                .filter(|c| c.t >= *deleted && c.t < next_put)
                .map(|c| c.t)
                .reduce(f64::max);
            drain.push(last.map_or(0.0, |t| t - deleted));
        }
        let seen = register.len();
        println!(
            "  {:<6} {:>18.1} {:>18.1} {:>18.1} {:>18.1}   ({seen}/{ROUNDS} registrations seen; failed after warm-up: {failed:?} of {counted} calls; goal p99 ≤ 100 ms)",
            format!("{lang:?}"),
            quantile(&mut register, 0.5),
            quantile(&mut register, 0.99),
            quantile(&mut drain, 0.5),
            quantile(&mut drain, 0.99),
        );
    }
    Ok(())
}

/// 2. 1,000 streams over 50 services while one instance flaps every second.
async fn many_clients(etcd: &Etcd, dir: &Path) -> anyhow::Result<()> {
    const CLIENTS: usize = 1000;
    const CONNECTIONS: usize = 20;
    const SERVICES: usize = 50;
    const FLAPS: usize = 20;
    let prefix = "/bench-xds-many";
    let mut client = etcd.client().await;
    let lease = client.lease_grant(300, None).await?.id();
    let services: Vec<String> = (0..SERVICES).map(|i| format!("bench.s{i:02}.v1.Service")).collect();
    let instance = |port: u16| {
        serde_json::to_string(&Instance {
            addr: format!("127.0.0.2:{port}"),
            zone: String::new(),
            weight: 100,
            version: "bench".into(),
            metadata: Default::default(),
        })
    };
    for (i, service) in services.iter().enumerate() {
        for j in 0..2u16 {
            let key = format!("{prefix}/services/{service}/i{j}");
            client.put(key, instance(10_000 + i as u16 * 10 + j)?, Some(PutOptions::new().with_lease(lease))).await?;
        }
    }
    let (server, addr) = xds_server(etcd, dir, prefix)?;
    wait_port(addr.rsplit(':').next().unwrap_or("0").parse()?).await?;
    let pid = server.pid();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = rss_kib(pid).unwrap_or(0);
    let names: Vec<&str> = services.iter().map(String::as_str).collect();
    let started = Instant::now();
    // Per client: (received at, names in it) of every endpoints response.
    let received: Arc<Mutex<Vec<Received>>> = Arc::new(Mutex::new(vec![Vec::new(); CLIENTS]));
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?.connect().await?);
    }
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(CLIENTS);
    let stop = tokio_util::sync::CancellationToken::new();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let mut ads = AdsClient::on(channels[c % CONNECTIONS].clone(), &format!("sim-{c}"), "").await?;
        let (names, received, ready, stop) =
            (names.iter().map(|n| n.to_string()).collect::<Vec<_>>(), received.clone(), ready_tx.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            for type_url in [LISTENER, ROUTE, CLUSTER, ENDPOINTS] {
                ads.subscribe(type_url, &names).await?;
            }
            let mut first_eds = true;
            loop {
                let response = tokio::select! {
                    r = ads.next(Duration::from_secs(60)) => r?,
                    _ = stop.cancelled() => return anyhow::Ok(()),
                };
                if response.type_url == ENDPOINTS {
                    let got = xds::names(&response);
                    received.lock().unwrap_or_else(|p| p.into_inner())[c].push((Instant::now(), got));
                    if first_eds {
                        first_eds = false;
                        let _ = ready.send(()).await;
                    }
                }
                ads.ack(&response, &names).await?;
            }
        }));
    }
    for _ in 0..CLIENTS {
        ready_rx.recv().await;
    }
    let subscribed_in = started.elapsed();
    let rss_before = rss_kib(pid).unwrap_or(0);
    let cpu0 = stat_cpu(pid).map(|(_, cpu)| cpu).unwrap_or_default();
    let window = Instant::now();
    let mut flaps = Vec::new();
    for k in 0..FLAPS {
        // An instance comes (even k) and goes again (odd k).
        let service = &services[(k / 2) % SERVICES];
        let key = format!("{prefix}/services/{service}/flap");
        let at = Instant::now();
        if k % 2 == 0 {
            client.put(key, instance(20_000)?, Some(PutOptions::new().with_lease(lease))).await?;
        } else {
            client.delete(key, None).await?;
        }
        flaps.push((at, service.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let cpu = stat_cpu(pid).map(|(_, cpu)| cpu).unwrap_or_default().saturating_sub(cpu0);
    let elapsed = window.elapsed();
    let (rss, hwm) = (rss_kib(pid).unwrap_or(0), hwm_kib(pid).unwrap_or(0));
    stop.cancel();
    for task in tasks {
        let _ = task.await;
    }
    drop(channels);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_gone = rss_kib(pid).unwrap_or(0);
    let received = received.lock().unwrap_or_else(|p| p.into_inner());
    let mut last_client = Vec::new();
    let mut missing = 0;
    for (at, service) in &flaps {
        let mut worst = Duration::ZERO;
        for per_client in received.iter() {
            match per_client.iter().find(|(t, names)| t >= at && names.iter().any(|n| n == service)) {
                Some((t, _)) => worst = worst.max(*t - *at),
                None => missing += 1,
            }
        }
        last_client.push(worst.as_secs_f64() * 1000.0);
    }
    println!(
        "\n== xDS: {CLIENTS} ADS clients ({CONNECTIONS} connections) × {SERVICES} services × 4 types, one instance flapping every second for {FLAPS} s"
    );
    println!("  all subscribed and answered in {:.0} ms", subscribed_in.as_secs_f64() * 1000.0);
    println!(
        "  server CPU {:.1}% of one core over the flaps (goal ≤ 10%); RSS {:.1} MiB with no client, {:.1} MiB with all, {:.1} MiB after the flaps, peak {:.1} MiB, {:.1} MiB once every client left (goal ≤ 100 MiB)",
        cpu.as_secs_f64() * 100.0 / elapsed.as_secs_f64(),
        rss_idle as f64 / 1024.0,
        rss_before as f64 / 1024.0,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        rss_gone as f64 / 1024.0
    );
    let (p50, p99, max) = (
        quantile(&mut last_client.clone(), 0.5),
        quantile(&mut last_client.clone(), 0.99),
        last_client.iter().copied().fold(0.0, f64::max),
    );
    println!(
        "  etcd write → the last of {CLIENTS} clients has the update: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms ({missing} client-updates missing)"
    );
    Ok(())
}

/// 3. grpc-java through xDS vs grpc-java with the address, to one instance.
async fn java_direct_vs_xds(etcd: &Etcd, dir: &Path) -> anyhow::Result<()> {
    const ROUNDS: usize = 3;
    const STEADY: u32 = 1000;
    const SATURATE: u32 = 20_000;
    let prefix = "/bench-xds-java";
    let (users, user_id) = users(etcd, dir, prefix).await?;
    // One instance: the fixed address reaches exactly what xDS names.
    let mut users = users.into_iter();
    let (u1, u2) = (users.next(), users.next());
    drop(u2);
    let mut client = etcd.client().await;
    let key = format!("{prefix}/services/{USER}/u1");
    let value = client.get(key.as_str(), None).await?.kvs().first().map(|kv| kv.value().to_vec()).unwrap_or_default();
    let addr = serde_json::from_slice::<Instance>(&value)?.addr;
    let (_server, server) = xds_server(etcd, dir, prefix)?;
    wait_port(server.rsplit(':').next().unwrap_or("0").parse()?).await?;
    let bootstrap = xds::bootstrap(dir, "bench-java-direct", &server, "bench-java", "");
    let targets = [("address", addr.clone()), ("xds", format!("xds:///{USER}"))];
    let mut results: BTreeMap<(&str, u32), Vec<Round>> = BTreeMap::new();
    for _ in 0..ROUNDS {
        for rate in [STEADY, SATURATE] {
            for (name, target) in &targets {
                let caller = XdsCaller::start_to(Lang::Java, &bootstrap, target, &user_id, rate, dir).await?;
                // Warm-up: the JVM's first seconds are left out.
                tokio::time::sleep(Duration::from_secs(3)).await;
                let from = caller.now_ms().unwrap_or(0.0);
                tokio::time::sleep(Duration::from_secs(4)).await;
                let to = caller.now_ms().unwrap_or(0.0);
                let calls = caller.finish().await?;
                let window: Vec<_> = calls.iter().filter(|c| c.t >= from && c.t < to).collect();
                let mut hist = Histogram::<u64>::new(3)?;
                for c in window.iter().filter(|c| c.code == "OK") {
                    hist.record((c.ms * 1000.0) as u64)?;
                }
                let ok = hist.len() as f64 / ((to - from) / 1000.0);
                results.entry((name, rate)).or_default().push((
                    ok,
                    hist.value_at_quantile(0.5) as f64,
                    hist.value_at_quantile(0.99) as f64,
                ));
            }
        }
    }
    drop(u1);
    println!(
        "\n== xDS: grpc-java through xDS vs grpc-java to the address (one user-service, GetUser, {ROUNDS} alternated rounds, medians)"
    );
    println!("  {:<22} {:>10} {:>10} {:>10}", "", "calls/s", "p50 µs", "p99 µs");
    for rate in [STEADY, SATURATE] {
        for (name, _) in &targets {
            let rounds = &results[&(*name, rate)];
            let median = |f: fn(&Round) -> f64| quantile(&mut rounds.iter().map(f).collect::<Vec<_>>(), 0.5);
            let spread = |f: fn(&Round) -> f64| {
                let v: Vec<f64> = rounds.iter().map(f).collect();
                v.iter().copied().fold(f64::MIN, f64::max) - v.iter().copied().fold(f64::MAX, f64::min)
            };
            println!(
                "  {:<22} {:>10.0} {:>10.0} {:>10.0}   (spread: {:.0} calls/s, p99 {:.0} µs)",
                format!("{name} @ {rate}/s"),
                median(|r| r.0),
                median(|r| r.1),
                median(|r| r.2),
                spread(|r| r.0),
                spread(|r| r.2)
            );
        }
    }
    Ok(())
}

/// One client's endpoints responses: when each came, and the names in it.
type Received = Vec<(Instant, Vec<String>)>;

/// One round's calls/s, p50 µs and p99 µs.
type Round = (f64, f64, f64);

fn rss_kib(pid: i32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

fn hwm_kib(pid: i32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find(|l| l.starts_with(field))?.split_whitespace().nth(1)?.parse().ok()
}
