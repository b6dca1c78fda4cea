//! `meshkit.scheduler.v1.JobScheduler`: jobs, manual triggers, pause and
//! resume, the job log. Any instance answers; a trigger sent to a follower is
//! passed on to the leader.

use std::sync::Arc;

use etcd_client::Client;
use meshkit_common::{
    config_center::config_prefix,
    jobs::leader_key,
    registry::{Instance, instance_key},
    time::{now_ms, timestamp},
};
use meshkit_proto::scheduler::{
    Fence as FenceMsg, Job, ListJobsRequest, ListJobsResponse, ListRunsRequest, ListRunsResponse, PauseJobRequest,
    ResumeJobRequest, RouteStrategy, Run, TriggerJobRequest, TriggerJobResponse, TriggerKind,
    job_scheduler_client::JobSchedulerClient, job_scheduler_server::JobScheduler,
};
use tonic::{Request, Response, Status};

use crate::{
    COMPONENT, SCHEDULER_SERVICE,
    entity::run,
    schedule::Schedule,
    scheduler::{Scheduler, Trigger},
    settings::{JOB_ROUTES, JobSpec},
};

/// Set on a trigger passed on to the leader, so it is not passed on again.
const FORWARDED: &str = "x-meshkit-forwarded-by";

pub struct SchedulerApi {
    scheduler: Arc<Scheduler>,
    etcd: Client,
    prefix: String,
    tls: Option<Arc<meshkit_common::tls::Tls>>,
}

impl SchedulerApi {
    pub fn new(
        scheduler: Arc<Scheduler>,
        etcd: Client,
        prefix: String,
        tls: Option<Arc<meshkit_common::tls::Tls>>,
    ) -> Self {
        Self { scheduler, etcd, prefix, tls }
    }

    fn job(&self, name: &str) -> Result<JobSpec, Status> {
        let settings = self.scheduler.settings.borrow();
        settings.jobs.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = settings.jobs.keys().map(String::as_str).collect();
            Status::not_found(format!("no job {name:?}; defined jobs: [{}]", known.join(", ")))
        })
    }

    /// The leader's instance id and fence, from etcd.
    async fn leader(&self) -> Result<Option<(String, FenceMsg)>, Status> {
        let mut etcd = self.etcd.clone();
        let resp = etcd
            .get(leader_key(&self.prefix), None)
            .await
            .map_err(|e| Status::unavailable(format!("cannot read the leader from etcd: {e}")))?;
        let cluster_id = resp.header().map(|h| h.cluster_id()).unwrap_or(0);
        Ok(resp.kvs().first().map(|kv| {
            (String::from_utf8_lossy(kv.value()).into_owned(), FenceMsg { cluster_id, revision: kv.create_revision() })
        }))
    }

    async fn set_paused(&self, name: &str, paused: bool) -> Result<Job, Status> {
        let mut spec = self.job(name)?;
        let key = format!("{}scheduler.jobs.{name}.paused", config_prefix(&self.prefix, COMPONENT));
        let mut etcd = self.etcd.clone();
        etcd.put(key, if paused { "true" } else { "false" }, None)
            .await
            .map_err(|e| Status::unavailable(format!("cannot write the job's state to etcd: {e}")))?;
        tracing::info!(job = name, paused, "job paused or resumed");
        spec.paused = paused;
        let last = self.scheduler.log.last_run(name).await.ok().flatten();
        Ok(job_message(name, &spec, None, last.as_ref()))
    }

    async fn forward(&self, request: TriggerJobRequest) -> Result<Response<TriggerJobResponse>, Status> {
        let no_leader = || Status::unavailable("no scheduler instance leads right now; try again in a few seconds");
        let Some((leader, _)) = self.leader().await? else { return Err(no_leader()) };
        let mut etcd = self.etcd.clone();
        let key = instance_key(&self.prefix, SCHEDULER_SERVICE, &leader);
        let resp = etcd.get(key, None).await.map_err(|e| Status::unavailable(format!("etcd: {e}")))?;
        let Some(instance) = resp.kvs().first().and_then(|kv| serde_json::from_slice::<Instance>(kv.value()).ok())
        else {
            return Err(no_leader());
        };
        let channel = meshkit_common::tls::connect(&instance.addr, self.tls.clone())
            .await
            .map_err(|e| Status::unavailable(format!("cannot reach the leader {leader} at {}: {e}", instance.addr)))?;
        let mut forwarded = Request::new(request);
        if let Ok(me) = self.scheduler.instance.parse() {
            forwarded.metadata_mut().insert(FORWARDED, me);
        }
        JobSchedulerClient::new(channel).trigger_job(forwarded).await
    }
}

fn route(name: &str) -> RouteStrategy {
    match JOB_ROUTES.iter().position(|r| *r == name) {
        Some(i) => RouteStrategy::try_from(i as i32 + 1).unwrap_or(RouteStrategy::Unspecified),
        None => RouteStrategy::Unspecified,
    }
}

fn ms_timestamp(ms: i64) -> prost_types::Timestamp {
    timestamp(ms * 1000)
}

fn job_message(name: &str, spec: &JobSpec, next: Option<i64>, last: Option<&run::Model>) -> Job {
    Job {
        name: name.to_owned(),
        cron: spec.cron.clone(),
        time_zone: spec.time_zone.clone(),
        every_ms: spec.every_ms,
        target: spec.target.clone(),
        handler: spec.handler.clone(),
        param: spec.param.clone(),
        route: route(&spec.route) as i32,
        shards: spec.shards,
        timeout_ms: spec.timeout_ms,
        retries: spec.retries,
        misfire: spec.misfire.clone(),
        paused: spec.paused,
        next_fire_time: if spec.paused { None } else { next.map(ms_timestamp) },
        last_status: last.map_or(0, |r| r.status),
        last_fire_time: last.map(|r| ms_timestamp(r.scheduled_ms)),
    }
}

fn run_message(r: run::Model) -> Run {
    Run {
        id: r.id,
        job: r.job,
        trigger: r.trigger,
        scheduled_time: Some(ms_timestamp(r.scheduled_ms)),
        shard_index: r.shard_index as u32,
        shard_total: r.shard_total as u32,
        attempt: r.attempt as u32,
        executor: r.executor,
        executor_addr: r.executor_addr,
        status: r.status,
        message: r.message,
        leader: r.leader,
        fence: r.fence,
        start_time: Some(ms_timestamp(r.start_ms)),
        end_time: (r.end_ms > 0).then(|| ms_timestamp(r.end_ms)),
        trace_id: r.trace_id,
    }
}

fn db_error(e: sea_orm::DbErr) -> Status {
    Status::unavailable(format!("job log: {e}"))
}

#[tonic::async_trait]
impl JobScheduler for SchedulerApi {
    async fn list_jobs(&self, _request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let jobs = self.scheduler.settings.borrow().jobs.clone();
        let planned = self.scheduler.next.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let now = now_ms();
        let mut out = Vec::with_capacity(jobs.len());
        for (name, spec) in &jobs {
            let next =
                planned.get(name).copied().or_else(|| Schedule::from_spec(spec).ok().and_then(|s| s.next_after(now)));
            let last = self.scheduler.log.last_run(name).await.map_err(db_error)?;
            out.push(job_message(name, spec, next, last.as_ref()));
        }
        let (leader, fence) = match self.leader().await? {
            Some((leader, fence)) => (leader, Some(fence)),
            None => (String::new(), None),
        };
        Ok(Response::new(ListJobsResponse { jobs: out, leader, fence }))
    }

    async fn trigger_job(&self, request: Request<TriggerJobRequest>) -> Result<Response<TriggerJobResponse>, Status> {
        let forwarded = request.metadata().contains_key(FORWARDED);
        let req = request.into_inner();
        let spec = self.job(&req.name)?;
        let Some(fence) = self.scheduler.fence() else {
            if forwarded {
                return Err(Status::unavailable("the leader changed while the trigger was passed on; try again"));
            }
            return self.forward(req).await;
        };
        let scheduled_ms = now_ms();
        let param = req.param.unwrap_or_else(|| spec.param.clone());
        let trigger = Trigger { job: req.name.clone(), spec, scheduled_ms, kind: TriggerKind::Manual, param };
        let (run_ids, _) = self.scheduler.start(trigger, fence).await?;
        tracing::info!(job = req.name, runs = run_ids.len(), "job triggered by hand");
        Ok(Response::new(TriggerJobResponse { run_ids, scheduled_time: Some(ms_timestamp(scheduled_ms)) }))
    }

    async fn pause_job(&self, request: Request<PauseJobRequest>) -> Result<Response<Job>, Status> {
        self.set_paused(&request.into_inner().name, true).await.map(Response::new)
    }

    async fn resume_job(&self, request: Request<ResumeJobRequest>) -> Result<Response<Job>, Status> {
        self.set_paused(&request.into_inner().name, false).await.map(Response::new)
    }

    async fn list_runs(&self, request: Request<ListRunsRequest>) -> Result<Response<ListRunsResponse>, Status> {
        let req = request.into_inner();
        // scheduler.proto's rules (page_size 0 to 1000, a UUID token) were
        // checked by the server before this handler ran.
        let size = if req.page_size == 0 { 50 } else { req.page_size as u64 };
        let token = (!req.page_token.is_empty()).then_some(req.page_token.as_str());
        let job = (!req.job.is_empty()).then_some(req.job.as_str());
        let mut rows = self.scheduler.log.runs(job, size + 1, token).await.map_err(db_error)?;
        let next_page_token = if rows.len() as u64 > size {
            rows.truncate(size as usize);
            rows.last().map(|r| r.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(ListRunsResponse { runs: rows.into_iter().map(run_message).collect(), next_page_token }))
    }
}
