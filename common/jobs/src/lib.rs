//! Jobs on the executor side: how a process runs them ([`Executor`], the
//! `JobExecutor` gRPC service). When they fire is the scheduler's business
//! (`services/scheduler`).
//!
//! The scheduler (`services/scheduler`) decides when a job fires and which
//! executors run it; any meshkit process becomes an executor by adding
//! [`Executor::into_service`] to its server with handlers by name. Every
//! trigger carries the leader's [`Fence`](meshkit_registry::ownership::Fence); an
//! executor checks it against the leader key in etcd before it runs anything,
//! so a scheduler that lost its leadership without noticing (paused, cut off
//! from etcd) cannot start a run.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{Arc, LazyLock, Mutex},
    time::Duration,
};

use chrono::{DateTime, Utc};
use etcd_client::Client;
use meshkit_proto::scheduler::{
    Fence as FenceMsg, ListHandlersRequest, ListHandlersResponse, RunJobRequest, RunJobResponse,
    job_executor_server::{JobExecutor, JobExecutorServer},
};
use meshkit_telemetry::metrics::{self, CounterFamily};
use prometheus_client::encoding::EncodeLabelSet;
use tonic::{Request, Response, Status};

use meshkit_registry::ownership::Fence;

/// The slot group the scheduler instances elect their leader in.
pub const LEADER_GROUP: &str = "scheduler";

/// The etcd key the leading scheduler holds; its create revision is the fencing token.
pub fn leader_key(prefix: &str) -> String {
    meshkit_registry::keys::slot_owner(prefix, LEADER_GROUP, 0)
}

/// The registry name executors register under: the contract's service name.
pub const EXECUTOR_SERVICE: &str = meshkit_proto::scheduler::job_executor_server::SERVICE_NAME;

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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExecutionLabels {
    handler: String,
    outcome: &'static str,
}

/// `meshkit_job_executions_total{handler, outcome}`.
static EXECUTIONS: LazyLock<CounterFamily<ExecutionLabels>> = LazyLock::new(|| {
    metrics::counters(
        "meshkit_job_executions",
        "Job runs this executor was asked for, by handler and outcome (succeeded, failed, timed_out, refused).",
    )
});

fn count(handler: &str, outcome: &'static str) {
    EXECUTIONS.get_or_create(&ExecutionLabels { handler: handler.to_owned(), outcome }).inc();
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
        let result = match meshkit_base::deadline::current() {
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
    #[test]
    fn the_leader_key_is_the_scheduler_groups_one_slot() {
        assert_eq!(super::leader_key("/meshkit"), "/meshkit/groups/scheduler/owners/0");
        assert_eq!(super::EXECUTOR_SERVICE, "meshkit.scheduler.v1.JobExecutor");
        assert_eq!(super::format_slot(1_500), "1970-01-01T00:00:01.500+00:00");
    }
}
