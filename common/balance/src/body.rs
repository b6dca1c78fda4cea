//! A response body that reports the end of its call to the endpoint.
//!
//! A gRPC response's headers come back before its message and trailers, so a
//! call that completes on the response under-counts in-flight work (streaming
//! calls most of all) and never sees the status. This body holds the call's
//! [`CallGuard`] until its trailers arrive, reads `grpc-status` from them, and
//! lets the guard record latency and outcome; a body dropped early (the caller
//! gave up) records neither success nor failure.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::endpoint::{CallGuard, Outcome};

pin_project! {
    /// The body of a balanced channel's responses.
    #[derive(Debug)]
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        guard: Option<CallGuard>,
    }
}

impl<B> TrackedBody<B> {
    pub(crate) fn new(inner: B, guard: Option<CallGuard>) -> Self {
        Self { inner, guard }
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(trailers) = f.trailers_ref() {
                    if let Some(guard) = this.guard.take() {
                        guard.finish(Outcome::from_headers(trailers).unwrap_or(Outcome::Success));
                    }
                }
            }
            // A stream reset or a connection lost mid-response.
            Some(Err(_)) => {
                if let Some(guard) = this.guard.take() {
                    guard.finish(Outcome::Failure);
                }
            }
            // gRPC always ends with trailers; an end without them is a broken response.
            None => {
                if let Some(guard) = this.guard.take() {
                    guard.finish(Outcome::Failure);
                }
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
