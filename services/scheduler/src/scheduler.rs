//! The leader's work: fire every job's slots, once each, and carry the runs
//! out on the executors; and triggers made by hand.
//!
//! Exactly once per slot rests on two things. The slots are computed the same
//! way by every instance (cron or fixed rate, in milliseconds since the
//! epoch), and a slot fires only if its row `(job, slot)` could be inserted
//! into `job_slots` under the fence the database knows as the newest leader's.
//! A new leader records its fence first (refused if a newer one is there),
//! then fires what the previous one left: slots missed by less than the
//! misfire threshold fire late, older ones follow the job's misfire policy.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use meshkit_common::{
    jobs::format_slot,
    ownership::{Fence, Slot, SlotEnd},
    time::now_ms,
};
use meshkit_proto::scheduler::{Fence as FenceMsg, RunJobRequest, RunStatus, TriggerKind};
use tokio::sync::watch;
use tonic::{Code, Status};
use tracing::Instrument as _;

/// The executor call a run's span is named after.
const RUN_JOB_PATH: &str = "/meshkit.scheduler.v1.JobExecutor/RunJob";

use crate::{
    executors::{Executors, Live},
    log::{Claim, JobLog, new_run},
    schedule::Schedule,
    settings::{JobSpec, SchedulerSettings},
};

type SerialLock = Arc<tokio::sync::Mutex<()>>;

/// Serial triggers of one job that may wait for the run before them.
const SERIAL_QUEUE: usize = 10;

/// The leadership this instance holds, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leading {
    pub fence: Fence,
    pub since_ms: i64,
}

/// What one trigger asks for.
#[derive(Debug, Clone)]
pub struct Trigger {
    pub job: String,
    pub spec: JobSpec,
    pub scheduled_ms: i64,
    pub kind: TriggerKind,
    pub param: String,
}

/// State shared by the leader loop and the API.
pub struct Scheduler {
    pub instance: String,
    pub settings: watch::Receiver<SchedulerSettings>,
    pub log: JobLog,
    pub executors: Arc<Executors>,
    pub leading: watch::Sender<Option<Leading>>,
    /// The next slot of every job while leading.
    pub next: Mutex<BTreeMap<String, i64>>,
    /// Triggers of each job still running (overlap policy).
    running: Mutex<HashMap<String, usize>>,
    /// Per job, held while a serial trigger runs; and how many wait for it.
    serial: Mutex<HashMap<String, (SerialLock, usize)>>,
    /// Slots skipped as misfired, and slots fired, since start.
    pub misfired: std::sync::atomic::AtomicU64,
    pub fired: std::sync::atomic::AtomicU64,
}

fn count_run(job: &str, status: RunStatus) {
    let status = match status {
        RunStatus::Succeeded => "succeeded",
        RunStatus::Failed => "failed",
        RunStatus::Skipped => "skipped",
        _ => "running",
    };
    RUNS.get_or_create(&RunLabels { job: job.to_owned(), status }).inc();
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RunLabels {
    job: String,
    status: &'static str,
}

/// `meshkit_job_runs_total{job, status}`.
static RUNS: std::sync::LazyLock<meshkit_common::metrics::CounterFamily<RunLabels>> = std::sync::LazyLock::new(|| {
    meshkit_common::metrics::counters(
        "meshkit_job_runs",
        "Job runs the leading scheduler recorded, by job and outcome (succeeded, failed, skipped).",
    )
});

/// Decrements a job's running count when a trigger's runs are over.
struct RunningGuard(Arc<Scheduler>, String);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        let mut running = self.0.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = running.get_mut(&self.1) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                running.remove(&self.1);
            }
        }
    }
}

impl Scheduler {
    pub fn new(
        instance: String,
        settings: watch::Receiver<SchedulerSettings>,
        log: JobLog,
        executors: Arc<Executors>,
    ) -> Arc<Self> {
        Arc::new(Self {
            instance,
            settings,
            log,
            executors,
            leading: watch::channel(None).0,
            next: Mutex::new(BTreeMap::new()),
            running: Mutex::new(HashMap::new()),
            serial: Mutex::new(HashMap::new()),
            misfired: Default::default(),
            fired: Default::default(),
        })
    }

    /// The fence this instance leads under now.
    pub fn fence(&self) -> Option<Fence> {
        self.leading.borrow().map(|l| l.fence)
    }

    /// Records a run for every shard and starts them; returns the run ids
    /// and a task that ends when every shard ended (retries included).
    pub async fn start(
        self: &Arc<Self>,
        trigger: Trigger,
        fence: Fence,
    ) -> Result<(Vec<String>, tokio::task::JoinHandle<()>), Status> {
        let spec = &trigger.spec;
        self.executors.ready(Duration::from_secs(2)).await;
        let live = self.executors.of(&spec.target);
        let plan: Vec<(u32, u32, Option<Live>)> = if spec.route == "sharding_broadcast" {
            let total = if spec.shards > 0 { spec.shards } else { u32::try_from(live.len()).unwrap_or(1).max(1) };
            (0..total)
                .map(|i| {
                    let executor = if live.is_empty() { None } else { live.get(i as usize % live.len()).cloned() };
                    (i, total, executor)
                })
                .collect()
        } else {
            vec![(0, 1, self.executors.pick(&trigger.job, &spec.route, &live))]
        };
        *self.running.lock().unwrap_or_else(|p| p.into_inner()).entry(trigger.job.clone()).or_insert(0) += 1;
        let guard = Arc::new(RunningGuard(self.clone(), trigger.job.clone()));
        let mut ids = Vec::with_capacity(plan.len());
        let mut shards = Vec::with_capacity(plan.len());
        for (index, total, executor) in plan {
            let mut row = new_run(
                uuid::Uuid::now_v7().to_string(),
                &trigger.job,
                trigger.kind as i32,
                trigger.scheduled_ms,
                fence,
                &self.instance,
            );
            row.shard_index = index as i32;
            row.shard_total = total as i32;
            if let Some((id, instance)) = &executor {
                row.executor = id.clone();
                row.executor_addr = instance.addr.clone();
            }
            self.log.start_run(row.clone()).await.map_err(|e| Status::unavailable(format!("job log: {e}")))?;
            ids.push(row.id.clone());
            shards.push((row, executor));
        }
        let tasks: Vec<_> = shards
            .into_iter()
            .map(|(row, executor)| {
                let this = self.clone();
                let trigger = trigger.clone();
                let guard = guard.clone();
                tokio::spawn(async move {
                    this.run_shard(trigger, fence, row, executor).await;
                    drop(guard);
                })
            })
            .collect();
        let all = tokio::spawn(async move {
            futures::future::join_all(tasks).await;
        });
        Ok((ids, all))
    }

    /// Records a slot that did not run, and why.
    async fn skip(&self, name: &str, slot: i64, kind: TriggerKind, fence: Fence, why: &str) {
        let mut row = new_run(uuid::Uuid::now_v7().to_string(), name, kind as i32, slot, fence, &self.instance);
        row.status = RunStatus::Skipped as i32;
        row.message = why.to_owned();
        row.end_ms = row.start_ms;
        if let Err(e) = self.log.start_run(row).await {
            tracing::error!(job = name, error = %e, "cannot record a skipped slot");
        }
        count_run(name, RunStatus::Skipped);
    }

    /// Runs one shard, retrying per the job's policy on other executors.
    async fn run_shard(
        self: Arc<Self>,
        trigger: Trigger,
        fence: Fence,
        mut row: crate::entity::run::Model,
        mut executor: Option<Live>,
    ) {
        let spec = &trigger.spec;
        let timeout = Duration::from_millis(spec.timeout_ms);
        let backoff = Duration::from_millis(self.settings.borrow().retry_backoff_ms);
        let mut tried: Vec<String> = Vec::new();
        loop {
            let mut span = tracing::Span::none();
            let outcome = match &executor {
                None => Err(Status::unavailable(format!(
                    "no live executor of {:?} is registered (JobExecutor with component={})",
                    spec.target, spec.target
                ))),
                Some((id, instance)) => {
                    tried.push(id.clone());
                    span = meshkit_common::trace::client_span(RUN_JOB_PATH);
                    let request = RunJobRequest {
                        run_id: row.id.clone(),
                        job: trigger.job.clone(),
                        handler: spec.handler.clone(),
                        param: trigger.param.clone(),
                        shard_index: row.shard_index as u32,
                        shard_total: row.shard_total as u32,
                        fence: Some(FenceMsg { cluster_id: fence.cluster_id, revision: fence.revision }),
                        scheduled_time: Some(meshkit_common::time::timestamp(trigger.scheduled_ms * 1000)),
                        attempt: row.attempt as u32,
                        leader: self.instance.clone(),
                    };
                    let call = self.executors.run(&instance.addr, request, timeout, &span);
                    let outcome = call.instrument(span.clone()).await;
                    let code = match &outcome {
                        Ok(_) => tonic::Code::Ok,
                        Err(s) => s.code(),
                    };
                    meshkit_common::trace::record_status(&span, code, false);
                    outcome
                }
            };
            let (status, message, retry) = match outcome {
                Ok(reply) => (RunStatus::Succeeded, reply.output, false),
                Err(status) => {
                    let who = executor.as_ref().map(|(id, _)| format!("executor {id}: ")).unwrap_or_default();
                    let message = format!("{who}{:?}: {}", status.code(), status.message());
                    // A refused fence means this instance no longer leads: nothing to retry.
                    let deposed = status.code() == Code::FailedPrecondition;
                    (RunStatus::Failed, message, !deposed && (row.attempt as u32) <= spec.retries)
                }
            };
            if status == RunStatus::Failed {
                tracing::warn!(job = trigger.job, run = row.id, attempt = row.attempt, "job run failed: {message}");
            }
            let trace_id = meshkit_common::trace::trace_id(&span).unwrap_or_default();
            if let Err(e) = self.log.finish_run(&row.id, status, &message, &trace_id).await {
                tracing::error!(job = trigger.job, run = row.id, error = %e, "cannot record the run's end");
            }
            count_run(&trigger.job, status);
            if !retry || self.fence() != Some(fence) {
                return;
            }
            tokio::time::sleep(backoff).await;
            if self.fence() != Some(fence) {
                return;
            }
            let live = self.executors.of(&spec.target);
            executor = self.executors.retry_target(&spec.route, &live, &tried);
            let previous = row.id.clone();
            row.id = uuid::Uuid::now_v7().to_string();
            row.trigger = TriggerKind::Retry as i32;
            row.attempt += 1;
            row.status = RunStatus::Running as i32;
            row.message = format!("retry of run {previous}");
            row.start_ms = now_ms();
            row.end_ms = 0;
            row.executor = executor.as_ref().map(|(id, _)| id.clone()).unwrap_or_default();
            row.executor_addr = executor.as_ref().map(|(_, i)| i.addr.clone()).unwrap_or_default();
            if let Err(e) = self.log.start_run(row.clone()).await {
                tracing::error!(job = trigger.job, error = %e, "cannot record a retry; giving up on it");
                return;
            }
        }
    }

    /// Fires one slot of `job`, if nobody fired it yet. Returns false when
    /// this instance turned out to be deposed.
    async fn fire(self: &Arc<Self>, name: &str, spec: &JobSpec, slot: i64, kind: TriggerKind, fence: Fence) -> bool {
        let claim = loop {
            match self.log.claim_slot(name, slot, fence, &self.instance).await {
                Ok(claim) => break claim,
                Err(e) => {
                    tracing::warn!(job = name, slot = format_slot(slot), error = %e, "cannot claim the slot; retrying");
                    if self.fence() != Some(fence) {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        };
        match claim {
            Claim::Deposed => return false,
            Claim::Fired => {
                tracing::debug!(job = name, slot = format_slot(slot), "slot fired already");
                return true;
            }
            Claim::Claimed => {}
        }
        self.fired.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let busy = self.running.lock().unwrap_or_else(|p| p.into_inner()).get(name).copied().unwrap_or(0) > 0;
        if busy && spec.overlap == "skip" {
            self.skip(name, slot, kind, fence, "the previous run was still going (overlap = skip)").await;
            return true;
        }
        let trigger =
            Trigger { job: name.to_owned(), spec: spec.clone(), scheduled_ms: slot, kind, param: spec.param.clone() };
        if spec.overlap != "serial" {
            if let Err(e) = self.start(trigger, fence).await {
                tracing::error!(job = name, slot = format_slot(slot), "cannot start the runs: {}", e.message());
            }
            return true;
        }
        // Serial: wait for the job's previous trigger to end, without holding up the other jobs.
        let lock = {
            let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
            let (lock, waiting) = serial.entry(name.to_owned()).or_insert_with(|| (Default::default(), 0));
            if *waiting >= SERIAL_QUEUE {
                None
            } else {
                *waiting += 1;
                Some(lock.clone())
            }
        };
        let Some(lock) = lock else {
            let why = format!("{SERIAL_QUEUE} triggers already wait for the previous run (overlap = serial)");
            self.skip(name, slot, kind, fence, &why).await;
            return true;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let _turn = lock.lock().await;
            if let Some((_, waiting)) = this.serial.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&trigger.job) {
                *waiting = waiting.saturating_sub(1);
            }
            if this.fence() != Some(fence) {
                let why = "the scheduler stopped leading while the slot waited for the previous run";
                this.skip(&trigger.job, trigger.scheduled_ms, trigger.kind, fence, why).await;
                return;
            }
            match this.start(trigger.clone(), fence).await {
                Ok((_, all)) => {
                    let _ = all.await;
                }
                Err(e) => {
                    let slot = format_slot(trigger.scheduled_ms);
                    tracing::error!(job = trigger.job, slot, "cannot start the runs: {}", e.message());
                }
            }
        });
        true
    }

    /// Leads until `slot.cancel` is cancelled (or a newer leader shows up).
    pub async fn lead(self: Arc<Self>, slot: Slot) -> SlotEnd {
        let fence = slot.fence;
        loop {
            match self.log.take_lead(fence, &self.instance).await {
                Ok(true) => break,
                Ok(false) => {
                    tracing::warn!(revision = fence.revision, "a newer leader is in the job log; not leading");
                    return SlotEnd::Fenced;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot record the leadership in the job log; retrying");
                    tokio::select! {
                        _ = slot.cancel.cancelled() => return SlotEnd::Stopped,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
            }
        }
        match self.log.fail_orphans(fence).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(runs = n, "runs of an earlier leader marked failed: their end is unknown"),
            Err(e) => tracing::warn!(error = %e, "cannot close the runs of earlier leaders"),
        }
        tracing::info!(revision = fence.revision, "leading the scheduler");
        self.leading.send_replace(Some(Leading { fence, since_ms: now_ms() }));
        let end = self.schedule(fence, &slot.cancel).await;
        self.leading.send_replace(None);
        self.next.lock().unwrap_or_else(|p| p.into_inner()).clear();
        tracing::info!(?end, "no longer leading the scheduler");
        end
    }

    async fn schedule(self: &Arc<Self>, fence: Fence, cancel: &tokio_util::sync::CancellationToken) -> SlotEnd {
        let mut settings = self.settings.clone();
        // Per job: its spec, schedule and next slot (none while paused).
        let mut jobs: BTreeMap<String, (JobSpec, Schedule, Option<i64>)> = BTreeMap::new();
        let current = settings.borrow_and_update().clone();
        for (name, spec) in &current.jobs {
            let Ok(schedule) = Schedule::from_spec(spec) else { continue };
            let next = if spec.paused {
                None
            } else {
                match self.catch_up(name, spec, &schedule, current.misfire_threshold_ms, fence).await {
                    Some(next) => next,
                    None => return SlotEnd::Fenced,
                }
            };
            jobs.insert(name.clone(), (spec.clone(), schedule, next));
        }
        loop {
            let threshold = i64::try_from(settings.borrow().misfire_threshold_ms).unwrap_or(i64::MAX);
            let now = now_ms();
            for (name, (spec, schedule, next)) in jobs.iter_mut() {
                let mut steps = 0;
                while let Some(slot) = *next {
                    if slot > now {
                        break;
                    }
                    if now - slot <= threshold {
                        if !self.fire(name, spec, slot, TriggerKind::Schedule, fence).await {
                            return SlotEnd::Fenced;
                        }
                    } else {
                        self.misfired.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::warn!(
                            job = name,
                            slot = format_slot(slot),
                            "slot misfired (missed by more than the threshold)"
                        );
                    }
                    steps += 1;
                    *next =
                        if steps > 1000 { schedule.next_after(now - threshold - 1) } else { schedule.next_after(slot) };
                }
            }
            let earliest = jobs.values().filter_map(|(_, _, n)| *n).min();
            *self.next.lock().unwrap_or_else(|p| p.into_inner()) =
                jobs.iter().filter_map(|(k, (_, _, n))| n.map(|n| (k.clone(), n))).collect();
            let wait = earliest
                .map_or(Duration::from_secs(3600), |e| Duration::from_millis(u64::try_from(e - now_ms()).unwrap_or(0)));
            tokio::select! {
                _ = cancel.cancelled() => return SlotEnd::Stopped,
                changed = settings.changed() => {
                    if changed.is_err() {
                        return SlotEnd::Stopped;
                    }
                    let new = settings.borrow_and_update().clone();
                    jobs = reconcile(jobs, &new);
                }
                _ = tokio::time::sleep(wait) => {}
            }
            if self.fence() != Some(fence) {
                return SlotEnd::Fenced;
            }
        }
    }

    /// On taking over: fires what the previous leader left within the
    /// threshold, applies the misfire policy to older slots, and returns the
    /// next slot to fire (`None` inside: deposed).
    async fn catch_up(
        self: &Arc<Self>,
        name: &str,
        spec: &JobSpec,
        schedule: &Schedule,
        threshold_ms: u64,
        fence: Fence,
    ) -> Option<Option<i64>> {
        let now = now_ms();
        let last = match self.log.last_slot(name).await {
            Ok(last) => last,
            Err(e) => {
                tracing::warn!(job = name, error = %e, "cannot read the job's last slot; starting from now");
                None
            }
        };
        let Some(last) = last else { return Some(schedule.next_after(now)) };
        let threshold = i64::try_from(threshold_ms).unwrap_or(i64::MAX);
        let first_missed = schedule.next_after(last);
        let first_in_time = schedule.next_after(last.max(now - threshold - 1));
        if let (Some(missed), Some(in_time)) = (first_missed, first_in_time) {
            if missed < in_time && missed <= now {
                // Slots older than the threshold: find the newest of them (bounded walk).
                let mut newest = missed;
                let mut skipped = 1u64;
                while let Some(s) = schedule.next_after(newest) {
                    if s >= in_time || skipped > 100_000 {
                        break;
                    }
                    newest = s;
                    skipped += 1;
                }
                self.misfired.fetch_add(skipped, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    job = name,
                    slots = skipped,
                    newest = format_slot(newest),
                    policy = spec.misfire,
                    "slots misfired while no scheduler led"
                );
                if spec.misfire == "fire_once" && !self.fire(name, spec, newest, TriggerKind::Misfire, fence).await {
                    return None;
                }
            }
        }
        Some(first_in_time)
    }
}

/// Jobs after a settings change: new and changed schedules start from now,
/// unchanged ones keep their next slot, removed ones go.
fn reconcile(
    mut old: BTreeMap<String, (JobSpec, Schedule, Option<i64>)>,
    new: &SchedulerSettings,
) -> BTreeMap<String, (JobSpec, Schedule, Option<i64>)> {
    let now = now_ms();
    let mut jobs = BTreeMap::new();
    for (name, spec) in &new.jobs {
        let Ok(schedule) = Schedule::from_spec(spec) else { continue };
        let kept = old.remove(name).filter(|(s, _, _)| {
            s.cron == spec.cron
                && s.time_zone == spec.time_zone
                && s.every_ms == spec.every_ms
                && s.paused == spec.paused
        });
        let next = match kept {
            Some((_, _, next)) => next,
            None if spec.paused => None,
            None => schedule.next_after(now),
        };
        jobs.insert(name.clone(), (spec.clone(), schedule, next));
    }
    jobs
}
