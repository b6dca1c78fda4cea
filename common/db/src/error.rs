//! The database crate's error, and the status a storage error answers a caller with.

use meshkit_base::ErrorExt;
use sea_orm::{DbErr, SqlErr};
use tonic::Status;

/// The database refused or could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Db(#[from] DbErr),
}

/// The database crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl ErrorExt for Error {
    fn status_code(&self) -> tonic::Code {
        match self {
            Error::Db(DbErr::ConnectionAcquire(_) | DbErr::Conn(_)) => tonic::Code::Unavailable,
            Error::Db(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                tonic::Code::AlreadyExists
            }
            Error::Db(_) => tonic::Code::Internal,
        }
    }

    fn is_retryable(&self) -> bool {
        matches!(self, Error::Db(DbErr::ConnectionAcquire(_) | DbErr::Conn(_)))
    }

    fn to_status(&self) -> Status {
        let Error::Db(e) = self;
        status(e)
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        err.to_status()
    }
}

/// Maps a database error to a status: unique violations are ALREADY_EXISTS,
/// connection trouble UNAVAILABLE, anything else INTERNAL with a generic message.
pub fn db_error(err: DbErr) -> Status {
    status(&err)
}

/// [`db_error`] of a borrowed error.
pub fn status(err: &DbErr) -> Status {
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
