//! Events over Kafka with nothing lost and nothing applied twice.
//!
//! rskafka speaks the Kafka protocol but has no consumer groups, no offset
//! tracking and no idempotent producer; meshkit builds them on the database
//! and the etcd every service already has:
//!
//! - [`outbox`]: events written in the same transaction as the change, and a
//!   relay (one per service, elected through etcd) that publishes them.
//! - [`consumer`]: partitions shared out among live instances by etcd leases,
//!   effects and offsets committed in one transaction behind a fence, duplicate
//!   event ids skipped, poison records dead-lettered.
//! - [`Kafka`]: a lazily connected client whose requests are bounded in time.
//!
//! Record headers: `event-id`, `schema` (the protobuf message name),
//! `content-type`, and the W3C trace context (`traceparent`, `tracestate`)
//! when the producing call carried one.

pub mod consumer;
pub mod kafka;
pub mod outbox;

pub use consumer::{Consumer, ConsumerSpec, Event, EventHandler, HandlerError};
pub use kafka::Kafka;
pub use outbox::{OutboxEvent, Relay};

/// Record header names.
pub mod headers {
    pub const EVENT_ID: &str = "event-id";
    pub const SCHEMA: &str = "schema";
    pub const CONTENT_TYPE: &str = "content-type";
    pub const PROTOBUF: &str = "application/x-protobuf";
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
    /// Why a record was dead-lettered.
    pub const DLQ_ERROR: &str = "dlq-error";
    /// Where a dead-lettered record came from.
    pub const DLQ_TOPIC: &str = "dlq-topic";
    pub const DLQ_PARTITION: &str = "dlq-partition";
    pub const DLQ_OFFSET: &str = "dlq-offset";
    pub const DLQ_GROUP: &str = "dlq-group";
}
