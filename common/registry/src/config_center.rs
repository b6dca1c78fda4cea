//! The config center: settings kept in etcd, layered over the process's own
//! (defaults < TOML file < `MESHKIT_*` environment < etcd), watched, and
//! handed to running components without a restart.
//!
//! Keys: `{prefix}/config/_global/{path}` for every process, then
//! `{prefix}/config/{component}/{path}` for one component (`user`, `order`,
//! `gateway`, …), which wins. `{path}` is a dotted setting path
//! (`governance.shedding.enabled`, `log.filter`, or a whole table such as
//! `governance.methods`); the value is JSON, merged into the table at that
//! path (objects deeply, anything else replaced). Shorter paths apply first,
//! so `governance` then `governance.methods` refines it.
//!
//! A change reaches subscribers within milliseconds of the write. A value
//! that does not parse, names an unknown setting, or fails validation is
//! refused: the reason is logged and counted, reported under `/reports`
//! (`config`), and the last good settings stay in force.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};
use toml::Value;

use meshkit_base::Backoff;
use meshkit_config::Settings;

use meshkit_config::Error as ConfigError;

use crate::error::Result;

/// `meshkit_config_rejections_total`.
static REJECTIONS: std::sync::LazyLock<prometheus_client::metrics::counter::Counter> = std::sync::LazyLock::new(|| {
    meshkit_telemetry::metrics::counter(
        "meshkit_config_rejections",
        "Config center changes refused as invalid (the last good settings stayed).",
    )
});

/// The component name of settings every process reads.
pub const GLOBAL: &str = "_global";

/// `{prefix}/config/{component}/`.
pub fn config_prefix(prefix: &str, component: &str) -> String {
    crate::keys::config(prefix, component)
}

/// One setting stored in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// `_global` or the component.
    pub scope: String,
    /// The dotted setting path.
    pub path: String,
    /// The JSON text as stored.
    pub value: String,
    pub mod_revision: i64,
}

/// `base` with `entries` laid over it (global ones first, then the
/// component's; shorter paths first), validated. The error names the key.
pub fn overlay<C: Settings>(base: &C, entries: &[Entry]) -> meshkit_config::Result<C> {
    let Ok(Value::Table(mut table)) = Value::try_from(base) else {
        return Err(ConfigError::Invalid("settings do not form a table".into()));
    };
    let mut ordered: Vec<&Entry> = entries.iter().collect();
    ordered.sort_by_key(|e| (e.scope != GLOBAL, e.path.split('.').count(), e.path.clone()));
    for entry in ordered {
        let at = format!("{}/{}", entry.scope, entry.path);
        let json: serde_json::Value = serde_json::from_str(&entry.value)
            .map_err(|e| ConfigError::Invalid(format!("{at}: {:?} is not JSON ({e})", entry.value)))?;
        let value = Value::try_from(json).map_err(|e| ConfigError::Invalid(format!("{at}: {e}")))?;
        set_path(&mut table, &entry.path, value).map_err(|problem| ConfigError::Invalid(format!("{at}: {problem}")))?;
        // Deserialize after each key so an error names the key that caused it.
        meshkit_config::from_table::<C>(table.clone()).map_err(|e| ConfigError::Invalid(format!("{at}: {e}")))?;
    }
    let config: C = meshkit_config::from_table(table)?;
    config.validate()?;
    Ok(config)
}

fn set_path(table: &mut toml::Table, path: &str, value: Value) -> Result<(), String> {
    let segments: Vec<&str> = path.split('.').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(format!("{path:?} is not a dotted setting path"));
    }
    let (last, parents) = segments.split_last().ok_or("empty path")?;
    let mut here = table;
    for segment in parents {
        let slot = here.entry((*segment).to_owned()).or_insert_with(|| Value::Table(toml::Table::new()));
        here = match slot {
            Value::Table(t) => t,
            _ => return Err(format!("`{segment}` is a value, not a table")),
        };
    }
    match (here.get_mut(*last), value) {
        (Some(Value::Table(existing)), Value::Table(new)) => deep_merge(existing, new),
        (_, value) => {
            here.insert((*last).to_owned(), value);
        }
    }
    Ok(())
}

fn deep_merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(o)) => deep_merge(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// Reads every entry of `component` and of `_global`, and the revision read at.
pub async fn read(client: &mut Client, prefix: &str, component: &str) -> Result<(Vec<Entry>, i64)> {
    let mut entries = Vec::new();
    let mut revision = 0;
    for scope in [GLOBAL, component] {
        let root = config_prefix(prefix, scope);
        let resp = client.get(root.as_str(), Some(GetOptions::new().with_prefix())).await?;
        revision = revision.max(resp.header().map_or(0, |h| h.revision()));
        for kv in resp.kvs() {
            let key = kv.key_str().unwrap_or_default();
            let Some(path) = key.strip_prefix(&root) else { continue };
            entries.push(Entry {
                scope: scope.to_owned(),
                path: path.to_owned(),
                value: String::from_utf8_lossy(kv.value()).into_owned(),
                mod_revision: kv.mod_revision(),
            });
        }
    }
    Ok((entries, revision))
}

/// What the config center reports under `/reports`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    /// The etcd revision the settings in force were read at.
    pub applied_revision: i64,
    /// The entries in force.
    pub entries: Vec<Entry>,
    /// The last refused change and why, if any.
    pub last_rejection: Option<String>,
    pub rejections: u64,
}

/// Settings from etcd over the process's own, kept current.
pub struct ConfigCenter<C> {
    component: String,
    current: watch::Receiver<Arc<C>>,
    status: Arc<Mutex<Status>>,
    task: JoinHandle<()>,
}

impl<C> Drop for ConfigCenter<C> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl<C: Settings> ConfigCenter<C> {
    /// Reads the overlay for `component` under `prefix` (`etcd.prefix`) and
    /// starts watching it. If etcd's entries are invalid at start, `base` is
    /// used and the reason reported.
    pub async fn start(mut client: Client, prefix: &str, base: C, component: &str) -> Result<Self> {
        let prefix = prefix.to_owned();
        let status = Arc::new(Mutex::new(Status::default()));
        let mut patience = crate::etcd::Patience::starting();
        let (entries, revision) = loop {
            match read(&mut client, &prefix, component).await {
                Err(e) if patience.again("reading the config center", &e).await => continue,
                result => break result?,
            }
        };
        let initial = apply(&base, entries, revision, &status).unwrap_or_else(|| base.clone());
        let (tx, current) = watch::channel(Arc::new(initial));
        let worker = Worker { client, prefix, component: component.to_owned(), base, status: status.clone(), tx };
        let task = tokio::spawn(worker.run(revision));
        Ok(Self { component: component.to_owned(), current, status, task })
    }

    /// The component whose settings these are (the config center's scope).
    pub fn component(&self) -> &str {
        &self.component
    }

    /// The settings in force now.
    pub fn current(&self) -> Arc<C> {
        self.current.borrow().clone()
    }

    /// Every change, as it is applied.
    pub fn subscribe(&self) -> watch::Receiver<Arc<C>> {
        self.current.clone()
    }

    /// A part of the settings (`|c| c.governance.clone()`), changed only when
    /// that part changes.
    pub fn section<T>(&self, part: impl Fn(&C) -> T + Send + 'static) -> watch::Receiver<T>
    where
        T: PartialEq + Send + Sync + 'static,
    {
        let mut source = self.current.clone();
        let (tx, rx) = watch::channel(part(&source.borrow_and_update()));
        tokio::spawn(async move {
            while source.changed().await.is_ok() {
                let next = part(&source.borrow_and_update());
                tx.send_if_modified(|value| {
                    if *value == next {
                        return false;
                    }
                    *value = next;
                    true
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        rx
    }

    /// What is in force, and the last refusal.
    pub fn status(&self) -> Status {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Applies `entries`; None (and a logged, counted refusal) when invalid.
fn apply<C: Settings>(base: &C, entries: Vec<Entry>, revision: i64, status: &Mutex<Status>) -> Option<C> {
    match overlay(base, &entries) {
        Ok(config) => {
            if let Ok(mut s) = status.lock() {
                s.applied_revision = revision;
                s.entries = entries;
            }
            Some(config)
        }
        Err(e) => {
            tracing::warn!(revision, error = %e, "config center: change refused, the last good settings stay");
            REJECTIONS.inc();
            if let Ok(mut s) = status.lock() {
                s.last_rejection = Some(format!("revision {revision}: {e}"));
                s.rejections += 1;
            }
            None
        }
    }
}

struct Worker<C> {
    client: Client,
    prefix: String,
    component: String,
    base: C,
    status: Arc<Mutex<Status>>,
    tx: watch::Sender<Arc<C>>,
}

impl<C: Settings> Worker<C> {
    /// Watches `{prefix}/config/` from `revision + 1`; on any change to this
    /// component's or the global keys, re-reads both and applies them. A
    /// broken watch resumes after the last revision seen (a full read covers
    /// any gap, compaction included).
    async fn run(mut self, mut revision: i64) {
        let root = crate::keys::config_root(&self.prefix);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
            let mut stream = match self.client.watch(root.as_str(), Some(options)).await {
                Ok(stream) => stream,
                Err(e) => {
                    tracing::debug!(error = %e, "config center: watch failed, retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(resp)) if resp.compact_revision() > 0 => {
                        // Compacted past us: read everything afresh.
                        revision = resp.compact_revision() - 1;
                        break;
                    }
                    Ok(Some(resp)) => {
                        backoff.reset();
                        let relevant = resp.events().iter().any(|event| {
                            let key = event.kv().and_then(|kv| kv.key_str().ok()).unwrap_or_default();
                            let scope = key.strip_prefix(&root).and_then(|rest| rest.split('/').next());
                            matches!(event.event_type(), EventType::Put | EventType::Delete)
                                && (scope == Some(GLOBAL) || scope == Some(self.component.as_str()))
                        });
                        let seen = resp.header().map_or(revision, |h| h.revision());
                        if relevant {
                            self.reload().await;
                        }
                        revision = revision.max(seen);
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            if self.tx.is_closed() {
                return;
            }
            tokio::time::sleep(backoff.next_delay()).await;
            // Whatever happened while the watch was down.
            self.reload().await;
        }
    }

    async fn reload(&mut self) {
        let Ok((entries, revision)) = read(&mut self.client, &self.prefix, &self.component).await else { return };
        if let Some(config) = apply(&self.base, entries, revision, &self.status) {
            self.tx.send_if_modified(|current| {
                if **current == config {
                    return false;
                }
                tracing::info!(revision, "config center: settings changed");
                *current = Arc::new(config);
                true
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use meshkit_telemetry::LogSettings;
    use serde::Deserialize;

    use super::*;
    use crate::settings::{EtcdSettings, RegistrySettings};

    /// A process's settings, as a binary composes them.
    #[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
    #[serde(default)]
    struct TestConfig {
        etcd: EtcdSettings,
        registry: RegistrySettings,
        log: LogSettings,
    }

    impl Settings for TestConfig {
        fn validate(&self) -> meshkit_config::Result<()> {
            self.etcd.validate()?;
            self.registry.validate()?;
            self.log.validate()
        }
    }

    fn entry(scope: &str, path: &str, value: &str) -> Entry {
        Entry { scope: scope.into(), path: path.into(), value: value.into(), mod_revision: 1 }
    }

    #[test]
    fn the_component_wins_over_global_and_objects_merge_deeply() {
        let base = TestConfig::default();
        let config = overlay(
            &base,
            &[
                entry("order", "log.filter", r#""debug""#),
                entry(GLOBAL, "log.filter", r#""warn""#),
                entry(GLOBAL, "log", r#"{"format":"json"}"#),
                entry(GLOBAL, "registry.ttl_secs", "20"),
                // A section another component reads (the gateway's) is left alone.
                entry(GLOBAL, "gateway.listen", r#""127.0.0.1:8080""#),
            ],
        )
        .expect("valid");
        assert_eq!(config.log.filter, "debug");
        assert_eq!(config.log.format, "json");
        assert_eq!(config.registry.ttl_secs, 20);
        assert_eq!(config.etcd, base.etcd, "untouched settings keep the process's own");
    }

    #[test]
    fn bad_values_are_refused_naming_the_key() {
        let base = TestConfig::default();
        for (path, value, expect) in [
            ("registry.ttl_secs", "1", "registry.ttl_secs"),
            ("registry.ttl_secs", r#""ten""#, "order/registry.ttl_secs"),
            ("registry.tll_secs", "10", "tll_secs"),
            ("log.format", "not json", "is not JSON"),
            ("log..format", r#""json""#, "dotted setting path"),
            ("log.format.x", r#""json""#, "not a table"),
        ] {
            let err = overlay(&base, &[entry("order", path, value)]).expect_err(path).to_string();
            assert!(err.contains(expect), "{path}={value}: {err}");
        }
    }
}
