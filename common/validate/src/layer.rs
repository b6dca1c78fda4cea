//! The server layer: each request message of a method with rules is checked
//! as it arrives, before the handler sees it.
//!
//! It works on the HTTP body, below tonic's codec, so every generated
//! service gets it without a codec of its own: the body is cut into gRPC
//! messages (a 5-byte prefix and the message), each is decoded against the
//! method's input descriptor and checked, then passed on unchanged. A
//! message that breaks a rule ends the body with the INVALID_ARGUMENT
//! status instead, which tonic answers the call with; the handler never
//! runs. Compressed messages pass unchecked: meshkit's servers accept no
//! compression, so tonic refuses them anyway.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use prost_reflect::MessageDescriptor;
use tonic::body::Body as TonicBody;

use crate::Validator;

/// Messages longer than this pass unchecked (and unbuffered): tonic's own
/// decoding limit (4 MiB by default) refuses them.
const MAX_CHECKED: usize = 4 << 20;
const PREFIX: usize = 5;

/// Checks request messages against the contract's rules; see the module docs.
#[derive(Debug, Clone)]
pub struct ValidateLayer(pub Validator);

impl<S> tower::Layer<S> for ValidateLayer {
    type Service = ValidateService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ValidateService { inner, validator: Arc::new(self.0.clone()) }
    }
}

/// The service [`ValidateLayer`] makes.
#[derive(Debug, Clone)]
pub struct ValidateService<S> {
    inner: S,
    /// One reference to count: hyper clones the service for every request.
    validator: Arc<Validator>,
}

impl<S, B> tower::Service<http::Request<B>> for ValidateService<S>
where
    S: tower::Service<http::Request<TonicBody>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (parts, body) = req.into_parts();
        let body = match self.validator.method(parts.uri.path()) {
            Some(desc) => TonicBody::new(CheckedBody::new(body, desc.clone(), self.validator.clone())),
            None => TonicBody::new(body),
        };
        self.inner.call(http::Request::from_parts(parts, body))
    }
}

pin_project_lite::pin_project! {
    /// A request body whose gRPC messages are checked before they pass.
    struct CheckedBody<B> {
        #[pin]
        inner: B,
        desc: MessageDescriptor,
        validator: Arc<Validator>,
        // Bytes of a message not yet whole.
        pending: BytesMut,
        // Past a message too long to check: the rest passes as it comes.
        unchecked: bool,
        failed: bool,
    }
}

impl<B> CheckedBody<B> {
    fn new(inner: B, desc: MessageDescriptor, validator: Arc<Validator>) -> Self {
        Self { inner, desc, validator, pending: BytesMut::new(), unchecked: false, failed: false }
    }
}

/// The length of the whole message at the start of `buf` (prefix included)
/// and whether it is compressed, once the prefix is there.
fn frame_len(buf: &[u8]) -> Option<(usize, bool)> {
    let prefix = buf.get(..PREFIX)?;
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    Some((PREFIX + len, prefix[0] != 0))
}

impl<B> Body for CheckedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Data = Bytes;
    type Error = tonic::codegen::StdError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        if *this.failed {
            return Poll::Ready(None);
        }
        loop {
            // A whole message buffered: check it and pass it on.
            if !*this.unchecked {
                if let Some((len, compressed)) = frame_len(this.pending) {
                    if len > MAX_CHECKED {
                        *this.unchecked = true;
                    } else if this.pending.len() >= len {
                        let message = this.pending.split_to(len).freeze();
                        if !compressed {
                            if let Err(status) = this.validator.check_encoded(this.desc, &message[PREFIX..]) {
                                *this.failed = true;
                                return Poll::Ready(Some(Err(Box::new(status))));
                            }
                        }
                        return Poll::Ready(Some(Ok(Frame::data(message))));
                    }
                }
            }
            if *this.unchecked && !this.pending.is_empty() {
                let rest = this.pending.split().freeze();
                return Poll::Ready(Some(Ok(Frame::data(rest))));
            }
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if *this.unchecked => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    // Usually a whole message in one piece: taken over without a copy.
                    Ok(data) if this.pending.is_empty() => *this.pending = BytesMut::from(data),
                    Ok(data) => this.pending.extend_from_slice(&data),
                    Err(frame) if this.pending.is_empty() => return Poll::Ready(Some(Ok(frame))),
                    // Trailers after a cut message: pass what there is, tonic reports it.
                    Err(_) => {
                        *this.unchecked = true;
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e.into()))),
                // The body ended inside a message: pass it on, tonic reports it.
                None if !this.pending.is_empty() => {
                    *this.unchecked = true;
                }
                None => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || (self.pending.is_empty() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let pending = self.pending.len() as u64;
        hint.set_lower(hint.lower() + pending);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + pending);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};
    use prost_reflect::{DynamicMessage, ReflectMessage};

    const METHOD: &str = "/meshkit.user.v1.UserService/GetUser";

    fn validator() -> Validator {
        Validator::for_contracts(&["meshkit.user.v1.UserService"]).unwrap()
    }

    fn framed(validator: &Validator, id: &str) -> Vec<u8> {
        let mut message = DynamicMessage::new(validator.method(METHOD).unwrap().clone());
        message.set_field_by_name("id", prost_reflect::Value::String(id.into()));
        let encoded = prost::Message::encode_to_vec(&message.transcode_to_dynamic());
        let mut out = vec![0];
        out.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        out.extend_from_slice(&encoded);
        out
    }

    /// The body `chunks` make, read through the check: the bytes passed and the error that ended it.
    async fn read(chunks: Vec<Vec<u8>>) -> (Vec<u8>, Option<tonic::Status>) {
        let validator = Arc::new(validator());
        let frames = chunks.into_iter().map(|c| Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from(c))));
        let inner = StreamBody::new(futures::stream::iter(frames));
        let mut body = CheckedBody::new(inner, validator.method(METHOD).unwrap().clone(), validator);
        let mut passed = Vec::new();
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(frame) => passed.extend_from_slice(&frame.into_data().unwrap()),
                Err(e) => return (passed, Some(*e.downcast::<tonic::Status>().unwrap())),
            }
        }
        (passed, None)
    }

    #[tokio::test]
    async fn messages_pass_unchanged_however_the_body_is_cut() {
        let v = validator();
        let (a, b) =
            (framed(&v, "0190f0c2-7b1e-7a3c-9d2e-4f5a6b7c8d9e"), framed(&v, "0190f0c2-7b1e-7a3c-9d2e-4f5a6b7c8d9f"));
        let whole: Vec<u8> = [a.clone(), b.clone()].concat();
        for cut in [vec![whole.clone()], whole.chunks(3).map(<[u8]>::to_vec).collect(), vec![a.clone(), b.clone()]] {
            let (passed, error) = read(cut).await;
            assert!(error.is_none(), "{error:?}");
            assert_eq!(passed, whole);
        }
    }

    #[tokio::test]
    async fn a_message_that_breaks_a_rule_ends_the_body_with_the_status() {
        let v = validator();
        let good = framed(&v, "0190f0c2-7b1e-7a3c-9d2e-4f5a6b7c8d9e");
        let bad = framed(&v, "42");
        let (passed, error) = read([good.clone(), bad].concat().chunks(4).map(<[u8]>::to_vec).collect()).await;
        assert_eq!(passed, good, "the good message before it passes");
        let status = error.expect("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with("id: must be a valid UUID [string.uuid]"), "{}", status.message());
    }

    #[tokio::test]
    async fn a_cut_or_compressed_message_passes_to_tonic_unchecked() {
        let v = validator();
        let bad = framed(&v, "42");
        let cut = bad[..bad.len() - 1].to_vec();
        let (passed, error) = read(vec![cut.clone()]).await;
        assert!(error.is_none() && passed == cut, "{error:?}");
        let mut compressed = bad.clone();
        compressed[0] = 1;
        let (passed, error) = read(vec![compressed.clone()]).await;
        assert!(error.is_none() && passed == compressed, "{error:?}");
    }
}
