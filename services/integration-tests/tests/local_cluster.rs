//! `make up` as a user runs it, `deploy/local/cluster.sh up` on free ports in
//! a temp run directory: with `MESHKIT_TLS=1`, an order through the gateway's
//! HTTPS listener whose notification can only arrive over the broker's TLS
//! listener; with `MESHKIT_ETCD_MEMBERS=3`, a cluster that keeps serving and
//! keeps every registration with one etcd member killed. The slow tier:
//! `make test-system`.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{process::Command, time::Duration};

use meshkit_common::events::EventSettings;
use meshkit_integration_tests::{bin_dir, cluster::LocalCluster, eventually, kafka_admits};

trait Orders {
    fn order_for_new_user(&self, email: &str) -> String;
}

impl Orders for LocalCluster {
    /// A new user and an order of theirs, through the gateway (order-service
    /// calls user-service through its pool): the user's id.
    fn order_for_new_user(&self, email: &str) -> String {
        let user = self
            .grpcurl(&format!(r#"{{"name":"Ada","email":"{email}"}}"#), "meshkit.user.v1.UserService/CreateUser")
            .unwrap();
        let user_id = user["id"].as_str().unwrap().to_owned();
        let order = self
            .grpcurl(
                &format!(r#"{{"userId":"{user_id}","items":[{{"sku":"book-1","quantity":2}}]}}"#),
                "meshkit.order.v1.OrderService/CreateOrder",
            )
            .unwrap();
        assert!(order["id"].as_str().is_some_and(|id| !id.is_empty()), "{order}");
        user_id
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
    let user_id = cluster.order_for_new_user("ada-tls@example.com");
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

    // The console `make up` started: its URL printed, HTTPS with the
    // development CA, the admin password it made, and the cluster's instances
    // with their health checked over mTLS.
    let port = cluster.env.iter().find(|(k, _)| *k == "MESHKIT_CONSOLE_PORT").unwrap().1.clone();
    let url = format!("https://127.0.0.1:{port}");
    assert!(cluster.printed.contains(&format!("console:   {url} (sign in as admin")), "{}", cluster.printed);
    let password = std::fs::read_to_string(cluster.run_dir.path().join("console-admin-password")).unwrap();
    let jar = cluster.run_dir.path().join("console-cookies").display().to_string();
    let curl = |args: &[&str]| {
        let out = Command::new("curl")
            .args(["-s", "--max-time", "10", "--cacert", &cluster.tls("ca.pem"), "-b", &jar, "-c", &jar])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let status = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data-urlencode",
        "user=admin",
        "--data-urlencode",
        &format!("password={}", password.trim()),
        &format!("{url}/login"),
    ]);
    assert_eq!(status, "303", "signed in with the password make up made");
    let page = curl(&[&format!("{url}/services")]);
    for instance in ["user-1", "user-2", "order-1", "order-2"] {
        assert!(page.contains(&format!("data-instance=\"{instance}\"")), "{instance} on the services page: {page}");
    }
    assert!(!page.contains("health-unreachable"), "every instance answers health over mTLS: {page}");

    // grpc-go, with the bootstrap `make up` wrote, reaches the xDS server over
    // mTLS and accepts what it serves (its calls to the services would need
    // xDS security for the data path, which is not served: see docs/XDS.md).
    let bootstrap = cluster.run_dir.path().join("xds-bootstrap.json");
    let text = std::fs::read_to_string(&bootstrap).unwrap();
    assert!(text.contains("\"tls\"") && text.contains("xds-client.pem"), "{text}");
    let caller = meshkit_integration_tests::xds::XdsCaller::start(
        meshkit_integration_tests::xds::Lang::Go,
        &bootstrap,
        &user_id,
        5,
        cluster.run_dir.path(),
    )
    .await
    .unwrap();
    let etcd = format!("127.0.0.1:{}", cluster.etcd);
    eventually("the Go client's endpoints accepted over mTLS", Duration::from_secs(30), || async {
        let out = Command::new(bin_dir().join("meshctl")).args(["--etcd", &etcd, "xds", "clients"]).output().ok()?;
        let listed = String::from_utf8_lossy(&out.stdout).into_owned();
        // NODE ZONE PEER TYPE SENT ACKED NACKS SUBSCRIBED
        listed
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .any(|f| f.len() == 8 && f[3] == "eds" && f[5] != "-" && f[7] == "meshkit.user.v1.UserService")
            .then_some(())
    })
    .await;
    drop(caller);
}

#[tokio::test]
#[ignore = "system tier (the whole local cluster): make test-system"]
async fn make_up_with_three_etcd_members_keeps_serving_with_one_killed() {
    let cluster = LocalCluster::up(&[("MESHKIT_ETCD_MEMBERS", "3".into())]);
    assert!(
        cluster.printed.contains("etcd:      3 members"),
        "cluster.sh says it runs 3 members:\n{}",
        cluster.printed
    );
    let status = String::from_utf8_lossy(&cluster.script("status").stdout).into_owned();
    let registered = |status: &str| -> usize {
        status
            .lines()
            .find_map(|l| l.strip_prefix("registered in etcd: "))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let before = registered(&status);
    assert!(before >= 8, "every instance registered:\n{status}");

    // The member every process would reach first goes; the others carry on.
    let pid = std::fs::read_to_string(cluster.run_dir.path().join("pids/etcd-0.pid")).unwrap();
    assert!(Command::new("kill").args(["-9", pid.trim()]).status().unwrap().success());
    cluster.order_for_new_user("ada-3@example.com");
    // Past one lease TTL (10 s): every instance kept its lease through the
    // other members, and meshctl finds them through any member.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let status = String::from_utf8_lossy(&cluster.script("status").stdout).into_owned();
    assert_eq!(registered(&status), before, "every registration outlived the member:\n{status}");
    let member_2 = format!("127.0.0.1:{}", cluster.etcd + 4);
    let out = Command::new(bin_dir().join("meshctl")).args(["--etcd", &member_2, "instances"]).output().unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && listed.contains("meshkit.order.v1.OrderService"), "{listed}");
}
