//! `meshctl services`, `instances`, `leases`: registrations read from etcd.

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::Context;
use etcd_client::{Client, GetOptions, LeaseTimeToLiveOptions};
use meshkit_common::{
    Instance,
    control::{self, Control},
    history, keys,
};

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

/// One instance as an operator sees it: registered, or drained (its
/// registration withdrawn, its control key still under its lease).
#[derive(Debug, Clone)]
pub struct InstanceView {
    pub service: String,
    pub instance_id: String,
    /// The registered value; `None` while drained (or unreadable).
    pub instance: Option<Instance>,
    pub lease: i64,
    /// An operator's drain or weight, if any.
    pub control: Option<Control>,
}

impl InstanceView {
    pub fn drained(&self) -> bool {
        self.control.as_ref().is_some_and(|c| c.drained)
    }

    /// Whether it follows operator controls (a meshkit server, or one
    /// drained already).
    pub fn follows(&self) -> bool {
        match &self.instance {
            Some(i) => i.metadata.contains_key(control::FOLLOWS),
            None => self.control.is_some(),
        }
    }

    /// Where it serves: its registration's address, or for a drained one,
    /// the address its control recorded.
    pub fn addr(&self) -> Option<&str> {
        match (&self.instance, &self.control) {
            (Some(i), _) => Some(i.addr.as_str()),
            (None, Some(c)) if !c.addr.is_empty() => Some(c.addr.as_str()),
            _ => None,
        }
    }
}

/// Every registered or drained instance, optionally of one service, by
/// service then id.
pub async fn instance_views(
    client: &mut Client,
    prefix: &str,
    service: Option<&str>,
) -> anyhow::Result<Vec<InstanceView>> {
    let regs = registrations(client, prefix, service).await?;
    let mut controls = control::list(client, prefix).await.context("reading the controls")?;
    let mut out: Vec<InstanceView> = regs
        .into_iter()
        .map(|r| {
            let control = controls.remove(&(r.service.clone(), r.instance_id.clone())).map(|(c, _)| c);
            InstanceView {
                service: r.service,
                instance_id: r.instance_id,
                instance: r.instance,
                lease: r.lease,
                control,
            }
        })
        .collect();
    // The rest are drained: no registration, only the control key (and its lease).
    for ((s, id), (control, lease)) in controls {
        if service.is_none_or(|want| want == s) {
            out.push(InstanceView { service: s, instance_id: id, instance: None, lease, control: Some(control) });
        }
    }
    out.sort_by(|a, b| (&a.service, &a.instance_id).cmp(&(&b.service, &b.instance_id)));
    Ok(out)
}

/// Drains, puts back or re-weights `instance_id` (in `service`, or in every
/// service it serves), as `by`, with an audit entry for each. Returns the
/// services it applied to and the control now in force.
pub async fn control_instance(
    client: &mut Client,
    prefix: &str,
    instance_id: &str,
    service: Option<&str>,
    change: control::Change,
    by: &str,
) -> anyhow::Result<Vec<(String, Control)>> {
    let services: Vec<String> = instance_views(client, prefix, service)
        .await?
        .into_iter()
        .filter(|v| v.instance_id == instance_id)
        .map(|v| v.service)
        .collect();
    if services.is_empty() {
        match service {
            Some(s) => anyhow::bail!("no live instance {instance_id} of {s}"),
            None => anyhow::bail!("no live instance {instance_id} (see `meshctl instances`)"),
        }
    }
    let (action, detail) = match change {
        control::Change::Drain => ("drain", String::new()),
        control::Change::Undrain => ("undrain", String::new()),
        control::Change::Weight(Some(w)) => ("weight", format!("weight {w}")),
        control::Change::Weight(None) => ("weight", "weight back to the configured one".to_owned()),
    };
    let mut applied = Vec::new();
    for s in services {
        let control = control::set(client, prefix, &s, instance_id, change, by).await?;
        let entry = history::AuditEntry::new(by, action, &format!("{s}/{instance_id}"), detail.clone());
        history::audit(client, prefix, &entry).await.context("writing the audit log")?;
        applied.push((s, control));
    }
    Ok(applied)
}

/// `instances drain|undrain|weight`, said in lines.
pub async fn instance_control(
    client: &mut Client,
    prefix: &str,
    instance_id: &str,
    service: Option<&str>,
    change: control::Change,
    by: &str,
) -> anyhow::Result<String> {
    let applied = control_instance(client, prefix, instance_id, service, change, by).await?;
    let mut out = String::new();
    for (s, c) in applied {
        let state = if c.drained { "drained (registration withdrawn while it runs)" } else { "in rotation" };
        let weight = c.weight.map_or_else(|| "configured weight".to_owned(), |w| format!("weight {w}"));
        let _ = writeln!(out, "{s}/{instance_id}: {state}, {weight}");
    }
    Ok(out)
}

pub async fn instances(client: &mut Client, prefix: &str, service: Option<&str>) -> anyhow::Result<String> {
    let views = instance_views(client, prefix, service).await?;
    let mut out = format!(
        "{:<36} {:<22} {:<22} {:<8} {:<10} {:>6} {:<8} {:<20} {:>5} {}\n",
        "SERVICE", "INSTANCE", "ADDR", "ZONE", "VERSION", "WEIGHT", "STATE", "LEASE", "TTL", "ADMIN"
    );
    let leases: Vec<i64> = views.iter().map(|v| v.lease).collect();
    let ttls = ttls_left(client, &leases).await;
    for v in views {
        let ttl = &ttls[&v.lease];
        let state = if v.drained() { "drained" } else { "serving" };
        let (addr, zone, version, weight, admin) = match &v.instance {
            Some(i) => (
                i.addr.as_str(),
                i.zone.as_str(),
                i.version.as_str(),
                i.weight.to_string(),
                i.metadata.get("admin").map(String::as_str).unwrap_or("-"),
            ),
            None if v.drained() => (
                v.addr().unwrap_or("-"),
                "",
                "",
                v.control.as_ref().and_then(|c| c.weight).map_or("-".into(), |w| w.to_string()),
                "-",
            ),
            None => ("(unreadable value)", "", "", "-".into(), "-"),
        };
        let _ = writeln!(
            out,
            "{:<36} {:<22} {:<22} {:<8} {:<10} {:>6} {:<8} {:<20} {:>5} {}",
            v.service,
            v.instance_id,
            addr,
            if zone.is_empty() { "-" } else { zone },
            version,
            weight,
            state,
            v.lease,
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

/// The TTL left of each lease, asked once per lease (an instance serving
/// two services holds one lease for both).
pub async fn ttls_left(client: &mut Client, leases: &[i64]) -> BTreeMap<i64, String> {
    let mut out = BTreeMap::new();
    for &lease in leases {
        if let std::collections::btree_map::Entry::Vacant(slot) = out.entry(lease) {
            slot.insert(ttl_left(client, lease).await);
        }
    }
    out
}

pub async fn ttl_left(client: &mut Client, lease: i64) -> String {
    if lease == 0 {
        return "-".into();
    }
    match client.lease_time_to_live(lease, Some(LeaseTimeToLiveOptions::new())).await {
        Ok(r) if r.ttl() >= 0 => format!("{}s", r.ttl()),
        Ok(_) => "gone".into(),
        Err(_) => "?".into(),
    }
}
