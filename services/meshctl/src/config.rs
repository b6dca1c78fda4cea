//! `meshctl config`: the config center, each change checked as the component it names will check it.

use std::{collections::BTreeSet, fmt::Write as _};

use anyhow::{Context, bail};
use etcd_client::{Client, GetOptions};
use meshkit_common::keys;

use meshkit_common::{
    MeshConfig,
    config::{DatabaseSettings, EventSettings, Settings},
    config_center::{self, Entry, GLOBAL},
    history,
};
use serde::{Deserialize, Serialize};

/// The sections user-service reads (`meshkit_user::Config`). meshctl
/// composes the reference services' sections from the concerns' types
/// rather than linking the services, so a change to a service does not
/// rebuild meshctl; an integration test checks these against the services'
/// own settings types.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct WithDatabase {
    #[serde(flatten)]
    mesh: MeshConfig,
    database: DatabaseSettings,
}

meshkit_common::compose_settings!(WithDatabase { database });

/// The sections order-service and notification-service read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
struct WithEvents {
    #[serde(flatten)]
    mesh: MeshConfig,
    database: DatabaseSettings,
    events: EventSettings,
}

meshkit_common::compose_settings!(WithEvents { database, events });

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
        "user" => overlay_as::<WithDatabase>(entries),
        "order" | "notification" => overlay_as::<WithEvents>(entries),
        "scheduler" => overlay_as::<meshkit_scheduler::Config>(entries),
        "gateway" => overlay_as::<meshkit_gateway::GatewayConfig>(entries),
        _ => return None,
    })
}

/// The sections `component` reads, as meshctl checks them (None: a
/// component meshctl does not know).
pub fn sections_of(component: &str) -> Option<BTreeSet<String>> {
    overlay_for(component, &[]).and_then(Result::ok)
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
        let who = if component == GLOBAL { "no component reads a".to_owned() } else { format!("{component} reads no") };
        return Err(format!("unknown setting `{path}`: {who} section `{section}`"));
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
/// defaults), then writes it with its history record and audit entry. An
/// invalid value is refused, naming the problem, and nothing is written.
/// Returns the revision of the change.
pub async fn set_setting(
    client: &mut Client,
    prefix: &str,
    component: &str,
    path: &str,
    raw: &str,
    by: &str,
) -> anyhow::Result<i64> {
    write_checked(client, prefix, component, path, Some(&json_value(raw)), by, "").await
}

/// Removes a setting, recorded like a change.
pub async fn delete_setting(
    client: &mut Client,
    prefix: &str,
    component: &str,
    path: &str,
    by: &str,
) -> anyhow::Result<i64> {
    write_checked(client, prefix, component, path, None, by, "").await
}

/// Sets `path` back to its value at `revision` (or removes it, if it was
/// not set then), checked like any change; the history says "rollback to".
/// Returns the revision of the change and the value now (`None`: removed).
pub async fn rollback_setting(
    client: &mut Client,
    prefix: &str,
    component: &str,
    path: &str,
    revision: i64,
    by: &str,
) -> anyhow::Result<(i64, Option<String>)> {
    check_component(component)?;
    let (mut then, _) = history::settings_at(client, prefix, component, revision).await?;
    let value = then.remove(path);
    let note = format!("rollback to {revision}");
    let at = write_checked(client, prefix, component, path, value.as_deref(), by, &note).await?;
    Ok((at, value))
}

async fn write_checked(
    client: &mut Client,
    prefix: &str,
    component: &str,
    path: &str,
    value: Option<&str>,
    by: &str,
    note: &str,
) -> anyhow::Result<i64> {
    check_component(component)?;
    check_path(path)?;
    let (mut entries, _) = config_center::read(client, prefix, component).await?;
    let current = entries.iter().find(|e| e.scope == component && e.path == path).cloned();
    if value.is_none() && current.is_none() {
        bail!("{component}/{path} is not set");
    }
    if let (Some(v), Some(c)) = (value, &current)
        && v == c.value
    {
        bail!("{component}/{path} is already {}; nothing written", shown(path, v));
    }
    entries.retain(|e| !(e.scope == component && e.path == path));
    if let Some(v) = value {
        entries.push(Entry {
            scope: component.to_owned(),
            path: path.to_owned(),
            value: v.to_owned(),
            mod_revision: 0,
        });
        if let Err(e) = check_change(component, path, &entries) {
            bail!("refused, nothing written: {e}");
        }
    }
    let write = history::SettingWrite {
        component,
        path,
        value,
        expected_revision: current.as_ref().map_or(0, |c| c.mod_revision),
        before: current.as_ref().map(|c| c.value.as_str()),
        by,
        note,
        audit_detail: match value {
            Some(v) => shown(path, v),
            None => "deleted".into(),
        },
    };
    Ok(history::write_setting(client, prefix, write).await?)
}

fn check_path(path: &str) -> anyhow::Result<()> {
    if path.is_empty() || path.contains('/') || path.split('.').any(str::is_empty) {
        bail!("{path:?} is not a dotted setting path (log.filter, governance.methods, …)");
    }
    Ok(())
}

/// `config set`: [`set_setting`], said in a line.
pub async fn config_set(
    client: &mut Client,
    prefix: &str,
    component: &str,
    path: &str,
    raw: &str,
    by: &str,
) -> anyhow::Result<String> {
    let revision = set_setting(client, prefix, component, path, raw, by).await?;
    Ok(format!("{component}/{path} = {} (revision {revision})\n", shown(path, &json_value(raw))))
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

pub async fn config_delete(
    client: &mut Client,
    prefix: &str,
    component: &str,
    path: &str,
    by: &str,
) -> anyhow::Result<String> {
    let revision = delete_setting(client, prefix, component, path, by).await?;
    Ok(format!("{component}/{path} deleted (revision {revision})\n"))
}

/// `config rollback`: [`rollback_setting`], said in a line.
pub async fn config_rollback(
    client: &mut Client,
    prefix: &str,
    component: &str,
    path: &str,
    revision: i64,
    by: &str,
) -> anyhow::Result<String> {
    let (at, now) = rollback_setting(client, prefix, component, path, revision, by).await?;
    Ok(match &now {
        Some(v) => format!("{component}/{path} = {} as at revision {revision} (revision {at})\n", shown(path, v)),
        None => format!("{component}/{path} deleted: it was not set at revision {revision} (revision {at})\n"),
    })
}

/// A setting's changes, newest first: the recorded ones (who, when, why,
/// kept past compaction), else etcd's earlier revisions of the key.
pub async fn config_history(client: &mut Client, prefix: &str, component: &str, path: &str) -> anyhow::Result<String> {
    check_component(component)?;
    let records = setting_changes(client, prefix, component, path).await?;
    if records.iter().all(|r| r.by.is_empty()) {
        return revisions_of(client, prefix, component, path).await;
    }
    let mut out = format!("{:>8}  {:<20} {:<24} VALUE\n", "REVISION", "WHEN (UTC)", "BY");
    for r in &records {
        let value = match &r.after {
            Some(v) => shown(path, v),
            None => "(deleted)".into(),
        };
        let note = if r.note.is_empty() { String::new() } else { format!("  [{}]", r.note) };
        let by = if r.by.is_empty() { "(not recorded)" } else { r.by.as_str() };
        let _ = writeln!(out, "{:>8}  {:<20} {:<24} {value}{note}", r.revision, utc(r.at_ms), by);
    }
    if records.len() >= history::KEPT_PER_SETTING {
        let _ = writeln!(out, "(the last {} changes are kept)", history::KEPT_PER_SETTING);
    }
    Ok(out)
}

/// A setting's recorded changes, newest first, led by its value now when
/// that was written around meshctl and the console (`etcdctl put`): a
/// record with no `by` and the note saying so.
pub async fn setting_changes(
    client: &mut Client,
    prefix: &str,
    component: &str,
    path: &str,
) -> anyhow::Result<Vec<history::Record>> {
    let mut records = history::setting_history(client, prefix, component, path).await?;
    let key = format!("{}{path}", config_center::config_prefix(prefix, component));
    let now = client.get(key.as_str(), None).await.context("reading from etcd")?;
    if let Some(kv) = now.kvs().first()
        && records.first().is_none_or(|r| kv.mod_revision() > r.revision)
    {
        let value = String::from_utf8_lossy(kv.value()).into_owned();
        records.insert(
            0,
            history::Record {
                path: path.to_owned(),
                before: records.first().and_then(|r| r.after.clone()),
                after: Some(value),
                by: String::new(),
                at_ms: 0,
                note: "written around meshctl and the console".into(),
                revision: kv.mod_revision(),
            },
        );
    }
    Ok(records)
}

/// `config diff COMPONENT FROM [TO]`: the component's own settings that
/// differ between two revisions (TO: now).
pub async fn config_diff(
    client: &mut Client,
    prefix: &str,
    component: &str,
    from: i64,
    to: Option<i64>,
) -> anyhow::Result<String> {
    check_component(component)?;
    let to = match to {
        Some(to) => to,
        None => config_center::read(client, prefix, component).await?.1,
    };
    let (a, source_a) = history::settings_at(client, prefix, component, from).await?;
    let (b, source_b) = history::settings_at(client, prefix, component, to).await?;
    let mut out = format!("# {component}: its own settings, revision {from} → {to}\n");
    let differences = history::diff(&a, &b);
    for d in &differences {
        let _ = match (&d.before, &d.after) {
            (None, Some(after)) => writeln!(out, "+ {} = {}", d.path, shown(&d.path, after)),
            (Some(before), None) => writeln!(out, "- {} = {}", d.path, shown(&d.path, before)),
            (Some(before), Some(after)) => {
                writeln!(out, "~ {}: {} → {}", d.path, shown(&d.path, before), shown(&d.path, after))
            }
            (None, None) => Ok(()),
        };
    }
    if differences.is_empty() {
        let _ = writeln!(out, "(no difference)");
    }
    if source_a == history::Source::History || source_b == history::Source::History {
        let _ = writeln!(out, "(etcd compacted a revision: rebuilt from the recorded changes)");
    }
    Ok(out)
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM:SS` (`-` for none).
pub fn utc(at_ms: u64) -> String {
    if at_ms == 0 {
        return "-".into();
    }
    chrono::DateTime::from_timestamp_millis(at_ms as i64)
        .map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// Walks the key's earlier revisions (etcd keeps them until compaction).
async fn revisions_of(client: &mut Client, prefix: &str, component: &str, path: &str) -> anyhow::Result<String> {
    let key = format!("{}{path}", config_center::config_prefix(prefix, component));
    let mut out = format!("{:>8}  VALUE   (no recorded changes: etcd's earlier revisions)\n", "REVISION");
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
        bail!("{component}/{path} is not set and has no recorded changes");
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
