//! `meshctl services`, `instances`, `leases`: registrations read from etcd.

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::Context;
use etcd_client::{Client, GetOptions, LeaseTimeToLiveOptions};
use meshkit_common::{Instance, keys};

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
