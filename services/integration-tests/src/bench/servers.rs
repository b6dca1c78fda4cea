//! What `MeshServer`'s default layers cost against tonic's server alone,
//! with a grpc-go server beside them as the peer's figure: the same echo
//! reply in three processes (`echo-server` twice, `peer-go serve`), each
//! pinned to the last core, the load from this process pinned to the others;
//! Echo calls on one direct HTTP/2 connection per server, saturated
//! (`CONCURRENCY` callers back to back) and at a steady 5,000 calls/s, in
//! rounds that rotate the order so drift on the host hits all alike. The server's CPU
//! is the sum of its threads' on-CPU time (`/proc/PID/task/*/schedstat`, in
//! ns), so a round of a second still resolves a fraction of a µs per call.
//!
//! "Default layers", as every meshkit service runs: registration in etcd,
//! gRPC health and reflection, the RED metrics and trace span of each call,
//! the caller's deadline, the contract's validation rules, authorization and
//! governance (each off until a rule is set), drain on SIGTERM, the admin
//! endpoint. Goal (issue: peers): throughput at least 0.95x bare tonic's,
//! server CPU at most 2 µs more per call.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use meshkit_integration_tests::{
    Etcd, ServiceProcess, bin_dir,
    echo::{EchoRequest, EchoServiceClient},
    free_port, tool,
};
use tonic::transport::Channel;

use crate::{CONCURRENCY, ROUNDS, Stats, load, median, num_cpus, paced};

const STEADY_RATE: u64 = 5_000;

/// On-CPU time of every thread of `pid`, from the scheduler's own accounting.
pub(crate) fn schedstat_cpu(pid: i32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Duration::ZERO };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()))
        .sum();
    Duration::from_nanos(ns)
}

pub(crate) fn pin(pid: u32, cores: &str) -> anyhow::Result<()> {
    let status = Command::new("taskset").args(["-a", "-cp", cores, &pid.to_string()]).output()?;
    anyhow::ensure!(status.status.success(), "taskset {cores} {pid}: {}", String::from_utf8_lossy(&status.stderr));
    Ok(())
}

struct Server {
    name: &'static str,
    process: ServiceProcess,
    client: EchoServiceClient<Channel>,
}

async fn start(etcd: &Etcd, logs: &Path, kind: &str, name: &'static str, core: usize) -> anyhow::Result<Server> {
    let port = free_port();
    let mut command = Command::new("taskset");
    command.arg("-c").arg(core.to_string());
    if kind == "grpc-go" {
        command.arg(tool("peer-go")).args(["serve", "--listen", &format!("127.0.0.1:{port}")]);
    } else {
        command.arg(bin_dir().join("echo-server"));
    }
    let env = [
        ("ECHO_SERVER", kind.to_owned()),
        ("MESHKIT_SERVER_LISTEN", format!("127.0.0.1:{port}")),
        ("MESHKIT_ETCD_ENDPOINTS", etcd.endpoint()),
        ("MESHKIT_REGISTRY_INSTANCE_ID", format!("echo-{kind}")),
        ("RUST_LOG", "warn".to_owned()),
    ];
    let process = ServiceProcess::spawn_command(&format!("echo-server-{kind}"), command, &env, logs)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let connected = async {
            let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))?.connect().await?;
            let mut client = EchoServiceClient::new(channel);
            client.echo(EchoRequest { text: "ready".into(), ..Default::default() }).await?;
            anyhow::Ok(client)
        };
        match connected.await {
            Ok(client) => return Ok(Server { name, process, client }),
            Err(e) if Instant::now() > deadline => anyhow::bail!("echo server {kind} did not answer in 20 s: {e:#}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

fn echo_call(
    client: &EchoServiceClient<Channel>,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tonic::Status>> + Send>>
+ Send
+ Sync
+ 'static {
    let client = client.clone();
    move || {
        let mut c = client.clone();
        Box::pin(async move { c.echo(EchoRequest { text: "bench".into(), ..Default::default() }).await.map(|_| ()) })
    }
}

/// One side's rounds: the merged stats, and per round (calls/s, server µs per call).
#[derive(Default)]
struct Side {
    stats: Stats,
    server: Duration,
    rounds: Vec<(f64, f64)>,
}

impl Side {
    fn add(&mut self, s: Stats, server: Duration) {
        self.rounds.push((s.rate(), server.as_secs_f64() * 1e6 / s.calls.max(1) as f64));
        self.server += server;
        self.stats.merge(s);
    }

    fn server_us(&self) -> f64 {
        median(&self.rounds.iter().map(|r| r.1).collect::<Vec<_>>())
    }

    fn rate(&self) -> f64 {
        median(&self.rounds.iter().map(|r| r.0).collect::<Vec<_>>())
    }

    fn spread(&self) -> String {
        let (low, high) = crate::spread(&self.rounds.iter().map(|r| r.1).collect::<Vec<_>>());
        format!("{low:.1}–{high:.1}")
    }
}

/// The sides' rows, then each against the first (bare tonic).
fn report(title: &str, sides: &[(&str, &Side)], steady: bool) {
    println!("\n== {title}");
    println!(
        "  {:<12} {:>10} {:>8} {:>8} {:>8} {:>16} {:>18}",
        "", "calls/s", "p50 µs", "p99 µs", "p99.9 µs", "server µs/call", "spread of rounds"
    );
    for (name, s) in sides {
        let h = &s.stats.hist;
        println!(
            "  {name:<12} {:>10.0} {:>8} {:>8} {:>8} {:>16.2} {:>18}",
            s.rate(),
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            s.server_us(),
            s.spread(),
        );
    }
    let (_, bare) = sides[0];
    for (name, side) in &sides[1..] {
        let added = side.server_us() - bare.server_us();
        let goal = if *name == "MeshServer" { " (goal <= +2)" } else { "" };
        if steady {
            let q = |q: f64| side.stats.hist.value_at_quantile(q) as i64 - bare.stats.hist.value_at_quantile(q) as i64;
            println!(
                "  {name:<12} server CPU {added:+.2} µs per call{goal}, added p50 {:+} µs, p99 {:+} µs (medians of {} rounds)",
                q(0.5),
                q(0.99),
                side.rounds.len()
            );
        } else {
            let ratio = side.rate() / bare.rate();
            let rate_goal = if *name == "MeshServer" { " (goal >= 0.95)" } else { "" };
            println!(
                "  {name:<12} throughput x{ratio:.3}{rate_goal}, server CPU {added:+.2} µs per call{goal} (medians of {} rounds)",
                side.rounds.len()
            );
        }
    }
}

/// The last core for the servers and the others for the load; None (and a
/// line saying `phase` is skipped) on a machine with one.
pub(crate) fn split_cores(phase: &str) -> Option<(usize, String)> {
    let cores = num_cpus();
    if cores < 2 {
        println!("\n== {phase}: needs two cores (one for the servers, one for the load); skipped");
        return None;
    }
    let load = if cores == 2 { "0".to_owned() } else { format!("0-{}", cores - 2) };
    Some((cores - 1, load))
}

pub async fn run(etcd: &Etcd, logs: &Path, secs: u64) -> anyhow::Result<()> {
    let Some((server_core, load_cores)) = split_cores("servers") else { return Ok(()) };
    let all_cores = format!("0-{server_core}");
    pin(std::process::id(), &load_cores)?;
    let result = compare(etcd, logs, secs, server_core, &load_cores).await;
    pin(std::process::id(), &all_cores)?;
    result
}

async fn compare(etcd: &Etcd, logs: &Path, secs: u64, server_core: usize, load_cores: &str) -> anyhow::Result<()> {
    let servers = [
        start(etcd, logs, "bare", "bare tonic", server_core).await?,
        start(etcd, logs, "mesh", "MeshServer", server_core).await?,
        start(etcd, logs, "grpc-go", "grpc-go", server_core).await?,
    ];
    println!(
        "\n(servers: each server pinned to core {server_core}, the load to core(s) {load_cores}; one HTTP/2 connection each, concurrency {CONCURRENCY})"
    );
    for s in &servers {
        load(Duration::from_millis(500), echo_call(&s.client)).await?;
    }
    let round = Duration::from_secs(secs) * 2 / ROUNDS as u32;
    let mut saturated: [Side; 3] = Default::default();
    let mut steady: [Side; 3] = Default::default();
    for r in 0..ROUNDS {
        // Rotate which goes first, so none always follows another.
        let order: Vec<usize> = (0..servers.len()).map(|k| (k + r) % servers.len()).collect();
        for &i in &order {
            let pid = servers[i].process.pid();
            let before = schedstat_cpu(pid);
            let s = load(round, echo_call(&servers[i].client)).await?;
            saturated[i].add(s, schedstat_cpu(pid).saturating_sub(before));
        }
        for &i in &order {
            let pid = servers[i].process.pid();
            let before = schedstat_cpu(pid);
            let s = paced(STEADY_RATE, round, echo_call(&servers[i].client)).await?;
            steady[i].add(s, schedstat_cpu(pid).saturating_sub(before));
        }
    }
    // Paired: bare tonic and one other side at the same steady rate at the
    // same time, on the same core, so what the machine does meanwhile
    // (frequency, neighbours) falls on both; the difference per round.
    let mut paired: [Vec<f64>; 3] = Default::default();
    for r in 0..ROUNDS {
        for i in 1..servers.len() {
            let (a, b) = (&servers[0], &servers[i]);
            let (a_pid, b_pid) = (a.process.pid(), b.process.pid());
            let (a0, b0) = (schedstat_cpu(a_pid), schedstat_cpu(b_pid));
            // Alternate which load starts first.
            let (sa, sb) = if r % 2 == 0 {
                tokio::join!(
                    paced(STEADY_RATE, round, echo_call(&a.client)),
                    paced(STEADY_RATE, round, echo_call(&b.client))
                )
            } else {
                let (sb, sa) = tokio::join!(
                    paced(STEADY_RATE, round, echo_call(&b.client)),
                    paced(STEADY_RATE, round, echo_call(&a.client))
                );
                (sa, sb)
            };
            let (sa, sb) = (sa?, sb?);
            let per_call = |cpu: Duration, s: &Stats| cpu.as_secs_f64() * 1e6 / s.calls.max(1) as f64;
            let a_us = per_call(schedstat_cpu(a_pid).saturating_sub(a0), &sa);
            let b_us = per_call(schedstat_cpu(b_pid).saturating_sub(b0), &sb);
            paired[i].push(b_us - a_us);
        }
    }
    let names = servers.each_ref().map(|s| s.name);
    fn rows<'a>(names: &[&'static str; 3], sides: &'a [Side; 3]) -> Vec<(&'static str, &'a Side)> {
        names.iter().copied().zip(sides.iter()).collect()
    }
    report(
        "servers, saturated: Echo, bare tonic vs MeshServer vs grpc-go, one core each",
        &rows(&names, &saturated),
        false,
    );
    report(&format!("servers, steady {STEADY_RATE} calls/s: Echo, one core each"), &rows(&names, &steady), true);
    println!(
        "\n== servers, paired at {STEADY_RATE} calls/s each: bare tonic and another side loaded at once on core {server_core}, {ROUNDS} rounds"
    );
    for (i, diffs) in paired.iter().enumerate().skip(1) {
        let (low, high) = crate::spread(diffs);
        let goal = if names[i] == "MeshServer" { " (goal <= +2)" } else { "" };
        println!(
            "  {:<12} server CPU {:+.2} µs per call{goal} against bare tonic in the same rounds (median; rounds {low:+.2} to {high:+.2})",
            names[i],
            median(diffs)
        );
    }
    for s in servers {
        crate::stop(s.process).await;
    }
    Ok(())
}
