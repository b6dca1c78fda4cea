//! The error of starting and running a meshkit process: each concern's
//! error, plus the server's own (binding, serving).

use meshkit_base::ErrorExt;

/// Errors from starting or running a process on the mesh.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is missing, malformed or out of range; the message names it.
    #[error("invalid configuration: {0}")]
    Config(String),

    #[error(transparent)]
    Settings(#[from] meshkit_config::Error),

    /// etcd: connecting, registering, the config center.
    #[error(transparent)]
    Registry(#[from] meshkit_registry::Error),

    /// The process's TLS material.
    #[error(transparent)]
    Tls(#[from] meshkit_tls::Error),

    /// The database refused or could not be reached.
    #[cfg(feature = "db")]
    #[error(transparent)]
    Db(#[from] meshkit_db::Error),

    /// The event pipeline could not start.
    #[cfg(feature = "events")]
    #[error(transparent)]
    Events(#[from] meshkit_events::Error),

    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },

    /// A socket or file operation failed.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),

    /// The gRPC server stopped with an error.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The front crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<etcd_client::Error> for Error {
    fn from(err: etcd_client::Error) -> Self {
        Error::Registry(err.into())
    }
}

#[cfg(feature = "db")]
impl From<meshkit_db::sea_orm::DbErr> for Error {
    fn from(err: meshkit_db::sea_orm::DbErr) -> Self {
        Error::Db(err.into())
    }
}

impl ErrorExt for Error {
    fn status_code(&self) -> tonic::Code {
        match self {
            Error::Config(_) => tonic::Code::FailedPrecondition,
            Error::Settings(e) => e.status_code(),
            Error::Registry(e) => e.status_code(),
            Error::Tls(e) => e.status_code(),
            #[cfg(feature = "db")]
            Error::Db(e) => e.status_code(),
            #[cfg(feature = "events")]
            Error::Events(e) => e.status_code(),
            Error::Bind { .. } | Error::Io(_) | Error::Transport(_) => tonic::Code::Unavailable,
        }
    }

    fn is_retryable(&self) -> bool {
        match self {
            Error::Config(_) | Error::Settings(_) | Error::Bind { .. } => false,
            Error::Registry(e) => e.is_retryable(),
            Error::Tls(e) => e.is_retryable(),
            #[cfg(feature = "db")]
            Error::Db(e) => e.is_retryable(),
            #[cfg(feature = "events")]
            Error::Events(e) => e.is_retryable(),
            Error::Io(_) | Error::Transport(_) => true,
        }
    }

    fn to_status(&self) -> tonic::Status {
        match self {
            #[cfg(feature = "db")]
            Error::Db(e) => e.to_status(),
            other => tonic::Status::new(other.status_code(), other.to_string()),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        err.to_status()
    }
}
