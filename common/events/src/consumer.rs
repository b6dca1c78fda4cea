//! Idempotent consumers: partitions shared out through etcd, offsets and
//! effects committed together, fenced against a deposed owner.
//!
//! The partitions of a topic are the slots of a [`SlotGroup`]; a member runs
//! one worker per partition it owns. A worker claims the partition's row in
//! `meshkit_consumer_offsets` with its [`Fence`], then repeats: fetch a batch,
//! open one transaction, move the row's offset past the batch *only if the
//! row still carries its fence*, apply every record (each in a savepoint, its
//! event id recorded in `meshkit_consumed_events` so a replayed duplicate is
//! skipped), commit. A crash before the commit replays the batch; a worker
//! that lost its slot cannot commit, because the next owner moved the fence.
//!
//! A record the handler refuses as poison, or fails on `events.max_attempts`
//! times, goes to the dead-letter topic with the error in a header, and the
//! partition moves on.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use etcd_client::Client;
use rskafka::{
    chrono::{DateTime, Utc},
    record::{Record, RecordAndOffset},
};
use sea_orm::{
    AccessMode,
    ActiveValue::Set,
    ColumnTrait, Condition, DatabaseConnection, DatabaseTransaction, DbBackend, EntityTrait, QueryFilter, Schema,
    SqliteTransactionMode, TransactionOptions, TransactionTrait,
    sea_query::{Expr, OnConflict},
};
use serde::Serialize;
use tracing::Instrument;

use super::{Kafka, headers};
use meshkit_base::{Backoff, time::now_us};
use meshkit_db::Migration;
use meshkit_registry::ownership::{Fence, GroupSpec, Slot, SlotEnd, SlotGroup};
use meshkit_telemetry::metrics::{self, Scrape};

use crate::error::{Error, Result};
use prometheus_client::encoding::EncodeLabelSet;

pub mod entity {
    pub mod offset {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "meshkit_consumer_offsets")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub group_name: String,
            #[sea_orm(primary_key, auto_increment = false)]
            pub topic: String,
            #[sea_orm(primary_key, auto_increment = false)]
            pub partition: i32,
            /// The next offset to read; -1 before the first commit.
            pub next_offset: i64,
            /// etcd cluster id of the fence (stored as the same 64 bits).
            pub fence_cluster: i64,
            /// Create revision of the owner key of the current owner.
            pub fence_revision: i64,
            pub owner: String,
            pub update_time_us: i64,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }

    pub mod consumed {
        use sea_orm::entity::prelude::*;

        #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
        #[sea_orm(table_name = "meshkit_consumed_events")]
        pub struct Model {
            #[sea_orm(primary_key, auto_increment = false)]
            pub group_name: String,
            #[sea_orm(primary_key, auto_increment = false)]
            pub event_id: String,
            pub topic: String,
            pub partition: i32,
            pub offset: i64,
            /// `applied` or `dead-lettered`.
            pub outcome: String,
            pub consume_time_us: i64,
            /// The event's time (its record timestamp, the same on every
            /// copy; a replay's own time once a replay is applied): the id
            /// is pruned `events.dedup_window_secs` after it.
            pub event_time_us: i64,
            /// The `replay-id` of the last replay of this dead-lettered
            /// event that was tried (version 3).
            pub replay_id: Option<String>,
        }

        #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
        pub enum Relation {}

        impl ActiveModelBehavior for ActiveModel {}
    }
}

use entity::{consumed, offset};

/// The consumer tables; apply with the component's own migrations.
pub const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "create meshkit_consumer_offsets and meshkit_consumed_events", up: create_tables },
    Migration { version: 2, name: "event time of consumed ids, for pruning", up: add_event_time },
    Migration { version: 3, name: "replay id of a dead-lettered event put back on its topic", up: add_replay_id },
];

/// The migration records' component name of the consumer tables.
pub const COMPONENT: &str = "meshkit-consumer";

/// The tables as version 1 made them (written out, so later columns come
/// from later migrations only).
fn create_tables(schema: &Schema, backend: DbBackend) -> Vec<sea_orm::Statement> {
    use consumed::Column as C;
    use sea_orm::sea_query::{ColumnDef, Index, Table};
    let consumed = Table::create()
        .table(consumed::Entity)
        .if_not_exists()
        .col(ColumnDef::new(C::GroupName).string().not_null())
        .col(ColumnDef::new(C::EventId).string().not_null())
        .col(ColumnDef::new(C::Topic).string().not_null())
        .col(ColumnDef::new(C::Partition).integer().not_null())
        .col(ColumnDef::new(C::Offset).big_integer().not_null())
        .col(ColumnDef::new(C::Outcome).string().not_null())
        .col(ColumnDef::new(C::ConsumeTimeUs).big_integer().not_null())
        .primary_key(Index::create().col(C::GroupName).col(C::EventId))
        .to_owned();
    vec![backend.build(schema.create_table_from_entity(offset::Entity).if_not_exists()), backend.build(&consumed)]
}

/// Ids consumed before version 2 take their consume time as event time: no
/// later than the event's, so they are kept at least as long as they should be.
fn add_event_time(_schema: &Schema, backend: DbBackend) -> Vec<sea_orm::Statement> {
    use consumed::Column as C;
    use sea_orm::sea_query::{ColumnDef, Index, Query, Table};
    let add = Table::alter()
        .table(consumed::Entity)
        .add_column(ColumnDef::new(C::EventTimeUs).big_integer().not_null().default(0))
        .to_owned();
    let fill = Query::update().table(consumed::Entity).value(C::EventTimeUs, Expr::col(C::ConsumeTimeUs)).to_owned();
    let index = Index::create()
        .name("meshkit_consumed_events_by_time")
        .table(consumed::Entity)
        .col(C::GroupName)
        .col(C::Topic)
        .col(C::Partition)
        .col(C::EventTimeUs)
        .to_owned();
    vec![backend.build(&add), backend.build(&fill), backend.build(&index)]
}

/// A dead letter replayed is applied once per replay id (see
/// [`Shared::claim_event`]); the column says which replay was tried last.
fn add_replay_id(_schema: &Schema, backend: DbBackend) -> Vec<sea_orm::Statement> {
    use sea_orm::sea_query::{ColumnDef, Table};
    let add = Table::alter()
        .table(consumed::Entity)
        .add_column(ColumnDef::new(consumed::Column::ReplayId).string().null())
        .to_owned();
    vec![backend.build(&add)]
}

/// One record as the handler sees it.
#[derive(Debug, Clone)]
pub struct Event {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The `event-id` header, or `topic/partition/offset` when there is none.
    pub event_id: String,
    /// The `schema` header, if any.
    pub schema: Option<String>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: BTreeMap<String, Vec<u8>>,
    pub timestamp: DateTime<Utc>,
}

impl Event {
    /// A header as text, if present and UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The `replay-id` of a dead letter put back on its topic.
    pub fn replay_id(&self) -> Option<&str> {
        self.header(headers::REPLAY_ID).filter(|r| !r.is_empty())
    }
}

/// Why a handler did not apply an event.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HandlerError {
    /// The event can never be applied (cannot decode, invalid): dead-letter it now.
    #[error("poison: {0}")]
    Poison(String),
    /// This attempt failed; it is tried again up to `events.max_attempts` times.
    #[error("{0}")]
    Failed(String),
}

/// Applies events; everything it writes goes through `txn`, which commits
/// together with the consumed offset.
#[async_trait::async_trait]
pub trait EventHandler: Send + Sync + 'static {
    async fn handle(&self, txn: &DatabaseTransaction, event: &Event) -> Result<(), HandlerError>;
}

/// Live numbers of one partition this member consumes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PartitionStats {
    pub topic: String,
    pub partition: i32,
    pub fence_revision: i64,
    pub next_offset: i64,
    pub high_watermark: i64,
    pub lag: i64,
    pub applied: u64,
    pub duplicates: u64,
    pub dead_lettered: u64,
    /// Consumed ids this member pruned, past the dedup window.
    pub pruned: u64,
}

/// Per-partition numbers, shared with the admin endpoint.
#[derive(Debug, Clone, Default)]
pub struct ConsumerStats {
    inner: Arc<Mutex<BTreeMap<i32, PartitionStats>>>,
}

impl ConsumerStats {
    pub fn snapshot(&self) -> Vec<PartitionStats> {
        self.inner.lock().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }

    /// The consumer's `/metrics` families, one series per partition this
    /// member owns: lag behind the high watermark, position, and events by
    /// outcome (a partition's counters restart when it changes owner).
    pub fn metrics_source(&self, group: &str) -> metrics::Source {
        let stats = self.clone();
        let group = group.to_owned();
        metrics::source(move || {
            let partitions = stats.snapshot();
            let group = group.clone();
            async move {
                let mut scrape = Scrape::default();
                let lag = scrape.gauges::<PartitionLabels>(
                    "meshkit_consumer_lag",
                    "Records behind the partition's high watermark, as of the last fetch.",
                );
                let next = scrape.gauges::<PartitionLabels>(
                    "meshkit_consumer_next_offset",
                    "The next offset this member applies on the partition.",
                );
                let events = scrape.counters::<OutcomeLabels>(
                    "meshkit_consumer_events",
                    "Events this member processed on the partition, by outcome.",
                );
                for p in &partitions {
                    let at = PartitionLabels { group: group.clone(), topic: p.topic.clone(), partition: p.partition };
                    lag.get_or_create(&at).set(p.lag as f64);
                    next.get_or_create(&at).set(p.next_offset as f64);
                    for (outcome, n) in
                        [("applied", p.applied), ("duplicate", p.duplicates), ("dead_lettered", p.dead_lettered)]
                    {
                        let labels = OutcomeLabels {
                            group: group.clone(),
                            topic: p.topic.clone(),
                            partition: p.partition,
                            outcome,
                        };
                        events.get_or_create(&labels).inc_by(n);
                    }
                }
                scrape
            }
        })
    }

    fn update(&self, partition: i32, f: impl FnOnce(&mut PartitionStats)) {
        if let Ok(mut map) = self.inner.lock() {
            f(map.entry(partition).or_default());
        }
    }

    fn remove(&self, partition: i32) {
        if let Ok(mut map) = self.inner.lock() {
            map.remove(&partition);
        }
    }
}

/// What a consumer group member needs.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// The consumer group: members share its partitions and its offsets.
    pub group: String,
    pub topic: String,
    /// This member's id (the instance id).
    pub member: String,
    /// etcd key prefix of the mesh.
    pub prefix: String,
    pub ttl_secs: i64,
}

/// A running consumer group member.
pub struct Consumer {
    group: SlotGroup,
    stats: ConsumerStats,
}

impl Consumer {
    /// Creates the topic and its dead-letter topic if missing, joins the
    /// group and consumes the partitions it is given until [`close`](Self::close).
    pub async fn start(
        etcd: Client,
        db: DatabaseConnection,
        kafka: Kafka,
        spec: ConsumerSpec,
        handler: Arc<dyn EventHandler>,
    ) -> Result<Self> {
        Self::start_with_stats(etcd, db, kafka, &spec, handler, ConsumerStats::default()).await
    }

    async fn start_with_stats(
        etcd: Client,
        db: DatabaseConnection,
        kafka: Kafka,
        spec: &ConsumerSpec,
        handler: Arc<dyn EventHandler>,
        stats: ConsumerStats,
    ) -> Result<Self> {
        let partitions = kafka.ensure_topic(&spec.topic).await?;
        let dead_letter = format!("{}{}", spec.topic, kafka.settings().dead_letter_suffix);
        kafka.ensure_topic(&dead_letter).await?;
        let shared = Arc::new(Shared {
            db,
            kafka,
            handler,
            group: spec.group.clone(),
            topic: spec.topic.clone(),
            dead_letter,
            member: spec.member.clone(),
            stats: stats.clone(),
        });
        let group_spec = GroupSpec {
            prefix: spec.prefix.clone(),
            group: meshkit_registry::keys::consumer_group(&spec.group, &spec.topic),
            member: spec.member.clone(),
            slots: partitions as u32,
            ttl_secs: spec.ttl_secs,
            stop_timeout: Duration::from_secs(10),
        };
        let group = SlotGroup::join(
            etcd,
            group_spec,
            Box::new(move |slot| {
                let shared = shared.clone();
                Box::pin(async move { shared.consume(slot).await })
            }),
        )
        .await?;
        Ok(Self { group, stats })
    }

    /// The partitions this member consumes now.
    pub fn owned(&self) -> tokio::sync::watch::Receiver<std::collections::BTreeSet<u32>> {
        self.group.owned()
    }

    pub fn stats(&self) -> ConsumerStats {
        self.stats.clone()
    }

    /// Finishes the current batches, commits them, gives the partitions
    /// back and leaves the group.
    pub async fn close(self) {
        self.group.close().await;
    }
}

struct Shared {
    db: DatabaseConnection,
    kafka: Kafka,
    handler: Arc<dyn EventHandler>,
    group: String,
    topic: String,
    dead_letter: String,
    member: String,
    stats: ConsumerStats,
}

/// How a batch went.
enum Batch {
    Committed { applied: u64, duplicates: u64, dead_lettered: u64 },
    Fenced,
}

/// A read-write transaction that takes SQLite's write lock at its start
/// (`BEGIN IMMEDIATE`), so two writers never deadlock upgrading a read lock.
pub(crate) fn write_txn() -> TransactionOptions {
    TransactionOptions {
        isolation_level: None,
        access_mode: Some(AccessMode::ReadWrite),
        sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
    }
}

impl Shared {
    async fn consume(self: Arc<Self>, slot: Slot) -> SlotEnd {
        let partition = slot.index as i32;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        // Claim the offsets row with our fence; retry while the database is away.
        let mut next = loop {
            match self.claim(partition, slot.fence).await {
                Ok(Some(next)) => break next,
                Ok(None) => {
                    tracing::warn!(topic = self.topic, partition, "a newer owner holds the partition");
                    return SlotEnd::Fenced;
                }
                Err(e) => {
                    tracing::warn!(topic = self.topic, partition, error = %e, "claiming the partition failed");
                    tokio::select! {
                        _ = slot.cancel.cancelled() => return SlotEnd::Stopped,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        };
        let next_offset = next.max(0);
        tracing::info!(topic = self.topic, partition, next_offset, fence = slot.fence.revision, "consuming");
        self.stats.update(partition, |s| {
            s.topic = self.topic.clone();
            s.partition = partition;
            s.fence_revision = slot.fence.revision;
            s.next_offset = next_offset;
        });
        let prune_every = (self.kafka.settings().dedup_window() / 4).min(Duration::from_secs(300));
        let mut next_prune = tokio::time::Instant::now();
        let end = loop {
            if slot.cancel.is_cancelled() {
                break SlotEnd::Stopped;
            }
            if tokio::time::Instant::now() >= next_prune {
                next_prune = tokio::time::Instant::now() + prune_every;
                match self.prune(partition).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::debug!(
                            topic = self.topic,
                            partition,
                            pruned = n,
                            "consumed ids past the dedup window pruned"
                        );
                        self.stats.update(partition, |s| s.pruned += n);
                    }
                    Err(e) => tracing::warn!(topic = self.topic, partition, error = %e, "pruning consumed ids failed"),
                }
            }
            let from = next.max(0);
            let fetched = tokio::select! {
                _ = slot.cancel.cancelled() => break SlotEnd::Stopped,
                f = self.kafka.fetch(&self.topic, partition, from) => f,
            };
            let fetched = match fetched {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!(topic = self.topic, partition, error = %e, "fetch failed; retrying");
                    tokio::select! {
                        _ = slot.cancel.cancelled() => break SlotEnd::Stopped,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                    continue;
                }
            };
            let from = fetched.start;
            if from != next.max(0) {
                // The broker's log moved us (see `Kafka::fetch`); go on from there.
                next = from;
            }
            let records: Vec<RecordAndOffset> = fetched.records.into_iter().filter(|r| r.offset >= from).collect();
            let hwm = fetched.high_watermark;
            let Some(last) = records.last().map(|r| r.offset) else {
                self.stats.update(partition, |s| {
                    s.high_watermark = hwm;
                    s.lag = (hwm - from).max(0);
                });
                // A broker that answers at once when empty must not be spun on.
                tokio::select! {
                    _ = slot.cancel.cancelled() => break SlotEnd::Stopped,
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
                continue;
            };
            // The batch runs to its end even when cancelled: it commits or replays.
            match self.apply(partition, slot.fence, &records, last + 1).await {
                Ok(Batch::Committed { applied, duplicates, dead_lettered }) => {
                    backoff.reset();
                    next = last + 1;
                    self.stats.update(partition, |s| {
                        s.next_offset = next;
                        s.high_watermark = hwm.max(next);
                        s.lag = (hwm - next).max(0);
                        s.applied += applied;
                        s.duplicates += duplicates;
                        s.dead_lettered += dead_lettered;
                    });
                }
                Ok(Batch::Fenced) => {
                    tracing::warn!(topic = self.topic, partition, "fenced: another member owns the partition now");
                    break SlotEnd::Fenced;
                }
                Err(e) => {
                    tracing::warn!(topic = self.topic, partition, error = %e, "batch failed; it will be replayed");
                    tokio::select! {
                        _ = slot.cancel.cancelled() => break SlotEnd::Stopped,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                }
            }
        };
        self.stats.remove(partition);
        tracing::info!(topic = self.topic, partition, next_offset = next, ?end, "stopped consuming");
        end
    }

    /// Puts our fence on the partition's offsets row, unless a newer one is
    /// there; returns the next offset to read (-1: from the start).
    async fn claim(&self, partition: i32, fence: Fence) -> Result<Option<i64>> {
        let txn = self.db.begin_with_options(write_txn()).await?;
        offset::Entity::insert(offset::ActiveModel {
            group_name: Set(self.group.clone()),
            topic: Set(self.topic.clone()),
            partition: Set(partition),
            next_offset: Set(-1),
            fence_cluster: Set(0),
            fence_revision: Set(0),
            owner: Set(String::new()),
            update_time_us: Set(now_us()),
        })
        .on_conflict(
            OnConflict::columns([offset::Column::GroupName, offset::Column::Topic, offset::Column::Partition])
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&txn)
        .await?;
        let cluster = fence.cluster_id as i64;
        let claimed = offset::Entity::update_many()
            .col_expr(offset::Column::FenceCluster, Expr::value(cluster))
            .col_expr(offset::Column::FenceRevision, Expr::value(fence.revision))
            .col_expr(offset::Column::Owner, Expr::value(self.member.clone()))
            .col_expr(offset::Column::UpdateTimeUs, Expr::value(now_us()))
            .filter(self.row(partition))
            .filter(
                Condition::any()
                    .add(offset::Column::FenceCluster.ne(cluster))
                    .add(offset::Column::FenceRevision.lte(fence.revision)),
            )
            .exec(&txn)
            .await?;
        if claimed.rows_affected == 0 {
            txn.rollback().await?;
            return Ok(None);
        }
        let row = offset::Entity::find().filter(self.row(partition)).one(&txn).await?;
        txn.commit().await?;
        Ok(row.map(|r| r.next_offset))
    }

    /// Forgets the ids of this partition's events older than the dedup
    /// window. No copy of them can be applied any more: [`Shared::attempt`]
    /// dead-letters a record that old instead, so pruning never lets a
    /// duplicate through.
    async fn prune(&self, partition: i32) -> Result<u64> {
        let window = self.kafka.settings().dedup_window();
        let before = now_us() - window.as_micros() as i64;
        let deleted = consumed::Entity::delete_many()
            .filter(consumed::Column::GroupName.eq(self.group.clone()))
            .filter(consumed::Column::Topic.eq(self.topic.clone()))
            .filter(consumed::Column::Partition.eq(partition))
            .filter(consumed::Column::EventTimeUs.lt(before))
            .exec(&self.db)
            .await?;
        Ok(deleted.rows_affected)
    }

    /// Whether `event` is too old for its id to be trusted: its first copy's
    /// id may have been pruned already (the margin covers clock skew between
    /// members).
    fn past_dedup_window(&self, event: &Event) -> Option<HandlerError> {
        let settings = self.kafka.settings();
        let age_us = now_us() - event.timestamp.timestamp_micros();
        let limit = settings.dedup_window().saturating_sub(settings.dedup_margin());
        (age_us > limit.as_micros() as i64).then(|| {
            HandlerError::Poison(format!(
                "the event is {:.1} s old, past events.dedup_window_secs ({} s) less a {:.1} s margin: \
                 whether it was already applied can no longer be told",
                age_us as f64 / 1e6,
                settings.dedup_window_secs,
                settings.dedup_margin().as_secs_f64()
            ))
        })
    }

    fn row(&self, partition: i32) -> Condition {
        Condition::all()
            .add(offset::Column::GroupName.eq(self.group.clone()))
            .add(offset::Column::Topic.eq(self.topic.clone()))
            .add(offset::Column::Partition.eq(partition))
    }

    /// Applies one fetched batch in one transaction that also moves the offset.
    async fn apply(&self, partition: i32, fence: Fence, records: &[RecordAndOffset], next: i64) -> Result<Batch> {
        let txn = self.db.begin_with_options(write_txn()).await?;
        // First the fenced offset move: it takes the write lock and proves ownership.
        let moved = offset::Entity::update_many()
            .col_expr(offset::Column::NextOffset, Expr::value(next))
            .col_expr(offset::Column::UpdateTimeUs, Expr::value(now_us()))
            .filter(self.row(partition))
            .filter(offset::Column::FenceCluster.eq(fence.cluster_id as i64))
            .filter(offset::Column::FenceRevision.eq(fence.revision))
            .exec(&txn)
            .await?;
        if moved.rows_affected == 0 {
            txn.rollback().await?;
            return Ok(Batch::Fenced);
        }
        let (mut applied, mut duplicates, mut dead_lettered) = (0, 0, 0);
        for record in records {
            match self.apply_one(&txn, partition, record).await? {
                Outcome::Applied => applied += 1,
                Outcome::Duplicate => duplicates += 1,
                Outcome::DeadLettered => dead_lettered += 1,
            }
        }
        txn.commit().await?;
        Ok(Batch::Committed { applied, duplicates, dead_lettered })
    }

    async fn apply_one(&self, txn: &DatabaseTransaction, partition: i32, record: &RecordAndOffset) -> Result<Outcome> {
        let event = to_event(&self.topic, partition, record);
        let span = meshkit_telemetry::trace::consumer_span(meshkit_telemetry::trace::Delivery {
            topic: &event.topic,
            partition,
            offset: event.offset,
            group: &self.group,
            event_id: &event.event_id,
            headers: &event.headers,
        });
        let outcome = self.attempt(txn, &event).instrument(span.clone()).await;
        match &outcome {
            Ok(Outcome::Applied) => span.record("meshkit.outcome", "applied"),
            Ok(Outcome::Duplicate) => span.record("meshkit.outcome", "duplicate"),
            Ok(Outcome::DeadLettered) => {
                span.record("meshkit.outcome", "dead-lettered").record("otel.status_code", "ERROR")
            }
            Err(_) => span.record("otel.status_code", "ERROR"),
        };
        outcome
    }

    /// Applies `event` in a savepoint, retrying per `events.max_attempts`,
    /// then dead-letters it.
    async fn attempt(&self, txn: &DatabaseTransaction, event: &Event) -> Result<Outcome> {
        let attempts = self.kafka.settings().max_attempts.max(1);
        let mut last_error = HandlerError::Failed("not attempted".into());
        for attempt in 1..=attempts {
            let savepoint = txn.begin().await?;
            if !self.claim_event(&savepoint, event).await? {
                savepoint.commit().await?;
                tracing::debug!(event_id = event.event_id, "duplicate event skipped");
                return Ok(Outcome::Duplicate);
            }
            if let Some(too_old) = self.past_dedup_window(event) {
                savepoint.rollback().await?;
                last_error = too_old;
                break;
            }
            match self.handler.handle(&savepoint, event).await {
                Ok(()) => {
                    savepoint.commit().await?;
                    return Ok(Outcome::Applied);
                }
                Err(e) => {
                    savepoint.rollback().await?;
                    let poison = matches!(e, HandlerError::Poison(_));
                    tracing::warn!(event_id = event.event_id, offset = event.offset, attempt, error = %e, "handler refused the event");
                    last_error = e;
                    if poison {
                        break;
                    }
                    if attempt < attempts {
                        tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                    }
                }
            }
        }
        self.dead_letter(event, &last_error).await?;
        self.record_dead_letter(txn, event).await?;
        Ok(Outcome::DeadLettered)
    }

    fn consumed_row(&self, event: &Event, outcome: &str) -> consumed::ActiveModel {
        consumed::ActiveModel {
            group_name: Set(self.group.clone()),
            event_id: Set(event.event_id.clone()),
            topic: Set(event.topic.clone()),
            partition: Set(event.partition),
            offset: Set(event.offset),
            outcome: Set(outcome.to_owned()),
            consume_time_us: Set(now_us()),
            event_time_us: Set(event.timestamp.timestamp_micros()),
            replay_id: Set(event.replay_id().map(str::to_owned)),
        }
    }

    /// Claims the event id for applying it (in the attempt's savepoint);
    /// false when it is a duplicate. An id seen for the first time is
    /// claimed. A seen one is claimed only by a replay (`replay-id` set) of
    /// an event this group dead-lettered, and only once per replay id: so a
    /// replay is applied exactly once where the event was dead-lettered,
    /// skipped where it was applied, and a redelivered copy of the replay
    /// is a duplicate too.
    async fn claim_event(&self, txn: &DatabaseTransaction, event: &Event) -> Result<bool> {
        let inserted = consumed::Entity::insert(self.consumed_row(event, "applied"))
            .on_conflict(
                OnConflict::columns([consumed::Column::GroupName, consumed::Column::EventId]).do_nothing().to_owned(),
            )
            .exec_without_returning(txn)
            .await?;
        if inserted > 0 {
            return Ok(true);
        }
        let Some(replay) = event.replay_id() else { return Ok(false) };
        let claimed = consumed::Entity::update_many()
            .col_expr(consumed::Column::Outcome, Expr::value("applied"))
            .col_expr(consumed::Column::ReplayId, Expr::value(replay))
            .col_expr(consumed::Column::Topic, Expr::value(event.topic.clone()))
            .col_expr(consumed::Column::Partition, Expr::value(event.partition))
            .col_expr(consumed::Column::Offset, Expr::value(event.offset))
            .col_expr(consumed::Column::ConsumeTimeUs, Expr::value(now_us()))
            // Kept for the window after the replay, which is the record's time.
            .col_expr(consumed::Column::EventTimeUs, Expr::value(event.timestamp.timestamp_micros()))
            .filter(consumed::Column::GroupName.eq(self.group.clone()))
            .filter(consumed::Column::EventId.eq(event.event_id.clone()))
            .filter(consumed::Column::Outcome.eq("dead-lettered"))
            .filter(
                Condition::any()
                    .add(consumed::Column::ReplayId.is_null())
                    .add(consumed::Column::ReplayId.ne(replay.to_owned())),
            )
            .exec(txn)
            .await?;
        Ok(claimed.rows_affected > 0)
    }

    /// Records the id as dead-lettered (the attempts' claims were rolled
    /// back). For a replay dead-lettered again, the row keeps
    /// `dead-lettered` and takes the replay id, so the same replay
    /// redelivered is a duplicate and a new replay is tried.
    async fn record_dead_letter(&self, txn: &DatabaseTransaction, event: &Event) -> Result<()> {
        use consumed::Column as C;
        let on_conflict = match event.replay_id() {
            None => OnConflict::columns([C::GroupName, C::EventId]).do_nothing().to_owned(),
            Some(_) => OnConflict::columns([C::GroupName, C::EventId])
                .update_columns([C::ReplayId, C::Topic, C::Partition, C::Offset, C::ConsumeTimeUs, C::EventTimeUs])
                .to_owned(),
        };
        consumed::Entity::insert(self.consumed_row(event, "dead-lettered"))
            .on_conflict(on_conflict)
            .exec_without_returning(txn)
            .await?;
        Ok(())
    }

    /// Publishes the record unchanged to the dead-letter topic, with why.
    async fn dead_letter(&self, event: &Event, error: &HandlerError) -> Result<()> {
        let mut record_headers = event.headers.clone();
        record_headers.insert(headers::DLQ_ERROR.into(), error.to_string().into_bytes());
        record_headers.insert(headers::DLQ_TOPIC.into(), event.topic.clone().into_bytes());
        record_headers.insert(headers::DLQ_PARTITION.into(), event.partition.to_string().into_bytes());
        record_headers.insert(headers::DLQ_OFFSET.into(), event.offset.to_string().into_bytes());
        record_headers.insert(headers::DLQ_GROUP.into(), self.group.clone().into_bytes());
        let record = Record {
            key: event.key.clone(),
            value: Some(event.payload.clone()),
            headers: record_headers,
            timestamp: event.timestamp,
        };
        // Same partition as the source, when the dead-letter topic has it.
        let partitions = self.kafka.ensure_topic(&self.dead_letter).await?;
        let target = event.partition % partitions.max(1);
        self.kafka.produce(&self.dead_letter, target, vec![record]).await.map_err(|e| match e {
            Error::Kafka { message, code } => Error::Kafka { message: format!("dead-letter: {message}"), code },
            other => other,
        })?;
        tracing::warn!(event_id = event.event_id, topic = self.dead_letter, error = %error, "event dead-lettered");
        Ok(())
    }
}

enum Outcome {
    Applied,
    Duplicate,
    DeadLettered,
}

fn to_event(topic: &str, partition: i32, record: &RecordAndOffset) -> Event {
    let r = &record.record;
    let text = |name: &str| r.headers.get(name).and_then(|v| String::from_utf8(v.clone()).ok());
    Event {
        topic: topic.to_owned(),
        partition,
        offset: record.offset,
        event_id: text(headers::EVENT_ID)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("{topic}/{partition}/{}", record.offset)),
        schema: text(headers::SCHEMA),
        key: r.key.clone(),
        payload: r.value.clone().unwrap_or_default(),
        headers: r.headers.clone(),
        timestamp: r.timestamp,
    }
}

/// Offsets of one group as stored, for tools and tests.
pub async fn offsets(db: &DatabaseConnection, group: &str) -> Result<HashMap<(String, i32), offset::Model>> {
    let rows = offset::Entity::find().filter(offset::Column::GroupName.eq(group)).all(db).await?;
    Ok(rows.into_iter().map(|r| ((r.topic.clone(), r.partition), r)).collect())
}

/// A consumer that keeps trying to join while the broker or etcd is away.
/// Dropping it without [`close`](Self::close) cancels its workers.
pub struct ConsumerHandle {
    stats: ConsumerStats,
    group: meshkit_registry::ownership::GroupHandle,
}

impl ConsumerHandle {
    pub fn stats(&self) -> ConsumerStats {
        self.stats.clone()
    }

    /// The partitions this member consumes now.
    pub fn owned(&self) -> tokio::sync::watch::Receiver<std::collections::BTreeSet<u32>> {
        self.group.owned()
    }

    /// Finishes the current batches, gives the partitions back and leaves.
    pub async fn close(self) {
        self.group.close().await;
    }
}

impl Consumer {
    /// Starts [`Consumer::start`] in the background, retrying with backoff
    /// until the broker and etcd answer; the process serves meanwhile.
    pub fn spawn(
        etcd: Client,
        db: DatabaseConnection,
        kafka: Kafka,
        spec: ConsumerSpec,
        handler: Arc<dyn EventHandler>,
    ) -> ConsumerHandle {
        let stats = ConsumerStats::default();
        let shared = stats.clone();
        let name = meshkit_registry::keys::consumer_group(&spec.group, &spec.topic);
        let group = SlotGroup::spawn_joining(name, move || {
            let (etcd, db, kafka, spec, handler, stats) =
                (etcd.clone(), db.clone(), kafka.clone(), spec.clone(), handler.clone(), shared.clone());
            async move { Ok::<_, Error>(Consumer::start_with_stats(etcd, db, kafka, &spec, handler, stats).await?.group) }
        });
        ConsumerHandle { stats, group }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    group: String,
    topic: String,
    partition: i32,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    group: String,
    topic: String,
    partition: i32,
    outcome: &'static str,
}
