//! The signals that ask a process to stop.
//!
//! Install [`Signals`] first thing in `main`, before anything registers:
//! a SIGTERM that arrives while the server is still starting is then held
//! and honoured (drain, revoke) once it is up, instead of killing the process
//! by the default action with its lease left behind.

use std::io;

/// SIGTERM and SIGINT, captured from the moment of [`Signals::install`].
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Replaces the default actions of SIGTERM and SIGINT. Needs a Tokio runtime.
    pub fn install() -> io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Resolves on the first SIGTERM or SIGINT received since `install`.
    pub async fn recv(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
