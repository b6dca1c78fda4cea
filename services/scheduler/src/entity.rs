//! The job log: the leader's fence, the slots fired and every run.

/// One row (id 1): the fence of the newest leader. A slot is claimed only
/// under the fence stored here, so a deposed leader cannot fire one.
pub mod leader {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "scheduler_leader")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i32,
        /// The etcd cluster id (as signed bits) and the leader key's create revision.
        pub cluster_id: i64,
        pub fence: i64,
        pub leader: String,
        /// Milliseconds since the Unix epoch.
        pub since_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A schedule slot that fired: at most one row per (job, slot), whoever led.
pub mod slot {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "job_slots")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub job: String,
        /// Milliseconds since the Unix epoch.
        #[sea_orm(primary_key, auto_increment = false)]
        pub scheduled_ms: i64,
        pub fence: i64,
        pub leader: String,
        pub fired_ms: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// One attempt of one shard of one trigger.
pub mod run {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "job_runs")]
    pub struct Model {
        /// A UUIDv7: ids sort in creation order, which paging relies on.
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: String,
        #[sea_orm(indexed)]
        pub job: String,
        /// `meshkit.scheduler.v1.TriggerKind` number.
        pub trigger: i32,
        pub scheduled_ms: i64,
        pub shard_index: i32,
        pub shard_total: i32,
        pub attempt: i32,
        pub executor: String,
        pub executor_addr: String,
        /// `meshkit.scheduler.v1.RunStatus` number.
        pub status: i32,
        pub message: String,
        pub leader: String,
        pub fence: i64,
        pub start_ms: i64,
        /// 0 while it runs.
        pub end_ms: i64,
        /// The trace of the call to the executor; empty untraced (version 2).
        pub trace_id: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}
