//! Helpers that turn validation failures and storage errors into gRPC statuses
//! with messages a caller can act on. Internal detail is logged, not sent.

use sea_orm::{DbErr, SqlErr};
use tonic::Status;

/// INVALID_ARGUMENT naming the field, e.g. `email: must look like name@example.com`.
pub fn invalid_argument(field: &str, problem: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {problem}"))
}

/// Maps a database error to a status: unique violations are ALREADY_EXISTS,
/// connection trouble UNAVAILABLE, anything else INTERNAL with a generic message.
pub fn db_error(err: DbErr) -> Status {
    if let Some(SqlErr::UniqueConstraintViolation(_)) = err.sql_err() {
        return Status::already_exists("a record with the same unique value already exists");
    }
    match err {
        DbErr::ConnectionAcquire(_) | DbErr::Conn(_) => {
            tracing::warn!(error = %err, "database unavailable");
            Status::unavailable("database unavailable, try again")
        }
        other => {
            tracing::error!(error = %other, "database error");
            Status::internal("internal storage error")
        }
    }
}

/// Validates a page size: 0 means `default`; negative or above `max` is refused.
pub fn page_size(field: &str, requested: i32, default: u64, max: u64) -> Result<u64, Status> {
    match requested {
        0 => Ok(default),
        n if n < 0 => Err(invalid_argument(field, "must not be negative")),
        n if n as u64 > max => Err(invalid_argument(field, format!("must be at most {max}"))),
        n => Ok(n as u64),
    }
}
