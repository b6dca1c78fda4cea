//! One error type for the library; each variant knows its gRPC status.

use std::path::PathBuf;

/// Errors from the mesh library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is missing, malformed or out of range; the message names it.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The configuration file could not be read or parsed.
    #[error("configuration file {path}: {message}")]
    ConfigFile { path: PathBuf, message: String },

    /// etcd refused or could not be reached.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),

    /// The database refused or could not be reached.
    #[error("database: {0}")]
    Db(#[from] sea_orm::DbErr),

    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },

    /// A socket or file operation failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),

    /// The Kafka broker refused or could not be reached.
    #[error("kafka: {0}")]
    Kafka(String),

    /// The gRPC server stopped with an error.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether trying the same operation again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Etcd(_) | Error::Db(_) | Error::Io(_) | Error::Transport(_) | Error::Kafka(_))
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Config(_) | Error::ConfigFile { .. } => tonic::Status::failed_precondition(err.to_string()),
            Error::Etcd(_) | Error::Kafka(_) | Error::Transport(_) | Error::Io(_) | Error::Bind { .. } => {
                tonic::Status::unavailable(err.to_string())
            }
            Error::Db(e) => crate::status::db_error(e),
        }
    }
}
