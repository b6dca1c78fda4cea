//! What operators changed, kept in keys of its own so it outlives etcd's
//! compaction of old revisions:
//!
//! - each setting's changes, `{prefix}/history/config/{component}/{path}/{id}`
//!   (the value before and after, who, when, why), the last
//!   [`KEPT_PER_SETTING`] of each setting;
//! - the audit log, `{prefix}/audit/{id}`: every change made through
//!   `meshctl` or the console (who, what, when), the last [`AUDIT_KEPT`].
//!
//! A setting written through [`write_setting`] changes in the same etcd
//! transaction as its history record and its audit entry, so all three
//! carry the same revision and none exists without the others. Ids sort by
//! time. A value written around these calls (`etcdctl put`) has no record;
//! [`settings_at`] then knows it only from its `mod_revision`.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{SystemTime, UNIX_EPOCH},
};

use etcd_client::{Client, Compare, CompareOp, DeleteOptions, GetOptions, SortOrder, SortTarget, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::{
    config_center::config_prefix,
    error::{Error, Result},
    keys,
};

/// Records kept per setting; older ones are deleted as new ones come.
pub const KEPT_PER_SETTING: usize = 100;

/// Audit entries kept; the oldest go first.
pub const AUDIT_KEPT: usize = 10_000;

/// One recorded change of a setting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The setting's path (`log.filter`).
    pub path: String,
    /// The JSON value before the change; `None`: it was not set.
    pub before: Option<String>,
    /// The JSON value after; `None`: deleted.
    pub after: Option<String>,
    pub by: String,
    pub at_ms: u64,
    /// Why, when the change says (`rollback to 1234`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// The etcd revision of the change (from the record's key).
    #[serde(skip)]
    pub revision: i64,
}

/// One entry of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at_ms: u64,
    pub by: String,
    /// `config set`, `config delete`, `config rollback`, `drain`, `undrain`,
    /// `weight`, `sign-in`, …
    pub action: String,
    /// What it acted on (`user/log.filter`, `meshkit.user.v1.UserService/1234-ab`).
    pub target: String,
    /// The change, secrets redacted by the caller.
    #[serde(default)]
    pub detail: String,
    /// The etcd revision it was written at.
    #[serde(skip)]
    pub revision: i64,
}

impl AuditEntry {
    pub fn new(by: &str, action: &str, target: &str, detail: impl Into<String>) -> Self {
        Self {
            at_ms: now_ms(),
            by: by.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            detail: detail.into(),
            revision: 0,
        }
    }
}

/// A change to one setting of `component`.
#[derive(Debug, Clone)]
pub struct SettingWrite<'a> {
    pub component: &'a str,
    pub path: &'a str,
    /// The JSON value; `None` deletes the setting.
    pub value: Option<&'a str>,
    /// The setting's `mod_revision` when it was read (0: not set), so a
    /// change made meanwhile by someone else is not overwritten.
    pub expected_revision: i64,
    /// The value when it was read, recorded as `before`.
    pub before: Option<&'a str>,
    pub by: &'a str,
    pub note: &'a str,
    /// The audit entry's detail (the value with secrets redacted).
    pub audit_detail: String,
}

/// Writes (or deletes) a setting with its history record and audit entry
/// in one transaction, if the setting is still at `expected_revision`.
/// Returns the revision of the change.
pub async fn write_setting(client: &mut Client, prefix: &str, w: SettingWrite<'_>) -> Result<i64> {
    let key = format!("{}{}", config_prefix(prefix, w.component), w.path);
    let at_ms = now_ms();
    let record = Record {
        path: w.path.to_owned(),
        before: w.before.map(str::to_owned),
        after: w.value.map(str::to_owned),
        by: w.by.to_owned(),
        at_ms,
        note: w.note.to_owned(),
        revision: 0,
    };
    let action = match (w.value, w.note.is_empty()) {
        (_, false) => "config rollback",
        (Some(_), true) => "config set",
        (None, true) => "config delete",
    };
    let mut audit = AuditEntry::new(w.by, action, &format!("{}/{}", w.component, w.path), w.audit_detail);
    audit.at_ms = at_ms;
    let id = new_id(at_ms);
    let history_key = format!("{}{id}", keys::setting_history(prefix, w.component, w.path));
    let audit_key = format!("{}{id}", keys::audit(prefix));
    let write = match w.value {
        Some(v) => TxnOp::put(key.as_str(), v, None),
        None => TxnOp::delete(key.as_str(), None),
    };
    let txn = Txn::new().when([Compare::mod_revision(key.as_str(), CompareOp::Equal, w.expected_revision)]).and_then([
        write,
        TxnOp::put(history_key, serde_json::to_string(&record).unwrap_or_default(), None),
        TxnOp::put(audit_key, serde_json::to_string(&audit).unwrap_or_default(), None),
    ]);
    let resp = client.txn(txn).await?;
    if !resp.succeeded() {
        return Err(Error::Refused(format!(
            "{}/{} was changed by someone else since it was read; nothing written, read it again",
            w.component, w.path
        )));
    }
    let revision = resp.header().map_or(0, |h| h.revision());
    prune(client, &keys::setting_history(prefix, w.component, w.path), KEPT_PER_SETTING).await;
    maybe_prune_audit(client, prefix, &id).await;
    Ok(revision)
}

/// Appends `entry` to the audit log; returns its revision.
pub async fn audit(client: &mut Client, prefix: &str, entry: &AuditEntry) -> Result<i64> {
    let id = new_id(entry.at_ms);
    let key = format!("{}{id}", keys::audit(prefix));
    let resp = client.put(key, serde_json::to_string(entry).unwrap_or_default(), None).await?;
    maybe_prune_audit(client, prefix, &id).await;
    Ok(resp.header().map_or(0, |h| h.revision()))
}

/// The newest `limit` audit entries, newest first.
pub async fn audit_log(client: &mut Client, prefix: &str, limit: i64) -> Result<Vec<AuditEntry>> {
    let options = GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Key, SortOrder::Descend)
        .with_limit(limit.clamp(1, AUDIT_KEPT as i64));
    let resp = client.get(keys::audit(prefix), Some(options)).await?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let mut e: AuditEntry = serde_json::from_slice(kv.value()).ok()?;
            e.revision = kv.mod_revision();
            Some(e)
        })
        .collect())
}

/// A setting's recorded changes, newest first.
pub async fn setting_history(client: &mut Client, prefix: &str, component: &str, path: &str) -> Result<Vec<Record>> {
    records(client, &keys::setting_history(prefix, component, path)).await
}

/// Every recorded change of `component`'s own settings, newest first.
pub async fn component_history(client: &mut Client, prefix: &str, component: &str) -> Result<Vec<Record>> {
    records(client, &keys::config_history(prefix, component)).await
}

async fn records(client: &mut Client, root: &str) -> Result<Vec<Record>> {
    let resp = client.get(root, Some(GetOptions::new().with_prefix())).await?;
    let mut out: Vec<Record> = resp
        .kvs()
        .iter()
        .filter_map(|kv| {
            let mut r: Record = serde_json::from_slice(kv.value()).ok()?;
            r.revision = kv.mod_revision();
            Some(r)
        })
        .collect();
    out.sort_by(|a, b| b.revision.cmp(&a.revision).then(b.path.cmp(&a.path)));
    Ok(out)
}

/// How [`settings_at`] knew the settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// etcd still had the revision: exact.
    Etcd,
    /// The revision was compacted away: rebuilt from the recorded changes
    /// (exact back to each setting's oldest kept record; a value written
    /// around meshctl and the console counts from its last write).
    History,
}

/// `component`'s own settings (path → JSON) as they were at `revision`.
pub async fn settings_at(
    client: &mut Client,
    prefix: &str,
    component: &str,
    revision: i64,
) -> Result<(BTreeMap<String, String>, Source)> {
    let root = config_prefix(prefix, component);
    match client.get(root.as_str(), Some(GetOptions::new().with_prefix().with_revision(revision))).await {
        Ok(resp) => {
            let settings = resp
                .kvs()
                .iter()
                .filter_map(|kv| {
                    let path = kv.key_str().ok()?.strip_prefix(&root)?.to_owned();
                    Some((path, String::from_utf8_lossy(kv.value()).into_owned()))
                })
                .collect();
            Ok((settings, Source::Etcd))
        }
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => {
            let now = client.get(root.as_str(), Some(GetOptions::new().with_prefix())).await?;
            let current: Vec<(String, String, i64)> = now
                .kvs()
                .iter()
                .filter_map(|kv| {
                    let path = kv.key_str().ok()?.strip_prefix(&root)?.to_owned();
                    Some((path, String::from_utf8_lossy(kv.value()).into_owned(), kv.mod_revision()))
                })
                .collect();
            let history = component_history(client, prefix, component).await?;
            Ok((rebuild(&current, &history, revision), Source::History))
        }
        Err(e) if revision > 0 && e.to_string().contains("future revision") => {
            Err(Error::Refused(format!("revision {revision} is not reached yet")))
        }
        Err(e) => Err(e.into()),
    }
}

/// The settings at `revision` from the current ones (path, value,
/// mod_revision) and the recorded changes.
pub fn rebuild(current: &[(String, String, i64)], history: &[Record], revision: i64) -> BTreeMap<String, String> {
    let mut by_path: BTreeMap<&str, Vec<&Record>> = BTreeMap::new();
    for r in history {
        by_path.entry(r.path.as_str()).or_default().push(r);
    }
    let mut paths: BTreeSet<&str> = by_path.keys().copied().collect();
    paths.extend(current.iter().map(|(p, _, _)| p.as_str()));
    let mut out = BTreeMap::new();
    for path in paths {
        let mut records = by_path.remove(path).unwrap_or_default();
        records.sort_by_key(|r| r.revision);
        let now = current.iter().find(|(p, _, _)| p == path);
        let at = match (records.iter().rev().find(|r| r.revision <= revision), records.first()) {
            // A write around the records after the last one, and still before `revision`.
            (Some(last), _) if now.is_some_and(|(_, _, rev)| *rev > last.revision && *rev <= revision) => {
                now.map(|(_, v, _)| v.clone())
            }
            (Some(last), _) => last.after.clone(),
            (None, Some(first)) => first.before.clone(),
            // Never recorded: it held at `revision` if written before it.
            (None, None) => now.filter(|(_, _, rev)| *rev <= revision).map(|(_, v, _)| v.clone()),
        };
        if let Some(value) = at {
            out.insert(path.to_owned(), value);
        }
    }
    out
}

/// One setting that differs between two revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub path: String,
    pub before: Option<String>,
    pub after: Option<String>,
}

/// The settings that differ between `a` and `b`, by path.
pub fn diff(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> Vec<Difference> {
    let paths: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    paths
        .into_iter()
        .filter_map(|path| {
            let (before, after) = (a.get(path), b.get(path));
            let same = match (before, after) {
                (Some(x), Some(y)) => same_json(x, y),
                (None, None) => true,
                _ => false,
            };
            (!same).then(|| Difference { path: path.clone(), before: before.cloned(), after: after.cloned() })
        })
        .collect()
}

fn same_json(a: &str, b: &str) -> bool {
    match (serde_json::from_str::<serde_json::Value>(a), serde_json::from_str::<serde_json::Value>(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Keeps the newest `kept` keys under `root` (ids sort by time).
async fn prune(client: &mut Client, root: &str, kept: usize) {
    let options = GetOptions::new().with_prefix().with_keys_only().with_sort(SortTarget::Key, SortOrder::Ascend);
    let Ok(resp) = client.get(root, Some(options)).await else { return };
    let kvs = resp.kvs();
    if kvs.len() <= kept {
        return;
    }
    let first_kept = kvs[kvs.len() - kept].key().to_vec();
    let first = kvs[0].key().to_vec();
    if let Err(e) = client.delete(first, Some(DeleteOptions::new().with_range(first_kept))).await {
        tracing::debug!(error = %e, root, "pruning old records failed; the next write tries again");
    }
}

/// The audit log is pruned on about one write in 256 (ids whose random
/// tail ends in `00`): counting ten thousand keys on every change would
/// cost more than the change.
async fn maybe_prune_audit(client: &mut Client, prefix: &str, id: &str) {
    if id.ends_with("00") {
        prune(client, &keys::audit(prefix), AUDIT_KEPT).await;
    }
}

/// Microseconds since the epoch, zero-padded so ids sort by time, and a
/// random tail so two writers in one microsecond do not collide.
fn new_id(at_ms: u64) -> String {
    let micros = SystemTime::now().duration_since(UNIX_EPOCH).map_or(at_ms * 1000, |d| d.as_micros() as u64);
    format!("{micros:020}-{:04x}", rand::random::<u16>())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &str, before: Option<&str>, after: Option<&str>, revision: i64) -> Record {
        Record {
            path: path.into(),
            before: before.map(Into::into),
            after: after.map(Into::into),
            by: "t".into(),
            at_ms: 0,
            note: String::new(),
            revision,
        }
    }

    #[test]
    fn settings_are_rebuilt_from_records_and_untracked_writes() {
        let history = vec![
            record("log.filter", None, Some("\"info\""), 10),
            record("log.filter", Some("\"info\""), Some("\"debug\""), 20),
            record("a.b", Some("1"), None, 15),
        ];
        let current = vec![("log.filter".into(), "\"debug\"".into(), 20), ("etcdctl.put".into(), "3".into(), 12)];
        let at = |r| rebuild(&current, &history, r);
        assert_eq!(at(5), BTreeMap::from([("a.b".into(), "1".into())]), "before every record: each one's `before`");
        assert_eq!(
            at(12),
            BTreeMap::from([
                ("log.filter".into(), "\"info\"".into()),
                ("a.b".into(), "1".into()),
                ("etcdctl.put".into(), "3".into())
            ])
        );
        assert_eq!(at(25).get("log.filter").map(String::as_str), Some("\"debug\""));
        assert!(!at(25).contains_key("a.b"), "deleted at 15");
        // An `etcdctl put` after the last record counts from its revision.
        let current = vec![("log.filter".into(), "\"trace\"".into(), 30)];
        assert_eq!(rebuild(&current, &history, 35).get("log.filter").map(String::as_str), Some("\"trace\""));
        assert_eq!(rebuild(&current, &history, 25).get("log.filter").map(String::as_str), Some("\"debug\""));
    }

    #[test]
    fn diff_compares_json_not_text() {
        let a = BTreeMap::from([("x".into(), "{\"a\":1,\"b\":2}".into()), ("gone".into(), "1".into())]);
        let b = BTreeMap::from([("x".into(), "{\"b\":2, \"a\":1}".into()), ("new".into(), "2".into())]);
        let d = diff(&a, &b);
        assert_eq!(
            d,
            vec![
                Difference { path: "gone".into(), before: Some("1".into()), after: None },
                Difference { path: "new".into(), before: None, after: Some("2".into()) },
            ]
        );
    }

    #[test]
    fn ids_sort_by_time() {
        let a = new_id(1);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_id(1);
        assert!(a < b, "{a} < {b}");
    }
}
