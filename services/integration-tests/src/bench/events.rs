//! The event pipeline's benchmarks, beside the broker's own floor:
//!
//! 1. Outbox relay throughput: rows already committed in the outbox, published
//!    by the relay (read, group by partition, produce, mark sent), against the
//!    same records produced straight to the broker in the same batches.
//! 2. Order created → notification stored, at a steady rate, with SQLite and
//!    with PostgreSQL under the services: latency p50/p99 and the relay's
//!    share of it (commit → published),
//!    the consumers' lag (high watermark of their last fetch − committed
//!    offset, from `/reports`) and the end-to-end backlog (orders created −
//!    notifications stored, sampled every 200 ms), against a bare rskafka
//!    produce → fetch round trip and a Java `kafka-clients` producer →
//!    consumer round trip through the same broker at the same rate.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use meshkit_common::{
    ChannelBuilder,
    admin::http_get,
    events::{Kafka, OutboxEvent, Relay, kafka::partition_for, outbox},
    time::now_us,
};
use meshkit_integration_tests::TestConfig;
use meshkit_integration_tests::{Broker, Etcd, Postgres, create_user, java_clients_classpath, mesh_config, sqlite_url};
use meshkit_proto::order::{CreateOrderRequest, OrderItem, order_service_client::OrderServiceClient};
use rskafka::{chrono::Utc, record::Record};
use sea_orm::{ConnectionTrait, Statement, TransactionTrait};
use tokio_util::sync::CancellationToken;

const TOPIC: &str = "bench-events";

pub async fn run(etcd: &Etcd, secs: u64) -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    relay_throughput(etcd, &broker).await?;
    end_to_end(etcd, &broker, secs).await?;
    Ok(())
}

/// `MESHKIT_BENCH_FETCH_WAIT_MS` (default: the `events.fetch_max_wait_ms` default).
fn fetch_wait() -> i32 {
    std::env::var("MESHKIT_BENCH_FETCH_WAIT_MS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| meshkit_common::config::EventSettings::default().fetch_max_wait_ms)
}

fn events_config(etcd: &Etcd, broker: &Broker, db: &str) -> TestConfig {
    let mut config = mesh_config(etcd, db);
    config.registry.ttl_secs = 5;
    config.events.brokers = vec![broker.endpoint()];
    config.events.relay_poll_ms = 20;
    config.events.fetch_max_wait_ms = fetch_wait();
    config
}

fn event(i: usize) -> OutboxEvent {
    OutboxEvent {
        event_id: format!("e-{i}"),
        topic: TOPIC.into(),
        key: format!("order-{i}"),
        schema: meshkit_proto::events::schemas::ORDER_CREATED.into(),
        payload: vec![7u8; 120],
        headers: BTreeMap::new(),
    }
}

async fn relay_throughput(etcd: &Etcd, broker: &Broker) -> anyhow::Result<()> {
    let rows = 20_000;
    let dir = tempfile::tempdir()?;
    let config = events_config(etcd, broker, &sqlite_url(dir.path(), "outbox"));
    let db = meshkit_common::db::connect(&config.database).await?;
    meshkit_common::db::migrate(&db, outbox::COMPONENT, outbox::MIGRATIONS).await?;
    for chunk in (0..rows).collect::<Vec<_>>().chunks(1_000) {
        let txn = db.begin().await?;
        for i in chunk {
            outbox::enqueue(&txn, event(*i)).await?;
        }
        txn.commit().await?;
    }
    let kafka = Kafka::new(config.events.clone(), "bench");
    let partitions = kafka.ensure_topic(TOPIC).await?;

    // Baseline: the same records straight to the broker in the relay's
    // shape: windows of 500 rows, every partition's share of a window
    // produced at once.
    let started = Instant::now();
    let mut by_partition: BTreeMap<i32, Vec<Record>> = BTreeMap::new();
    for i in 0..rows {
        let e = event(i);
        let record = Record {
            key: Some(e.key.clone().into_bytes()),
            value: Some(e.payload),
            headers: BTreeMap::from([("event-id".to_owned(), e.event_id.into_bytes())]),
            timestamp: Utc::now(),
        };
        by_partition.entry(partition_for(e.key.as_bytes(), partitions)).or_default().push(record);
        if i % 500 == 499 || i == rows - 1 {
            let window = std::mem::take(&mut by_partition);
            let sends = window.into_iter().map(|(p, records)| kafka.produce(TOPIC, p, records));
            for result in futures::future::join_all(sends).await {
                result?;
            }
        }
    }
    let raw = started.elapsed();

    let relay = Relay::new(db.clone(), kafka);
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let task = tokio::spawn(relay.clone().run(cancel.clone()));
    let deadline = Instant::now() + Duration::from_secs(120);
    while outbox::backlog(&db).await? > 0 {
        anyhow::ensure!(Instant::now() < deadline, "the relay did not drain the outbox within 120 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let relayed = started.elapsed();
    cancel.cancel();
    let _ = task.await;
    let rate = |d: Duration| rows as f64 / d.as_secs_f64();
    println!(
        "\n== outbox relay ({rows} committed rows, SQLite outbox, Apache Kafka (1 node), {partitions} partitions)"
    );
    println!("  {:<34} {:>12} {:>12} {:>8}", "", "raw produce", "relay", "ratio");
    println!("  {:<34} {:>12.0} {:>12.0} {:>8.2}", "events/s", rate(raw), rate(relayed), rate(relayed) / rate(raw));
    Ok(())
}

/// One end-to-end run's figures.
struct EndToEnd {
    /// Order created → notification stored.
    total: Histogram<u64>,
    /// Order committed → published by the relay (the outbox row's sent time).
    relay: Histogram<u64>,
    failed: usize,
    offered: Duration,
    max_lag: i64,
    max_backlog: i64,
}

async fn end_to_end(etcd: &Etcd, broker: &Broker, secs: u64) -> anyhow::Result<()> {
    let rate: u64 = 500;
    let total = (rate * secs) as usize;
    let dir = tempfile::tempdir()?;
    let sqlite = pipeline(etcd, broker, rate, total, "sqlite.", &|name| sqlite_url(dir.path(), name)).await?;
    let pg = Postgres::start()?;
    let postgres = pipeline(etcd, broker, rate, total, "postgres.", &|_| pg.url()).await?;
    let floor = raw_round_trip(broker, rate, total).await?;
    let java = java_round_trip(broker, rate, total).await?;
    println!(
        "\n== order created -> notification stored ({total} orders at {rate}/s, 2 consumers, 6 partitions, fetch wait {} ms; failed: {} on SQLite, {} on PostgreSQL)",
        fetch_wait(),
        sqlite.failed,
        postgres.failed,
    );
    println!("  {:<30} {:>9} {:>9} {:>13} {:>13}", "(ms)", "rskafka", "java", "meshkit SQL.", "meshkit PG");
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    for (name, q, j) in [("latency p50", 0.5, java.p50_ms), ("latency p99", 0.99, java.p99_ms)] {
        println!(
            "  {name:<30} {:>9.1} {j:>9.1} {:>13.1} {:>13.1}",
            ms(&floor, q),
            ms(&sqlite.total, q),
            ms(&postgres.total, q)
        );
    }
    for (name, q) in [("  of it commit -> published p50", 0.5), ("  of it commit -> published p99", 0.99)] {
        println!("  {name:<30} {:>9} {:>9} {:>13.1} {:>13.1}", "-", "-", ms(&sqlite.relay, q), ms(&postgres.relay, q));
    }
    println!(
        "  {:<30} {:>9} {:>9} {:>13} {:>13}",
        "records back",
        floor.len(),
        java.received,
        sqlite.total.len(),
        postgres.total.len()
    );
    println!(
        "  {:<30} {:>9} {:>9} {:>13} {:>13}",
        "max consumer lag (records)", "-", "-", sqlite.max_lag, postgres.max_lag
    );
    println!(
        "  {:<30} {:>9} {:>9} {:>13} {:>13}",
        "max orders not yet notified", "-", "-", sqlite.max_backlog, postgres.max_backlog
    );
    println!(
        "  offered over {:.1} s (SQLite) and {:.1} s (PostgreSQL); goal: p50 <= 10 ms, p99 <= 50 ms",
        sqlite.offered.as_secs_f64(),
        postgres.offered.as_secs_f64()
    );
    Ok(())
}

/// user, order and two notification instances on `db(name)`, their topics
/// under `prefix`; `total` orders at `rate` a second.
async fn pipeline(
    etcd: &Etcd,
    broker: &Broker,
    rate: u64,
    total: usize,
    prefix: &str,
    db: &dyn Fn(&str) -> String,
) -> anyhow::Result<EndToEnd> {
    let cfg = |name: &str| {
        let mut config = events_config(etcd, broker, &db(name));
        config.events.topic_prefix = prefix.to_owned();
        config
    };
    let user = meshkit_user::start(cfg("user").into()).await?;
    let order = meshkit_order::start(cfg("order").into()).await?;
    let n1 = meshkit_notification::start(cfg("notification").into()).await?;
    let n2 = meshkit_notification::start(cfg("notification").into()).await?;
    let admins: Vec<String> = [&n1, &n2].iter().filter_map(|s| s.admin_addr()).map(|a| a.to_string()).collect();
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit");
    let email = format!("bench-{prefix}{}@example.com", now_us());
    let user_id = create_user(&channels.balanced("meshkit.user.v1.UserService"), "Bench", &email).await.id;
    let orders = OrderServiceClient::new(channels.balanced("meshkit.order.v1.OrderService"));
    // Warm up: the consumers own their partitions and the relay is elected.
    for _ in 0..20 {
        let mut o = orders.clone();
        o.create_order(CreateOrderRequest {
            user_id: user_id.clone(),
            items: vec![OrderItem { sku: "warm".into(), quantity: 1 }],
        })
        .await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let notification_db = meshkit_common::db::connect(&cfg("notification").database).await?;
    let order_db = meshkit_common::db::connect(&cfg("order").database).await?;
    let stored = |db: sea_orm::DatabaseConnection| async move {
        let row = db
            .query_one_raw(Statement::from_string(db.get_database_backend(), "SELECT COUNT(*) FROM notifications"))
            .await?
            .ok_or_else(|| anyhow::anyhow!("no count"))?;
        Ok::<i64, anyhow::Error>(row.try_get_by_index(0)?)
    };
    let before = stored(notification_db.clone()).await?;
    let since_us = now_us();

    // A steady rate, bounded in count; lag sampled from the consumers' /reports.
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = tokio::time::Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut max_lag = 0i64;
    let mut max_backlog = 0i64;
    let created = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let mut next_sample = Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(started + interval * i as u32).await;
        let mut o = orders.clone();
        let user_id = user_id.clone();
        let done = created.clone();
        calls.spawn(async move {
            let ok = o
                .create_order(CreateOrderRequest { user_id, items: vec![OrderItem { sku: "b".into(), quantity: 1 }] })
                .await
                .is_ok();
            done.fetch_add(i64::from(ok), std::sync::atomic::Ordering::Relaxed);
            ok
        });
        if Instant::now() >= next_sample {
            next_sample = Instant::now() + Duration::from_millis(200);
            max_lag = max_lag.max(total_lag(&admins).await);
            let notified = stored(notification_db.clone()).await? - before;
            max_backlog = max_backlog.max(created.load(std::sync::atomic::Ordering::Relaxed) - notified);
        }
    }
    let mut failed = 0;
    while let Some(ok) = calls.join_next().await {
        if !matches!(ok, Ok(true)) {
            failed += 1;
        }
    }
    let offered = started.elapsed();
    let want = before + (total - failed) as i64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while stored(notification_db.clone()).await? < want {
        anyhow::ensure!(Instant::now() < deadline, "notifications did not catch up within 60 s");
        max_lag = max_lag.max(total_lag(&admins).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let histogram = |db: sea_orm::DatabaseConnection, sql: String| async move {
        let rows = db.query_all_raw(Statement::from_string(db.get_database_backend(), sql)).await?;
        let mut h = Histogram::<u64>::new(3)?;
        for row in rows {
            let d: i64 = row.try_get("", "d")?;
            h.record(d.max(1) as u64)?;
        }
        Ok::<_, anyhow::Error>(h)
    };
    let total_h = histogram(
        notification_db.clone(),
        format!("SELECT create_time_us - event_time_us AS d FROM notifications WHERE event_time_us >= {since_us}"),
    )
    .await?;
    let relay = histogram(
        order_db.clone(),
        format!(
            "SELECT sent_time_us - create_time_us AS d FROM meshkit_outbox \
             WHERE create_time_us >= {since_us} AND sent_time_us IS NOT NULL"
        ),
    )
    .await?;
    for server in [n1, n2, order, user] {
        server.shutdown().await?;
    }
    Ok(EndToEnd { total: total_h, relay, failed, offered, max_lag, max_backlog })
}

/// Sum of the lag of every partition the given processes consume.
async fn total_lag(admins: &[String]) -> i64 {
    let mut lag = 0;
    for admin in admins {
        let Ok(body) = http_get(admin, "/reports").await else { continue };
        let report: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        for p in report["consumer"].as_array().into_iter().flatten() {
            lag += p["lag"].as_i64().unwrap_or(0);
        }
    }
    lag
}

/// A record produced with its send time, fetched by a long-polling reader:
/// the broker's own produce → fetch latency at `rate` records/s.
async fn raw_round_trip(broker: &Broker, rate: u64, total: usize) -> anyhow::Result<Histogram<u64>> {
    let settings = meshkit_common::config::EventSettings {
        brokers: vec![broker.endpoint()],
        partitions: 1,
        fetch_max_wait_ms: fetch_wait(),
        ..Default::default()
    };
    let kafka = Kafka::new(settings, "bench-raw");
    let topic = "bench-round-trip";
    kafka.ensure_topic(topic).await?;
    let reader = {
        let kafka = kafka.clone();
        tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new(3)?;
            let mut offset = 0;
            let deadline = Instant::now() + Duration::from_secs(120);
            while (histogram.len() as usize) < total && Instant::now() < deadline {
                let fetched = kafka.fetch(topic, 0, offset).await?;
                let from = offset;
                for r in fetched.records.into_iter().filter(|r| r.offset >= from) {
                    offset = r.offset + 1;
                    let sent: i64 = String::from_utf8_lossy(r.record.value.as_deref().unwrap_or_default()).parse()?;
                    histogram.record((now_us() - sent).max(1) as u64)?;
                }
            }
            Ok::<_, anyhow::Error>(histogram)
        })
    };
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let started = tokio::time::Instant::now();
    for i in 0..total {
        tokio::time::sleep_until(started + interval * i as u32).await;
        let record = Record {
            key: None,
            value: Some(now_us().to_string().into_bytes()),
            headers: Default::default(),
            timestamp: Utc::now(),
        };
        kafka.produce(topic, 0, vec![record]).await?;
    }
    reader.await?
}

/// What `io.meshkit.events.RoundTrip` (kafka-clients) measured.
struct JavaRoundTrip {
    received: u64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The same round trip with Apache Kafka's own Java client: a producer
/// (acks=all, no linger) and a consumer assigned the partition, one JVM.
async fn java_round_trip(broker: &Broker, rate: u64, total: usize) -> anyhow::Result<JavaRoundTrip> {
    let settings =
        meshkit_common::config::EventSettings { brokers: vec![broker.endpoint()], partitions: 1, ..Default::default() };
    let topic = "bench-java-round-trip";
    Kafka::new(settings, "bench-java").ensure_topic(topic).await?;
    let classpath = java_clients_classpath()?;
    let out = tokio::process::Command::new("java")
        .args(["-Xmx256m", "-cp", &classpath, "io.meshkit.events.RoundTrip"])
        .args([broker.endpoint(), topic.to_owned(), rate.to_string(), total.to_string()])
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "the Java round trip failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
    );
    let line = stdout.lines().rev().find(|l| l.starts_with('{')).unwrap_or("{}");
    let v: serde_json::Value = serde_json::from_str(line)?;
    let us = |k: &str| v[k].as_f64().unwrap_or(f64::NAN) / 1000.0;
    Ok(JavaRoundTrip { received: v["received"].as_u64().unwrap_or(0), p50_ms: us("p50_us"), p99_ms: us("p99_us") })
}
