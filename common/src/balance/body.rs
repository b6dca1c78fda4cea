//! A response body that holds a load handle until the stream ends.
//!
//! A gRPC response's headers come back before its message and trailers, so a
//! load tracker that completes on the response (tower's `CompleteOnResponse`)
//! under-counts in-flight work, streaming calls most of all. This one counts a
//! call as in flight until its trailers (or an error) arrive, or the body is
//! dropped.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::load::completion::TrackCompletion;

pin_project! {
    /// A body that drops `handle` when it ends.
    #[derive(Debug)]
    pub struct TrackedBody<B, H> {
        #[pin]
        inner: B,
        handle: Option<H>,
    }
}

impl<B, H> TrackedBody<B, H> {
    pub fn new(inner: B, handle: H) -> Self {
        Self { inner, handle: Some(handle) }
    }
}

impl<B: Body, H> Body for TrackedBody<B, H> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        let done = match &frame {
            None | Some(Err(_)) => true,
            Some(Ok(f)) => f.is_trailers(),
        };
        if done {
            this.handle.take();
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

/// Completes a call's load handle when its response body ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct CompleteOnBodyEnd;

impl<H, B> TrackCompletion<H, http::Response<B>> for CompleteOnBodyEnd {
    type Output = http::Response<TrackedBody<B, H>>;

    fn track_completion(&self, handle: H, response: http::Response<B>) -> Self::Output {
        response.map(|body| TrackedBody::new(body, handle))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// A body of one data frame then trailers.
    struct TwoFrames(u8);

    impl Body for TwoFrames {
        type Data = std::io::Cursor<Vec<u8>>;
        type Error = std::convert::Infallible;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
            self.0 += 1;
            Poll::Ready(match self.0 {
                1 => Some(Ok(Frame::data(std::io::Cursor::new(vec![1])))),
                2 => Some(Ok(Frame::trailers(http::HeaderMap::new()))),
                _ => None,
            })
        }
    }

    #[tokio::test]
    async fn handle_lives_until_trailers() {
        use futures::future::poll_fn;
        let handle = Arc::new(());
        let mut body = Box::pin(TrackedBody::new(TwoFrames(0), handle.clone()));
        assert_eq!(Arc::strong_count(&handle), 2);
        let _ = poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        assert_eq!(Arc::strong_count(&handle), 2, "still in flight after the data frame");
        let _ = poll_fn(|cx| body.as_mut().poll_frame(cx)).await;
        assert_eq!(Arc::strong_count(&handle), 1, "complete once trailers arrive");
    }
}
