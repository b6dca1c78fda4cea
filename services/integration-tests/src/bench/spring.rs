//! Spring Boot vs meshkit: the same `meshkit.user.v1.UserService`, the Spring
//! Boot reference (`services/user-spring`) and the Rust user-service, on the
//! same PostgreSQL, in one run, measured the same way (`MESHKIT_BENCH_PHASES=spring`).
//!
//! - Start, on both cores (as a service with 2 vCPUs starts): spawn →
//!   SERVING and registered in etcd (the key appears), with
//!   the JVM's default flags, with an AppCDS archive (class-data sharing,
//!   made by a training run that exits after the context refresh, as Spring
//!   Boot documents), and with CDS plus `-XX:TieredStopAtLevel=1`; runs
//!   alternate, medians reported with the spread.
//! - Memory: RSS 2 s after start (idle), and the highest RSS seen under load.
//! - Throughput on one core: each server pinned to CPU 1 with `taskset`; this
//!   load generator and PostgreSQL (its postmaster, so every backend) pinned
//!   to CPU 0. 32 callers back to back over one HTTP/2 connection, rounds
//!   alternated, the median round reported.
//! - Latency at a steady rate both hold (half the lower saturated rate), open
//!   loop.
//! - CPU per call: the server's utime + stime over the round / its calls.
//!
//! Three workloads: Health/Check (the framework alone), GetUser of one row
//! (in PostgreSQL's cache; neither service caches rows itself, so each call
//! is the framework plus one indexed read), and CreateUser (an insert). Each server is
//! warmed first (stated below), so the JVM's JIT has compiled the hot path.

use std::{
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context;
use etcd_client::{EventType, GetOptions, WatchOptions};
use meshkit_integration_tests::{Etcd, Postgres, ServiceProcess, bin_dir, free_port, spring::user_spring_classpath};
use meshkit_proto::user::{CreateUserRequest, GetUserRequest, user_service_client::UserServiceClient};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use super::{Stats, load, paced, rss_kib, spread};
use crate::gateway::stat_cpu;

const USER: &str = "meshkit.user.v1.UserService";
/// The server's core, and the one left to the load generator and PostgreSQL.
const SERVER_CPU: &str = "1";
const CLIENT_CPU: &str = "0";
const ALL_CPUS: &str = "0-1";
const START_RUNS: usize = 5;
const ROUNDS: usize = 3;
const WARM_UP: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Server {
    Rust,
    /// The JVM's default flags.
    Spring,
    /// With an AppCDS archive.
    SpringCds,
    /// With the archive and the C1 compiler only.
    SpringCdsC1,
}

impl Server {
    fn name(self) -> &'static str {
        match self {
            Server::Rust => "meshkit",
            Server::Spring => "Spring Boot",
            Server::SpringCds => "Spring Boot + CDS",
            Server::SpringCdsC1 => "Spring Boot + CDS + C1",
        }
    }
}

struct Bench<'a> {
    etcd: &'a Etcd,
    db: String,
    dir: &'a Path,
    archive: std::path::PathBuf,
    classpath: String,
}

impl Bench<'_> {
    fn env(&self, port: u16, id: &str) -> Vec<(&'static str, String)> {
        vec![
            ("MESHKIT_ETCD_ENDPOINTS", self.etcd.endpoint()),
            ("MESHKIT_SERVER_LISTEN", format!("127.0.0.1:{port}")),
            ("MESHKIT_DATABASE_URL", self.db.clone()),
            ("MESHKIT_REGISTRY_INSTANCE_ID", id.to_owned()),
            ("MESHKIT_SERVER_DRAIN_DELAY_MS", "50".into()),
        ]
    }

    /// Starts `server` on `port`, pinned to the server core when `pinned`.
    fn spawn(&self, server: Server, port: u16, id: &str, pinned: bool) -> anyhow::Result<ServiceProcess> {
        let mut command = Command::new("taskset");
        command.args(["-c", if pinned { SERVER_CPU } else { ALL_CPUS }]);
        match server {
            Server::Rust => {
                command.arg(bin_dir().join("user-service")).env("RUST_LOG", "warn");
            }
            spring => {
                command.arg("java");
                if spring != Server::Spring {
                    command.arg(format!("-XX:SharedArchiveFile={}", self.archive.display()));
                }
                if spring == Server::SpringCdsC1 {
                    command.arg("-XX:TieredStopAtLevel=1");
                }
                command.args(["-cp", &self.classpath, "io.meshkit.user.UserApplication"]);
            }
        }
        ServiceProcess::spawn_command(server.name(), command, &self.env(port, id), self.dir)
    }

    /// Spawn → its key in etcd: the time to SERVING and registered (both
    /// register once they serve), and the process. The key is watched from
    /// the revision before the spawn, resumed from there if the stream breaks.
    async fn start(&self, server: Server, port: u16, pinned: bool) -> anyhow::Result<(Duration, ServiceProcess)> {
        let id = format!("bench-{}", free_port());
        let mut client = self.etcd.client().await;
        let key = format!("/meshkit/services/{USER}/{id}");
        let revision =
            client.get(key.as_str(), None).await.context("reading etcd")?.header().map_or(0, |h| h.revision());
        let started = Instant::now();
        let process = self.spawn(server, port, &id, pinned)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        let mut breaks = 0;
        loop {
            let options = WatchOptions::new().with_start_revision(revision + 1);
            let mut watch = match client.watch(key.as_str(), Some(options)).await {
                Ok(watch) => watch,
                Err(e) if breaks < 5 => {
                    breaks += 1;
                    eprintln!("watching for {}: {e}; again", server.name());
                    continue;
                }
                Err(e) => return Err(e).context("watching etcd"),
            };
            loop {
                let message = tokio::time::timeout_at(deadline, watch.message())
                    .await
                    .with_context(|| format!("{} did not register within 60 s: {}", server.name(), process.log()))?;
                match message {
                    Ok(Some(resp)) if resp.events().iter().any(|e| e.event_type() == EventType::Put) => {
                        return Ok((started.elapsed(), process));
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) if breaks < 5 => {
                        breaks += 1;
                        break;
                    }
                    Ok(None) => anyhow::bail!("the watch ended"),
                    Err(e) => return Err(e).context("watching etcd"),
                }
            }
        }
    }
}

/// Pins every thread of `pid` to `cpus`.
fn pin(pid: i32, cpus: &str) -> anyhow::Result<()> {
    let status = Command::new("taskset").args(["-a", "-p", "-c", cpus, &pid.to_string()]).output()?;
    anyhow::ensure!(status.status.success(), "taskset {pid}: {}", String::from_utf8_lossy(&status.stderr));
    Ok(())
}

async fn stop(mut process: ServiceProcess) {
    process.signal(15);
    let _ = process.wait_exit(Duration::from_secs(20)).await;
}

/// One load round against a server: the client's view, the server's CPU and
/// its RSS at the end.
struct Round {
    stats: Stats,
    server_cpu: Duration,
    rss_kib: u64,
}

impl Round {
    fn server_us_per_call(&self) -> f64 {
        self.server_cpu.as_secs_f64() * 1e6 / self.stats.calls.max(1) as f64
    }

    fn server_core_share(&self) -> f64 {
        self.server_cpu.as_secs_f64() / self.stats.wall.as_secs_f64()
    }
}

#[derive(Clone, Copy)]
enum Work {
    /// `grpc.health.v1.Health/Check`: the framework alone, no database.
    Health,
    GetUser,
    CreateUser,
}

/// A call of `work` over `channel`; CreateUser makes a fresh email each time.
fn caller(
    work: Work,
    channel: Channel,
    id: String,
    seq: Arc<AtomicU64>,
    tag: &'static str,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send>>
+ Send
+ Sync
+ 'static {
    move || {
        let mut client = UserServiceClient::new(channel.clone());
        let mut health = HealthClient::new(channel.clone());
        let (id, n) = (id.clone(), seq.fetch_add(1, Ordering::Relaxed));
        Box::pin(async move {
            match work {
                Work::Health => health.check(HealthCheckRequest { service: USER.into() }).await.map(|_| ()),
                Work::GetUser => client.get_user(GetUserRequest { id }).await.map(|_| ()),
                Work::CreateUser => client
                    .create_user(CreateUserRequest { name: "Bench".into(), email: format!("b{n}-{tag}@example.com") })
                    .await
                    .map(|_| ()),
            }
        })
    }
}

async fn saturate(
    process: &ServiceProcess,
    call: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send>>
    + Send
    + Sync
    + 'static,
    phase: Duration,
) -> anyhow::Result<Round> {
    let cpu0 = stat_cpu(process.pid()).context("server CPU")?.1;
    let stats = load(phase, call).await?;
    let server_cpu = stat_cpu(process.pid()).context("server CPU")?.1.saturating_sub(cpu0);
    Ok(Round { stats, server_cpu, rss_kib: rss_kib(process.pid()).unwrap_or(0) })
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub async fn run(etcd: &Etcd, dir: &Path, secs: u64) -> anyhow::Result<()> {
    let classpath = user_spring_classpath()?;
    anyhow::ensure!(
        Command::new("taskset").arg("-V").output().is_ok_and(|o| o.status.success()),
        "taskset (util-linux) is missing"
    );
    let postgres = Postgres::start()?;
    // PostgreSQL on the load generator's core; its backends inherit it.
    pin(postgres.pid().context("the postmaster's pid")?, CLIENT_CPU)?;
    let bench = Bench { etcd, db: postgres.url(), dir, archive: dir.join("user-spring.jsa"), classpath };

    // The Rust service's migrations make the table; then the CDS archive,
    // from a training run that exits once the context is refreshed.
    let (_, first) = bench.start(Server::Rust, free_port(), false).await?;
    stop(first).await;
    let training = Instant::now();
    let status = Command::new("java")
        .arg(format!("-XX:ArchiveClassesAtExit={}", bench.archive.display()))
        .arg("-Dspring.context.exit=onRefresh")
        .args(["-cp", &bench.classpath, "io.meshkit.user.UserApplication"])
        .envs(bench.env(free_port(), "cds-training"))
        .output()?;
    anyhow::ensure!(bench.archive.exists(), "no CDS archive: {}", String::from_utf8_lossy(&status.stdout));
    let training = training.elapsed();

    // Start-up, alternating the variants.
    let variants = [Server::Rust, Server::Spring, Server::SpringCds, Server::SpringCdsC1];
    let mut starts: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut idle_rss: Vec<u64> = vec![0; variants.len()];
    for run in 0..START_RUNS {
        for (i, server) in variants.iter().enumerate() {
            let (took, process) = bench.start(*server, free_port(), false).await?;
            starts[i].push(took.as_secs_f64() * 1000.0);
            if run == 0 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                idle_rss[i] = rss_kib(process.pid()).unwrap_or(0);
            }
            stop(process).await;
        }
    }

    // Load: the Rust service and Spring Boot with default flags, warm.
    pin(std::process::id() as i32, CLIENT_CPU)?;
    let result = load_phases(&bench, Duration::from_secs(secs)).await;
    pin(std::process::id() as i32, ALL_CPUS).ok();
    let loads = result?;

    println!(
        "\n== Spring Boot vs meshkit: UserService on PostgreSQL (start on both cores; under load the server on CPU {SERVER_CPU}, the load generator and PostgreSQL on CPU {CLIENT_CPU})"
    );
    println!(
        "  Spring Boot 4.0.7, spring-grpc 1.0.3, Java {}, JVM defaults unless said; CDS archive from a training run ({:.1} s)",
        java_version(),
        training.as_secs_f64()
    );
    println!("  {:<44} {:>14} {:>14} {:>9}   the brief's claim", "figure", "Spring Boot", "meshkit", "ratio");
    let row = |figure: &str, spring: f64, rust: f64, unit: &str, ratio: f64, claim: &str| {
        println!("  {figure:<44} {:>11.1} {unit:<2} {:>11.1} {unit:<2} {:>8.1}x   {claim}", spring, rust, ratio);
    };
    let start = |i: usize| median(starts[i].clone());
    row("start to SERVING and registered (median)", start(1), start(0), "ms", start(1) / start(0), "10–30x faster");
    row("  with CDS", start(2), start(0), "ms", start(2) / start(0), "");
    row("  with CDS and C1 only", start(3), start(0), "ms", start(3) / start(0), "");
    let mib = |kib: u64| kib as f64 / 1024.0;
    row(
        "idle RSS, 2 s after start",
        mib(idle_rss[1]),
        mib(idle_rss[0]),
        "MB",
        mib(idle_rss[1]) / mib(idle_rss[0]),
        "5–10x less",
    );
    for (name, l) in [
        ("Health/Check (the framework alone)", &loads.health),
        ("GetUser (one indexed read of a row in PostgreSQL's cache)", &loads.get),
        ("CreateUser (an insert)", &loads.create),
    ] {
        println!("  -- {name}");
        let (s, r) = (&l.spring, &l.rust);
        row("  RSS under load (highest)", mib(s.rss), mib(r.rss), "MB", mib(s.rss) / mib(r.rss), "5–10x less");
        row("  saturated calls/s, server on one core", s.rate, r.rate, "/s", r.rate / s.rate, "5x");
        row("  server CPU per call at saturation", s.cpu_us, r.cpu_us, "µs", s.cpu_us / r.cpu_us, "");
        println!("  {:<44} {:>13.0}% {:>13.0}%", "  server core busy at saturation", s.core * 100.0, r.core * 100.0);
        println!("  {:<44} {:>14} {:>14}", format!("  at a steady {} calls/s:", l.rate), "", "");
        row("    p50", s.p50, r.p50, "µs", s.p50 / r.p50, "2–5x lower");
        row("    p99", s.p99, r.p99, "µs", s.p99 / r.p99, "2–5x lower");
        row("    server CPU per call", s.steady_cpu_us, r.steady_cpu_us, "µs", s.steady_cpu_us / r.steady_cpu_us, "");
    }
    println!("  raw:");
    for (i, server) in variants.iter().enumerate() {
        let (min, max) = spread(&starts[i]);
        println!(
            "    start {:<24} {} runs: median {:.0} ms, {:.0}–{:.0} ms; idle RSS {:.1} MiB",
            server.name(),
            START_RUNS,
            median(starts[i].clone()),
            min,
            max,
            mib(idle_rss[i])
        );
    }
    for line in &loads.raw {
        println!("    {line}");
    }
    Ok(())
}

fn java_version() -> String {
    Command::new("java")
        .arg("-version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stderr).lines().next().map(str::to_owned))
        .and_then(|l| l.split('"').nth(1).map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// One server's figures for one workload.
#[derive(Default)]
struct Side {
    rate: f64,
    cpu_us: f64,
    core: f64,
    rss: u64,
    p50: f64,
    p99: f64,
    steady_cpu_us: f64,
}

struct Workload {
    rate: u64,
    rust: Side,
    spring: Side,
}

struct Loads {
    health: Workload,
    get: Workload,
    create: Workload,
    raw: Vec<String>,
}

async fn load_phases(bench: &Bench<'_>, phase: Duration) -> anyhow::Result<Loads> {
    let (rust_port, spring_port) = (free_port(), free_port());
    let (_, rust) = bench.start(Server::Rust, rust_port, true).await?;
    let (_, spring) = bench.start(Server::Spring, spring_port, true).await?;
    let channel = |port: u16| -> anyhow::Result<Channel> {
        Ok(Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?.tcp_nodelay(true).connect_lazy())
    };
    let (rust_channel, spring_channel) = (channel(rust_port)?, channel(spring_port)?);
    let user = UserServiceClient::new(rust_channel.clone())
        .create_user(CreateUserRequest { name: "Ada".into(), email: "ada@example.com".into() })
        .await
        .with_context(|| format!("creating the user all GetUser calls read; the Rust service's log:\n{}", rust.log()))?
        .into_inner()
        .id;
    let seq = Arc::new(AtomicU64::new(0));
    let servers = [("meshkit", &rust, &rust_channel, "r"), ("Spring Boot", &spring, &spring_channel, "s")];
    // Warm-up: both workloads on both, so the JVM has compiled the hot path.
    for (_, _, channel, tag) in servers {
        for work in [Work::Health, Work::GetUser, Work::CreateUser] {
            load(WARM_UP / 2, caller(work, (*channel).clone(), user.clone(), seq.clone(), tag)).await?;
        }
    }
    let mut raw = vec![format!(
        "warm-up: {} s of each workload per server at saturation; rounds of {} s",
        WARM_UP.as_secs() / 2,
        phase.as_secs()
    )];
    let mut workloads = Vec::new();
    for (work, name) in [(Work::Health, "Health"), (Work::GetUser, "GetUser"), (Work::CreateUser, "CreateUser")] {
        let mut rounds: [Vec<Round>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..ROUNDS {
            for (i, (_, process, channel, tag)) in servers.iter().enumerate() {
                let call = caller(work, (*channel).clone(), user.clone(), seq.clone(), tag);
                rounds[i].push(saturate(process, call, phase).await?);
            }
        }
        let mut sides = [Side::default(), Side::default()];
        for (i, (server, ..)) in servers.iter().enumerate() {
            let rates: Vec<f64> = rounds[i].iter().map(|r| r.stats.rate()).collect();
            let (min, max) = spread(&rates);
            let side = &mut sides[i];
            side.rate = median(rates.clone());
            side.cpu_us = median(rounds[i].iter().map(Round::server_us_per_call).collect());
            side.core = median(rounds[i].iter().map(Round::server_core_share).collect());
            side.rss = rounds[i].iter().map(|r| r.rss_kib).max().unwrap_or(0);
            let p = |q: f64| median(rounds[i].iter().map(|r| r.stats.hist.value_at_quantile(q) as f64).collect());
            raw.push(format!(
                "{name} saturated, {server}: {:.0} calls/s ({min:.0}–{max:.0}), p50 {:.0} µs, p99 {:.0} µs, server {:.1} µs/call, core {:.0}%",
                side.rate,
                p(0.5),
                p(0.99),
                side.cpu_us,
                side.core * 100.0
            ));
        }
        // A rate both hold: half the lower saturated rate, in hundreds.
        let rate = (((sides[0].rate.min(sides[1].rate) / 2.0) / 100.0).floor() as u64 * 100).max(100);
        let mut steady: [Vec<(f64, f64, f64)>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..ROUNDS {
            for (i, (_, process, channel, tag)) in servers.iter().enumerate() {
                let call = caller(work, (*channel).clone(), user.clone(), seq.clone(), tag);
                let cpu0 = stat_cpu(process.pid()).context("server CPU")?.1;
                let stats = paced(rate, phase, call).await?;
                let cpu = stat_cpu(process.pid()).context("server CPU")?.1.saturating_sub(cpu0);
                steady[i].push((
                    stats.hist.value_at_quantile(0.5) as f64,
                    stats.hist.value_at_quantile(0.99) as f64,
                    cpu.as_secs_f64() * 1e6 / stats.calls.max(1) as f64,
                ));
            }
        }
        for (i, (server, ..)) in servers.iter().enumerate() {
            let side = &mut sides[i];
            side.p50 = median(steady[i].iter().map(|s| s.0).collect());
            side.p99 = median(steady[i].iter().map(|s| s.1).collect());
            side.steady_cpu_us = median(steady[i].iter().map(|s| s.2).collect());
            let p99s: Vec<f64> = steady[i].iter().map(|s| s.1).collect();
            let (min, max) = spread(&p99s);
            raw.push(format!(
                "{name} at {rate}/s, {server}: p50 {:.0} µs, p99 {:.0} µs ({min:.0}–{max:.0}), server {:.1} µs/call",
                side.p50, side.p99, side.steady_cpu_us
            ));
        }
        let [rust_side, spring_side] = sides;
        workloads.push(Workload { rate, rust: rust_side, spring: spring_side });
    }
    stop(rust).await;
    stop(spring).await;
    let create = workloads.pop().context("three workloads")?;
    let get = workloads.pop().context("three workloads")?;
    let health = workloads.pop().context("three workloads")?;
    let mut client = bench.etcd.client().await;
    let left = client
        .get(format!("/meshkit/services/{USER}/"), Some(GetOptions::new().with_prefix().with_count_only()))
        .await?;
    anyhow::ensure!(left.count() == 0, "{} instances left registered", left.count());
    Ok(Loads { health, get, create, raw })
}
