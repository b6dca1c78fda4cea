//! Events end to end on Apache Kafka, real etcd and SQLite: the outbox, the
//! relay, fenced partition ownership, idempotent consumers and the pruning of
//! their dedup log. The tests share one broker, each on topics of its own;
//! the one that stops the broker has its own.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use etcd_client::{EventType, GetOptions, WatchOptions};
use meshkit_common::{
    ChannelBuilder, RunningServer,
    events::{Consumer, ConsumerSpec, Event, EventHandler, EventSettings, HandlerError, Kafka, consumer, headers},
};
use meshkit_integration_tests::TestConfig;
use meshkit_integration_tests::{
    Broker, Etcd, Postgres, ServiceProcess, bin_dir, create_user, eventually, free_port, init_logs, mesh_config,
    sqlite_url,
};
use meshkit_proto::{
    notification::{ListNotificationsRequest, OrderCreated, notification_service_client::NotificationServiceClient},
    order::{CreateOrderRequest, OrderItem, order_service_client::OrderServiceClient},
};
use rskafka::{
    chrono::Utc,
    client::partition::{Compression, UnknownTopicHandling},
    record::Record,
};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, Statement};
use tempfile::TempDir;

mod cluster;
mod security;

const USER: &str = "meshkit.user.v1.UserService";
const ORDER: &str = "meshkit.order.v1.OrderService";
const NOTIFICATION: &str = "meshkit.notification.v1.NotificationService";
const TOPIC: &str = "order-events";

/// etcd, user-service and order-service in-process on the shared broker (or
/// one of the test's own); notification instances are added by each test.
struct Pipeline {
    etcd: Etcd,
    /// `events.*` as the services get them before the test's own tuning:
    /// the brokers, TLS and SASL.
    events: EventSettings,
    /// `events.topic_prefix`: this test's topics.
    prefix: String,
    /// The test's own broker, when it stops it.
    own_broker: Option<Broker>,
    dir: TempDir,
    /// Every service's database when set (PostgreSQL); else one SQLite file each.
    database: Option<String>,
    servers: Vec<RunningServer>,
    channels: ChannelBuilder,
    user_id: String,
}

impl Pipeline {
    async fn start() -> Self {
        Self::start_on(None, None).await
    }

    /// On a broker of the test's own, which it may stop.
    async fn start_own_broker() -> Self {
        Self::start_on(Some(Broker::start().await.unwrap()), None).await
    }

    async fn start_on(own_broker: Option<Broker>, database: Option<String>) -> Self {
        let kafka = match &own_broker {
            Some(b) => b.endpoint(),
            None => Broker::shared().await.endpoint(),
        };
        let events = EventSettings { brokers: vec![kafka], ..EventSettings::default() };
        Self::start_with(events, own_broker, database).await
    }

    /// On brokers the test started, connected with `events` (brokers, TLS, SASL).
    async fn start_with(events: EventSettings, own_broker: Option<Broker>, database: Option<String>) -> Self {
        init_logs();
        let etcd = Etcd::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let channels = ChannelBuilder::new(etcd.client().await, "/meshkit");
        let mut pipeline = Pipeline {
            etcd,
            events,
            prefix: Broker::topic_prefix(),
            own_broker,
            dir,
            database,
            servers: Vec::new(),
            channels,
            user_id: String::new(),
        };
        let user = meshkit_user::start(pipeline.config("user").into()).await.unwrap();
        let order = meshkit_order::start(pipeline.config("order").into()).await.unwrap();
        pipeline.servers.extend([user, order]);
        pipeline.user_id = create_user(&pipeline.channels.balanced(USER), "Ada", "ada@example.com").await.id;
        pipeline
    }

    /// The first broker's `host:port`.
    fn kafka(&self) -> &str {
        &self.events.brokers[0]
    }

    /// The broker's name of the order-events topic in this test.
    fn topic(&self) -> String {
        format!("{}{TOPIC}", self.prefix)
    }

    fn owners_key(&self) -> String {
        format!("/meshkit/groups/consumers/notification/{}/owners/", self.topic())
    }

    fn broker(&mut self) -> &mut Broker {
        self.own_broker.as_mut().expect("the test's own broker")
    }

    fn db_url(&self, name: &str) -> String {
        self.database.clone().unwrap_or_else(|| sqlite_url(self.dir.path(), name))
    }

    fn config(&self, db: &str) -> TestConfig {
        let mut config = mesh_config(&self.etcd, &self.db_url(db));
        config.events = self.events.clone();
        config.events.topic_prefix = self.prefix.clone();
        config.events.request_timeout_ms = 2_000;
        config.events.relay_poll_ms = 20;
        config.events.fetch_max_wait_ms = 100;
        config
    }

    /// The environment for a notification-service process.
    fn process_env(&self) -> Vec<(&'static str, String)> {
        self.process_env_for("notification")
    }

    /// The environment for a service process on database `db`.
    fn process_env_for(&self, db: &str) -> Vec<(&'static str, String)> {
        let mut env = events_env(&self.events);
        env.extend([
            ("MESHKIT_ETCD_ENDPOINTS", self.etcd.endpoint()),
            ("MESHKIT_EVENTS_TOPIC_PREFIX", self.prefix.clone()),
            ("MESHKIT_EVENTS_FETCH_MAX_WAIT_MS", "100".into()),
            ("MESHKIT_REGISTRY_TTL_SECS", "2".into()),
            ("MESHKIT_SERVER_LISTEN", format!("127.0.0.1:{}", free_port())),
            ("MESHKIT_DATABASE_URL", self.db_url(db)),
        ]);
        env
    }

    async fn notification(&self) -> RunningServer {
        meshkit_notification::start(self.config("notification").into()).await.unwrap()
    }

    async fn notification_db(&self) -> DatabaseConnection {
        Database::connect(self.db_url("notification")).await.unwrap()
    }

    fn orders(&self) -> OrderServiceClient<meshkit_common::BalancedChannel> {
        OrderServiceClient::new(self.channels.balanced(ORDER))
    }

    /// Creates `n` orders, `parallel` at a time; returns their ids.
    async fn create_orders(&self, n: usize, parallel: usize) -> Vec<String> {
        let next = Arc::new(AtomicU32::new(0));
        let tasks = (0..parallel).map(|_| {
            let mut orders = self.orders();
            let user_id = self.user_id.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut ids = Vec::new();
                while (next.fetch_add(1, Ordering::Relaxed) as usize) < n {
                    let request = CreateOrderRequest {
                        user_id: user_id.clone(),
                        items: vec![OrderItem { sku: "sku-1".into(), quantity: 2 }],
                    };
                    ids.push(orders.create_order(request).await.unwrap().into_inner().id);
                }
                ids
            })
        });
        futures::future::join_all(tasks).await.into_iter().flat_map(|r| r.unwrap()).collect()
    }

    /// Orders one at a time (about 150/s) until [`SteadyOrders::finish`].
    fn steady_orders(&self) -> SteadyOrders {
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, mut orders, user_id) = (stop.clone(), self.orders(), self.user_id.clone());
        let task = tokio::spawn(async move {
            let mut ids = Vec::new();
            while !flag.load(Ordering::Relaxed) && ids.len() < 5_000 {
                let items = vec![OrderItem { sku: "s".into(), quantity: 2 }];
                let request = CreateOrderRequest { user_id: user_id.clone(), items };
                ids.push(orders.create_order(request).await.unwrap().into_inner().id);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ids
        });
        SteadyOrders { stop, task }
    }

    async fn shutdown(self) {
        for server in self.servers {
            server.shutdown().await.unwrap();
        }
    }
}

/// `MESHKIT_EVENTS_*` for a service process: the brokers, replication, TLS
/// and SASL of `events`, the empty ones left out.
fn events_env(events: &EventSettings) -> Vec<(&'static str, String)> {
    let env = [
        ("MESHKIT_EVENTS_BROKERS", events.brokers.join(",")),
        ("MESHKIT_EVENTS_REPLICATION_FACTOR", events.replication_factor.to_string()),
        ("MESHKIT_EVENTS_TLS_CA_FILE", events.tls_ca_file.clone()),
        ("MESHKIT_EVENTS_TLS_CERT_FILE", events.tls_cert_file.clone()),
        ("MESHKIT_EVENTS_TLS_KEY_FILE", events.tls_key_file.clone()),
        ("MESHKIT_EVENTS_SASL_MECHANISM", events.sasl_mechanism.clone()),
        ("MESHKIT_EVENTS_SASL_USERNAME", events.sasl_username.clone()),
        ("MESHKIT_EVENTS_SASL_PASSWORD", events.sasl_password.clone()),
    ];
    env.into_iter().filter(|(_, value)| !value.is_empty()).collect()
}

struct SteadyOrders {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl SteadyOrders {
    /// Stops and returns the ids of the orders created.
    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// Waits until all 6 partitions have owners, `members` distinct ones.
async fn all_partitions_owned_by(p: &Pipeline, etcd: &etcd_client::Client, members: usize) {
    eventually(&format!("6 partitions owned by {members} member(s)"), Duration::from_secs(20), || async {
        let o = owners(p, etcd).await;
        (o.len() == 6 && o.iter().collect::<HashSet<_>>().len() == members).then_some(())
    })
    .await;
}

/// One row per stored notification.
#[derive(Debug, Clone)]
struct Stored {
    order_id: String,
    event_id: String,
    partition: i32,
    offset: i64,
    consumer: String,
}

async fn stored(db: &DatabaseConnection) -> Vec<Stored> {
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT order_id, event_id, source_partition, source_offset, consumer FROM notifications",
        ))
        .await
        .unwrap_or_default();
    rows.into_iter()
        .map(|r| Stored {
            order_id: r.try_get("", "order_id").unwrap(),
            event_id: r.try_get("", "event_id").unwrap(),
            partition: r.try_get("", "source_partition").unwrap(),
            offset: r.try_get("", "source_offset").unwrap(),
            consumer: r.try_get("", "consumer").unwrap(),
        })
        .collect()
}

async fn count(db: &DatabaseConnection, sql: &str) -> i64 {
    let row = db.query_one_raw(Statement::from_string(db.get_database_backend(), sql)).await.unwrap().unwrap();
    row.try_get_by_index::<i64>(0).unwrap()
}

/// Every order has exactly one notification, made from exactly one applied
/// event, and no source offset was applied twice.
async fn assert_exactly_once(db: &DatabaseConnection, orders: &[String]) {
    let rows = stored(db).await;
    let mut by_order: HashMap<&str, usize> = HashMap::new();
    for row in &rows {
        *by_order.entry(row.order_id.as_str()).or_default() += 1;
    }
    let missing: Vec<&String> = orders.iter().filter(|o| !by_order.contains_key(o.as_str())).collect();
    assert!(missing.is_empty(), "{} orders have no notification, e.g. {:?}", missing.len(), missing.first());
    assert_eq!(rows.len(), orders.len(), "one notification per order");
    let events: HashSet<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
    assert_eq!(events.len(), orders.len(), "one event per notification");
    let offsets: HashSet<(i32, i64)> = rows.iter().map(|r| (r.partition, r.offset)).collect();
    assert_eq!(offsets.len(), rows.len(), "no record applied twice");
    let applied = count(db, "SELECT COUNT(*) FROM meshkit_consumed_events WHERE outcome = 'applied'").await;
    assert_eq!(applied as usize, orders.len(), "the consumed-events log agrees");
}

async fn wait_for_notifications(db: &DatabaseConnection, n: usize, timeout: Duration) {
    eventually(&format!("{n} notifications"), timeout, || async {
        (count(db, "SELECT COUNT(*) FROM notifications").await as usize >= n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_thousand_orders_give_exactly_a_thousand_notifications() {
    let mut p = Pipeline::start().await;
    let a = p.notification().await;
    let b = p.notification().await;
    let orders = p.create_orders(1_000, 16).await;
    assert_eq!(orders.len(), 1_000);
    let db = p.notification_db().await;
    wait_for_notifications(&db, 1_000, Duration::from_secs(60)).await;
    // Nothing more arrives later.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once(&db, &orders).await;
    let consumers: HashSet<String> = stored(&db).await.into_iter().map(|r| r.consumer).collect();
    assert_eq!(consumers.len(), 2, "both instances consumed: {consumers:?}");

    // The user sees them through the API, page by page.
    let mut client = NotificationServiceClient::new(p.channels.balanced(NOTIFICATION));
    let (mut seen, mut token) = (0, String::new());
    loop {
        let request =
            ListNotificationsRequest { user_id: p.user_id.clone(), page_size: 300, page_token: token.clone() };
        let page = client.list_notifications(request).await.unwrap().into_inner();
        seen += page.notifications.len();
        assert!(page.notifications.iter().all(|n| n.user_id == p.user_id && n.message.contains("2 items")));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, 1_000);
    let bad = client
        .list_notifications(ListNotificationsRequest { user_id: "nope".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("user_id"), "{}", bad.message());

    p.servers.extend([a, b]);
    p.shutdown().await;
}

#[tokio::test]
async fn the_pipeline_is_exactly_once_on_postgres_too() {
    let pg = Postgres::start().unwrap();
    let mut p = Pipeline::start_on(None, Some(pg.url())).await;
    let a = p.notification().await;
    let b = p.notification().await;
    let orders = p.create_orders(300, 8).await;
    let db = p.notification_db().await;
    wait_for_notifications(&db, 300, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once(&db, &orders).await;
    let fenced = count(&db, "SELECT COUNT(*) FROM meshkit_consumer_offsets WHERE fence_revision > 0").await;
    assert_eq!(fenced, 6, "every partition's row carries its owner's fence");
    p.servers.extend([a, b]);
    p.shutdown().await;
}

#[tokio::test]
async fn orders_made_while_the_broker_is_down_are_delivered_once_it_is_back() {
    let mut p = Pipeline::start_own_broker().await;
    let n = p.notification().await;
    let db = p.notification_db().await;
    let mut orders = p.create_orders(50, 4).await;
    wait_for_notifications(&db, 50, Duration::from_secs(30)).await;

    p.broker().kill();
    // Orders keep being accepted: their events wait in the outbox.
    orders.extend(p.create_orders(200, 8).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM notifications").await, 50, "nothing can arrive while it is down");
    let order_db = Database::connect(sqlite_url(p.dir.path(), "order")).await.unwrap();
    let backlog = count(&order_db, "SELECT COUNT(*) FROM meshkit_outbox WHERE sent_time_us IS NULL").await;
    assert_eq!(backlog, 200, "the events wait in the outbox");

    p.broker().restart().await.unwrap();
    wait_for_notifications(&db, 250, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once(&db, &orders).await;
    eventually("an empty outbox", Duration::from_secs(10), || async {
        (count(&order_db, "SELECT COUNT(*) FROM meshkit_outbox WHERE sent_time_us IS NULL").await == 0).then_some(())
    })
    .await;

    p.servers.push(n);
    p.shutdown().await;
}

/// Owner keys as they change: slot → list of (member, create revision), and
/// whether a key was ever created while it existed.
#[derive(Default)]
struct OwnerLog {
    history: BTreeMap<u32, Vec<String>>,
    overlaps: Vec<String>,
}

fn watch_owners(
    p: &Pipeline,
    client: etcd_client::Client,
) -> (Arc<std::sync::Mutex<OwnerLog>>, tokio::task::JoinHandle<()>) {
    let log = Arc::new(std::sync::Mutex::new(OwnerLog::default()));
    let out = log.clone();
    let owners = p.owners_key();
    let task = tokio::spawn(async move {
        let mut client = client;
        let current = client.get(owners.as_str(), Some(GetOptions::new().with_prefix())).await.unwrap();
        let mut present: HashMap<String, String> = HashMap::new();
        for kv in current.kvs() {
            let key = kv.key_str().unwrap().to_owned();
            let member = kv.value_str().unwrap().to_owned();
            let slot: u32 = key.rsplit('/').next().unwrap().parse().unwrap();
            out.lock().unwrap().history.entry(slot).or_default().push(member.clone());
            present.insert(key, member);
        }
        let rev = current.header().unwrap().revision() + 1;
        let mut stream =
            client.watch(owners, Some(WatchOptions::new().with_prefix().with_start_revision(rev))).await.unwrap();
        while let Ok(Some(resp)) = stream.message().await {
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let key = kv.key_str().unwrap().to_owned();
                let slot: u32 = key.rsplit('/').next().unwrap().parse().unwrap();
                let mut log = out.lock().unwrap();
                match event.event_type() {
                    EventType::Put => {
                        let member = kv.value_str().unwrap().to_owned();
                        if let Some(old) = present.insert(key.clone(), member.clone()) {
                            log.overlaps.push(format!("slot {slot}: {member} while {old} owned it"));
                        }
                        log.history.entry(slot).or_default().push(member);
                    }
                    EventType::Delete => {
                        present.remove(&key);
                    }
                }
            }
        }
    });
    (log, task)
}

/// Per partition, the consumers in offset order must follow the etcd owner
/// history: a run of records by X, then by Y, only if X's ownership ended
/// and Y's began after it.
fn assert_consumption_follows_ownership(rows: &[Stored], log: &OwnerLog) {
    assert!(log.overlaps.is_empty(), "two owners at once: {:?}", log.overlaps);
    let mut by_partition: BTreeMap<i32, Vec<(i64, &str)>> = BTreeMap::new();
    for row in rows {
        by_partition.entry(row.partition).or_default().push((row.offset, row.consumer.as_str()));
    }
    for (partition, mut applied) in by_partition {
        applied.sort();
        let mut runs: Vec<&str> = Vec::new();
        for (_, consumer) in applied {
            if runs.last() != Some(&consumer) {
                runs.push(consumer);
            }
        }
        let owners = log.history.get(&(partition as u32)).cloned().unwrap_or_default();
        // `runs` must be a subsequence of `owners`.
        let mut it = owners.iter();
        for run in &runs {
            assert!(
                it.any(|o| o == run),
                "partition {partition}: consumers in offset order {runs:?} do not follow the owners {owners:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_killed_consumer_loses_its_partitions_and_nothing_is_lost_or_doubled() {
    let p = Pipeline::start().await;
    let (log, watcher) = watch_owners(&p, p.etcd.client().await);
    let mut a = ServiceProcess::spawn("notification-service", &p.process_env(), p.dir.path()).unwrap();
    let _b = ServiceProcess::spawn("notification-service", &p.process_env(), p.dir.path()).unwrap();
    let etcd = p.etcd.client().await;
    all_partitions_owned_by(&p, &etcd, 2).await;
    let db = p.notification_db().await;
    // Orders stream in while one instance is killed.
    let load = p.steady_orders();
    wait_for_notifications(&db, 100, Duration::from_secs(20)).await;
    a.signal(9);
    a.wait_exit(Duration::from_secs(5)).await.expect("killed");
    // The survivor takes every partition once the lease (2 s) expires.
    all_partitions_owned_by(&p, &etcd, 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let orders = load.finish().await;
    wait_for_notifications(&db, orders.len(), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once(&db, &orders).await;
    let rows = stored(&db).await;
    assert_eq!(rows.iter().map(|r| r.consumer.as_str()).collect::<HashSet<_>>().len(), 2);
    assert_consumption_follows_ownership(&rows, &log.lock().unwrap());
    watcher.abort();
    p.shutdown().await;
}

#[tokio::test]
async fn scaling_from_one_to_three_consumers_spreads_partitions_without_two_owners() {
    let mut p = Pipeline::start().await;
    let (log, watcher) = watch_owners(&p, p.etcd.client().await);
    let first = p.notification().await;
    let db = p.notification_db().await;
    let load = p.steady_orders();
    wait_for_notifications(&db, 50, Duration::from_secs(20)).await;
    let second = p.notification().await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let third = p.notification().await;
    let etcd = p.etcd.client().await;
    eventually("2 partitions per member", Duration::from_secs(20), || async {
        let mut per: HashMap<String, usize> = HashMap::new();
        for owner in owners(&p, &etcd).await {
            *per.entry(owner).or_default() += 1;
        }
        (per.len() == 3 && per.values().all(|n| *n == 2)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let orders = load.finish().await;
    wait_for_notifications(&db, orders.len(), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once(&db, &orders).await;
    let rows = stored(&db).await;
    let consumers: HashSet<&str> = rows.iter().map(|r| r.consumer.as_str()).collect();
    assert_eq!(consumers.len(), 3, "every instance applied some: {consumers:?}");
    assert_consumption_follows_ownership(&rows, &log.lock().unwrap());
    watcher.abort();
    p.servers.extend([first, second, third]);
    p.shutdown().await;
}

/// The member owning each partition now.
async fn owners(p: &Pipeline, etcd: &etcd_client::Client) -> Vec<String> {
    let resp = etcd.clone().get(p.owners_key(), Some(GetOptions::new().with_prefix())).await.unwrap();
    resp.kvs().iter().map(|kv| kv.value_str().unwrap().to_owned()).collect()
}

/// Produces a record to the partition of `topic` its key maps to; returns (partition, offset).
async fn produce(kafka: &str, topic: &str, key: &str, value: Vec<u8>, headers: &[(&str, &str)]) -> (i32, i64) {
    let record = Record {
        key: Some(key.as_bytes().to_vec()),
        value: Some(value),
        headers: headers.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())).collect(),
        timestamp: Utc::now(),
    };
    produce_record(kafka, topic, record).await
}

async fn produce_record(kafka: &str, topic: &str, record: Record) -> (i32, i64) {
    let client = rskafka::client::ClientBuilder::new(vec![kafka.to_owned()]).build().await.unwrap();
    let partitions =
        client.list_topics().await.unwrap().into_iter().find(|t| t.name == topic).unwrap().partitions.len();
    let key = record.key.clone().unwrap_or_default();
    let partition = meshkit_common::events::kafka::partition_for(&key, partitions as i32);
    let pc = client.partition_client(topic, partition, UnknownTopicHandling::Retry).await.unwrap();
    let offsets = pc.produce(vec![record], Compression::NoCompression).await.unwrap();
    (partition, offsets[0])
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_and_the_partition_goes_on() {
    let mut p = Pipeline::start().await;
    let n = p.notification().await;
    let db = p.notification_db().await;
    let first = p.create_orders(5, 1).await;
    let topic = p.topic();
    wait_for_notifications(&db, 5, Duration::from_secs(20)).await;

    // Garbage on a partition, a wrong schema, then a good event with the same key.
    let (partition, poison_offset) =
        produce(p.kafka(), &topic, "k-1", vec![0xff, 0xff, 0xff], &[("event-id", "poison-1")]).await;
    produce(p.kafka(), &topic, "k-1", vec![], &[("event-id", "poison-2"), ("schema", "acme.Other")]).await;
    let good = OrderCreated {
        event_id: "good-1".into(),
        order_id: "0192f3a0-0000-7000-8000-000000000001".into(),
        user_id: p.user_id.clone(),
        total_quantity: 1,
        create_time: None,
    };
    let (good_partition, _) =
        produce(p.kafka(), &topic, "k-1", prost::Message::encode_to_vec(&good), &[("event-id", "good-1")]).await;
    assert_eq!(good_partition, partition);
    // A duplicate of an event already applied is skipped.
    produce(p.kafka(), &topic, "k-2", prost::Message::encode_to_vec(&good), &[("event-id", "good-1")]).await;

    eventually("the good event after the poison", Duration::from_secs(20), || async {
        (count(&db, "SELECT COUNT(*) FROM notifications WHERE event_id = 'good-1'").await == 1).then_some(())
    })
    .await;
    let dlq = eventually("two dead letters", Duration::from_secs(20), || async {
        let d = meshkit_integration_tests::broker::records(p.kafka(), &format!("{topic}.dlq")).await;
        (d.len() == 2).then_some(d)
    })
    .await;
    let header = |r: &Record, h: &str| String::from_utf8(r.headers.get(h).cloned().unwrap_or_default()).unwrap();
    let decode = dlq.iter().find(|r| header(r, "event-id") == "poison-1").expect("the undecodable record");
    assert!(header(decode, headers::DLQ_ERROR).contains("cannot decode"), "{}", header(decode, headers::DLQ_ERROR));
    assert_eq!(header(decode, headers::DLQ_PARTITION), partition.to_string());
    assert_eq!(header(decode, headers::DLQ_OFFSET), poison_offset.to_string());
    assert_eq!(decode.value.as_deref(), Some(&[0xff, 0xff, 0xff][..]), "the record is kept as it was");
    let schema = dlq.iter().find(|r| header(r, "event-id") == "poison-2").expect("the wrong-schema record");
    assert!(header(schema, headers::DLQ_ERROR).contains("acme.Other"));
    assert_eq!(count(&db, "SELECT COUNT(*) FROM meshkit_consumed_events WHERE outcome = 'dead-lettered'").await, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM notifications").await as usize, first.len() + 1);

    // meshctl shows the pipeline: one leading relay, six partitions, the dead letters.
    let out = tokio::process::Command::new(bin_dir().join("meshctl"))
        .args(["--etcd", &p.etcd.endpoint(), "events"])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let (relays, _) = text.split_once("consumed partitions").unwrap();
    let leading = relays.lines().filter(|l| l.contains(" yes ")).count();
    assert_eq!(leading, 1, "the order instance leads the relay: {text}");
    let partitions: Vec<&str> = text.lines().filter(|l| l.contains(&format!(" {topic} "))).collect();
    assert_eq!(partitions.len(), 6, "{text}");
    let dlq: i64 = partitions.iter().map(|l| l.split_whitespace().last().unwrap().parse::<i64>().unwrap()).sum();
    assert_eq!(dlq, 2, "{text}");

    p.servers.push(n);
    p.shutdown().await;
}

/// Fails every attempt on a `fail` payload, counting them, until fixed.
struct Flaky {
    attempts: Arc<AtomicU32>,
    fixed: Arc<AtomicBool>,
}

impl Flaky {
    fn new(attempts: Arc<AtomicU32>) -> Self {
        Self { attempts, fixed: Arc::new(AtomicBool::new(false)) }
    }
}

#[async_trait::async_trait]
impl EventHandler for Flaky {
    async fn handle(&self, txn: &DatabaseTransaction, event: &Event) -> Result<(), HandlerError> {
        if event.payload == b"fail" && !self.fixed.load(Ordering::Relaxed) {
            self.attempts.fetch_add(1, Ordering::Relaxed);
            return Err(HandlerError::Failed("downstream said no".into()));
        }
        txn.execute_unprepared(&format!("INSERT INTO seen (event_id) VALUES ('{}')", event.event_id))
            .await
            .map_err(|e| HandlerError::Failed(e.to_string()))?;
        Ok(())
    }
}

/// A consumer run directly, without the services: etcd, the shared broker
/// with a topic of the test's own, and a SQLite database holding the
/// consumer tables and the `seen` table [`Flaky`] writes.
struct Standalone {
    etcd: Etcd,
    kafka: String,
    topic: String,
    db: DatabaseConnection,
    config: TestConfig,
    _dir: TempDir,
}

async fn standalone(tweak: impl FnOnce(&mut meshkit_common::config::EventSettings)) -> Standalone {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let kafka = Broker::shared().await.endpoint();
    let topic = format!("{}{TOPIC}", Broker::topic_prefix());
    let dir = tempfile::tempdir().unwrap();
    let mut config = mesh_config(&etcd, &sqlite_url(dir.path(), "consumer"));
    config.events.brokers = vec![kafka.clone()];
    config.events.fetch_max_wait_ms = 100;
    tweak(&mut config.events);
    let db = meshkit_common::db::connect(&config.database).await.unwrap();
    meshkit_common::db::migrate(&db, consumer::COMPONENT, consumer::MIGRATIONS).await.unwrap();
    db.execute_unprepared("CREATE TABLE seen (event_id TEXT PRIMARY KEY)").await.unwrap();
    Standalone { etcd, kafka, topic, db, config, _dir: dir }
}

#[tokio::test]
async fn a_handler_failing_every_attempt_dead_letters_after_max_attempts() {
    let Standalone { etcd, kafka, topic, db, config, _dir } = standalone(|e| {
        e.partitions = 2;
        e.max_attempts = 4;
    })
    .await;
    let client = Kafka::new(config.events.clone(), "test");
    let attempts = Arc::new(AtomicU32::new(0));
    let spec = ConsumerSpec {
        group: "flaky".into(),
        topic: topic.clone(),
        member: "m1".into(),
        prefix: "/meshkit".into(),
        ttl_secs: 2,
    };
    let consumer =
        Consumer::start(etcd.client().await, db.clone(), client, spec, Arc::new(Flaky::new(attempts.clone())))
            .await
            .unwrap();
    // Both on one partition (one key): the failing one first.
    let (partition, _) = produce(&kafka, &topic, "k", b"fail".to_vec(), &[("event-id", "e-fail")]).await;
    produce(&kafka, &topic, "k", b"ok".to_vec(), &[("event-id", "e-after")]).await;
    eventually("the event after the failing one", Duration::from_secs(20), || async {
        (count(&db, "SELECT COUNT(*) FROM seen WHERE event_id = 'e-after'").await == 1).then_some(())
    })
    .await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM seen WHERE event_id = 'e-fail'").await, 0);
    assert_eq!(attempts.load(Ordering::Relaxed), 4, "events.max_attempts attempts, no more");
    let dlq = meshkit_integration_tests::broker::records(&kafka, &format!("{topic}.dlq")).await;
    assert_eq!(dlq.len(), 1);
    let error = String::from_utf8(dlq[0].headers[headers::DLQ_ERROR].clone()).unwrap();
    assert!(error.contains("downstream said no"), "{error}");
    let offsets = consumer::offsets(&db, "flaky").await.unwrap();
    assert_eq!(offsets[&(topic.clone(), partition)].next_offset, 2, "the partition moved past both");
    consumer.close().await;
}

/// `meshctl events …` against the standalone broker and etcd.
async fn meshctl_events(etcd: &Etcd, kafka: &str, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(bin_dir().join("meshctl"))
        .args(["--etcd", &etcd.endpoint(), "events"])
        .args(args)
        .env("MESHKIT_EVENTS_BROKERS", kafka)
        .env("MESHKIT_OPERATOR", "ops-on-call")
        .output()
        .await
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[tokio::test]
async fn a_dead_letter_replayed_after_the_fix_is_applied_exactly_once() {
    let Standalone { etcd, kafka, topic, db, config, _dir } = standalone(|e| {
        e.partitions = 2;
        e.max_attempts = 2;
    })
    .await;
    let dlq_topic = format!("{topic}.dlq");
    let attempts = Arc::new(AtomicU32::new(0));
    let handler = Flaky::new(attempts.clone());
    let fixed = handler.fixed.clone();
    let spec = |group: &str| ConsumerSpec {
        group: group.into(),
        topic: topic.clone(),
        member: "m1".into(),
        prefix: "/meshkit".into(),
        ttl_secs: 2,
    };
    let consumer = Consumer::start(
        etcd.client().await,
        db.clone(),
        Kafka::new(config.events.clone(), "test"),
        spec("flaky"),
        Arc::new(handler),
    )
    .await
    .unwrap();
    let (partition, _) = produce(&kafka, &topic, "k", b"fail".to_vec(), &[("event-id", "e-fix")]).await;
    produce(&kafka, &topic, "k", b"ok".to_vec(), &[("event-id", "e-fine")]).await;
    eventually("the event after the failing one", Duration::from_secs(20), || async {
        (count(&db, "SELECT COUNT(*) FROM seen WHERE event_id = 'e-fine'").await == 1).then_some(())
    })
    .await;
    let outcome = "SELECT COUNT(*) FROM meshkit_consumed_events WHERE event_id = 'e-fix' AND outcome = 'dead-lettered'";
    assert_eq!(count(&db, outcome).await, 1);

    // meshctl lists it with its error and where it came from.
    let (ok, listed) = meshctl_events(&etcd, &kafka, &["dead-letters", &topic]).await;
    assert!(ok, "{listed}");
    let line = listed.lines().find(|l| l.contains("e-fix")).unwrap_or_else(|| panic!("e-fix is listed:\n{listed}"));
    assert!(line.contains("downstream said no") && line.contains(&format!("{topic}/{partition}/0")), "{line}");
    let dlq = meshkit_integration_tests::broker::records(&kafka, &dlq_topic).await;
    assert_eq!(dlq.len(), 1);

    // Bad input is named, and nothing is written.
    let (ok, said) = meshctl_events(&etcd, &kafka, &["replay", &dlq_topic, &partition.to_string(), "99"]).await;
    assert!(!ok && said.contains("no record at offset 99"), "{said}");
    let (ok, said) = meshctl_events(&etcd, &kafka, &["replay", &topic, &partition.to_string(), "0"]).await;
    assert!(!ok && said.contains("is not a dead-letter topic"), "{said}");
    let (ok, said) = meshctl_events(&etcd, &kafka, &["replay", &dlq_topic, "x", "0"]).await;
    assert!(!ok && said.contains("partition \"x\" is not a number"), "{said}");

    // A replay before the fix fails again and comes back as a dead letter of its replay.
    let replay = |dlq_partition: i32, offset: i64| {
        let (etcd, kafka, dlq_topic) = (&etcd, &kafka, &dlq_topic);
        async move {
            let (ok, said) =
                meshctl_events(etcd, kafka, &["replay", dlq_topic, &dlq_partition.to_string(), &offset.to_string()])
                    .await;
            assert!(ok && said.contains("replayed event e-fix"), "{said}");
            said
        }
    };
    // Dead letters go to the same partition of the dead-letter topic.
    replay(partition, 0).await;
    let dlq = eventually("the failed replay dead-lettered again", Duration::from_secs(20), || async {
        let d = meshkit_integration_tests::broker::records(&kafka, &dlq_topic).await;
        (d.len() == 2).then_some(d)
    })
    .await;
    assert!(dlq[1].headers.contains_key(headers::REPLAY_ID), "the second dead letter is the replay");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM seen WHERE event_id = 'e-fix'").await, 0);
    assert_eq!(count(&db, outcome).await, 1);

    // Fixed: the first dead letter replayed is applied once.
    fixed.store(true, Ordering::Relaxed);
    replay(partition, 0).await;
    eventually("the replay applied", Duration::from_secs(20), || async {
        (count(&db, "SELECT COUNT(*) FROM seen WHERE event_id = 'e-fix'").await == 1).then_some(())
    })
    .await;
    let applied = "SELECT COUNT(*) FROM meshkit_consumed_events WHERE event_id = 'e-fix' AND outcome = 'applied' AND replay_id IS NOT NULL";
    assert_eq!(count(&db, applied).await, 1);

    // Replayed again (the other dead letter), and the applied replay redelivered: both skipped.
    replay(partition, 1).await;
    let replays: Vec<Record> = meshkit_integration_tests::broker::records(&kafka, &topic)
        .await
        .into_iter()
        .filter(|r| r.headers.contains_key(headers::REPLAY_ID))
        .collect();
    assert_eq!(replays.len(), 3, "three replays on the topic");
    produce_record(&kafka, &topic, replays[1].clone()).await;
    produce(&kafka, &topic, "k", b"ok".to_vec(), &[("event-id", "e-last")]).await;
    eventually("the event after the duplicates", Duration::from_secs(20), || async {
        (count(&db, "SELECT COUNT(*) FROM seen WHERE event_id = 'e-last'").await == 1).then_some(())
    })
    .await;
    assert_eq!(count(&db, "SELECT COUNT(*) FROM seen WHERE event_id = 'e-fix'").await, 1, "applied exactly once");
    assert_eq!(count(&db, "SELECT COUNT(*) FROM seen").await, 3);
    assert_eq!(meshkit_integration_tests::broker::records(&kafka, &dlq_topic).await.len(), 2, "no new dead letter");

    // A group whose handler never failed applies the event once and skips every replay of it.
    let mut other_db_config = config.database.clone();
    other_db_config.url = sqlite_url(_dir.path(), "other");
    let other_db = meshkit_common::db::connect(&other_db_config).await.unwrap();
    meshkit_common::db::migrate(&other_db, consumer::COMPONENT, consumer::MIGRATIONS).await.unwrap();
    other_db.execute_unprepared("CREATE TABLE seen (event_id TEXT PRIMARY KEY)").await.unwrap();
    let healthy = Flaky::new(Arc::new(AtomicU32::new(0)));
    healthy.fixed.store(true, Ordering::Relaxed);
    let other = Consumer::start(
        etcd.client().await,
        other_db.clone(),
        Kafka::new(config.events.clone(), "test"),
        spec("other"),
        Arc::new(healthy),
    )
    .await
    .unwrap();
    eventually("the other group past every record", Duration::from_secs(20), || async {
        (count(&other_db, "SELECT COUNT(*) FROM seen WHERE event_id = 'e-last'").await == 1).then_some(())
    })
    .await;
    assert_eq!(count(&other_db, "SELECT COUNT(*) FROM seen").await, 3, "e-fix, e-fine, e-last, once each");
    let skipped = "SELECT COUNT(*) FROM meshkit_consumed_events WHERE event_id = 'e-fix' AND replay_id IS NULL";
    assert_eq!(count(&other_db, skipped).await, 1, "the original applied, no replay claimed it");

    // Every replay is in the audit log, by the operator.
    let out = tokio::process::Command::new(bin_dir().join("meshctl"))
        .args(["--etcd", &etcd.endpoint(), "audit"])
        .output()
        .await
        .unwrap();
    let audit = String::from_utf8_lossy(&out.stdout);
    let replays = audit.lines().filter(|l| l.contains("ops-on-call") && l.contains(" replay ")).count();
    assert_eq!(replays, 3, "{audit}");
    other.close().await;
    consumer.close().await;
}

#[tokio::test]
async fn records_carry_the_event_id_schema_and_trace_context() {
    let p = Pipeline::start().await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut request = tonic::Request::new(CreateOrderRequest {
        user_id: p.user_id.clone(),
        items: vec![OrderItem { sku: "traced".into(), quantity: 3 }],
    });
    request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    request.metadata_mut().insert("tracestate", "meshkit=1".parse().unwrap());
    let order = p.orders().create_order(request).await.unwrap().into_inner();
    let record = eventually("the OrderCreated record", Duration::from_secs(20), || async {
        meshkit_integration_tests::broker::records(p.kafka(), &p.topic())
            .await
            .into_iter()
            .find(|r| r.key.as_deref() == Some(order.id.as_bytes()))
    })
    .await;
    let header = |h: &str| String::from_utf8(record.headers.get(h).cloned().unwrap_or_default()).unwrap();
    assert_eq!(header(headers::TRACEPARENT), traceparent);
    assert_eq!(header(headers::TRACESTATE), "meshkit=1");
    assert_eq!(header(headers::SCHEMA), "meshkit.notification.v1.OrderCreated");
    assert_eq!(header(headers::CONTENT_TYPE), "application/x-protobuf");
    let event: OrderCreated = prost::Message::decode(record.value.as_deref().unwrap()).unwrap();
    assert_eq!(header(headers::EVENT_ID), event.event_id);
    assert_eq!(
        (event.order_id.as_str(), event.user_id.as_str(), event.total_quantity),
        (order.id.as_str(), p.user_id.as_str(), 3)
    );
    assert_eq!(event.create_time, order.create_time, "the event carries the order's time");
    p.shutdown().await;
}

#[tokio::test]
async fn a_paused_consumer_that_lost_its_lease_cannot_commit_when_it_wakes() {
    let p = Pipeline::start().await;
    let (log, watcher) = watch_owners(&p, p.etcd.client().await);
    let a = ServiceProcess::spawn("notification-service", &p.process_env(), p.dir.path()).unwrap();
    let _b = ServiceProcess::spawn("notification-service", &p.process_env(), p.dir.path()).unwrap();
    let etcd = p.etcd.client().await;
    all_partitions_owned_by(&p, &etcd, 2).await;
    let db = p.notification_db().await;
    let load = p.steady_orders();
    wait_for_notifications(&db, 100, Duration::from_secs(20)).await;
    // Frozen mid-stream, it keeps whatever it fetched; its lease (2 s) runs out.
    a.signal(19); // SIGSTOP
    all_partitions_owned_by(&p, &etcd, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.signal(18); // SIGCONT: it wakes believing it owns its partitions
    tokio::time::sleep(Duration::from_secs(3)).await;
    let orders = load.finish().await;
    wait_for_notifications(&db, orders.len(), Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once(&db, &orders).await;
    assert_consumption_follows_ownership(&stored(&db).await, &log.lock().unwrap());
    // The woken member noticed: fenced in the database, or its lease replaced.
    let logs: String = std::fs::read_dir(p.dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("notification-service-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    let noticed: Vec<&str> = logs
        .lines()
        .filter(|l| {
            ["fenced", "newer owner", "lease replaced", "slot lost", "slot worker ended"].iter().any(|m| l.contains(m))
        })
        .collect();
    eprintln!("{}", noticed.join("\n"));
    assert!(!noticed.is_empty(), "the paused member never noticed it lost its partitions:\n{logs}");
    watcher.abort();
    p.shutdown().await;
}

#[tokio::test]
async fn consumed_ids_are_pruned_past_the_dedup_window_and_a_copy_that_late_is_dead_lettered_not_applied() {
    let Standalone { etcd, kafka, topic, db, config, _dir } = standalone(|e| {
        e.partitions = 1;
        // Ids kept 3 s after the event's time; pruned every 0.75 s; a record
        // older than 2.7 s (the window less its 10% margin) is not applied.
        e.dedup_window_secs = 3;
    })
    .await;
    let spec = ConsumerSpec {
        group: "pruned".into(),
        topic: topic.clone(),
        member: "m1".into(),
        prefix: "/meshkit".into(),
        // Long enough that a busy machine never moves the partition mid-test.
        ttl_secs: 10,
    };
    let handler = Arc::new(Flaky::new(Arc::new(AtomicU32::new(0))));
    let kafka_client = Kafka::new(config.events.clone(), "test");
    let consumer = Consumer::start(etcd.client().await, db.clone(), kafka_client, spec, handler).await.unwrap();
    let seen = |id: &'static str| {
        let db = db.clone();
        async move { count(&db, &format!("SELECT COUNT(*) FROM seen WHERE event_id = '{id}'")).await }
    };
    let copy = |ts| Record {
        key: Some(b"k".to_vec()),
        value: Some(b"ok".to_vec()),
        headers: [("event-id".to_owned(), b"e-1".to_vec())].into(),
        timestamp: ts,
    };

    // The event, then a copy of it (a relay that published twice): applied once.
    let event_time = Utc::now();
    produce_record(&kafka, &topic, copy(event_time)).await;
    produce_record(&kafka, &topic, copy(event_time)).await;
    eventually("the event and its copy consumed", Duration::from_secs(20), || async {
        let duplicates: u64 = consumer.stats().snapshot().iter().map(|s| s.duplicates).sum();
        (duplicates == 1).then_some(())
    })
    .await;
    assert_eq!(seen("e-1").await, 1);
    assert_eq!(count(&db, "SELECT COUNT(*) FROM meshkit_consumed_events").await, 1);

    // Past the window its id is forgotten: the log does not grow without end.
    // The row goes first, then the worker counts it: wait for both.
    eventually("the id pruned and counted", Duration::from_secs(10), || async {
        let rows = count(&db, "SELECT COUNT(*) FROM meshkit_consumed_events").await;
        let pruned: u64 = consumer.stats().snapshot().iter().map(|s| s.pruned).sum();
        (rows == 0 && pruned >= 1).then_some(())
    })
    .await;

    // A copy arriving now carries the event's old time: nothing can tell it
    // was applied, so it goes to the dead-letter topic instead of twice into `seen`.
    let (_, late_offset) = produce_record(&kafka, &topic, copy(event_time)).await;
    let dlq = eventually("the late copy dead-lettered", Duration::from_secs(20), || async {
        let d = meshkit_integration_tests::broker::records(&kafka, &format!("{topic}.dlq")).await;
        (d.len() == 1).then_some(d)
    })
    .await;
    let error = String::from_utf8(dlq[0].headers[headers::DLQ_ERROR].clone()).unwrap();
    assert!(error.contains("events.dedup_window_secs"), "{error}");
    assert_eq!(String::from_utf8(dlq[0].headers[headers::DLQ_OFFSET].clone()).unwrap(), late_offset.to_string());
    assert_eq!(seen("e-1").await, 1, "never applied twice");

    // A fresh event still goes through.
    let mut fresh = copy(Utc::now());
    fresh.headers.insert("event-id".into(), b"e-2".to_vec());
    produce_record(&kafka, &topic, fresh).await;
    eventually("the fresh event applied", Duration::from_secs(20), || async { (seen("e-2").await == 1).then_some(()) })
        .await;
    consumer.close().await;
}

/// The API version ranges rskafka 0.6 speaks (its `protocol/messages`),
/// by Kafka API key.
const RSKAFKA_APIS: &[(i16, &str, i16, i16)] = &[
    (0, "Produce", 3, 7),
    (1, "Fetch", 4, 4),
    (2, "ListOffsets", 0, 3),
    (3, "Metadata", 0, 4),
    (17, "SaslHandshake", 1, 1),
    (18, "ApiVersions", 0, 3),
    (19, "CreateTopics", 0, 5),
    (21, "DeleteRecords", 0, 2),
    (36, "SaslAuthenticate", 0, 2),
];

#[tokio::test]
async fn the_broker_serves_a_version_of_every_api_rskafka_speaks() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let kafka = Broker::shared().await.endpoint();
    // ApiVersions v0, by hand: the one request every broker answers.
    let client_id = b"meshkit-test";
    let mut body = Vec::new();
    body.extend_from_slice(&18i16.to_be_bytes());
    body.extend_from_slice(&0i16.to_be_bytes());
    body.extend_from_slice(&7i32.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as i16).to_be_bytes());
    body.extend_from_slice(client_id);
    let mut stream = tokio::net::TcpStream::connect(&kafka).await.unwrap();
    stream.write_all(&(body.len() as i32).to_be_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let size = stream.read_i32().await.unwrap();
    let mut reply = vec![0u8; size as usize];
    stream.read_exact(&mut reply).await.unwrap();
    let i16_at = |i: usize| i16::from_be_bytes([reply[i], reply[i + 1]]);
    assert_eq!(i32::from_be_bytes(reply[0..4].try_into().unwrap()), 7, "correlation id");
    assert_eq!(i16_at(4), 0, "ApiVersions error code");
    let count = i32::from_be_bytes(reply[6..10].try_into().unwrap()) as usize;
    let served: HashMap<i16, (i16, i16)> =
        (0..count).map(|n| 10 + n * 6).map(|at| (i16_at(at), (i16_at(at + 2), i16_at(at + 4)))).collect();
    let mut missing = Vec::new();
    for (key, name, low, high) in RSKAFKA_APIS {
        match served.get(key) {
            Some((min, max)) if min <= high && low <= max => {
                eprintln!("{name:<17} rskafka {low}..={high}, broker {min}..={max}");
            }
            other => missing.push(format!("{name}: rskafka {low}..={high}, broker {other:?}")),
        }
    }
    assert!(missing.is_empty(), "the broker serves no version rskafka speaks: {missing:?}");
}

/// Runs `io.meshkit.events.Peer` (the Java clients of the Maven build) with
/// `args`; its JSON lines.
async fn java_peer(args: &[&str]) -> Vec<serde_json::Value> {
    let classpath = meshkit_integration_tests::java_clients_classpath().unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("java")
            .args(["-Xmx256m", "-cp", &classpath, "io.meshkit.events.Peer"])
            .args(args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Java peer finished within 120 s")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "Peer {args:?} failed ({}): {}", out.status, stderr.lines().last().unwrap_or(""));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn a_java_consumer_reads_every_order_created_with_its_trace_context() {
    let p = Pipeline::start().await;
    let mut traced = BTreeMap::new();
    for i in 0..20u64 {
        let traceparent = format!("00-{:032x}-{:016x}-01", 0x4bf9_2f35_0000u128 + u128::from(i), 0x00f0_67aa_0000 + i);
        let mut request = tonic::Request::new(CreateOrderRequest {
            user_id: p.user_id.clone(),
            items: vec![OrderItem { sku: "java".into(), quantity: 2 }],
        });
        request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
        let order = p.orders().create_order(request).await.unwrap().into_inner();
        traced.insert(order.id, traceparent);
    }
    // Its own consumer group, from the start of the topic, decoding with the
    // classes generated from proto/.
    let events = java_peer(&["consume", p.kafka(), &p.topic(), "java-billing", "20", "60"]).await;
    let mut seen = BTreeMap::new();
    for e in &events {
        let field = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
        assert_eq!(field("key"), field("order_id"), "keyed by order id: {e}");
        assert_eq!(field("header_event_id"), field("event_id"), "the event-id header is the event's id: {e}");
        assert_eq!(field("user_id"), p.user_id, "{e}");
        assert_eq!(e["total_quantity"], 2, "{e}");
        assert!(seen.insert(field("order_id"), field("traceparent")).is_none(), "one event per order: {e}");
    }
    assert_eq!(seen, traced, "every order's event, with its caller's traceparent");
    p.shutdown().await;
}

#[tokio::test]
async fn a_java_producers_event_lands_where_meshkit_would_put_it_and_is_applied_once() {
    let Standalone { etcd, kafka, topic, db, config, _dir } = standalone(|e| e.partitions = 6).await;
    let client = Kafka::new(config.events.clone(), "test");
    client.ensure_topic(&topic).await.unwrap();
    // Sent twice with one event-id, as a producer retrying after a timeout would.
    let sent = java_peer(&["produce", &kafka, &topic, "order-from-java", "u-java", "2"]).await;
    assert_eq!(sent.len(), 2);
    let partition = meshkit_common::events::kafka::partition_for(b"order-from-java", 6);
    for copy in &sent {
        assert_eq!(copy["partition"], partition, "kafka-clients' murmur2 and meshkit's agree: {copy}");
    }
    let event_id = sent[0]["event_id"].as_str().unwrap().to_owned();
    let spec = ConsumerSpec {
        group: "from-java".into(),
        topic: topic.clone(),
        member: "m1".into(),
        prefix: "/meshkit".into(),
        ttl_secs: 2,
    };
    let attempts = Arc::new(AtomicU32::new(0));
    let consumer =
        Consumer::start(etcd.client().await, db.clone(), client, spec, Arc::new(Flaky::new(attempts))).await.unwrap();
    eventually("both copies consumed", Duration::from_secs(30), || async {
        let offsets = consumer::offsets(&db, "from-java").await.unwrap();
        (offsets.get(&(topic.clone(), partition)).map(|o| o.next_offset) == Some(2)).then_some(())
    })
    .await;
    let applied = count(&db, &format!("SELECT COUNT(*) FROM seen WHERE event_id = '{event_id}'")).await;
    assert_eq!(applied, 1, "the Java event applied once, its copy skipped");
    consumer.close().await;
}

/// Two relays on one outbox, the second elected while the first still runs
/// (as when the first is cut off from etcd): the first stops at its next
/// round, the second waits out that round, and every row reaches the topic
/// exactly once.
#[tokio::test]
async fn a_relay_elected_later_fences_the_first_and_no_row_is_published_twice() {
    use meshkit_common::events::outbox::{self, OutboxEvent, Relay};
    use meshkit_common::ownership::{Fence, SlotEnd};
    use sea_orm::TransactionTrait;
    use tokio_util::sync::CancellationToken;

    let Standalone { kafka, topic, db, config, _dir, .. } = standalone(|e| e.relay_poll_ms = 20).await;
    meshkit_common::db::migrate(&db, outbox::COMPONENT, outbox::MIGRATIONS).await.unwrap();
    let written = Arc::new(AtomicUsize::new(0));
    let stop_writing = CancellationToken::new();
    // Orders keep coming throughout, a few rows per transaction.
    let writer = {
        let (db, topic, written, stop) = (db.clone(), topic.clone(), written.clone(), stop_writing.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let txn = db.begin().await.unwrap();
                for _ in 0..3 {
                    let i = written.fetch_add(1, Ordering::SeqCst);
                    let event = OutboxEvent {
                        event_id: format!("fence-{i}"),
                        topic: topic.clone(),
                        key: format!("k-{}", i % 17),
                        schema: "meshkit.test.Fenced".into(),
                        payload: vec![1, 2, 3],
                        headers: BTreeMap::new(),
                    };
                    outbox::enqueue(&txn, event).await.unwrap();
                }
                txn.commit().await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let kafka_client = || Kafka::new(config.events.clone(), "fence-test");
    let first = Relay::new(db.clone(), kafka_client());
    let first_fence = Fence { cluster_id: 7, revision: 10 };
    let first_run =
        tokio::spawn(first.clone().run_fenced(Some((first_fence, "first".into())), CancellationToken::new()));
    eventually("the first relay publishing", Duration::from_secs(20), || async {
        (first.stats().published > 100).then_some(())
    })
    .await;

    let second = Relay::new(db.clone(), kafka_client());
    let second_cancel = CancellationToken::new();
    let elected = std::time::Instant::now();
    let second_run = tokio::spawn(
        second
            .clone()
            .run_fenced(Some((Fence { cluster_id: 7, revision: 11 }, "second".into())), second_cancel.clone()),
    );
    let end = tokio::time::timeout(Duration::from_secs(10), first_run).await.expect("the first relay stops").unwrap();
    assert_eq!(end, SlotEnd::Fenced);
    let first_stopped = elected.elapsed();
    let published_by_first = first.stats().published;
    eventually("the second relay publishing", Duration::from_secs(20), || async {
        (second.stats().published > 0).then_some(())
    })
    .await;
    let second_started = elected.elapsed();
    // A third relay with an older fence is refused outright.
    let stale = Relay::new(db.clone(), kafka_client())
        .run_fenced(Some((Fence { cluster_id: 7, revision: 9 }, "stale".into())), CancellationToken::new())
        .await;
    assert_eq!(stale, SlotEnd::Fenced);

    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_writing.cancel();
    writer.await.unwrap();
    eventually("the outbox drained", Duration::from_secs(30), || async {
        (outbox::backlog(&db).await.unwrap() == 0).then_some(())
    })
    .await;
    second_cancel.cancel();
    assert_eq!(second_run.await.unwrap(), SlotEnd::Stopped);
    assert_eq!(first.stats().published, published_by_first, "the fenced relay published after it stopped");

    let written = written.load(Ordering::SeqCst);
    let mut copies: HashMap<String, usize> = HashMap::new();
    for record in meshkit_integration_tests::broker::records(&kafka, &topic).await {
        let id = String::from_utf8(record.headers.get(headers::EVENT_ID).cloned().unwrap_or_default()).unwrap();
        *copies.entry(id).or_default() += 1;
    }
    let twice: Vec<_> = copies.iter().filter(|(_, n)| **n > 1).take(10).collect();
    eprintln!(
        "{written} rows: the first relay published {published_by_first} and stopped {first_stopped:?} after the \
         second was elected; the second published from {second_started:?}, {} in all",
        second.stats().published
    );
    assert!(twice.is_empty(), "published more than once: {twice:?}");
    assert_eq!(copies.len(), written, "every row published");
}
