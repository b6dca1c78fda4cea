//! notification-service's schema, oldest first. Never edit a released migration: add one.

use meshkit_common::db::Migration;
use sea_orm::{DbBackend, Schema, sea_query::Index};

use crate::entity::notification;

pub const MIGRATIONS: &[Migration] =
    &[Migration { version: 1, name: "create notifications", up: create_notifications }];

fn create_notifications(schema: &Schema, backend: DbBackend) -> Vec<sea_orm::Statement> {
    let by_user = Index::create()
        .if_not_exists()
        .name("idx_notifications_user_id_id")
        .table(notification::Entity)
        .col(notification::Column::UserId)
        .col(notification::Column::Id)
        .to_owned();
    vec![backend.build(schema.create_table_from_entity(notification::Entity).if_not_exists()), backend.build(&by_user)]
}
