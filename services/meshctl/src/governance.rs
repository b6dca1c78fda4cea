//! `meshctl governance`: a process's rules and rejections.

use std::fmt::Write as _;

use anyhow::{Context, bail};
use etcd_client::Client;
use meshkit_common::admin::http_get;

use crate::processes::admin_of;

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
