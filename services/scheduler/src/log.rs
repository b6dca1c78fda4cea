//! The job log in the database: the leader's fence, fired slots and runs.

use meshkit_common::{ownership::Fence, time::now_ms};
use meshkit_proto::scheduler::RunStatus;
use sea_orm::{
    ActiveValue::Set,
    ColumnTrait, ConnectionTrait, DatabaseConnection, DbErr, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
    sea_query::{Expr, ExprTrait, OnConflict, Query},
};

use crate::entity::{leader, run, slot};

/// What became of a slot claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// This leader fires it.
    Claimed,
    /// It fired already (an earlier leader, or this one before).
    Fired,
    /// A newer leader's fence is in the database: this one must stop.
    Deposed,
}

#[derive(Clone)]
pub struct JobLog {
    db: DatabaseConnection,
}

fn cluster(fence: Fence) -> i64 {
    // Stored as the same 64 bits, signed: the column is BIGINT.
    i64::from_ne_bytes(fence.cluster_id.to_ne_bytes())
}

impl JobLog {
    pub fn new(db: DatabaseConnection) -> Self {
        Self { db }
    }

    /// Records `fence` as the newest leader's unless a newer one is there.
    /// A fence from another etcd cluster replaces any (its revisions start over).
    pub async fn take_lead(&self, fence: Fence, leader: &str) -> Result<bool, DbErr> {
        let result = leader::Entity::update_many()
            .col_expr(leader::Column::ClusterId, Expr::value(cluster(fence)))
            .col_expr(leader::Column::Fence, Expr::value(fence.revision))
            .col_expr(leader::Column::Leader, Expr::value(leader))
            .col_expr(leader::Column::SinceMs, Expr::value(now_ms()))
            .filter(leader::Column::Id.eq(1))
            .filter(
                Expr::col(leader::Column::Fence)
                    .lt(fence.revision)
                    .or(Expr::col(leader::Column::ClusterId).ne(cluster(fence))),
            )
            .exec(&self.db)
            .await?;
        Ok(result.rows_affected == 1)
    }

    /// Runs left RUNNING by earlier leaders: nobody will record their end.
    pub async fn fail_orphans(&self, fence: Fence) -> Result<u64, DbErr> {
        let result = run::Entity::update_many()
            .col_expr(run::Column::Status, Expr::value(RunStatus::Failed as i32))
            .col_expr(
                run::Column::Message,
                Expr::value("the scheduler that started it stopped leading before it ended; its outcome is unknown"),
            )
            .col_expr(run::Column::EndMs, Expr::value(now_ms()))
            .filter(run::Column::Status.eq(RunStatus::Running as i32))
            .filter(run::Column::Fence.ne(fence.revision))
            .exec(&self.db)
            .await?;
        Ok(result.rows_affected)
    }

    /// Claims `(job, slot)` in one statement, only while `fence` is the
    /// newest leader's: `INSERT … SELECT … WHERE EXISTS (fence holds) ON
    /// CONFLICT DO NOTHING`.
    pub async fn claim_slot(&self, job: &str, slot_ms: i64, fence: Fence, leader: &str) -> Result<Claim, DbErr> {
        let holds = Query::select()
            .expr(Expr::val(1))
            .from(leader::Entity)
            .and_where(Expr::col(leader::Column::Id).eq(1))
            .and_where(Expr::col(leader::Column::ClusterId).eq(cluster(fence)))
            .and_where(Expr::col(leader::Column::Fence).eq(fence.revision))
            .to_owned();
        let row = Query::select()
            .exprs([
                Expr::val(job),
                Expr::val(slot_ms),
                Expr::val(fence.revision),
                Expr::val(leader),
                Expr::val(now_ms()),
            ])
            .and_where(Expr::exists(holds))
            .to_owned();
        let insert = Query::insert()
            .into_table(slot::Entity)
            .columns([
                slot::Column::Job,
                slot::Column::ScheduledMs,
                slot::Column::Fence,
                slot::Column::Leader,
                slot::Column::FiredMs,
            ])
            .select_from(row)
            .map_err(|e| DbErr::Custom(e.to_string()))?
            .on_conflict(OnConflict::columns([slot::Column::Job, slot::Column::ScheduledMs]).do_nothing().to_owned())
            .to_owned();
        if self.db.execute(&insert).await?.rows_affected() == 1 {
            return Ok(Claim::Claimed);
        }
        let newest = leader::Entity::find_by_id(1).one(&self.db).await?;
        Ok(match newest {
            Some(l) if l.fence == fence.revision && l.cluster_id == cluster(fence) => Claim::Fired,
            _ => Claim::Deposed,
        })
    }

    /// The newest slot of `job` that fired.
    pub async fn last_slot(&self, job: &str) -> Result<Option<i64>, DbErr> {
        let newest = slot::Entity::find()
            .filter(slot::Column::Job.eq(job))
            .order_by_desc(slot::Column::ScheduledMs)
            .one(&self.db)
            .await?;
        Ok(newest.map(|s| s.scheduled_ms))
    }

    pub async fn start_run(&self, row: run::Model) -> Result<(), DbErr> {
        run::Entity::insert(active(row)).exec_without_returning(&self.db).await?;
        Ok(())
    }

    /// Records a run's end (only once: a run that ended keeps its outcome).
    pub async fn finish_run(&self, id: &str, status: RunStatus, message: &str, trace_id: &str) -> Result<(), DbErr> {
        let message: String = message.chars().take(2000).collect();
        run::Entity::update_many()
            .col_expr(run::Column::Status, Expr::value(status as i32))
            .col_expr(run::Column::Message, Expr::value(message))
            .col_expr(run::Column::TraceId, Expr::value(trace_id))
            .col_expr(run::Column::EndMs, Expr::value(now_ms()))
            .filter(run::Column::Id.eq(id))
            .filter(run::Column::Status.eq(RunStatus::Running as i32))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// Runs newest first, after `before_id` (the previous page's last id).
    pub async fn runs(&self, job: Option<&str>, limit: u64, before_id: Option<&str>) -> Result<Vec<run::Model>, DbErr> {
        let mut query = run::Entity::find();
        if let Some(job) = job {
            query = query.filter(run::Column::Job.eq(job));
        }
        if let Some(id) = before_id {
            query = query.filter(run::Column::Id.lt(id));
        }
        query.order_by_desc(run::Column::Id).limit(limit).all(&self.db).await
    }

    /// The newest run of `job`.
    pub async fn last_run(&self, job: &str) -> Result<Option<run::Model>, DbErr> {
        run::Entity::find().filter(run::Column::Job.eq(job)).order_by_desc(run::Column::Id).one(&self.db).await
    }
}

/// A run row as it starts.
pub fn new_run(id: String, job: &str, trigger: i32, scheduled_ms: i64, fence: Fence, leader: &str) -> run::Model {
    run::Model {
        id,
        job: job.to_owned(),
        trigger,
        scheduled_ms,
        shard_index: 0,
        shard_total: 1,
        attempt: 1,
        executor: String::new(),
        executor_addr: String::new(),
        status: RunStatus::Running as i32,
        message: String::new(),
        leader: leader.to_owned(),
        fence: fence.revision,
        start_ms: now_ms(),
        end_ms: 0,
        trace_id: String::new(),
    }
}

fn active(m: run::Model) -> run::ActiveModel {
    {
        run::ActiveModel {
            id: Set(m.id),
            job: Set(m.job),
            trigger: Set(m.trigger),
            scheduled_ms: Set(m.scheduled_ms),
            shard_index: Set(m.shard_index),
            shard_total: Set(m.shard_total),
            attempt: Set(m.attempt),
            executor: Set(m.executor),
            executor_addr: Set(m.executor_addr),
            status: Set(m.status),
            message: Set(m.message),
            leader: Set(m.leader),
            fence: Set(m.fence),
            start_ms: Set(m.start_ms),
            end_ms: Set(m.end_ms),
            trace_id: Set(m.trace_id),
        }
    }
}
