//! gRPC status → HTTP: the standard mapping (google.rpc.Code's HTTP
//! equivalents, as grpc-gateway and Envoy's transcoder use) and the JSON
//! body `{"code": <gRPC code>, "message": "…", "details": […]}`.

use base64::Engine;
use bytes::Bytes;
use http::{HeaderValue, StatusCode, header};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::{Value as Json, json};
use tonic::Code;

use crate::transcode::message_json;

/// The HTTP status that stands for a gRPC code.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// google.rpc.Status, the payload of `grpc-status-details-bin`.
#[derive(Clone, PartialEq, prost::Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
    #[prost(message, repeated, tag = "3")]
    details: Vec<prost_types::Any>,
}

/// The JSON error body of a status; details are rendered as JSON when their
/// type is in `pool`, else as `{"@type", "value": base64}`.
pub fn error_body(status: &tonic::Status, pool: Option<&DescriptorPool>) -> Json {
    let mut details = Vec::new();
    if !status.details().is_empty() {
        if let Ok(rpc) = RpcStatus::decode(status.details()) {
            for any in rpc.details {
                details.push(detail_json(&any, pool));
            }
        }
    }
    json!({ "code": status.code() as i32, "message": status.message(), "details": details })
}

fn detail_json(any: &prost_types::Any, pool: Option<&DescriptorPool>) -> Json {
    let type_name = any.type_url.rsplit('/').next().unwrap_or_default();
    if let Some(desc) = pool.and_then(|p| p.get_message_by_name(type_name)) {
        if let Ok(msg) = DynamicMessage::decode(desc, any.value.as_slice()) {
            if let Json::Object(mut map) = message_json(&msg) {
                map.insert("@type".into(), Json::String(any.type_url.clone()));
                return Json::Object(map);
            }
        }
    }
    json!({ "@type": any.type_url, "value": base64::engine::general_purpose::STANDARD.encode(&any.value) })
}

/// An HTTP response with a JSON body.
pub fn json_response(status: StatusCode, body: &Json) -> http::Response<tonic::body::Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut res = http::Response::new(tonic::body::Body::new(http_body_util::Full::new(Bytes::from(bytes))));
    *res.status_mut() = status;
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// A refusal by the gateway itself: `http` with the JSON body of a status
/// `code` and `message` (for refusals whose HTTP status is not the code's own,
/// such as 405, 413 or 415).
pub fn refusal(http: StatusCode, code: Code, message: impl Into<String>) -> http::Response<tonic::body::Body> {
    json_response(http, &error_body(&tonic::Status::new(code, message), None))
}

/// The HTTP response for a failed call.
pub fn status_response(status: &tonic::Status, pool: Option<&DescriptorPool>) -> http::Response<tonic::body::Body> {
    json_response(http_status(status.code()), &error_body(status, pool))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_standard_mapping() {
        for (code, http) in [
            (Code::NotFound, 404),
            (Code::InvalidArgument, 400),
            (Code::Unauthenticated, 401),
            (Code::PermissionDenied, 403),
            (Code::ResourceExhausted, 429),
            (Code::Unavailable, 503),
            (Code::AlreadyExists, 409),
            (Code::FailedPrecondition, 400),
            (Code::DeadlineExceeded, 504),
            (Code::Unimplemented, 501),
            (Code::Internal, 500),
            (Code::Cancelled, 499),
        ] {
            assert_eq!(http_status(code).as_u16(), http, "{code:?}");
        }
    }

    #[test]
    fn details_are_kept() {
        let any = prost_types::Any { type_url: "type.googleapis.com/x.Y".into(), value: vec![1, 2, 3] };
        let rpc = RpcStatus { code: 5, message: "gone".into(), details: vec![any] };
        let status = tonic::Status::with_details(Code::NotFound, "gone", rpc.encode_to_vec().into());
        let body = error_body(&status, None);
        assert_eq!(body["code"], 5);
        assert_eq!(body["message"], "gone");
        assert_eq!(body["details"][0]["@type"], "type.googleapis.com/x.Y");
        assert_eq!(body["details"][0]["value"], "AQID");
    }
}
