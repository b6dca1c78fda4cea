//! The scheduler's schema, oldest first. Never edit a released migration: add one.

use meshkit_common::db::Migration;
use sea_orm::{
    DbBackend, Schema,
    sea_query::{Index, OnConflict, Query},
};

use crate::entity::{leader, run, slot};

pub const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "create the job log", up: create_log },
    Migration { version: 2, name: "the trace of each run", up: add_trace_id },
];

/// `job_runs` as version 1 made it, written out so later columns come from
/// later migrations only.
fn runs_as_made_by_version_1() -> sea_orm::sea_query::TableCreateStatement {
    use run::Column as C;
    use sea_orm::sea_query::{ColumnDef, Table};
    let text = |c: C| ColumnDef::new(c).string().not_null().to_owned();
    let int = |c: C| ColumnDef::new(c).integer().not_null().to_owned();
    let big = |c: C| ColumnDef::new(c).big_integer().not_null().to_owned();
    Table::create()
        .table(run::Entity)
        .if_not_exists()
        .col(ColumnDef::new(C::Id).string().not_null().primary_key())
        .col(text(C::Job))
        .col(int(C::Trigger))
        .col(big(C::ScheduledMs))
        .col(int(C::ShardIndex))
        .col(int(C::ShardTotal))
        .col(int(C::Attempt))
        .col(text(C::Executor))
        .col(text(C::ExecutorAddr))
        .col(int(C::Status))
        .col(text(C::Message))
        .col(text(C::Leader))
        .col(big(C::Fence))
        .col(big(C::StartMs))
        .col(big(C::EndMs))
        .to_owned()
}

/// Runs logged before version 2 have no trace.
fn add_trace_id(_schema: &Schema, backend: DbBackend) -> Vec<sea_orm::Statement> {
    use sea_orm::sea_query::{ColumnDef, Table};
    let add = Table::alter()
        .table(run::Entity)
        .add_column(ColumnDef::new(run::Column::TraceId).string().not_null().default(""))
        .to_owned();
    vec![backend.build(&add)]
}

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
        backend.build(&runs_as_made_by_version_1()),
        backend.build(&by_job),
        backend.build(&first_row),
    ]
}
