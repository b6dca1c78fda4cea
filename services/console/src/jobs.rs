//! The Jobs page: the scheduler's jobs (trigger with a parameter, pause,
//! resume) and its run log, each shard's run with its executor, status,
//! output or error, and a link to the run's trace.

use std::fmt::Write as _;

use axum::{
    Form,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
};
use meshkit_meshctl as ops;
use meshkit_proto::scheduler::{Job, RouteStrategy, Run, RunStatus, TriggerKind};
use serde::Deserialize;

use crate::{
    App,
    html::{Notice, csrf_field, esc, may_change, q},
    pages::{Shared, Signed, html, refusal, said},
    session::Session,
};

/// Runs shown, newest first.
const RUNS: i32 = 100;

#[derive(Debug, Default, Deserialize)]
pub struct JobsQuery {
    #[serde(default)]
    said: Option<String>,
    /// Only this job's runs.
    #[serde(default)]
    job: String,
}

pub async fn page(State(app): Shared, Signed(s, _): Signed, Query(query): Query<JobsQuery>) -> Response {
    view(&app, &s, &query.job, said(&query.said), StatusCode::OK).await
}

fn schedule(job: &Job) -> String {
    if job.every_ms > 0 { format!("every {} ms", job.every_ms) } else { format!("{} ({})", job.cron, job.time_zone) }
}

async fn view(app: &App, s: &Session, only: &str, mut notices: Vec<Notice>, status: StatusCode) -> Response {
    let prefix = app.etcd.prefix.clone();
    let read = with_etcd!(app, |c| {
        let jobs = ops::list_jobs(c, &prefix).await?;
        let runs = ops::list_runs(c, &prefix, only, RUNS).await?;
        Ok((jobs, runs))
    });
    let (jobs, runs) = match read {
        Ok(r) => r,
        Err((code, notice)) => {
            notices.push(notice);
            return html(code, crate::html::page("Jobs", "/jobs", Some(s), &notices, ""));
        }
    };
    let mut body = String::new();
    let _ = write!(
        body,
        "<p class=\"muted\">Leader: {}.</p>",
        match (&jobs.leader, &jobs.fence) {
            (l, Some(f)) if !l.is_empty() =>
                format!("<span class=\"mono\">{}</span> (fencing token {})", esc(l), f.revision),
            _ => "none".into(),
        }
    );
    body.push_str(
        "<table class=\"jobs\"><tr><th>Job</th><th>Schedule</th><th>Runs on</th><th>Route</th><th>State</th><th>Next</th>\
         <th>Last</th>",
    );
    if may_change(s) {
        body.push_str("<th>Change</th>");
    }
    body.push_str("</tr>");
    if jobs.jobs.is_empty() {
        body.push_str(
            "<tr><td colspan=\"8\" class=\"muted\">No job is defined (scheduler.jobs.NAME in the config center).</td></tr>",
        );
    }
    for job in &jobs.jobs {
        let route = RouteStrategy::try_from(job.route)
            .map(|r| r.as_str_name().trim_start_matches("ROUTE_STRATEGY_").to_lowercase())
            .unwrap_or_default();
        let shards = if job.shards > 0 { format!(", {} shards", job.shards) } else { String::new() };
        let _ = write!(
            body,
            "<tr data-job=\"{name}\"><td><a href=\"/jobs?job={}\">{name}</a></td><td>{}</td><td class=\"mono\">{}/{}</td>\
             <td>{}{shards}</td><td class=\"job-state\">{}</td><td>{}</td><td>{} {}</td>",
            q(&job.name),
            esc(&schedule(job)),
            esc(&job.target),
            esc(&job.handler),
            esc(&route),
            if job.paused { "paused" } else { "active" },
            esc(&ops::when(job.next_fire_time.as_ref())),
            esc(&ops::when(job.last_fire_time.as_ref())),
            ops::run_status(job.last_status),
            name = esc(&job.name),
        );
        if may_change(s) {
            let hidden = format!("{}<input type=\"hidden\" name=\"job\" value=\"{}\">", csrf_field(s), esc(&job.name));
            let (action, label) = if job.paused { ("resume", "Resume") } else { ("pause", "Pause") };
            let _ = write!(
                body,
                "<td><form class=\"inline\" method=\"post\" action=\"/jobs/trigger\">{hidden}\
                 <input type=\"text\" name=\"param\" size=\"12\" placeholder=\"parameter\" aria-label=\"parameter\" value=\"{}\">\
                 <button class=\"trigger\">Trigger</button></form> \
                 <form class=\"inline\" method=\"post\" action=\"/jobs/pause\">{hidden}<input type=\"hidden\" name=\"action\" value=\"{action}\">\
                 <button class=\"quiet {action}\">{label}</button></form></td>",
                esc(&job.param)
            );
        }
        body.push_str("</tr>");
    }
    body.push_str("</table>");
    let _ = write!(
        body,
        "<h2>Run log{}</h2>",
        if only.is_empty() {
            String::new()
        } else {
            format!(" of {} <a class=\"quiet\" href=\"/jobs\">(all)</a>", esc(only))
        }
    );
    run_log(app, &mut body, &runs);
    html(status, crate::html::page("Jobs", "/jobs", Some(s), &notices, &body))
}

fn run_log(app: &App, body: &mut String, runs: &[Run]) {
    if runs.is_empty() {
        body.push_str("<p class=\"muted\">No run yet.</p>");
        return;
    }
    body.push_str(
        "<table class=\"runs\"><tr><th>Run</th><th>Job</th><th>Trigger</th><th>Slot (UTC)</th><th>Shard</th><th>Attempt</th>\
         <th>Executor</th><th>Status</th><th>Took</th><th>Output or error</th><th>Trace</th></tr>",
    );
    for run in runs {
        let took = match (ops::ms_of(run.start_time.as_ref()), ops::ms_of(run.end_time.as_ref())) {
            (Some(a), Some(b)) => format!("{} ms", b - a),
            _ => "-".into(),
        };
        let trigger = TriggerKind::try_from(run.trigger)
            .map(|t| t.as_str_name().trim_start_matches("TRIGGER_KIND_").to_lowercase())
            .unwrap_or_default();
        let failed = run.status == RunStatus::Failed as i32;
        let trace = match (run.trace_id.as_str(), app.settings.trace_link(&run.trace_id)) {
            ("", _) => "-".to_owned(),
            (t, Some(link)) => format!(
                "<a class=\"trace\" href=\"{}\" target=\"_blank\">{}</a>",
                esc(&link),
                esc(&t[..t.len().min(8)])
            ),
            (t, None) => format!("<span class=\"mono\">{}</span>", esc(&t[..t.len().min(8)])),
        };
        let _ = write!(
            body,
            "<tr data-run=\"{}\" data-job=\"{}\"><td class=\"mono\">{}</td><td>{}</td><td>{trigger}</td><td>{}</td><td class=\"num\">{}/{}</td>\
             <td class=\"num\">{}</td><td class=\"mono\">{}</td><td class=\"run-status run-{st}\">{st}</td><td class=\"num\">{took}</td>\
             <td class=\"{}\">{}</td><td>{trace}</td></tr>",
            esc(&run.id),
            esc(&run.job),
            esc(&run.id[..run.id.len().min(8)]),
            esc(&run.job),
            esc(&ops::when(run.scheduled_time.as_ref())),
            run.shard_index,
            run.shard_total,
            run.attempt,
            esc(if run.executor.is_empty() { "-" } else { &run.executor }),
            if failed { "error-text run-message" } else { "run-message" },
            esc(&run.message),
            st = ops::run_status(run.status),
        );
    }
    body.push_str("</table>");
}

#[derive(Debug, Default, Deserialize)]
pub struct TriggerForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    job: String,
    #[serde(default)]
    param: String,
}

pub async fn trigger(State(app): Shared, Signed(s, origin): Signed, Form(form): Form<TriggerForm>) -> Response {
    if let Some(refused) = refusal(&s, origin, &form.csrf) {
        return refused;
    }
    let (prefix, by) = (app.etcd.prefix.clone(), s.operator());
    let param = (!form.param.is_empty()).then_some(form.param.as_str());
    let done = with_etcd!(app, |c| ops::trigger_job(c, &prefix, &form.job, param, &by).await);
    match done {
        Ok(runs) => {
            let said = format!(
                "{} triggered: {} run{} started.",
                form.job,
                runs.len(),
                if runs.len() == 1 { "" } else { "s" }
            );
            Redirect::to(&format!("/jobs?job={}&said={}", q(&form.job), q(&said))).into_response()
        }
        Err((code, notice)) => view(&app, &s, "", vec![notice], code).await,
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct PauseForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    job: String,
    #[serde(default)]
    action: String,
}

pub async fn pause(State(app): Shared, Signed(s, origin): Signed, Form(form): Form<PauseForm>) -> Response {
    if let Some(refused) = refusal(&s, origin, &form.csrf) {
        return refused;
    }
    let pause = match form.action.as_str() {
        "pause" => true,
        "resume" => false,
        other => {
            let why = format!("{other:?} is not pause or resume: nothing was changed.");
            return view(&app, &s, "", vec![Notice::Error(why)], StatusCode::BAD_REQUEST).await;
        }
    };
    let (prefix, by) = (app.etcd.prefix.clone(), s.operator());
    let done = with_etcd!(app, |c| ops::pause_job(c, &prefix, &form.job, pause, &by).await);
    match done {
        Ok(job) => {
            let said = format!("{} is {}.", job.name, if job.paused { "paused" } else { "active again" });
            Redirect::to(&format!("/jobs?said={}", q(&said))).into_response()
        }
        Err((code, notice)) => view(&app, &s, "", vec![notice], code).await,
    }
}
