//! One trace per request: the W3C trace context (`traceparent`,
//! `tracestate`) read from and written into gRPC metadata and Kafka headers,
//! and the spans of RPCs and events, named and attributed by the
//! OpenTelemetry semantic conventions (RPC and messaging).
//!
//! Spans are `tracing` spans under the `meshkit::rpc` and `meshkit::events`
//! targets; [`crate::init`] hands them to OpenTelemetry. Without
//! that layer they are disabled and cost next to nothing.

use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::{Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The span target of RPC spans, server and client side.
pub const RPC_TARGET: &str = "meshkit::rpc";
/// The span target of event spans (outbox and consumers).
pub const EVENTS_TARGET: &str = "meshkit::events";

fn propagator() -> TraceContextPropagator {
    TraceContextPropagator::new()
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(key.as_bytes()), HeaderValue::from_str(&value)) {
            self.0.insert(name, value);
        }
    }
}

struct BytesExtractor<'a>(&'a BTreeMap<String, Vec<u8>>);

impl Extractor for BytesExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

struct MapInjector<'a>(&'a mut BTreeMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// The remote parent in `headers`, if they carry a valid `traceparent`.
fn remote_parent(cx: Context) -> Option<Context> {
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` the child of the context `carrier` holds, if any.
fn continue_from(span: Span, carrier: &dyn Extractor) -> Span {
    if !span.is_disabled() {
        if let Some(parent) = remote_parent(propagator().extract(carrier)) {
            let _ = span.set_parent(parent);
        }
    }
    span
}

/// The trace id of `span` (32 hex digits) when it is recorded and sampled:
/// none while the process exports no traces.
pub fn trace_id(span: &Span) -> Option<String> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| sc.trace_id().to_string())
}

/// Writes `span`'s context into `headers` (`traceparent`, `tracestate`),
/// replacing any the caller sent: the callee's parent is this hop.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    if span.is_disabled() {
        return;
    }
    propagator().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// The current span's context as text headers, for a record that travels
/// on (the outbox): empty when no span is recording.
pub fn context_headers(span: &Span) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if !span.is_disabled() {
        propagator().inject_context(&span.context(), &mut MapInjector(&mut out));
    }
    out
}

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`).
pub fn split_path(path: &str) -> (&str, &str) {
    let trimmed = path.trim_start_matches('/');
    trimmed.split_once('/').unwrap_or((trimmed, ""))
}

/// The span of one call served: a root, or the child of the caller's span
/// when the request carries a `traceparent`.
pub fn server_span(path: &str, headers: &HeaderMap) -> Span {
    // The fields' values are computed only when the span is recorded.
    let span = tracing::info_span!(
        target: RPC_TARGET,
        parent: None,
        "rpc.server",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "server",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = split_path(path).0,
        rpc.method = split_path(path).1,
        rpc.grpc.status_code = Empty,
    );
    continue_from(span, &HeaderExtractor(headers))
}

/// The span of one HTTP request served (the gateway's REST side), named
/// `{method}` until the route is known (see [`record_route`]).
pub fn http_server_span(method: &http::Method, path: &str, headers: &HeaderMap) -> Span {
    let span = tracing::info_span!(
        target: RPC_TARGET,
        parent: None,
        "http.server",
        otel.name = %method,
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = %method,
        url.path = path,
        http.route = Empty,
        http.response.status_code = Empty,
    );
    continue_from(span, &HeaderExtractor(headers))
}

/// Names an HTTP server span after its matched route template.
pub fn record_route(span: &Span, method: &http::Method, template: &dyn std::fmt::Display) {
    if span.is_disabled() {
        return;
    }
    span.record("http.route", tracing::field::display(template));
    // The OpenTelemetry span exists by now (it was entered), so the name
    // is set on it, not through `otel.name`.
    span.context().span().update_name(format!("{method} {template}"));
}

/// Records an HTTP response status; a 5xx marks the span failed.
pub fn record_http_status(span: &Span, status: http::StatusCode) {
    if span.is_disabled() {
        return;
    }
    span.record("http.response.status_code", status.as_u16());
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
}

/// The span of one call made through a balanced channel: a child of the
/// current span (the call being served, if any).
pub fn client_span(path: &str) -> Span {
    let (service, method) = split_path(path);
    tracing::info_span!(
        target: RPC_TARGET,
        "rpc.client",
        otel.name = %path.trim_start_matches('/'),
        otel.kind = "client",
        otel.status_code = Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = Empty,
    )
}

/// Records a call's outcome on its span. A server marks only the codes
/// that mean it failed (per the RPC conventions); a client, every code but OK.
pub fn record_status(span: &Span, code: tonic::Code, server: bool) {
    if span.is_disabled() {
        return;
    }
    span.record("rpc.grpc.status_code", code as i64);
    use tonic::Code::*;
    let failed = if server {
        matches!(code, Unknown | DeadlineExceeded | Unimplemented | Internal | Unavailable | DataLoss)
    } else {
        code != Ok
    };
    if failed {
        span.record("otel.status_code", "ERROR");
    }
}

/// The span of an event written to the outbox in a transaction: its context
/// is what travels in the record's headers, so consumers continue the trace.
pub fn producer_span(topic: &str, event_id: &str) -> Span {
    tracing::info_span!(
        target: EVENTS_TARGET,
        "messaging.create",
        otel.name = %format_args!("create {topic}"),
        otel.kind = "producer",
        messaging.system = "kafka",
        messaging.operation.type = "create",
        messaging.operation.name = "create",
        messaging.destination.name = topic,
        messaging.message.id = event_id,
    )
}

/// What a consumer knows about the record it processes.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub group: &'a str,
    pub event_id: &'a str,
    pub headers: &'a BTreeMap<String, Vec<u8>>,
}

/// The span of one record processed: the child of the producer's span when
/// the record carries its `traceparent`, so the asynchronous hop stays in the
/// request's trace.
pub fn consumer_span(delivery: Delivery<'_>) -> Span {
    let span = tracing::info_span!(
        target: EVENTS_TARGET,
        parent: None,
        "messaging.process",
        otel.name = %format_args!("process {}", delivery.topic),
        otel.kind = "consumer",
        otel.status_code = Empty,
        messaging.system = "kafka",
        messaging.operation.type = "process",
        messaging.operation.name = "process",
        messaging.destination.name = delivery.topic,
        messaging.destination.partition.id = %delivery.partition,
        messaging.kafka.offset = delivery.offset,
        messaging.consumer.group.name = delivery.group,
        messaging.message.id = delivery.event_id,
        meshkit.outcome = Empty,
    );
    continue_from(span, &BytesExtractor(delivery.headers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(split_path("/meshkit.user.v1.UserService/GetUser"), ("meshkit.user.v1.UserService", "GetUser"));
        assert_eq!(split_path("/odd"), ("odd", ""));
    }

    #[test]
    fn a_valid_traceparent_is_a_remote_parent_and_garbage_is_not() {
        let mut headers = HeaderMap::new();
        headers
            .insert("traceparent", HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        let cx = remote_parent(propagator().extract(&HeaderExtractor(&headers))).expect("a parent");
        assert_eq!(cx.span().span_context().trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        headers.insert("traceparent", HeaderValue::from_static("00-zz-00f067aa0ba902b7-01"));
        assert!(remote_parent(propagator().extract(&HeaderExtractor(&headers))).is_none());
        let mut bytes = BTreeMap::new();
        bytes.insert("traceparent".to_owned(), b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".to_vec());
        assert!(remote_parent(propagator().extract(&BytesExtractor(&bytes))).is_some());
    }

    #[test]
    fn without_a_telemetry_layer_nothing_is_injected() {
        let span = client_span("/a.B/C");
        let mut headers = HeaderMap::new();
        inject(&span, &mut headers);
        assert!(headers.is_empty());
        assert!(context_headers(&span).is_empty());
    }
}
