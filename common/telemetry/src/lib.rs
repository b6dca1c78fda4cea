//! Telemetry of a meshkit process: logs, traces and metrics.
//!
//! - [`metrics`]: Prometheus families, served at the admin endpoint's `/metrics`.
//! - [`trace`]: the spans of calls and events, and W3C trace context.
//! - this module: process-wide logging and tracing set-up.
//!
//! Logs: text or JSON lines (`log.format`), filtered by `RUST_LOG` or
//! `log.filter`; each line inside a traced call carries `trace_id` and
//! `span_id`.
//!
//! Traces: meshkit's spans (see [`crate::trace`]) go to OpenTelemetry and
//! are exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, configured by the standard
//! variables (`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_*`).
//! Without an endpoint (or with `OTEL_SDK_DISABLED=true`,
//! `OTEL_TRACES_EXPORTER=none`) no span is made and nothing complains.
#![forbid(unsafe_code)]

pub mod metrics;
pub mod settings;
pub mod trace;

pub use settings::LogSettings;

use std::fmt::Write as _;

use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use std::sync::{Arc, OnceLock};

use tracing::{Event, Subscriber, dispatcher::WeakDispatch, field::Field, span};
use tracing_subscriber::{
    EnvFilter,
    fmt::{
        self, FmtContext, FormatEvent, FormatFields,
        format::Writer,
        time::{FormatTime, SystemTime},
    },
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};

/// Keeps the trace pipeline alive; [`Telemetry::shutdown`] (or drop) flushes
/// the spans not yet exported.
#[must_use = "dropping it flushes and stops trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    /// The runtime the OTLP exporter's connection lives on, apart from the
    /// application's, so a busy or single-threaded application never stalls
    /// an export, and a flush at exit never waits on a blocked runtime.
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").field("exporting", &self.runtime.is_some()).finish()
    }
}

impl Telemetry {
    /// Whether spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.runtime.is_some()
    }

    /// Exports what is buffered and stops.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take() {
            if let Err(e) = provider.shutdown_with_timeout(std::time::Duration::from_secs(5)) {
                tracing::warn!(error = %e, "flushing traces at exit failed");
            }
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

fn env_true(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Installs the global subscriber for `service` (the default
/// `service.name`). Safe to call twice: the second call changes nothing.
pub fn init(settings: &LogSettings, service: &str) -> Telemetry {
    let exporting = (env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        && !env_true("OTEL_SDK_DISABLED")
        && !std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim().eq_ignore_ascii_case("none"));
    let directives =
        std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty()).unwrap_or_else(|| settings.filter.clone());
    let filter = EnvFilter::try_new(with_span_targets(&directives, exporting))
        .or_else(|_| EnvFilter::try_new(with_span_targets("info", exporting)))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, reload) = tracing_subscriber::reload::Layer::new(filter);
    let json = settings.format == "json";
    let dispatch = Arc::new(OnceLock::new());
    let fmt_layer = fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .event_format(TraceIds { json, dispatch: dispatch.clone() });

    let mut telemetry = Telemetry { provider: None, runtime: None };
    // Without an exporter no span is made at all: tracing costs a call nothing.
    let otel_layer = if !exporting {
        None
    } else {
        let mut resource = Resource::builder();
        let named = env_set("OTEL_SERVICE_NAME")
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name="));
        if !named {
            resource = resource.with_service_name(service.to_owned());
        }
        resource = resource.with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        let mut provider = SdkTracerProvider::builder().with_resource(resource.build());
        match exporter() {
            Ok((runtime, exporter)) => {
                provider = provider.with_batch_exporter(exporter);
                telemetry.runtime = Some(runtime);
            }
            Err(e) => eprintln!("OTLP trace export is off: {e}"),
        }
        let provider = provider.build();
        let tracer = provider.tracer("meshkit");
        telemetry.provider = Some(provider);
        Some(tracing_opentelemetry::layer().with_tracer(tracer).with_threads(false))
    };
    if tracing_subscriber::registry().with(filter).with(fmt_layer).with(otel_layer).try_init().is_ok() {
        tracing::dispatcher::get_default(|installed| dispatch.set(installed.downgrade()).ok());
        let _ = FILTER.set(Box::new(move |directives: &str| {
            let filter = EnvFilter::try_new(with_span_targets(directives, exporting)).map_err(|e| e.to_string())?;
            reload.reload(filter).map_err(|e| e.to_string())
        }));
    } else {
        // Already installed (tests start several services in one process).
        telemetry.stop();
    }
    telemetry
}

/// The log filter's directives with meshkit's span targets set.
///
/// One filter serves the whole subscriber (not one per layer): a callsite
/// it disables (h2's and hyper's spans, say) is never visited again, which
/// per-layer filters cannot promise. Exporting traces turns meshkit's span
/// targets on whatever the logs show. Not exporting turns them off, so that
/// no span is made at all: a plain `info` would otherwise make two spans a
/// call at the gateway (a server and a client span), each formatted for the
/// log lines, about a tenth of its CPU per request. Directives that name a
/// span target themselves (to see calls' fields in the logs) are left as
/// they are.
fn with_span_targets(directives: &str, exporting: bool) -> String {
    use crate::trace::{EVENTS_TARGET, RPC_TARGET};
    let level = if exporting { "info" } else { "off" };
    let mut out = directives.to_owned();
    for target in [RPC_TARGET, EVENTS_TARGET] {
        if exporting || !directives.contains(target) {
            let _ = write!(out, ",{target}={level}");
        }
    }
    out
}

type SetFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static FILTER: OnceLock<SetFilter> = OnceLock::new();

/// Changes the log filter of the running process (`log.filter` from the
/// config center). `RUST_LOG`, when set, stays in force. Says whether the
/// filter changed: several config centers in one process (the gateway's
/// workers) follow the same setting, and only the first to see a new value
/// applies it.
pub fn set_filter(directives: &str) -> Result<bool, String> {
    if std::env::var("RUST_LOG").is_ok_and(|v| !v.is_empty()) {
        return Ok(false);
    }
    let Some(set) = FILTER.get() else { return Ok(false) };
    let mut applied = APPLIED.lock().unwrap_or_else(|p| p.into_inner());
    if applied.as_deref() == Some(directives) {
        return Ok(false);
    }
    set(directives)?;
    *applied = Some(directives.to_owned());
    Ok(true)
}

/// The directives `set_filter` last applied.
static APPLIED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn exporter() -> Result<(tokio::runtime::Runtime, opentelemetry_otlp::SpanExporter), String> {
    use opentelemetry_otlp::WithExportConfig as _;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otlp-export")
        .enable_all()
        .build()
        .map_err(|e| format!("starting the export runtime: {e}"))?;
    let exporter = {
        let _entered = runtime.enter();
        let mut builder = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        // The standard default is https://localhost:4317; a bare host:port
        // (as people write it) means plaintext gRPC.
        if let Ok(endpoint) = std::env::var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .or_else(|_| std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT"))
        {
            let endpoint = endpoint.trim();
            if !endpoint.contains("://") {
                builder = builder.with_endpoint(format!("http://{endpoint}"));
            }
        }
        builder.build().map_err(|e| format!("building the OTLP exporter: {e}"))?
    };
    Ok((runtime, exporter))
}

/// The trace and span id of `span`, read through the subscriber's dispatch
/// (inside an event callback `Span::current()` is no help: tracing does not
/// re-enter its dispatcher).
fn trace_ids(span: &span::Id, dispatch: &WeakDispatch) -> Option<(String, String)> {
    let dispatch = dispatch.upgrade()?;
    let cx = tracing_opentelemetry::get_otel_context(span, &dispatch)?;
    let otel_span = cx.span();
    let sc = otel_span.span_context();
    sc.is_valid().then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// Log lines with the trace context: text (tracing's default, then
/// `trace_id=… span_id=…`) or one JSON object per line.
struct TraceIds {
    json: bool,
    /// The subscriber this formatter is part of, set once it is built.
    dispatch: Arc<OnceLock<WeakDispatch>>,
}

impl<S, N> FormatEvent<S, N> for TraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let ids = match (ctx.lookup_current(), self.dispatch.get()) {
            (Some(span), Some(dispatch)) => trace_ids(&span.id(), dispatch),
            _ => None,
        };
        if !self.json {
            let mut line = String::new();
            fmt::format::Format::default().format_event(ctx, Writer::new(&mut line), event)?;
            let line = line.trim_end_matches('\n');
            return match ids {
                Some((trace_id, span_id)) => writeln!(writer, "{line} trace_id={trace_id} span_id={span_id}"),
                None => writeln!(writer, "{line}"),
            };
        }
        let meta = event.metadata();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        let mut object = serde_json::Map::new();
        object.insert("timestamp".into(), timestamp.into());
        object.insert("level".into(), meta.level().as_str().into());
        object.insert("target".into(), meta.target().into());
        let mut fields = JsonFields(serde_json::Map::new());
        event.record(&mut fields);
        if let Some(message) = fields.0.remove("message") {
            object.insert("message".into(), message);
        }
        if !fields.0.is_empty() {
            object.insert("fields".into(), fields.0.into());
        }
        if let Some(span) = ctx.lookup_current() {
            object.insert("span".into(), span.name().into());
        }
        if let Some((trace_id, span_id)) = ids {
            object.insert("trace_id".into(), trace_id.into());
            object.insert("span_id".into(), span_id.into());
        }
        writeln!(writer, "{}", serde_json::Value::Object(object))
    }
}

struct JsonFields(serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut text = String::new();
        let _ = write!(text, "{value:?}");
        self.0.insert(field.name().into(), text.into());
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Whether a call's server span is made under the filter `init` builds
    /// from `directives`.
    fn span_made(directives: &str, exporting: bool) -> bool {
        let filter = EnvFilter::try_new(with_span_targets(directives, exporting)).expect("the directives parse");
        let subscriber = tracing_subscriber::registry().with(filter).with(fmt::layer().with_writer(std::io::sink));
        tracing::subscriber::with_default(subscriber, || {
            let span = crate::trace::server_span("/meshkit.user.v1.UserService/GetUser", &http::HeaderMap::new());
            let events = crate::trace::producer_span("order-events", "e-1");
            assert_eq!(span.is_disabled(), events.is_disabled(), "{directives}");
            !span.is_disabled()
        })
    }

    #[test]
    fn without_an_exporter_no_span_is_made_unless_the_filter_names_it() {
        // The default filter, and any other that does not name the targets.
        assert!(!span_made("info,rskafka=off", false));
        assert!(!span_made("debug", false));
        assert!(!span_made("", false));
        // Exporting: spans whatever the logs show.
        assert!(span_made("info,rskafka=off", true));
        assert!(span_made("warn", true));
        // Asked for by name, to see calls' fields in the log lines.
        assert!(span_made("info,meshkit::rpc=info,meshkit::events=info", false));
    }

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Log lines written inside a call continuing `traceparent`, in `format`.
    fn lines(json: bool) -> Vec<String> {
        let captured = Captured::default();
        let writer = captured.clone();
        let provider = SdkTracerProvider::builder().build();
        let cell = Arc::new(OnceLock::new());
        let subscriber = tracing_subscriber::registry()
            .with(
                fmt::layer()
                    .with_ansi(false)
                    .event_format(TraceIds { json, dispatch: cell.clone() })
                    .with_writer(move || writer.clone()),
            )
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let dispatch = tracing::Dispatch::new(subscriber);
        let _ = cell.set(dispatch.downgrade());
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::info!(target: "meshkit_test", "outside any call");
            let mut headers = http::HeaderMap::new();
            headers.insert(
                "traceparent",
                http::HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            );
            let span = crate::trace::server_span("/meshkit.user.v1.UserService/GetUser", &headers);
            let _entered = span.enter();
            tracing::info!(target: "meshkit_test", user = "u-1", attempt = 2, "inside a call");
        });
        let text = String::from_utf8(captured.0.lock().map(|v| v.clone()).unwrap_or_default()).unwrap_or_default();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn json_lines_carry_the_trace_and_span_ids_of_the_call() {
        let lines = lines(true);
        assert_eq!(lines.len(), 2, "{lines:?}");
        let outside: serde_json::Value = serde_json::from_str(&lines[0]).expect("JSON");
        assert_eq!(outside["message"], "outside any call");
        assert!(outside.get("trace_id").is_none());
        let inside: serde_json::Value = serde_json::from_str(&lines[1]).expect("JSON");
        assert_eq!(inside["level"], "INFO");
        assert_eq!(inside["target"], "meshkit_test");
        assert_eq!(inside["message"], "inside a call");
        assert_eq!(inside["fields"]["user"], "u-1");
        assert_eq!(inside["fields"]["attempt"], 2);
        assert_eq!(inside["span"], "rpc.server");
        assert_eq!(inside["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        let span_id = inside["span_id"].as_str().expect("a span id");
        assert_eq!(span_id.len(), 16);
        assert_ne!(span_id, "00f067aa0ba902b7", "the call's own span, not the caller's");
        assert!(inside["timestamp"].as_str().is_some_and(|t| t.starts_with("20")));
    }

    #[test]
    fn text_lines_end_with_the_trace_and_span_ids() {
        let lines = lines(false);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].ends_with("outside any call"), "{}", lines[0]);
        assert!(lines[1].contains("inside a call"), "{}", lines[1]);
        assert!(lines[1].contains(" trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id="), "{}", lines[1]);
    }
}
