//! The console's operations pages against a live mesh of real processes:
//! etcd, Apache Kafka, user-, order- and notification-service, the
//! scheduler and a job executor, all exporting traces to an OTLP receiver,
//! with steady `GetUser` calls throughout. In headless Chromium
//! (services/console/browser-tests/operations.mjs): a chart moves under the
//! load and its exemplar leads to a trace the receiver holds; a rate limit
//! set on the Governance page refuses the caller's calls; a dead letter,
//! failed on purpose and then fixed, is replayed and applied exactly once;
//! a job runs with a parameter, its run traced; the read-only role changes
//! nothing. Screenshots go to target/console-shots.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use meshkit_common::ChannelBuilder;
use meshkit_console::ConsoleConfig;
use meshkit_integration_tests::{
    Broker, Etcd, ServiceProcess, create_user, eventually, free_port, init_logs, otlp::Collector, sqlite_url,
};
use meshkit_proto::{
    order::{CreateOrderRequest, OrderItem, order_service_client::OrderServiceClient},
    user::{GetUserRequest, user_service_client::UserServiceClient},
};
use sea_orm::{ConnectionTrait, Database};

const USER: &str = "meshkit.user.v1.UserService";
const ORDER: &str = "meshkit.order.v1.OrderService";
const NOTIFICATION: &str = "meshkit.notification.v1.NotificationService";
const SCHEDULER: &str = "meshkit.scheduler.v1.JobScheduler";
const EXECUTOR: &str = "meshkit.scheduler.v1.JobExecutor";
const GET_USER: &str = "/meshkit.user.v1.UserService/GetUser";
const ADMIN_PASSWORD: &str = "console-admin-pass-2";
const VIEWER_PASSWORD: &str = "console-viewer-pass-2";
const TRACE_URL: &str = "http://traces.example.test/trace/{trace_id}";
/// A schedule that fires only by hand within the test's life.
const NEVER: &str = "0 0 0 1 1 * 2099";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_edits_rules_watches_charts_replays_dead_letters_and_runs_jobs() {
    init_logs();
    let collector = Collector::start().await.unwrap();
    let etcd = Etcd::start().await.unwrap();
    let kafka = Broker::shared().await.endpoint();
    let topics = Broker::topic_prefix();
    let dir = tempfile::tempdir().unwrap();
    let env = |db: &str, id: &str| {
        vec![
            ("MESHKIT_ETCD_ENDPOINTS", etcd.endpoint()),
            ("MESHKIT_EVENTS_BROKERS", kafka.clone()),
            ("MESHKIT_EVENTS_TOPIC_PREFIX", topics.clone()),
            ("MESHKIT_EVENTS_FETCH_MAX_WAIT_MS", "50".into()),
            ("MESHKIT_EVENTS_RELAY_POLL_MS", "20".into()),
            ("MESHKIT_REGISTRY_TTL_SECS", "2".into()),
            ("MESHKIT_REGISTRY_INSTANCE_ID", id.to_owned()),
            ("MESHKIT_SERVER_LISTEN", format!("127.0.0.1:{}", free_port())),
            ("MESHKIT_SERVER_DRAIN_DELAY_MS", "100".into()),
            ("MESHKIT_DATABASE_URL", sqlite_url(dir.path(), db)),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
            ("RUST_LOG", "info,h2=warn,hyper=warn,tower=warn,sqlx=warn".into()),
        ]
    };
    let mut executor_env = env("unused", "exec-1");
    executor_env.push(("JOB_RECORD_FILE", dir.path().join("runs.log").display().to_string()));
    let processes = vec![
        ServiceProcess::spawn("user-service", &env("user", "user-1"), dir.path()).unwrap(),
        ServiceProcess::spawn("order-service", &env("order", "order-1"), dir.path()).unwrap(),
        ServiceProcess::spawn("notification-service", &env("notification", "notification-1"), dir.path()).unwrap(),
        ServiceProcess::spawn("scheduler-service", &env("scheduler", "sched-1"), dir.path()).unwrap(),
        ServiceProcess::spawn("job-executor", &executor_env, dir.path()).unwrap(),
    ];
    let mut client = etcd.client().await;
    client
        .put(
            "/meshkit/config/scheduler/scheduler.jobs.nap",
            serde_json::json!({"cron": NEVER, "target": "worker", "handler": "sleep", "param": "10"}).to_string(),
            None,
        )
        .await
        .unwrap();
    for service in [USER, ORDER, NOTIFICATION, SCHEDULER, EXECUTOR] {
        let key = format!("/meshkit/services/{service}/");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let resp = client.get(key.as_str(), Some(etcd_client::GetOptions::new().with_prefix())).await.unwrap();
            if !resp.kvs().is_empty() {
                break;
            }
            if std::time::Instant::now() > deadline {
                let logs: Vec<String> = processes.iter().map(ServiceProcess::log).collect();
                panic!("{service} did not register within 30 s:\n{}", logs.join("\n----\n"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit");
    let users = channels.balanced(USER);
    let ada = create_user(&users, "Ada", "ada@example.com").await.id;
    let pete = create_user(&users, "Poison Pete", "pete@example.com").await.id;

    // A notification that fails on purpose: its row is refused while the
    // trigger stands, so the event is dead-lettered after its attempts.
    let notifications = Database::connect(sqlite_url(dir.path(), "notification")).await.unwrap();
    eventually("notification-service's tables", Duration::from_secs(20), || async {
        notifications.execute_unprepared("SELECT 1 FROM notifications LIMIT 1").await.ok()
    })
    .await;
    notifications
        .execute_unprepared(&format!(
            "CREATE TRIGGER refuse_pete BEFORE INSERT ON notifications WHEN NEW.user_id = '{pete}' \
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
        ))
        .await
        .unwrap();
    let mut orders = OrderServiceClient::new(channels.balanced(ORDER));
    let order = orders
        .create_order(CreateOrderRequest {
            user_id: pete.clone(),
            items: vec![OrderItem { sku: "s-1".into(), quantity: 1 }],
        })
        .await
        .unwrap()
        .into_inner();
    let dead = eventually("the order's event dead-lettered", Duration::from_secs(30), || async {
        meshkit_integration_tests::broker::records(&kafka, &format!("{topics}order-events.dlq"))
            .await
            .into_iter()
            .find(|r| r.value.as_deref().is_some_and(|v| v.windows(order.id.len()).any(|w| w == order.id.as_bytes())))
    })
    .await;
    let dead_event = String::from_utf8(dead.headers["event-id"].clone()).unwrap();
    let count = |sql: String| {
        let db = notifications.clone();
        async move {
            let row = db.query_one_raw(sea_orm::Statement::from_string(db.get_database_backend(), sql)).await.unwrap();
            row.unwrap().try_get_by_index::<i64>(0).unwrap()
        }
    };
    assert_eq!(count(format!("SELECT COUNT(*) FROM notifications WHERE order_id = '{}'", order.id)).await, 0);
    // The fix, before anyone replays it.
    notifications.execute_unprepared("DROP TRIGGER refuse_pete").await.unwrap();

    // Steady calls throughout, bounded in time.
    let stop = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU64::new(0));
    let load = {
        let (stop, refused) = (stop.clone(), refused.clone());
        let mut client = UserServiceClient::new(users.clone());
        let ada = ada.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut ok = 0u64;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(240) {
                match client.get_user(GetUserRequest { id: ada.clone() }).await {
                    Ok(_) => ok += 1,
                    Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            ok
        })
    };

    let mut config = ConsoleConfig::default();
    config.mesh.etcd = etcd.settings();
    config.console.listen = "127.0.0.1:0".into();
    config.console.admin_password = ADMIN_PASSWORD.into();
    config.console.viewer_password = VIEWER_PASSWORD.into();
    config.console.trace_url = TRACE_URL.into();
    config.events.brokers = vec![kafka.clone()];
    config.events.topic_prefix = topics.clone();
    let console = meshkit_console::start(config).await.unwrap();

    let browser_env = [
        ("CONSOLE_URL", console.url()),
        ("ADMIN_PASSWORD", ADMIN_PASSWORD.to_owned()),
        ("VIEWER_PASSWORD", VIEWER_PASSWORD.to_owned()),
        ("COMPONENT", "user".to_owned()),
        ("METHOD", GET_USER.to_owned()),
        ("DEAD_EVENT", dead_event.clone()),
        ("JOB", "nap".to_owned()),
        ("TRACE_URL", TRACE_URL.to_owned()),
    ];
    let browser = meshkit_integration_tests::browser::run("operations.mjs", &browser_env);
    let stdout = tokio::time::timeout(Duration::from_secs(250), browser).await.expect("the browser run ends");
    stop.store(true, Ordering::Relaxed);
    let served = load.await.unwrap();

    // The caller saw the rule: some calls refused, most served.
    assert!(refused.load(Ordering::Relaxed) > 0, "no call was refused while the rule stood");
    assert!(served > 100, "{served} calls served");

    // The replayed event is applied exactly once, claimed by a replay.
    assert_eq!(count(format!("SELECT COUNT(*) FROM notifications WHERE order_id = '{}'", order.id)).await, 1);
    let claimed = format!(
        "SELECT COUNT(*) FROM meshkit_consumed_events WHERE event_id = '{dead_event}' AND outcome = 'applied' AND replay_id IS NOT NULL"
    );
    assert_eq!(count(claimed).await, 1);

    // The links lead to traces the receiver holds: the exemplar to a
    // GetUser served by user-service, the run to the executor's span.
    let id_after = |label: &str| {
        stdout.lines().find_map(|l| l.strip_prefix(label)).map(str::trim).map(str::to_owned).unwrap_or_default()
    };
    let exemplar = id_after("exemplar ");
    let run_trace = id_after("run-trace ");
    eventually("the exemplar's trace", Duration::from_secs(10), || async {
        collector
            .trace(&exemplar)
            .iter()
            .any(|s| s.service == "user-service" && s.span.name == GET_USER.trim_start_matches('/'))
            .then_some(())
    })
    .await;
    eventually("the run's trace", Duration::from_secs(10), || async {
        let trace = collector.trace(&run_trace);
        let scheduler = trace.iter().any(|s| s.service == "scheduler-service");
        let executor = trace.iter().any(|s| s.service == "job-executor");
        (scheduler && executor).then_some(())
    })
    .await;

    console.shutdown().await;
    drop(processes);
}
