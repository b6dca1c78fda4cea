//! The pages and the changes they post.

use std::{collections::BTreeSet, fmt::Write as _, sync::Arc, time::Duration};

use axum::{
    Form,
    extract::{FromRequestParts, Path, Query, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header, request::Parts},
    response::{Html, IntoResponse, Redirect, Response},
};
use etcd_client::GetOptions;
use meshkit_common::{
    config_center::{self, GLOBAL},
    control::Change,
    history, keys,
};
use meshkit_meshctl as ops;
use serde::Deserialize;

use crate::{
    App, COOKIE,
    html::{Notice, csrf_field, esc, may_change, page, q},
    session::{Role, Session, same_secret},
};

pub(crate) type Shared = State<Arc<App>>;

/// A request with a live session; without one, a page is sent to sign-in
/// and a change is refused (401).
pub struct Signed(pub Arc<Session>, pub Origin);

/// Whether the browser says the request comes from one of this console's
/// own pages (`Origin` against `Host`, or HTTP/2's `:authority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Same,
    /// No `Origin` header (a browser sends one with every form POST).
    Unsaid,
    Other,
}

fn origin_of(parts: &Parts) -> Origin {
    let Some(origin) = parts.headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else { return Origin::Unsaid };
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()));
    let own = origin.strip_prefix("http://").or_else(|| origin.strip_prefix("https://"));
    if own.is_some() && own == host { Origin::Same } else { Origin::Other }
}

impl FromRequestParts<Arc<App>> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, app: &Arc<App>) -> Result<Self, Response> {
        let id = cookie(&parts.headers, COOKIE);
        if let Some(session) = id.as_deref().and_then(|id| app.sessions.get(id)) {
            return Ok(Signed(session, origin_of(parts)));
        }
        let mut response = if parts.method == Method::GET {
            let next = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let said = if id.is_some() { "&said=Your+session+ended%3B+sign+in+again." } else { "" };
            Redirect::to(&format!("/login?next={}{said}", q(next))).into_response()
        } else {
            let body = page("Sign in first", "", None, &[Notice::Error("No session: sign in first.".into())], "");
            (StatusCode::UNAUTHORIZED, Html(body)).into_response()
        };
        if id.is_some() {
            // A stale or forged id: forget it.
            response.headers_mut().insert(header::SET_COOKIE, clear_cookie(app));
        }
        Err(response)
    }
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

fn session_cookie(app: &App, id: &str) -> HeaderValue {
    let secure = if app.https { "; Secure" } else { "" };
    let max_age = app.sessions.ttl().as_secs();
    HeaderValue::from_str(&format!("{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn clear_cookie(app: &App) -> HeaderValue {
    let secure = if app.https { "; Secure" } else { "" };
    HeaderValue::from_str(&format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Why a change may not be made (403), or `None` when it may: it needs the
/// session's CSRF token, an admin, and (when the browser says where the form
/// came from) this console's own origin.
pub(crate) fn refusal(s: &Session, origin: Origin, csrf: &str) -> Option<Response> {
    let why = if !same_secret(csrf, &s.csrf) {
        "The form's CSRF token is missing or not this session's: nothing was changed. Reload the page."
    } else if origin == Origin::Other {
        "The change came from another site's page: nothing was changed."
    } else if s.role != Role::Admin {
        "The read-only role sees the mesh but cannot change it."
    } else {
        return None;
    };
    let body = page("Refused", "", Some(s), &[Notice::Error(why.to_owned())], "<p><a href=\"/services\">Back</a></p>");
    Some(html(StatusCode::FORBIDDEN, body))
}

/// How an error from etcd or a change is said, with its status.
pub(crate) fn failure(app: &App, e: &anyhow::Error) -> (StatusCode, Notice) {
    if let Some(reason) =
        e.chain().find_map(|c| c.downcast_ref::<etcd_client::Error>()).and_then(meshkit_common::etcd::unavailable)
    {
        return (StatusCode::SERVICE_UNAVAILABLE, Notice::EtcdDown(app.down(reason)));
    }
    let text = format!("{e:#}");
    let status = if text.contains("no live instance") || text.contains("is gone") || text.starts_with("NotFound:") {
        StatusCode::NOT_FOUND
    } else if text.starts_with("Unavailable:") || text.starts_with("no scheduler instance") {
        StatusCode::BAD_GATEWAY
    } else if text.contains("changed by someone else") {
        StatusCode::CONFLICT
    } else {
        StatusCode::BAD_REQUEST
    };
    (status, Notice::Error(text))
}

/// Runs `$body` with `$c`, an etcd client, within the console's timeout:
/// its value, or the status and notice to show (a banner when etcd does not
/// answer). A macro rather than a function taking an async closure, so the
/// handlers' futures stay `Send`.
macro_rules! with_etcd {
    ($app:expr, |$c:ident| $body:expr) => {{
        let app: &$crate::App = &$app;
        match app.etcd().await {
            Err(down) => Err((::axum::http::StatusCode::SERVICE_UNAVAILABLE, $crate::html::Notice::EtcdDown(down))),
            Ok(mut client) => {
                let $c = &mut client;
                let work = async {
                    let r: anyhow::Result<_> = async { $body }.await;
                    r
                };
                match tokio::time::timeout(app.timeout(), work).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) => Err($crate::pages::failure(app, &e)),
                    Err(_) => Err((
                        ::axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        $crate::html::Notice::EtcdDown(
                            app.down(&format!("no answer within {} ms", app.settings.etcd_timeout_ms)),
                        ),
                    )),
                }
            }
        }
    }};
}

pub(crate) fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, Html(body)).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut().insert("x-frame-options", HeaderValue::from_static("DENY"));
    r.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; form-action 'self'; frame-ancestors 'none'"),
    );
    r
}

pub(crate) fn said(text: &Option<String>) -> Vec<Notice> {
    text.iter().filter(|t| !t.is_empty()).map(|t| Notice::Said(t.clone())).collect()
}

#[derive(Debug, Default, Deserialize)]
pub struct Said {
    #[serde(default)]
    pub said: Option<String>,
}

pub async fn home(_: Signed) -> Redirect {
    Redirect::to("/services")
}

pub async fn stylesheet() -> Response {
    let mut r = include_str!("../assets/console.css").into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/css; charset=utf-8"));
    r
}

pub async fn not_found() -> Response {
    html(
        StatusCode::NOT_FOUND,
        page("Not found", "", None, &[], "<p>No such page. <a href=\"/services\">Services</a></p>"),
    )
}

// ---------------------------------------------------------------- sign-in

#[derive(Debug, Default, Deserialize)]
pub struct LoginQuery {
    #[serde(default)]
    next: String,
    #[serde(default)]
    said: Option<String>,
}

pub async fn login_page(State(app): Shared, Query(query): Query<LoginQuery>) -> Response {
    html(StatusCode::OK, login_view(&app, &query.next, said(&query.said)))
}

fn login_view(app: &App, next: &str, notices: Vec<Notice>) -> String {
    let mut body = String::from("<div class=\"login\">");
    let passwords = !app.settings.admin_password.is_empty() || !app.settings.viewer_password.is_empty();
    if passwords {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/login\" id=\"password-form\"><input type=\"hidden\" name=\"next\" value=\"{}\">\
             <label for=\"user\">User</label><input type=\"text\" id=\"user\" name=\"user\" autocomplete=\"username\" value=\"admin\">\
             <label for=\"password\">Password</label><input type=\"password\" id=\"password\" name=\"password\" autocomplete=\"current-password\">\
             <p><button id=\"sign-in\">Sign in</button></p></form>",
            esc(next)
        );
    }
    if app.verifier.is_some() {
        if passwords {
            body.push_str("<div class=\"or\">or with a token from your identity provider</div>");
        }
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/login\" id=\"token-form\"><input type=\"hidden\" name=\"next\" value=\"{}\">\
             <label for=\"token\">JWT</label><textarea id=\"token\" name=\"token\" rows=\"4\"></textarea>\
             <p><button id=\"sign-in-token\">Sign in with the token</button></p></form>",
            esc(next)
        );
    }
    body.push_str("</div>");
    page("Sign in", "", None, &notices, &body)
}

#[derive(Debug, Default, Deserialize)]
pub struct LoginForm {
    #[serde(default)]
    user: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

pub async fn login(State(app): Shared, Form(form): Form<LoginForm>) -> Response {
    let signed_in = if !form.token.trim().is_empty() {
        match app.verifier.as_ref().map(|v| v.verify(form.token.trim())) {
            None => Err("Tokens are not accepted here (console.jwt is not set).".to_owned()),
            Some(Err(why)) => Err(format!("The token is not accepted: {why}.")),
            Some(Ok(p)) if p.subject.trim().is_empty() => Err("The token names nobody (no `sub`).".to_owned()),
            Some(Ok(p)) => {
                let jwt = &app.settings.jwt;
                // The session ends when the token does.
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                let left = p
                    .claims
                    .get("exp")
                    .and_then(serde_json::Value::as_u64)
                    .map(|exp| Duration::from_secs(exp).saturating_sub(now));
                if p.roles.contains(&jwt.admin_role) {
                    Ok((p.subject, Role::Admin, "jwt", left))
                } else if jwt.viewer_role.is_empty() || p.roles.contains(&jwt.viewer_role) {
                    Ok((p.subject, Role::Viewer, "jwt", left))
                } else {
                    Err(format!(
                        "The token of {:?} carries neither the role {:?} nor {:?}.",
                        p.subject, jwt.admin_role, jwt.viewer_role
                    ))
                }
            }
        }
    } else {
        let s = &app.settings;
        let matches = |secret: &str| !secret.is_empty() && same_secret(&form.password, secret);
        match form.user.as_str() {
            "admin" if matches(&s.admin_password) => Ok(("admin".to_owned(), Role::Admin, "password", None)),
            "viewer" if matches(&s.viewer_password) => Ok(("viewer".to_owned(), Role::Viewer, "password", None)),
            _ => Err("Wrong user or password.".to_owned()),
        }
    };
    match signed_in {
        Err(why) => {
            tracing::warn!(user = form.user, "console sign-in refused: {why}");
            // Guessing costs time.
            tokio::time::sleep(Duration::from_millis(400)).await;
            html(StatusCode::UNAUTHORIZED, login_view(&app, &form.next, vec![Notice::Error(why)]))
        }
        Ok((user, role, via, until)) => {
            let (id, session) = app.sessions.create(&user, role, until);
            let entry = history::AuditEntry::new(
                &session.operator(),
                "sign-in",
                "console",
                format!("{} via {via}", role.name()),
            );
            let _ = with_etcd!(app, |c| Ok(history::audit(c, &app.etcd.prefix, &entry).await?));
            tracing::info!(user, role = role.name(), via, "console sign-in");
            let next = if local_path(&form.next) { &form.next } else { "/services" };
            let mut r = Redirect::to(next).into_response();
            r.headers_mut().insert(header::SET_COOKIE, session_cookie(&app, &id));
            r
        }
    }
}

/// A path on this console to go back to after sign-in: not another site
/// (`//host`, `/\\host`), nothing a header cannot carry.
fn local_path(next: &str) -> bool {
    let mut chars = next.chars();
    chars.next() == Some('/')
        && !matches!(chars.next(), Some('/' | '\\'))
        && !next.chars().any(|c| c == '\\' || c.is_control())
}

#[derive(Debug, Default, Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

pub async fn logout(
    State(app): Shared,
    Signed(s, _): Signed,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if !same_secret(&form.csrf, &s.csrf) {
        return html(
            StatusCode::FORBIDDEN,
            page("Refused", "", Some(&s), &[Notice::Error("The form's CSRF token is not this session's.".into())], ""),
        );
    }
    if let Some(id) = cookie(&headers, COOKIE) {
        app.sessions.remove(&id);
    }
    let entry = history::AuditEntry::new(&s.operator(), "sign-out", "console", "");
    let _ = with_etcd!(app, |c| Ok(history::audit(c, &app.etcd.prefix, &entry).await?));
    let mut r = Redirect::to("/login?said=Signed+out.").into_response();
    r.headers_mut().insert(header::SET_COOKIE, clear_cookie(&app));
    r
}

// ---------------------------------------------------------------- services

pub async fn services(State(app): Shared, Signed(s, _): Signed, Query(q): Query<Said>) -> Response {
    services_view(&app, &s, said(&q.said), StatusCode::OK).await
}

async fn services_view(app: &App, s: &Session, mut notices: Vec<Notice>, status: StatusCode) -> Response {
    let prefix = app.etcd.prefix.clone();
    let read = with_etcd!(app, |c| {
        let views = ops::instance_views(c, &prefix, None).await?;
        let leases: Vec<i64> = views.iter().map(|v| v.lease).collect();
        let ttls = ops::ttls_left(c, &leases).await;
        Ok((views, ttls))
    });
    let (views, ttls) = match read {
        Ok(v) => v,
        Err((code, notice)) => {
            notices.push(notice);
            return html(code, page("Services", "/services", Some(s), &notices, ""));
        }
    };
    let health = futures_health(app, &views).await;
    let mut body = String::new();
    let services: BTreeSet<&str> = views.iter().map(|v| v.service.as_str()).collect();
    if services.is_empty() {
        body.push_str("<p class=\"muted\">No service is registered.</p>");
    }
    for service in services {
        let rows: Vec<usize> = (0..views.len()).filter(|i| views[*i].service == service).collect();
        let live = rows.iter().filter(|i| !views[**i].drained()).count();
        let _ = write!(
            body,
            "<h2>{}</h2><p class=\"muted\">{live} in rotation of {}</p><table class=\"instances\" data-service=\"{}\"><tr>\
             <th>Instance</th><th>Address</th><th>Zone</th><th>Version</th><th>Weight</th><th>State</th><th>Lease TTL</th>\
             <th>Health</th><th>Pools</th>{}</tr>",
            esc(service),
            rows.len(),
            esc(service),
            if may_change(s) { "<th>Change</th>" } else { "" }
        );
        for i in rows {
            let v = &views[i];
            let state = if v.drained() { "drained" } else { "serving" };
            let (addr, zone, version, admin) = match &v.instance {
                Some(inst) => {
                    (inst.addr.clone(), inst.zone.clone(), inst.version.clone(), inst.metadata.get("admin").cloned())
                }
                None => (v.addr().unwrap_or("-").to_owned(), String::new(), String::new(), None),
            };
            let weight = v
                .instance
                .as_ref()
                .map(|i| i.weight)
                .or(v.control.as_ref().and_then(|c| c.weight))
                .map_or("-".into(), |w| w.to_string());
            let pools = if admin.is_some() {
                format!("<a href=\"/pools/{}\">pools</a>", q(&v.instance_id))
            } else {
                "-".into()
            };
            let _ = write!(
                body,
                "<tr data-instance=\"{id}\"><td class=\"mono\">{id}</td><td class=\"mono\">{}</td><td>{}</td><td>{}</td>\
                 <td class=\"num weight\">{weight}</td><td class=\"state state-{state}\">{state}</td><td class=\"num\">{}</td>\
                 <td class=\"health health-{}\">{}</td><td>{pools}</td>",
                esc(&addr),
                esc(if zone.is_empty() { "-" } else { &zone }),
                esc(&version),
                esc(&ttls[&views[i].lease]),
                health[i].replace(' ', "_").to_lowercase(),
                esc(&health[i]),
                id = esc(&v.instance_id),
            );
            if may_change(s) && !v.follows() {
                body.push_str("<td class=\"muted\">does not follow controls</td>");
            } else if may_change(s) {
                let hidden = format!(
                    "{}<input type=\"hidden\" name=\"service\" value=\"{}\"><input type=\"hidden\" name=\"instance\" value=\"{}\">",
                    csrf_field(s),
                    esc(&v.service),
                    esc(&v.instance_id)
                );
                let toggle = if v.drained() {
                    format!(
                        "<form class=\"inline\" method=\"post\" action=\"/instances/control\">{hidden}<input type=\"hidden\" name=\"action\" value=\"undrain\"><button class=\"quiet undrain\">Put back</button></form>"
                    )
                } else {
                    format!(
                        "<form class=\"inline\" method=\"post\" action=\"/instances/control\">{hidden}<input type=\"hidden\" name=\"action\" value=\"drain\"><button class=\"danger drain\">Drain</button></form>"
                    )
                };
                let _ = write!(
                    body,
                    "<td>{toggle} <form class=\"inline\" method=\"post\" action=\"/instances/control\">{hidden}\
                     <input type=\"hidden\" name=\"action\" value=\"weight\"><input type=\"number\" name=\"weight\" min=\"1\" max=\"10000\" \
                     placeholder=\"weight\" aria-label=\"weight\"><button class=\"quiet set-weight\">Set weight</button></form></td>"
                );
            }
            body.push_str("</tr>");
        }
        body.push_str("</table>");
    }
    html(status, page("Services", "/services", Some(s), &notices, &body))
}

/// Each instance's gRPC health for its service (1 s each, all at once).
async fn futures_health(app: &App, views: &[ops::InstanceView]) -> Vec<String> {
    let checks = views.iter().map(|v| {
        let addr = v.addr().map(str::to_owned);
        let (service, tls) = (v.service.clone(), app.mesh_tls.clone());
        async move {
            let Some(addr) = addr else { return "-".to_owned() };
            let check = async {
                let channel =
                    meshkit_common::tls::channel(&addr, tls).map_err(|e| (tonic::Code::Unavailable, e.to_string()))?;
                let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
                let req = tonic_health::pb::HealthCheckRequest { service };
                client.check(req).await.map(|r| r.into_inner().status).map_err(|s| (s.code(), s.message().to_owned()))
            };
            match tokio::time::timeout(Duration::from_secs(1), check).await {
                Ok(Ok(1)) => "serving".to_owned(),
                Ok(Ok(2)) => "not serving".to_owned(),
                Ok(Ok(_)) => "unknown".to_owned(),
                // It answers, but keeps no health for this name (the gateway's edge).
                Ok(Err((tonic::Code::NotFound | tonic::Code::Unimplemented, _))) => "-".to_owned(),
                Ok(Err(_)) | Err(_) => "unreachable".to_owned(),
            }
        }
    });
    let handles: Vec<_> = checks.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap_or_else(|_| "unknown".into()));
    }
    out
}

#[derive(Debug, Default, Deserialize)]
pub struct ControlForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    service: String,
    #[serde(default)]
    instance: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    weight: String,
}

pub async fn instance_control(
    State(app): Shared,
    Signed(s, origin): Signed,
    Form(form): Form<ControlForm>,
) -> Response {
    if let Some(refused) = refusal(&s, origin, &form.csrf) {
        return refused;
    }
    let change = match form.action.as_str() {
        "drain" => Change::Drain,
        "undrain" => Change::Undrain,
        "weight" if form.weight.trim().is_empty() || form.weight.trim() == "default" => Change::Weight(None),
        "weight" => match form.weight.trim().parse::<u32>() {
            Ok(w) if meshkit_common::control::WEIGHTS.contains(&w) => Change::Weight(Some(w)),
            _ => {
                let why = format!("Weight {:?} is not a number within 1..=10000: nothing was changed.", form.weight);
                return services_view(&app, &s, vec![Notice::Error(why)], StatusCode::BAD_REQUEST).await;
            }
        },
        other => {
            let why = format!("{other:?} is not drain, undrain or weight.");
            return services_view(&app, &s, vec![Notice::Error(why)], StatusCode::BAD_REQUEST).await;
        }
    };
    let (prefix, by) = (app.etcd.prefix.clone(), s.operator());
    let done = with_etcd!(app, |c| {
        ops::control_instance(c, &prefix, &form.instance, Some(&form.service), change, &by).await
    });
    match done {
        Ok(_) => {
            let what = match change {
                Change::Drain => "drained: its registration is withdrawn while it runs".to_owned(),
                Change::Undrain => "back in rotation".to_owned(),
                Change::Weight(Some(w)) => format!("weight {w}"),
                Change::Weight(None) => "back to its configured weight".to_owned(),
            };
            Redirect::to(&format!("/services?said={}", q(&format!("{} is {what}.", form.instance)))).into_response()
        }
        Err((code, notice)) => services_view(&app, &s, vec![notice], code).await,
    }
}

pub async fn pools(State(app): Shared, Signed(s, _): Signed, Path(instance): Path<String>) -> Response {
    let prefix = app.etcd.prefix.clone();
    let admin = with_etcd!(app, |c| {
        let views = ops::instance_views(c, &prefix, None).await?;
        let found = views.iter().find(|v| v.instance_id == instance);
        match found.and_then(|v| v.instance.as_ref()).and_then(|i| i.metadata.get("admin")) {
            Some(a) => Ok(a.clone()),
            None => anyhow::bail!("no live instance {instance} with an admin endpoint"),
        }
    });
    let title = format!("Pools of {instance}");
    let admin = match admin {
        Ok(a) => a,
        Err((code, notice)) => return html(code, page(&title, "/services", Some(&s), &[notice], "")),
    };
    let report = match tokio::time::timeout(app.timeout(), meshkit_common::admin::fetch_pools(&admin)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let why = format!("The process's admin endpoint {admin} did not answer: {e}");
            return html(StatusCode::BAD_GATEWAY, page(&title, "/services", Some(&s), &[Notice::Error(why)], ""));
        }
        Err(_) => {
            let why = format!("The process's admin endpoint {admin} did not answer in time");
            return html(StatusCode::GATEWAY_TIMEOUT, page(&title, "/services", Some(&s), &[Notice::Error(why)], ""));
        }
    };
    let mut body =
        format!("<p class=\"muted\">What this process's balanced channels hold now, from {}.</p>", esc(&admin));
    if report.is_empty() {
        body.push_str("<p>This process holds no balanced channel.</p>");
    }
    for (service, pool) in report {
        let _ = write!(
            body,
            "<h2>{}</h2><p class=\"muted\">{} endpoints, {} ejected</p><table class=\"pool\"><tr><th>Instance</th><th>Address</th>\
             <th>State</th><th>In flight</th><th>Connections</th><th>RTT ms</th><th>Load µs</th><th>Calls</th><th>Failures</th></tr>",
            esc(&service),
            pool.endpoints.len(),
            pool.ejected
        );
        for (id, e) in &pool.endpoints {
            let r = ops::EndpointRow::of(e);
            let _ = write!(
                body,
                "<tr><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td class=\"state-{}\">{}</td><td class=\"num\">{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{:.3}</td><td class=\"num\">{:.1}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                esc(id),
                esc(&r.addr),
                esc(&r.state),
                esc(&r.state),
                r.inflight,
                r.connections,
                r.rtt_ms,
                r.load_us,
                r.calls,
                r.failures,
            );
        }
        body.push_str("</table>");
    }
    html(StatusCode::OK, page(&title, "/services", Some(&s), &[], &body))
}

// ---------------------------------------------------------------- config center

pub async fn components(State(app): Shared, Signed(s, _): Signed) -> Response {
    let prefix = app.etcd.prefix.clone();
    let found = with_etcd!(app, |c| {
        let root = keys::config_root(&prefix);
        let resp = c.get(root.as_str(), Some(GetOptions::new().with_prefix().with_keys_only())).await?;
        let mut counts: std::collections::BTreeMap<String, usize> =
            ops::KNOWN_COMPONENTS.iter().map(|c| ((*c).to_owned(), 0)).collect();
        counts.insert(GLOBAL.to_owned(), 0);
        for kv in resp.kvs() {
            if let Some((component, _)) =
                kv.key_str().unwrap_or_default().strip_prefix(&root).and_then(|r| r.split_once('/'))
            {
                *counts.entry(component.to_owned()).or_default() += 1;
            }
        }
        Ok(counts)
    });
    let counts = match found {
        Ok(c) => c,
        Err((code, notice)) => return html(code, page("Config center", "/config", Some(&s), &[notice], "")),
    };
    let mut body = String::from(
        "<p class=\"muted\">Settings kept in etcd, over each process's own file and environment; a component's own win over \
         <code>_global</code>. Every change is checked as the processes will check it.</p><table class=\"components\"><tr><th>Component</th><th>Settings in etcd</th></tr>",
    );
    for (component, n) in counts {
        let _ = write!(
            body,
            "<tr><td><a href=\"/config/{}\">{}</a></td><td class=\"num\">{n}</td></tr>",
            q(&component),
            esc(&component)
        );
    }
    body.push_str("</table>");
    html(StatusCode::OK, page("Config center", "/config", Some(&s), &[], &body))
}

pub async fn component(
    State(app): Shared,
    Signed(s, _): Signed,
    Path(c): Path<String>,
    Query(q): Query<Said>,
) -> Response {
    component_view(&app, &s, &c, said(&q.said), StatusCode::OK, ("", "")).await
}

async fn component_view(
    app: &App,
    s: &Session,
    component: &str,
    mut notices: Vec<Notice>,
    status: StatusCode,
    (path, value): (&str, &str),
) -> Response {
    let title = format!("Config: {component}");
    let prefix = app.etcd.prefix.clone();
    let read = with_etcd!(app, |c| Ok(config_center::read(c, &prefix, component).await?));
    let (entries, revision) = match read {
        Ok(r) => r,
        Err((code, notice)) => {
            notices.push(notice);
            return html(code, page(&title, "/config", Some(s), &notices, ""));
        }
    };
    let own: BTreeSet<&str> = entries.iter().filter(|e| e.scope == component).map(|e| e.path.as_str()).collect();
    let mut body = format!(
        "<p class=\"muted\">Read at revision <span id=\"revision\">{revision}</span>. {}</p>\
         <table class=\"settings\"><tr><th>Layer</th><th>Setting</th><th>Value</th><th>Revision</th><th></th></tr>",
        if component == GLOBAL {
            "Every process reads these, under its own component's."
        } else {
            "This component's own settings win over <code>_global</code>'s."
        }
    );
    if entries.is_empty() {
        body.push_str("<tr><td colspan=\"5\" class=\"muted\">None: the processes run on their own file and environment settings.</td></tr>");
    }
    for e in &entries {
        let overridden = e.scope == GLOBAL && component != GLOBAL && own.contains(e.path.as_str());
        let history_link = format!("/config/{}/history?path={}", q(&e.scope), q(&e.path));
        let mut actions = format!("<a href=\"{history_link}\">history</a>");
        if may_change(s) && e.scope == component {
            let _ = write!(
                actions,
                " <form class=\"inline\" method=\"post\" action=\"/config/{}/delete\">{}<input type=\"hidden\" name=\"path\" value=\"{}\">\
                 <button class=\"quiet delete\">Delete</button></form>",
                q(component),
                csrf_field(s),
                esc(&e.path)
            );
        }
        let _ = write!(
            body,
            "<tr data-path=\"{}\"><td>{}{}</td><td class=\"mono\">{}</td><td class=\"mono value\">{}</td><td class=\"num\">{}</td><td>{actions}</td></tr>",
            esc(&e.path),
            esc(&e.scope),
            if overridden { " <span class=\"muted\">(overridden)</span>" } else { "" },
            esc(&e.path),
            esc(&ops::shown(&e.path, &e.value)),
            e.mod_revision,
        );
    }
    body.push_str("</table>");
    if may_change(s) {
        let _ = write!(
            body,
            "<h2>Set a setting</h2><form method=\"post\" action=\"/config/{}/set\" id=\"set-form\">{}\
             <p><label>Setting <input type=\"text\" name=\"path\" id=\"set-path\" placeholder=\"log.filter\" value=\"{}\" size=\"40\"></label> \
             <label>JSON value <input type=\"text\" name=\"value\" id=\"set-value\" placeholder='\"debug\"' value=\"{}\" size=\"50\"></label> \
             <button id=\"set-save\">Check and save</button></p></form>",
            q(component),
            csrf_field(s),
            esc(path),
            esc(value)
        );
    }
    let _ = write!(
        body,
        "<h2>Compare two revisions</h2><form method=\"get\" action=\"/config/{}/diff\" class=\"inline\">\
         <label>From <input type=\"number\" name=\"from\" id=\"diff-from\" min=\"1\"></label> \
         <label>To <input type=\"number\" name=\"to\" id=\"diff-to\" min=\"1\" value=\"{revision}\"></label> <button class=\"quiet\" id=\"diff-go\">Compare</button></form>",
        q(component)
    );
    html(status, page(&title, "/config", Some(s), &notices, &body))
}

#[derive(Debug, Default, Deserialize)]
pub struct SetForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    value: String,
}

pub async fn config_set(
    State(app): Shared,
    Signed(s, origin): Signed,
    Path(c): Path<String>,
    Form(form): Form<SetForm>,
) -> Response {
    if let Some(refused) = refusal(&s, origin, &form.csrf) {
        return refused;
    }
    let (prefix, by) = (app.etcd.prefix.clone(), s.operator());
    let path = form.path.trim().to_owned();
    match with_etcd!(app, |cl| ops::set_setting(cl, &prefix, &c, &path, &form.value, &by).await) {
        Ok(revision) => {
            let said = format!("{c}/{path} set at revision {revision}.");
            Redirect::to(&format!("/config/{}?said={}", q(&c), q(&said))).into_response()
        }
        Err((code, notice)) => component_view(&app, &s, &c, vec![notice], code, (&path, &form.value)).await,
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct PathForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    path: String,
}

pub async fn config_delete(
    State(app): Shared,
    Signed(s, origin): Signed,
    Path(c): Path<String>,
    Form(form): Form<PathForm>,
) -> Response {
    if let Some(refused) = refusal(&s, origin, &form.csrf) {
        return refused;
    }
    let (prefix, by) = (app.etcd.prefix.clone(), s.operator());
    match with_etcd!(app, |cl| ops::delete_setting(cl, &prefix, &c, &form.path, &by).await) {
        Ok(revision) => {
            let said = format!("{c}/{} deleted at revision {revision}.", form.path);
            Redirect::to(&format!("/config/{}?said={}", q(&c), q(&said))).into_response()
        }
        Err((code, notice)) => component_view(&app, &s, &c, vec![notice], code, ("", "")).await,
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct HistoryQuery {
    #[serde(default)]
    path: String,
    #[serde(default)]
    said: Option<String>,
}

pub async fn history(
    State(app): Shared,
    Signed(s, _): Signed,
    Path(c): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Response {
    history_view(&app, &s, &c, &query.path, said(&query.said), StatusCode::OK).await
}

async fn history_view(
    app: &App,
    s: &Session,
    component: &str,
    path: &str,
    mut notices: Vec<Notice>,
    status: StatusCode,
) -> Response {
    let title = format!("History of {component}/{path}");
    let prefix = app.etcd.prefix.clone();
    let records = match with_etcd!(app, |c| ops::setting_changes(c, &prefix, component, path).await) {
        Ok(r) => r,
        Err((code, notice)) => {
            notices.push(notice);
            return html(code, page(&title, "/config", Some(s), &notices, ""));
        }
    };
    let mut body = format!(
        "<p><a href=\"/config/{}\">← {}</a>. Each change through meshctl or the console, newest first (the last {} are kept, past etcd's compaction).</p>\
         <table class=\"history\"><tr><th>Revision</th><th>When (UTC)</th><th>By</th><th>Value</th><th>Note</th><th></th></tr>",
        q(component),
        esc(component),
        history::KEPT_PER_SETTING
    );
    if records.is_empty() {
        body.push_str("<tr><td colspan=\"6\" class=\"muted\">No recorded change.</td></tr>");
    }
    for (i, r) in records.iter().enumerate() {
        let value = r.after.as_deref().map_or("(deleted)".to_owned(), |v| ops::shown(path, v));
        let rollback = if may_change(s) && i > 0 {
            format!(
                "<form class=\"inline\" method=\"post\" action=\"/config/{}/rollback\">{}<input type=\"hidden\" name=\"path\" value=\"{}\">\
                 <input type=\"hidden\" name=\"revision\" value=\"{}\"><button class=\"quiet rollback\">Roll back to this</button></form>",
                q(component),
                csrf_field(s),
                esc(path),
                r.revision
            )
        } else {
            String::new()
        };
        let _ = write!(
            body,
            "<tr data-revision=\"{}\"><td class=\"num\">{}</td><td>{}</td><td>{}</td><td class=\"mono value\">{}</td><td>{}</td><td>{rollback}</td></tr>",
            r.revision,
            r.revision,
            esc(&ops::utc(r.at_ms)),
            esc(if r.by.is_empty() { "(not recorded)" } else { &r.by }),
            esc(&value),
            esc(&r.note),
        );
    }
    body.push_str("</table>");
    html(status, page(&title, "/config", Some(s), &notices, &body))
}

#[derive(Debug, Default, Deserialize)]
pub struct RollbackForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    revision: String,
}

pub async fn rollback(
    State(app): Shared,
    Signed(s, origin): Signed,
    Path(c): Path<String>,
    Form(form): Form<RollbackForm>,
) -> Response {
    if let Some(refused) = refusal(&s, origin, &form.csrf) {
        return refused;
    }
    let Ok(revision) = form.revision.trim().parse::<i64>() else {
        let why = format!("{:?} is not a revision: nothing was changed.", form.revision);
        return history_view(&app, &s, &c, &form.path, vec![Notice::Error(why)], StatusCode::BAD_REQUEST).await;
    };
    let (prefix, by) = (app.etcd.prefix.clone(), s.operator());
    match with_etcd!(app, |cl| ops::rollback_setting(cl, &prefix, &c, &form.path, revision, &by).await) {
        Ok((at, _)) => {
            let said = format!("{c}/{} rolled back to revision {revision} (now revision {at}).", form.path);
            Redirect::to(&format!("/config/{}/history?path={}&said={}", q(&c), q(&form.path), q(&said))).into_response()
        }
        Err((code, notice)) => history_view(&app, &s, &c, &form.path, vec![notice], code).await,
    }
}

#[derive(Debug, Default, Deserialize)]
pub struct DiffQuery {
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
}

pub async fn diff(
    State(app): Shared,
    Signed(s, _): Signed,
    Path(c): Path<String>,
    Query(query): Query<DiffQuery>,
) -> Response {
    let title = format!("Config: {c}, compared");
    let parse = |r: &str| r.trim().parse::<i64>().ok().filter(|r| *r > 0);
    let (Some(from), Some(to)) = (parse(&query.from), parse(&query.to)) else {
        let why = format!("Compare takes two revisions; {:?} and {:?} are not both revisions.", query.from, query.to);
        return component_view(&app, &s, &c, vec![Notice::Error(why)], StatusCode::BAD_REQUEST, ("", "")).await;
    };
    let prefix = app.etcd.prefix.clone();
    let read = with_etcd!(app, |cl| {
        let (a, sa) = history::settings_at(cl, &prefix, &c, from).await?;
        let (b, sb) = history::settings_at(cl, &prefix, &c, to).await?;
        Ok((history::diff(&a, &b), sa == history::Source::History || sb == history::Source::History))
    });
    let (differences, rebuilt) = match read {
        Ok(d) => d,
        Err((code, notice)) => return html(code, page(&title, "/config", Some(&s), &[notice], "")),
    };
    let mut body = format!(
        "<p><a href=\"/config/{}\">← {}</a>. Its own settings at revision {from} and at {to}.{}</p><table class=\"diff\"><tr><th></th><th>Setting</th><th>At {from}</th><th>At {to}</th></tr>",
        q(&c),
        esc(&c),
        if rebuilt { " etcd compacted a revision: rebuilt from the recorded changes." } else { "" }
    );
    if differences.is_empty() {
        body.push_str("<tr><td colspan=\"4\" class=\"muted\">No difference.</td></tr>");
    }
    for d in &differences {
        let (mark, class) = match (&d.before, &d.after) {
            (None, Some(_)) => ("+", "diff-add"),
            (Some(_), None) => ("−", "diff-del"),
            _ => ("~", "diff-chg"),
        };
        let shown = |v: &Option<String>| v.as_deref().map_or("(not set)".to_owned(), |v| ops::shown(&d.path, v));
        let _ = write!(
            body,
            "<tr class=\"{class}\"><td>{mark}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td></tr>",
            esc(&d.path),
            esc(&shown(&d.before)),
            esc(&shown(&d.after))
        );
    }
    body.push_str("</table>");
    html(StatusCode::OK, page(&title, "/config", Some(&s), &[], &body))
}

// ---------------------------------------------------------------- audit

#[derive(Debug, Default, Deserialize)]
pub struct AuditQuery {
    #[serde(default)]
    limit: Option<i64>,
}

pub async fn audit(State(app): Shared, Signed(s, _): Signed, Query(query): Query<AuditQuery>) -> Response {
    let limit = query.limit.unwrap_or(200).clamp(1, history::AUDIT_KEPT as i64);
    let prefix = app.etcd.prefix.clone();
    let entries = match with_etcd!(app, |c| Ok(history::audit_log(c, &prefix, limit).await?)) {
        Ok(e) => e,
        Err((code, notice)) => return html(code, page("Audit log", "/audit", Some(&s), &[notice], "")),
    };
    let mut body = format!(
        "<p class=\"muted\">Every change made through the console or meshctl, newest first (the last {limit} shown).</p>\
         <table class=\"audit\"><tr><th>Revision</th><th>When (UTC)</th><th>Who</th><th>What</th><th>On</th><th>Detail</th></tr>"
    );
    for e in entries {
        let _ = write!(
            body,
            "<tr><td class=\"num\">{}</td><td>{}</td><td>{}</td><td class=\"action\">{}</td><td class=\"mono\">{}</td><td class=\"mono\">{}</td></tr>",
            e.revision,
            esc(&ops::utc(e.at_ms)),
            esc(&e.by),
            esc(&e.action),
            esc(&e.target),
            esc(&e.detail)
        );
    }
    body.push_str("</table>");
    html(StatusCode::OK, page("Audit log", "/audit", Some(&s), &[], &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_in_goes_back_only_to_this_console() {
        for ok in ["/services", "/config/user?x=1", "/"] {
            assert!(local_path(ok), "{ok}");
        }
        for bad in ["//evil.example", "/\\evil.example", "https://evil.example", "", "services", "/a\r\nSet-Cookie: x"]
        {
            assert!(!local_path(bad), "{bad:?}");
        }
    }
}
