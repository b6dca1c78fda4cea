//! The event contract: the topics, the schema each record names in its
//! `schema` header, and the record headers. Producers and consumers in every
//! language (Rust here, Java and others from `proto/`) read the same names;
//! `proto/meshkit/notification/v1/notification.proto` documents them beside
//! the message.

/// Topic names.
pub mod topics {
    /// `OrderCreated` events, keyed by order id, once per order.
    pub const ORDER_EVENTS: &str = "order-events";
}

/// The fully qualified protobuf message names carried in the `schema` header.
pub mod schemas {
    /// [`crate::notification::OrderCreated`], on [`super::topics::ORDER_EVENTS`].
    pub const ORDER_CREATED: &str = "meshkit.notification.v1.OrderCreated";
}

/// Record header names.
pub mod headers {
    /// Unique per event; consumers skip an id they have already applied.
    pub const EVENT_ID: &str = "event-id";
    /// The payload's message name (see [`super::schemas`]).
    pub const SCHEMA: &str = "schema";
    pub const CONTENT_TYPE: &str = "content-type";
    /// The `content-type` of a protobuf payload.
    pub const PROTOBUF: &str = "application/x-protobuf";
    /// W3C trace context of the call that produced the event.
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
    /// Why a record was dead-lettered.
    pub const DLQ_ERROR: &str = "dlq-error";
    /// Where a dead-lettered record came from.
    pub const DLQ_TOPIC: &str = "dlq-topic";
    pub const DLQ_PARTITION: &str = "dlq-partition";
    pub const DLQ_OFFSET: &str = "dlq-offset";
    pub const DLQ_GROUP: &str = "dlq-group";
    /// Set on a dead letter put back on its topic (`meshctl events replay`):
    /// unique per replay. A consumer applies a replayed event whose id it
    /// dead-lettered (once per replay id, so a redelivered copy of the
    /// replay is still a duplicate), and skips it where the event was applied.
    pub const REPLAY_ID: &str = "replay-id";
    /// `topic/partition/offset` of the dead letter a replay was made from.
    pub const REPLAYED_FROM: &str = "replayed-from";
    /// Who replayed it.
    pub const REPLAYED_BY: &str = "replayed-by";
}

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn every_schema_names_a_message_of_the_contracts() {
        let set =
            prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).expect("the descriptor set decodes");
        let names: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| f.message_type.iter().map(move |m| format!("{}.{}", f.package(), m.name())))
            .collect();
        for schema in [super::schemas::ORDER_CREATED] {
            assert!(names.iter().any(|n| n == schema), "{schema} is not a message in proto/");
        }
    }
}
