//! Prometheus metrics of a meshkit process, served as text (format 0.0.4,
//! encoded by `prometheus-client`) at the admin endpoint's `/metrics`, or as
//! OpenMetrics 1.0 to a scraper that asks for it, with exemplars.
//!
//! RED per method on both sides of every call: `meshkit_server_*` recorded
//! by the server builder's layer, `meshkit_client_*` by every balanced
//! channel (one logical call, retries included), each a request counter by
//! gRPC status code and a latency histogram. The status is read where gRPC
//! puts it: the response headers of a trailers-only answer, else the
//! trailers at the end of the body; a body that ends without them counts as
//! `UNKNOWN`, one dropped by the caller as `CANCELLED`. The calls never touch
//! the registry: a [`Collector`] reads their atomics when scraped.
//!
//! Exemplars: when the process exports traces, each latency bucket keeps
//! the trace id of a call that fell in it, taken at most once a second per
//! bucket (an atomic load per call otherwise), so a slow point on a chart
//! leads to a trace of a slow call. OpenMetrics carries them; Prometheus's
//! text format has no place for them.
//!
//! Every other family is typed and sits beside the code it counts: counters
//! as `LazyLock` statics made with [`counters`] (label sets are structs
//! deriving `EncodeLabelSet`, so a misspelt label does not compile), and
//! state read at scrape time (pools, queues, lag) as a [`Source`] that fills
//! a [`Scrape`].

use std::{
    collections::HashMap,
    hash::Hash,
    pin::Pin,
    sync::{
        Arc, LazyLock, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Instant,
};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet, prometheus_text},
    metrics::{MetricType, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Latency buckets in seconds, from 250 µs to 10 s.
const BUCKETS: [f64; 15] =
    [0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Distinct methods kept per side before further ones are counted as
/// `other`: a client sending made-up paths cannot grow the registry.
const MAX_METHODS: usize = 1_000;

/// What is counted for one method: calls by status code, and latency.
#[derive(Debug, Default)]
pub struct MethodMetrics {
    codes: [AtomicU64; 17],
    buckets: [AtomicU64; 15],
    count: AtomicU64,
    sum_nanos: AtomicU64,
    /// Per bucket (the last is +Inf): when its exemplar was last taken, in
    /// ms after [`EPOCH`] (0: never).
    exemplar_at: [AtomicU64; 16],
    exemplars: Mutex<[Option<Exemplar>; 16]>,
}

/// A traced call that fell in a bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct Exemplar {
    /// 32 hex digits.
    pub trace_id: String,
    pub seconds: f64,
    /// When, in ms since the Unix epoch.
    pub unix_ms: u64,
}

/// The process's clock origin for exemplar pacing.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// At most one exemplar per bucket per this many ms.
const EXEMPLAR_EVERY_MS: u64 = 1_000;

impl MethodMetrics {
    #[cfg(test)]
    fn observe(&self, seconds: f64, code: tonic::Code) {
        self.observe_traced(seconds, code, Instant::now(), || None);
    }

    /// Counts a call; `trace` gives its trace id when an exemplar of its
    /// bucket is due (at most once a second per bucket).
    fn observe_traced(&self, seconds: f64, code: tonic::Code, now: Instant, trace: impl FnOnce() -> Option<String>) {
        let i = BUCKETS.iter().position(|le| seconds <= *le);
        if let Some(i) = i {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos.fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
        self.codes[(code as usize).min(16)].fetch_add(1, Ordering::Relaxed);
        let slot = i.unwrap_or(BUCKETS.len());
        let now_ms = (now.saturating_duration_since(*EPOCH).as_millis() as u64).max(1);
        let last = self.exemplar_at[slot].load(Ordering::Relaxed);
        if last != 0 && now_ms < last + EXEMPLAR_EVERY_MS {
            return;
        }
        if self.exemplar_at[slot].compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return;
        }
        if let Some(trace_id) = trace() {
            let unix_ms =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            let mut held = self.exemplars.lock().unwrap_or_else(|p| p.into_inner());
            held[slot] = Some(Exemplar { trace_id, seconds, unix_ms });
        }
    }

    /// Each bucket's latest exemplar (the last is +Inf).
    pub fn exemplars(&self) -> [Option<Exemplar>; 16] {
        self.exemplars.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Calls that ended with `code`.
    pub fn calls(&self, code: tonic::Code) -> u64 {
        self.codes[(code as usize).min(16)].load(Ordering::Relaxed)
    }
}

/// Looked up on every call: a fast hasher (the maps are capped at
/// `MAX_METHODS` entries, so crafted paths cannot grow them).
type FastMap<V> = HashMap<String, V, foldhash::fast::RandomState>;
type Methods = FastMap<Arc<MethodMetrics>>;

static SERVER: LazyLock<RwLock<Methods>> = LazyLock::new(RwLock::default);
static CLIENT: LazyLock<RwLock<FastMap<Methods>>> = LazyLock::new(RwLock::default);

/// The server-side metrics of `method`.
pub fn server_method(method: &str) -> Arc<MethodMetrics> {
    if let Some(m) = SERVER.read().unwrap_or_else(|p| p.into_inner()).get(method) {
        return m.clone();
    }
    let mut map = SERVER.write().unwrap_or_else(|p| p.into_inner());
    let key = if map.len() >= MAX_METHODS { "other" } else { method };
    map.entry(key.to_owned()).or_default().clone()
}

/// The client-side metrics of `method` on `service`.
pub fn client_method(service: &str, method: &str) -> Arc<MethodMetrics> {
    if let Some(m) = CLIENT.read().unwrap_or_else(|p| p.into_inner()).get(service).and_then(|s| s.get(method)) {
        return m.clone();
    }
    let mut map = CLIENT.write().unwrap_or_else(|p| p.into_inner());
    let total: usize = map.values().map(HashMap::len).sum();
    let key = if total >= MAX_METHODS { "other" } else { method };
    map.entry(service.to_owned()).or_default().entry(key.to_owned()).or_default().clone()
}

const CODES: [tonic::Code; 17] = [
    tonic::Code::Ok,
    tonic::Code::Cancelled,
    tonic::Code::Unknown,
    tonic::Code::InvalidArgument,
    tonic::Code::DeadlineExceeded,
    tonic::Code::NotFound,
    tonic::Code::AlreadyExists,
    tonic::Code::PermissionDenied,
    tonic::Code::ResourceExhausted,
    tonic::Code::FailedPrecondition,
    tonic::Code::Aborted,
    tonic::Code::OutOfRange,
    tonic::Code::Unimplemented,
    tonic::Code::Internal,
    tonic::Code::Unavailable,
    tonic::Code::DataLoss,
    tonic::Code::Unauthenticated,
];

/// The RED families of both sides, encoded from the atomics above when
/// scraped (the calls themselves never touch the registry).
#[derive(Debug)]
struct Calls;

type Rows = Vec<(Vec<String>, Arc<MethodMetrics>)>;

/// Both sides' methods, sorted: the server's by method, the client's by
/// service and method.
fn rows() -> (Rows, Rows) {
    let mut server: Rows =
        SERVER.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (vec![k.clone()], v.clone())).collect();
    server.sort_by(|a, b| a.0.cmp(&b.0));
    let mut client: Rows = CLIENT
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .flat_map(|(service, methods)| methods.iter().map(move |(m, v)| (vec![service.clone(), m.clone()], v.clone())))
        .collect();
    client.sort_by(|a, b| a.0.cmp(&b.0));
    (server, client)
}

const SERVER_HELP: [&str; 2] =
    ["Calls served, by method and gRPC status code.", "Time from a call's headers to its trailers, on the server."];
const CLIENT_HELP: [&str; 2] = [
    "Calls made through balanced channels (retries included in one call), by service, method and gRPC status code.",
    "Time from a call through a balanced channel to its trailers.",
];

impl Collector for Calls {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        let (server, client) = rows();
        encode_side(&mut encoder, "meshkit_server", SERVER_HELP, &server, &["method"])?;
        encode_side(&mut encoder, "meshkit_client", CLIENT_HELP, &client, &["service", "method"])
    }
}

/// One side's families in OpenMetrics, written out here because
/// `prometheus-client` builds exemplars only from its own histograms.
fn write_side_openmetrics(out: &mut String, prefix: &str, help: [&str; 2], rows: &Rows, names: &[&str]) {
    use std::fmt::Write as _;
    let labels = |values: &[String], extra: Option<(&str, &str)>| {
        let mut text = String::from("{");
        let pairs = names.iter().copied().zip(values.iter().map(String::as_str)).chain(extra);
        for (i, (k, v)) in pairs.enumerate() {
            if i > 0 {
                text.push(',');
            }
            let _ = write!(text, "{k}=\"{}\"", escape_label(v));
        }
        text.push('}');
        text
    };
    let _ = writeln!(out, "# HELP {prefix}_requests {}\n# TYPE {prefix}_requests counter", help_text(help[0]));
    for (values, m) in rows {
        for code in CODES {
            let n = m.calls(code);
            if n > 0 {
                let _ = writeln!(out, "{prefix}_requests_total{} {n}", labels(values, Some(("code", code_name(code)))));
            }
        }
    }
    let hist = format!("{prefix}_request_duration_seconds");
    let _ = writeln!(out, "# HELP {hist} {}\n# TYPE {hist} histogram", help_text(help[1]));
    for (values, m) in rows {
        let exemplars = m.exemplars();
        let count = m.count.load(Ordering::Relaxed);
        let mut cumulative = 0;
        let bounds = BUCKETS.iter().map(|b| b.to_string()).chain(std::iter::once("+Inf".to_owned()));
        for (i, le) in bounds.enumerate() {
            cumulative = if i < BUCKETS.len() { cumulative + m.buckets[i].load(Ordering::Relaxed) } else { count };
            let _ = write!(out, "{hist}_bucket{} {cumulative}", labels(values, Some(("le", &le))));
            if let Some(e) = &exemplars[i] {
                let _ = write!(
                    out,
                    " # {{trace_id=\"{}\"}} {} {}.{:03}",
                    e.trace_id,
                    e.seconds,
                    e.unix_ms / 1000,
                    e.unix_ms % 1000
                );
            }
            out.push('\n');
        }
        let sum = m.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{hist}_sum{} {sum}\n{hist}_count{} {count}", labels(values, None), labels(values, None));
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// One side's families: `{prefix}_requests_total` by the row's labels and
/// `code`, and `{prefix}_request_duration_seconds` by the row's labels.
fn encode_side(
    encoder: &mut DescriptorEncoder<'_>,
    prefix: &str,
    help: [&str; 2],
    rows: &[(Vec<String>, Arc<MethodMetrics>)],
    names: &[&'static str],
) -> std::fmt::Result {
    let total = format!("{prefix}_requests");
    let mut family = encoder.encode_descriptor(&total, help[0], None, MetricType::Counter)?;
    for (values, m) in rows {
        for code in CODES {
            let n = m.calls(code);
            if n > 0 {
                let mut labels: Vec<(&str, &str)> =
                    names.iter().copied().zip(values.iter().map(String::as_str)).collect();
                labels.push(("code", code_name(code)));
                family.encode_family(&labels)?.encode_counter::<NoLabelSet, u64, u64>(&n, None)?;
            }
        }
    }
    let hist = format!("{prefix}_request_duration_seconds");
    let mut family = encoder.encode_descriptor(&hist, help[1], None, MetricType::Histogram)?;
    for (values, m) in rows {
        // Per bucket (the encoder sums them), the calls above the last bound in +Inf.
        let mut buckets = [(0.0, 0u64); BUCKETS.len() + 1];
        let mut counted = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            let n = m.buckets[i].load(Ordering::Relaxed);
            buckets[i] = (*le, n);
            counted += n;
        }
        let count = m.count.load(Ordering::Relaxed);
        buckets[BUCKETS.len()] = (f64::INFINITY, count.saturating_sub(counted));
        let sum = m.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let labels: Vec<(&str, &str)> = names.iter().copied().zip(values.iter().map(String::as_str)).collect();
        family.encode_family(&labels)?.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

/// The calls' families, for the Prometheus text format.
static CALLS: LazyLock<Registry> = LazyLock::new(|| {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Calls));
    registry
});

/// The process's other families: every counter a component registers with
/// [`counters`] or [`counter`].
static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| Mutex::new(Registry::default()));

/// A counter family by label set `L`, in the process's registry. Call it
/// once, from the `LazyLock` static beside the code it counts; the family
/// shows from then on. `name` has no `_total`: the encoder adds it.
pub fn counters<L>(name: &str, help: &str) -> CounterFamily<L>
where
    L: EncodeLabelSet + Clone + Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
{
    let family = CounterFamily::<L>::default();
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner()).register(name, help_text(help), family.clone());
    family
}

/// An unlabelled counter in the process's registry; as [`counters`].
pub fn counter(name: &str, help: &str) -> Counter {
    let counter = Counter::default();
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner()).register(name, help_text(help), counter.clone());
    counter
}

/// The registry ends every help text with a full stop.
fn help_text(help: &str) -> &str {
    help.strip_suffix('.').unwrap_or(help)
}

/// Counters by label set `L`.
pub type CounterFamily<L> = Family<L, Counter>;

/// Gauges (of `f64`) by label set `L`.
pub type GaugeFamily<L> = Family<L, F64Gauge>;

/// A gauge of `f64`.
pub type F64Gauge = Gauge<f64, AtomicU64>;

/// Families a component computes when scraped (a queue's depth, a pool's
/// use): a registry filled for one `/metrics` answer.
#[derive(Debug, Default)]
pub struct Scrape {
    registry: Registry,
}

impl Scrape {
    /// A gauge family by label set `L`, shown in this scrape.
    pub fn gauges<L>(&mut self, name: &str, help: &str) -> GaugeFamily<L>
    where
        L: EncodeLabelSet + Clone + Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    {
        let family = GaugeFamily::<L>::default();
        self.registry.register(name, help_text(help), family.clone());
        family
    }

    /// An unlabelled gauge, shown in this scrape.
    pub fn gauge(&mut self, name: &str, help: &str) -> F64Gauge {
        let gauge = F64Gauge::default();
        self.registry.register(name, help_text(help), gauge.clone());
        gauge
    }

    /// A counter family by label set `L` whose values the component keeps
    /// itself (set them with `inc_by`); `name` has no `_total`.
    pub fn counters<L>(&mut self, name: &str, help: &str) -> CounterFamily<L>
    where
        L: EncodeLabelSet + Clone + Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    {
        let family = CounterFamily::<L>::default();
        self.registry.register(name, help_text(help), family.clone());
        family
    }

    /// An unlabelled counter whose value the component keeps itself.
    pub fn counter(&mut self, name: &str, help: &str) -> Counter {
        let counter = Counter::default();
        self.registry.register(name, help_text(help), counter.clone());
        counter
    }
}

/// What a component computes when scraped: called for every `/metrics`.
pub type Source = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Scrape> + Send>> + Send + Sync>;

/// A [`Source`] from an async closure.
pub fn source<F, Fut>(f: F) -> Source
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Scrape> + Send + 'static,
{
    Arc::new(move || Box::pin(f()))
}

/// The process's own figures for every `/metrics`: resident memory, open
/// descriptors and OS threads (Prometheus's standard names, read from
/// `/proc/self`, so on Linux only), and the tasks alive on the Tokio runtime
/// that serves the scrape, where a task leak shows first.
pub fn process_scrape() -> Scrape {
    let mut scrape = Scrape::default();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        };
        if let Some(kib) = field("VmRSS:") {
            scrape.gauge("process_resident_memory_bytes", "Resident memory size in bytes.").set(kib * 1024.0);
        }
        if let Some(threads) = field("Threads:") {
            scrape.gauge("process_threads", "OS threads of the process.").set(threads);
        }
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        scrape.gauge("process_open_fds", "Number of open file descriptors.").set(fds.count() as f64);
    }
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        scrape
            .gauge("meshkit_runtime_alive_tasks", "Tasks alive on the Tokio runtime: spawned and not yet finished.")
            .set(runtime.metrics().num_alive_tasks() as f64);
    }
    scrape
}

/// The `Content-Type` of [`encode`]'s text: Prometheus's text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The `Content-Type` of [`encode_openmetrics`]'s text.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether a scraper's `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: &str) -> bool {
    accept.contains("application/openmetrics-text")
}

/// Every family of this process, then those of `scrapes`, as OpenMetrics
/// text, with the latency histograms' exemplars.
pub fn encode_openmetrics(out: &mut String, scrapes: &[Scrape]) {
    let (server, client) = rows();
    write_side_openmetrics(out, "meshkit_server", SERVER_HELP, &server, &["method"]);
    write_side_openmetrics(out, "meshkit_client", CLIENT_HELP, &client, &["service", "method"]);
    {
        let registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = prometheus_client::encoding::text::encode_registry(out, &registry) {
            tracing::warn!(error = %e, "metrics: encoding the process's families failed");
        }
    }
    for scrape in scrapes {
        if let Err(e) = prometheus_client::encoding::text::encode_registry(out, &scrape.registry) {
            tracing::warn!(error = %e, "metrics: encoding a component's families failed");
        }
    }
    let _ = prometheus_client::encoding::text::encode_eof(out);
}

/// Every family of this process, then those of `scrapes`, as Prometheus text.
pub fn encode(out: &mut String, scrapes: &[Scrape]) {
    if let Err(e) = prometheus_text::encode(out, &CALLS) {
        tracing::warn!(error = %e, "metrics: encoding the calls failed");
    }
    {
        let registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = prometheus_text::encode(out, &registry) {
            tracing::warn!(error = %e, "metrics: encoding the process's families failed");
        }
    }
    for scrape in scrapes {
        if let Err(e) = prometheus_text::encode(out, &scrape.registry) {
            tracing::warn!(error = %e, "metrics: encoding a component's families failed");
        }
    }
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
    // A ready-made name: looking one up by `&str` parses it on every call.
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    headers.get(&GRPC_STATUS).map(|v| {
        v.to_str().ok().and_then(|s| s.parse::<i32>().ok()).map_or(tonic::Code::Unknown, tonic::Code::from_i32)
    })
}

/// Where one call's outcome is recorded, once: its metrics and its span.
pub struct CallRecord {
    started: Instant,
    metrics: Arc<MethodMetrics>,
    span: tracing::Span,
    server: bool,
    on_finish: Option<Box<dyn FnOnce(tonic::Code, Instant) + Send>>,
}

impl CallRecord {
    /// A server-side call of `method` (`/package.Service/Method`), continuing
    /// the trace of the caller named in `headers`.
    pub fn server(method: &str, headers: &http::HeaderMap) -> Self {
        let span = crate::trace::server_span(method, headers);
        Self { started: Instant::now(), metrics: server_method(method), span, server: true, on_finish: None }
    }

    /// A call of `method` through a balanced channel to `service`, a child
    /// of the current span.
    pub fn client(service: &str, method: &str) -> Self {
        let span = crate::trace::client_span(method);
        Self { started: Instant::now(), metrics: client_method(service, method), span, server: false, on_finish: None }
    }

    /// The call's span: enter it while serving, inject it into the request.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// Also runs `f` when the call ends (a breaker's report), with its status
    /// and the clock reading the record took for its duration: one reading
    /// serves both.
    pub fn on_finish(&mut self, f: impl FnOnce(tonic::Code, Instant) + Send + 'static) {
        self.on_finish = Some(Box::new(f));
    }

    pub fn finish(self, code: tonic::Code) {
        let now = Instant::now();
        let span = &self.span;
        self.metrics.observe_traced(now.saturating_duration_since(self.started).as_secs_f64(), code, now, || {
            crate::trace::trace_id(span)
        });
        crate::trace::record_status(&self.span, code, self.server);
        if let Some(f) = self.on_finish {
            f(code, now);
        }
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
    /// Wraps `inner` for a call whose outcome is recorded elsewhere.
    pub fn unrecorded(inner: B) -> Self {
        Self { inner, record: None }
    }

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

    #[derive(Debug)]
    struct One(Arc<MethodMetrics>);

    impl Collector for One {
        fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
            let rows = vec![(vec!["/a.B/\"x\"".to_owned()], self.0.clone())];
            encode_side(&mut encoder, "t", ["calls", "latency"], &rows, &["method"])
        }
    }

    #[test]
    fn text_format() {
        let m = MethodMetrics::default();
        m.observe(0.003, tonic::Code::Ok);
        m.observe(20.0, tonic::Code::NotFound);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(One(Arc::new(m))));
        let mut out = String::new();
        prometheus_text::encode(&mut out, &registry).expect("encodes");
        assert!(out.contains("# TYPE t_requests_total counter"), "{out}");
        assert!(out.contains("t_requests_total{method=\"/a.B/\\\"x\\\"\",code=\"OK\"} 1"), "{out}");
        assert!(out.contains("code=\"NOT_FOUND\"} 1"), "{out}");
        assert!(!out.contains("code=\"INTERNAL\""), "codes never seen are left out: {out}");
        assert!(out.contains("t_request_duration_seconds_bucket{method=\"/a.B/\\\"x\\\"\",le=\"0.0025\"} 0"), "{out}");
        assert!(out.contains("le=\"0.005\"} 1"), "{out}");
        assert!(out.contains("le=\"10\"} 1"), "{out}");
        assert!(out.contains("le=\"+Inf\"} 2"), "{out}");
        assert!(out.contains("t_request_duration_seconds_count{method=\"/a.B/\\\"x\\\"\"} 2"), "{out}");
    }

    #[test]
    fn openmetrics_carries_one_exemplar_per_bucket_a_second() {
        let m = MethodMetrics::default();
        let t0 = Instant::now();
        let trace = |id: &str| {
            let id = id.to_owned();
            move || Some(id)
        };
        m.observe_traced(0.040, tonic::Code::Ok, t0, trace("aa"));
        // The same bucket within the second keeps the first; another bucket takes its own.
        m.observe_traced(0.045, tonic::Code::Ok, t0 + std::time::Duration::from_millis(10), trace("bb"));
        m.observe_traced(0.003, tonic::Code::Unavailable, t0, trace("cc"));
        m.observe_traced(0.030, tonic::Code::Ok, t0 + std::time::Duration::from_millis(1_100), trace("dd"));
        let rows = vec![(vec!["/a.B/\"x\"".to_owned()], Arc::new(m))];
        let mut out = String::new();
        write_side_openmetrics(&mut out, "t", ["calls", "latency"], &rows, &["method"]);
        assert!(out.contains("# TYPE t_requests counter\n"), "{out}");
        assert!(out.contains("t_requests_total{method=\"/a.B/\\\"x\\\"\",code=\"OK\"} 3\n"), "{out}");
        let bucket = |le: &str| {
            out.lines()
                .find(|l| l.starts_with("t_request_duration_seconds_bucket") && l.contains(&format!("le=\"{le}\"")))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(
            bucket("0.005").starts_with(
                "t_request_duration_seconds_bucket{method=\"/a.B/\\\"x\\\"\",le=\"0.005\"} 1 # {trace_id=\"cc\"} 0.003 "
            ),
            "{out}"
        );
        assert!(
            bucket("0.05").contains("} 4 # {trace_id=\"dd\"} 0.03 "),
            "a second later the bucket takes a new one: {out}"
        );
        assert!(!bucket("0.1").contains('#'), "{out}");
        assert!(bucket("+Inf").ends_with("} 4"), "{out}");
        assert!(out.contains("t_request_duration_seconds_count{method=\"/a.B/\\\"x\\\"\"} 4\n"), "{out}");
        // Untraced calls (no exporter) leave none.
        let quiet = MethodMetrics::default();
        quiet.observe(0.040, tonic::Code::Ok);
        assert!(quiet.exemplars().iter().all(Option::is_none));
    }

    #[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Reason {
        reason: String,
    }

    #[test]
    fn counters_and_scrapes_come_out_as_families() {
        let c = counters::<Reason>("meshkit_test_things", "Things, by reason.");
        c.get_or_create(&Reason { reason: "a \"quoted\" one".into() }).inc_by(3);
        let mut scrape = Scrape::default();
        scrape.gauge("meshkit_test_depth", "Depth.").set(2.5);
        let mut out = String::new();
        encode(&mut out, &[scrape]);
        assert!(out.contains("# HELP meshkit_test_things_total Things, by reason.\n"), "{out}");
        assert!(out.contains("# TYPE meshkit_test_things_total counter"), "{out}");
        assert!(out.contains("meshkit_test_things_total{reason=\"a \\\"quoted\\\" one\"} 3"), "{out}");
        assert!(out.contains("# TYPE meshkit_test_depth gauge\nmeshkit_test_depth 2.5"), "{out}");
    }

    #[test]
    fn made_up_methods_cannot_grow_the_registry() {
        for i in 0..MAX_METHODS + 50 {
            server_method(&format!("/x.Y/M{i}"));
        }
        assert!(SERVER.read().unwrap_or_else(|p| p.into_inner()).len() <= MAX_METHODS + 1);
    }
}
