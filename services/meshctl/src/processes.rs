//! `meshctl pools` and `events`: what running processes report at their admin endpoints.

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::{Context, bail};
use etcd_client::Client;
use meshkit_common::admin::{fetch_pools, http_get};

use crate::registry::registrations;

/// The admin address of `target`: itself when it is `host:port`, else the
/// `admin` metadata of the instance with that id.
pub(crate) async fn admin_of(client: &mut Client, prefix: &str, target: &str) -> anyhow::Result<String> {
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

/// One endpoint of a pool as a process's `/pools` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointRow {
    pub addr: String,
    /// `ready`, `ejected`, …
    pub state: String,
    pub inflight: u64,
    pub connections: u64,
    pub rtt_ms: f64,
    /// The load p2c compares (weighted latency), in µs.
    pub load_us: f64,
    pub calls: u64,
    pub failures: u64,
}

impl EndpointRow {
    /// From one endpoint's JSON; a missing field reads as `-` or 0.
    pub fn of(e: &serde_json::Value) -> Self {
        let text = |k: &str| e.get(k).and_then(|v| v.as_str()).unwrap_or("-").to_owned();
        let count = |k: &str| e.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
        let number = |k: &str| e.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
        Self {
            addr: text("addr"),
            state: text("state"),
            inflight: count("inflight"),
            connections: count("connections"),
            rtt_ms: number("rtt_ms"),
            load_us: number("load") / 1000.0,
            calls: count("calls"),
            failures: count("failures"),
        }
    }
}

/// A process's outbox relay as its `/reports` says (`outbox_relay`).
#[derive(Debug, Clone, PartialEq)]
pub struct RelayRow {
    pub leading: bool,
    pub published: u64,
    pub failures: u64,
    pub last_lag_ms: f64,
}

impl RelayRow {
    pub fn of(r: &serde_json::Value) -> Self {
        Self {
            leading: r["leading"].as_bool().unwrap_or(false),
            published: r["published"].as_u64().unwrap_or(0),
            failures: r["failures"].as_u64().unwrap_or(0),
            last_lag_ms: r["last_lag_ms"].as_f64().unwrap_or(0.0),
        }
    }
}

/// One consumed partition as a process's `/reports` says (`consumer`).
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionRow {
    pub topic: String,
    pub partition: i64,
    pub fence_revision: i64,
    pub next_offset: i64,
    pub high_watermark: i64,
    pub lag: i64,
    pub applied: i64,
    pub duplicates: i64,
    pub dead_lettered: i64,
}

impl PartitionRow {
    /// Every partition in a process's report.
    pub fn all(report: &serde_json::Value) -> Vec<Self> {
        let rows = report.get("consumer").and_then(|c| c.as_array()).into_iter().flatten();
        rows.map(|p| {
            let n = |k: &str| p[k].as_i64().unwrap_or(0);
            Self {
                topic: p["topic"].as_str().unwrap_or("-").to_owned(),
                partition: n("partition"),
                fence_revision: n("fence_revision"),
                next_offset: n("next_offset"),
                high_watermark: n("high_watermark"),
                lag: n("lag"),
                applied: n("applied"),
                duplicates: n("duplicates"),
                dead_lettered: n("dead_lettered"),
            }
        })
        .collect()
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
        for (id, e) in &pool.endpoints {
            let r = EndpointRow::of(e);
            // The load p2c compares, in nanoseconds of weighted latency: shown in µs.
            let _ = writeln!(
                out,
                "  {:<22} {:<22} {:<8} {:>8} {:>6} {:>9.3} {:>10.1} {:>8} {:>8}",
                id, r.addr, r.state, r.inflight, r.connections, r.rtt_ms, r.load_us, r.calls, r.failures,
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
        if let Some(r) = report.get("outbox_relay").map(RelayRow::of) {
            let _ = writeln!(
                relays,
                "  {:<22} {:<8} {:>10} {:>9} {:>12.1}",
                id,
                if r.leading { "yes" } else { "no" },
                r.published,
                r.failures,
                r.last_lag_ms,
            );
        }
        for p in PartitionRow::all(&report) {
            let _ = writeln!(
                consumers,
                "  {:<22} {:<16} {:>4} {:>7} {:>9} {:>9} {:>7} {:>9} {:>6} {:>5}",
                id,
                p.topic,
                p.partition,
                p.fence_revision,
                p.next_offset,
                p.high_watermark,
                p.lag,
                p.applied,
                p.duplicates,
                p.dead_lettered,
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
