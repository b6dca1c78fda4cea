//! gRPC's interop `TestService` (`proto/grpc/testing/test.proto`) served by a
//! `MeshServer`, as the gRPC project's interop server specification
//! describes it (github.com/grpc/grpc/blob/master/doc/interop-test-descriptions.md),
//! so the project's own interop clients can run their cases against meshkit,
//! directly and through the gateway.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt, future::BoxFuture};
use http::{HeaderName, HeaderValue};
use http_body_util::BodyExt;
use meshkit_common::{Mesh, MeshServer, ProcessConfig, RunningServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming, body::Body, server::NamedService};

pub mod pb {
    tonic::include_proto!("grpc.testing");
}

use pb::{
    EchoStatus, Empty, Payload, PayloadType, ResponseParameters, SimpleRequest, SimpleResponse,
    StreamingInputCallRequest, StreamingInputCallResponse, StreamingOutputCallRequest, StreamingOutputCallResponse,
    test_service_server::{TestService, TestServiceServer},
};

/// The interop contract's descriptors (with imports), as the gateway loads them.
pub const INTEROP_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/interop_descriptor.bin"));

/// Service name of the interop `TestService` in the registry.
pub const TEST_SERVICE: &str = "grpc.testing.TestService";

/// The component name interop instances read their settings under.
pub const COMPONENT: &str = "interop";

/// The largest payload a request may ask for: the server's own 4 MiB message
/// limit, less room for the framing.
const MAX_PAYLOAD: i32 = 4 * 1024 * 1024 - 64;

/// Metadata the interop cases expect echoed: the first in the response's
/// headers, the second in its trailers.
const ECHO_INITIAL: HeaderName = HeaderName::from_static("x-grpc-test-echo-initial");
const ECHO_TRAILING: HeaderName = HeaderName::from_static("x-grpc-test-echo-trailing-bin");

struct Interop {
    server_id: String,
}

fn payload(kind: i32, size: i32) -> Result<Payload, Status> {
    if kind != PayloadType::Compressable as i32 {
        return Err(Status::invalid_argument(format!("response_type {kind}: only COMPRESSABLE (0) is served")));
    }
    if !(0..=MAX_PAYLOAD).contains(&size) {
        return Err(Status::invalid_argument(format!("response size {size} is outside 0..={MAX_PAYLOAD}")));
    }
    Ok(Payload { r#type: kind, body: vec![0; size as usize] })
}

/// The status a request asks to end with, if it is not OK.
fn requested_status(status: Option<&EchoStatus>) -> Option<Status> {
    status.filter(|s| s.code != 0).map(|s| Status::new(Code::from_i32(s.code), s.message.clone()))
}

/// Sends the responses `params` ask for, each after its interval; false once
/// the caller is gone.
async fn respond(
    tx: &mpsc::Sender<Result<StreamingOutputCallResponse, Status>>,
    kind: i32,
    params: &[ResponseParameters],
) -> bool {
    for p in params {
        if p.interval_us > 0 {
            tokio::time::sleep(Duration::from_micros(p.interval_us as u64)).await;
        }
        let item = payload(kind, p.size)
            .map(|payload| StreamingOutputCallResponse { payload: Some(payload), ..Default::default() });
        let failed = item.is_err();
        if tx.send(item).await.is_err() || failed {
            return false;
        }
    }
    true
}

type OutputStream = Pin<Box<dyn Stream<Item = Result<StreamingOutputCallResponse, Status>> + Send>>;

#[tonic::async_trait]
impl TestService for Interop {
    async fn empty_call(&self, _: Request<Empty>) -> Result<Response<Empty>, Status> {
        Ok(Response::new(Empty {}))
    }

    async fn unary_call(&self, request: Request<SimpleRequest>) -> Result<Response<SimpleResponse>, Status> {
        let request = request.into_inner();
        if let Some(status) = requested_status(request.response_status.as_ref()) {
            return Err(status);
        }
        Ok(Response::new(SimpleResponse {
            payload: Some(payload(request.response_type, request.response_size)?),
            server_id: if request.fill_server_id { self.server_id.clone() } else { String::new() },
            ..Default::default()
        }))
    }

    async fn cacheable_unary_call(&self, request: Request<SimpleRequest>) -> Result<Response<SimpleResponse>, Status> {
        self.unary_call(request).await
    }

    type StreamingOutputCallStream = OutputStream;

    async fn streaming_output_call(
        &self,
        request: Request<StreamingOutputCallRequest>,
    ) -> Result<Response<Self::StreamingOutputCallStream>, Status> {
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            if respond(&tx, request.response_type, &request.response_parameters).await {
                if let Some(status) = requested_status(request.response_status.as_ref()) {
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn streaming_input_call(
        &self,
        request: Request<Streaming<StreamingInputCallRequest>>,
    ) -> Result<Response<StreamingInputCallResponse>, Status> {
        let mut stream = request.into_inner();
        let mut size = 0usize;
        while let Some(item) = stream.next().await {
            size += item?.payload.map_or(0, |p| p.body.len());
        }
        let aggregated_payload_size =
            i32::try_from(size).map_err(|_| Status::out_of_range(format!("{size} bytes in all overflow an int32")))?;
        Ok(Response::new(StreamingInputCallResponse { aggregated_payload_size }))
    }

    type FullDuplexCallStream = OutputStream;

    async fn full_duplex_call(
        &self,
        request: Request<Streaming<StreamingOutputCallRequest>>,
    ) -> Result<Response<Self::FullDuplexCallStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(item) = inbound.next().await {
                let request = match item {
                    Ok(request) => request,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                if let Some(status) = requested_status(request.response_status.as_ref()) {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
                if !respond(&tx, request.response_type, &request.response_parameters).await {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type HalfDuplexCallStream = OutputStream;

    async fn half_duplex_call(
        &self,
        request: Request<Streaming<StreamingOutputCallRequest>>,
    ) -> Result<Response<Self::HalfDuplexCallStream>, Status> {
        let mut inbound = request.into_inner();
        let mut requests = Vec::new();
        while let Some(item) = inbound.next().await {
            requests.push(item?);
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for request in requests {
                if !respond(&tx, request.response_type, &request.response_parameters).await {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn unimplemented_call(&self, _: Request<Empty>) -> Result<Response<Empty>, Status> {
        Err(Status::unimplemented("grpc.testing.TestService/UnimplementedCall is not implemented, by design"))
    }
}

/// Echoes `x-grpc-test-echo-initial` into the response's headers and
/// `x-grpc-test-echo-trailing-bin` into its trailers, as the custom_metadata
/// case expects.
#[derive(Clone)]
pub struct EchoMetadata<S>(S);

impl<S: NamedService> NamedService for EchoMetadata<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower::Service<http::Request<Body>> for EchoMetadata<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let initial = req.headers().get(&ECHO_INITIAL).cloned();
        let trailing = req.headers().get(&ECHO_TRAILING).cloned();
        let call = self.0.call(req);
        Box::pin(async move {
            let mut res = call.await?;
            if let Some(value) = initial {
                res.headers_mut().insert(ECHO_INITIAL, value);
            }
            let Some(value) = trailing else { return Ok(res) };
            // A trailers-only response carries its trailers in the headers.
            if res.headers().contains_key("grpc-status") {
                res.headers_mut().insert(ECHO_TRAILING, value);
                return Ok(res);
            }
            Ok(res.map(|body| Body::new(body.map_frame(move |frame| echo_trailer(frame, &value)))))
        })
    }
}

fn echo_trailer(frame: http_body::Frame<bytes::Bytes>, value: &HeaderValue) -> http_body::Frame<bytes::Bytes> {
    match frame.into_trailers() {
        Ok(mut trailers) => {
            trailers.insert(ECHO_TRAILING, value.clone());
            http_body::Frame::trailers(trailers)
        }
        Err(frame) => frame,
    }
}

/// Starts an interop `TestService` instance registered in etcd.
pub async fn start_interop(config: impl ProcessConfig) -> meshkit_common::Result<RunningServer> {
    let mesh = Mesh::connect(config.mesh(), COMPONENT).await?;
    let mut config = mesh.config();
    if config.registry.instance_id.is_empty() {
        // pick_first_unary reads it back from every reply.
        config.registry.instance_id = meshkit_common::server::new_instance_id();
    }
    let server_id = config.registry.instance_id.clone();
    MeshServer::new(config)
        .with_mesh(&mesh)
        .add_service(EchoMetadata(TestServiceServer::new(Interop { server_id })))
        .start()
        .await
}
