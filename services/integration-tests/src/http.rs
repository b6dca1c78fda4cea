//! A small HTTP client for the gateway tests: one request per connection,
//! HTTP/1.1 or HTTP/2 prior knowledge, the whole response read.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

/// A response, read to the end.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub trailers: Option<HeaderMap>,
}

impl Reply {
    /// The body as JSON; panics naming the body when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `req` over a fresh HTTP/1.1 connection to `addr`.
pub async fn send(addr: SocketAddr, req: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    read(sender.send_request(req).await?).await
}

/// Sends `req` over a fresh HTTP/2 (prior knowledge) connection to `addr`.
pub async fn send_h2(addr: SocketAddr, req: Request<Full<Bytes>>) -> anyhow::Result<Reply> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    read(sender.send_request(req).await?).await
}

async fn read(res: http::Response<hyper::body::Incoming>) -> anyhow::Result<Reply> {
    let (parts, body) = res.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok(Reply { status: parts.status, headers: parts.headers, body: collected.to_bytes(), trailers })
}

/// A request with a JSON body (or none, when `body` is empty).
pub fn json_request(method: &str, addr: SocketAddr, path: &str, body: &str) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(method).uri(format!("http://{addr}{path}"));
    if !body.is_empty() {
        builder = builder.header("content-type", "application/json");
    }
    builder.body(Full::new(Bytes::from(body.to_owned()))).expect("a well-formed request")
}
