//! meshkit's balanced channel beside the clients a team would pick instead,
//! on the same backends under the same load, healthy and sick.
//!
//! - Backends: three `echo-server` instances (`MeshServer`, the echo
//!   contract), registered in etcd by meshkit; each registration is also
//!   written in go-zero's own format (`KEY/LEASE` = `host:port`) on the
//!   instance's own lease, so both discoveries see an instance come and go
//!   at the same moment. Each cell of the table starts them afresh under an
//!   etcd prefix of its own.
//! - Clients, each its own process with the same open-loop schedule and
//!   flags (`peer-client` in Rust, `peer-go` in Go, `clients/peers`):
//!   meshkit's balanced channel (etcd discovery); go-zero's zrpc client (its
//!   etcd discovery, p2c_ewma, its default interceptors); grpc-go with
//!   round_robin over the three addresses; tonic's `Channel::balance_list`
//!   over them.
//! - The same per-call deadline (1 s) for every client. Retries: none of a
//!   call that reached a server, for all four; meshkit and grpc-go (so
//!   go-zero, which is built on it) retry a call that never left; tonic
//!   retries nothing.
//! - Scenarios: all healthy; one backend 20 ms slower; one failing every
//!   fifth call UNAVAILABLE; one killed with SIGKILL a third into the run;
//!   one stopped with SIGSTOP then. Open loop at [`RATE`]; then a saturation
//!   run, healthy, [`SATURATION`] callers back to back.
//! - Pinning: the client on core 0, the backends on the last core.
//! - Each cell: calls that succeeded per second, p50, p99, p99.9 (of every
//!   call started in the measured window, failed ones included), failed calls, the client process's CPU per call (its
//!   threads' on-CPU time, `/proc/PID/task/*/schedstat`, load loop included).
//!   Rounds alternate the clients' order; figures are medians of rounds,
//!   failures their sum. Every round is written to `target/bench/peers.csv`.
//!
//! Goal (issue: peers): meshkit's p99 and failed calls at or below every
//! peer's in every sick scenario; its throughput and CPU per call within 5%
//! of the best when all are healthy.

use std::{
    fmt::Write as _,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use etcd_client::{GetOptions, PutOptions};
use meshkit_integration_tests::{Etcd, ServiceProcess, bin_dir, echo::ECHO, free_port, tool};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::servers::schedstat_cpu;
use crate::{median, num_cpus};

/// Open-loop calls per second of the sick scenarios.
const RATE: u64 = 2_000;
/// Callers back to back in the saturation run.
const SATURATION: usize = 64;
const DEADLINE_MS: u64 = 1_000;
const BACKENDS: usize = 3;
const ROUNDS: usize = 3;
/// A kill loses a call or two per round, to every client alike: three
/// rounds cannot tell one client's count from another's.
const KILLED_ROUNDS: usize = 10;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Client {
    Meshkit,
    GoZero,
    GrpcGo,
    Tonic,
}

const CLIENTS: [Client; 4] = [Client::Meshkit, Client::GoZero, Client::GrpcGo, Client::Tonic];

impl Client {
    fn name(self) -> &'static str {
        match self {
            Client::Meshkit => "meshkit",
            Client::GoZero => "go-zero zrpc",
            Client::GrpcGo => "grpc-go round_robin",
            Client::Tonic => "tonic balance_list",
        }
    }

    fn command(self, core: &str, etcd: &Etcd, cell: &Cell) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("taskset");
        command.arg("-c").arg(core);
        match self {
            Client::Meshkit => {
                command.arg(bin_dir().join("peer-client")).args(["--client", "meshkit", "--etcd"]);
                command.arg(etcd.endpoint()).arg("--prefix").arg(&cell.prefix);
            }
            Client::Tonic => {
                command.arg(bin_dir().join("peer-client")).args(["--client", "tonic", "--addrs"]);
                command.arg(cell.addrs.join(","));
            }
            Client::GoZero => {
                command.arg(tool("peer-go")).args(["client", "--client", "gozero", "--etcd"]);
                command.arg(etcd.endpoint()).arg("--key").arg(&cell.gozero_key);
            }
            Client::GrpcGo => {
                command.arg(tool("peer-go")).args(["client", "--client", "grpcgo", "--addrs"]);
                command.arg(cell.addrs.join(","));
            }
        }
        command
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Healthy,
    Slow,
    Failing,
    Killed,
    Stopped,
    Saturated,
}

const SCENARIOS: [Scenario; 6] =
    [Scenario::Healthy, Scenario::Slow, Scenario::Failing, Scenario::Killed, Scenario::Stopped, Scenario::Saturated];

impl Scenario {
    fn key(self) -> &'static str {
        match self {
            Scenario::Healthy => "healthy",
            Scenario::Slow => "slow",
            Scenario::Failing => "failing",
            Scenario::Killed => "killed",
            Scenario::Stopped => "stopped",
            Scenario::Saturated => "saturated",
        }
    }

    fn rounds(self) -> usize {
        if self == Scenario::Killed { KILLED_ROUNDS } else { ROUNDS }
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::Healthy => "healthy",
            Scenario::Slow => "one 20 ms slower",
            Scenario::Failing => "one failing 20% UNAVAILABLE",
            Scenario::Killed => "one killed (SIGKILL)",
            Scenario::Stopped => "one stopped (SIGSTOP)",
            Scenario::Saturated => "saturated, healthy",
        }
    }

    /// The sick backend's settings (backend 0).
    fn sick_env(self) -> Vec<(&'static str, String)> {
        match self {
            Scenario::Slow => vec![("ECHO_DELAY_MS", "20".into())],
            Scenario::Failing => vec![("ECHO_FAIL_EVERY", "5".into())],
            _ => Vec::new(),
        }
    }
}

/// Three backends started for one cell, under their own prefix and key.
struct Cell {
    prefix: String,
    gozero_key: String,
    addrs: Vec<String>,
    backends: Vec<ServiceProcess>,
}

async fn start_backends(etcd: &Etcd, logs: &Path, scenario: Scenario, n: usize, core: usize) -> anyhow::Result<Cell> {
    let prefix = format!("/peers-{n}");
    let gozero_key = format!("echo-{n}.rpc");
    let (mut addrs, mut backends) = (Vec::new(), Vec::new());
    for i in 0..BACKENDS {
        let port = free_port();
        let mut command = std::process::Command::new("taskset");
        command.arg("-c").arg(core.to_string()).arg(bin_dir().join("echo-server"));
        let mut env = vec![
            ("ECHO_SERVER", "mesh".to_owned()),
            ("MESHKIT_SERVER_LISTEN", format!("127.0.0.1:{port}")),
            ("MESHKIT_ETCD_ENDPOINTS", etcd.endpoint()),
            ("MESHKIT_ETCD_PREFIX", prefix.clone()),
            ("MESHKIT_REGISTRY_INSTANCE_ID", format!("echo-{i}")),
            ("RUST_LOG", "warn".to_owned()),
        ];
        if i == 0 {
            env.extend(scenario.sick_env());
        }
        backends.push(ServiceProcess::spawn_command(&format!("echo-{n}-{i}"), command, &env, logs)?);
        addrs.push(format!("127.0.0.1:{port}"));
    }
    // Each instance's registration, then go-zero's key on the same lease.
    let mut client = etcd.client().await;
    let services = format!("{prefix}/services/{ECHO}/");
    let deadline = Instant::now() + Duration::from_secs(20);
    let leases = loop {
        let found = client.get(services.as_str(), Some(GetOptions::new().with_prefix())).await?;
        let leases: Vec<i64> = (0..BACKENDS)
            .filter_map(|i| {
                let id = format!("echo-{i}");
                found.kvs().iter().find(|kv| kv.key_str().is_ok_and(|k| k.ends_with(&id))).map(|kv| kv.lease())
            })
            .collect();
        if leases.len() == BACKENDS {
            break leases;
        }
        if Instant::now() >= deadline {
            // Their logs go with the bench's temporary directory: say what they said.
            let logs: Vec<String> = backends
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    format!(
                        "echo-{i} ({}): {}",
                        addrs[i],
                        b.log().lines().rev().take(5).collect::<Vec<_>>().join(" | ")
                    )
                })
                .collect();
            anyhow::bail!("{} of the {BACKENDS} echo backends registered in 20 s; {}", leases.len(), logs.join("; "));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for (addr, lease) in addrs.iter().zip(leases) {
        let key = format!("{gozero_key}/{lease}");
        client.put(key, addr.as_str(), Some(PutOptions::new().with_lease(lease))).await?;
    }
    Ok(Cell { prefix, gozero_key, addrs, backends })
}

impl Cell {
    async fn stop(self) {
        for b in &self.backends {
            b.signal(18); // SIGCONT, for the stopped one
            b.signal(15);
        }
        for mut b in self.backends {
            if b.wait_exit(Duration::from_secs(10)).await.is_none() {
                b.signal(9);
            }
        }
    }
}

/// One client's run in one cell.
#[derive(Clone, Default)]
struct Run {
    calls: u64,
    failed: u64,
    by_code: String,
    seconds: f64,
    p50: u64,
    p99: u64,
    p999: u64,
    cpu_us_per_call: f64,
}

impl Run {
    /// Calls that succeeded, per second of the measured window.
    fn rate(&self) -> f64 {
        (self.calls - self.failed.min(self.calls)) as f64 / self.seconds.max(1e-9)
    }
}

async fn run_client(
    client: Client,
    scenario: Scenario,
    etcd: &Etcd,
    cell: &Cell,
    core: &str,
    secs: u64,
) -> anyhow::Result<Run> {
    let mut command = client.command(core, etcd, cell);
    command.args(["--seconds", &secs.to_string(), "--warmup-seconds", "1", "--deadline-ms"]);
    command.arg(DEADLINE_MS.to_string());
    if scenario == Scenario::Saturated {
        command.args(["--concurrency", &SATURATION.to_string()]);
    } else {
        command.args(["--rate", &RATE.to_string()]);
    }
    let sick = async {
        if matches!(scenario, Scenario::Killed | Scenario::Stopped) {
            tokio::time::sleep(Duration::from_secs(secs) / 3).await;
            cell.backends[0].signal(if scenario == Scenario::Killed { 9 } else { 19 });
        }
    };
    let run = drive_client(command, client.name(), secs, &[], sick).await?;
    let summary = &run.summary;
    let number = |k: &str| summary[k].as_u64().unwrap_or(0);
    let calls = number("calls");
    let by_code = summary["by_code"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    Ok(Run {
        calls,
        failed: number("failed"),
        by_code,
        seconds: summary["seconds"].as_f64().unwrap_or(0.0),
        p50: number("p50_us"),
        p99: number("p99_us"),
        p999: number("p999_us"),
        cpu_us_per_call: run.cpu.as_secs_f64() * 1e6 / calls.max(1) as f64,
    })
}

/// A load client's run (`peer-client` or `peer-go client`): its summary
/// line, and the on-CPU time of its process and of the `watched` processes
/// (its backends) over its measured window.
pub(crate) struct ClientRun {
    pub summary: serde_json::Value,
    pub cpu: Duration,
    pub watched: Duration,
}

/// Runs a load client to its summary; `mid_run` runs once its measured
/// window has begun.
pub(crate) async fn drive_client(
    mut command: tokio::process::Command,
    name: &str,
    secs: u64,
    watched: &[i32],
    mid_run: impl std::future::Future<Output = ()>,
) -> anyhow::Result<ClientRun> {
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);
    let mut child = command.spawn()?;
    let pid = child.id().ok_or_else(|| anyhow::anyhow!("{name} exited at once"))? as i32;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let mut next_line = async || -> anyhow::Result<serde_json::Value> {
        loop {
            let line = tokio::time::timeout(Duration::from_secs(secs + 30), lines.next_line())
                .await
                .map_err(|_| anyhow::anyhow!("{name} said nothing for {} s", secs + 30))??
                .ok_or_else(|| anyhow::anyhow!("{name} ended early"))?;
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                return Ok(v);
            }
        }
    };
    let measuring = next_line().await?;
    anyhow::ensure!(measuring["event"] == "measuring", "{name}: expected the measuring line, got {measuring}");
    let watched_cpu = || watched.iter().map(|&p| schedstat_cpu(p)).sum::<Duration>();
    let (cpu0, watched0) = (schedstat_cpu(pid), watched_cpu());
    mid_run.await;
    let summary = next_line().await?;
    let (cpu, watched) = (schedstat_cpu(pid).saturating_sub(cpu0), watched_cpu().saturating_sub(watched0));
    // The client waits for its stdin to close, so its CPU could be read.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.shutdown().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    Ok(ClientRun { summary, cpu, watched })
}

/// Medians of one client's rounds, failures summed.
struct Cellwise {
    rate: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    failed: u64,
    calls: u64,
    cpu: f64,
    p99_spread: (u64, u64),
}

fn merge(runs: &[Run]) -> Cellwise {
    let m = |f: fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    Cellwise {
        rate: m(Run::rate),
        p50: m(|r| r.p50 as f64),
        p99: m(|r| r.p99 as f64),
        p999: m(|r| r.p999 as f64),
        failed: runs.iter().map(|r| r.failed).sum(),
        calls: runs.iter().map(|r| r.calls).sum(),
        cpu: m(|r| r.cpu_us_per_call),
        p99_spread: (runs.iter().map(|r| r.p99).min().unwrap_or(0), runs.iter().map(|r| r.p99).max().unwrap_or(0)),
    }
}

fn report(scenario: Scenario, runs: &[Vec<Run>; 4], secs: u64) {
    let load = if scenario == Scenario::Saturated {
        format!("{SATURATION} callers back to back")
    } else {
        format!("{RATE} calls/s open loop")
    };
    println!(
        "\n== peers, {}: Echo over {BACKENDS} backends, {load}, deadline {DEADLINE_MS} ms, {secs} s x {} rounds",
        scenario.name(),
        scenario.rounds()
    );
    println!(
        "  {:<20} {:>9} {:>8} {:>8} {:>9} {:>8} {:>14} {:>16}",
        "client", "ok/s", "p50 µs", "p99 µs", "p99.9 µs", "failed", "client µs/call", "p99 of rounds"
    );
    let cells: Vec<Cellwise> = runs.iter().map(|r| merge(r)).collect();
    for (client, c) in CLIENTS.iter().zip(&cells) {
        println!(
            "  {:<20} {:>9.0} {:>8.0} {:>8.0} {:>9.0} {:>8} {:>14.1} {:>16}",
            client.name(),
            c.rate,
            c.p50,
            c.p99,
            c.p999,
            format!("{}", c.failed),
            c.cpu,
            format!("{}–{}", c.p99_spread.0, c.p99_spread.1),
        );
    }
    let (ours, peers) = (&cells[0], &cells[1..]);
    if matches!(scenario, Scenario::Healthy | Scenario::Saturated) {
        let best_rate = peers.iter().map(|c| c.rate).fold(ours.rate, f64::max);
        let best_cpu = peers.iter().map(|c| c.cpu).fold(ours.cpu, f64::min);
        println!(
            "  meshkit: throughput x{:.3} of the best, CPU per call x{:.3} of the lowest (goal: within 5%)",
            ours.rate / best_rate,
            ours.cpu / best_cpu
        );
    } else {
        let best_p99 = peers.iter().map(|c| c.p99).fold(f64::MAX, f64::min);
        let fewest = peers.iter().map(|c| c.failed).min().unwrap_or(0);
        println!(
            "  meshkit: p99 {:.0} µs vs the best peer's {best_p99:.0}; failed {} of {} vs the fewest {fewest} (goal: at or below every peer)",
            ours.p99, ours.failed, ours.calls
        );
    }
}

pub async fn run(etcd: &Etcd, logs: &Path, secs: u64) -> anyhow::Result<()> {
    let cores = num_cpus();
    if cores < 2 {
        println!("\n== peers: needs two cores (one for the client, one for the backends); skipped");
        return Ok(());
    }
    let backend_core = cores - 1;
    let client_core = "0".to_owned();
    println!(
        "\n(peers: each client its own process pinned to core {client_core}, the {BACKENDS} backends to core {backend_core})"
    );
    let mut csv =
        String::from("scenario,round,client,calls,seconds,failed,by_code,p50_us,p99_us,p999_us,client_us_per_call\n");
    let mut n = 0;
    // `MESHKIT_BENCH_PEERS=killed,stopped` runs only the scenarios named.
    let only = std::env::var("MESHKIT_BENCH_PEERS").unwrap_or_default();
    let wanted = |s: Scenario| only.is_empty() || only.split(',').any(|w| w.trim() == s.key());
    for scenario in SCENARIOS.into_iter().filter(|s| wanted(*s)) {
        let mut runs: [Vec<Run>; 4] = Default::default();
        for round in 0..scenario.rounds() {
            for k in 0..CLIENTS.len() {
                // Rotate who goes first, so drift on the host hits all alike.
                let i = (k + round) % CLIENTS.len();
                n += 1;
                let cell = start_backends(etcd, logs, scenario, n, backend_core).await?;
                let run = run_client(CLIENTS[i], scenario, etcd, &cell, &client_core, secs).await;
                cell.stop().await;
                let run = run?;
                let _ = writeln!(
                    csv,
                    "{},{round},{},{},{:.3},{},{},{},{},{},{:.2}",
                    scenario.name(),
                    CLIENTS[i].name(),
                    run.calls,
                    run.seconds,
                    run.failed,
                    run.by_code,
                    run.p50,
                    run.p99,
                    run.p999,
                    run.cpu_us_per_call
                );
                runs[i].push(run);
            }
        }
        report(scenario, &runs, secs);
    }
    let dir = bin_dir().join("../bench");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("peers.csv");
    std::fs::write(&file, csv)?;
    println!("  (every round: {})", file.display());
    Ok(())
}
