//! `meshctl split SERVICE [VERSION=PERCENT …] [--clear]`: the traffic split
//! by version, kept in the config center (`_global/governance.split`, read by
//! every process's balanced channels and by the xDS server).
//!
//! The key holds every service's split; a change reads it, replaces one
//! service's entry, checks the result as the processes will, and writes it
//! only if nobody changed the key meanwhile (a transaction on its revision),
//! trying again if someone did.

use std::{collections::BTreeMap, fmt::Write};

use anyhow::{Context, bail};
use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use meshkit_common::config_center::{self, Entry, GLOBAL};

use crate::{check_change, registrations};

/// Where the splits live in the config center.
pub const SPLIT_PATH: &str = "governance.split";

type Splits = BTreeMap<String, BTreeMap<String, u32>>;

/// `VERSION=PERCENT` arguments as a split; the error names the bad one.
pub fn parse_shares(args: &[String]) -> anyhow::Result<BTreeMap<String, u32>> {
    let mut shares = BTreeMap::new();
    for arg in args {
        let Some((version, percent)) = arg.split_once('=') else {
            bail!("{arg:?} is not VERSION=PERCENT");
        };
        let percent: u32 = match percent.parse() {
            Ok(p) if p <= 100 => p,
            _ => bail!("{arg:?}: {percent:?} is not a percent within 0..=100"),
        };
        if shares.insert(version.to_owned(), percent).is_some() {
            bail!("{version:?} is named twice");
        }
    }
    meshkit_common::governance::settings::validate_split(&shares).map_err(anyhow::Error::msg)?;
    Ok(shares)
}

async fn read(client: &mut Client, prefix: &str) -> anyhow::Result<(String, Splits, i64, Vec<Entry>)> {
    let key = format!("{}{SPLIT_PATH}", config_center::config_prefix(prefix, GLOBAL));
    let (entries, _) = config_center::read(client, prefix, GLOBAL).await?;
    let current = entries.iter().find(|e| e.scope == GLOBAL && e.path == SPLIT_PATH);
    let (splits, revision) = match current {
        Some(e) => (
            serde_json::from_str(&e.value).with_context(|| format!("{GLOBAL}/{SPLIT_PATH} holds no splits"))?,
            e.mod_revision,
        ),
        None => (Splits::new(), 0),
    };
    Ok((key, splits, revision, entries))
}

/// Sets (`Some`) or clears (`None`) `service`'s split.
pub async fn split_set(
    client: &mut Client,
    prefix: &str,
    service: &str,
    shares: Option<BTreeMap<String, u32>>,
) -> anyhow::Result<String> {
    if service.is_empty() || service.contains('/') || !service.contains('.') {
        bail!("{service:?} is not a gRPC service name like meshkit.user.v1.UserService");
    }
    for _ in 0..5 {
        let (key, mut splits, revision, mut entries) = read(client, prefix).await?;
        match &shares {
            Some(shares) => {
                splits.insert(service.to_owned(), shares.clone());
            }
            None if splits.remove(service).is_none() => return Ok(format!("{service}: no split was set\n")),
            None => {}
        }
        let value = serde_json::to_string(&splits)?;
        entries.retain(|e| !(e.scope == GLOBAL && e.path == SPLIT_PATH));
        entries.push(Entry { scope: GLOBAL.into(), path: SPLIT_PATH.into(), value: value.clone(), mod_revision: 0 });
        if let Err(e) = check_change(GLOBAL, SPLIT_PATH, &entries) {
            bail!("refused, nothing written: {e}");
        }
        // Written only if the key is as read: created now, or unchanged since.
        let unchanged = Compare::mod_revision(key.as_str(), CompareOp::Equal, revision);
        let txn = Txn::new().when([unchanged]).and_then([TxnOp::put(key.as_str(), value.as_str(), None)]);
        let resp = client.txn(txn).await.context("writing to etcd")?;
        if !resp.succeeded() {
            continue;
        }
        let written = resp.header().map_or(0, |h| h.revision());
        let mut out = match &shares {
            Some(shares) => format!("{service}: {} (revision {written})\n", describe(shares)),
            None => format!("{service}: split removed, p2c over every instance (revision {written})\n"),
        };
        if let Some(shares) = &shares {
            out.push_str(&instances_by_version(client, prefix, service, shares).await?);
        }
        return Ok(out);
    }
    bail!("{GLOBAL}/{SPLIT_PATH} kept changing under this write; nothing written, try again")
}

/// The split of `service` and its instances by version.
pub async fn split_show(client: &mut Client, prefix: &str, service: &str) -> anyhow::Result<String> {
    let (_, splits, _, _) = read(client, prefix).await?;
    let Some(shares) = splits.get(service) else {
        let mut out = format!("{service}: no split; p2c over every instance\n");
        out.push_str(&instances_by_version(client, prefix, service, &BTreeMap::new()).await?);
        return Ok(out);
    };
    let mut out = format!("{service}: {}\n", describe(shares));
    out.push_str(&instances_by_version(client, prefix, service, shares).await?);
    Ok(out)
}

fn describe(shares: &BTreeMap<String, u32>) -> String {
    let parts: Vec<String> = shares.iter().map(|(v, p)| format!("{v}={p}")).collect();
    parts.join(" ")
}

/// A table of the service's versions: share and live instances, with a
/// warning for a version that has a share and no instance.
async fn instances_by_version(
    client: &mut Client,
    prefix: &str,
    service: &str,
    shares: &BTreeMap<String, u32>,
) -> anyhow::Result<String> {
    let mut live: BTreeMap<String, usize> = BTreeMap::new();
    for r in registrations(client, prefix, Some(service)).await? {
        if let Some(instance) = r.instance {
            *live.entry(instance.version).or_default() += 1;
        }
    }
    let mut out = format!("{:<16} {:>7} {:>9}\n", "VERSION", "PERCENT", "INSTANCES");
    let versions: std::collections::BTreeSet<&String> = shares.keys().chain(live.keys()).collect();
    for version in versions {
        let share = shares.get(version).map_or("-".to_owned(), |p| p.to_string());
        let n = live.get(version).copied().unwrap_or(0);
        let _ = writeln!(out, "{:<16} {:>7} {:>9}", if version.is_empty() { "(none)" } else { version }, share, n);
    }
    let orphaned: Vec<&String> =
        shares.iter().filter(|(v, p)| **p > 0 && !live.contains_key(*v)).map(|(v, _)| v).collect();
    if !orphaned.is_empty() {
        let _ = writeln!(
            out,
            "warning: no live instance of {orphaned:?}; their share goes to the other versions until one registers"
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_parse_and_bad_ones_are_named() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_shares(&args(&["spring-1=90", "0.1.0=10"])).unwrap(),
            [("spring-1".into(), 90), ("0.1.0".into(), 10)].into()
        );
        let err = |a: &[&str]| parse_shares(&args(a)).unwrap_err().to_string();
        assert!(err(&["spring-1"]).contains("not VERSION=PERCENT"));
        assert!(err(&["a=101"]).contains("not a percent"));
        assert!(err(&["a=50", "a=50"]).contains("named twice"));
        assert!(err(&["a=50", "b=40"]).contains("add up to 90"));
        assert!(err(&["=100"]).contains("not a version"));
    }
}
