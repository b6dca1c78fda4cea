//! One balancer shared by every clone of a channel, driven from the callers'
//! own tasks.
//!
//! A p2c balancer needs `&mut self` for `poll_ready` and `call`. The usual
//! answer, `tower::buffer`, gives it one worker task and sends every call
//! there and its response future back: two queue hops and two task wake-ups
//! per call. Here a caller takes a short lock instead, asks the balancer for
//! readiness and makes its call under that lock, then awaits the response in
//! its own task. Nothing is queued while an endpoint is ready.
//!
//! When none is, the caller waits. Inner services keep only the last waker
//! they were polled with, so every waiting caller is also listed here; a
//! caller that finds the balancer ready, or gives up waiting, wakes the next
//! one, which polls again (and is then the one the balancer wakes).

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
};

use tower::{BoxError, Service};

/// A cheap-to-clone handle on one service; always ready (readiness is taken
/// inside the call, under the lock).
pub(crate) struct Shared<S> {
    state: Arc<Mutex<State<S>>>,
}

impl<S> Clone for Shared<S> {
    fn clone(&self) -> Self {
        Self { state: self.state.clone() }
    }
}

struct State<S> {
    service: S,
    /// Callers waiting for readiness, oldest first, by ticket.
    waiting: VecDeque<(u64, Waker)>,
    next_ticket: u64,
}

impl<S> State<S> {
    fn forget(&mut self, ticket: u64) {
        if let Some(i) = self.waiting.iter().position(|(t, _)| *t == ticket) {
            self.waiting.remove(i);
        }
    }

    fn wake_next(&mut self) {
        if let Some((_, waker)) = self.waiting.front() {
            waker.wake_by_ref();
        }
    }
}

impl<S> Shared<S> {
    pub(crate) fn new(service: S) -> Self {
        Self { state: Arc::new(Mutex::new(State { service, waiting: VecDeque::new(), next_ticket: 0 })) }
    }
}

fn lock<S>(state: &Mutex<State<S>>) -> MutexGuard<'_, State<S>> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<S, Req> Service<Req> for Shared<S>
where
    S: Service<Req, Error = BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = SharedFuture<S, Req>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        SharedFuture { stage: Stage::Waiting { shared: self.state.clone(), req: Some(req), ticket: None } }
    }
}

pin_project_lite::pin_project! {
    /// A call waiting for the balancer, then the balancer's own response
    /// future (kept inline: no allocation of its own).
    pub(crate) struct SharedFuture<S: Service<Req>, Req> {
        #[pin]
        stage: Stage<S, Req>,
    }

    impl<S: Service<Req>, Req> PinnedDrop for SharedFuture<S, Req> {
        fn drop(this: Pin<&mut Self>) {
            // A caller giving up while it waits may hold the balancer's only
            // registered waker: hand the turn on.
            if let StageProj::Waiting { shared, ticket: Some(t), .. } = this.project().stage.project() {
                let mut state = lock(shared);
                state.forget(*t);
                state.wake_next();
            }
        }
    }
}

pin_project_lite::pin_project! {
    #[project = StageProj]
    enum Stage<S: Service<Req>, Req> {
        Waiting { shared: Arc<Mutex<State<S>>>, req: Option<Req>, ticket: Option<u64> },
        Called { #[pin] fut: S::Future },
        Done,
    }
}

impl<S, Req> Future for SharedFuture<S, Req>
where
    S: Service<Req, Error = BoxError>,
{
    type Output = Result<S::Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut stage = self.project().stage;
        loop {
            match stage.as_mut().project() {
                StageProj::Waiting { shared, req, ticket } => {
                    let mut state = lock(shared);
                    let ready = state.service.poll_ready(cx);
                    let mine = ticket.take();
                    let next = match ready {
                        Poll::Pending => {
                            let t = match mine {
                                Some(t) => {
                                    if let Some(entry) = state.waiting.iter_mut().find(|(w, _)| *w == t) {
                                        entry.1.clone_from(cx.waker());
                                    }
                                    t
                                }
                                None => {
                                    let t = state.next_ticket;
                                    state.next_ticket += 1;
                                    state.waiting.push_back((t, cx.waker().clone()));
                                    t
                                }
                            };
                            *ticket = Some(t);
                            return Poll::Pending;
                        }
                        Poll::Ready(ready) => {
                            if let Some(t) = mine {
                                state.forget(t);
                            }
                            // Whoever waits next polls again: the balancer may
                            // hold this caller's waker, not theirs.
                            state.wake_next();
                            match ready {
                                Ok(()) => {
                                    let req = req.take().expect("a waiting call holds its request");
                                    Ok(state.service.call(req))
                                }
                                Err(e) => Err(e),
                            }
                        }
                    };
                    drop(state);
                    match next {
                        Ok(fut) => stage.set(Stage::Called { fut }),
                        Err(e) => {
                            stage.set(Stage::Done);
                            return Poll::Ready(Err(e));
                        }
                    }
                }
                StageProj::Called { fut } => {
                    let out = fut.poll(cx);
                    if out.is_ready() {
                        stage.set(Stage::Done);
                    }
                    return out;
                }
                StageProj::Done => panic!("SharedFuture polled after completion"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::ServiceExt;
    use tower_test::mock;

    use super::*;

    type Mock = tower::util::MapErr<mock::Mock<u32, u32>, fn(BoxError) -> BoxError>;

    /// A shared handle on a mock that keeps only the last waker it saw.
    fn shared_mock() -> (Shared<Mock>, mock::Handle<u32, u32>) {
        let (service, handle) = mock::pair::<u32, u32>();
        (Shared::new(service.map_err(BoxError::from as fn(BoxError) -> BoxError)), handle)
    }

    /// The next request to reach the mock; fails with `woken` if none comes in 2 s.
    async fn next_within_2s(
        handle: &mut mock::Handle<u32, u32>,
        woken: &str,
    ) -> (u32, tower_test::mock::SendResponse<u32>) {
        tokio::time::timeout(Duration::from_secs(2), handle.next_request()).await.expect(woken).expect("request")
    }

    #[tokio::test]
    async fn calls_go_through_when_ready() {
        let (shared, mut handle) = shared_mock();
        handle.allow(1);
        let call = tokio::spawn(shared.clone().oneshot(7));
        let (req, respond) = handle.next_request().await.expect("request");
        assert_eq!(req, 7);
        respond.send_response(8);
        assert_eq!(call.await.unwrap().unwrap(), 8);
    }

    /// Many callers wait on a balancer that is not ready; each is released as
    /// capacity appears, none is forgotten (the inner mock keeps only the
    /// last waker it saw).
    #[tokio::test]
    async fn every_waiting_caller_is_woken() {
        let (shared, mut handle) = shared_mock();
        handle.allow(0);
        let calls: Vec<_> = (0..20).map(|i| tokio::spawn(shared.clone().oneshot(i))).collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut seen = Vec::new();
        for _ in 0..20 {
            handle.allow(1);
            let (req, respond) = next_within_2s(&mut handle, "a waiting caller was never woken").await;
            respond.send_response(req * 10);
            seen.push(req);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..20).collect::<Vec<_>>());
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), i as u32 * 10);
        }
    }

    /// A waiting caller that gives up passes its turn on, so the others still
    /// get through.
    #[tokio::test]
    async fn a_dropped_waiter_hands_its_turn_on() {
        let (shared, mut handle) = shared_mock();
        handle.allow(0);
        let first = tokio::spawn(shared.clone().oneshot(1));
        tokio::time::sleep(Duration::from_millis(10)).await;
        // The last to poll holds the mock's waker; it gives up.
        let last = tokio::spawn(shared.clone().oneshot(2));
        tokio::time::sleep(Duration::from_millis(10)).await;
        last.abort();
        let _ = last.await;
        handle.allow(1);
        let (req, respond) = next_within_2s(&mut handle, "the remaining caller was never woken").await;
        assert_eq!(req, 1);
        respond.send_response(10);
        assert_eq!(first.await.unwrap().unwrap(), 10);
    }

    #[tokio::test]
    async fn readiness_errors_reach_the_caller() {
        let (shared, mut handle) = shared_mock();
        handle.send_error("broken");
        let err = shared.oneshot(1).await.unwrap_err();
        assert_eq!(err.to_string(), "broken");
    }
}
