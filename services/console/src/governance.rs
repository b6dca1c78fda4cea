//! The Governance page: each component's rules by method, edited live with
//! the checks `meshctl config set` applies; its instances' breakers,
//! shedding and refusals per rule; and per-method charts (see [`series`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write as _,
    time::Instant,
};

use axum::{
    Form, Json,
    extract::{Path, Query, State},
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Redirect, Response},
};
use meshkit_common::{
    config_center::{self, GLOBAL},
    server::COMPONENT_METADATA,
};
use meshkit_meshctl as ops;
use serde::Deserialize;

use crate::{
    App,
    html::{Notice, csrf_field, esc, may_change, page, q},
    pages::{Said, Shared, Signed, html, refusal, said},
    series::{self, Series},
    session::Session,
};

/// The setting the rules live in.
const RULES: &str = "governance.methods";

/// A live instance of a component, with its admin endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Process {
    pub id: String,
    pub component: String,
    pub services: BTreeSet<String>,
    pub admin: String,
}

/// Every live instance that publishes an admin endpoint, one per process.
pub(crate) async fn processes(app: &App) -> Result<Vec<Process>, (StatusCode, Notice)> {
    let prefix = app.etcd.prefix.clone();
    let views = with_etcd!(app, |c| ops::instance_views(c, &prefix, None).await)?;
    let mut by_admin: BTreeMap<String, Process> = BTreeMap::new();
    for v in views {
        let Some(inst) = v.instance.as_ref() else { continue };
        let Some(admin) = inst.metadata.get("admin") else { continue };
        let p = by_admin.entry(admin.clone()).or_insert_with(|| Process {
            id: v.instance_id.clone(),
            component: inst.metadata.get(COMPONENT_METADATA).cloned().unwrap_or_default(),
            services: BTreeSet::new(),
            admin: admin.clone(),
        });
        p.services.insert(v.service.clone());
    }
    Ok(by_admin.into_values().collect())
}

/// A process's `/reports`, within the console's timeout.
pub(crate) async fn reports(app: &App, admin: &str) -> Result<serde_json::Value, String> {
    match tokio::time::timeout(app.timeout(), meshkit_common::admin::http_get(admin, "/reports")).await {
        Ok(Ok(text)) => serde_json::from_str(&text).map_err(|e| format!("{admin}/reports is not JSON: {e}")),
        Ok(Err(e)) => Err(format!("{admin} did not answer: {e}")),
        Err(_) => Err(format!("{admin} did not answer within {} ms", app.settings.etcd_timeout_ms)),
    }
}

pub async fn index(State(app): Shared, Signed(s, _): Signed, Query(query): Query<Said>) -> Response {
    let mut notices = said(&query.said);
    let found = match processes(&app).await {
        Ok(p) => p,
        Err((code, notice)) => {
            notices.push(notice);
            return html(code, page("Governance", "/governance", Some(&s), &notices, ""));
        }
    };
    let mut components: BTreeMap<String, (usize, BTreeSet<String>)> = BTreeMap::new();
    for p in found.iter().filter(|p| !p.component.is_empty()) {
        let entry = components.entry(p.component.clone()).or_default();
        entry.0 += 1;
        entry.1.extend(p.services.iter().cloned());
    }
    let mut body = String::from(
        "<p class=\"muted\">Rules by method for each component, its instances' breakers, shedding and refusals, \
         and calls, errors and p99 per method, live.</p><table><tr><th>Component</th><th>Instances</th><th>Services</th></tr>",
    );
    for (component, (n, services)) in &components {
        let list: Vec<String> = services.iter().map(|s| esc(s)).collect();
        let _ = write!(
            body,
            "<tr><td><a href=\"/governance/{}\">{}</a></td><td class=\"num\">{n}</td><td>{}</td></tr>",
            q(component),
            esc(component),
            list.join("<br>")
        );
    }
    body.push_str("</table>");
    if components.is_empty() {
        body.push_str("<p class=\"muted\">No meshkit process with an admin endpoint is registered.</p>");
    }
    html(StatusCode::OK, page("Governance", "/governance", Some(&s), &notices, &body))
}

/// The component's own rules, and the revision they were read at (0: none).
async fn rules_of(app: &App, component: &str) -> Result<(RuleMap, i64, RuleMap), (StatusCode, Notice)> {
    let prefix = app.etcd.prefix.clone();
    let (entries, _) = with_etcd!(app, |c| Ok(config_center::read(c, &prefix, component).await?))?;
    let parse = |scope: &str| -> (RuleMap, i64) {
        entries
            .iter()
            .find(|e| e.scope == scope && e.path == RULES)
            .map(|e| (serde_json::from_str(&e.value).unwrap_or_default(), e.mod_revision))
            .unwrap_or_default()
    };
    let (own, revision) = parse(component);
    let (global, _) = parse(GLOBAL);
    Ok((own, revision, global))
}

type RuleMap = BTreeMap<String, serde_json::Value>;

pub async fn component(
    State(app): Shared,
    Signed(s, _): Signed,
    Path(component): Path<String>,
    Query(query): Query<Said>,
) -> Response {
    component_view(&app, &s, &component, said(&query.said), StatusCode::OK, None).await
}

/// What the rule form held when a change was refused, to show it again.
type Kept<'a> = Option<&'a RuleForm>;

async fn component_view(
    app: &App,
    s: &Session,
    component: &str,
    mut notices: Vec<Notice>,
    status: StatusCode,
    kept: Kept<'_>,
) -> Response {
    let title = format!("Governance of {component}");
    let (own, revision, global) = match rules_of(app, component).await {
        Ok(r) => r,
        Err((code, notice)) => {
            notices.push(notice);
            return html(code, page(&title, "/governance", Some(s), &notices, ""));
        }
    };
    let found = match processes(app).await {
        Ok(p) => p,
        Err((code, notice)) => {
            notices.push(notice);
            return html(code, page(&title, "/governance", Some(s), &notices, ""));
        }
    };
    let mine: Vec<&Process> = found.iter().filter(|p| p.component == component).collect();
    let services: BTreeSet<&str> = mine.iter().flat_map(|p| p.services.iter().map(String::as_str)).collect();
    let table = meshkit_common::methods::MethodTable::meshkit();
    let methods: Vec<String> =
        services.iter().flat_map(|svc| table.of_service(svc).into_iter().map(|(path, _)| path.to_owned())).collect();

    let mut body = String::new();
    let _ = write!(
        body,
        "<p class=\"muted\">Rules are the setting <code>{RULES}</code> of <a href=\"/config/{c}\">{c}</a> in the config center: \
         every instance applies a change within a second, and it is checked first as <code>meshctl config set</code> checks it. \
         {} instance{} running.</p>",
        mine.len(),
        if mine.len() == 1 { "" } else { "s" },
        c = esc(component)
    );
    body.push_str("<h2>Rules</h2>");
    body.push_str(
        "<table class=\"rules\"><tr><th>Method</th><th>Layer</th><th>QPS</th><th>Burst</th><th>Concurrency</th>\
         <th>Per caller QPS</th><th>Timeout ms</th><th>Breaker</th>",
    );
    if may_change(s) {
        body.push_str("<th>Change</th>");
    }
    body.push_str("</tr>");
    let rows = own.iter().map(|r| (r, component)).chain(global.iter().map(|r| (r, GLOBAL)));
    let mut any = false;
    for ((pattern, rule), layer) in rows {
        any = true;
        let n = |k: &str| match rule[k].as_f64() {
            Some(v) if v > 0.0 => format!("{v}"),
            _ => "-".into(),
        };
        let b = &rule["breaker"];
        let breaker = if b["enabled"].as_bool() == Some(true) {
            let f = |k: &str| b[k].as_f64().map_or("default".into(), |v| v.to_string());
            format!(
                "error ≥ {} or slow ≥ {} over {} ms, open {} ms",
                f("error_ratio"),
                f("slow_ratio"),
                f("slow_ms"),
                f("open_ms")
            )
        } else {
            "off".into()
        };
        let _ = write!(
            body,
            "<tr data-rule=\"{p}\"><td class=\"mono\">{p}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td>",
            esc(layer),
            n("qps"),
            n("burst"),
            n("concurrency"),
            n("caller_qps"),
            n("timeout_ms"),
            esc(&breaker),
            p = esc(pattern),
        );
        if may_change(s) && layer == component {
            let _ = write!(
                body,
                "<td><form class=\"inline\" method=\"post\" action=\"/governance/{}/remove\">{}\
                 <input type=\"hidden\" name=\"pattern\" value=\"{}\"><input type=\"hidden\" name=\"rev\" value=\"{revision}\">\
                 <button class=\"danger remove-rule\">Remove</button></form></td>",
                q(component),
                csrf_field(s),
                esc(pattern)
            );
        } else if may_change(s) {
            body.push_str("<td class=\"muted\">in <a href=\"/config/_global\">_global</a></td>");
        }
        body.push_str("</tr>");
    }
    if !any {
        body.push_str("<tr><td colspan=\"9\" class=\"muted\">No rule: every call is admitted.</td></tr>");
    }
    body.push_str("</table>");
    if may_change(s) {
        rule_form(&mut body, s, component, revision, &methods, kept);
    }

    body.push_str("<h2>Live</h2>");
    let _ = write!(
        body,
        "<p class=\"muted\">Calls, errors (calls not ending OK) and p99 per method, summed over the instances, \
         from each instance's admin <code>/metrics</code> sampled once a second while this page is open. \
         The p99 is interpolated within its latency bucket (0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500 ms, 1, 2.5, 5, 10 s), \
         so it can be off by up to that bucket's width. {}</p>\
         <div class=\"charts\" id=\"charts\" data-src=\"/governance/{}/series\"><p class=\"muted\">Waiting for two samples…</p></div>\
         <script src=\"/assets/charts.js\"></script>",
        if app.settings.trace_url.is_empty() {
            "With <code>console.trace_url</code> set, a dot on a p99 line links to a trace of a slow call."
        } else {
            "A dot on a p99 line is a traced call of that second (an exemplar): it links to its trace."
        },
        q(component)
    );

    body.push_str("<h2>State of each instance</h2>");
    for p in &mine {
        let _ = write!(body, "<h3 class=\"mono\">{}</h3>", esc(&p.id));
        let report = match reports(app, &p.admin).await {
            Ok(r) => r,
            Err(e) => {
                let _ = write!(body, "<p class=\"error\">{}</p>", esc(&e));
                continue;
            }
        };
        let g = &report["governance"];
        match g["shedding"].as_object() {
            Some(sh) => {
                let _ = write!(
                    body,
                    "<p>Shedding on: {} in flight of a capacity of {}, CPU {:.2}, {} shed.</p>",
                    sh.get("in_flight").cloned().unwrap_or_default(),
                    sh.get("capacity").cloned().unwrap_or_default(),
                    sh.get("cpu").and_then(serde_json::Value::as_f64).unwrap_or(0.0),
                    sh.get("shed").cloned().unwrap_or_default()
                );
            }
            None => body.push_str("<p class=\"muted\">Shedding off.</p>"),
        }
        let throttling = g["throttling"].as_object().cloned().unwrap_or_default();
        if throttling.is_empty() {
            body.push_str("<p class=\"muted\">Adaptive throttling off, or no call made yet.</p>");
        } else {
            body.push_str("<table class=\"throttling\"><tr><th>Calls to</th><th>Refused locally now</th></tr>");
            for (service, p) in throttling {
                let _ = write!(
                    body,
                    "<tr><td class=\"mono\">{}</td><td class=\"num\">{:.1} %</td></tr>",
                    esc(&service),
                    p.as_f64().unwrap_or(0.0) * 100.0
                );
            }
            body.push_str("</table>");
        }
        let breakers = g["breakers"].as_array().cloned().unwrap_or_default();
        if breakers.is_empty() {
            body.push_str("<p class=\"muted\">No breaker on its calls.</p>");
        } else {
            body.push_str("<table class=\"breakers\"><tr><th>Calls to</th><th>Method</th><th>Breaker</th></tr>");
            for b in breakers {
                let t = |k: &str| esc(b[k].as_str().unwrap_or("-"));
                let _ = write!(
                    body,
                    "<tr><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td class=\"breaker-{st}\">{st}</td></tr>",
                    t("service"),
                    t("method"),
                    st = t("state")
                );
            }
            body.push_str("</table>");
        }
        let refusals = g["rejections"].as_array().cloned().unwrap_or_default();
        if refusals.is_empty() {
            body.push_str("<p class=\"muted\">No call refused.</p>");
        } else {
            body.push_str(
                "<table class=\"refusals\"><tr><th>Side</th><th>Method or service</th><th>Rule</th><th>Refused</th></tr>",
            );
            for r in refusals {
                let t = |k: &str| esc(r[k].as_str().unwrap_or("-"));
                let _ = write!(
                    body,
                    "<tr data-target=\"{target}\" data-rule=\"{rule}\"><td>{}</td><td class=\"mono\">{target}</td><td>{rule}</td>\
                     <td class=\"num refused\">{}</td></tr>",
                    t("side"),
                    r["count"],
                    target = t("target"),
                    rule = t("rule"),
                );
            }
            body.push_str("</table>");
        }
    }
    html(status, page(&title, "/governance", Some(s), &notices, &body))
}

fn rule_form(body: &mut String, s: &Session, component: &str, revision: i64, methods: &[String], kept: Kept<'_>) {
    let v = |f: fn(&RuleForm) -> &str| kept.map_or(String::new(), |k| esc(f(k)));
    let _ = write!(
        body,
        "<form method=\"post\" action=\"/governance/{}/rule\" id=\"rule-form\" class=\"rule-form\">{}\
         <input type=\"hidden\" name=\"rev\" value=\"{revision}\">\
         <p><label>Method <input type=\"text\" name=\"pattern\" id=\"rule-pattern\" list=\"methods\" size=\"56\" \
         placeholder=\"/pkg.Service/Method, /pkg.Service/* or *\" value=\"{}\"></label></p><datalist id=\"methods\">",
        q(component),
        csrf_field(s),
        v(|k| &k.pattern)
    );
    for m in methods {
        let _ = write!(body, "<option value=\"{}\">", esc(m));
    }
    let number = |body: &mut String, name: &str, label: &str, value: String, size: u8| {
        let _ = write!(
            body,
            "<label>{label} <input type=\"text\" inputmode=\"decimal\" size=\"{size}\" name=\"{name}\" id=\"rule-{name}\" value=\"{value}\"></label> "
        );
    };
    body.push_str("</datalist><p>");
    number(body, "qps", "QPS", v(|k| &k.qps), 7);
    number(body, "burst", "Burst", v(|k| &k.burst), 7);
    number(body, "concurrency", "Concurrency", v(|k| &k.concurrency), 7);
    number(body, "caller_qps", "Per caller QPS", v(|k| &k.caller_qps), 7);
    number(body, "timeout_ms", "Timeout ms", v(|k| &k.timeout_ms), 7);
    body.push_str("</p><p><label><input type=\"checkbox\" name=\"breaker\" value=\"on\" id=\"rule-breaker\"");
    if kept.is_some_and(|k| k.breaker == "on") {
        body.push_str(" checked");
    }
    body.push_str("> Breaker (on the calling side)</label> ");
    number(body, "error_ratio", "error ratio", v(|k| &k.error_ratio), 6);
    number(body, "slow_ratio", "slow ratio", v(|k| &k.slow_ratio), 6);
    number(body, "slow_ms", "slow ms", v(|k| &k.slow_ms), 6);
    number(body, "open_ms", "open ms", v(|k| &k.open_ms), 6);
    body.push_str(
        "</p><p><button id=\"rule-save\">Set the rule</button> <span class=\"muted\">Empty fields keep their defaults \
         (no limit); a rule for the same method replaces it.</span></p></form>",
    );
}

#[derive(Debug, Default, Deserialize)]
pub struct RuleForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    rev: String,
    #[serde(default)]
    pattern: String,
    #[serde(default)]
    qps: String,
    #[serde(default)]
    burst: String,
    #[serde(default)]
    concurrency: String,
    #[serde(default)]
    caller_qps: String,
    #[serde(default)]
    timeout_ms: String,
    #[serde(default)]
    breaker: String,
    #[serde(default)]
    error_ratio: String,
    #[serde(default)]
    slow_ratio: String,
    #[serde(default)]
    slow_ms: String,
    #[serde(default)]
    open_ms: String,
}

impl RuleForm {
    /// The rule as JSON: the fields given, numbers checked here by name;
    /// ranges and combinations are the settings' own checks.
    fn rule(&self) -> Result<serde_json::Value, String> {
        let mut rule = serde_json::Map::new();
        let number = |field: &str, text: &str| -> Result<Option<serde_json::Value>, String> {
            let t = text.trim();
            if t.is_empty() {
                return Ok(None);
            }
            match t.parse::<f64>() {
                Ok(v) if v.is_finite() && v >= 0.0 => Ok(Some(if v.fract() == 0.0 && v < 1e15 {
                    serde_json::json!(v as u64)
                } else {
                    serde_json::json!(v)
                })),
                _ => Err(format!("{field}: {t:?} is not a number of 0 or more")),
            }
        };
        for (field, text) in [
            ("qps", &self.qps),
            ("burst", &self.burst),
            ("concurrency", &self.concurrency),
            ("caller_qps", &self.caller_qps),
            ("timeout_ms", &self.timeout_ms),
        ] {
            if let Some(v) = number(field, text)? {
                rule.insert(field.into(), v);
            }
        }
        let mut breaker = serde_json::Map::new();
        for (field, text) in [
            ("error_ratio", &self.error_ratio),
            ("slow_ratio", &self.slow_ratio),
            ("slow_ms", &self.slow_ms),
            ("open_ms", &self.open_ms),
        ] {
            if let Some(v) = number(field, text)? {
                breaker.insert(field.into(), v);
            }
        }
        if self.breaker == "on" {
            breaker.insert("enabled".into(), true.into());
        }
        if !breaker.is_empty() {
            rule.insert("breaker".into(), breaker.into());
        }
        Ok(rule.into())
    }
}

/// The rules written back: all of them in one setting, so the change is
/// one record in the history, checked whole; only if the revision they were
/// read at (`read`) is the one the page showed (`shown`).
async fn write_rules(
    app: &App,
    s: &Session,
    component: &str,
    shown: &str,
    read: i64,
    rules: RuleMap,
) -> Result<(), (StatusCode, Notice)> {
    if shown.trim() != read.to_string() {
        return Err((
            StatusCode::CONFLICT,
            Notice::Error(
                "The rules were changed by someone else since this page was read: nothing was changed. Here they are now."
                    .into(),
            ),
        ));
    }
    let (prefix, by) = (app.etcd.prefix.clone(), s.operator());
    let json = serde_json::Value::Object(rules.into_iter().collect()).to_string();
    with_etcd!(app, |c| {
        if json == "{}" {
            ops::delete_setting(c, &prefix, component, RULES, &by).await
        } else {
            ops::set_setting(c, &prefix, component, RULES, &json, &by).await
        }
    })
    .map(|_| ())
}

pub async fn set_rule(
    State(app): Shared,
    Signed(s, origin): Signed,
    Path(component): Path<String>,
    Form(form): Form<RuleForm>,
) -> Response {
    if let Some(refused) = refusal(&s, origin, &form.csrf) {
        return refused;
    }
    let pattern = form.pattern.trim().to_owned();
    let bad = |why: String| (StatusCode::BAD_REQUEST, Notice::Error(format!("{why}: nothing was changed.")));
    let checked = if pattern.is_empty() {
        Err(bad("Name the method (or /pkg.Service/*, or *)".into()))
    } else {
        form.rule().map_err(bad)
    };
    let result = match checked {
        Err(e) => Err(e),
        Ok(rule) => match rules_of(&app, &component).await {
            Err(e) => Err(e),
            Ok((mut own, read, _)) => {
                own.insert(pattern.clone(), rule);
                write_rules(&app, &s, &component, &form.rev, read, own).await
            }
        },
    };
    match result {
        Ok(()) => {
            let said = format!("The rule for {pattern} is set; {component}'s instances apply it within a second.");
            Redirect::to(&format!("/governance/{}?said={}", q(&component), q(&said))).into_response()
        }
        Err((code, notice)) => {
            let keep = code != StatusCode::CONFLICT;
            component_view(&app, &s, &component, vec![notice], code, keep.then_some(&form)).await
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct RemoveForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    rev: String,
    #[serde(default)]
    pattern: String,
}

pub async fn remove_rule(
    State(app): Shared,
    Signed(s, origin): Signed,
    Path(component): Path<String>,
    Form(form): Form<RemoveForm>,
) -> Response {
    if let Some(refused) = refusal(&s, origin, &form.csrf) {
        return refused;
    }
    let result = match rules_of(&app, &component).await {
        Err(e) => Err(e),
        Ok((mut own, read, _)) => {
            if own.remove(&form.pattern).is_none() {
                Err((StatusCode::NOT_FOUND, Notice::Error(format!("{component} has no rule for {:?}.", form.pattern))))
            } else {
                write_rules(&app, &s, &component, &form.rev, read, own).await
            }
        }
    };
    match result {
        Ok(()) => {
            let said = format!("The rule for {} is removed.", form.pattern);
            Redirect::to(&format!("/governance/{}?said={}", q(&component), q(&said))).into_response()
        }
        Err((code, notice)) => component_view(&app, &s, &component, vec![notice], code, None).await,
    }
}

/// `/governance/{component}/series`: the component's points as JSON,
/// sampling its instances first when a sample is due.
pub async fn series(State(app): Shared, Signed(_, _): Signed, Path(component): Path<String>) -> Response {
    let due = app.series.lock().map(|m| m.get(&component).is_none_or(|s| s.due(Instant::now()))).unwrap_or(true);
    let mut unreachable = Vec::new();
    let mut sources = 0;
    if due {
        let found = match processes(&app).await {
            Ok(p) => p,
            Err((code, notice)) => {
                let text = match notice {
                    Notice::EtcdDown(t) | Notice::Error(t) | Notice::Said(t) => t,
                };
                return (code, Json(serde_json::json!({ "error": text }))).into_response();
            }
        };
        let mine: Vec<Process> = found.into_iter().filter(|p| p.component == component).collect();
        let fetches = mine.iter().map(|p| {
            let (admin, id, timeout) = (p.admin.clone(), p.id.clone(), app.timeout());
            tokio::spawn(async move {
                let got = tokio::time::timeout(
                    timeout,
                    meshkit_common::admin::http_get_accept(&admin, "/metrics", OPENMETRICS),
                )
                .await;
                (id, admin, got)
            })
        });
        let mut scrapes = HashMap::new();
        for f in fetches.collect::<Vec<_>>() {
            let Ok((id, admin, got)) = f.await else { continue };
            match got {
                Ok(Ok(text)) => {
                    scrapes.insert(id, series::parse(&text));
                }
                Ok(Err(e)) => unreachable.push(format!("{admin}: {e}")),
                Err(_) => unreachable.push(format!("{admin}: no answer in time")),
            }
        }
        sources = scrapes.len();
        let unix_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        if let Ok(mut all) = app.series.lock() {
            let s = all.entry(component.clone()).or_insert_with(Series::default);
            if s.due(Instant::now()) {
                s.add(Instant::now(), unix_ms, scrapes);
            }
        }
    }
    let points: Vec<series::Point> = app
        .series
        .lock()
        .ok()
        .and_then(|m| m.get(&component).map(|s| s.points.iter().cloned().collect()))
        .unwrap_or_default();
    let trace_url = app.settings.trace_url.clone();
    let mut r = Json(serde_json::json!({
        "component": component,
        "trace_url": trace_url,
        "sampled": due,
        "instances": sources,
        "unreachable": unreachable,
        "points": points,
    }))
    .into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0";

pub async fn charts_js() -> Response {
    let mut r = include_str!("../assets/charts.js").into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/javascript; charset=utf-8"));
    r
}
