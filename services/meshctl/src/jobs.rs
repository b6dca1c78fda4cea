//! `meshctl jobs`: the scheduler's jobs, triggers, pauses and history.

use std::fmt::Write as _;

use anyhow::bail;
use etcd_client::Client;
use meshkit_proto::scheduler::{
    Job, ListJobsRequest, ListRunsRequest, PauseJobRequest, ResumeJobRequest, RouteStrategy, RunStatus,
    TriggerJobRequest, TriggerKind, job_scheduler_client::JobSchedulerClient,
};

use crate::{SCHEDULER_SERVICE, registry::registrations, settings::client_tls};

/// A connection to a scheduler instance found in the registry (the first that answers).
async fn scheduler(client: &mut Client, prefix: &str) -> anyhow::Result<JobSchedulerClient<tonic::transport::Channel>> {
    let instances = registrations(client, prefix, Some(SCHEDULER_SERVICE)).await?;
    let tls = client_tls()?;
    let mut last_error = None;
    for instance in instances.iter().filter_map(|r| r.instance.as_ref()) {
        match meshkit_common::tls::connect(&instance.addr, tls.clone()).await {
            Ok(channel) => return Ok(JobSchedulerClient::new(channel)),
            Err(e) => last_error = Some(format!("{}: {e}", instance.addr)),
        }
    }
    match last_error {
        Some(e) => bail!("no scheduler instance answers (last tried {e})"),
        None => bail!("no scheduler instance is registered ({SCHEDULER_SERVICE} under {prefix}/services/)"),
    }
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// A protobuf time in ms since the Unix epoch.
pub fn ms_of(t: Option<&prost_types::Timestamp>) -> Option<i64> {
    t.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// A protobuf time as the job log writes slots, or `-`.
pub fn when(t: Option<&prost_types::Timestamp>) -> String {
    ms_of(t).map_or_else(|| "-".into(), meshkit_common::jobs::format_slot)
}

pub fn run_status(status: i32) -> &'static str {
    match RunStatus::try_from(status) {
        Ok(RunStatus::Running) => "running",
        Ok(RunStatus::Succeeded) => "succeeded",
        Ok(RunStatus::Failed) => "failed",
        Ok(RunStatus::Skipped) => "skipped",
        _ => "-",
    }
}

fn job_line(out: &mut String, job: &Job) {
    let schedule = if job.every_ms > 0 {
        format!("every {} ms", job.every_ms)
    } else {
        format!("cron {:?} {}", job.cron, job.time_zone)
    };
    let route = RouteStrategy::try_from(job.route)
        .map(|r| r.as_str_name().trim_start_matches("ROUTE_STRATEGY_").to_lowercase())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "{}  {schedule}  {}/{}  route={route}{}  retries={} timeout_ms={}  {}  next={}  last={} {}",
        job.name,
        job.target,
        job.handler,
        if job.shards > 0 { format!(" shards={}", job.shards) } else { String::new() },
        job.retries,
        job.timeout_ms,
        if job.paused { "PAUSED" } else { "active" },
        when(job.next_fire_time.as_ref()),
        when(job.last_fire_time.as_ref()),
        run_status(job.last_status),
    );
}

/// `jobs list`: every job, its state, and who leads.
pub async fn jobs_list(client: &mut Client, prefix: &str) -> anyhow::Result<String> {
    let resp = scheduler(client, prefix).await?.list_jobs(ListJobsRequest {}).await.map_err(status_error)?;
    let resp = resp.into_inner();
    let mut out = String::new();
    match (&resp.leader, &resp.fence) {
        (l, Some(f)) if !l.is_empty() => {
            let _ = writeln!(out, "leader: {l} (fencing token {})", f.revision);
        }
        _ => {
            let _ = writeln!(out, "leader: none");
        }
    }
    if resp.jobs.is_empty() {
        let _ = writeln!(out, "no jobs defined (scheduler.jobs.NAME in the config center)");
    }
    for job in &resp.jobs {
        job_line(&mut out, job);
    }
    Ok(out)
}

/// Triggers a job now (with `param` instead of its own), recorded in the
/// audit log as made by `by`; the runs it started.
pub async fn trigger_job(
    client: &mut Client,
    prefix: &str,
    name: &str,
    param: Option<&str>,
    by: &str,
) -> anyhow::Result<Vec<String>> {
    let request = TriggerJobRequest { name: name.to_owned(), param: param.map(str::to_owned) };
    let resp = scheduler(client, prefix).await?.trigger_job(request).await.map_err(status_error)?.into_inner();
    let detail = match param {
        Some(p) => format!("param {p:?}: run {}", resp.run_ids.join(", ")),
        None => format!("run {}", resp.run_ids.join(", ")),
    };
    audit(client, prefix, by, "job trigger", name, detail).await?;
    Ok(resp.run_ids)
}

/// `jobs trigger NAME [PARAM]`.
pub async fn jobs_trigger(
    client: &mut Client,
    prefix: &str,
    name: &str,
    param: Option<&str>,
    by: &str,
) -> anyhow::Result<String> {
    let runs = trigger_job(client, prefix, name, param, by).await?;
    Ok(format!("triggered {name}: run {}\n", runs.join(", ")))
}

/// Pauses or resumes a job, recorded in the audit log; the job as it is now.
pub async fn pause_job(client: &mut Client, prefix: &str, name: &str, pause: bool, by: &str) -> anyhow::Result<Job> {
    let mut scheduler = scheduler(client, prefix).await?;
    let job = if pause {
        scheduler.pause_job(PauseJobRequest { name: name.to_owned() }).await
    } else {
        scheduler.resume_job(ResumeJobRequest { name: name.to_owned() }).await
    }
    .map_err(status_error)?
    .into_inner();
    audit(client, prefix, by, if pause { "job pause" } else { "job resume" }, name, String::new()).await?;
    Ok(job)
}

async fn audit(
    client: &mut Client,
    prefix: &str,
    by: &str,
    action: &str,
    target: &str,
    detail: String,
) -> anyhow::Result<()> {
    let entry = meshkit_common::history::AuditEntry::new(by, action, target, detail);
    meshkit_common::history::audit(client, prefix, &entry)
        .await
        .map(|_| ())
        .map_err(|e| anyhow::anyhow!("done, but its audit entry was not written: {e}"))
}

/// The jobs and who leads: the scheduler's `ListJobs`.
pub async fn list_jobs(
    client: &mut Client,
    prefix: &str,
) -> anyhow::Result<meshkit_proto::scheduler::ListJobsResponse> {
    Ok(scheduler(client, prefix).await?.list_jobs(ListJobsRequest {}).await.map_err(status_error)?.into_inner())
}

/// The job log, newest first (of one job, or of all when `job` is empty).
pub async fn list_runs(
    client: &mut Client,
    prefix: &str,
    job: &str,
    limit: i32,
) -> anyhow::Result<Vec<meshkit_proto::scheduler::Run>> {
    let request = ListRunsRequest { job: job.to_owned(), page_size: limit, page_token: String::new() };
    Ok(scheduler(client, prefix).await?.list_runs(request).await.map_err(status_error)?.into_inner().runs)
}

/// `jobs pause NAME` / `jobs resume NAME`.
pub async fn jobs_pause(
    client: &mut Client,
    prefix: &str,
    name: &str,
    pause: bool,
    by: &str,
) -> anyhow::Result<String> {
    let job = pause_job(client, prefix, name, pause, by).await?;
    let mut out = String::new();
    job_line(&mut out, &job);
    Ok(out)
}

/// `jobs history [NAME] [--limit N]`: the job log, newest first.
pub async fn jobs_history(client: &mut Client, prefix: &str, job: Option<&str>, limit: i32) -> anyhow::Result<String> {
    let request =
        ListRunsRequest { job: job.unwrap_or_default().to_owned(), page_size: limit, page_token: String::new() };
    let resp = scheduler(client, prefix).await?.list_runs(request).await.map_err(status_error)?.into_inner();
    let mut out = String::new();
    let _ = writeln!(out, "RUN  JOB  TRIGGER  SLOT  SHARD  ATTEMPT  EXECUTOR  STATUS  TOOK  MESSAGE");
    for run in &resp.runs {
        let took = match (ms_of(run.start_time.as_ref()), ms_of(run.end_time.as_ref())) {
            (Some(s), Some(e)) => format!("{} ms", e - s),
            _ => "-".into(),
        };
        let trigger = TriggerKind::try_from(run.trigger)
            .map(|t| t.as_str_name().trim_start_matches("TRIGGER_KIND_").to_lowercase())
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{}  {}  {trigger}  {}  {}/{}  {}  {}  {}  {took}  {}",
            run.id,
            run.job,
            when(run.scheduled_time.as_ref()),
            run.shard_index,
            run.shard_total,
            run.attempt,
            if run.executor.is_empty() { "-" } else { &run.executor },
            run_status(run.status),
            run.message.replace('\n', " "),
        );
    }
    Ok(out)
}
