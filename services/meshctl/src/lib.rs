//! meshctl's commands, as functions that return the text they print, so
//! tests can call them.
#![forbid(unsafe_code)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use anyhow::{Context, bail};
use etcd_client::{Client, GetOptions, LeaseTimeToLiveOptions};
use meshkit_common::{
    Instance,
    admin::{fetch_pools, http_get},
    keys,
};
use meshkit_proto::scheduler::{
    Job, ListJobsRequest, ListRunsRequest, PauseJobRequest, ResumeJobRequest, RouteStrategy, RunStatus,
    TriggerJobRequest, TriggerKind, job_scheduler_client::JobSchedulerClient,
};

/// The scheduler's API in the registry.
const SCHEDULER_SERVICE: &str = "meshkit.scheduler.v1.JobScheduler";

pub const USAGE: &str = "\
usage: meshctl [--etcd HOST:PORT[,…]] [--prefix /meshkit] COMMAND

commands:
  services                       services and how many instances each has
  instances [SERVICE]            instances with address, zone, version, lease and TTL left
  leases                         leases held by instances, with TTL left and their keys
  pools INSTANCE_ID|ADMIN_ADDR   a process's balanced pools: endpoints, state, load, calls in flight
  events                         outbox relays (who publishes, how much) and consumed partitions
                                 (owner, fence, offset, lag, applied, duplicates, dead-lettered)
  config get COMPONENT           settings from etcd in force for a component (_global and its own)
  config set COMPONENT PATH JSON validate, then write a setting (`_global` for every process)
  config delete COMPONENT PATH   remove a setting
  config history COMPONENT PATH  earlier values of a setting, newest first (until etcd compacts them)
  config watch COMPONENT         print changes as they happen
  governance INSTANCE_ID|ADMIN_ADDR
                                 a process's rules, breakers, shedding and refusals by rule
  jobs list                      the scheduler's jobs: schedule, executors, state, next and last run, leader
  jobs trigger NAME [PARAM]      run a job now (PARAM replaces the job's param for this run)
  jobs pause NAME | jobs resume NAME
                                 stop or restart firing a job on schedule
  jobs history [NAME] [--limit N]
                                 the job log, newest first: trigger, slot, shard, executor, status, time
  certs --dir DIR [--trust-domain meshkit] [--days 365] NAME…
                                 a development CA (made once) and a certificate per NAME with the
                                 identity spiffe://meshkit/NAME (rotation: issue a name again)
  etcd-user COMPONENT SERVICE…   (password on stdin) the role meshkit-COMPONENT: read the mesh, write
                                 only its own registrations, groups and config; a user with it
  etcd-auth-enable               (root password on stdin) the root user, then etcd auth on
  prometheus-sd [--out FILE] [--watch]
                                 Prometheus file_sd targets: every process's admin endpoint from the
                                 registry; to stdout, or to FILE (kept current with --watch)

The etcd endpoints default to MESHKIT_ETCD_ENDPOINTS, then 127.0.0.1:2379; MESHKIT_ETCD_USERNAME,
MESHKIT_ETCD_PASSWORD and MESHKIT_ETCD_{CA,CERT,KEY}_FILE reach an etcd with auth and TLS on, and
MESHKIT_TLS_{ENABLED,CERT_FILE,KEY_FILE,CA_FILE} give meshctl a certificate for mTLS services.";

/// One registration read from etcd.
#[derive(Debug, Clone)]
pub struct Registration {
    pub service: String,
    pub instance_id: String,
    pub instance: Option<Instance>,
    pub lease: i64,
}

/// Every registration under `{prefix}/services/`, optionally of one service.
pub async fn registrations(
    client: &mut Client,
    prefix: &str,
    service: Option<&str>,
) -> anyhow::Result<Vec<Registration>> {
    let root = match service {
        Some(s) => keys::service(prefix, s),
        None => keys::services(prefix),
    };
    let resp =
        client.get(root.as_str(), Some(GetOptions::new().with_prefix())).await.context("reading the registry")?;
    let base = keys::services(prefix);
    let mut out = Vec::new();
    for kv in resp.kvs() {
        let key = kv.key_str().unwrap_or_default();
        let Some((service, id)) = key.strip_prefix(&base).and_then(|rest| rest.split_once('/')) else { continue };
        out.push(Registration {
            service: service.to_owned(),
            instance_id: id.to_owned(),
            instance: serde_json::from_slice(kv.value()).ok(),
            lease: kv.lease(),
        });
    }
    Ok(out)
}

pub async fn services(client: &mut Client, prefix: &str) -> anyhow::Result<String> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for r in registrations(client, prefix, None).await? {
        *counts.entry(r.service).or_default() += 1;
    }
    let mut out = format!("{:<48} {}\n", "SERVICE", "INSTANCES");
    for (service, n) in counts {
        let _ = writeln!(out, "{service:<48} {n}");
    }
    Ok(out)
}

pub async fn instances(client: &mut Client, prefix: &str, service: Option<&str>) -> anyhow::Result<String> {
    let regs = registrations(client, prefix, service).await?;
    let mut out = format!(
        "{:<36} {:<22} {:<22} {:<8} {:<10} {:<20} {:>5} {}\n",
        "SERVICE", "INSTANCE", "ADDR", "ZONE", "VERSION", "LEASE", "TTL", "ADMIN"
    );
    for r in regs {
        let ttl = ttl_left(client, r.lease).await;
        let (addr, zone, version, admin) = match &r.instance {
            Some(i) => (
                i.addr.as_str(),
                i.zone.as_str(),
                i.version.as_str(),
                i.metadata.get("admin").map(String::as_str).unwrap_or("-"),
            ),
            None => ("(unreadable value)", "", "", "-"),
        };
        let _ = writeln!(
            out,
            "{:<36} {:<22} {:<22} {:<8} {:<10} {:<20} {:>5} {}",
            r.service,
            r.instance_id,
            addr,
            if zone.is_empty() { "-" } else { zone },
            version,
            r.lease,
            ttl,
            admin
        );
    }
    Ok(out)
}

pub async fn leases(client: &mut Client, prefix: &str) -> anyhow::Result<String> {
    let mut by_lease: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for r in registrations(client, prefix, None).await? {
        by_lease.entry(r.lease).or_default().push(format!("{}/{}", r.service, r.instance_id));
    }
    let mut out = format!("{:<20} {:>5}  {}\n", "LEASE", "TTL", "KEYS");
    for (lease, keys) in by_lease {
        let ttl = ttl_left(client, lease).await;
        let _ = writeln!(out, "{:<20} {:>5}  {}", lease, ttl, keys.join(", "));
    }
    Ok(out)
}

/// The admin address of `target`: itself when it is `host:port`, else the
/// `admin` metadata of the instance with that id.
async fn admin_of(client: &mut Client, prefix: &str, target: &str) -> anyhow::Result<String> {
    if target.contains(':') {
        return Ok(target.to_owned());
    }
    let regs = registrations(client, prefix, None).await?;
    let Some(r) = regs.iter().find(|r| r.instance_id == target) else {
        bail!("no registered instance has the id {target:?}; `meshctl instances` lists them");
    };
    match r.instance.as_ref().and_then(|i| i.metadata.get("admin")) {
        Some(a) => Ok(a.clone()),
        None => bail!("instance {target:?} publishes no admin endpoint"),
    }
}

/// `target` is an admin address (`host:port`) or an instance id to look up.
pub async fn pools(client: &mut Client, prefix: &str, target: &str) -> anyhow::Result<String> {
    let admin = admin_of(client, prefix, target).await?;
    let report = fetch_pools(&admin).await.with_context(|| format!("asking {admin} for its pools"))?;
    if report.is_empty() {
        return Ok(format!("{admin}: this process holds no balanced channel\n"));
    }
    let mut out = String::new();
    for (service, pool) in report {
        let _ = writeln!(out, "{service} ({} endpoints, {} ejected)", pool.endpoints.len(), pool.ejected);
        let _ = writeln!(
            out,
            "  {:<22} {:<22} {:<8} {:>8} {:>6} {:>9} {:>10} {:>8} {:>8}",
            "INSTANCE", "ADDR", "STATE", "INFLIGHT", "CONNS", "RTT_MS", "COST_US", "CALLS", "FAILURES"
        );
        for (id, e) in pool.endpoints {
            let text = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_owned();
            let count = |k: &str| e.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
            let number = |k: &str| e.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
            // The load p2c compares, in nanoseconds of weighted latency: shown in µs.
            let _ = writeln!(
                out,
                "  {:<22} {:<22} {:<8} {:>8} {:>6} {:>9.3} {:>10.1} {:>8} {:>8}",
                id,
                text("addr"),
                text("state"),
                count("inflight"),
                count("connections"),
                number("rtt_ms"),
                number("load") / 1000.0,
                count("calls"),
                count("failures"),
            );
        }
    }
    Ok(out)
}

/// The relays and consumers of every registered process, from their `/reports`.
pub async fn events(client: &mut Client, prefix: &str) -> anyhow::Result<String> {
    let mut admins: BTreeMap<String, String> = BTreeMap::new();
    for r in registrations(client, prefix, None).await? {
        if let Some(admin) = r.instance.as_ref().and_then(|i| i.metadata.get("admin")) {
            admins.insert(r.instance_id.clone(), admin.clone());
        }
    }
    let mut relays = String::new();
    let mut consumers = String::new();
    for (id, admin) in &admins {
        let report: serde_json::Value = match http_get(admin, "/reports").await {
            Ok(body) => serde_json::from_str(&body).unwrap_or_default(),
            Err(e) => {
                let _ = writeln!(relays, "  {id:<22} unreachable: {e}");
                continue;
            }
        };
        if let Some(r) = report.get("outbox_relay") {
            let _ = writeln!(
                relays,
                "  {:<22} {:<8} {:>10} {:>9} {:>12.1}",
                id,
                if r["leading"].as_bool().unwrap_or(false) { "yes" } else { "no" },
                r["published"].as_u64().unwrap_or(0),
                r["failures"].as_u64().unwrap_or(0),
                r["last_lag_ms"].as_f64().unwrap_or(0.0),
            );
        }
        for p in report.get("consumer").and_then(|c| c.as_array()).into_iter().flatten() {
            let n = |k: &str| p[k].as_i64().unwrap_or(0);
            let _ = writeln!(
                consumers,
                "  {:<22} {:<16} {:>4} {:>7} {:>9} {:>9} {:>7} {:>9} {:>6} {:>5}",
                id,
                p["topic"].as_str().unwrap_or("-"),
                n("partition"),
                n("fence_revision"),
                n("next_offset"),
                n("high_watermark"),
                n("lag"),
                n("applied"),
                n("duplicates"),
                n("dead_lettered"),
            );
        }
    }
    let mut out = String::from("outbox relays\n");
    let _ = writeln!(
        out,
        "  {:<22} {:<8} {:>10} {:>9} {:>12}",
        "INSTANCE", "LEADING", "PUBLISHED", "FAILURES", "LAST_LAG_MS"
    );
    out.push_str(if relays.is_empty() { "  (none)\n" } else { &relays });
    out.push_str("consumed partitions\n");
    let _ = writeln!(
        out,
        "  {:<22} {:<16} {:>4} {:>7} {:>9} {:>9} {:>7} {:>9} {:>6} {:>5}",
        "INSTANCE", "TOPIC", "PART", "FENCE", "NEXT", "HWM", "LAG", "APPLIED", "DUPS", "DLQ"
    );
    out.push_str(if consumers.is_empty() { "  (none)\n" } else { &consumers });
    Ok(out)
}

async fn ttl_left(client: &mut Client, lease: i64) -> String {
    if lease == 0 {
        return "-".into();
    }
    match client.lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new())).await {
        Ok(r) if r.ttl() >= 0 => format!("{}s", r.ttl()),
        Ok(_) => "gone".into(),
        Err(_) => "?".into(),
    }
}

/// Prometheus file-based discovery (`file_sd_configs`): one target group per
/// process that registered an admin endpoint, labelled with its component,
/// instance id and the services it registered. JSON, sorted, so an unchanged
/// registry writes the same bytes.
pub async fn prometheus_targets(client: &mut Client, prefix: &str) -> anyhow::Result<String> {
    // admin address → (component, instance id, services)
    let mut processes: BTreeMap<String, (String, String, Vec<String>)> = BTreeMap::new();
    for r in registrations(client, prefix, None).await? {
        let Some(instance) = r.instance else { continue };
        let Some(admin) = instance.metadata.get("admin") else { continue };
        let component = instance.metadata.get("component").cloned().unwrap_or_default();
        let entry = processes.entry(admin.clone()).or_insert_with(|| (component, r.instance_id.clone(), Vec::new()));
        entry.2.push(r.service);
    }
    let groups: Vec<serde_json::Value> = processes
        .into_iter()
        .map(|(admin, (component, id, mut services))| {
            services.sort();
            serde_json::json!({
                "targets": [admin],
                "labels": {
                    "job": "meshkit",
                    "component": component,
                    "meshkit_instance": id,
                    "services": services.join(","),
                },
            })
        })
        .collect();
    Ok(serde_json::to_string_pretty(&groups)? + "\n")
}

/// Writes [`prometheus_targets`] to `out` (atomically: a temp file renamed
/// over it, as Prometheus expects); returns whether the content changed.
pub async fn write_prometheus_targets(
    client: &mut Client,
    prefix: &str,
    out: &std::path::Path,
) -> anyhow::Result<bool> {
    let text = prometheus_targets(client, prefix).await?;
    if tokio::fs::read_to_string(out).await.is_ok_and(|old| old == text) {
        return Ok(false);
    }
    let tmp = out.with_extension("json.tmp");
    tokio::fs::write(&tmp, &text).await.with_context(|| format!("writing {}", tmp.display()))?;
    tokio::fs::rename(&tmp, out).await.with_context(|| format!("renaming onto {}", out.display()))?;
    Ok(true)
}

/// Keeps `out` up to date: rewritten on every registry change, and every
/// `resync` anyway (a missed watch event costs one period at most).
pub async fn watch_prometheus_targets(
    client: &mut Client,
    prefix: &str,
    out: &std::path::Path,
    resync: std::time::Duration,
) -> anyhow::Result<()> {
    let root = keys::services(prefix);
    loop {
        write_prometheus_targets(client, prefix, out).await?;
        let watched = client.watch(root.as_str(), Some(etcd_client::WatchOptions::new().with_prefix())).await;
        let mut stream = match watched {
            Ok(stream) => stream,
            Err(e) => {
                eprintln!("meshctl: watching {root} failed ({e}); retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        let deadline = tokio::time::sleep(resync);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                () = &mut deadline => break,
                message = stream.message() => match message {
                    Ok(Some(_)) => {
                        // Let a burst (a rolling restart) settle into one write.
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        write_prometheus_targets(client, prefix, out).await?;
                    }
                    Ok(None) | Err(_) => break,
                },
            }
        }
    }
}

// === config ===

use meshkit_common::{
    MeshConfig,
    config::Settings,
    config_center::{self, Entry, GLOBAL},
};

/// `entries` laid over `C`'s defaults, as a process with settings `C` applies them.
fn overlay_as<C: Settings>(entries: &[Entry]) -> Result<BTreeSet<String>, String> {
    config_center::overlay(&C::default(), entries).map_err(|e| e.to_string())?;
    let sections = meshkit_common::config::defaults::<C>().map_err(|e| e.to_string())?;
    Ok(sections.keys().cloned().collect())
}

/// The settings type of each component meshctl knows, applied to `entries`:
/// the sections that component reads, or why it would refuse them.
fn overlay_for(component: &str, entries: &[Entry]) -> Option<Result<BTreeSet<String>, String>> {
    Some(match component {
        "user" => overlay_as::<meshkit_user::Config>(entries),
        "order" => overlay_as::<meshkit_order::Config>(entries),
        "notification" => overlay_as::<meshkit_notification::Config>(entries),
        "scheduler" => overlay_as::<meshkit_scheduler::Config>(entries),
        "gateway" => overlay_as::<meshkit_gateway::GatewayConfig>(entries),
        _ => return None,
    })
}

/// The components whose settings types meshctl checks a change against.
pub const KNOWN_COMPONENTS: &[&str] = &["user", "order", "notification", "scheduler", "gateway"];

/// Checks a change to `component`'s settings (`path` the key changed) as
/// the processes that read it will: a named component by its own settings
/// type, and `_global` by every component's, which must between them read
/// the section. A component meshctl does not know is checked against the
/// sections every process reads.
pub fn check_change(component: &str, path: &str, entries: &[Entry]) -> Result<(), String> {
    let section = path.split('.').next().unwrap_or_default();
    let known: Vec<&str> = if component == GLOBAL { KNOWN_COMPONENTS.to_vec() } else { vec![component] };
    let mut read_by_any = false;
    for name in known {
        match overlay_for(name, entries) {
            Some(Ok(sections)) => read_by_any |= sections.contains(section),
            Some(Err(e)) => return Err(if component == GLOBAL { format!("{name}: {e}") } else { e }),
            None => {
                config_center::overlay(&MeshConfig::default(), entries).map_err(|e| e.to_string())?;
                return Ok(());
            }
        }
    }
    if !read_by_any {
        let who = if component == GLOBAL { "no component".to_owned() } else { component.to_owned() };
        return Err(format!("unknown setting `{path}`: {who} reads no section `{section}`"));
    }
    Ok(())
}

fn check_component(component: &str) -> anyhow::Result<()> {
    if component.is_empty() || component.contains('/') {
        bail!("{component:?} is not a component name (user, order, gateway, … or {GLOBAL})");
    }
    Ok(())
}

/// The value as stored: JSON as given, or a bare word taken as a string.
pub fn json_value(raw: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(_) => raw.trim().to_owned(),
        Err(_) => serde_json::Value::String(raw.to_owned()).to_string(),
    }
}

pub async fn config_get(client: &mut Client, prefix: &str, component: &str) -> anyhow::Result<String> {
    check_component(component)?;
    let (entries, revision) = config_center::read(client, prefix, component).await?;
    let mut out =
        format!("# {component}: settings from etcd at revision {revision} (the component's own win over {GLOBAL})\n");
    let _ = writeln!(out, "{:<10} {:<40} {:>8}  VALUE", "SCOPE", "PATH", "REVISION");
    for e in &entries {
        let _ = writeln!(out, "{:<10} {:<40} {:>8}  {}", e.scope, e.path, e.mod_revision, shown(&e.path, &e.value));
    }
    if entries.is_empty() {
        let _ = writeln!(out, "(none: the processes run on their own file and environment settings)");
    }
    Ok(out)
}

/// Validates the change against the entries already there (over the
/// defaults), then writes it. An invalid value is refused, naming the problem.
pub async fn config_set(
    client: &mut Client,
    prefix: &str,
    component: &str,
    path: &str,
    raw: &str,
) -> anyhow::Result<String> {
    check_component(component)?;
    let value = json_value(raw);
    let (mut entries, _) = config_center::read(client, prefix, component).await?;
    entries.retain(|e| !(e.scope == component && e.path == path));
    entries.push(Entry { scope: component.to_owned(), path: path.to_owned(), value: value.clone(), mod_revision: 0 });
    if let Err(e) = check_change(component, path, &entries) {
        bail!("refused, nothing written: {e}");
    }
    let key = format!("{}{path}", config_center::config_prefix(prefix, component));
    let resp = client.put(key.as_str(), value.as_str(), None).await.context("writing to etcd")?;
    let revision = resp.header().map_or(0, |h| h.revision());
    Ok(format!("{component}/{path} = {} (revision {revision})\n", shown(path, &value)))
}

/// Whether a setting's name says it holds a secret.
fn secret_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["password", "secret", "token"].iter().any(|s| name.contains(s))
}

/// A setting's JSON as meshctl prints it: secrets (by the setting's name, at
/// any depth) replaced by `"<redacted>"`.
pub fn shown(path: &str, value: &str) -> String {
    fn redact(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    if secret_name(k) {
                        *v = serde_json::Value::String("<redacted>".into());
                    } else {
                        redact(v);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
            _ => {}
        }
    }
    if path.rsplit('.').next().is_some_and(secret_name) {
        return "\"<redacted>\"".into();
    }
    match serde_json::from_str::<serde_json::Value>(value) {
        Ok(mut v) => {
            redact(&mut v);
            v.to_string()
        }
        Err(_) => value.to_owned(),
    }
}

pub async fn config_delete(client: &mut Client, prefix: &str, component: &str, path: &str) -> anyhow::Result<String> {
    check_component(component)?;
    let key = format!("{}{path}", config_center::config_prefix(prefix, component));
    let resp = client.delete(key.as_str(), None).await.context("deleting from etcd")?;
    if resp.deleted() == 0 {
        bail!("{component}/{path} is not set");
    }
    Ok(format!("{component}/{path} deleted\n"))
}

/// Walks the key's earlier revisions (etcd keeps them until compaction).
pub async fn config_history(client: &mut Client, prefix: &str, component: &str, path: &str) -> anyhow::Result<String> {
    check_component(component)?;
    let key = format!("{}{path}", config_center::config_prefix(prefix, component));
    let mut out = format!("{:>8}  VALUE\n", "REVISION");
    let mut at: Option<i64> = None;
    let mut found = 0;
    loop {
        let options = at.map(|r| GetOptions::new().with_revision(r));
        let resp = match client.get(key.as_str(), options).await {
            Ok(resp) => resp,
            Err(e) if found > 0 => {
                let _ = writeln!(out, "(older values compacted away: {e})");
                break;
            }
            Err(e) => return Err(e).context("reading from etcd"),
        };
        let Some(kv) = resp.kvs().first() else { break };
        found += 1;
        let _ = writeln!(out, "{:>8}  {}", kv.mod_revision(), shown(path, &String::from_utf8_lossy(kv.value())));
        if kv.version() <= 1 || found >= 100 {
            break;
        }
        at = Some(kv.mod_revision() - 1);
    }
    if found == 0 {
        bail!("{component}/{path} is not set");
    }
    Ok(out)
}

/// Prints each change to the component's or the global settings, up to
/// `max` changes (forever without).
pub async fn config_watch(
    client: &mut Client,
    prefix: &str,
    component: &str,
    max: Option<usize>,
    mut print: impl FnMut(&str),
) -> anyhow::Result<()> {
    check_component(component)?;
    let root = keys::config_root(prefix);
    let mut stream =
        client.watch(root.as_str(), Some(etcd_client::WatchOptions::new().with_prefix())).await.context("watching")?;
    let mut seen = 0;
    while let Some(resp) = stream.message().await? {
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let key = kv.key_str().unwrap_or_default();
            let Some((scope, path)) = key.strip_prefix(&root).and_then(|r| r.split_once('/')) else { continue };
            if scope != component && scope != GLOBAL {
                continue;
            }
            let line = match event.event_type() {
                etcd_client::EventType::Put => {
                    format!(
                        "{:>8}  set     {scope}/{path} = {}",
                        kv.mod_revision(),
                        shown(path, &String::from_utf8_lossy(kv.value()))
                    )
                }
                etcd_client::EventType::Delete => format!("{:>8}  delete  {scope}/{path}", kv.mod_revision()),
            };
            print(&line);
            seen += 1;
            if max.is_some_and(|m| seen >= m) {
                return Ok(());
            }
        }
    }
    Ok(())
}

// === governance ===

/// A process's governance, from its `/reports`.
pub async fn governance(client: &mut Client, prefix: &str, target: &str) -> anyhow::Result<String> {
    let admin = admin_of(client, prefix, target).await?;
    let text = http_get(&admin, "/reports").await.with_context(|| format!("asking {admin} for its reports"))?;
    let reports: serde_json::Value = serde_json::from_str(&text).context("reading /reports")?;
    let g = &reports["governance"];
    if g.is_null() {
        bail!("{admin} reports no governance");
    }
    let mut out = String::new();
    let _ = writeln!(out, "RULES");
    let methods = g["rules"]["methods"].as_object().cloned().unwrap_or_default();
    if methods.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for (pattern, rule) in methods {
        let n = |k: &str| rule[k].as_f64().unwrap_or(0.0);
        let breaker = if rule["breaker"]["enabled"].as_bool() == Some(true) {
            format!(
                "error_ratio={} slow_ratio={} min_requests={} open_ms={}",
                rule["breaker"]["error_ratio"],
                rule["breaker"]["slow_ratio"],
                rule["breaker"]["min_requests"],
                rule["breaker"]["open_ms"]
            )
        } else {
            "off".into()
        };
        let _ = writeln!(
            out,
            "  {pattern}  qps={} burst={} concurrency={} caller_qps={} timeout_ms={} breaker: {breaker}",
            n("qps"),
            n("burst"),
            n("concurrency"),
            n("caller_qps"),
            n("timeout_ms"),
        );
    }
    match g["shedding"].as_object() {
        Some(s) => {
            let _ = writeln!(
                out,
                "SHEDDING  on: in_flight={} capacity={} cpu={:.2} shed={}",
                s["in_flight"],
                s["capacity"],
                s["cpu"].as_f64().unwrap_or(0.0),
                s["shed"]
            );
        }
        None => {
            let _ = writeln!(out, "SHEDDING  off");
        }
    }
    let breakers = g["breakers"].as_array().cloned().unwrap_or_default();
    if !breakers.is_empty() {
        let _ = writeln!(out, "BREAKERS\n  {:<40} {:<48} STATE", "SERVICE", "METHOD");
        for b in breakers {
            let s = |k: &str| b[k].as_str().unwrap_or("-").to_owned();
            let _ = writeln!(out, "  {:<40} {:<48} {}", s("service"), s("method"), s("state"));
        }
    }
    let _ = writeln!(out, "REJECTIONS\n  {:<7} {:<48} {:<12} {:>8}", "SIDE", "TARGET", "RULE", "COUNT");
    for r in g["rejections"].as_array().cloned().unwrap_or_default() {
        let s = |k: &str| r[k].as_str().unwrap_or("-").to_owned();
        let _ = writeln!(out, "  {:<7} {:<48} {:<12} {:>8}", s("side"), s("target"), s("rule"), r["count"]);
    }
    Ok(out)
}

/// mTLS for meshctl's own calls, from `MESHKIT_TLS_ENABLED`,
/// `MESHKIT_TLS_CERT_FILE`, `MESHKIT_TLS_KEY_FILE` and `MESHKIT_TLS_CA_FILE`.
pub fn client_tls() -> anyhow::Result<Option<std::sync::Arc<meshkit_common::tls::Tls>>> {
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    if !matches!(var("MESHKIT_TLS_ENABLED").as_str(), "1" | "true") {
        return Ok(None);
    }
    let settings = meshkit_common::config::TlsSettings {
        enabled: true,
        cert_file: var("MESHKIT_TLS_CERT_FILE"),
        key_file: var("MESHKIT_TLS_KEY_FILE"),
        ca_file: var("MESHKIT_TLS_CA_FILE"),
        ..Default::default()
    };
    Ok(Some(meshkit_common::tls::Tls::load(&settings)?))
}

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

fn ms_of(t: Option<&prost_types::Timestamp>) -> Option<i64> {
    t.map(|t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

fn when(t: Option<&prost_types::Timestamp>) -> String {
    ms_of(t).map_or_else(|| "-".into(), meshkit_common::jobs::format_slot)
}

fn run_status(status: i32) -> &'static str {
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

/// `jobs trigger NAME [PARAM]`.
pub async fn jobs_trigger(
    client: &mut Client,
    prefix: &str,
    name: &str,
    param: Option<&str>,
) -> anyhow::Result<String> {
    let request = TriggerJobRequest { name: name.to_owned(), param: param.map(str::to_owned) };
    let resp = scheduler(client, prefix).await?.trigger_job(request).await.map_err(status_error)?.into_inner();
    Ok(format!("triggered {name}: run {}\n", resp.run_ids.join(", ")))
}

/// `jobs pause NAME` / `jobs resume NAME`.
pub async fn jobs_pause(client: &mut Client, prefix: &str, name: &str, pause: bool) -> anyhow::Result<String> {
    let mut scheduler = scheduler(client, prefix).await?;
    let job = if pause {
        scheduler.pause_job(PauseJobRequest { name: name.to_owned() }).await
    } else {
        scheduler.resume_job(ResumeJobRequest { name: name.to_owned() }).await
    }
    .map_err(status_error)?
    .into_inner();
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

pub mod certs;

/// The key prefixes a component may write, and the role that grants them:
/// its own registrations, its own slot groups (outbox relay, consumers,
/// the scheduler's election) and its own config scope; read on the whole mesh.
pub fn role_grants(prefix: &str, component: &str, services: &[&str]) -> Vec<(String, bool)> {
    let mut grants = vec![(format!("{prefix}/"), false)];
    for service in services {
        grants.push((keys::service(prefix, service), true));
    }
    grants.push((keys::group(prefix, &keys::outbox_group(component)), true));
    grants.push((keys::group(prefix, &format!("consumers/{component}")), true));
    grants.push((keys::group(prefix, component), true));
    grants.push((keys::config(prefix, component), true));
    grants
}

/// `etcd-user COMPONENT SERVICE…`: creates (or updates) the role
/// `meshkit-COMPONENT` with [`role_grants`] and the user COMPONENT with it.
pub async fn etcd_user(
    client: &mut Client,
    prefix: &str,
    component: &str,
    services: &[&str],
    password: &str,
) -> anyhow::Result<String> {
    use etcd_client::{Permission, RoleRevokePermissionOptions};
    anyhow::ensure!(
        !component.is_empty() && component.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "{component:?} is not a component name"
    );
    anyhow::ensure!(password.len() >= 8, "the password must have at least 8 characters");
    let role = format!("meshkit-{component}");
    if client.role_get(role.as_str()).await.is_err() {
        client.role_add(role.as_str()).await.context("adding the role")?;
    } else {
        // Start from nothing, so the role grants exactly what is listed.
        let existing = client.role_get(role.as_str()).await.context("reading the role")?;
        for perm in existing.permissions() {
            let options = RoleRevokePermissionOptions::new().with_range_end(perm.range_end());
            let _ = client.role_revoke_permission(role.as_str(), perm.key(), Some(options)).await;
        }
    }
    let mut out = String::new();
    for (key, write) in role_grants(prefix, component, services) {
        let permission =
            if write { Permission::read_write(key.as_str()) } else { Permission::read(key.as_str()) }.with_prefix();
        client.role_grant_permission(role.as_str(), permission).await.context("granting a permission")?;
        let _ = writeln!(out, "{role}: {} {key}*", if write { "readwrite" } else { "read" });
    }
    if client.user_get(component).await.is_err() {
        client.user_add(component, password, None).await.context("adding the user")?;
    } else {
        client.user_change_password(component, password).await.context("changing the user's password")?;
    }
    client.user_grant_role(component, role.as_str()).await.context("granting the role")?;
    let _ = writeln!(out, "user {component}: role {role}");
    Ok(out)
}

/// `etcd-auth-enable`: the `root` user (with the root role) and auth on.
pub async fn etcd_auth_enable(client: &mut Client, root_password: &str) -> anyhow::Result<String> {
    anyhow::ensure!(root_password.len() >= 8, "the root password must have at least 8 characters");
    if client.user_get("root").await.is_err() {
        client.user_add("root", root_password, None).await.context("adding root")?;
    }
    if client.role_get("root").await.is_err() {
        client.role_add("root").await.context("adding the root role")?;
    }
    client.user_grant_role("root", "root").await.context("granting root")?;
    client.auth_enable().await.context("enabling auth")?;
    Ok("etcd auth enabled; connect as root (MESHKIT_ETCD_USERNAME / MESHKIT_ETCD_PASSWORD) to manage it\n".into())
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_are_redacted_by_name_at_any_depth() {
        assert_eq!(super::shown("etcd.password", "\"p4ss\""), "\"<redacted>\"");
        assert_eq!(
            super::shown("events", r#"{"sasl_password":"p4ss","brokers":["a:1"]}"#),
            r#"{"brokers":["a:1"],"sasl_password":"<redacted>"}"#
        );
        assert_eq!(
            super::shown("gateway", r#"{"jwt":{"hs256_secret":"s3cret","issuer":"me"}}"#),
            r#"{"jwt":{"hs256_secret":"<redacted>","issuer":"me"}}"#
        );
        assert_eq!(super::shown("log.filter", "\"info\""), "\"info\"");
    }
}
