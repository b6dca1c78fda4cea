//! `meshctl prometheus-sd`: Prometheus file service discovery from the registry.

use std::collections::BTreeMap;

use anyhow::Context;
use etcd_client::Client;
use meshkit_common::keys;

use crate::registry::registrations;

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
