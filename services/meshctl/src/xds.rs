//! `meshctl xds bootstrap` and `meshctl xds clients`: pointing gRPC's own xDS
//! clients at meshkit's xDS server (`xds-server`), and what each connected
//! client subscribed to and accepted.

use std::fmt::Write as _;

use anyhow::Context;
use etcd_client::Client;
use meshkit_common::{admin::http_get, config::TlsSettings};

use crate::registry::registrations;

/// The service the xDS servers register under.
pub const XDS_SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";

/// A gRPC xDS bootstrap (`GRPC_XDS_BOOTSTRAP`) for node `node` in `zone`
/// that reaches the xDS server at `server` (`host:port`): plaintext, or mTLS
/// with these files (gRFC A65's `tls` channel credentials).
pub fn bootstrap(server: &str, node: &str, zone: &str, tls: Option<&TlsSettings>) -> String {
    let creds = match tls {
        Some(tls) => serde_json::json!([{
            "type": "tls",
            "config": {
                "ca_certificate_file": tls.ca_file,
                "certificate_file": tls.cert_file,
                "private_key_file": tls.key_file,
            }
        }]),
        None => serde_json::json!([{ "type": "insecure" }]),
    };
    let mut node_json = serde_json::json!({ "id": node, "cluster": "meshkit" });
    if !zone.is_empty() {
        node_json["locality"] = serde_json::json!({ "zone": zone });
    }
    let bootstrap = serde_json::json!({
        "xds_servers": [{
            "server_uri": server,
            "channel_creds": creds,
            "server_features": ["xds_v3"],
        }],
        "node": node_json,
    });
    serde_json::to_string_pretty(&bootstrap).unwrap_or_default() + "\n"
}

/// Every client connected to every registered xDS server, from their admin `/reports`.
pub async fn xds_clients(client: &mut Client, prefix: &str) -> anyhow::Result<String> {
    let servers = registrations(client, prefix, Some(XDS_SERVICE)).await?;
    if servers.is_empty() {
        return Ok(format!("no xDS server is registered (as {XDS_SERVICE})\n"));
    }
    let mut out = String::new();
    for server in servers {
        let Some(admin) = server.instance.as_ref().and_then(|i| i.metadata.get("admin")) else {
            let _ = writeln!(out, "xDS server {}: publishes no admin endpoint", server.instance_id);
            continue;
        };
        let text = http_get(admin, "/reports").await.with_context(|| format!("asking {admin} for its reports"))?;
        let reports: serde_json::Value = serde_json::from_str(&text).context("reading the reports")?;
        let xds = &reports["xds"];
        let clients = xds["clients"].as_array().cloned().unwrap_or_default();
        let _ = writeln!(
            out,
            "xDS server {} ({}): {} services, {} clients",
            server.instance_id,
            server.instance.as_ref().map(|i| i.addr.as_str()).unwrap_or("-"),
            xds["services"].as_u64().unwrap_or(0),
            clients.len()
        );
        let _ = writeln!(
            out,
            "  {:<24} {:<8} {:<22} {:<4} {:>5} {:>5} {:>5}  SUBSCRIBED",
            "NODE", "ZONE", "PEER", "TYPE", "SENT", "ACKED", "NACKS"
        );
        for c in clients {
            let s = |v: &serde_json::Value| v.as_str().filter(|s| !s.is_empty()).unwrap_or("-").to_owned();
            let types = c["types"].as_object().cloned().unwrap_or_default();
            for (kind, t) in types {
                let subscribed: Vec<String> = t["subscribed"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|n| n.as_str().map(str::to_owned))
                    .collect();
                let _ = writeln!(
                    out,
                    "  {:<24} {:<8} {:<22} {:<4} {:>5} {:>5} {:>5}  {}",
                    s(&c["node"]),
                    s(&c["zone"]),
                    s(&c["peer"]),
                    kind,
                    s(&t["sent_version"]),
                    s(&t["acked_version"]),
                    t["nacks"].as_u64().unwrap_or(0),
                    subscribed.join(",")
                );
                if let Some(why) = t["last_nack"].as_str().filter(|w| !w.is_empty()) {
                    let _ = writeln!(out, "      last NACK: {why}");
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bootstrap_names_the_server_the_node_and_its_zone() {
        let text = bootstrap("127.0.0.1:18000", "java-1", "z1", None);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["xds_servers"][0]["server_uri"], "127.0.0.1:18000");
        assert_eq!(v["xds_servers"][0]["channel_creds"][0]["type"], "insecure");
        assert_eq!(v["xds_servers"][0]["server_features"][0], "xds_v3");
        assert_eq!(v["node"]["id"], "java-1");
        assert_eq!(v["node"]["locality"]["zone"], "z1");
        let tls = TlsSettings {
            enabled: true,
            cert_file: "/c.pem".into(),
            key_file: "/c.key".into(),
            ca_file: "/ca.pem".into(),
            ..Default::default()
        };
        let v: serde_json::Value = serde_json::from_str(&bootstrap("h:1", "n", "", Some(&tls))).unwrap();
        let creds = &v["xds_servers"][0]["channel_creds"][0];
        assert_eq!(creds["type"], "tls");
        assert_eq!(creds["config"]["certificate_file"], "/c.pem");
        assert!(v["node"].get("locality").is_none());
    }
}
