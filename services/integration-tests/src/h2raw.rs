//! A raw HTTP/2 client for the hostile-client tests: it writes frames byte by
//! byte as a peer breaking the protocol on purpose would (no HTTP/2 library
//! would send them), and a reader task records what the server answers.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// SETTINGS identifiers.
pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;

/// HTTP/2 error codes.
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame: its type, flags, stream and payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A SETTINGS frame with these (id, value) pairs.
pub fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let mut payload = Vec::new();
    for (id, value) in pairs {
        payload.extend_from_slice(&id.to_be_bytes());
        payload.extend_from_slice(&value.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &payload)
}

/// HPACK integer with an `n`-bit prefix, `first` holding the bits above it.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128 + 128) as u8);
        value /= 128;
    }
    out.push(value as u8);
}

/// An HPACK block of literal fields, never indexed, no Huffman: what any
/// decoder must accept, and easy to make as large as a test needs.
pub fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x10);
        hpack_int(&mut out, 0, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// The header block of a gRPC call to `path`.
pub fn grpc_request(path: &str) -> Vec<u8> {
    hpack(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ])
}

/// A gRPC message frame: the compressed flag, the length the prefix claims,
/// and the bytes that follow (which may differ from the claim).
pub fn grpc_message(compressed: bool, claimed_len: u32, body: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::from(compressed)];
    out.extend_from_slice(&claimed_len.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// What the server has sent so far.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// The error code and debug data of the server's GOAWAY, if it sent one.
    pub goaway: Option<(u32, String)>,
    /// RST_STREAM frames: (stream, error code).
    pub resets: Vec<(u32, u32)>,
    /// Streams the server answered with HEADERS.
    pub headers: Vec<u32>,
    /// The server's HEADERS blocks that end a stream (trailers or
    /// trailers-only), raw: `grpc-status` is a literal there.
    pub trailers: Vec<(u32, Vec<u8>)>,
    pub data_bytes: usize,
    pub pings_acked: usize,
    pub settings_acked: usize,
    /// The server's SETTINGS (id, value) pairs.
    pub server_settings: Vec<(u16, u32)>,
    /// The connection ended (EOF or an error).
    pub closed: bool,
    pub frames: usize,
}

/// A connection under the test's full control.
pub struct RawConn {
    write: OwnedWriteHalf,
    seen: Arc<Mutex<Seen>>,
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl RawConn {
    /// Connects and sends the preface and an empty SETTINGS frame; reads
    /// (and acknowledges nothing) in the background.
    pub async fn open(addr: SocketAddr) -> std::io::Result<Self> {
        Self::open_with(addr, &settings(&[]), true).await
    }

    /// Connects and sends the preface and `first_settings`; reads in the
    /// background only if `read`.
    pub async fn open_with(addr: SocketAddr, first_settings: &[u8], read: bool) -> std::io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (r, mut write) = stream.into_split();
        write.write_all(PREFACE).await?;
        write.write_all(first_settings).await?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let reader = read.then(|| tokio::spawn(read_frames(r, seen.clone())));
        Ok(Self { write, seen, reader })
    }

    /// Sends raw bytes; an error once the server has closed.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write.write_all(bytes).await
    }

    /// Sends `bytes`, giving up after `limit` (a server that stopped reading).
    pub async fn send_within(&mut self, bytes: &[u8], limit: Duration) -> Result<(), &'static str> {
        match tokio::time::timeout(limit, self.write.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err("closed"),
            Err(_) => Err("blocked"),
        }
    }

    pub fn seen(&self) -> Seen {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits up to `limit` for `check` to hold on what the server sent.
    pub async fn wait_for(&self, limit: Duration, check: impl Fn(&Seen) -> bool) -> Seen {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let seen = self.seen();
            if check(&seen) || tokio::time::Instant::now() >= deadline {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for RawConn {
    fn drop(&mut self) {
        if let Some(reader) = self.reader.take() {
            reader.abort();
        }
    }
}

async fn read_frames(mut r: OwnedReadHalf, seen: Arc<Mutex<Seen>>) {
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                seen.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let mut at = 0;
        while buf.len() - at >= 9 {
            let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
            if buf.len() - at < 9 + len {
                break;
            }
            let (kind, flags) = (buf[at + 3], buf[at + 4]);
            let stream = u32::from_be_bytes([buf[at + 5], buf[at + 6], buf[at + 7], buf[at + 8]]) & 0x7fff_ffff;
            let payload = &buf[at + 9..at + 9 + len];
            record(&mut seen.lock().unwrap_or_else(|p| p.into_inner()), kind, flags, stream, payload);
            at += 9 + len;
        }
        buf.drain(..at);
    }
}

fn record(seen: &mut Seen, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    seen.frames += 1;
    match kind {
        GOAWAY if payload.len() >= 8 => {
            seen.goaway = Some((be32(&payload[4..8]), String::from_utf8_lossy(&payload[8..]).into_owned()));
        }
        RST_STREAM if payload.len() >= 4 => seen.resets.push((stream, be32(payload))),
        HEADERS => {
            seen.headers.push(stream);
            if flags & END_STREAM != 0 {
                seen.trailers.push((stream, payload.to_vec()));
            }
        }
        DATA => seen.data_bytes += payload.len(),
        PING if flags & ACK != 0 => seen.pings_acked += 1,
        SETTINGS if flags & ACK != 0 => seen.settings_acked += 1,
        SETTINGS => {
            for pair in payload.chunks_exact(6) {
                seen.server_settings.push((u16::from_be_bytes([pair[0], pair[1]]), be32(&pair[2..6])));
            }
        }
        _ => {}
    }
}

/// The resident set of this process (the servers under test run in it), in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
