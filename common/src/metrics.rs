//! Prometheus metrics of a meshkit process, served as text (format 0.0.4)
//! at the admin endpoint's `/metrics`.
//!
//! RED per method on both sides of every call: `meshkit_server_*` recorded
//! by the server builder's layer, `meshkit_client_*` by every balanced
//! channel (one logical call, retries included), each a request counter by
//! gRPC status code and a latency histogram. The status is read where gRPC
//! puts it: the response headers of a trailers-only answer, else the
//! trailers at the end of the body; a body that ends without them counts as
//! `UNKNOWN`, one dropped by the caller as `CANCELLED`. Gauges that describe
//! state (pools, endpoints) are read at scrape time.

use std::{
    collections::HashMap,
    fmt::Write,
    pin::Pin,
    sync::{
        Arc, LazyLock, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Instant,
};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// Latency buckets in seconds, from 250 µs to 10 s.
const BUCKETS: &[f64] =
    &[0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// A counter family with fixed label names.
pub struct CounterVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    values: RwLock<HashMap<Vec<String>, Arc<AtomicU64>>>,
}

/// A histogram family with fixed label names and [`BUCKETS`].
pub struct HistogramVec {
    name: &'static str,
    help: &'static str,
    labels: &'static [&'static str],
    values: RwLock<HashMap<Vec<String>, Arc<Histogram>>>,
}

#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; 15],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

pub static SERVER_REQUESTS: LazyLock<CounterVec> = LazyLock::new(|| {
    CounterVec::new(
        "meshkit_server_requests_total",
        "Calls served, by method and gRPC status code.",
        &["method", "code"],
    )
});
pub static SERVER_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    HistogramVec::new(
        "meshkit_server_request_duration_seconds",
        "Time from a call's headers to its trailers, on the server.",
        &["method"],
    )
});
pub static CLIENT_REQUESTS: LazyLock<CounterVec> = LazyLock::new(|| {
    CounterVec::new(
        "meshkit_client_requests_total",
        "Calls made through balanced channels (retries included in one call), by service, method and gRPC status code.",
        &["service", "method", "code"],
    )
});
pub static CLIENT_LATENCY: LazyLock<HistogramVec> = LazyLock::new(|| {
    HistogramVec::new(
        "meshkit_client_request_duration_seconds",
        "Time from a call through a balanced channel to its trailers.",
        &["service", "method"],
    )
});

impl CounterVec {
    pub fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        Self { name, help, labels, values: RwLock::new(HashMap::new()) }
    }

    /// The counter for `values` (one per label name).
    pub fn with(&self, values: &[&str]) -> Arc<AtomicU64> {
        get_or_insert(&self.values, values)
    }

    pub fn inc(&self, values: &[&str]) {
        self.with(values).fetch_add(1, Ordering::Relaxed);
    }

    /// The current value for `values`, 0 if never counted.
    pub fn get(&self, values: &[&str]) -> u64 {
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        self.values.read().unwrap_or_else(|p| p.into_inner()).get(&key).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn encode(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} counter", self.name, self.help, self.name);
        for (values, counter) in sorted(&self.values) {
            let _ = writeln!(
                out,
                "{}{} {}",
                self.name,
                labels(self.labels, &values, None),
                counter.load(Ordering::Relaxed)
            );
        }
    }
}

impl HistogramVec {
    pub fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Self {
        Self { name, help, labels, values: RwLock::new(HashMap::new()) }
    }

    pub fn with(&self, values: &[&str]) -> Arc<Histogram> {
        get_or_insert(&self.values, values)
    }

    fn encode(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP {} {}\n# TYPE {} histogram", self.name, self.help, self.name);
        for (values, h) in sorted(&self.values) {
            let mut cumulative = 0;
            for (i, le) in BUCKETS.iter().enumerate() {
                cumulative += h.buckets[i].load(Ordering::Relaxed);
                let le = format!("{le}");
                let _ = writeln!(out, "{}_bucket{} {cumulative}", self.name, labels(self.labels, &values, Some(&le)));
            }
            let count = h.count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{}_bucket{} {count}", self.name, labels(self.labels, &values, Some("+Inf")));
            let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let _ = writeln!(out, "{}_sum{} {sum}", self.name, labels(self.labels, &values, None));
            let _ = writeln!(out, "{}_count{} {count}", self.name, labels(self.labels, &values, None));
        }
    }
}

impl Histogram {
    pub fn observe(&self, seconds: f64) {
        if let Some(i) = BUCKETS.iter().position(|le| seconds <= *le) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

fn get_or_insert<T: Default>(map: &RwLock<HashMap<Vec<String>, Arc<T>>>, values: &[&str]) -> Arc<T> {
    {
        let read = map.read().unwrap_or_else(|p| p.into_inner());
        // Look up without allocating a key on the hot path.
        if let Some((_, v)) =
            read.iter().find(|(k, _)| k.len() == values.len() && k.iter().zip(values).all(|(a, b)| a == b))
        {
            return v.clone();
        }
    }
    let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
    map.write().unwrap_or_else(|p| p.into_inner()).entry(key).or_default().clone()
}

fn sorted<T>(map: &RwLock<HashMap<Vec<String>, Arc<T>>>) -> Vec<(Vec<String>, Arc<T>)> {
    let mut entries: Vec<_> =
        map.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    entries
}

/// `{a="x",b="y"}` with Prometheus escaping, plus `le` for buckets.
pub fn labels(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut out = String::from("{");
    let pairs = names.iter().zip(values.iter().map(String::as_str)).chain(le.map(|le| (&"le", le)));
    for (i, (name, value)) in pairs.enumerate() {
        if i > 0 {
            out.push(',');
        }
        let escaped = value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        let _ = write!(out, "{name}=\"{escaped}\"");
    }
    out.push('}');
    if out == "{}" { String::new() } else { out }
}

/// Every family of this process, as Prometheus text.
pub fn encode(out: &mut String) {
    SERVER_REQUESTS.encode(out);
    SERVER_LATENCY.encode(out);
    CLIENT_REQUESTS.encode(out);
    CLIENT_LATENCY.encode(out);
}

/// The name of a gRPC status code as metrics label it.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The gRPC status in `headers`, if they carry one.
pub fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    headers.get("grpc-status").map(|v| {
        v.to_str().ok().and_then(|s| s.parse::<i32>().ok()).map_or(tonic::Code::Unknown, tonic::Code::from_i32)
    })
}

/// Where one call's outcome is recorded, once.
pub struct CallRecord {
    started: Instant,
    requests: Arc<MethodCounters>,
    latency: Arc<Histogram>,
}

/// The counters of one method, one per code, looked up once per call.
pub struct MethodCounters {
    family: &'static CounterVec,
    prefix: Vec<String>,
}

impl CallRecord {
    /// A server-side call of `method` (`/package.Service/Method`).
    pub fn server(method: &str) -> Self {
        Self {
            started: Instant::now(),
            requests: Arc::new(MethodCounters { family: &SERVER_REQUESTS, prefix: vec![method.to_owned()] }),
            latency: SERVER_LATENCY.with(&[method]),
        }
    }

    /// A call of `method` through a balanced channel to `service`.
    pub fn client(service: &str, method: &str) -> Self {
        Self {
            started: Instant::now(),
            requests: Arc::new(MethodCounters {
                family: &CLIENT_REQUESTS,
                prefix: vec![service.to_owned(), method.to_owned()],
            }),
            latency: CLIENT_LATENCY.with(&[service, method]),
        }
    }

    pub fn finish(self, code: tonic::Code) {
        self.latency.observe(self.started.elapsed().as_secs_f64());
        let mut values: Vec<&str> = self.requests.prefix.iter().map(String::as_str).collect();
        values.push(code_name(code));
        self.requests.family.inc(&values);
    }
}

pin_project! {
    /// A response body that records its call's status when the trailers
    /// arrive (or the body fails, ends without them, or is dropped).
    pub struct ObservedBody<B> {
        #[pin]
        inner: B,
        record: Option<CallRecord>,
    }

    impl<B> PinnedDrop for ObservedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(record) = this.project().record.take() {
                record.finish(tonic::Code::Cancelled);
            }
        }
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for ObservedBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObservedBody").field("inner", &self.inner).field("pending", &self.record.is_some()).finish()
    }
}

impl<B> ObservedBody<B> {
    /// Wraps `inner`; a status already in the response headers (a
    /// trailers-only answer) is recorded at once.
    pub fn new(inner: B, record: CallRecord, headers: &http::HeaderMap) -> Self {
        match status_of(headers) {
            Some(code) => {
                record.finish(code);
                Self { inner, record: None }
            }
            None => Self { inner, record: Some(record) },
        }
    }
}

impl<B: Body> Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let code = match &frame {
            Some(Ok(f)) => f.trailers_ref().map(|t| status_of(t).unwrap_or(tonic::Code::Unknown)),
            Some(Err(_)) => Some(tonic::Code::Unavailable),
            None => Some(tonic::Code::Unknown),
        };
        if let Some(code) = code {
            if let Some(record) = this.record.take() {
                record.finish(code);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format() {
        let c = CounterVec::new("t_total", "help", &["method", "code"]);
        c.inc(&["/a.B/C", "OK"]);
        c.inc(&["/a.B/C", "OK"]);
        c.inc(&["/a.B/\"x\"", "NOT_FOUND"]);
        let mut out = String::new();
        c.encode(&mut out);
        assert!(out.contains("# TYPE t_total counter"), "{out}");
        assert!(out.contains("t_total{method=\"/a.B/C\",code=\"OK\"} 2"), "{out}");
        assert!(out.contains("method=\"/a.B/\\\"x\\\"\""), "{out}");
        let h = HistogramVec::new("t_seconds", "help", &["method"]);
        h.with(&["m"]).observe(0.003);
        h.with(&["m"]).observe(20.0);
        let mut out = String::new();
        h.encode(&mut out);
        assert!(out.contains("t_seconds_bucket{method=\"m\",le=\"0.0025\"} 0"), "{out}");
        assert!(out.contains("t_seconds_bucket{method=\"m\",le=\"0.005\"} 1"), "{out}");
        assert!(out.contains("t_seconds_bucket{method=\"m\",le=\"10\"} 1"), "{out}");
        assert!(out.contains("t_seconds_bucket{method=\"m\",le=\"+Inf\"} 2"), "{out}");
        assert!(out.contains("t_seconds_count{method=\"m\"} 2"), "{out}");
    }
}
