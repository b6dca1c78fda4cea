//! TLS and SASL to Kafka end to end: a broker whose client listener is
//! SASL_SSL, its certificate from a CA of the test's own, its SCRAM-SHA-512
//! users made when it is formatted. The brokers use the same listener among
//! themselves, as the first user.

use std::path::Path;

use meshkit_integration_tests::{BrokerSecurity, kafka_admits};

use super::*;

const BROKER_USER: (&str, &str) = ("broker", "broker-pw-71");
const SERVICE_USER: (&str, &str) = ("meshkit", "meshkit-pw-42");

/// A secured broker, its certificate issued in `dir` (`ca.pem`, `kafka.pem`).
async fn secured_broker(dir: &Path) -> (Broker, BrokerSecurity) {
    meshkit_meshctl::certs::issue(dir, "meshkit", &["kafka"], 1).unwrap();
    let security = BrokerSecurity {
        tls_dir: Some(dir.to_path_buf()),
        client_auth: false,
        scram_users: [BROKER_USER, SERVICE_USER].map(|(u, p)| (u.to_owned(), p.to_owned())).to_vec(),
    };
    (Broker::start_secured(security.clone()).await.unwrap(), security)
}

async fn connects(settings: &EventSettings) -> bool {
    kafka_admits(settings, "meshkit-probe").await
}

#[tokio::test]
async fn orders_flow_to_notifications_over_tls_and_scram_sha_512() {
    let certs = tempfile::tempdir().unwrap();
    let (broker, security) = secured_broker(certs.path()).await;
    let endpoint = broker.endpoint();
    let events = security.client(vec![endpoint.clone()], Some(SERVICE_USER.0), None);

    // The listener takes nothing less than TLS and a SCRAM login.
    let plaintext = EventSettings { brokers: vec![endpoint.clone()], ..EventSettings::default() };
    assert!(!connects(&plaintext).await, "a plaintext client is refused");
    let tls_only = EventSettings { sasl_mechanism: String::new(), sasl_username: String::new(), ..events.clone() };
    assert!(!connects(&tls_only).await, "a TLS client without SASL is refused");
    assert!(connects(&events).await, "TLS with SCRAM-SHA-512 as {} connects", SERVICE_USER.0);

    let mut p = Pipeline::start_with(events, Some(broker), None).await;
    let n = p.notification().await;
    let orders = p.create_orders(40, 4).await;
    let db = p.notification_db().await;
    wait_for_notifications(&db, 40, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_exactly_once(&db, &orders).await;
    p.servers.push(n);
    p.shutdown().await;
}

/// An order-service process whose events settings are `events`, alone in an
/// etcd of its own (so it runs its relay) with a user-service: creates
/// orders, which must be accepted, then returns its log and the rows
/// waiting in its outbox.
async fn orders_with_bad_events_settings(events: &EventSettings, label: &str) -> (String, i64, usize) {
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let user = meshkit_user::start(mesh_config(&etcd, &sqlite_url(dir.path(), "user")).into()).await.unwrap();
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit");
    let user_id = create_user(&channels.balanced(USER), "Ada", &format!("ada-{label}@example.com")).await.id;
    let port = free_port();
    let mut env = events_env(events);
    env.extend([
        ("MESHKIT_ETCD_ENDPOINTS", etcd.endpoint()),
        ("MESHKIT_REGISTRY_TTL_SECS", "2".into()),
        ("MESHKIT_SERVER_LISTEN", format!("127.0.0.1:{port}")),
        ("MESHKIT_DATABASE_URL", sqlite_url(dir.path(), "order")),
    ]);
    let order = ServiceProcess::spawn("order-service", &env, dir.path()).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
    let mut orders = eventually("the order-service process answers", Duration::from_secs(20), || {
        let channel = channel.clone();
        async move { channel.connect().await.ok().map(OrderServiceClient::new) }
    })
    .await;
    let mut accepted = 0;
    for _ in 0..5 {
        let request =
            CreateOrderRequest { user_id: user_id.clone(), items: vec![OrderItem { sku: "s".into(), quantity: 1 }] };
        orders.create_order(request).await.expect("the order is accepted while Kafka refuses the relay");
        accepted += 1;
    }
    // The first refusal is logged once rskafka gives up its quick retries
    // (a refused SCRAM login takes about 0.5 s each); then several more
    // rounds of the relay's backoff (100 ms doubling), which must log nothing.
    eventually("the order-service logs why Kafka refuses it", Duration::from_secs(30), || async {
        (!kafka_complaints(&order.log()).is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let order_db = Database::connect(sqlite_url(dir.path(), "order")).await.unwrap();
    let waiting = count(&order_db, "SELECT COUNT(*) FROM meshkit_outbox WHERE sent_time_us IS NULL").await;
    let log = order.log();
    drop(order);
    user.shutdown().await.unwrap();
    (log, waiting, accepted)
}

/// The log lines that speak of Kafka, WARN or worse.
fn kafka_complaints(log: &str) -> Vec<&str> {
    log.lines().filter(|l| (l.contains("WARN") || l.contains("ERROR")) && l.contains("Kafka")).collect()
}

#[tokio::test]
async fn a_wrong_password_or_an_untrusted_broker_is_logged_once_and_events_wait_in_the_outbox() {
    let certs = tempfile::tempdir().unwrap();
    let (broker, security) = secured_broker(certs.path()).await;
    let endpoint = broker.endpoint();
    let good = security.client(vec![endpoint.clone()], Some(SERVICE_USER.0), None);
    let wrong_password = EventSettings { sasl_password: "not-the-password".into(), ..good.clone() };
    // A CA of its own, which did not issue the broker's certificate.
    let other = tempfile::tempdir().unwrap();
    meshkit_meshctl::certs::issue(other.path(), "meshkit", &["someone"], 1).unwrap();
    let other_ca = other.path().join("ca.pem").display().to_string();
    let untrusted = EventSettings { tls_ca_file: other_ca.clone(), ..good.clone() };

    let ((password_log, password_waiting, password_accepted), (tls_log, tls_waiting, tls_accepted)) = futures::join!(
        orders_with_bad_events_settings(&wrong_password, "password"),
        orders_with_bad_events_settings(&untrusted, "tls"),
    );

    assert_eq!(password_waiting, password_accepted as i64, "every event waits in the outbox");
    let lines = kafka_complaints(&password_log);
    assert_eq!(lines.len(), 1, "one line for the refused login, not one per retry: {lines:#?}");
    for needed in [endpoint.as_str(), "SCRAM-SHA-512", SERVICE_USER.0] {
        assert!(lines[0].contains(needed), "the line names {needed:?}: {}", lines[0]);
    }
    assert!(!password_log.contains("not-the-password"), "the password is never logged");

    assert_eq!(tls_waiting, tls_accepted as i64, "every event waits in the outbox");
    let lines = kafka_complaints(&tls_log);
    assert_eq!(lines.len(), 1, "one line for the untrusted certificate, not one per retry: {lines:#?}");
    for needed in [endpoint.as_str(), "certificate", other_ca.as_str()] {
        assert!(lines[0].contains(needed), "the line names {needed:?}: {}", lines[0]);
    }
    drop(broker);
}
