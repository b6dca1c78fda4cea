//! user-service's schema, oldest first. Never edit a released migration: add one.

use meshkit_common::db::Migration;
use sea_orm::{DbBackend, Schema};

use crate::entity::user;

pub const MIGRATIONS: &[Migration] = &[Migration { version: 1, name: "create users", up: create_users }];

fn create_users(schema: &Schema, backend: DbBackend) -> Vec<sea_orm::Statement> {
    vec![backend.build(schema.create_table_from_entity(user::Entity).if_not_exists())]
}
