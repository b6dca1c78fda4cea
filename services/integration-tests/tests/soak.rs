//! A soak: the whole local cluster (`make up` as a user runs it: etcd, Kafka,
//! two instances each of user-, order-, notification- and scheduler-service,
//! the gateway, the xDS server) under steady load through the gateway
//! (CreateOrder: gateway → order → user, its event through Kafka to
//! notification; GetUser), the scheduler's job every 10 s, and one instance
//! restarted as a rolling deploy would every interval.
//!
//! `MESHKIT_SOAK_SECS` long (60 in `make test`; `make soak` runs 1800 and
//! plots the samples). Every process's resident memory, open descriptors, OS
//! threads and Tokio tasks, and the count of etcd keys, are sampled into
//! `target/soak/samples.csv`. The criteria:
//! - no failed call;
//! - over the last two thirds of the run, a process that was never restarted
//!   grows by at most [`RSS_TOLERANCE`] in memory, and its descriptors and
//!   tasks not at all beyond a small allowance;
//! - after each restart every process that runs throughout has its
//!   descriptors and tasks back to at most where they were before the first,
//!   and the count of etcd keys is the same;
//! - a restarted instance, a fresh process each time whose descriptors depend
//!   on the load it started under (the connections its pools opened), does
//!   not grow within any of its lives.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use meshkit_integration_tests::{LoadGen, cluster::LocalCluster, eventually, load::Tally};
use meshkit_proto::{
    order::{CreateOrderRequest, OrderItem, order_service_client::OrderServiceClient},
    user::{CreateUserRequest, GetUserRequest, user_service_client::UserServiceClient},
};
use tonic::transport::Channel;

/// The instances restarted in turn; the other processes run throughout.
const RESTARTED: [&str; 4] = ["user-2", "order-2", "notification-2", "scheduler-2"];
/// Memory growth allowed over the last two thirds: 10% and 4 MiB.
const RSS_TOLERANCE: (f64, f64) = (0.10, 4.0 * 1024.0);
/// Descriptors and tasks: the same, give or take these (a connection being
/// replaced, a timer task).
const FD_ALLOWANCE: f64 = 4.0;
const TASK_ALLOWANCE: f64 = 8.0;

/// One process's figures at one time; `None` where unreadable (a JVM has no Tokio tasks).
#[derive(Debug, Clone, Default)]
struct Figures {
    pid: u32,
    rss_kib: Option<f64>,
    fds: Option<f64>,
    threads: Option<f64>,
    tasks: Option<f64>,
}

/// `/proc/PID`: resident memory, descriptors and threads.
fn proc_figures(pid: u32) -> Option<Figures> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok().map(|d| d.count() as f64);
    Some(Figures { pid, rss_kib: field("VmRSS:"), fds, threads: field("Threads:"), tasks: None })
}

/// Every process of the cluster by its pid file's name (`gateway`, `user-1`…).
fn processes(run_dir: &Path) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(run_dir.join("pids")).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().trim_end_matches(".pid").to_owned();
        if let Some(pid) = std::fs::read_to_string(entry.path()).ok().and_then(|p| p.trim().parse().ok()) {
            out.insert(name, pid);
        }
    }
    out
}

/// Instance id → admin address, from the registrations.
async fn admin_addrs(etcd: &etcd_client::Client) -> BTreeMap<String, String> {
    let opts = etcd_client::GetOptions::new().with_prefix();
    let Ok(resp) = etcd.clone().get("/meshkit/services/", Some(opts)).await else { return BTreeMap::new() };
    resp.kvs()
        .iter()
        .filter_map(|kv| {
            let id = kv.key_str().ok()?.rsplit('/').next()?.to_owned();
            let instance: meshkit_common::Instance = serde_json::from_slice(kv.value()).ok()?;
            Some((id, instance.metadata.get("admin")?.clone()))
        })
        .collect()
}

async fn tasks_of(admin: &str) -> Option<f64> {
    let text = meshkit_common::admin::http_get(admin, "/metrics").await.ok()?;
    meshkit_integration_tests::prometheus::parse(&text).get("meshkit_runtime_alive_tasks").copied()
}

async fn etcd_keys(etcd: &etcd_client::Client) -> Option<f64> {
    let opts = etcd_client::GetOptions::new().with_prefix().with_count_only();
    etcd.clone().get("/meshkit/", Some(opts)).await.ok().map(|r| r.count() as f64)
}

/// One round of samples: every process, and etcd's key count as `etcd-keys`.
async fn sample(run_dir: &Path, etcd: &etcd_client::Client) -> BTreeMap<String, Figures> {
    let admins = admin_addrs(etcd).await;
    let mut out = BTreeMap::new();
    for (name, pid) in processes(run_dir) {
        let Some(mut figures) = proc_figures(pid) else { continue };
        let id = if name == "gateway" { "gateway-1" } else { name.as_str() };
        if let Some(admin) = admins.get(id) {
            figures.tasks = tasks_of(admin).await;
        }
        out.insert(name, figures);
    }
    if let Some(keys) = etcd_keys(etcd).await {
        // Kept in the descriptors column: one number, compared the same way.
        out.insert("etcd-keys".into(), Figures { fds: Some(keys), ..Figures::default() });
    }
    out
}

struct Sample {
    at: Duration,
    figures: BTreeMap<String, Figures>,
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| meshkit_integration_tests::cluster::root().join("target"))
}

fn write_csv(samples: &[Sample], restarts: &[(Duration, String)]) -> PathBuf {
    let dir = target_dir().join("soak");
    std::fs::create_dir_all(&dir).unwrap();
    let mut csv = String::from("t_secs,process,pid,rss_kib,fds,threads,tasks\n");
    let cell = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_default();
    for s in samples {
        for (name, f) in &s.figures {
            let _ = writeln!(
                csv,
                "{:.1},{name},{},{},{},{},{}",
                s.at.as_secs_f64(),
                f.pid,
                cell(f.rss_kib),
                cell(f.fds),
                cell(f.threads),
                cell(f.tasks)
            );
        }
    }
    std::fs::write(dir.join("samples.csv"), csv).unwrap();
    let mut events = String::from("t_secs,restarted\n");
    for (at, name) in restarts {
        let _ = writeln!(events, "{:.1},{name}", at.as_secs_f64());
    }
    std::fs::write(dir.join("restarts.csv"), events).unwrap();
    dir
}

/// The steady load, for `run` at most (a minute more than the soak).
fn load(channel: Channel, user_id: String, run: Duration) -> (LoadGen, LoadGen) {
    let orders = {
        let (channel, user_id) = (channel.clone(), user_id.clone());
        LoadGen::start_for(2, Duration::from_millis(40), run, move || {
            let mut client = OrderServiceClient::new(channel.clone());
            let user_id = user_id.clone();
            async move {
                let mut req = tonic::Request::new(CreateOrderRequest {
                    user_id,
                    items: vec![OrderItem { sku: "soak-1".into(), quantity: 1 }],
                });
                req.set_timeout(Duration::from_secs(5));
                client.create_order(req).await.map(|_| None)
            }
        })
    };
    let users = LoadGen::start_for(2, Duration::from_millis(20), run, move || {
        let mut client = UserServiceClient::new(channel.clone());
        let id = user_id.clone();
        async move {
            let mut req = tonic::Request::new(GetUserRequest { id });
            req.set_timeout(Duration::from_secs(5));
            client.get_user(req).await.map(|_| None)
        }
    });
    (orders, users)
}

#[tokio::test]
async fn the_cluster_under_steady_load_and_rolling_restarts_holds_memory_descriptors_and_tasks() {
    meshkit_integration_tests::init_logs();
    let secs: u64 = std::env::var("MESHKIT_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let duration = Duration::from_secs(secs);
    let interval = (duration / 3).min(Duration::from_secs(60));
    let step = if secs <= 120 { Duration::from_secs(1) } else { Duration::from_secs(5) };
    let cluster = LocalCluster::up(&[]);
    let run_dir = cluster.run_dir.path().to_path_buf();
    let etcd_endpoint = format!("127.0.0.1:{}", cluster.etcd);
    let etcd = etcd_client::Client::connect([etcd_endpoint.as_str()], None).await.unwrap();

    // The reference job every 10 s instead of every minute, set live.
    let job = r#"{"cron":"*/10 * * * * *","time_zone":"UTC","target":"order","handler":"cancel-unpaid-orders","param":"{\"older_than_secs\":900}","route":"sharding_broadcast","timeout_ms":30000,"retries":1}"#;
    let (code, _, err) = meshkit_integration_tests::meshctl_at(
        &etcd_endpoint,
        &["config", "set", "scheduler", "scheduler.jobs.cancel-unpaid-orders", job],
    )
    .await;
    assert_eq!(code, 0, "meshctl config set: {err}");

    let channel =
        Channel::from_shared(format!("http://127.0.0.1:{}", cluster.gateway)).unwrap().connect().await.unwrap();
    let user = UserServiceClient::new(channel.clone())
        .create_user(CreateUserRequest { name: "Soak".into(), email: "soak@example.com".into() })
        .await
        .unwrap()
        .into_inner();
    let (orders, users) = load(channel, user.id, duration + Duration::from_secs(120));
    eventually("traffic through the gateway", Duration::from_secs(20), || async {
        (orders.ok_so_far() > 20 && users.ok_so_far() > 20).then_some(())
    })
    .await;

    let started = Instant::now();
    let mut samples: Vec<Sample> = Vec::new();
    let mut restarts: Vec<(Duration, String)> = Vec::new();
    // Figures of every process just before each restart, and at the end.
    let mut checkpoints: Vec<(Duration, BTreeMap<String, Figures>)> = Vec::new();
    let mut next_restart = interval;
    let mut turn = 0;
    // Calls done when the last third begins: the load must go on to the end.
    let mut ok_at_two_thirds = None;
    while started.elapsed() < duration {
        let figures = sample(&run_dir, &etcd).await;
        let at = started.elapsed();
        if at >= duration * 2 / 3 && ok_at_two_thirds.is_none() {
            ok_at_two_thirds = Some(orders.ok_so_far() + users.ok_so_far());
        }
        samples.push(Sample { at, figures: figures.clone() });
        if at >= next_restart && at + interval / 2 < duration {
            checkpoints.push((at, figures));
            let instance = RESTARTED[turn % RESTARTED.len()];
            turn += 1;
            // Off the runtime: the load generators share its one thread.
            let (env, instance_) = (cluster.env.clone(), instance.to_owned());
            let out = tokio::task::spawn_blocking(move || {
                meshkit_integration_tests::cluster::script(&env, &["restart", &instance_])
            })
            .await
            .unwrap();
            if !out.status.success() {
                // The cluster's logs outlive the temp run directory, for a look afterwards.
                let logs = target_dir().join("soak").join("logs");
                let _ = std::fs::create_dir_all(&logs);
                for entry in std::fs::read_dir(run_dir.join("logs")).into_iter().flatten().flatten() {
                    let _ = std::fs::copy(entry.path(), logs.join(entry.file_name()));
                }
            }
            assert!(
                out.status.success(),
                "cluster.sh restart {instance} (logs kept in target/soak/logs): {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            restarts.push((started.elapsed(), instance.to_owned()));
            next_restart += interval;
        }
        tokio::time::sleep(step.saturating_sub(started.elapsed() - at)).await;
    }
    let last = sample(&run_dir, &etcd).await;
    checkpoints.push((started.elapsed(), last.clone()));
    samples.push(Sample { at: started.elapsed(), figures: last });
    let last_third = (orders.ok_so_far() + users.ok_so_far()).saturating_sub(ok_at_two_thirds.unwrap_or(0));
    let order_tally = orders.stop().await;
    let user_tally = users.stop().await;
    let dir = write_csv(&samples, &restarts);

    let mut problems = Vec::new();
    // When the slowest call began, in seconds from the start of the measured run.
    let at = |tally: &Tally| {
        tally.slowest.map(|(t, _)| {
            let origin = tokio::time::Instant::from_std(started);
            if t >= origin { (t - origin).as_secs_f64() } else { -(origin - t).as_secs_f64() }
        })
    };
    eprintln!(
        "soak: slowest CreateOrder began at {:?}, slowest GetUser at {:?}; restarts at {restarts:?}",
        at(&order_tally),
        at(&user_tally)
    );
    // About 100 calls a second are meant; a third of that is the least.
    let least = secs / 3 * 30;
    if last_third < least {
        problems.push(format!("only {last_third} calls in the last third of the run (at least {least} meant)"));
    }
    report_calls("CreateOrder", &order_tally, &mut problems);
    report_calls("GetUser", &user_tally, &mut problems);
    check_growth(&samples, duration, &restarts, &mut problems);
    check_checkpoints(&checkpoints, &restarts, &mut problems);
    check_lives(&samples, &restarts, &mut problems);
    eprintln!("soak: {secs} s, {} restarts, samples in {}", restarts.len(), dir.display());
    assert!(restarts.len() >= 2, "too short a run to restart anything twice: {secs} s");
    assert!(problems.is_empty(), "soak criteria not met:\n  {}", problems.join("\n  "));
}

fn not_ours(name: &str) -> bool {
    name == "kafka" || name.starts_with("etcd") || name.starts_with("prometheus")
}

fn report_calls(what: &str, tally: &Tally, problems: &mut Vec<String>) {
    eprintln!(
        "soak: {what}: {} ok, {} failed; p50 {:?} p99 {:?} max {:?}",
        tally.ok,
        tally.failed,
        tally.latency(0.5),
        tally.latency(0.99),
        tally.latency(1.0)
    );
    if tally.failed > 0 {
        problems.push(format!("{what}: {} failed calls: {:?}", tally.failed, tally.errors));
    }
}

/// Growth over the last two thirds: the median of its first quarter against
/// that of its last quarter, for every meshkit process never restarted.
fn check_growth(samples: &[Sample], duration: Duration, restarts: &[(Duration, String)], problems: &mut Vec<String>) {
    let from = duration / 3;
    let window: Vec<&Sample> = samples.iter().filter(|s| s.at >= from).collect();
    let quarter = (window.len() / 4).max(1);
    let (head, tail) = (&window[..quarter], &window[window.len() - quarter..]);
    let names: Vec<String> = window.first().map(|s| s.figures.keys().cloned().collect()).unwrap_or_default();
    for name in names {
        // Restarted, or not meshkit's: the JVM's heap, etcd's and
        // Prometheus's stores grow by design.
        if restarts.iter().any(|(_, r)| *r == name) || not_ours(&name) || name == "etcd-keys" {
            continue;
        }
        let series = |part: &[&Sample], f: fn(&Figures) -> Option<f64>| {
            median(part.iter().filter_map(|s| s.figures.get(&name).and_then(f)).collect())
        };
        let rss = (series(head, |f| f.rss_kib), series(tail, |f| f.rss_kib));
        let fds = (series(head, |f| f.fds), series(tail, |f| f.fds));
        let tasks = (series(head, |f| f.tasks), series(tail, |f| f.tasks));
        eprintln!(
            "soak: {name:<16} rss {rss:?} KiB, fds {fds:?}, tasks {tasks:?} (first and last quarter of the last two thirds)"
        );
        if let (Some(a), Some(b)) = rss {
            let allowed = a * (1.0 + RSS_TOLERANCE.0) + RSS_TOLERANCE.1;
            if b > allowed {
                problems.push(format!("{name}: resident memory grew from {a:.0} to {b:.0} KiB (allowed {allowed:.0})"));
            }
        }
        if let (Some(a), Some(b)) = fds {
            if b > a + FD_ALLOWANCE {
                problems.push(format!("{name}: open descriptors grew from {a} to {b}"));
            }
        }
        if let (Some(a), Some(b)) = tasks {
            if b > a + TASK_ALLOWANCE {
                problems.push(format!("{name}: Tokio tasks grew from {a} to {b}"));
            }
        }
    }
}

/// Just before each restart and at the end, against the first checkpoint:
/// every process's descriptors and tasks, and etcd's keys. Fewer is fine (a
/// client that kept one connection where it had opened two at the start).
fn check_checkpoints(
    checkpoints: &[(Duration, BTreeMap<String, Figures>)],
    restarts: &[(Duration, String)],
    problems: &mut Vec<String>,
) {
    let Some((_, base)) = checkpoints.first() else { return };
    for (at, figures) in &checkpoints[1..] {
        let after = restarts.iter().filter(|(t, _)| t < at).count();
        for (name, f) in figures {
            let Some(b) = base.get(name) else { continue };
            // A restarted instance is held to itself: check_lives.
            if name == "kafka" || name.starts_with("prometheus") || RESTARTED.contains(&name.as_str()) {
                continue;
            }
            if name == "etcd-keys" {
                if f.fds != b.fds {
                    problems.push(format!(
                        "{:.0} s, after {after} restarts: {:?} etcd keys, {:?} before the first",
                        at.as_secs_f64(),
                        f.fds,
                        b.fds
                    ));
                }
                continue;
            }
            if let (Some(now), Some(then)) = (f.fds, b.fds) {
                if now > then + FD_ALLOWANCE {
                    problems.push(format!(
                        "{name} at {:.0} s, after {after} restarts: {now} descriptors, {then} before the first",
                        at.as_secs_f64()
                    ));
                }
            }
            if let (Some(now), Some(then)) = (f.tasks, b.tasks) {
                if now > then + TASK_ALLOWANCE {
                    problems.push(format!(
                        "{name} at {:.0} s, after {after} restarts: {now} tasks, {then} before the first",
                        at.as_secs_f64()
                    ));
                }
            }
        }
    }
}

/// Each life of a restarted instance, from 15 s after its start (its pools
/// connected) to its next restart: descriptors and tasks, the median of the
/// first quarter against that of the last, within the allowances.
fn check_lives(samples: &[Sample], restarts: &[(Duration, String)], problems: &mut Vec<String>) {
    const SETTLE: Duration = Duration::from_secs(15);
    for name in RESTARTED {
        let ends: Vec<Duration> = restarts.iter().filter(|(_, r)| r == name).map(|(t, _)| *t).collect();
        let starts = std::iter::once(Duration::ZERO).chain(ends.iter().copied());
        for (life, start) in starts.enumerate() {
            let end = ends.get(life).copied().unwrap_or(Duration::MAX);
            let part: Vec<&Figures> = samples
                .iter()
                .filter(|s| s.at >= start + SETTLE && s.at < end)
                .filter_map(|s| s.figures.get(name))
                .collect();
            if part.len() < 8 {
                continue;
            }
            let quarter = part.len() / 4;
            let (head, tail) = (&part[..quarter], &part[part.len() - quarter..]);
            let series =
                |p: &[&Figures], f: fn(&Figures) -> Option<f64>| median(p.iter().filter_map(|x| f(x)).collect());
            for (what, f, allowance) in [
                ("descriptors", (|x: &Figures| x.fds) as fn(&Figures) -> Option<f64>, FD_ALLOWANCE),
                ("tasks", |x: &Figures| x.tasks, TASK_ALLOWANCE),
            ] {
                if let (Some(a), Some(b)) = (series(head, f), series(tail, f))
                    && b > a + allowance
                {
                    problems.push(format!(
                        "{name}, life {life} (from {:.0} s): {what} grew from {a} to {b}",
                        start.as_secs_f64()
                    ));
                }
            }
        }
    }
}
