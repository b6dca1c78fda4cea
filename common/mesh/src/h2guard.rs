//! Watches the HTTP/2 frames of one server connection as they pass, both
//! ways, reading only their 9-byte headers (and the first bytes of GOAWAY
//! and RST_STREAM): the flood limits hyper's h2 does not have, and one place
//! where every refusal of a misbehaving client is counted and logged.
//!
//! - Incoming PING and SETTINGS frames (acknowledgements too) pass a token
//!   bucket of `server.control_frames_per_sec` a second (the same burst). A
//!   client past it is sent GOAWAY `ENHANCE_YOUR_CALM`
//!   (`too_many_control_frames`) and its connection is closed: each such
//!   frame costs the server an answer, and h2 answers every one. A PING that
//!   follows DATA or HEADERS the server sent is free: grpc-go and grpc-java
//!   measure the bandwidth-delay product with a PING per round trip while
//!   data flows to them (gRPC's own servers excuse those pings the same way).
//! - The refusals h2 itself makes are seen in what it writes: a GOAWAY with
//!   an error (`too_many_resets` for rapid reset, `too_many_continuations`,
//!   a protocol error, …) and RST_STREAM `REFUSED_STREAM` (a stream past
//!   `server.max_concurrent_streams`).
//!
//! - Consecutive DATA frames of one stream that arrive in one read are
//!   passed on as one frame (up to 16 KiB, the least frame size every
//!   HTTP/2 server accepts; padded frames as they are). gRPC clients send
//!   each message in a DATA frame of its own, and h2 closes a connection
//!   with GOAWAY `ENHANCE_YOUR_CALM` (`too_many_data_frames`) once the small
//!   frames it holds for the handler exceed a budget (half the connection
//!   window, a few thousand frames): a client streaming small messages
//!   faster than the handler read them lost its connection, every call on it
//!   with it. Frame boundaries in DATA carry no meaning and flow control
//!   counts payload bytes, so nothing else changes.
//!
//! Each is counted in `meshkit_h2_refusals_total{reason}`, and the first on a
//! connection is logged with the peer's address, so a flood writes one line.
//! A connection that is not HTTP/2 (the gateway's HTTP/1.1) passes untouched.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::LazyLock,
    task::{Context, Poll},
    time::Instant,
};

use meshkit_telemetry::metrics::{CounterFamily, counters};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const ACK: u8 = 0x1;
const END_STREAM: u8 = 0x1;
const PADDED: u8 = 0x8;
/// The largest DATA frame a merge makes: SETTINGS_MAX_FRAME_SIZE is never
/// below it.
const MERGED_FRAME_MAX: usize = 16_384;
const ENHANCE_YOUR_CALM: u32 = 0xb;
const REFUSED_STREAM: u32 = 0x7;

#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct Reason {
    reason: String,
}

static REFUSALS: LazyLock<CounterFamily<Reason>> = LazyLock::new(|| {
    counters(
        "meshkit_h2_refusals",
        "HTTP/2 clients refused for breaking the protocol or a limit, by reason: a GOAWAY's debug data \
         (too_many_resets, too_many_continuations, too_many_control_frames, …) or error name, or refused_stream.",
    )
});

/// The limits a [`FrameGuard`] enforces.
#[derive(Debug, Clone, Copy)]
pub struct GuardLimits {
    /// PING and SETTINGS frames a client may send a second (and at once).
    pub control_frames_per_sec: u32,
}

/// Where a byte stream stands between frames: in the preface, in a frame's
/// header, or in its payload.
#[derive(Debug)]
struct Scanner {
    /// Bytes of the client preface still to come (incoming only).
    preface: usize,
    /// The stream is not HTTP/2: stop looking.
    off: bool,
    head: [u8; 9],
    have: usize,
    /// Payload bytes left in the current frame.
    left: usize,
    /// The start of the current frame's payload, for GOAWAY and RST_STREAM.
    capture: Vec<u8>,
}

/// A frame, once its payload has passed.
struct Frame<'a> {
    kind: u8,
    flags: u8,
    stream: u32,
    start: &'a [u8],
}

impl Scanner {
    fn new(preface: bool) -> Self {
        Self {
            preface: if preface { PREFACE.len() } else { 0 },
            off: false,
            head: [0; 9],
            have: 0,
            left: 0,
            capture: Vec::new(),
        }
    }

    /// Where in `data`, the bytes about to be fed, the first frame that
    /// starts in them starts (None past the end, or when not HTTP/2).
    fn next_frame_at(&self, data: &[u8]) -> Option<usize> {
        if self.off {
            return None;
        }
        let at = if self.preface > 0 {
            self.preface
        } else if self.have == 9 {
            self.left
        } else if self.have == 0 {
            0
        } else {
            // Inside a frame's header: its length is in it.
            let need = 9 - self.have;
            let mut head = self.head;
            head[self.have..].copy_from_slice(data.get(..need)?);
            need + u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize
        };
        (at <= data.len()).then_some(at)
    }

    /// At a frame boundary: bytes may be put in without breaking a frame.
    fn between_frames(&self) -> bool {
        self.preface == 0 && self.have == 0 && self.left == 0
    }

    fn capture_len(&self) -> usize {
        match self.head[3] {
            GOAWAY => 72,
            RST_STREAM => 4,
            _ => 0,
        }
    }

    fn feed(&mut self, mut data: &[u8], mut on_frame: impl FnMut(Frame<'_>)) {
        while !data.is_empty() && !self.off {
            if self.preface > 0 {
                let at = PREFACE.len() - self.preface;
                let n = self.preface.min(data.len());
                if data[..n] != PREFACE[at..at + n] {
                    self.off = true;
                    return;
                }
                self.preface -= n;
                data = &data[n..];
            } else if self.have < 9 {
                let n = (9 - self.have).min(data.len());
                self.head[self.have..self.have + n].copy_from_slice(&data[..n]);
                self.have += n;
                data = &data[n..];
                if self.have == 9 {
                    self.left = u32::from_be_bytes([0, self.head[0], self.head[1], self.head[2]]) as usize;
                    self.capture.clear();
                }
            } else {
                let n = self.left.min(data.len());
                let want = self.capture_len().saturating_sub(self.capture.len()).min(n);
                self.capture.extend_from_slice(&data[..want]);
                self.left -= n;
                data = &data[n..];
            }
            if self.have == 9 && self.left == 0 {
                let stream = u32::from_be_bytes([self.head[5], self.head[6], self.head[7], self.head[8]]) & 0x7fff_ffff;
                on_frame(Frame { kind: self.head[3], flags: self.head[4], stream, start: &self.capture });
                self.have = 0;
            }
        }
    }
}

/// Merges each run of DATA frames of one stream in `buf`, from `start` (a
/// frame boundary) on, into one frame of at most [`MERGED_FRAME_MAX`]
/// payload bytes, END_STREAM on the last; a frame cut off by the end of
/// `buf` stays as it is, as do padded frames and every other kind. Returns
/// the length of what is left in `buf`.
fn merge_data_frames(buf: &mut [u8], start: usize) -> usize {
    let len = buf.len();
    let (mut read, mut write) = (start, start);
    // The DATA frame being added to: its header's place in the output, its
    // stream and its payload length.
    let mut open: Option<(usize, u32, usize)> = None;
    while read + 9 <= len {
        let size = u32::from_be_bytes([0, buf[read], buf[read + 1], buf[read + 2]]) as usize;
        let end = read + 9 + size;
        if end > len {
            break;
        }
        let (kind, flags) = (buf[read + 3], buf[read + 4]);
        let stream = u32::from_be_bytes([buf[read + 5], buf[read + 6], buf[read + 7], buf[read + 8]]) & 0x7fff_ffff;
        let plain = kind == DATA && flags & PADDED == 0 && stream != 0;
        match open {
            Some((at, on, so_far)) if plain && on == stream && so_far + size <= MERGED_FRAME_MAX => {
                buf.copy_within(read + 9..end, write);
                write += size;
                let merged = so_far + size;
                buf[at..at + 3].copy_from_slice(&(merged as u32).to_be_bytes()[1..]);
                buf[at + 4] |= flags & END_STREAM;
                open = (flags & END_STREAM == 0).then_some((at, on, merged));
            }
            _ => {
                if write != read {
                    buf.copy_within(read..end, write);
                }
                open = (plain && flags & END_STREAM == 0).then_some((write, stream, size));
                write += end - read;
            }
        }
        read = end;
    }
    if write != read {
        buf.copy_within(read..len, write);
    }
    write + (len - read)
}

/// The name a GOAWAY is counted under: its debug data when it is a short
/// word (h2's `too_many_resets` and the like), else its error's name.
fn goaway_reason(code: u32, debug: &[u8]) -> String {
    let word = std::str::from_utf8(debug)
        .ok()
        .filter(|d| !d.is_empty() && d.len() <= 48 && d.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
    if let Some(word) = word {
        return word.to_owned();
    }
    let name = match code {
        0x1 => "protocol_error",
        0x2 => "internal_error",
        0x3 => "flow_control_error",
        0x4 => "settings_timeout",
        0x6 => "frame_size_error",
        0x9 => "compression_error",
        0xb => "enhance_your_calm",
        _ => return format!("error_{code}"),
    };
    name.to_owned()
}

/// `inner`, watched: see the module.
pub struct FrameGuard<S> {
    inner: S,
    peer: Option<SocketAddr>,
    limits: GuardLimits,
    incoming: Scanner,
    outgoing: Scanner,
    tokens: f64,
    refilled: Instant,
    last_stream: u32,
    /// The server has sent DATA or HEADERS since the client's last PING.
    earned_ping: bool,
    /// The stream of the last frame in, when it was a DATA frame a next one
    /// of that stream could be merged into.
    open_data: Option<u32>,
    logged: bool,
    /// A GOAWAY of ours still to write, and how much of it is written.
    goaway: Option<(Vec<u8>, usize)>,
    refused: bool,
}

impl<S> FrameGuard<S> {
    pub fn new(inner: S, peer: Option<SocketAddr>, limits: GuardLimits) -> Self {
        LazyLock::force(&REFUSALS);
        Self {
            inner,
            peer,
            limits,
            incoming: Scanner::new(true),
            outgoing: Scanner::new(false),
            tokens: f64::from(limits.control_frames_per_sec),
            refilled: Instant::now(),
            last_stream: 0,
            earned_ping: false,
            open_data: None,
            logged: false,
            goaway: None,
            refused: false,
        }
    }

    fn refusal(&mut self, reason: &str) {
        REFUSALS.get_or_create(&Reason { reason: reason.to_owned() }).inc();
        if !self.logged {
            self.logged = true;
            tracing::warn!(peer = ?self.peer, reason, "refusing an HTTP/2 client that broke the protocol or a limit");
        }
    }

    /// Takes a token for a control frame; false when the bucket is empty.
    fn admit_control_frame(&mut self) -> bool {
        let rate = f64::from(self.limits.control_frames_per_sec);
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.refilled).as_secs_f64() * rate).min(rate);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Scans what came in; whether a DATA frame in it follows one of the
    /// same stream that a merge could add it to (else a merge has nothing
    /// to do: many streams' unary requests in one read are not walked twice).
    fn scan_incoming(&mut self, data: &[u8]) -> bool {
        let mut flooded = false;
        let mut last_stream = self.last_stream;
        let mut earned = self.earned_ping;
        let mut control = 0u32;
        let mut mergeable = false;
        let mut open_data = self.open_data;
        self.incoming.feed(data, |frame| {
            let plain = frame.kind == DATA && frame.flags & PADDED == 0 && frame.stream != 0;
            mergeable |= plain && open_data == Some(frame.stream);
            open_data = (plain && frame.flags & END_STREAM == 0).then_some(frame.stream);
            // Acknowledgements count too: h2 logs a warning for every PING
            // ACK it did not ask for.
            if matches!(frame.kind, PING | SETTINGS) {
                if frame.kind == PING && frame.flags & ACK == 0 && earned {
                    earned = false;
                } else {
                    control += 1;
                }
            }
            if frame.kind == HEADERS && frame.stream > last_stream {
                last_stream = frame.stream;
            }
        });
        self.last_stream = last_stream;
        self.earned_ping = earned;
        self.open_data = open_data;
        for _ in 0..control {
            if !self.admit_control_frame() {
                flooded = true;
                break;
            }
        }
        if self.incoming.off {
            self.outgoing.off = true;
        }
        if flooded && !self.refused {
            self.refused = true;
            self.refusal("too_many_control_frames");
            let debug = b"too_many_control_frames";
            let mut payload = Vec::with_capacity(8 + debug.len());
            payload.extend_from_slice(&self.last_stream.to_be_bytes());
            payload.extend_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
            payload.extend_from_slice(debug);
            let mut goaway = (payload.len() as u32).to_be_bytes()[1..].to_vec();
            goaway.extend_from_slice(&[GOAWAY, 0, 0, 0, 0, 0]);
            goaway.extend_from_slice(&payload);
            self.goaway = Some((goaway, 0));
        }
        mergeable
    }

    fn scan_outgoing(&mut self, data: &[u8]) {
        let mut reasons = Vec::new();
        let mut earned = false;
        self.outgoing.feed(data, |frame| match frame.kind {
            DATA | HEADERS => earned = true,
            GOAWAY if frame.start.len() >= 8 => {
                let code = u32::from_be_bytes([frame.start[4], frame.start[5], frame.start[6], frame.start[7]]);
                if code != 0 {
                    reasons.push(goaway_reason(code, &frame.start[8..]));
                }
            }
            RST_STREAM if frame.start == REFUSED_STREAM.to_be_bytes() => reasons.push("refused_stream".to_owned()),
            _ => {}
        });
        self.earned_ping |= earned;
        for reason in reasons {
            self.refusal(&reason);
        }
    }
}

impl<S: AsyncWrite + Unpin> FrameGuard<S> {
    /// Writes what is left of our GOAWAY, between h2's frames; Ready once
    /// nothing of it is left.
    fn poll_goaway(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.outgoing.between_frames() {
            return Poll::Ready(Ok(()));
        }
        while let Some((bytes, written)) = self.goaway.as_mut() {
            if *written == bytes.len() {
                self.goaway = None;
                break;
            }
            let n = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }

    /// Before h2's next write: what is left of our GOAWAY goes first, and a
    /// refused connection takes no more once it is out.
    fn poll_writable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.goaway.is_some() {
            std::task::ready!(self.poll_goaway(cx))?;
        }
        if self.refused && self.goaway.is_none() {
            return Poll::Ready(Err(Self::refused_error()));
        }
        Poll::Ready(Ok(()))
    }

    fn refused_error() -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionAborted, "HTTP/2 client refused: too many control frames")
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for FrameGuard<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.refused {
            // Best effort: the GOAWAY goes out if the socket takes it now.
            let _ = this.poll_goaway(cx);
            return Poll::Ready(Err(Self::refused_error()));
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if !this.incoming.off {
            let first = this.incoming.next_frame_at(&buf.filled()[before..]);
            let mergeable = this.scan_incoming(&buf.filled()[before..]);
            if let Some(first) = first.filter(|_| mergeable && !this.incoming.off) {
                let kept = merge_data_frames(&mut buf.filled_mut()[before..], first);
                buf.set_filled(before + kept);
            }
            if this.refused {
                let _ = this.poll_goaway(cx);
                return Poll::Ready(Err(Self::refused_error()));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameGuard<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        std::task::ready!(this.poll_writable(cx))?;
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, data))?;
        if !this.outgoing.off {
            this.scan_outgoing(&data[..n]);
        }
        Poll::Ready(Ok(n))
    }

    /// Vectored, as the socket is: without it hyper copies every response's
    /// frames into one buffer first (the "flatten" write strategy).
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        std::task::ready!(this.poll_writable(cx))?;
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for buf in bufs {
            if left == 0 || this.outgoing.off {
                break;
            }
            let take = left.min(buf.len());
            this.scan_outgoing(&buf[..take]);
            left -= take;
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.goaway.is_some() {
            let _ = std::task::ready!(self.poll_goaway(cx));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for FrameGuard<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn frames_are_found_however_the_bytes_are_split() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 0, 0, &[0, 4, 0, 0, 0xff, 0xff]));
        bytes.extend(frame(HEADERS, 0x4, 1, &[0x82; 20]));
        let mut goaway = vec![0, 0, 0, 1, 0, 0, 0, 0xb];
        goaway.extend_from_slice(b"too_many_resets");
        bytes.extend(frame(GOAWAY, 0, 0, &goaway));
        for split in [1, 2, 7, 9, 10, 33, bytes.len()] {
            let mut scanner = Scanner::new(true);
            let mut seen = Vec::new();
            for chunk in bytes.chunks(split) {
                scanner.feed(chunk, |f| seen.push((f.kind, f.stream, f.start.to_vec())));
            }
            assert_eq!(seen.len(), 3, "split {split}");
            assert_eq!((seen[1].0, seen[1].1), (HEADERS, 1));
            assert_eq!(goaway_reason(0xb, &seen[2].2[8..]), "too_many_resets");
            assert!(scanner.between_frames());
        }
    }

    /// The frames in `bytes`: (kind, flags, stream, payload).
    fn parse(mut bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut frames = Vec::new();
        while bytes.len() >= 9 {
            let size = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
            let stream = u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]);
            frames.push((bytes[3], bytes[4], stream, bytes[9..9 + size].to_vec()));
            bytes = &bytes[9 + size..];
        }
        assert!(bytes.is_empty(), "a frame cut off");
        frames
    }

    #[test]
    fn runs_of_data_frames_of_one_stream_become_one_frame() {
        let mut padded = vec![2u8];
        padded.extend_from_slice(b"pq\0\0");
        let frames = [
            frame(DATA, 0, 1, b"ab"),
            frame(DATA, 0, 1, b"cd"),
            frame(DATA, END_STREAM, 1, b"e"),
            frame(HEADERS, 0x4, 3, &[0x82]),
            frame(DATA, 0, 3, b"x"),
            frame(DATA, PADDED, 3, &padded),
            frame(DATA, 0, 3, b"y"),
            frame(DATA, 0, 5, b"z"),
            frame(DATA, 0, 3, b"w"),
            frame(DATA, 0, 0, b"on stream 0"),
            frame(DATA, 0, 0, b"as it came"),
        ];
        let mut buf = frames.concat();
        let kept = merge_data_frames(&mut buf, 0);
        let merged = parse(&buf[..kept]);
        let expected = vec![
            (DATA, END_STREAM, 1, b"abcde".to_vec()),
            (HEADERS, 0x4, 3, vec![0x82]),
            (DATA, 0, 3, b"x".to_vec()),
            (DATA, PADDED, 3, padded.clone()),
            (DATA, 0, 3, b"y".to_vec()),
            (DATA, 0, 5, b"z".to_vec()),
            (DATA, 0, 3, b"w".to_vec()),
            (DATA, 0, 0, b"on stream 0".to_vec()),
            (DATA, 0, 0, b"as it came".to_vec()),
        ];
        assert_eq!(merged, expected);

        // Never past 16 KiB, and a frame cut off at the end stays as it came.
        let mut buf =
            [frame(DATA, 0, 7, &[1; 8_000]), frame(DATA, 0, 7, &[2; 8_000]), frame(DATA, 0, 7, &[3; 8_000])].concat();
        let cut = frame(DATA, 0, 7, b"tail");
        buf.extend_from_slice(&cut[..11]);
        let kept = merge_data_frames(&mut buf, 0);
        assert_eq!(&buf[kept - 11..kept], &cut[..11]);
        let sizes: Vec<usize> = parse(&buf[..kept - 11]).iter().map(|f| f.3.len()).collect();
        assert_eq!(sizes, [16_000, 8_000]);
    }

    #[tokio::test]
    async fn small_data_frames_read_through_the_guard_arrive_whole_however_the_bytes_are_split() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A client streaming 2,000 small messages on stream 1, one DATA frame
        // each, a PING between, a second stream, then the end.
        let mut sent = PREFACE.to_vec();
        sent.extend(frame(SETTINGS, 0, 0, &[]));
        sent.extend(frame(HEADERS, 0x4, 1, &[0x83]));
        for i in 0..2_000u32 {
            sent.extend(frame(DATA, 0, 1, &[0, 0, 0, 0, 3, 0x0a, 0x01, (i % 251) as u8]));
            if i == 1_000 {
                sent.extend(frame(PING, 0, 0, &[0; 8]));
                sent.extend(frame(HEADERS, 0x4, 3, &[0x83]));
                sent.extend(frame(DATA, END_STREAM, 3, b"other"));
            }
        }
        sent.extend(frame(DATA, END_STREAM, 1, &[]));
        let payload = |frames: &[(u8, u8, u32, Vec<u8>)], stream: u32| -> Vec<u8> {
            frames.iter().filter(|f| f.0 == DATA && f.2 == stream).flat_map(|f| f.3.clone()).collect()
        };
        let original = parse(&sent[PREFACE.len()..]);
        for split in [1, 9, 10, 100, 4_096, sent.len()] {
            let (client, server) = tokio::io::duplex(sent.len() + 1);
            let mut guard = FrameGuard::new(server, None, GuardLimits { control_frames_per_sec: 100 });
            let mut client = client;
            let mut received = Vec::new();
            for chunk in sent.chunks(split) {
                client.write_all(chunk).await.unwrap();
                // One read takes the whole chunk (merging makes it shorter).
                let mut buf = vec![0u8; 64 * 1024];
                let n = guard.read(&mut buf).await.unwrap();
                received.extend_from_slice(&buf[..n]);
            }
            assert!(received.starts_with(PREFACE));
            let frames = parse(&received[PREFACE.len()..]);
            for stream in [1, 3] {
                assert_eq!(payload(&frames, stream), payload(&original, stream), "split {split}, stream {stream}");
            }
            let ends = |fs: &[(u8, u8, u32, Vec<u8>)]| -> Vec<u32> {
                fs.iter().filter(|f| f.0 == DATA && f.1 & END_STREAM != 0).map(|f| f.2).collect()
            };
            assert_eq!(ends(&frames), ends(&original), "split {split}");
            assert_eq!(frames.iter().filter(|f| f.0 == PING).count(), 1, "split {split}");
            assert!(frames.iter().all(|f| f.3.len() <= MERGED_FRAME_MAX));
            let data = frames.iter().filter(|f| f.0 == DATA).count();
            if split >= 4_096 {
                assert!(data < 100, "split {split}: {data} DATA frames of 2,002 left");
            }
        }
    }

    #[test]
    fn a_connection_that_is_not_http2_is_left_alone() {
        let mut scanner = Scanner::new(true);
        let mut frames = 0;
        scanner.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", |_| frames += 1);
        assert!(scanner.off);
        assert_eq!(frames, 0);
    }

    #[test]
    fn goaways_are_named_by_their_debug_word_or_their_code() {
        assert_eq!(goaway_reason(0xb, b"too_many_continuations"), "too_many_continuations");
        assert_eq!(goaway_reason(0x1, b""), "protocol_error");
        assert_eq!(goaway_reason(0x9, b"Some Sentence."), "compression_error");
        assert_eq!(goaway_reason(0x42, b""), "error_66");
    }

    #[test]
    fn a_ping_after_data_from_the_server_is_free_and_a_flood_is_not() {
        let mut guard = FrameGuard::new((), None, GuardLimits { control_frames_per_sec: 10 });
        let mut preface = PREFACE.to_vec();
        preface.extend(frame(SETTINGS, 0, 0, &[]));
        guard.scan_incoming(&preface);
        // One PING per DATA the server sends, far past the rate: all free.
        for _ in 0..100 {
            guard.scan_outgoing(&frame(DATA, 0, 1, &[0; 100]));
            guard.scan_incoming(&frame(PING, 0, 0, &[0; 8]));
        }
        assert!(!guard.refused);
        // PINGs with nothing sent in between: refused once the bucket is empty.
        for _ in 0..20 {
            guard.scan_incoming(&frame(PING, 0, 0, &[0; 8]));
        }
        assert!(guard.refused);
        let goaway = guard.goaway.as_ref().map(|(bytes, _)| bytes.clone()).unwrap_or_default();
        assert_eq!(goaway[3], GOAWAY);
        assert!(goaway.ends_with(b"too_many_control_frames"));
    }

    /// A writer that takes at most `cap` bytes a call, across slices.
    struct Capped {
        written: Vec<u8>,
        cap: usize,
    }

    impl AsyncWrite for Capped {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
            let n = data.len().min(self.cap);
            self.written.extend_from_slice(&data[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(self.cap - n);
                self.written.extend_from_slice(&buf[..take]);
                n += take;
                if n == self.cap {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn vectored_writes_pass_through_and_are_scanned_as_far_as_they_went() {
        use tokio::io::AsyncWriteExt;
        let mut guard =
            FrameGuard::new(Capped { written: Vec::new(), cap: 7 }, None, GuardLimits { control_frames_per_sec: 100 });
        assert!(guard.is_write_vectored());
        let data = frame(DATA, 0, 1, &[1; 10]);
        let goaway = frame(GOAWAY, 0, 0, &[0, 0, 0, 1, 0, 0, 0, 0xb, b'x']);
        let rst = frame(RST_STREAM, 0, 3, &REFUSED_STREAM.to_be_bytes());
        let mut slices: Vec<&[u8]> = vec![&data, &goaway, &rst];
        let mut sent = 0;
        while !slices.is_empty() {
            let bufs: Vec<io::IoSlice<'_>> = slices.iter().map(|s| io::IoSlice::new(s)).collect();
            let mut n = guard.write_vectored(&bufs).await.unwrap();
            sent += n;
            while n > 0 {
                let take = n.min(slices[0].len());
                slices[0] = &slices[0][take..];
                if slices[0].is_empty() {
                    slices.remove(0);
                }
                n -= take;
            }
        }
        assert_eq!(sent, data.len() + goaway.len() + rst.len());
        assert_eq!(guard.inner.written, [data, goaway, rst].concat());
        // The scanner saw every frame whole, however the writes split them:
        // the DATA, and the GOAWAY and refused stream it reports.
        assert!(guard.earned_ping);
        assert!(guard.logged, "the GOAWAY and the refused stream were seen");
        assert!(guard.outgoing.between_frames());
    }

    #[test]
    fn the_control_frame_bucket_refills_at_its_rate() {
        let mut guard = FrameGuard::new((), None, GuardLimits { control_frames_per_sec: 10 });
        assert_eq!((0..20).filter(|_| guard.admit_control_frame()).count(), 10);
        guard.refilled -= std::time::Duration::from_millis(500);
        assert_eq!((0..20).filter(|_| guard.admit_control_frame()).count(), 5);
    }
}
