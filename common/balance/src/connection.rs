//! One HTTP/2 connection to an endpoint, straight on hyper.
//!
//! hyper's HTTP/2 `SendRequest` hands each request to the connection task
//! through a channel: no queue worker and no semaphore in between, where a
//! tonic `Channel` adds a `tower::buffer` hop of its own. Connecting is lazy
//! and repeated on demand; a failed connect or a closed connection is handed
//! to the next call as its error (so the endpoint sees it and can be ejected)
//! instead of failing readiness, which would drop the endpoint from the
//! balancer for good.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use http::uri::{Authority, Scheme};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tower::{BoxError, Service};

type Request = http::Request<tonic::body::Body>;
type Response = http::Response<tonic::body::Body>;
type Connecting = Pin<Box<dyn Future<Output = Result<SendRequest<tonic::body::Body>, BoxError>> + Send>>;
/// The future of one request on a connection.
pub(crate) type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send>>;

/// How connections are made; shared by every connection of a pool.
#[derive(Debug, Clone)]
pub(crate) struct ConnectSettings {
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub tls: Option<std::sync::Arc<meshkit_tls::Tls>>,
}

enum State {
    Idle,
    Connecting(Connecting),
    Ready(SendRequest<tonic::body::Body>),
    /// The last attempt failed: the next call gets this error.
    Failed(Option<BoxError>),
}

pub(crate) struct Connection {
    authority: Authority,
    settings: ConnectSettings,
    state: State,
}

/// HTTP/2 over `io`; the connection runs on its own task.
async fn handshake<IO>(
    io: IO,
    settings: &ConnectSettings,
    addr: String,
) -> Result<SendRequest<tonic::body::Body>, BoxError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(settings.keepalive_interval)
        .keep_alive_timeout(settings.keepalive_timeout)
        .keep_alive_while_idle(true)
        // Each call held to its own window, the connection's no limit: see
        // meshkit_tls::STREAM_WINDOW.
        .initial_stream_window_size(meshkit_tls::STREAM_WINDOW)
        .initial_connection_window_size(i32::MAX as u32)
        .handshake(TokioIo::new(io))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(addr, error = %e, "connection ended");
        }
    });
    Ok(send)
}

impl Connection {
    /// A connection to `authority` (`host:port`) that connects on first use.
    pub(crate) fn lazy(authority: Authority, settings: ConnectSettings) -> Self {
        Self { authority, settings, state: State::Idle }
    }

    fn connect(&self) -> Connecting {
        let addr = self.authority.to_string();
        let settings = self.settings.clone();
        Box::pin(async move {
            let connect = tokio::net::TcpStream::connect(addr.as_str());
            let stream = tokio::time::timeout(settings.connect_timeout, connect)
                .await
                .map_err(|_| -> BoxError { format!("connecting to {addr} timed out").into() })??;
            let _ = stream.set_nodelay(true);
            match &settings.tls {
                None => handshake(stream, &settings, addr).await,
                Some(tls) => {
                    let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h).to_owned();
                    let handshake_timeout = settings.connect_timeout.max(Duration::from_secs(2));
                    let stream = match tokio::time::timeout(handshake_timeout, tls.connect(&host, stream)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(e)) => {
                            meshkit_tls::handshake_failed("client");
                            return Err(format!("TLS handshake with {addr}: {e}").into());
                        }
                        Err(_) => {
                            meshkit_tls::handshake_failed("client");
                            return Err(format!("TLS handshake with {addr} timed out").into());
                        }
                    };
                    handshake(stream, &settings, addr).await
                }
            }
        })
    }
}

impl Service<Request> for Connection {
    type Response = Response;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            match &mut self.state {
                State::Idle => self.state = State::Connecting(self.connect()),
                State::Connecting(connecting) => {
                    self.state = match ready!(connecting.as_mut().poll(cx)) {
                        Ok(send) => State::Ready(send),
                        Err(e) => State::Failed(Some(e)),
                    };
                }
                State::Ready(send) => {
                    if send.is_closed() {
                        // The peer went away: connect again on this call.
                        self.state = State::Idle;
                        continue;
                    }
                    return Poll::Ready(Ok(()));
                }
                State::Failed(_) => return Poll::Ready(Ok(())),
            }
        }
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        match &mut self.state {
            State::Ready(send) => {
                let mut parts = std::mem::take(req.uri_mut()).into_parts();
                parts.scheme = Some(Scheme::HTTP);
                parts.authority = Some(self.authority.clone());
                match http::Uri::from_parts(parts) {
                    Ok(uri) => *req.uri_mut() = uri,
                    Err(e) => return Box::pin(std::future::ready(Err(format!("unusable request path: {e}").into()))),
                }
                let sent = send.send_request(req);
                Box::pin(async move {
                    let response = sent.await?;
                    Ok(response.map(tonic::body::Body::new))
                })
            }
            State::Failed(error) => {
                let error = error.take().unwrap_or_else(|| "connection failed".into());
                self.state = State::Idle;
                Box::pin(std::future::ready(Err(error)))
            }
            State::Idle | State::Connecting(_) => {
                Box::pin(std::future::ready(Err("call before the connection was ready".into())))
            }
        }
    }
}
