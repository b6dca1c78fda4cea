//! The events crate's error.

use meshkit_base::ErrorExt;

/// What went wrong publishing, consuming or setting up the pipeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting or the material it names is unusable; the message names the setting.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The Kafka broker refused or could not be reached; `code` is the
    /// broker's error code when it answered with one.
    #[error("kafka: {message}")]
    Kafka { message: String, code: Option<rskafka::client::error::ProtocolError> },

    /// The outbox or the consumer's offsets could not be read or written.
    #[error(transparent)]
    Db(#[from] meshkit_db::Error),

    /// etcd, which elects the relay and shares out partitions, failed.
    #[error(transparent)]
    Registry(#[from] meshkit_registry::Error),

    /// The brokers' TLS material could not be read.
    #[error(transparent)]
    Tls(#[from] meshkit_tls::Error),

    /// What was asked for is not there (a topic, a dead letter).
    #[error("{0}")]
    NotFound(String),

    /// What was asked for cannot be done as asked; the message says why.
    #[error("{0}")]
    Invalid(String),

    /// A relay or consumer elected after this one holds what it worked on.
    #[error("fenced: an owner elected later holds it")]
    Fenced,
}

/// The events crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A Kafka error without a broker error code (a timeout, no partitions).
    pub fn kafka(message: impl Into<String>) -> Self {
        Error::Kafka { message: message.into(), code: None }
    }
}

impl From<sea_orm::DbErr> for Error {
    fn from(err: sea_orm::DbErr) -> Self {
        Error::Db(err.into())
    }
}

impl ErrorExt for Error {
    fn status_code(&self) -> tonic::Code {
        match self {
            Error::Config(_) => tonic::Code::FailedPrecondition,
            Error::Kafka { .. } => tonic::Code::Unavailable,
            Error::Db(e) => e.status_code(),
            Error::Registry(e) => e.status_code(),
            Error::Tls(e) => e.status_code(),
            Error::Fenced => tonic::Code::Aborted,
            Error::NotFound(_) => tonic::Code::NotFound,
            Error::Invalid(_) => tonic::Code::InvalidArgument,
        }
    }

    fn is_retryable(&self) -> bool {
        match self {
            Error::Config(_) => false,
            Error::Kafka { .. } => true,
            Error::Db(e) => e.is_retryable(),
            Error::Registry(e) => e.is_retryable(),
            Error::Tls(e) => e.is_retryable(),
            Error::Fenced | Error::NotFound(_) | Error::Invalid(_) => false,
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(err: Error) -> Self {
        err.to_status()
    }
}
