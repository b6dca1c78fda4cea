//! What every other meshkit crate may lean on, with no dependency on any of
//! them: clocks, shutdown signals, call deadlines, what the contracts say
//! about each method, request-level statuses, backoff, and [`ErrorExt`], the
//! one question every crate's error type answers.
#![forbid(unsafe_code)]

pub mod backoff;
pub mod deadline;
pub mod methods;
pub mod shutdown;
pub mod status;
pub mod time;

pub use backoff::Backoff;

/// What each crate's error type tells its callers beyond its message: the
/// gRPC status a server answers with when it reaches a client, and whether
/// trying the same operation again may succeed.
pub trait ErrorExt: std::error::Error {
    /// The status code a caller sees.
    fn status_code(&self) -> tonic::Code;

    /// Whether trying the same operation again may succeed.
    fn is_retryable(&self) -> bool;

    /// The error as a status for a caller: its code and its message.
    fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.status_code(), self.to_string())
    }
}
