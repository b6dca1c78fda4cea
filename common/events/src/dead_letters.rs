//! Dead letters read back, and one put back on its topic to be applied.
//!
//! A replay copies the dead letter to the partition it came from, with its
//! `event-id`, key, payload and trace context, without the `dlq-*` headers,
//! with a new `replay-id` and the time of the replay. The consumer that
//! dead-lettered the event applies it once per replay id; every group that
//! had applied it skips it by its event id (see `consumer::Shared::claim_event`).
//! So an event is applied once however often it is replayed, and a replay
//! that fails again goes back to the dead-letter topic to be fixed and
//! replayed again.

use rskafka::{
    chrono::{DateTime, Utc},
    record::Record,
};
use serde::Serialize;

use crate::{
    Kafka,
    error::{Error, Result},
    headers,
    kafka::partition_for,
};

/// Dead letters read per partition at most, newest first.
pub const MAX_READ: usize = 500;

/// One record on a dead-letter topic, as an operator reads it.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    /// Where it is: the dead-letter topic, partition and offset.
    pub dlq_topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_id: String,
    pub schema: String,
    /// Where it was consumed, and by which group.
    pub topic: String,
    pub source_partition: Option<i32>,
    pub source_offset: Option<i64>,
    pub group: String,
    /// Why it could not be applied.
    pub error: String,
    /// The record's time (the event's, or its last replay's).
    pub time_ms: i64,
    /// The trace id of the call that produced the event, when traced.
    pub trace_id: Option<String>,
    /// The replay that failed again, if this dead letter is one.
    pub replay_id: Option<String>,
    pub bytes: usize,
}

impl DeadLetter {
    fn of(dlq_topic: &str, partition: i32, offset: i64, record: &Record) -> Self {
        let text = |name: &str| {
            record.headers.get(name).and_then(|v| std::str::from_utf8(v).ok()).unwrap_or_default().to_owned()
        };
        let trace_id = text(headers::TRACEPARENT).split('-').nth(1).filter(|t| t.len() == 32).map(str::to_owned);
        Self {
            dlq_topic: dlq_topic.to_owned(),
            partition,
            offset,
            event_id: text(headers::EVENT_ID),
            schema: text(headers::SCHEMA),
            topic: text(headers::DLQ_TOPIC),
            source_partition: text(headers::DLQ_PARTITION).parse().ok(),
            source_offset: text(headers::DLQ_OFFSET).parse().ok(),
            group: text(headers::DLQ_GROUP),
            error: text(headers::DLQ_ERROR),
            time_ms: record.timestamp.timestamp_millis(),
            trace_id,
            replay_id: Some(text(headers::REPLAY_ID)).filter(|r| !r.is_empty()),
            bytes: record.value.as_ref().map_or(0, Vec::len),
        }
    }
}

/// Where a replay was written.
#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub event_id: String,
    pub replay_id: String,
}

impl Kafka {
    /// The newest `limit` (at most [`MAX_READ`]) dead letters, newest
    /// first: of `topic` (a dead-letter topic, or the topic it belongs to),
    /// or of every dead-letter topic of this process's prefix (names ending
    /// in `events.dead_letter_suffix`).
    pub async fn dead_letters(&self, topic: Option<&str>, limit: usize) -> Result<Vec<DeadLetter>> {
        let settings = self.settings();
        let suffix = settings.dead_letter_suffix.as_str();
        let wanted = topic.map(|t| if t.ends_with(suffix) { t.to_owned() } else { format!("{t}{suffix}") });
        let topics: Vec<(String, i32)> = self
            .topics()
            .await?
            .into_iter()
            .filter(|(name, _)| match &wanted {
                Some(w) => name == w,
                None => name.starts_with(&settings.topic_prefix) && name.ends_with(suffix),
            })
            .collect();
        if let (Some(w), true) = (&wanted, topics.is_empty()) {
            return Err(Error::NotFound(format!("there is no topic {w:?}")));
        }
        let limit = limit.clamp(1, MAX_READ);
        let mut out = Vec::new();
        for (dlq_topic, partitions) in &topics {
            for partition in 0..*partitions {
                let (earliest, latest) = self.offsets(dlq_topic, partition).await?;
                let mut next = earliest.max(latest - limit as i64);
                while next < latest {
                    let fetched = self.fetch(dlq_topic, partition, next).await?;
                    let Some(last) = fetched.records.last().map(|r| r.offset) else { break };
                    for r in fetched.records.iter().filter(|r| r.offset < latest) {
                        out.push(DeadLetter::of(dlq_topic, partition, r.offset, &r.record));
                    }
                    next = last + 1;
                }
            }
        }
        out.sort_by(|a, b| b.time_ms.cmp(&a.time_ms).then(b.offset.cmp(&a.offset)));
        out.truncate(limit);
        Ok(out)
    }

    /// The record at `offset` of a dead-letter topic's partition.
    async fn dead_letter_record(&self, dlq_topic: &str, partition: i32, offset: i64) -> Result<Record> {
        let (earliest, latest) = self.offsets(dlq_topic, partition).await?;
        if !(earliest..latest).contains(&offset) {
            return Err(Error::NotFound(format!(
                "{dlq_topic} partition {partition} has no record at offset {offset} (it holds {earliest}..{latest})"
            )));
        }
        let fetched = self.fetch(dlq_topic, partition, offset).await?;
        fetched.records.into_iter().find(|r| r.offset == offset).map(|r| r.record).ok_or_else(|| {
            Error::NotFound(format!("{dlq_topic} partition {partition} offset {offset} was not read back"))
        })
    }

    /// Puts the dead letter at `dlq_topic`/`partition`/`offset` back on the
    /// topic it came from, as the module doc says; `by` is recorded in the
    /// `replayed-by` header.
    pub async fn replay(&self, dlq_topic: &str, partition: i32, offset: i64, by: &str) -> Result<Replayed> {
        let suffix = &self.settings().dead_letter_suffix;
        if !dlq_topic.ends_with(suffix.as_str()) {
            return Err(Error::Invalid(format!(
                "{dlq_topic:?} is not a dead-letter topic (its name does not end in {suffix:?})"
            )));
        }
        let record = self.dead_letter_record(dlq_topic, partition, offset).await?;
        let letter = DeadLetter::of(dlq_topic, partition, offset, &record);
        if letter.topic.is_empty() || letter.topic.ends_with(suffix.as_str()) {
            return Err(Error::Invalid(format!(
                "{dlq_topic} partition {partition} offset {offset} carries no {:?} header naming the topic it came from",
                headers::DLQ_TOPIC
            )));
        }
        if letter.event_id.is_empty() {
            return Err(Error::Invalid(format!(
                "{dlq_topic} partition {partition} offset {offset} has no {:?}: a consumer could not tell a replay from a new event",
                headers::EVENT_ID
            )));
        }
        let partitions =
            self.topics().await?.into_iter().find(|(name, _)| *name == letter.topic).map(|(_, n)| n).ok_or_else(
                || Error::NotFound(format!("the topic {:?} it came from no longer exists", letter.topic)),
            )?;
        let target = match letter.source_partition {
            Some(p) if (0..partitions).contains(&p) => p,
            _ => partition_for(record.key.as_deref().unwrap_or_default(), partitions),
        };
        let replay_id = uuid::Uuid::now_v7().to_string();
        let mut record_headers = record.headers.clone();
        for stale in [
            headers::DLQ_ERROR,
            headers::DLQ_TOPIC,
            headers::DLQ_PARTITION,
            headers::DLQ_OFFSET,
            headers::DLQ_GROUP,
            headers::REPLAY_ID,
            headers::REPLAYED_FROM,
            headers::REPLAYED_BY,
        ] {
            record_headers.remove(stale);
        }
        record_headers.insert(headers::REPLAY_ID.into(), replay_id.clone().into_bytes());
        record_headers.insert(headers::REPLAYED_FROM.into(), format!("{dlq_topic}/{partition}/{offset}").into_bytes());
        record_headers.insert(headers::REPLAYED_BY.into(), by.as_bytes().to_vec());
        let replay = Record {
            key: record.key,
            value: record.value,
            headers: record_headers,
            timestamp: DateTime::<Utc>::from(std::time::SystemTime::now()),
        };
        let offsets = self.produce(&letter.topic, target, vec![replay]).await?;
        let offset = offsets.first().copied().ok_or_else(|| Error::kafka("produce returned no offset"))?;
        tracing::info!(
            event_id = letter.event_id,
            topic = letter.topic,
            partition = target,
            offset,
            replay_id,
            by,
            "dead letter replayed"
        );
        Ok(Replayed { topic: letter.topic, partition: target, offset, event_id: letter.event_id, replay_id })
    }
}
