//! The Events page: each service's outbox relay, every consumed partition,
//! and the dead letters, each of which an admin can replay onto its topic
//! (applied exactly once: see `meshkit_events::dead_letters`).

use std::fmt::Write as _;

use axum::{
    Form,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Redirect, Response},
};
use meshkit_meshctl as ops;
use serde::Deserialize;

use crate::{
    App,
    governance::{processes, reports},
    html::{Notice, csrf_field, esc, may_change, q},
    pages::{Said, Shared, Signed, html, refusal, said},
    session::Session,
};

/// Dead letters shown, newest first.
const SHOWN: usize = 100;

pub async fn page(State(app): Shared, Signed(s, _): Signed, Query(query): Query<Said>) -> Response {
    view(&app, &s, said(&query.said), StatusCode::OK).await
}

fn utc(ms: i64) -> String {
    ops::utc(ms.max(0) as u64)
}

async fn view(app: &App, s: &Session, mut notices: Vec<Notice>, status: StatusCode) -> Response {
    let found = match processes(app).await {
        Ok(p) => p,
        Err((code, notice)) => {
            notices.push(notice);
            return html(code, crate::html::page("Events", "/events", Some(s), &notices, ""));
        }
    };
    let mut relays = String::new();
    let mut partitions = String::new();
    for p in &found {
        let report = match reports(app, &p.admin).await {
            Ok(r) => r,
            Err(e) => {
                let _ = write!(
                    relays,
                    "<tr><td class=\"mono\">{}</td><td colspan=\"4\" class=\"error\">{}</td></tr>",
                    esc(&p.id),
                    esc(&e)
                );
                continue;
            }
        };
        if let Some(r) = report.get("outbox_relay").map(ops::RelayRow::of) {
            let _ = write!(
                relays,
                "<tr data-instance=\"{id}\"><td class=\"mono\">{id}</td><td>{}</td><td class=\"{}\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{:.1}</td></tr>",
                esc(&p.component),
                if r.leading { "state-serving" } else { "muted" },
                if r.leading { "leads" } else { "stands by" },
                r.published,
                r.failures,
                r.last_lag_ms,
                id = esc(&p.id),
            );
        }
        for c in ops::PartitionRow::all(&report) {
            let _ = write!(
                partitions,
                "<tr data-topic=\"{topic}\" data-partition=\"{part}\"><td class=\"mono\">{topic}</td><td class=\"num\">{part}</td>\
                 <td class=\"mono\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num lag\">{}</td>\
                 <td class=\"num applied\">{}</td><td class=\"num duplicates\">{}</td><td class=\"num dead-lettered\">{}</td></tr>",
                esc(&p.id),
                c.next_offset,
                c.high_watermark,
                c.lag,
                c.applied,
                c.duplicates,
                c.dead_lettered,
                topic = esc(&c.topic),
                part = c.partition,
            );
        }
    }
    let mut body = String::from("<h2>Outbox relays</h2>");
    if relays.is_empty() {
        body.push_str("<p class=\"muted\">No process publishes events.</p>");
    } else {
        let _ = write!(
            body,
            "<table class=\"relays\"><tr><th>Instance</th><th>Component</th><th>Relay</th><th>Published</th><th>Failures</th>\
             <th>Last lag ms</th></tr>{relays}</table>"
        );
    }
    body.push_str("<h2>Consumed partitions</h2>");
    if partitions.is_empty() {
        body.push_str("<p class=\"muted\">No process consumes events.</p>");
    } else {
        let _ = write!(
            body,
            "<p class=\"muted\">Counts since each owner took the partition.</p><table class=\"partitions\"><tr><th>Topic</th>\
             <th>Partition</th><th>Owner</th><th>Next offset</th><th>High watermark</th><th>Lag</th><th>Applied</th>\
             <th>Duplicates</th><th>Dead-lettered</th></tr>{partitions}</table>"
        );
    }
    body.push_str("<h2>Dead letters</h2>");
    match tokio::time::timeout(app.timeout() * 3, app.kafka.dead_letters(None, SHOWN)).await {
        Err(_) => {
            let why = format!("Kafka ({}) did not answer in time.", app.kafka.settings().brokers.join(","));
            let _ = write!(body, "<p class=\"error\">{}</p>", esc(&why));
        }
        Ok(Err(e)) => {
            let _ = write!(body, "<p class=\"error\">Kafka cannot be read: {}</p>", esc(&format!("{e:#}")));
        }
        Ok(Ok(letters)) if letters.is_empty() => body.push_str("<p class=\"muted\">None.</p>"),
        Ok(Ok(letters)) => {
            let _ = write!(
                body,
                "<p class=\"muted\">Newest first. A replay puts the record back on the partition it came from: the group that \
                 dead-lettered it applies it once (fix the cause first), groups that applied it skip it, and a second replay \
                 is skipped too.</p><table class=\"dead-letters\"><tr><th>When (UTC)</th><th>Event</th><th>From</th><th>Group</th>\
                 <th>Error</th><th>Where</th><th>Trace</th>{}</tr>",
                if may_change(s) { "<th>Replay</th>" } else { "" }
            );
            for d in letters {
                let from = match (d.source_partition, d.source_offset) {
                    (Some(p), Some(o)) => format!("{} partition {p} offset {o}", d.topic),
                    _ => d.topic.clone(),
                };
                let trace = match d.trace_id.as_deref().and_then(|t| app.settings.trace_link(t).map(|l| (t, l))) {
                    Some((t, link)) => {
                        format!("<a class=\"trace\" href=\"{}\" target=\"_blank\">{}</a>", esc(&link), esc(&t[..8]))
                    }
                    None => d
                        .trace_id
                        .as_deref()
                        .map_or("-".into(), |t| format!("<span class=\"mono\">{}</span>", esc(&t[..8]))),
                };
                let replayed = d.replay_id.as_deref().map_or(String::new(), |r| {
                    format!("<br><span class=\"muted\">replay {} failed again</span>", esc(r))
                });
                let _ = write!(
                    body,
                    "<tr data-event=\"{event}\" data-offset=\"{}\"><td>{}</td><td class=\"mono\">{event}</td><td>{}</td><td>{}</td>\
                     <td class=\"error-text\">{}{replayed}</td><td class=\"mono\">{} / {} / {}</td><td>{trace}</td>",
                    d.offset,
                    esc(&utc(d.time_ms)),
                    esc(&from),
                    esc(&d.group),
                    esc(&d.error),
                    esc(&d.dlq_topic),
                    d.partition,
                    d.offset,
                    event = esc(&d.event_id),
                );
                if may_change(s) {
                    let _ = write!(
                        body,
                        "<td><form class=\"inline\" method=\"post\" action=\"/events/replay\">{}\
                         <input type=\"hidden\" name=\"topic\" value=\"{}\"><input type=\"hidden\" name=\"partition\" value=\"{}\">\
                         <input type=\"hidden\" name=\"offset\" value=\"{}\"><button class=\"replay\">Replay</button></form></td>",
                        csrf_field(s),
                        esc(&d.dlq_topic),
                        d.partition,
                        d.offset
                    );
                }
                body.push_str("</tr>");
            }
            body.push_str("</table>");
        }
    }
    html(status, crate::html::page("Events", "/events", Some(s), &notices, &body))
}

#[derive(Debug, Default, Deserialize)]
pub struct ReplayForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    topic: String,
    #[serde(default)]
    partition: String,
    #[serde(default)]
    offset: String,
}

pub async fn replay(State(app): Shared, Signed(s, origin): Signed, Form(form): Form<ReplayForm>) -> Response {
    if let Some(refused) = refusal(&s, origin, &form.csrf) {
        return refused;
    }
    let (Ok(partition), Ok(offset)) = (form.partition.trim().parse::<i32>(), form.offset.trim().parse::<i64>()) else {
        let why = format!(
            "Partition {:?} and offset {:?} must be numbers: nothing was replayed.",
            form.partition, form.offset
        );
        return view(&app, &s, vec![Notice::Error(why)], StatusCode::BAD_REQUEST).await;
    };
    let (prefix, by) = (app.etcd.prefix.clone(), s.operator());
    // Kafka first, in its own time; then the audit entry, in etcd's.
    let replayed = match tokio::time::timeout(app.timeout() * 3, app.kafka.replay(&form.topic, partition, offset, &by))
        .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let code = match &e {
                meshkit_common::events::Error::NotFound(_) => StatusCode::NOT_FOUND,
                meshkit_common::events::Error::Invalid(_) => StatusCode::BAD_REQUEST,
                _ => StatusCode::BAD_GATEWAY,
            };
            return view(&app, &s, vec![Notice::Error(format!("Not replayed: {e}"))], code).await;
        }
        Err(_) => {
            let why = "Kafka did not answer in time: nothing was replayed, or the replay is on the topic without an audit entry.";
            return view(&app, &s, vec![Notice::Error(why.into())], StatusCode::GATEWAY_TIMEOUT).await;
        }
    };
    let done = with_etcd!(app, |c| {
        ops::audit_replay(c, &prefix, &replayed, &form.topic, partition, offset, &by).await?;
        Ok(replayed.clone())
    });
    match done {
        Ok(r) => {
            let said = format!(
                "Event {} replayed onto {} partition {} at offset {}.",
                r.event_id, r.topic, r.partition, r.offset
            );
            Redirect::to(&format!("/events?said={}", q(&said))).into_response()
        }
        Err((code, notice)) => view(&app, &s, vec![notice], code).await,
    }
}
