//! The pipeline on a 3-node KRaft cluster (each node broker and controller):
//! replication factor 3, `min.insync.replicas=2`, produced with acks from all
//! in-sync replicas (rskafka sends acks=-1). The slow tier: `make test-system`.

use meshkit_integration_tests::KafkaCluster;

use super::*;

/// Each node's lines beyond kafka.sh's single-node defaults.
const REPLICATED: &str = "default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2";

async fn cluster_pipeline() -> (KafkaCluster, Pipeline) {
    let cluster = KafkaCluster::start(3, REPLICATED).await.unwrap();
    let events = EventSettings { brokers: cluster.endpoints(), replication_factor: 3, ..EventSettings::default() };
    let p = Pipeline::start_with(events, None, None).await;
    (cluster, p)
}

/// Until every partition of `topic` has a leader, or panics with Kafka's
/// own description of them.
async fn every_partition_led(cluster: &KafkaCluster, topic: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if cluster.leaders(topic).await.map(|l| l.len() == 6).unwrap_or(false) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("partitions without a leader 60 s on:\n{}", cluster.describe(topic).await.unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn unsent(p: &Pipeline) -> i64 {
    let order_db = Database::connect(sqlite_url(p.dir.path(), "order")).await.unwrap();
    count(&order_db, "SELECT COUNT(*) FROM meshkit_outbox WHERE sent_time_us IS NULL").await
}

async fn outbox_drains(p: &Pipeline) {
    eventually("an empty outbox", Duration::from_secs(30), || async { (unsent(p).await == 0).then_some(()) }).await;
}

#[tokio::test]
#[ignore = "system tier (a 3-node Kafka cluster): make test-system"]
async fn killing_a_partition_leader_mid_stream_loses_nothing_and_applies_nothing_twice() {
    let (mut cluster, mut p) = cluster_pipeline().await;
    let a = p.notification().await;
    let b = p.notification().await;
    let db = p.notification_db().await;
    let topic = p.topic();

    // Kafka's admin tool takes seconds to say who leads: ask before the
    // orders flow, or they may all be delivered before the kill.
    let leaders = cluster.leaders(&topic).await.unwrap();
    let killed = async {
        // Mid-stream: events are flowing and most orders are still to come.
        wait_for_notifications(&db, 150, Duration::from_secs(60)).await;
        let leader = leaders[&0];
        let delivered = count(&db, "SELECT COUNT(*) FROM notifications").await;
        cluster.node(leader).kill();
        let at = tokio::time::Instant::now();
        eprintln!(
            "killed node {leader}, the leader of partition 0 (leaders {leaders:?}), at {delivered} notifications"
        );
        (leader, leaders, delivered, at)
    };
    let (orders, (leader, before, delivered_at_kill, killed_at)) = futures::join!(p.create_orders(1_000, 8), killed);
    assert_eq!(orders.len(), 1_000, "every order is accepted");
    assert!(delivered_at_kill < 1_000, "the leader died mid-stream ({delivered_at_kill} delivered)");

    wait_for_notifications(&db, 1_000, Duration::from_secs(120)).await;
    eprintln!("1,000 notifications {:.1} s after the kill", killed_at.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_exactly_once(&db, &orders).await;
    outbox_drains(&p).await;

    // Every partition the dead node led has a new leader among the living.
    let after = cluster.leaders(&topic).await.unwrap();
    for (partition, old) in &before {
        let new = after[partition];
        assert_ne!(new, leader, "partition {partition} still names the dead node {leader}: {after:?}");
        if *old != leader {
            continue;
        }
        eprintln!("partition {partition}: leader {old} -> {new}");
    }

    // The node comes back and catches up; the pipeline goes on.
    cluster.restart_stopped().await.unwrap();
    let more = p.create_orders(50, 4).await;
    wait_for_notifications(&db, 1_050, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_exactly_once(&db, &[orders, more].concat()).await;

    p.servers.extend([a, b]);
    p.shutdown().await;
}

#[tokio::test]
#[ignore = "system tier (a 3-node Kafka cluster): make test-system"]
async fn orders_made_while_every_broker_is_down_for_20_s_are_delivered_once_they_return() {
    let (mut cluster, mut p) = cluster_pipeline().await;
    let n = p.notification().await;
    let db = p.notification_db().await;
    let mut orders = p.create_orders(100, 4).await;
    wait_for_notifications(&db, 100, Duration::from_secs(60)).await;

    cluster.kill_all();
    let down = tokio::time::Instant::now();
    let steady = p.steady_orders();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let during = steady.finish().await;
    assert!(during.len() > 100, "orders are accepted all along ({} in 20 s)", during.len());
    assert_eq!(count(&db, "SELECT COUNT(*) FROM notifications").await, 100, "nothing arrives while all are down");
    assert_eq!(unsent(&p).await, during.len() as i64, "their events wait in the outbox");
    orders.extend(during);

    cluster.restart_stopped().await.unwrap();
    let back = tokio::time::Instant::now();
    every_partition_led(&cluster, &p.topic()).await;
    wait_for_notifications(&db, orders.len(), Duration::from_secs(120)).await;
    eprintln!(
        "down {:.1} s; {} notifications {:.1} s after the brokers answered again",
        (back - down).as_secs_f64(),
        orders.len(),
        back.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_exactly_once(&db, &orders).await;
    outbox_drains(&p).await;

    p.servers.push(n);
    p.shutdown().await;
}
