//! `meshctl events dead-letters` and `events replay`: what could not be
//! applied, and putting one back to be applied once.

use std::fmt::Write as _;

use anyhow::Context as _;
use etcd_client::Client;
use meshkit_common::{
    events::{Kafka, dead_letters::Replayed},
    history::{self, AuditEntry},
};

use crate::{settings::CtlConfig, utc};

/// A Kafka client from meshctl's own `events` settings
/// (`MESHKIT_EVENTS_BROKERS`, its TLS and SASL), as every service reads them.
pub fn kafka() -> anyhow::Result<Kafka> {
    let events = CtlConfig::load()?.events;
    Ok(Kafka::new(events, "meshctl"))
}

/// `events dead-letters [TOPIC] [--limit N]`.
pub async fn events_dead_letters(topic: Option<&str>, limit: usize) -> anyhow::Result<String> {
    let letters = kafka()?.dead_letters(topic, limit).await?;
    let mut out = format!(
        "{:<20} {:<28} {:>4} {:>8}  {:<36} {:<20} {:<14} ERROR\n",
        "WHEN (UTC)", "DEAD-LETTER TOPIC", "PART", "OFFSET", "EVENT ID", "FROM", "GROUP"
    );
    if letters.is_empty() {
        out.push_str("  (none)\n");
    }
    for d in letters {
        let from = match (d.source_partition, d.source_offset) {
            (Some(p), Some(o)) => format!("{}/{p}/{o}", d.topic),
            _ => d.topic.clone(),
        };
        let _ = writeln!(
            out,
            "{:<20} {:<28} {:>4} {:>8}  {:<36} {:<20} {:<14} {}{}",
            utc(d.time_ms.max(0) as u64),
            d.dlq_topic,
            d.partition,
            d.offset,
            d.event_id,
            from,
            d.group,
            d.error.replace('\n', " "),
            d.replay_id.as_deref().map(|r| format!(" (replay {r} failed again)")).unwrap_or_default(),
        );
    }
    Ok(out)
}

/// Replays one dead letter and records it in the audit log.
pub async fn replay_dead_letter(
    client: &mut Client,
    prefix: &str,
    kafka: &Kafka,
    dlq_topic: &str,
    partition: i32,
    offset: i64,
    by: &str,
) -> anyhow::Result<Replayed> {
    let replayed = kafka.replay(dlq_topic, partition, offset, by).await?;
    audit_replay(client, prefix, &replayed, dlq_topic, partition, offset, by).await?;
    Ok(replayed)
}

/// Records a replay in the audit log.
pub async fn audit_replay(
    client: &mut Client,
    prefix: &str,
    replayed: &Replayed,
    dlq_topic: &str,
    partition: i32,
    offset: i64,
    by: &str,
) -> anyhow::Result<()> {
    let entry = AuditEntry::new(
        by,
        "replay",
        &format!("{dlq_topic}/{partition}/{offset}"),
        format!(
            "event {} onto {}/{} at offset {} (replay {})",
            replayed.event_id, replayed.topic, replayed.partition, replayed.offset, replayed.replay_id
        ),
    );
    history::audit(client, prefix, &entry).await.context("the replay was written, but not its audit entry")?;
    Ok(())
}

/// `events replay DLQ_TOPIC PARTITION OFFSET`.
pub async fn events_replay(
    client: &mut Client,
    prefix: &str,
    dlq_topic: &str,
    partition: i32,
    offset: i64,
    by: &str,
) -> anyhow::Result<String> {
    let r = replay_dead_letter(client, prefix, &kafka()?, dlq_topic, partition, offset, by).await?;
    Ok(format!(
        "replayed event {} onto {} partition {} at offset {} (replay id {}); the group that dead-lettered it applies it once, \
         groups that applied it skip it\n",
        r.event_id, r.topic, r.partition, r.offset, r.replay_id
    ))
}
