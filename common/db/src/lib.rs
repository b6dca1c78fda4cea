//! Database connections (sea-orm) and forward-only migrations.
//!
//! A SQLite file is the embedded default; a `postgres://` URL selects
//! PostgreSQL. Migrations are numbered per component and recorded in
//! `meshkit_migrations`; each runs in one transaction, and their statements
//! are written to be safe when two instances of a service start at once
//! (`IF NOT EXISTS`, plus an advisory lock on PostgreSQL).
#![forbid(unsafe_code)]

use std::time::Duration;

use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, Schema, Statement, TransactionTrait,
    sea_query::{Alias, Expr, ExprTrait, OnConflict, Query},
};

use meshkit_config::{Env, Settings, bad};
use serde::{Deserialize, Serialize};

pub mod error;

pub use error::{Error, Result, db_error};
pub use sea_orm;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseSettings {
    /// `sqlite://path?mode=rwc` or `postgres://…`; `DATABASE_URL` also sets it.
    pub url: String,
    pub max_connections: u32,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self { url: String::new(), max_connections: 8 }
    }
}

impl Settings for DatabaseSettings {
    fn validate(&self) -> meshkit_config::Result<()> {
        let url = &self.url;
        if !(url.is_empty()
            || url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return bad("database.url", "must start with sqlite:, postgres:// or postgresql://");
        }
        if self.max_connections == 0 {
            return bad("database.max_connections", "must be at least 1");
        }
        Ok(())
    }

    /// `DATABASE_URL` when `MESHKIT_DATABASE_URL` is not set; else a SQLite
    /// file named after the component in the working directory.
    fn resolve(&mut self, component: &str, env: &dyn Env) {
        if env.var("MESHKIT_DATABASE_URL").is_none() {
            if let Some(url) = env.var("DATABASE_URL").filter(|s| !s.is_empty()) {
                self.url = url;
            }
        }
        if self.url.is_empty() {
            self.url = format!("sqlite://{component}.db?mode=rwc");
        }
    }
}

/// One schema change of a component.
pub struct Migration {
    /// Strictly increasing within a component.
    pub version: i64,
    pub name: &'static str,
    /// The statements for a backend; built with sea-query so one definition
    /// serves SQLite and PostgreSQL.
    pub up: fn(&Schema, DbBackend) -> Vec<Statement>,
}

/// Connects and, for SQLite, switches the file to WAL so several processes
/// (instances of one service) can share it.
pub async fn connect(settings: &DatabaseSettings) -> Result<DatabaseConnection> {
    let mut options = ConnectOptions::new(settings.url.clone());
    options
        .max_connections(settings.max_connections)
        .min_connections(1)
        .connect_timeout(Duration::from_secs(5))
        .acquire_timeout(Duration::from_secs(5))
        .sqlx_logging(false);
    let db = Database::connect(options).await?;
    if db.get_database_backend() == DbBackend::Sqlite {
        when_not_busy(|| async { db.execute_unprepared("PRAGMA journal_mode=WAL").await.map(|_| ()) }).await?;
    }
    Ok(db)
}

/// Runs `op` again while SQLite says the file is locked by another process.
///
/// Instances of one service that start together share the file; a deferred
/// transaction that reads and then writes gets SQLITE_BUSY at once (busy
/// waiting cannot help it), so the whole step is repeated after a pause.
async fn when_not_busy<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, sea_orm::DbErr>>,
{
    let mut pause = Duration::from_millis(10);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match op().await {
            Err(e) if is_busy(&e) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(pause.mul_f64(rand::random_range(0.5..=1.5))).await;
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            other => return Ok(other?),
        }
    }
}

fn is_busy(err: &sea_orm::DbErr) -> bool {
    // SQLITE_BUSY (5) and its extended codes; sqlx reports the code only in the message.
    let message = err.to_string();
    message.contains("database is locked") || message.contains("(code: 5)") || message.contains("(code: 517)")
}

/// Applies the migrations of `component` that are not yet recorded.
/// Returns how many were applied.
pub async fn migrate(db: &DatabaseConnection, component: &str, migrations: &[Migration]) -> Result<usize> {
    let backend = db.get_database_backend();
    when_not_busy(|| async {
        // PostgreSQL's CREATE TABLE IF NOT EXISTS is not safe against itself:
        // two instances starting together on a fresh database can both pass
        // the check, and one fails on the catalog's unique index. Under a
        // lock of its own, one creates the table and the other finds it.
        let txn = db.begin().await?;
        if backend == DbBackend::Postgres {
            txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({})", lock_key("meshkit_migrations")))
                .await?;
        }
        txn.execute_unprepared(
            "CREATE TABLE IF NOT EXISTS meshkit_migrations (\
               component VARCHAR(100) NOT NULL, \
               version BIGINT NOT NULL, \
               name VARCHAR(200) NOT NULL, \
               PRIMARY KEY (component, version))",
        )
        .await?;
        txn.commit().await
    })
    .await?;
    let schema = Schema::new(backend);
    let mut applied = 0;
    for migration in migrations {
        if when_not_busy(|| apply(db, &schema, component, migration)).await? {
            tracing::info!(component, version = migration.version, name = migration.name, "migration applied");
            applied += 1;
        }
    }
    Ok(applied)
}

/// Applies one migration in one transaction, unless already recorded.
async fn apply(
    db: &DatabaseConnection,
    schema: &Schema,
    component: &str,
    migration: &Migration,
) -> std::result::Result<bool, sea_orm::DbErr> {
    let backend = db.get_database_backend();
    let txn = db.begin().await?;
    if backend == DbBackend::Postgres {
        txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({})", lock_key(component))).await?;
    }
    let done = Query::select()
        .expr(Expr::col(Alias::new("version")))
        .from(Alias::new("meshkit_migrations"))
        .and_where(Expr::col(Alias::new("component")).eq(component))
        .and_where(Expr::col(Alias::new("version")).eq(migration.version))
        .to_owned();
    if txn.query_one(&done).await?.is_some() {
        txn.commit().await?;
        return Ok(false);
    }
    for statement in (migration.up)(schema, backend) {
        txn.execute_raw(statement).await?;
    }
    let record = Query::insert()
        .into_table(Alias::new("meshkit_migrations"))
        .columns([Alias::new("component"), Alias::new("version"), Alias::new("name")])
        .values_panic([component.into(), migration.version.into(), migration.name.into()])
        .on_conflict(OnConflict::columns([Alias::new("component"), Alias::new("version")]).do_nothing().to_owned())
        .to_owned();
    txn.execute(&record).await?;
    txn.commit().await?;
    Ok(true)
}

fn lock_key(component: &str) -> i64 {
    // FNV-1a: stable across processes and releases.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in component.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash as i64
}

/// The connection pool's `/metrics` families: connections open, idle and in
/// use, and the configured maximum, labelled with `component`.
pub fn metrics_source(db: &DatabaseConnection, component: &str) -> meshkit_telemetry::metrics::Source {
    let db = db.clone();
    let component = component.to_owned();
    meshkit_telemetry::metrics::source(move || {
        let (open, idle, max) = pool_use(&db);
        let mut scrape = meshkit_telemetry::metrics::Scrape::default();
        let connections = scrape.gauges::<PoolStateLabels>(
            "meshkit_db_pool_connections",
            "Database connections open, by state (idle or in use).",
        );
        let state = |state| PoolStateLabels { component: component.clone(), state };
        connections.get_or_create(&state("idle")).set(f64::from(idle));
        connections.get_or_create(&state("in_use")).set(f64::from(open.saturating_sub(idle)));
        scrape
            .gauges::<PoolLabels>("meshkit_db_pool_max_connections", "The pool's maximum number of connections.")
            .get_or_create(&PoolLabels { component: component.clone() })
            .set(f64::from(max));
        std::future::ready(scrape)
    })
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PoolStateLabels {
    component: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PoolLabels {
    component: String,
}

/// (open, idle, max) connections of the pool behind `db`.
fn pool_use(db: &DatabaseConnection) -> (u32, u32, u32) {
    match db.get_database_backend() {
        DbBackend::Postgres => {
            let pool = db.get_postgres_connection_pool();
            (pool.size(), pool.num_idle() as u32, pool.options().get_max_connections())
        }
        DbBackend::Sqlite => {
            let pool = db.get_sqlite_connection_pool();
            (pool.size(), pool.num_idle() as u32, pool.options().get_max_connections())
        }
        _ => (0, 0, 0),
    }
}

#[cfg(test)]
mod settings_tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn the_url_defaults_to_a_file_named_after_the_component_or_database_url() {
        let mut s = DatabaseSettings::default();
        s.resolve("user", &env(&[]));
        assert_eq!(s.url, "sqlite://user.db?mode=rwc");
        let mut s = DatabaseSettings::default();
        s.resolve("user", &env(&[("DATABASE_URL", "postgres://u@h/db")]));
        assert_eq!(s.url, "postgres://u@h/db");
        let mut s = DatabaseSettings { url: "sqlite://own.db".into(), ..DatabaseSettings::default() };
        s.resolve("user", &env(&[("DATABASE_URL", "postgres://u@h/db"), ("MESHKIT_DATABASE_URL", "sqlite://own.db")]));
        assert_eq!(s.url, "sqlite://own.db", "MESHKIT_DATABASE_URL wins");
    }

    #[test]
    fn a_url_of_another_database_is_refused_by_name() {
        let s = DatabaseSettings { url: "mysql://x".into(), ..DatabaseSettings::default() };
        assert!(s.validate().expect_err("mysql").to_string().contains("database.url"));
    }
}
