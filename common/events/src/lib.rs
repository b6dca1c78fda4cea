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
//! - [`dead_letters`]: what could not be applied, read back, and replayed
//!   onto its topic to be applied exactly once.
//! - [`Kafka`]: a lazily connected client whose requests are bounded in time.
//!
//! Record headers: `event-id`, `schema` (the protobuf message name),
//! `content-type`, and the W3C trace context (`traceparent`, `tracestate`)
//! when the producing call carried one.

pub mod consumer;
pub mod dead_letters;
pub mod error;
pub mod kafka;
pub mod outbox;
pub mod settings;

pub use consumer::{Consumer, ConsumerSpec, Event, EventHandler, HandlerError};
pub use error::{Error, Result};
pub use kafka::Kafka;
pub use outbox::{OutboxEvent, Relay};
pub use settings::EventSettings;

/// Record header names: the contract's, in `meshkit_proto::events`.
pub use meshkit_proto::events::headers;
