//! `make up` as a user runs it: `deploy/local/cluster.sh up` on free ports in
//! a temp run directory, `down` when dropped.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{free_port, free_ports};

/// The repository's root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A cluster.sh cluster in a temp run directory; `down` when dropped.
pub struct LocalCluster {
    pub run_dir: tempfile::TempDir,
    pub env: Vec<(&'static str, String)>,
    pub tls: bool,
    pub etcd: u16,
    pub gateway: u16,
    pub kafka: u16,
    /// What `cluster.sh up` printed.
    pub printed: String,
}

impl LocalCluster {
    /// With `MESHKIT_TLS=1`: mTLS everywhere, TLS at the broker and the gateway.
    pub fn up_with_tls() -> Self {
        let cluster = Self::up(&[("MESHKIT_TLS", "1".into())]);
        assert!(cluster.printed.contains(", TLS"), "cluster.sh says the broker runs TLS:\n{}", cluster.printed);
        cluster
    }

    /// `cluster.sh up` with `extra` settings; panics with its output if it fails.
    pub fn up(extra: &[(&'static str, String)]) -> Self {
        let run_dir = tempfile::Builder::new().prefix("meshkit-local-").tempdir().expect("a temp run directory");
        // Three etcd members take the base port and the five above it.
        let (etcd, gateway, kafka) = (free_ports(6), free_port(), free_port());
        let mut env = vec![
            ("MESHKIT_RUN_DIR", run_dir.path().display().to_string()),
            ("MESHKIT_PROFILE", "dev".into()),
            ("MESHKIT_ETCD_PORT", etcd.to_string()),
            ("MESHKIT_ETCD_PEER_PORT", free_port().to_string()),
            ("MESHKIT_KAFKA_PORT", kafka.to_string()),
            ("MESHKIT_KAFKA_CONTROLLER_PORT", free_port().to_string()),
            ("MESHKIT_GATEWAY_PORT", gateway.to_string()),
            ("MESHKIT_PROMETHEUS_PORT", free_port().to_string()),
            ("MESHKIT_XDS_PORT", free_port().to_string()),
            ("MESHKIT_CONSOLE_PORT", free_port().to_string()),
        ];
        env.extend_from_slice(extra);
        let tls = extra.iter().any(|(k, v)| *k == "MESHKIT_TLS" && v == "1");
        let mut cluster = LocalCluster { run_dir, env, tls, etcd, gateway, kafka, printed: String::new() };
        let out = cluster.script("up");
        cluster.printed = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "cluster.sh up failed:\n{}{}",
            cluster.printed,
            String::from_utf8_lossy(&out.stderr)
        );
        cluster
    }

    /// `cluster.sh COMMAND` with this cluster's settings.
    pub fn script(&self, command: &str) -> std::process::Output {
        self.script_args(&[command])
    }

    /// `cluster.sh ARGS…` with this cluster's settings.
    pub fn script_args(&self, args: &[&str]) -> std::process::Output {
        script(&self.env, args)
    }

    /// A file of the development CA's, under the run directory.
    pub fn tls(&self, file: &str) -> String {
        self.run_dir.path().join("tls").join(file).display().to_string()
    }

    /// grpcurl against the gateway: over HTTPS trusting the development CA
    /// when the cluster runs TLS.
    pub fn grpcurl(&self, data: &str, method: &str) -> Result<serde_json::Value, String> {
        let security =
            if self.tls { vec!["-cacert".to_owned(), self.tls("ca.pem")] } else { vec!["-plaintext".into()] };
        let out = Command::new("grpcurl")
            .args(security)
            .args(["-d", data, &format!("127.0.0.1:{}", self.gateway), method])
            .output()
            .map_err(|e| format!("grpcurl: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }
}

/// `cluster.sh ARGS…` with `env` (a cluster's settings, [`LocalCluster::env`]).
/// It blocks: from async code, call it through `spawn_blocking`.
pub fn script(env: &[(&'static str, String)], args: &[&str]) -> std::process::Output {
    Command::new(root().join("deploy/local/cluster.sh"))
        .args(args)
        .env_remove("MESHKIT_ETCD_ENDPOINTS")
        .env_remove("MESHKIT_EVENTS_BROKERS")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("running deploy/local/cluster.sh")
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = self.script("down");
    }
}
