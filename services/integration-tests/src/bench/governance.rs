//! What the governance rules cost when none refuses, end to end: every rule
//! on against none, paired.
//!
//! - Two sides, each its own etcd prefix: two `echo-server` instances
//!   (`MeshServer`) and one `peer-client` (meshkit's balanced channel) calling
//!   Echo. The rules side has every rule set so that none refuses: serving
//!   side (qps, per-caller qps, concurrency, timeout, shedding) through the
//!   config center, calling side (breaker, adaptive throttling, the timeout's
//!   deadline) on the channel. The calls carry no deadline of their own, so
//!   the rule's 10 s deadline goes out with each one.
//! - Paired: both sides loaded at once, the four servers on the last core
//!   and both clients on the others, so what the machine does meanwhile
//!   (frequency, neighbours) falls on both; each round's difference, and the
//!   median of the rounds. Rounds alternate which side starts first.
//! - CPU per call, caller and servers together: the on-CPU time of the
//!   client and of its two servers over the client's measured window
//!   (`/proc/PID/task/*/schedstat`). Every round is written to
//!   `target/bench/governance.csv`.
//! - Steady: [`STEADY_RATE`] calls/s each, open loop. Saturated: `CONCURRENCY`
//!   callers back to back each; sharing the cores, each side gets what its
//!   cost per call allows, so the ratio of their calls/s is the throughput
//!   ratio.
//!
//! Goal (issue: peers): every rule costs at most 3 µs per call, caller and
//! servers together, and keeps at least 0.95x of the throughput.
//! `MESHKIT_BENCH_RULES=qps,breaker,…` keeps only the rules named (qps,
//! caller_qps, concurrency, timeout_ms, breaker, shedding, throttling);
//! `MESHKIT_BENCH_DEADLINE_MS=1000` gives every call of both sides a deadline
//! of its own, as most gRPC callers set one.

use std::{fmt::Write as _, path::Path, time::Duration};

use etcd_client::GetOptions;
use meshkit_common::config::{BreakerRule, GovernanceSettings, MethodRule};
use meshkit_integration_tests::{Etcd, ServiceProcess, bin_dir, echo::ECHO, free_port};

/// The CSV's columns, one row per side and round.
const CSV_HEADER: &str = "load,round,side,calls_per_s,p50_us,p99_us,failed,caller_us_per_call,servers_us_per_call\n";

use super::peers::{ClientRun, drive_client};
use super::servers::{pin, split_cores};
use crate::{CONCURRENCY, ROUNDS, median, spread};

const STEADY_RATE: u64 = 5_000;
const ECHO_METHOD: &str = "/meshkit.echo.v1.EchoService/Echo";

/// Every rule, none refusing (or only those `only` names).
fn rules(only: Option<&str>) -> GovernanceSettings {
    let on = |name: &str| only.is_none_or(|o| o.split(',').any(|r| r.trim() == name));
    let rule = MethodRule {
        qps: if on("qps") { 1e6 } else { 0.0 },
        burst: 1_000_000,
        concurrency: if on("concurrency") { 100_000 } else { 0 },
        caller_qps: if on("caller_qps") { 1e6 } else { 0.0 },
        caller_burst: 1_000_000,
        timeout_ms: if on("timeout_ms") { 10_000 } else { 0 },
        breaker: BreakerRule { enabled: on("breaker"), ..BreakerRule::default() },
        ..MethodRule::default()
    };
    let mut all = GovernanceSettings::default();
    all.methods.insert(ECHO_METHOD.into(), rule);
    all.shedding.enabled = on("shedding");
    all.shedding.cpu_threshold = 0.0;
    all.shedding.min_in_flight = 100_000;
    all.throttling.enabled = on("throttling");
    all
}

/// One side: its prefix, its servers, and the client flags that set its rules.
struct Side {
    name: &'static str,
    prefix: String,
    servers: Vec<ServiceProcess>,
    governance: Option<String>,
}

async fn start_side(
    etcd: &Etcd,
    logs: &Path,
    name: &'static str,
    rules: Option<&GovernanceSettings>,
    core: usize,
) -> anyhow::Result<Side> {
    let prefix = format!("/governance-{name}");
    let mut client = etcd.client().await;
    if let Some(rules) = rules {
        // Before the servers start: they read it with their settings.
        client.put(format!("{prefix}/config/echo/governance"), serde_json::to_string(rules)?, None).await?;
    }
    let mut servers = Vec::new();
    for i in 0..2 {
        let mut command = std::process::Command::new("taskset");
        command.arg("-c").arg(core.to_string()).arg(bin_dir().join("echo-server"));
        let env = [
            ("ECHO_SERVER", "mesh".to_owned()),
            ("MESHKIT_SERVER_LISTEN", format!("127.0.0.1:{}", free_port())),
            ("MESHKIT_ETCD_ENDPOINTS", etcd.endpoint()),
            ("MESHKIT_ETCD_PREFIX", prefix.clone()),
            ("MESHKIT_REGISTRY_INSTANCE_ID", format!("echo-{i}")),
            ("RUST_LOG", "warn".to_owned()),
        ];
        servers.push(ServiceProcess::spawn_command(&format!("governance-{name}-{i}"), command, &env, logs)?);
    }
    let key = format!("{prefix}/services/{ECHO}/");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let count = client.get(key.as_str(), Some(GetOptions::new().with_prefix().with_count_only())).await?.count();
        if count == 2 {
            break;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "{name}: {count} of 2 echo servers registered in 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let governance = rules.map(serde_json::to_string).transpose()?;
    Ok(Side { name, prefix, servers, governance })
}

/// Load on one side: `rate` calls/s open loop, or `CONCURRENCY` callers when 0.
fn client_command(etcd: &Etcd, side: &Side, cores: &str, rate: u64, secs: u64) -> tokio::process::Command {
    let deadline_ms = std::env::var("MESHKIT_BENCH_DEADLINE_MS").unwrap_or_else(|_| "0".into());
    let mut command = tokio::process::Command::new("taskset");
    command.arg("-c").arg(cores).arg(bin_dir().join("peer-client"));
    command.args(["--client", "meshkit", "--etcd", &etcd.endpoint(), "--prefix", &side.prefix]);
    command.args(["--seconds", &secs.to_string(), "--warmup-seconds", "1", "--deadline-ms", &deadline_ms]);
    if rate > 0 {
        command.args(["--rate", &rate.to_string()]);
    } else {
        command.args(["--concurrency", &CONCURRENCY.to_string()]);
    }
    if let Some(rules) = &side.governance {
        command.arg("--governance").arg(rules);
    }
    command
}

/// Per round and side: calls/s, client and servers µs per call, p50, p99.
#[derive(Default)]
struct Rounds {
    rate: Vec<f64>,
    client: Vec<f64>,
    servers: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    failed: Vec<u64>,
}

impl Rounds {
    fn add(&mut self, run: &ClientRun) {
        let number = |k: &str| run.summary[k].as_u64().unwrap_or(0);
        let calls = number("calls").max(1) as f64;
        self.rate.push(calls / run.summary["seconds"].as_f64().unwrap_or(1.0).max(1e-9));
        self.client.push(run.cpu.as_secs_f64() * 1e6 / calls);
        self.servers.push(run.watched.as_secs_f64() * 1e6 / calls);
        self.p50.push(number("p50_us") as f64);
        self.p99.push(number("p99_us") as f64);
        self.failed.push(number("failed"));
    }

    fn total(&self, round: usize) -> f64 {
        self.client[round] + self.servers[round]
    }
}

/// Both sides at once, `ROUNDS` times.
async fn paired(etcd: &Etcd, sides: &[Side; 2], cores: &str, rate: u64, secs: u64) -> anyhow::Result<[Rounds; 2]> {
    let mut rounds: [Rounds; 2] = Default::default();
    for r in 0..ROUNDS {
        let run = |i: usize| {
            let side = &sides[i];
            let pids: Vec<i32> = side.servers.iter().map(ServiceProcess::pid).collect();
            let command = client_command(etcd, side, cores, rate, secs);
            async move { drive_client(command, side.name, secs, &pids, async {}).await }
        };
        let (a, b) = if r % 2 == 0 {
            tokio::join!(run(0), run(1))
        } else {
            let (b, a) = tokio::join!(run(1), run(0));
            (a, b)
        };
        rounds[0].add(&a?);
        rounds[1].add(&b?);
    }
    Ok(rounds)
}

fn report(title: &str, rounds: &[Rounds; 2]) {
    println!("  {title}");
    for (name, r) in ["none", "rules"].iter().zip(rounds) {
        let totals: Vec<f64> = (0..r.rate.len()).map(|i| r.total(i)).collect();
        println!(
            "    {name:<6} {:>10.0} {:>8.0} {:>8.0} {:>12.1} {:>13.1} {:>12.1} {:>8}",
            median(&r.rate),
            median(&r.p50),
            median(&r.p99),
            median(&r.client),
            median(&r.servers),
            median(&totals),
            r.failed.iter().sum::<u64>()
        );
    }
    let n = rounds[0].rate.len();
    let diff = |f: &dyn Fn(&Rounds, usize) -> f64| -> Vec<f64> {
        (0..n).map(|i| f(&rounds[1], i) - f(&rounds[0], i)).collect()
    };
    let total = diff(&|r, i| r.total(i));
    let client = diff(&|r, i| r.client[i]);
    let servers = diff(&|r, i| r.servers[i]);
    let (low, high) = spread(&total);
    println!(
        "    rules: {:+.2} µs per call, caller and servers together (goal <= +3; rounds {low:+.2} to {high:+.2}): caller {:+.2}, servers {:+.2}",
        median(&total),
        median(&client),
        median(&servers)
    );
}

pub async fn run(etcd: &Etcd, logs: &Path, secs: u64) -> anyhow::Result<()> {
    let Some((server_core, load_cores)) = split_cores("governance") else { return Ok(()) };
    let only = std::env::var("MESHKIT_BENCH_RULES").ok().filter(|r| !r.trim().is_empty());
    let all = rules(only.as_deref());
    let sides = [
        start_side(etcd, logs, "none", None, server_core).await?,
        start_side(etcd, logs, "rules", Some(&all), server_core).await?,
    ];
    // This process stays off the servers' core while it waits.
    pin(std::process::id(), &load_cores)?;
    let window = secs.div_ceil(3).max(1);
    let result = async {
        let steady = paired(etcd, &sides, &load_cores, STEADY_RATE, window).await?;
        let saturated = paired(etcd, &sides, &load_cores, 0, window).await?;
        anyhow::Ok((steady, saturated))
    }
    .await;
    pin(std::process::id(), &format!("0-{server_core}"))?;
    let (steady, saturated) = result?;
    let mut csv = String::from(CSV_HEADER);
    for (load, rounds) in
        [(format!("steady {STEADY_RATE}/s"), &steady), (format!("saturated {CONCURRENCY}"), &saturated)]
    {
        for (side, r) in ["none", "rules"].iter().zip(rounds.iter()) {
            for i in 0..r.rate.len() {
                let _ = writeln!(
                    csv,
                    "{load},{i},{side},{:.0},{},{},{},{:.2},{:.2}",
                    r.rate[i], r.p50[i], r.p99[i], r.failed[i], r.client[i], r.servers[i]
                );
            }
        }
    }
    let dir = bin_dir().join("../bench");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("governance.csv");
    std::fs::write(&file, csv)?;
    let deadline = match std::env::var("MESHKIT_BENCH_DEADLINE_MS") {
        Ok(ms) if ms != "0" => format!("each call with its own {ms} ms deadline"),
        _ => "calls without a deadline of their own".to_owned(),
    };
    println!(
        "\n== governance: {} on (none refusing) vs none, paired: Echo through meshkit's channel (peer-client) to 2 MeshServer instances per side, {deadline}; both sides at once, the 4 servers on core {server_core}, the 2 clients on {load_cores}; {ROUNDS} rounds of {window} s",
        only.as_deref().unwrap_or("every rule")
    );
    println!(
        "    {:<6} {:>10} {:>8} {:>8} {:>12} {:>13} {:>12} {:>8}",
        "", "calls/s", "p50 µs", "p99 µs", "caller µs", "servers µs", "µs/call", "failed"
    );
    report(&format!("steady, {STEADY_RATE} calls/s each"), &steady);
    report(&format!("saturated, {CONCURRENCY} callers each"), &saturated);
    let ratios: Vec<f64> = (0..saturated[0].rate.len()).map(|i| saturated[1].rate[i] / saturated[0].rate[i]).collect();
    let (low, high) = spread(&ratios);
    println!("    rules: throughput x{:.3} of none's (goal >= 0.95; rounds x{low:.3} to x{high:.3})", median(&ratios));
    println!("    (every round: {})", file.display());
    for side in sides {
        for server in side.servers {
            crate::stop(server).await;
        }
    }
    Ok(())
}
