//! The scheduler's schema, oldest first. Never edit a released migration: add one.

use meshkit_common::db::Migration;
use sea_orm::{
    DbBackend, Schema,
    sea_query::{Index, OnConflict, Query},
};

use crate::entity::{leader, run, slot};

pub const MIGRATIONS: &[Migration] = &[Migration { version: 1, name: "create the job log", up: create_log }];

fn create_log(schema: &Schema, backend: DbBackend) -> Vec<sea_orm::Statement> {
    let by_job = Index::create()
        .if_not_exists()
        .name("idx_job_runs_job_id")
        .table(run::Entity)
        .col(run::Column::Job)
        .col(run::Column::Id)
        .to_owned();
    let first_row = Query::insert()
        .into_table(leader::Entity)
        .columns([
            leader::Column::Id,
            leader::Column::ClusterId,
            leader::Column::Fence,
            leader::Column::Leader,
            leader::Column::SinceMs,
        ])
        .values_panic([1.into(), 0i64.into(), 0i64.into(), "".into(), 0i64.into()])
        .on_conflict(OnConflict::column(leader::Column::Id).do_nothing().to_owned())
        .to_owned();
    vec![
        backend.build(schema.create_table_from_entity(leader::Entity).if_not_exists()),
        backend.build(schema.create_table_from_entity(slot::Entity).if_not_exists()),
        backend.build(schema.create_table_from_entity(run::Entity).if_not_exists()),
        backend.build(&by_job),
        backend.build(&first_row),
    ]
}
