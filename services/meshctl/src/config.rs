//! `meshctl config`: the config center, each change checked as the component it names will check it.

use std::{collections::BTreeSet, fmt::Write as _};

use anyhow::{Context, bail};
use etcd_client::{Client, GetOptions};
use meshkit_common::keys;

use meshkit_common::{
    MeshConfig,
    config::{DatabaseSettings, EventSettings, Settings},
    config_center::{self, Entry, GLOBAL},
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
