//! The scheduler's jobs on real processes: sharding broadcast, retries on
//! another executor (also after one died mid-run), manual triggers, pause and
//! resume through meshctl, the job log, and order-service's own job.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::time::Duration;

use meshkit_common::ChannelBuilder;
use meshkit_integration_tests::{
    create_user, eventually, init_logs,
    jobs::{EXECUTOR, JobCluster, SCHEDULER, SIGKILL},
    mesh_config, meshctl, sqlite_url,
};
use meshkit_proto::{
    order::{CreateOrderRequest, GetOrderRequest, OrderItem, OrderStatus, order_service_client::OrderServiceClient},
    scheduler::{ListRunsRequest, Run, RunStatus, TriggerJobRequest, TriggerKind},
};
use serde_json::json;

/// A schedule that fires only by hand within any test's life.
const NEVER: &str = "0 0 0 1 1 * 2099";

async fn runs(cluster: &JobCluster, scheduler: &str, job: &str) -> Vec<Run> {
    let request = ListRunsRequest { job: job.into(), page_size: 1000, page_token: String::new() };
    let mut runs = cluster.api(scheduler).await.list_runs(request).await.unwrap().into_inner().runs;
    runs.reverse(); // oldest first
    runs
}

async fn ended(cluster: &JobCluster, scheduler: &str, job: &str, count: usize) -> Vec<Run> {
    eventually(&format!("{count} ended runs of {job}"), Duration::from_secs(30), || async {
        let runs = runs(cluster, scheduler, job).await;
        let done = runs.iter().filter(|r| r.status != RunStatus::Running as i32).count();
        (done >= count).then_some(runs)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharding_broadcast_gives_every_live_executor_its_shard() {
    init_logs();
    let mut cluster = JobCluster::start().await;
    cluster.scheduler("sched-a");
    for id in ["exec-1", "exec-2", "exec-3"] {
        cluster.executor(id);
    }
    cluster.wait_registered(EXECUTOR, &["exec-1", "exec-2", "exec-3"]).await;
    cluster.wait_registered(SCHEDULER, &["sched-a"]).await;
    let job = |shards: u32| json!({"cron": NEVER, "target": "worker", "handler": "record", "route": "sharding_broadcast", "shards": shards});
    cluster.define("broadcast", job(0)).await;
    cluster.define("six", job(6)).await;
    cluster.wait_leader().await;
    cluster.wait_executors_known("sched-a", 3).await;
    cluster.wait_jobs_known("sched-a", &["broadcast", "six"]).await;
    let mut api = cluster.api("sched-a").await;
    let trigger = |name: &str| TriggerJobRequest { name: name.into(), param: None };

    // One shard per live executor.
    let started = api.trigger_job(trigger("broadcast")).await.unwrap().into_inner();
    assert_eq!(started.run_ids.len(), 3, "{started:?}");
    let runs = ended(&cluster, "sched-a", "broadcast", 3).await;
    assert!(runs.iter().all(|r| r.status == RunStatus::Succeeded as i32), "{runs:?}");
    let mut seen: Vec<(u32, u32, String)> = cluster
        .records()
        .into_iter()
        .filter(|r| r.job == "broadcast" && r.event == "end")
        .map(|r| (r.shard, r.total, r.instance))
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![(0, 3, "exec-1".into()), (1, 3, "exec-2".into()), (2, 3, "exec-3".into())],
        "shard i of 3 on the i-th executor"
    );

    // More shards than executors: spread evenly, each shard once.
    api.trigger_job(trigger("six")).await.unwrap();
    ended(&cluster, "sched-a", "six", 6).await;
    let six: Vec<_> = cluster.records().into_iter().filter(|r| r.job == "six" && r.event == "end").collect();
    let mut shards: Vec<u32> = six.iter().map(|r| r.shard).collect();
    shards.sort_unstable();
    assert_eq!(shards, (0..6).collect::<Vec<_>>());
    for id in ["exec-1", "exec-2", "exec-3"] {
        assert_eq!(six.iter().filter(|r| r.instance == id).count(), 2, "{id} runs two of six shards: {six:?}");
    }

    // A killed executor leaves the broadcast once its lease is gone.
    cluster.executors["exec-3"].signal(SIGKILL);
    eventually("exec-3 leaves the registry", Duration::from_secs(10), || async {
        (!cluster.registered(EXECUTOR).await.contains(&"exec-3".to_string())).then_some(())
    })
    .await;
    cluster.wait_executors_known("sched-a", 2).await;
    let again = api.trigger_job(trigger("broadcast")).await.unwrap().into_inner();
    assert_eq!(again.run_ids.len(), 2, "two live executors, two shards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_is_retried_on_another_executor_also_when_one_dies_mid_run() {
    init_logs();
    let mut cluster = JobCluster::start().await;
    cluster.scheduler("sched-a");
    cluster.executor("exec-1");
    cluster.executor("exec-2");
    cluster.wait_registered(EXECUTOR, &["exec-1", "exec-2"]).await;
    cluster.wait_registered(SCHEDULER, &["sched-a"]).await;
    cluster.define("flaky", json!({"cron": NEVER, "target": "worker", "handler": "fail-first", "retries": 2})).await;
    cluster
        .define(
            "long",
            json!({"cron": NEVER, "target": "worker", "handler": "sleep", "param": "4000", "route": "first",
                   "retries": 1, "timeout_ms": 20000}),
        )
        .await;
    cluster.wait_leader().await;
    cluster.wait_executors_known("sched-a", 2).await;
    cluster.wait_jobs_known("sched-a", &["flaky", "long"]).await;
    let mut api = cluster.api("sched-a").await;

    // The handler fails its first attempt: the retry runs elsewhere and succeeds.
    api.trigger_job(TriggerJobRequest { name: "flaky".into(), param: None }).await.unwrap();
    let runs = ended(&cluster, "sched-a", "flaky", 2).await;
    assert_eq!(runs.len(), 2, "one failure, one retry that succeeds: {runs:?}");
    assert_eq!((runs[0].attempt, runs[0].status), (1, RunStatus::Failed as i32), "{runs:?}");
    assert!(runs[0].message.contains("first attempt fails on purpose"), "{}", runs[0].message);
    assert_eq!((runs[1].attempt, runs[1].status), (2, RunStatus::Succeeded as i32), "{runs:?}");
    assert_eq!(runs[1].trigger, TriggerKind::Retry as i32);
    assert_ne!(runs[0].executor, runs[1].executor, "the retry goes to the other executor");

    // The executor dies mid-run: the run is marked failed, and retried on the other one.
    api.trigger_job(TriggerJobRequest { name: "long".into(), param: None }).await.unwrap();
    eventually("exec-1 started the long run", Duration::from_secs(10), || async {
        cluster.records().iter().any(|r| r.job == "long" && r.event == "start" && r.instance == "exec-1").then_some(())
    })
    .await;
    cluster.executors["exec-1"].signal(SIGKILL);
    let runs = ended(&cluster, "sched-a", "long", 2).await;
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert_eq!((runs[0].executor.as_str(), runs[0].status), ("exec-1", RunStatus::Failed as i32), "{runs:?}");
    assert!(runs[0].message.starts_with("executor exec-1: Unavailable: the connection"), "{}", runs[0].message);
    assert_eq!((runs[1].executor.as_str(), runs[1].status), ("exec-2", RunStatus::Succeeded as i32), "{runs:?}");
    assert!(runs[1].end_time.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshctl_lists_triggers_pauses_and_resumes_jobs_and_shows_the_log() {
    init_logs();
    let mut cluster = JobCluster::start().await;
    cluster.scheduler("sched-a");
    cluster.executor("exec-1");
    cluster.wait_registered(EXECUTOR, &["exec-1"]).await;
    cluster.wait_registered(SCHEDULER, &["sched-a"]).await;
    let etcd = &cluster.etcd;

    // Jobs are defined through the config center; a bad one is refused, naming it.
    let (code, _, err) = meshctl(
        etcd,
        &[
            "config",
            "set",
            "scheduler",
            "scheduler.jobs.bad",
            r#"{"cron":"* * * * *","target":"worker","handler":"record"}"#,
        ],
    )
    .await;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("scheduler.jobs.bad.cron") && err.contains("has 5 fields"), "{err}");
    let (code, _, err) = meshctl(
        etcd,
        &[
            "config",
            "set",
            "scheduler",
            "scheduler.jobs.tick",
            r#"{"every_ms":1000,"target":"worker","handler":"record"}"#,
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let (leader, _) = cluster.wait_leader().await;
    let ticks = |cluster: &JobCluster| cluster.records().iter().filter(|r| r.job == "tick" && r.event == "end").count();
    eventually("tick fires", Duration::from_secs(15), || async { (ticks(&cluster) >= 2).then_some(()) }).await;

    let (code, out, err) = meshctl(etcd, &["jobs", "list"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("leader: {leader}")), "{out}");
    assert!(out.contains("tick  every 1000 ms  worker/record  route=round_robin") && out.contains("active"), "{out}");

    let (code, out, err) = meshctl(etcd, &["jobs", "pause", "tick"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("PAUSED"), "{out}");
    tokio::time::sleep(Duration::from_millis(1500)).await; // a slot in flight may still end
    let paused_at = ticks(&cluster);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(ticks(&cluster), paused_at, "a paused job does not fire on schedule");
    let (_, out, _) = meshctl(etcd, &["jobs", "list"]).await;
    assert!(out.contains("PAUSED  next=-"), "{out}");

    // A manual trigger runs even while paused, with the param given.
    let (code, out, err) = meshctl(etcd, &["jobs", "trigger", "tick"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("triggered tick: run "), "{out}");
    eventually("the manual run ends", Duration::from_secs(10), || async {
        (ticks(&cluster) == paused_at + 1).then_some(())
    })
    .await;
    let (code, out, err) = meshctl(etcd, &["jobs", "history", "tick", "--limit", "5"]).await;
    assert_eq!(code, 0, "{err}");
    let newest = out.lines().nth(1).unwrap_or_default();
    assert!(newest.contains(" tick  manual ") && newest.contains(" succeeded ") && newest.contains("exec-1"), "{out}");

    let (code, _, _) = meshctl(etcd, &["jobs", "resume", "tick"]).await;
    assert_eq!(code, 0);
    eventually("tick fires again", Duration::from_secs(10), || async {
        (ticks(&cluster) >= paused_at + 3).then_some(())
    })
    .await;

    // Unknown jobs and bad arguments are named.
    let (code, _, err) = meshctl(etcd, &["jobs", "trigger", "nope"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("NotFound") && err.contains("no job \"nope\"") && err.contains("tick"), "{err}");
    let (code, _, err) = meshctl(etcd, &["jobs", "history", "--limit", "0"]).await;
    assert_eq!(code, 2);
    assert!(err.contains("--limit"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_service_cancels_unpaid_orders_on_schedule() {
    init_logs();
    let mut cluster = JobCluster::start().await;
    let dir = cluster.dir.path().to_path_buf();
    let user = meshkit_user::start(mesh_config(&cluster.etcd, &sqlite_url(&dir, "user")).into()).await.unwrap();
    let order = meshkit_order::start(mesh_config(&cluster.etcd, &sqlite_url(&dir, "order")).into()).await.unwrap();
    cluster.scheduler("sched-a");
    cluster.wait_registered(SCHEDULER, &["sched-a"]).await;
    cluster.wait_registered(EXECUTOR, &[order.instance_id()]).await;

    let channels = ChannelBuilder::new(cluster.etcd.client().await, "/meshkit");
    let alice = create_user(&channels.balanced("meshkit.user.v1.UserService"), "Alice", "alice@example.com").await;
    let mut orders = OrderServiceClient::new(channels.balanced("meshkit.order.v1.OrderService"));
    let mut ids = Vec::new();
    for sku in ["a", "b", "c"] {
        let request =
            CreateOrderRequest { user_id: alice.id.clone(), items: vec![OrderItem { sku: sku.into(), quantity: 1 }] };
        ids.push(orders.create_order(request).await.unwrap().into_inner().id);
    }
    cluster
        .define(
            "cancel-unpaid-orders",
            json!({"every_ms": 1000, "target": "order", "handler": "cancel-unpaid-orders",
                   "param": "{\"older_than_secs\": 0}", "route": "sharding_broadcast", "shards": 2}),
        )
        .await;
    for id in &ids {
        let status = eventually(&format!("order {id} cancelled"), Duration::from_secs(20), || {
            let mut orders = orders.clone();
            let id = id.clone();
            async move {
                let order = orders.get_order(GetOrderRequest { id }).await.ok()?.into_inner();
                (order.status == OrderStatus::Cancelled as i32).then_some(order.status)
            }
        })
        .await;
        assert_eq!(status, OrderStatus::Cancelled as i32);
    }
    let log = runs(&cluster, "sched-a", "cancel-unpaid-orders").await;
    let cancelled: u32 = log
        .iter()
        .filter(|r| r.status == RunStatus::Succeeded as i32)
        .filter_map(|r| r.message.strip_prefix("cancelled ")?.split(' ').next()?.parse::<u32>().ok())
        .sum();
    assert_eq!(cancelled, 3, "each order cancelled once, by one of the two shards: {log:?}");
    order.shutdown().await.unwrap();
    user.shutdown().await.unwrap();
}
