//! The registry crate's error.

use meshkit_base::ErrorExt;

/// What went wrong talking to etcd or setting up the connection.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is missing, malformed or out of range; the message names it.
    #[error(transparent)]
    Config(#[from] meshkit_config::Error),

    /// A file a setting names could not be read.
    #[error("invalid configuration: {setting}: cannot read {path:?}: {source}")]
    ReadFile { setting: &'static str, path: String, source: std::io::Error },

    /// What an operation names does not exist (an instance that is gone).
    #[error("{0}")]
    NotFound(String),

    /// An operation's input was refused; nothing was written.
    #[error("refused: {0}")]
    Refused(String),

    /// etcd refused or could not be reached.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
}

/// The registry crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl ErrorExt for Error {
    fn status_code(&self) -> tonic::Code {
        match self {
            Error::Config(_) | Error::ReadFile { .. } => tonic::Code::FailedPrecondition,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::Refused(_) => tonic::Code::InvalidArgument,
            Error::Etcd(_) => tonic::Code::Unavailable,
        }
    }

    fn is_retryable(&self) -> bool {
        matches!(self, Error::Etcd(_))
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        err.to_status()
    }
}
