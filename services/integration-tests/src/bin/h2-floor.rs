//! The least an HTTP/2 proxy built on the h2 crate does per request, as a
//! yardstick for the gateway in `make bench`'s load shapes: h2's server on
//! the client side, one h2 client connection to the backend, a request's
//! headers passed on as they came, its body, the response and the trailers
//! relayed. One thread, one task per stream, nothing else: no routing, no
//! admission, no metrics, no balancing, no retries, no deadline. What the
//! gateway spends above it is its own work, not the h2 crate's.
//!
//! `h2-floor LISTEN_PORT BACKEND_PORT` (both on 127.0.0.1).

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut port = |what: &str| -> anyhow::Result<u16> {
        let arg =
            args.next().ok_or_else(|| anyhow::anyhow!("usage: h2-floor LISTEN_PORT BACKEND_PORT ({what} missing)"))?;
        arg.parse().map_err(|e| anyhow::anyhow!("{what} {arg:?}: {e}"))
    };
    let (listen, backend) = (port("LISTEN_PORT")?, port("BACKEND_PORT")?);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        let upstream = TcpStream::connect(("127.0.0.1", backend)).await?;
        upstream.set_nodelay(true)?;
        // The balanced channel's connection settings: a connection window
        // with no limit (and so h2's budget for small DATA frames too).
        let (client, connection) = h2::client::Builder::new()
            .initial_window_size(512 * 1024)
            .initial_connection_window_size(i32::MAX as u32)
            .handshake::<_, Bytes>(upstream)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                eprintln!("h2-floor: the backend connection failed: {e}");
                std::process::exit(1);
            }
        });
        let listener = TcpListener::bind(("127.0.0.1", listen)).await?;
        loop {
            let (socket, _) = listener.accept().await?;
            socket.set_nodelay(true)?;
            let client = client.clone();
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else { return };
                while let Some(Ok((request, respond))) = connection.accept().await {
                    let client = client.clone();
                    tokio::spawn(async move {
                        if let Err(e) = relay(client, request, respond).await {
                            eprintln!("h2-floor: {e}");
                        }
                    });
                }
            });
        }
    })
}

/// One request and its response, relayed.
async fn relay(
    client: h2::client::SendRequest<Bytes>,
    request: http::Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) -> Result<(), h2::Error> {
    let (parts, body) = request.into_parts();
    let mut client = client.ready().await?;
    let end = body.is_end_stream();
    let (response, mut upstream) = client.send_request(http::Request::from_parts(parts, ()), end)?;
    if !end {
        pipe(body, &mut upstream).await?;
    }
    let (parts, body) = response.await?.into_parts();
    let end = body.is_end_stream();
    let mut downstream = respond.send_response(http::Response::from_parts(parts, ()), end)?;
    if !end {
        pipe(body, &mut downstream).await?;
    }
    Ok(())
}

/// A body and its trailers, from one side to the other.
async fn pipe(mut from: RecvStream, to: &mut SendStream<Bytes>) -> Result<(), h2::Error> {
    while let Some(data) = from.data().await {
        let data = data?;
        from.flow_control().release_capacity(data.len())?;
        to.send_data(data, from.is_end_stream())?;
    }
    if !from.is_end_stream() {
        match from.trailers().await? {
            Some(trailers) => to.send_trailers(trailers)?,
            None => to.send_data(Bytes::new(), true)?,
        }
    }
    Ok(())
}
