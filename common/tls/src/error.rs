//! The TLS crate's error.

use meshkit_base::ErrorExt;

/// Certificates that cannot be used, or a connection that could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting or the material it names is unusable; the message names the setting.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A file a setting names could not be read.
    #[error("invalid configuration: {setting}: cannot read {path:?}: {source}")]
    ReadFile { setting: String, path: String, source: std::io::Error },

    /// A connection could not be made.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The TLS crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl ErrorExt for Error {
    fn status_code(&self) -> tonic::Code {
        match self {
            Error::Config(_) | Error::ReadFile { .. } => tonic::Code::FailedPrecondition,
            Error::Transport(_) => tonic::Code::Unavailable,
        }
    }

    fn is_retryable(&self) -> bool {
        matches!(self, Error::Transport(_))
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        err.to_status()
    }
}
