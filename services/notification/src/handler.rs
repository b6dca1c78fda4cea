//! Turns `OrderCreated` events into notifications.

use meshkit_common::{
    events::{Event, EventHandler, HandlerError},
    time::now_us,
};
use meshkit_proto::notification::OrderCreated;
use prost::Message;
use sea_orm::{ActiveValue::Set, DatabaseTransaction, EntityTrait, sea_query::OnConflict};

use crate::entity::notification;

/// The schema this handler accepts.
pub use meshkit_proto::events::schemas::ORDER_CREATED;

pub struct OrderCreatedHandler {
    /// This instance, recorded with each notification it stores.
    pub consumer: String,
}

#[async_trait::async_trait]
impl EventHandler for OrderCreatedHandler {
    async fn handle(&self, txn: &DatabaseTransaction, event: &Event) -> Result<(), HandlerError> {
        if let Some(schema) = event.schema.as_deref().filter(|s| *s != ORDER_CREATED) {
            return Err(HandlerError::Poison(format!("schema {schema:?} is not {ORDER_CREATED}")));
        }
        let created = OrderCreated::decode(event.payload.as_slice())
            .map_err(|e| HandlerError::Poison(format!("cannot decode {ORDER_CREATED}: {e}")))?;
        if created.order_id.is_empty() || created.user_id.is_empty() {
            return Err(HandlerError::Poison("order_id and user_id are required".into()));
        }
        let event_time_us = created
            .create_time
            .map(|t| t.seconds.saturating_mul(1_000_000).saturating_add(i64::from(t.nanos) / 1000))
            .unwrap_or_default();
        let items = created.total_quantity;
        let message = format!(
            "Your order {} with {items} item{} was placed.",
            created.order_id,
            if items == 1 { "" } else { "s" }
        );
        notification::Entity::insert(notification::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            user_id: Set(created.user_id),
            event_id: Set(event.event_id.clone()),
            order_id: Set(created.order_id),
            message: Set(message),
            source_partition: Set(event.partition),
            source_offset: Set(event.offset),
            consumer: Set(self.consumer.clone()),
            create_time_us: Set(now_us()),
            event_time_us: Set(event_time_us),
        })
        .on_conflict(OnConflict::column(notification::Column::EventId).do_nothing().to_owned())
        .exec_without_returning(txn)
        .await
        .map_err(|e| HandlerError::Failed(format!("storing the notification: {e}")))?;
        Ok(())
    }
}
