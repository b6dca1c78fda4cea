//! An OTLP trace receiver on tonic, the collector's own protocol
//! (opentelemetry-proto's `TraceService`): it keeps every span exported to
//! it, with the `service.name` of the process that sent it.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::{AnyValue, KeyValue, any_value},
    trace::v1::{Span, span::SpanKind},
};
use tokio::{net::TcpListener, sync::oneshot};
use tokio_stream::wrappers::TcpListenerStream;

/// A span as received, flattened for assertions.
#[derive(Debug, Clone)]
pub struct Received {
    pub service: String,
    pub span: Span,
}

impl Received {
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    /// The parent span id, empty for a root.
    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    pub fn kind(&self) -> SpanKind {
        SpanKind::try_from(self.span.kind).unwrap_or(SpanKind::Unspecified)
    }

    /// An attribute's value as text (strings as they are, numbers printed).
    pub fn attr(&self, key: &str) -> Option<String> {
        self.span.attributes.iter().find(|kv| kv.key == key).and_then(|kv| kv.value.as_ref()).map(text)
    }
}

fn text(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn service_name(attributes: &[KeyValue]) -> String {
    attributes.iter().find(|kv| kv.key == "service.name").and_then(|kv| kv.value.as_ref()).map(text).unwrap_or_default()
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.0.lock().map_err(|_| tonic::Status::internal("poisoned"))?;
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans.resource.as_ref().map(|r| service_name(&r.attributes)).unwrap_or_default();
            for scope in resource_spans.scope_spans {
                received.extend(scope.spans.into_iter().map(|span| Received { service: service.clone(), span }));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

/// The receiver, on a free loopback port until dropped.
pub struct Collector {
    addr: SocketAddr,
    sink: Sink,
    _stop: oneshot::Sender<()>,
}

impl Collector {
    pub async fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let sink = Sink::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let service = TraceServiceServer::new(sink.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Self { addr, sink, _stop: stop })
    }

    /// `http://127.0.0.1:PORT`, for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Received> {
        self.sink.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The spans of one trace.
    pub fn trace(&self, trace_id: &str) -> Vec<Received> {
        self.spans().into_iter().filter(|s| s.trace_id() == trace_id).collect()
    }
}
