//! order-service's schema, oldest first. Never edit a released migration: add one.

use meshkit_common::db::Migration;
use sea_orm::{DbBackend, Schema, sea_query::Index};

use crate::entity::{order, order_item};

pub const MIGRATIONS: &[Migration] =
    &[Migration { version: 1, name: "create orders and order_items", up: create_orders }];

fn create_orders(schema: &Schema, backend: DbBackend) -> Vec<sea_orm::Statement> {
    let by_user = Index::create()
        .if_not_exists()
        .name("idx_orders_user_id_id")
        .table(order::Entity)
        .col(order::Column::UserId)
        .col(order::Column::Id)
        .to_owned();
    vec![
        backend.build(schema.create_table_from_entity(order::Entity).if_not_exists()),
        backend.build(schema.create_table_from_entity(order_item::Entity).if_not_exists()),
        backend.build(&by_user),
    ]
}
