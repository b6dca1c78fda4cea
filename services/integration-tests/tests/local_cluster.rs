//! `MESHKIT_TLS=1 make up` as a user runs it: `deploy/local/cluster.sh up`
//! on free ports in a temp run directory, then an order through the
//! gateway's HTTPS listener whose notification can only arrive over the
//! broker's TLS listener. The slow tier: `make test-system`.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use meshkit_common::events::EventSettings;
use meshkit_integration_tests::{eventually, free_port, kafka_admits};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A cluster.sh cluster in a temp run directory; `down` when dropped.
struct LocalCluster {
    run_dir: tempfile::TempDir,
    env: Vec<(&'static str, String)>,
    gateway: u16,
    kafka: u16,
}

impl LocalCluster {
    fn up_with_tls() -> Self {
        let run_dir = tempfile::Builder::new().prefix("meshkit-local-tls-").tempdir().unwrap();
        let (gateway, kafka) = (free_port(), free_port());
        let env = vec![
            ("MESHKIT_RUN_DIR", run_dir.path().display().to_string()),
            ("MESHKIT_TLS", "1".into()),
            ("MESHKIT_PROFILE", "dev".into()),
            ("MESHKIT_ETCD_PORT", free_port().to_string()),
            ("MESHKIT_ETCD_PEER_PORT", free_port().to_string()),
            ("MESHKIT_KAFKA_PORT", kafka.to_string()),
            ("MESHKIT_KAFKA_CONTROLLER_PORT", free_port().to_string()),
            ("MESHKIT_GATEWAY_PORT", gateway.to_string()),
            ("MESHKIT_PROMETHEUS_PORT", free_port().to_string()),
        ];
        let cluster = LocalCluster { run_dir, env, gateway, kafka };
        let out = cluster.script("up");
        assert!(
            out.status.success(),
            "cluster.sh up failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(printed.contains(", TLS"), "cluster.sh says the broker runs TLS:\n{printed}");
        cluster
    }

    fn script(&self, command: &str) -> std::process::Output {
        Command::new(root().join("deploy/local/cluster.sh"))
            .arg(command)
            .env_remove("MESHKIT_ETCD_ENDPOINTS")
            .env_remove("MESHKIT_EVENTS_BROKERS")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap()
    }

    fn tls(&self, file: &str) -> String {
        self.run_dir.path().join("tls").join(file).display().to_string()
    }

    /// grpcurl against the gateway over HTTPS, trusting the development CA.
    fn grpcurl(&self, data: &str, method: &str) -> Result<serde_json::Value, String> {
        let out = Command::new("grpcurl")
            .args(["-cacert", &self.tls("ca.pem"), "-d", data, &format!("127.0.0.1:{}", self.gateway), method])
            .output()
            .map_err(|e| format!("grpcurl: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = self.script("down");
    }
}

async fn connects(settings: EventSettings) -> bool {
    kafka_admits(&settings, "order-events").await
}

#[tokio::test]
#[ignore = "system tier (the whole local cluster): make test-system"]
async fn make_up_with_tls_runs_the_broker_on_tls_with_client_certificates() {
    let cluster = LocalCluster::up_with_tls();

    // The broker's one client listener: TLS, and a certificate of the development CA.
    let brokers = vec![format!("127.0.0.1:{}", cluster.kafka)];
    let plaintext = EventSettings { brokers: brokers.clone(), ..EventSettings::default() };
    assert!(!connects(plaintext).await, "a plaintext client is refused");
    let anonymous =
        EventSettings { brokers: brokers.clone(), tls_ca_file: cluster.tls("ca.pem"), ..EventSettings::default() };
    assert!(!connects(anonymous).await, "a TLS client without a certificate is refused");
    let meshctl = EventSettings {
        brokers,
        tls_ca_file: cluster.tls("ca.pem"),
        tls_cert_file: cluster.tls("meshctl.pem"),
        tls_key_file: cluster.tls("meshctl.key"),
        ..EventSettings::default()
    };
    assert!(connects(meshctl).await, "a client with a certificate of the development CA connects");

    // An order's event travels order-service → broker (TLS) → notification-service.
    let user = cluster
        .grpcurl(r#"{"name":"Ada","email":"ada-tls@example.com"}"#, "meshkit.user.v1.UserService/CreateUser")
        .unwrap();
    let user_id = user["id"].as_str().unwrap().to_owned();
    let order = cluster
        .grpcurl(
            &format!(r#"{{"userId":"{user_id}","items":[{{"sku":"book-1","quantity":2}}]}}"#),
            "meshkit.order.v1.OrderService/CreateOrder",
        )
        .unwrap();
    assert!(order["id"].as_str().is_some_and(|id| !id.is_empty()), "{order}");
    eventually("the order's notification, delivered over the broker's TLS", Duration::from_secs(30), || async {
        let listed = cluster
            .grpcurl(
                &format!(r#"{{"userId":"{user_id}"}}"#),
                "meshkit.notification.v1.NotificationService/ListNotifications",
            )
            .ok()?;
        // The user is new: their one notification is this order's.
        (listed["notifications"].as_array()?.len() == 1).then_some(())
    })
    .await;
}
