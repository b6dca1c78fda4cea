//! Jobs: when they fire ([`Schedule`]) and how a process runs them
//! ([`Executor`], the `JobExecutor` gRPC service).
//!
//! The scheduler (`services/scheduler`) decides when a job fires and which
//! executors run it; any meshkit process becomes an executor by adding
//! [`Executor::into_service`] to its server with handlers by name. Every
//! trigger carries the leader's [`Fence`](crate::ownership::Fence); an
//! executor checks it against the leader key in etcd before it runs anything,
//! so a scheduler that lost its leadership without noticing (paused, cut off
//! from etcd) cannot start a run.

use std::{
    collections::BTreeMap,
    future::Future,
    str::FromStr,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, TimeZone, Utc};
use etcd_client::Client;
use meshkit_proto::scheduler::{
    Fence as FenceMsg, ListHandlersRequest, ListHandlersResponse, RunJobRequest, RunJobResponse,
    job_executor_server::{JobExecutor, JobExecutorServer},
};
use tonic::{Request, Response, Status};

use crate::{config::JobSpec, ownership::Fence};

/// The slot group the scheduler instances elect their leader in.
pub const LEADER_GROUP: &str = "scheduler";

/// The etcd key the leading scheduler holds; its create revision is the fencing token.
pub fn leader_key(prefix: &str) -> String {
    format!("{prefix}/groups/{LEADER_GROUP}/owners/0")
}

/// The registry name executors register under.
pub const EXECUTOR_SERVICE: &str = "meshkit.scheduler.v1.JobExecutor";

/// When a job fires: a cron expression read in a time zone, or a fixed rate.
/// Slots are instants in milliseconds since the epoch; every scheduler
/// computes the same slots, so a slot names one firing across leaders.
#[derive(Debug, Clone)]
pub enum Schedule {
    Cron {
        cron: Box<cron::Schedule>,
        tz: chrono_tz::Tz,
    },
    /// Slots at every multiple of this many milliseconds.
    Every(u64),
}

impl Schedule {
    /// Reads a job's schedule; the error names the setting and the problem.
    pub fn from_spec(job: &JobSpec) -> Result<Self, (&'static str, String)> {
        let tz = chrono_tz::Tz::from_str(&job.time_zone)
            .map_err(|_| ("time_zone", format!("{:?} is not an IANA time zone like Asia/Shanghai", job.time_zone)))?;
        let schedule = match (job.cron.trim().is_empty(), job.every_ms) {
            (true, 0) => return Err(("cron", "set cron or every_ms".into())),
            (false, n) if n > 0 => return Err(("every_ms", "set cron or every_ms, not both".into())),
            (true, n) if n < 100 => return Err(("every_ms", format!("{n} is below 100"))),
            (true, n) => Schedule::Every(n),
            (false, _) => {
                let fields = job.cron.split_whitespace().count();
                if !(6..=7).contains(&fields) {
                    return Err((
                        "cron",
                        format!(
                            "{:?} has {fields} fields; expected sec min hour day-of-month month day-of-week [year]",
                            job.cron
                        ),
                    ));
                }
                let cron = cron::Schedule::from_str(&job.cron)
                    .map_err(|e| ("cron", format!("{:?} is not a cron expression: {e}", job.cron)))?;
                Schedule::Cron { cron: Box::new(cron), tz }
            }
        };
        if schedule.next_after(Utc::now().timestamp_millis()).is_none() {
            return Err(("cron", format!("{:?} never fires again", job.cron)));
        }
        Ok(schedule)
    }

    /// The first slot strictly after `after_ms`, or none if it never fires again.
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        match self {
            Schedule::Every(every) => {
                let every = i64::try_from(*every).ok()?;
                Some((after_ms.div_euclid(every) + 1) * every)
            }
            Schedule::Cron { cron, tz } => {
                let after = tz.timestamp_millis_opt(after_ms).single()?;
                cron.after(&after).next().map(|t| t.timestamp_millis())
            }
        }
    }
}

/// Formats a slot for people (RFC 3339, UTC).
pub fn format_slot(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).map(|t| t.to_rfc3339()).unwrap_or_else(|| ms.to_string())
}

/// What a handler is told about the run it does.
#[derive(Debug, Clone)]
pub struct JobContext {
    pub run_id: String,
    pub job: String,
    pub param: String,
    /// This run's shard: `0 ≤ shard_index < shard_total`.
    pub shard_index: u32,
    pub shard_total: u32,
    pub attempt: u32,
    /// The slot that fired, in milliseconds since the epoch.
    pub scheduled_ms: i64,
    /// The scheduler instance that sent the trigger.
    pub leader: String,
}

/// A job handler: `Ok` carries what it reports, `Err` why it failed.
#[tonic::async_trait]
pub trait JobHandler: Send + Sync + 'static {
    async fn run(&self, ctx: JobContext) -> Result<String, String>;
}

struct FnHandler<F>(F);

#[tonic::async_trait]
impl<F, Fut> JobHandler for FnHandler<F>
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, String>> + Send + 'static,
{
    async fn run(&self, ctx: JobContext) -> Result<String, String> {
        (self.0)(ctx).await
    }
}

/// A process's job handlers, served as `JobExecutor`.
#[derive(Clone)]
pub struct Executor {
    handlers: BTreeMap<String, Arc<dyn JobHandler>>,
    etcd: Client,
    leader_key: String,
    /// The newest fence seen: an older one is refused without asking etcd.
    newest: Arc<Mutex<Option<Fence>>>,
}

impl Executor {
    /// An executor that checks fences against the leader key under `prefix` (`etcd.prefix`).
    pub fn new(etcd: Client, prefix: &str) -> Self {
        Self { handlers: BTreeMap::new(), etcd, leader_key: leader_key(prefix), newest: Arc::new(Mutex::new(None)) }
    }

    /// Adds a handler under `name`.
    pub fn handler(mut self, name: impl Into<String>, handler: impl JobHandler) -> Self {
        self.handlers.insert(name.into(), Arc::new(handler));
        self
    }

    /// Adds an async closure as the handler `name`.
    pub fn handler_fn<F, Fut>(self, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, String>> + Send + 'static,
    {
        self.handler(name, FnHandler(f))
    }

    /// The gRPC service to add to a [`MeshServer`](crate::MeshServer).
    pub fn into_service(self) -> JobExecutorServer<Self> {
        JobExecutorServer::new(self)
    }

    /// Refuses a fence older than one seen, then asks etcd (a linearizable
    /// read) whether it is the current leader's.
    async fn check_fence(&self, fence: Fence) -> Result<(), Status> {
        let stale = |current: String| {
            Status::failed_precondition(format!(
                "fencing token {} is stale: the scheduler that sent it no longer leads ({current})",
                fence.revision
            ))
        };
        if let Some(newest) = *self.newest.lock().unwrap_or_else(|p| p.into_inner()) {
            if newest.cluster_id == fence.cluster_id && fence.revision < newest.revision {
                return Err(stale(format!("a trigger with token {} came since", newest.revision)));
            }
        }
        let mut etcd = self.etcd.clone();
        let resp = tokio::time::timeout(Duration::from_secs(3), etcd.get(self.leader_key.as_str(), None))
            .await
            .map_err(|_| Status::unavailable("cannot check the fencing token: etcd did not answer in 3 s"))?
            .map_err(|e| Status::unavailable(format!("cannot check the fencing token: etcd: {e}")))?;
        let cluster_id = resp.header().map(|h| h.cluster_id()).unwrap_or(0);
        match resp.kvs().first() {
            None => return Err(stale("no scheduler leads now".into())),
            Some(kv) if kv.create_revision() != fence.revision || cluster_id != fence.cluster_id => {
                return Err(stale(format!("the leader's token is {}", kv.create_revision())));
            }
            Some(_) => {}
        }
        let mut newest = self.newest.lock().unwrap_or_else(|p| p.into_inner());
        if newest.is_none_or(|n| n.cluster_id != fence.cluster_id || n.revision < fence.revision) {
            *newest = Some(fence);
        }
        Ok(())
    }
}

fn count(handler: &str, outcome: &'static str) {
    crate::metrics::counter(
        "meshkit_job_executions_total",
        "Job runs this executor was asked for, by handler and outcome (succeeded, failed, timed_out, refused).",
        &[("handler", handler), ("outcome", outcome)],
    )
    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

#[tonic::async_trait]
impl JobExecutor for Executor {
    async fn run_job(&self, request: Request<RunJobRequest>) -> Result<Response<RunJobResponse>, Status> {
        let req = request.into_inner();
        let Some(handler) = self.handlers.get(&req.handler) else {
            count("unknown", "refused");
            return Err(Status::not_found(format!(
                "no job handler {:?} here; this executor runs: {}",
                req.handler,
                self.handlers.keys().cloned().collect::<Vec<_>>().join(", ")
            )));
        };
        let Some(FenceMsg { cluster_id, revision }) = req.fence else {
            count(&req.handler, "refused");
            return Err(Status::invalid_argument("fence: a trigger must carry the leader's fencing token"));
        };
        if req.shard_total == 0 || req.shard_index >= req.shard_total {
            count(&req.handler, "refused");
            return Err(Status::invalid_argument(format!(
                "shard {} of {} is not a shard: 0 <= shard_index < shard_total",
                req.shard_index, req.shard_total
            )));
        }
        if let Err(status) = self.check_fence(Fence { cluster_id, revision }).await {
            count(&req.handler, "refused");
            tracing::warn!(
                job = req.job,
                run = req.run_id,
                leader = req.leader,
                "trigger refused: {}",
                status.message()
            );
            return Err(status);
        }
        let ctx = JobContext {
            run_id: req.run_id,
            job: req.job.clone(),
            param: req.param,
            shard_index: req.shard_index,
            shard_total: req.shard_total,
            attempt: req.attempt,
            scheduled_ms: req.scheduled_time.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000).unwrap_or(0),
            leader: req.leader,
        };
        tracing::info!(
            job = ctx.job,
            run = ctx.run_id,
            shard = ctx.shard_index,
            of = ctx.shard_total,
            "job run starts"
        );
        let run = handler.run(ctx);
        let result = match crate::deadline::current() {
            Some(deadline) => match tokio::time::timeout_at(deadline, run).await {
                Ok(r) => r,
                Err(_) => {
                    count(&req.handler, "timed_out");
                    return Err(Status::deadline_exceeded(format!("job {} ran past its timeout", req.job)));
                }
            },
            None => run.await,
        };
        match result {
            Ok(output) => {
                count(&req.handler, "succeeded");
                Ok(Response::new(RunJobResponse { output }))
            }
            Err(e) => {
                count(&req.handler, "failed");
                Err(Status::unknown(format!("job {} failed: {e}", req.job)))
            }
        }
    }

    async fn list_handlers(
        &self,
        _request: Request<ListHandlersRequest>,
    ) -> Result<Response<ListHandlersResponse>, Status> {
        Ok(Response::new(ListHandlersResponse { handlers: self.handlers.keys().cloned().collect() }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(cron: &str, tz: &str, every_ms: u64) -> JobSpec {
        JobSpec { cron: cron.into(), time_zone: tz.into(), every_ms, ..JobSpec::default() }
    }

    fn ms(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).map(|t| t.timestamp_millis()).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn cron_with_seconds_fires_on_its_slots_in_its_time_zone() {
        let every5 = Schedule::from_spec(&job("0/5 * * * * *", "UTC", 0)).unwrap();
        assert_eq!(every5.next_after(ms("2026-01-01T00:00:00Z")), Some(ms("2026-01-01T00:00:05Z")), "strictly after");
        assert_eq!(every5.next_after(ms("2026-01-01T00:00:03.500Z")), Some(ms("2026-01-01T00:00:05Z")));
        // 02:00 every day in Shanghai (UTC+8) is 18:00 UTC the day before.
        let daily = Schedule::from_spec(&job("0 0 2 * * *", "Asia/Shanghai", 0)).unwrap();
        assert_eq!(daily.next_after(ms("2026-03-01T12:00:00Z")), Some(ms("2026-03-01T18:00:00Z")));
        // Weekdays only: Saturday 2026-03-07 → Monday 2026-03-09.
        let weekdays = Schedule::from_spec(&job("0 30 9 * * MON-FRI", "UTC", 0)).unwrap();
        assert_eq!(weekdays.next_after(ms("2026-03-06T10:00:00Z")), Some(ms("2026-03-09T09:30:00Z")));
    }

    #[test]
    fn fixed_rate_slots_are_multiples_of_the_period() {
        let every = Schedule::from_spec(&job("", "UTC", 1500)).unwrap();
        assert_eq!(every.next_after(0), Some(1500));
        assert_eq!(every.next_after(1499), Some(1500));
        assert_eq!(every.next_after(1500), Some(3000));
    }

    #[test]
    fn bad_schedules_are_refused_naming_the_setting() {
        let err = |j: JobSpec| Schedule::from_spec(&j).expect_err("must be refused");
        assert_eq!(err(job("", "UTC", 0)).0, "cron");
        assert_eq!(err(job("* * * * *", "UTC", 0)).0, "cron", "five fields: seconds are required");
        assert!(err(job("* * * * *", "UTC", 0)).1.contains("has 5 fields"));
        assert_eq!(err(job("0 0 25 * * *", "UTC", 0)).0, "cron");
        assert_eq!(err(job("0 0 1 * * * 2001", "UTC", 0)).1, "\"0 0 1 * * * 2001\" never fires again");
        assert_eq!(err(job("0 * * * * *", "Mars/Olympus", 0)).0, "time_zone");
        assert_eq!(err(job("0 * * * * *", "UTC", 1000)).0, "every_ms");
        assert_eq!(err(job("", "UTC", 10)).0, "every_ms");
    }
}
