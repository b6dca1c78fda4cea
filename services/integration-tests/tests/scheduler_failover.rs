//! Scheduler leadership under failure, on real processes: the leader killed,
//! the leader frozen. Every schedule slot fires once, and a deposed leader's
//! triggers are refused by the executors. In their own binary: they measure
//! how long a takeover takes.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use meshkit_integration_tests::{
    eventually, init_logs,
    jobs::{EXECUTOR, JobCluster, SCHEDULER, SIGCONT, SIGKILL, SIGSTOP, TTL_SECS},
};
use meshkit_proto::scheduler::{
    Fence, ListRunsRequest, RunJobRequest, TriggerKind, job_executor_client::JobExecutorClient,
};
use serde_json::json;

/// Slots of `job` the executors started, with how many times each.
fn started(cluster: &JobCluster, job: &str) -> BTreeMap<i64, usize> {
    let mut slots = BTreeMap::new();
    for r in cluster.records().into_iter().filter(|r| r.job == job && r.event == "start") {
        *slots.entry(r.slot_ms).or_insert(0) += 1;
    }
    slots
}

async fn wait_new_leader(cluster: &JobCluster, old: &str, since: Instant) -> (String, i64, Duration) {
    let (id, fence) = eventually("another scheduler leads", Duration::from_secs(20), || async {
        cluster.leader().await.filter(|(id, _)| id != old)
    })
    .await;
    (id, fence, since.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seconds_schedule_fires_every_slot_once_across_a_leader_kill() {
    init_logs();
    let mut cluster = JobCluster::start().await;
    for id in ["sched-a", "sched-b"] {
        cluster.scheduler(id);
    }
    for id in ["exec-1", "exec-2"] {
        cluster.executor(id);
    }
    cluster.wait_registered(SCHEDULER, &["sched-a", "sched-b"]).await;
    cluster.wait_registered(EXECUTOR, &["exec-1", "exec-2"]).await;
    cluster.define("tick", json!({"cron": "* * * * * *", "target": "worker", "handler": "record"})).await;
    let (leader, fence) = cluster.wait_leader().await;
    eventually("4 slots fired", Duration::from_secs(20), || async {
        (started(&cluster, "tick").len() >= 4).then_some(())
    })
    .await;

    let killed = Instant::now();
    cluster.schedulers[&leader].signal(SIGKILL);
    let (new_leader, new_fence, took) = wait_new_leader(&cluster, &leader, killed).await;
    assert!(new_fence > fence, "the new leader's token {new_fence} is newer than {fence}");
    assert!(
        took <= Duration::from_secs(TTL_SECS + 1),
        "{new_leader} took over {took:?} after the leader was killed (TTL {TTL_SECS} s)"
    );
    let before = started(&cluster, "tick").keys().last().copied().unwrap();
    eventually("4 more slots under the new leader", Duration::from_secs(20), || async {
        (started(&cluster, "tick").range(before + 1..).count() >= 4).then_some(())
    })
    .await;

    // Every slot from the first to the last fired once: none twice, and none
    // lost in the takeover (it took less than the misfire threshold).
    let slots = started(&cluster, "tick");
    let twice: Vec<_> = slots.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "slots started more than once: {twice:?}");
    let runs = cluster
        .api(&new_leader)
        .await
        .list_runs(ListRunsRequest { job: "tick".into(), page_size: 1000, page_token: String::new() })
        .await
        .unwrap()
        .into_inner()
        .runs;
    let (first, last) = (*slots.keys().next().unwrap(), *slots.keys().last().unwrap());
    let mut slot = first;
    while slot <= last {
        let logged: Vec<_> = runs
            .iter()
            .filter(|r| r.scheduled_time.as_ref().is_some_and(|t| t.seconds * 1000 == slot))
            .filter(|r| r.attempt == 1 && r.trigger == TriggerKind::Schedule as i32)
            .collect();
        assert_eq!(logged.len(), 1, "slot {slot} is in the job log once: {logged:?}");
        // A slot the killed leader claimed just before it died may not have reached an executor.
        if !slots.contains_key(&slot) {
            assert_eq!(logged[0].leader, leader, "slot {slot} was lost by the new leader: {logged:?}");
        }
        slot += 1000;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_is_deposed_and_its_triggers_are_refused() {
    init_logs();
    let mut cluster = JobCluster::start().await;
    for id in ["sched-a", "sched-b"] {
        cluster.scheduler(id);
    }
    cluster.executor("exec-1");
    cluster.wait_registered(SCHEDULER, &["sched-a", "sched-b"]).await;
    cluster.wait_registered(EXECUTOR, &["exec-1"]).await;
    cluster.define("tick", json!({"every_ms": 500, "target": "worker", "handler": "record"})).await;
    let (leader, old_fence) = cluster.wait_leader().await;
    eventually("slots fire", Duration::from_secs(20), || async {
        (started(&cluster, "tick").len() >= 2).then_some(())
    })
    .await;

    let frozen = Instant::now();
    cluster.schedulers[&leader].signal(SIGSTOP);
    let (_, new_fence, took) = wait_new_leader(&cluster, &leader, frozen).await;
    assert!(took <= Duration::from_secs(TTL_SECS + 1), "takeover took {took:?}");

    // What the frozen leader would send when it wakes: refused, naming the stale token.
    let addr = cluster.addr(EXECUTOR, "exec-1").await;
    let mut executor = JobExecutorClient::connect(format!("http://{addr}")).await.unwrap();
    let trigger = |revision: i64| RunJobRequest {
        run_id: "manual-check".into(),
        job: "fence-check".into(),
        handler: "record".into(),
        shard_total: 1,
        fence: Some(Fence { cluster_id: 0, revision }),
        attempt: 1,
        leader: leader.clone(),
        ..Default::default()
    };
    let cluster_id = {
        let mut client = cluster.etcd.client().await;
        client.get("x", None).await.unwrap().header().unwrap().cluster_id()
    };
    let mut stale = trigger(old_fence);
    stale.fence.as_mut().unwrap().cluster_id = cluster_id;
    let refused = executor.run_job(stale).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains(&format!("fencing token {old_fence} is stale")), "{}", refused.message());
    let mut current = trigger(new_fence);
    current.fence.as_mut().unwrap().cluster_id = cluster_id;
    executor.run_job(current).await.expect("the current leader's token is accepted");

    // The frozen leader wakes up: still no slot fires twice.
    cluster.schedulers[&leader].signal(SIGCONT);
    let woke = started(&cluster, "tick").keys().last().copied().unwrap();
    eventually("slots go on after the old leader woke", Duration::from_secs(20), || async {
        (started(&cluster, "tick").range(woke + 1..).count() >= 6).then_some(())
    })
    .await;
    let twice: Vec<_> = started(&cluster, "tick").into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(twice.is_empty(), "slots started more than once: {twice:?}");
    let (_, fence_now) = cluster.wait_leader().await;
    assert!(fence_now >= new_fence, "leadership only moves forward: {fence_now} < {new_fence}");
}
