//! A connection that must send the HTTP/2 client preface within a time
//! limit. hyper's HTTP/2 server waits for the preface as long as the peer
//! keeps the socket open, so a client that connects and sends nothing (or a
//! few bytes) would hold a connection and its task forever; thousands of them
//! exhaust file descriptors. [`PrefaceTimeout`] fails the connection's reads
//! once `server.preface_timeout_ms` passes before the 24 bytes of the preface
//! have arrived, and hyper closes it.

use std::{
    io,
    pin::Pin,
    sync::LazyLock,
    task::{Context, Poll},
    time::Duration,
};

use meshkit_telemetry::metrics::counter;
use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`.
const PREFACE_LEN: usize = 24;

/// `meshkit_server_preface_timeouts_total`.
static PREFACE_TIMEOUTS: LazyLock<Counter> = LazyLock::new(|| {
    counter(
        "meshkit_server_preface_timeouts",
        "Connections closed because the client did not send the HTTP/2 preface within server.preface_timeout_ms.",
    )
});

/// `inner`, whose reads fail with `TimedOut` if the preface is not complete
/// by the deadline.
pub struct PrefaceTimeout<S> {
    inner: S,
    seen: usize,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    limit: Duration,
}

impl<S> PrefaceTimeout<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        // Registered with the first connection, so the counter shows at 0.
        LazyLock::force(&PREFACE_TIMEOUTS);
        Self { inner, seen: 0, deadline: Some(Box::pin(tokio::time::sleep(limit))), limit }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PrefaceTimeout<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(deadline) = this.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                this.deadline = None;
                PREFACE_TIMEOUTS.inc();
                tracing::debug!(
                    limit_ms = this.limit.as_millis() as u64,
                    received = this.seen,
                    "no HTTP/2 preface in time; closing"
                );
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no HTTP/2 preface within {} ms", this.limit.as_millis()),
                )));
            }
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = result {
            this.seen += buf.filled().len() - before;
            if this.seen >= PREFACE_LEN {
                this.deadline = None;
            }
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PrefaceTimeout<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<S: Connected> Connected for PrefaceTimeout<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_peer_times_out_and_a_prompt_one_does_not() {
        let (client, server) = tokio::io::duplex(64);
        let mut guarded = PrefaceTimeout::new(server, Duration::from_secs(15));
        let mut buf = [0u8; 64];
        let err = guarded.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("15000 ms"), "{err}");
        drop(client);

        let (mut client, server) = tokio::io::duplex(64);
        let mut guarded = PrefaceTimeout::new(server, Duration::from_secs(15));
        client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.unwrap();
        let mut got = 0;
        while got < PREFACE_LEN {
            got += guarded.read(&mut buf[got..]).await.unwrap();
        }
        // Past the deadline, a connection that sent its preface stays open.
        tokio::time::sleep(Duration::from_secs(60)).await;
        client.write_all(b"x").await.unwrap();
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn part_of_the_preface_is_not_enough() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut guarded = PrefaceTimeout::new(server, Duration::from_secs(1));
        client.write_all(b"PRI * HTTP").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(guarded.read(&mut buf).await.unwrap(), 10);
        assert_eq!(guarded.read(&mut buf).await.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }
}
