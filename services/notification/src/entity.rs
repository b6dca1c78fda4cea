//! The `notifications` table.

pub mod notification {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "notifications")]
    pub struct Model {
        /// A UUIDv7: ids sort in creation order, which paging relies on.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        pub user_id: String,
        /// The event it was made from: one notification per event.
        #[sea_orm(unique)]
        pub event_id: String,
        pub order_id: String,
        pub message: String,
        /// Where the event was read: `partition`, `offset`, and the instance that applied it.
        pub source_partition: i32,
        pub source_offset: i64,
        pub consumer: String,
        /// Microseconds since the Unix epoch, when it was stored.
        pub create_time_us: i64,
        /// When the order was placed (from the event).
        pub event_time_us: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
