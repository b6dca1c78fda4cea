//! One HTTP/2 connection to an endpoint, on the h2 crate directly.
//!
//! A call is one h2 stream driven by the caller's own task. Its HEADERS go
//! out in `call`, and a request body that is already complete when the call
//! is first polled (every unary call) is queued right behind them, its last
//! DATA frame carrying END_STREAM, so both leave in one write of the
//! connection task. The response is read straight off the stream. Nothing
//! crosses a channel to a dispatcher task, and no task is spawned per call:
//! only a request body still being produced (client and bidi streaming) gets
//! one that pipes it within the stream's flow-control window, and it ends
//! with the call.
//!
//! Connecting is lazy and repeated on demand. A failed connect or a closed
//! connection is handed to the next call as its error, so the endpoint sees
//! it and can be ejected, instead of failing readiness, which would drop the
//! endpoint from the balancer for good. A request h2 refused to open (the
//! connection was already closing) fails with [`NotSent`], which the retry
//! layer knows is safe to try elsewhere.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, client::SendRequest};
use http::{
    HeaderMap, HeaderName,
    header::{CONNECTION, TE, TRANSFER_ENCODING, UPGRADE},
    uri::{Authority, Scheme},
};
use http_body::{Body as _, Frame, SizeHint};
use tokio::sync::oneshot;
use tower::{BoxError, Service};

type Body = tonic::body::Body;
type Request = http::Request<Body>;
type Response = http::Response<Body>;
type Connecting = Pin<Box<dyn Future<Output = Result<SendRequest<Bytes>, BoxError>> + Send>>;

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
    Ready(SendRequest<Bytes>),
    /// The last attempt failed: the next call gets this error.
    Failed(Option<BoxError>),
}

pub(crate) struct Connection {
    authority: Authority,
    settings: ConnectSettings,
    state: State,
}

/// The request never left: h2 refused to open its stream, so the peer saw
/// nothing of it.
#[derive(Debug, thiserror::Error)]
#[error("the request was not sent: {0}")]
pub struct NotSent(#[source] pub h2::Error);

/// Largest header list accepted from a peer, as hyper's client allows.
const MAX_HEADER_LIST: u32 = 16 << 10;
/// Bytes h2 buffers per stream before a sender is asked to wait.
const MAX_SEND_BUFFER: usize = 1 << 20;

/// HTTP/2 over `io`; the connection runs on its own task, with keepalive.
async fn handshake<IO>(io: IO, settings: &ConnectSettings, addr: String) -> Result<SendRequest<Bytes>, BoxError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut connection) = h2::client::Builder::new()
        // Each call held to its own window, the connection's no limit: see
        // meshkit_tls::STREAM_WINDOW.
        .initial_window_size(meshkit_tls::STREAM_WINDOW)
        .initial_connection_window_size(i32::MAX as u32)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let ping = connection.ping_pong();
    let (interval, timeout) = (settings.keepalive_interval, settings.keepalive_timeout);
    tokio::spawn(async move {
        let keepalive = async {
            let Some(mut ping) = ping else { return std::future::pending().await };
            loop {
                tokio::time::sleep(interval).await;
                match tokio::time::timeout(timeout, ping.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("keepalive ping failed: {e}"),
                    Err(_) => return format!("no keepalive answer in {timeout:?}"),
                }
            }
        };
        tokio::select! {
            ended = &mut connection => if let Err(e) = ended {
                tracing::debug!(addr, error = %e, "connection ended");
            },
            // Dropping the connection fails its calls as lost, and the next
            // call connects again.
            problem = keepalive => tracing::debug!(addr, %problem, "connection closed"),
        }
    });
    Ok(send)
}

impl Connection {
    /// The last attempt to connect failed; the next call would get its error.
    pub(crate) fn failed(&self) -> bool {
        matches!(self.state, State::Failed(_))
    }

    /// Drops a failed attempt's error: the next readiness check connects again.
    pub(crate) fn forget_failure(&mut self) {
        if self.failed() {
            self.state = State::Idle;
        }
    }

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
                // Pending only while the peer's stream limit is reached.
                State::Ready(send) => match ready!(send.poll_ready(cx)) {
                    Ok(()) => return Poll::Ready(Ok(())),
                    // The peer went away (GOAWAY, reset, keepalive): connect
                    // again for this call.
                    Err(_) => self.state = State::Idle,
                },
                State::Failed(_) => return Poll::Ready(Ok(())),
            }
        }
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let send = match &mut self.state {
            State::Ready(send) => send,
            State::Failed(error) => {
                let error = error.take().unwrap_or_else(|| "connection failed".into());
                self.state = State::Idle;
                return ResponseFuture::failed(error);
            }
            State::Idle | State::Connecting(_) => {
                return ResponseFuture::failed("call before the connection was ready".into());
            }
        };
        let (mut head, body) = req.into_parts();
        let mut uri = std::mem::take(&mut head.uri).into_parts();
        uri.scheme = Some(if self.settings.tls.is_some() { Scheme::HTTPS } else { Scheme::HTTP });
        uri.authority = Some(self.authority.clone());
        head.uri = match http::Uri::from_parts(uri) {
            Ok(uri) => uri,
            Err(e) => return ResponseFuture::failed(format!("unusable request path: {e}").into()),
        };
        strip_connection_headers(&mut head.headers);
        let end_of_stream = body.is_end_stream();
        match send.send_request(http::Request::from_parts(head, ()), end_of_stream) {
            Ok((response, stream)) => ResponseFuture {
                request: (!end_of_stream).then_some((body, stream)),
                response: Some(response),
                cancel: None,
                error: None,
            },
            Err(e) => ResponseFuture::failed(NotSent(e).into()),
        }
    }
}

/// Headers HTTP/2 forbids (RFC 9113 §8.2.2), removed as hyper's client does:
/// a grpc-web request translated from HTTP/1.1 may carry them.
fn strip_connection_headers(headers: &mut HeaderMap) {
    const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
    if let Some(listed) = headers.remove(CONNECTION) {
        if let Ok(listed) = listed.to_str() {
            for name in listed.split(',') {
                headers.remove(name.trim());
            }
        }
    }
    for name in [KEEP_ALIVE, PROXY_CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    if headers.get(TE).is_some_and(|te| te != "trailers") {
        headers.remove(TE);
    }
}

/// The future of one request on a connection.
pub(crate) struct ResponseFuture {
    /// The request body still to send, until the first poll.
    request: Option<(Body, SendStream<Bytes>)>,
    response: Option<h2::client::ResponseFuture>,
    /// Stops the pipe of a streaming request body when the call is dropped.
    cancel: Option<oneshot::Sender<()>>,
    error: Option<BoxError>,
}

impl ResponseFuture {
    fn failed(error: BoxError) -> Self {
        Self { request: None, response: None, cancel: None, error: Some(error) }
    }
}

impl Future for ResponseFuture {
    type Output = Result<Response, BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Some(error) = this.error.take() {
            return Poll::Ready(Err(error));
        }
        if let Some((body, stream)) = this.request.take() {
            this.cancel = send_body(body, stream, cx);
        }
        let Some(response) = this.response.as_mut() else {
            return Poll::Ready(Err("response polled after it completed".into()));
        };
        let response = ready!(Pin::new(response).poll(cx));
        this.response = None;
        let response = response?;
        let cancel = this.cancel.take();
        Poll::Ready(Ok(
            response.map(|recv| Body::new(ResponseBody { recv, data_done: false, done: false, _cancel: cancel }))
        ))
    }
}

/// Queues what `body` has ready on `stream`. A body that ends here (a unary
/// request) is sent whole, its last DATA frame ending the stream; one that
/// is still being produced goes on to a pipe task, whose cancel handle is
/// returned.
fn send_body(mut body: Body, mut stream: SendStream<Bytes>, cx: &mut Context<'_>) -> Option<oneshot::Sender<()>> {
    // Each DATA frame is held back until the next poll says whether it is
    // the last, so a unary request ends on its message, not on an empty frame.
    let mut held: Option<Bytes> = None;
    loop {
        match Pin::new(&mut body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    if let Some(previous) = held.replace(data) {
                        if stream.send_data(previous, false).is_err() {
                            return None;
                        }
                    }
                }
                Err(frame) => {
                    if let Some(previous) = held.take() {
                        if stream.send_data(previous, false).is_err() {
                            return None;
                        }
                    }
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = stream.send_trailers(trailers);
                    }
                    return None;
                }
            },
            Poll::Ready(None) => {
                let _ = stream.send_data(held.unwrap_or_default(), true);
                return None;
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::debug!(error = %e, "request body failed; cancelling the call");
                stream.send_reset(h2::Reason::CANCEL);
                return None;
            }
            Poll::Pending => {
                if let Some(previous) = held.take() {
                    if stream.send_data(previous, false).is_err() {
                        return None;
                    }
                }
                let (cancel, cancelled) = oneshot::channel();
                tokio::spawn(pipe(body, stream, cancelled));
                return Some(cancel);
            }
        }
    }
}

/// Sends a streaming request body within the stream's send window, until it
/// ends, the peer resets the stream, or the call is dropped.
async fn pipe(mut body: Body, mut stream: SendStream<Bytes>, mut cancelled: oneshot::Receiver<()>) {
    enum Next {
        Frame(Option<Result<Frame<Bytes>, tonic::Status>>),
        Stop,
    }
    loop {
        let next = std::future::poll_fn(|cx| {
            if Pin::new(&mut cancelled).poll(cx).is_ready() || stream.poll_reset(cx).is_ready() {
                return Poll::Ready(Next::Stop);
            }
            Pin::new(&mut body).poll_frame(cx).map(Next::Frame)
        })
        .await;
        let frame = match next {
            Next::Stop => {
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Next::Frame(None) => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Next::Frame(Some(Err(e))) => {
                tracing::debug!(error = %e, "request body failed; cancelling the call");
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
            Next::Frame(Some(Ok(frame))) => frame,
        };
        let data = match frame.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    stream.reserve_capacity(0);
                    let _ = stream.send_trailers(trailers);
                }
                return;
            }
        };
        let end = body.is_end_stream();
        if !data.is_empty() {
            // As hyper's pipe: claim one byte of window, wait until some is
            // granted, then hand h2 the whole chunk (it buffers the rest and
            // sends it as the window opens). Claiming the whole chunk up front
            // would pin connection window on a stream that is only waiting.
            stream.reserve_capacity(1);
            while stream.capacity() == 0 {
                let capacity = std::future::poll_fn(|cx| {
                    if Pin::new(&mut cancelled).poll(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    stream.poll_capacity(cx)
                })
                .await;
                if !matches!(capacity, Some(Ok(_))) {
                    stream.send_reset(h2::Reason::CANCEL);
                    return;
                }
            }
        } else if !end {
            continue;
        }
        if stream.send_data(data, end).is_err() || end {
            return;
        }
    }
}

/// A response body read straight off its h2 stream, flow-control capacity
/// given back as each DATA frame is taken.
struct ResponseBody {
    recv: RecvStream,
    data_done: bool,
    done: bool,
    /// Held for as long as the response is read: dropping it stops a
    /// streaming request's pipe.
    _cancel: Option<oneshot::Sender<()>>,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                None => this.data_done = true,
            }
        }
        let trailers = ready!(this.recv.poll_trailers(cx));
        this.done = true;
        Poll::Ready(match trailers {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    //! Against a real HTTP/2 server (the h2 crate's, which tonic's sits on),
    //! so what goes on the wire can be seen frame by frame.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, StreamBody};
    use tokio::net::TcpListener;
    use tower::ServiceExt;

    use super::*;

    fn settings() -> ConnectSettings {
        ConnectSettings {
            connect_timeout: Duration::from_secs(2),
            keepalive_interval: Duration::from_secs(20),
            keepalive_timeout: Duration::from_secs(20),
            tls: None,
        }
    }

    /// What the server saw of one request.
    #[derive(Debug)]
    struct Seen {
        data_frames: usize,
        bytes: usize,
        /// Whether END_STREAM came on the last DATA frame.
        ended_on_data: bool,
        /// The reset that ended the request early, if one did.
        reset: Option<h2::Reason>,
    }

    /// An h2 server on a free port: answers each request with headers at
    /// once, then (when its request ends) a message and `grpc-status: 0`, and
    /// reports what it saw. Each connection is dropped after `per_connection`
    /// requests.
    async fn server(per_connection: usize) -> (Authority, mpsc::UnboundedReceiver<Seen>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let authority = listener.local_addr().expect("addr").to_string().parse().expect("authority");
        let (tx, rx) = mpsc::unbounded_channel();
        let connections = Arc::new(AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(socket).await.expect("handshake");
                    for _ in 0..per_connection {
                        let Some(Ok((req, mut respond))) = conn.accept().await else { return };
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let mut body = req.into_body();
                            let response = http::Response::builder().header("content-type", "application/grpc");
                            let mut send =
                                respond.send_response(response.body(()).expect("response"), false).expect("send");
                            let mut seen = Seen { data_frames: 0, bytes: 0, ended_on_data: false, reset: None };
                            while let Some(chunk) = body.data().await {
                                match chunk {
                                    Ok(chunk) => {
                                        seen.data_frames += 1;
                                        seen.bytes += chunk.len();
                                        seen.ended_on_data = body.is_end_stream();
                                        let _ = body.flow_control().release_capacity(chunk.len());
                                    }
                                    Err(e) => {
                                        seen.reset = e.reason();
                                        let _ = tx.send(seen);
                                        return;
                                    }
                                }
                            }
                            let _ = send.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), false);
                            let mut trailers = HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().expect("static"));
                            let _ = send.send_trailers(trailers);
                            let _ = tx.send(seen);
                        });
                    }
                    // Let the answers go out, then close the connection.
                    let _ = tokio::time::timeout(
                        Duration::from_millis(200),
                        std::future::poll_fn(|cx| conn.poll_closed(cx)),
                    )
                    .await;
                });
            }
        });
        (authority, rx, connections)
    }

    use tokio::sync::mpsc;

    fn request(body: Body) -> Request {
        http::Request::post("/meshkit.test.v1.Echo/Say")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .expect("static request")
    }

    /// A body that yields `chunks` as they come, like a client stream.
    fn streaming(chunks: mpsc::Receiver<Bytes>) -> Body {
        let stream = futures::stream::unfold(chunks, |mut rx| async move {
            rx.recv().await.map(|chunk| (Ok::<_, tonic::Status>(Frame::data(chunk)), rx))
        });
        Body::new(StreamBody::new(stream))
    }

    async fn call(conn: &mut Connection, req: Request) -> Result<(HeaderMap, Bytes), BoxError> {
        let response = conn.ready().await?.call(req).await?;
        let collected = response.into_body().collect().await?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        Ok((trailers, collected.to_bytes()))
    }

    #[tokio::test]
    async fn a_unary_request_is_one_data_frame_that_ends_the_stream() {
        let (authority, mut seen, _) = server(usize::MAX).await;
        let mut conn = Connection::lazy(authority, settings());
        // As tonic encodes a unary request: one message, then the end, which
        // the body only reports when polled again.
        let once = futures::stream::iter([Ok::<_, tonic::Status>(Frame::data(Bytes::from_static(b"\0\0\0\0\x03abc")))]);
        let (trailers, bytes) = call(&mut conn, request(Body::new(StreamBody::new(once)))).await.expect("call");
        assert_eq!(trailers.get("grpc-status").expect("status"), "0");
        assert_eq!(bytes.len(), 5);
        let seen = seen.recv().await.expect("seen");
        assert_eq!((seen.data_frames, seen.bytes, seen.ended_on_data), (1, 8, true), "{seen:?}");
    }

    #[tokio::test]
    async fn a_streaming_request_beyond_the_window_arrives_whole() {
        let (authority, mut seen, _) = server(usize::MAX).await;
        let mut conn = Connection::lazy(authority, settings());
        let (tx, rx) = mpsc::channel(4);
        let chunk = Bytes::from(vec![7u8; 64 << 10]);
        let chunks = 3 * meshkit_tls::STREAM_WINDOW as usize / chunk.len() + 1;
        tokio::spawn(async move {
            for _ in 0..chunks {
                tx.send(chunk.clone()).await.expect("open");
            }
        });
        let (trailers, _) = tokio::time::timeout(Duration::from_secs(10), call(&mut conn, request(streaming(rx))))
            .await
            .expect("not stuck on flow control")
            .expect("call");
        assert_eq!(trailers.get("grpc-status").expect("status"), "0");
        let seen = seen.recv().await.expect("seen");
        assert_eq!((seen.bytes, seen.reset), (chunks * (64 << 10), None), "{seen:?}");
    }

    #[tokio::test]
    async fn dropping_a_streaming_call_resets_its_stream() {
        let (authority, mut seen, _) = server(usize::MAX).await;
        let mut conn = Connection::lazy(authority, settings());
        let (tx, rx) = mpsc::channel(4);
        tx.send(Bytes::from_static(b"\0\0\0\0\x01a")).await.expect("open");
        let response = conn.ready().await.expect("ready").call(request(streaming(rx))).await.expect("headers");
        // The caller gives up while its request stream is still open.
        drop(response);
        let seen = tokio::time::timeout(Duration::from_secs(5), seen.recv()).await.expect("reset reaches the server");
        assert_eq!(seen.expect("seen").reset, Some(h2::Reason::CANCEL));
        drop(tx);
    }

    #[tokio::test]
    async fn a_closed_connection_is_replaced_on_the_next_call() {
        let (authority, _seen, connections) = server(1).await;
        let mut conn = Connection::lazy(authority, settings());
        for _ in 0..3 {
            let unary = Body::new(http_body_util::Full::new(Bytes::from_static(b"\0\0\0\0\0")));
            let (trailers, _) = call(&mut conn, request(unary)).await.expect("call");
            assert_eq!(trailers.get("grpc-status").expect("status"), "0");
            // Until the server's close has reached the client.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        assert_eq!(connections.load(Ordering::Relaxed), 3);
    }
}
