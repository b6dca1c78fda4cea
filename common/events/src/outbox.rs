//! The transactional outbox: an event is a row written in the same database
//! transaction as the change it announces, and a relay publishes the rows.
//!
//! So an event exists if and only if its change was committed. The relay
//! publishes in row order, marks rows sent, and retries with backoff while the
//! broker is down; a crash between publishing and marking publishes the row
//! again, which consumers absorb by its event id. One relay runs per service:
//! its instances elect it through a one-slot [`SlotGroup`](meshkit_registry::ownership::SlotGroup).
//!
//! An elected relay that loses etcd without noticing (cut off from it, or
//! paused) would go on publishing beside the one elected after it. So the
//! election's [`Fence`] is also kept in the database, in the one row of
//! `meshkit_outbox_relay`: a relay puts its fence there when it starts, unless
//! a newer one is there, and reads it before publishing each batch; it stops as soon as
//! the fence is not its own. A relay that takes over from one that did not
//! stop cleanly waits out the longest round the other may have begun before
//! the fence moved (one broker request timeout, and a second) before its first
//! read, so the rows that round published are marked by then and are not
//! published again.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rskafka::{chrono::Utc, record::Record};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseConnection, DbBackend, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, Schema, sea_query::Index,
};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Kafka, headers, kafka::partition_for};
use meshkit_base::{Backoff, time::now_us};
use meshkit_db::Migration;
use meshkit_registry::ownership::{Fence, SlotEnd};

use crate::error::{Error, Result};

pub mod entity {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "meshkit_outbox")]
    pub struct Model {
        /// Publication order.
        #[sea_orm(primary_key)]
        pub seq: i64,
        #[sea_orm(unique)]
        pub event_id: String,
        pub topic: String,
        /// The record key: events with one key keep their order.
        pub key: String,
        /// Fully qualified protobuf message name of the payload.
        pub schema: String,
        pub payload: Vec<u8>,
        /// Extra record headers (trace context), a JSON object of strings.
        pub headers: String,
        pub create_time_us: i64,
        pub sent_time_us: Option<i64>,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The fence of the relay that holds the outbox: one row (`id` 1).
pub mod relay_fence {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "meshkit_outbox_relay")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        pub fence_cluster: i64,
        pub fence_revision: i64,
        /// The instance whose relay holds it.
        pub owner: String,
        /// Its relay stopped cleanly: nothing of it is in flight.
        pub released: bool,
        pub update_time_us: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// The outbox table; apply with the component's own migrations.
pub const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "create meshkit_outbox", up: create_outbox },
    Migration { version: 2, name: "create meshkit_outbox_relay", up: create_relay_fence },
];

fn create_relay_fence(schema: &Schema, backend: DbBackend) -> Vec<sea_orm::Statement> {
    vec![backend.build(schema.create_table_from_entity(relay_fence::Entity).if_not_exists())]
}

/// The migration records' component name of the outbox table.
pub const COMPONENT: &str = "meshkit-outbox";

fn create_outbox(schema: &Schema, backend: DbBackend) -> Vec<sea_orm::Statement> {
    let unsent = Index::create()
        .if_not_exists()
        .name("idx_meshkit_outbox_sent_seq")
        .table(entity::Entity)
        .col(entity::Column::SentTimeUs)
        .col(entity::Column::Seq)
        .to_owned();
    vec![backend.build(schema.create_table_from_entity(entity::Entity).if_not_exists()), backend.build(&unsent)]
}

/// One event to publish.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub event_id: String,
    pub topic: String,
    pub key: String,
    /// Fully qualified protobuf message name, e.g. `meshkit.notification.v1.OrderCreated`.
    pub schema: String,
    pub payload: Vec<u8>,
    /// Extra headers, such as `traceparent`.
    pub headers: BTreeMap<String, String>,
}

/// Writes `event` in the caller's transaction.
pub async fn enqueue(txn: &impl ConnectionTrait, event: OutboxEvent) -> Result<()> {
    let headers = serde_json::to_string(&event.headers).map_err(|e| Error::Config(e.to_string()))?;
    entity::Entity::insert(entity::ActiveModel {
        event_id: Set(event.event_id),
        topic: Set(event.topic),
        key: Set(event.key),
        schema: Set(event.schema),
        payload: Set(event.payload),
        headers: Set(headers),
        create_time_us: Set(now_us()),
        sent_time_us: Set(None),
        ..Default::default()
    })
    .exec_without_returning(txn)
    .await?;
    Ok(())
}

/// Rows not yet published.
pub async fn backlog(db: &DatabaseConnection) -> Result<u64> {
    Ok(entity::Entity::find().filter(entity::Column::SentTimeUs.is_null()).count(db).await?)
}

/// When the oldest row not yet published was written (first in publication
/// order, read through the unsent index), if any.
pub async fn oldest_unsent_us(db: &DatabaseConnection) -> Result<Option<i64>> {
    use sea_orm::{QueryOrder, QuerySelect};
    Ok(entity::Entity::find()
        .select_only()
        .column(entity::Column::CreateTimeUs)
        .filter(entity::Column::SentTimeUs.is_null())
        .order_by_asc(entity::Column::Seq)
        .into_tuple::<i64>()
        .one(db)
        .await?)
}

/// Publishes outbox rows; run by the elected instance of a service.
#[derive(Clone)]
pub struct Relay {
    db: DatabaseConnection,
    kafka: Kafka,
    wake: Arc<Notify>,
    stats: Arc<RelayCounters>,
}

#[derive(Debug, Default)]
struct RelayCounters {
    published: AtomicU64,
    failures: AtomicU64,
    /// Microseconds from the row's commit to the broker's acknowledgement, of the last batch.
    last_lag_us: AtomicU64,
}

/// What the relay of this instance did so far.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RelayStats {
    pub leading: bool,
    pub published: u64,
    pub failures: u64,
    pub last_lag_ms: f64,
}

impl Relay {
    pub fn new(db: DatabaseConnection, kafka: Kafka) -> Self {
        Self { db, kafka, wake: Arc::new(Notify::new()), stats: Arc::default() }
    }

    /// Counters of this instance's relay (`leading` is filled in by [`RelayHandle::reporter`]).
    pub fn stats(&self) -> RelayStats {
        RelayStats {
            leading: false,
            published: self.stats.published.load(Ordering::Relaxed),
            failures: self.stats.failures.load(Ordering::Relaxed),
            last_lag_ms: self.stats.last_lag_us.load(Ordering::Relaxed) as f64 / 1000.0,
        }
    }

    /// Tells the relay that rows were committed, so it publishes without
    /// waiting for its next poll. Call after the commit.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Publishes until `cancel`, alone (no election, no fence); never
    /// returns an error: it retries.
    pub async fn run(self, cancel: CancellationToken) {
        self.run_fenced(None, cancel).await;
    }

    /// Publishes until `cancel`, or until a relay with a newer `fence` holds
    /// the outbox (see the module's documentation). Retries every other error.
    pub async fn run_fenced(self, fence: Option<(Fence, String)>, cancel: CancellationToken) -> SlotEnd {
        let settings = self.kafka.settings().clone();
        let limit = Duration::from_millis(settings.request_timeout_ms);
        if let Some((fence, owner)) = &fence {
            let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
            let taken = loop {
                match self.take_fence(*fence, owner).await {
                    Ok(taken) => break taken,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox relay cannot record its fence; retrying");
                        tokio::select! {
                            _ = cancel.cancelled() => return SlotEnd::Stopped,
                            _ = tokio::time::sleep(backoff.next_delay()) => {}
                        }
                    }
                }
            };
            match taken {
                Taken::Newer => {
                    tracing::warn!(
                        revision = fence.revision,
                        "a relay with a newer fence holds the outbox; not starting"
                    );
                    return SlotEnd::Fenced;
                }
                Taken::FromUnreleased(previous) => {
                    let wait = limit + Duration::from_secs(1);
                    tracing::info!(
                        previous,
                        ?wait,
                        "outbox taken over from a relay that did not stop cleanly; waiting out its last round"
                    );
                    tokio::select! {
                        _ = cancel.cancelled() => {
                            self.release_fence(*fence).await;
                            return SlotEnd::Stopped;
                        }
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Taken::Free => {}
            }
        }
        let fence = fence.map(|(f, _)| f);
        let end = self.publish_until(fence, limit, cancel).await;
        if let (SlotEnd::Stopped, Some(fence)) = (&end, fence) {
            self.release_fence(fence).await;
        }
        end
    }

    async fn publish_until(&self, fence: Option<Fence>, limit: Duration, cancel: CancellationToken) -> SlotEnd {
        let settings = self.kafka.settings().clone();
        let poll = Duration::from_millis(settings.relay_poll_ms);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut last_prune = tokio::time::Instant::now();
        let mut failing = false;
        tracing::info!("outbox relay started");
        loop {
            if cancel.is_cancelled() {
                break;
            }
            // Stopping mid-round is safe: rows not yet marked are published again
            // by the next relay, and consumers skip what they already applied.
            let round = tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.round(fence, settings.relay_batch, limit) => r,
            };
            match round {
                Err(Error::Fenced) => {
                    tracing::warn!("outbox relay fenced: a relay elected after this one holds the outbox; stopping");
                    return SlotEnd::Fenced;
                }
                Ok(0) => {
                    if last_prune.elapsed() > Duration::from_secs(60) {
                        last_prune = tokio::time::Instant::now();
                        self.prune(settings.outbox_retention_secs).await;
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(poll) => {}
                    }
                }
                Ok(sent) => {
                    if failing {
                        tracing::info!(sent, "outbox relay publishing again");
                        failing = false;
                    }
                    backoff.reset();
                }
                Err(e) => {
                    self.stats.failures.fetch_add(1, Ordering::Relaxed);
                    if !failing {
                        // A broker outage is logged once by the Kafka client, naming the brokers.
                        if matches!(e, Error::Kafka { code: None, .. }) {
                            tracing::info!(error = %e, "outbox relay cannot publish; retrying with backoff");
                        } else {
                            tracing::warn!(error = %e, "outbox relay cannot publish; retrying with backoff");
                        }
                        failing = true;
                    } else {
                        tracing::debug!(error = %e, "outbox relay still failing");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        }
        tracing::info!("outbox relay stopped");
        SlotEnd::Stopped
    }

    /// Puts `fence` on the outbox unless a newer one is there.
    async fn take_fence(&self, fence: Fence, owner: &str) -> Result<Taken> {
        use sea_orm::{
            Condition, TransactionTrait,
            sea_query::{Expr, OnConflict},
        };
        let txn = self.db.begin_with_options(crate::consumer::write_txn()).await?;
        relay_fence::Entity::insert(relay_fence::ActiveModel {
            id: Set(1),
            fence_cluster: Set(0),
            fence_revision: Set(0),
            owner: Set(String::new()),
            released: Set(true),
            update_time_us: Set(now_us()),
        })
        .on_conflict(OnConflict::column(relay_fence::Column::Id).do_nothing().to_owned())
        .exec_without_returning(&txn)
        .await?;
        let previous = relay_fence::Entity::find_by_id(1).one(&txn).await?;
        let cluster = fence.cluster_id as i64;
        let taken = relay_fence::Entity::update_many()
            .col_expr(relay_fence::Column::FenceCluster, Expr::value(cluster))
            .col_expr(relay_fence::Column::FenceRevision, Expr::value(fence.revision))
            .col_expr(relay_fence::Column::Owner, Expr::value(owner))
            .col_expr(relay_fence::Column::Released, Expr::value(false))
            .col_expr(relay_fence::Column::UpdateTimeUs, Expr::value(now_us()))
            .filter(relay_fence::Column::Id.eq(1))
            .filter(
                Condition::any()
                    .add(relay_fence::Column::FenceCluster.ne(cluster))
                    .add(relay_fence::Column::FenceRevision.lte(fence.revision)),
            )
            .exec(&txn)
            .await?;
        if taken.rows_affected == 0 {
            txn.rollback().await?;
            return Ok(Taken::Newer);
        }
        txn.commit().await?;
        Ok(match previous {
            Some(p) if !p.released && (p.fence_cluster, p.fence_revision) != (cluster, fence.revision) => {
                Taken::FromUnreleased(p.owner)
            }
            _ => Taken::Free,
        })
    }

    /// Marks the outbox released by this relay, if it still holds it: the
    /// next relay need not wait.
    async fn release_fence(&self, fence: Fence) {
        use sea_orm::sea_query::Expr;
        let released = relay_fence::Entity::update_many()
            .col_expr(relay_fence::Column::Released, Expr::value(true))
            .col_expr(relay_fence::Column::UpdateTimeUs, Expr::value(now_us()))
            .filter(relay_fence::Column::Id.eq(1))
            .filter(relay_fence::Column::FenceCluster.eq(fence.cluster_id as i64))
            .filter(relay_fence::Column::FenceRevision.eq(fence.revision))
            .exec(&self.db)
            .await;
        if let Err(e) = released {
            tracing::debug!(error = %e, "releasing the outbox fence failed; the next relay waits out a round");
        }
    }

    /// Publishes up to `batch` rows, the broker given at most `limit`, once
    /// it has checked that the outbox is still this relay's (`fence`; only
    /// when there is something to publish, so an idle poll stays one query);
    /// returns how many were sent.
    async fn round(&self, fence: Option<Fence>, batch: u32, limit: Duration) -> Result<usize> {
        let rows = entity::Entity::find()
            .filter(entity::Column::SentTimeUs.is_null())
            .order_by_asc(entity::Column::Seq)
            .limit(u64::from(batch))
            .all(&self.db)
            .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        if let Some(fence) = fence {
            let held = relay_fence::Entity::find_by_id(1).one(&self.db).await?;
            if held.is_none_or(|h| (h.fence_cluster, h.fence_revision) != (fence.cluster_id as i64, fence.revision)) {
                return Err(Error::Fenced);
            }
        }
        // Group by (topic, partition), keeping row order inside each group;
        // groups go out in the order of their first row.
        let mut groups: Vec<((String, i32), Vec<entity::Model>)> = Vec::new();
        for row in rows {
            let partitions = self.kafka.ensure_topic(&row.topic).await?;
            let target = (row.topic.clone(), partition_for(row.key.as_bytes(), partitions));
            match groups.iter_mut().find(|(t, _)| *t == target) {
                Some((_, rows)) => rows.push(row),
                None => groups.push((target, vec![row])),
            }
        }
        // Every partition's batch at once (one round trip, not one per
        // partition), then the published rows marked in one statement. A
        // partition that failed keeps its rows unsent, in order, for the next
        // round; a crash before the mark publishes them again, and consumers
        // skip the copies by event id.
        // Bounded, so that a relay taking over knows how long a round of this
        // one can last (see the module's documentation).
        let produced = futures::future::join_all(groups.into_iter().map(|((topic, partition), rows)| async move {
            let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
            let oldest = rows.iter().map(|r| r.create_time_us).min().unwrap_or_else(now_us);
            let records = rows.into_iter().map(to_record).collect();
            let result = match tokio::time::timeout(limit, self.kafka.produce(&topic, partition, records)).await {
                Ok(result) => result,
                Err(_) => Err(Error::kafka(format!("producing to {topic}/{partition} took longer than {limit:?}"))),
            };
            (seqs, oldest, result)
        }))
        .await;
        let mut published = Vec::new();
        let mut failure = None;
        for (seqs, oldest, result) in produced {
            match result {
                Ok(_) => {
                    self.stats.last_lag_us.store((now_us() - oldest).max(0) as u64, Ordering::Relaxed);
                    published.extend(seqs);
                }
                Err(e) => {
                    failure.get_or_insert(e);
                }
            }
        }
        if !published.is_empty() {
            self.stats.published.fetch_add(published.len() as u64, Ordering::Relaxed);
            entity::Entity::update_many()
                .col_expr(entity::Column::SentTimeUs, sea_orm::sea_query::Expr::value(now_us()))
                .filter(entity::Column::Seq.is_in(published.clone()))
                .exec(&self.db)
                .await?;
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(published.len()),
        }
    }

    async fn prune(&self, retention_secs: u64) {
        let before = now_us() - (retention_secs as i64) * 1_000_000;
        let pruned = entity::Entity::delete_many().filter(entity::Column::SentTimeUs.lt(before)).exec(&self.db).await;
        match pruned {
            Ok(r) if r.rows_affected > 0 => tracing::debug!(rows = r.rows_affected, "published outbox rows pruned"),
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "pruning the outbox failed"),
        }
    }
}

/// What putting a fence on the outbox found.
enum Taken {
    /// Nobody held it, or the last holder stopped cleanly.
    Free,
    /// This instance's relay (named) held it and did not release it: a round
    /// of it may still be publishing.
    FromUnreleased(String),
    /// A newer fence is there.
    Newer,
}

fn to_record(row: entity::Model) -> Record {
    let mut record_headers: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    if let Ok(extra) = serde_json::from_str::<BTreeMap<String, String>>(&row.headers) {
        for (k, v) in extra {
            record_headers.insert(k, v.into_bytes());
        }
    }
    record_headers.insert(headers::EVENT_ID.into(), row.event_id.into_bytes());
    record_headers.insert(headers::SCHEMA.into(), row.schema.into_bytes());
    record_headers.insert(headers::CONTENT_TYPE.into(), headers::PROTOBUF.as_bytes().to_vec());
    let timestamp = rskafka::chrono::DateTime::from_timestamp_micros(row.create_time_us).unwrap_or_else(Utc::now);
    Record { key: Some(row.key.into_bytes()), value: Some(row.payload), headers: record_headers, timestamp }
}

/// The relay of one service instance: it publishes while this instance is
/// the elected one.
pub struct RelayHandle {
    relay: Relay,
    group: meshkit_registry::ownership::GroupHandle,
}

impl RelayHandle {
    /// Joins the election of `service`'s relays (in the background) and runs
    /// the relay whenever this instance wins it.
    pub fn spawn(
        etcd: etcd_client::Client,
        relay: Relay,
        prefix: &str,
        service: &str,
        member: &str,
        ttl_secs: i64,
    ) -> Self {
        let spec = meshkit_registry::ownership::GroupSpec {
            prefix: prefix.to_owned(),
            group: meshkit_registry::keys::outbox_group(service),
            member: member.to_owned(),
            slots: 1,
            ttl_secs,
            stop_timeout: Duration::from_secs(10),
        };
        let runner = relay.clone();
        let member = member.to_owned();
        let group = meshkit_registry::ownership::SlotGroup::spawn(
            etcd,
            spec,
            Box::new(move |slot| {
                let relay = runner.clone();
                let owner = member.clone();
                Box::pin(async move { relay.run_fenced(Some((slot.fence, owner)), slot.cancel).await })
            }),
        );
        Self { relay, group }
    }

    pub fn relay(&self) -> &Relay {
        &self.relay
    }

    /// A function giving the relay's counters and whether this instance
    /// leads, for the admin endpoint.
    pub fn reporter(&self) -> impl Fn() -> RelayStats + Send + Sync + 'static {
        let relay = self.relay.clone();
        let owned = self.group.owned();
        move || RelayStats { leading: !owned.borrow().is_empty(), ..relay.stats() }
    }

    /// The relay's `/metrics` families: the outbox backlog (rows not yet
    /// published, read from the table, so every instance reports it) and the
    /// age of the oldest, this instance's relay lag, publications and failures.
    pub fn metrics_source(&self) -> meshkit_telemetry::metrics::Source {
        let report = self.reporter();
        let db = self.relay.db.clone();
        meshkit_telemetry::metrics::source(move || {
            let stats = report();
            let db = db.clone();
            async move {
                let mut scrape = meshkit_telemetry::metrics::Scrape::default();
                if let (Ok(backlog), Ok(oldest)) = (backlog(&db).await, oldest_unsent_us(&db).await) {
                    scrape
                        .gauge("meshkit_outbox_backlog", "Events committed to the outbox and not yet published.")
                        .set(backlog as f64);
                    let age = oldest.map_or(0.0, |t| (now_us() - t).max(0) as f64 / 1e6);
                    scrape
                        .gauge(
                            "meshkit_outbox_oldest_unsent_age_seconds",
                            "Age of the oldest event not yet published (0 when none waits).",
                        )
                        .set(age);
                }
                scrape
                    .gauge(
                        "meshkit_outbox_relay_leading",
                        "1 when this instance's relay holds the outbox (one relay per service publishes).",
                    )
                    .set(f64::from(u8::from(stats.leading)));
                scrape
                    .gauge(
                        "meshkit_outbox_relay_lag_seconds",
                        "Time from commit to the broker's acknowledgement, of the last batch this relay published.",
                    )
                    .set(stats.last_lag_ms / 1000.0);
                scrape
                    .counter("meshkit_outbox_published", "Events this instance's relay published.")
                    .inc_by(stats.published);
                scrape
                    .counter(
                        "meshkit_outbox_publish_failures",
                        "Publish attempts of this instance's relay that failed (and were retried).",
                    )
                    .inc_by(stats.failures);
                scrape
            }
        })
    }

    /// Stops publishing (the rows stay for the next relay) and leaves the election.
    pub async fn close(self) {
        self.group.close().await;
    }
}
