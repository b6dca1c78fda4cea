//! Deadlines that travel with a call.
//!
//! A server layer reads the incoming `grpc-timeout` and keeps the deadline in
//! a task-local for the handler; every balanced-channel call made while
//! serving it inherits what is left (minus the time spent), sent on as its own
//! `grpc-timeout`. A call that outlives its deadline ends with
//! DEADLINE_EXCEEDED instead of doing work nobody waits for.

use std::{
    future::Future,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::Either;
use http::HeaderValue;
use tokio::time::Instant;
use tower::{Layer, Service};

tokio::task_local! {
    static DEADLINE: Instant;
}

/// The deadline of the call being served on this task, if it has one.
pub fn current() -> Option<Instant> {
    DEADLINE.try_with(|d| *d).ok()
}

/// Runs `f` with `deadline` as the current deadline.
pub async fn with_deadline<F: Future>(deadline: Instant, f: F) -> F::Output {
    DEADLINE.scope(deadline, f).await
}

/// The header's name, ready-made (a `&str` look-up parses the name each time).
pub const GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// Parses a `grpc-timeout` value: up to 8 digits and a unit (H M S m u n).
pub fn parse_grpc_timeout(value: &HeaderValue) -> Option<Duration> {
    let s = value.to_str().ok()?;
    if s.len() < 2 || s.len() > 9 {
        return None;
    }
    let (digits, unit) = s.split_at(s.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a `grpc-timeout` value with the finest unit that fits 8 digits.
pub fn format_grpc_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let (n, unit) = if d.as_micros() <= MAX {
        (d.as_micros().max(1), b'u')
    } else if d.as_millis() <= MAX {
        (d.as_millis(), b'm')
    } else {
        (u128::from(d.as_secs()).min(MAX), b'S')
    };
    // At most 8 digits and the unit, written without the formatting machinery.
    let mut n = n as u32;
    let mut text = [0u8; 9];
    let mut at = text.len() - 1;
    text[at] = unit;
    loop {
        at -= 1;
        text[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    HeaderValue::from_bytes(&text[at..]).unwrap_or_else(|_| HeaderValue::from_static("1S"))
}

/// A call's deadline and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallDeadline {
    pub at: Instant,
    /// Whether it is the request's own `grpc-timeout` (not a sooner one
    /// inherited from the call being served): the header already says it.
    pub own: bool,
}

/// The deadline for an outgoing call: the sooner of its own `grpc-timeout`
/// and the one inherited from the call being served, and where it came from.
pub fn call_deadline<B>(req: &http::Request<B>, now: Instant) -> Option<CallDeadline> {
    let own = req.headers().get(&GRPC_TIMEOUT).and_then(parse_grpc_timeout).map(|t| now + t);
    match (own, current()) {
        (Some(a), Some(b)) if b < a => Some(CallDeadline { at: b, own: false }),
        (Some(a), _) => Some(CallDeadline { at: a, own: true }),
        (None, Some(b)) => Some(CallDeadline { at: b, own: false }),
        (None, None) => None,
    }
}

/// Makes `headers`' `grpc-timeout` the sooner of its own and `limit`, whose
/// header is `value` (formatted once by the caller); whether it set `value`.
/// An own value that is sooner stays byte for byte, and one equal to
/// `value` is not even parsed, so a value a caller repeats call after call
/// keeps its single byte in HPACK's table on the next hop.
pub fn cap_grpc_timeout(headers: &mut http::HeaderMap, limit: Duration, value: &HeaderValue) -> bool {
    let own = headers.get(&GRPC_TIMEOUT);
    if own == Some(value) {
        return false;
    }
    let own = own.and_then(parse_grpc_timeout);
    let later = own.is_none_or(|own| own > limit);
    if later {
        headers.insert(GRPC_TIMEOUT, value.clone());
    }
    later
}

/// The `grpc-timeout` of a call sent now with `left` to go, when the value
/// differs from call to call (an inherited deadline, a retry): marked so
/// HPACK sends it without adding it to the connection's header table, where
/// a new value per call would push out the headers every call repeats.
pub fn remaining_grpc_timeout(left: Duration) -> HeaderValue {
    let mut value = format_grpc_timeout(left);
    value.set_sensitive(true);
    value
}

/// Server layer: makes an incoming `grpc-timeout` the task's deadline.
#[derive(Debug, Clone, Copy, Default)]
pub struct DeadlineLayer;

impl<S> Layer<S> for DeadlineLayer {
    type Service = DeadlineService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService { inner }
    }
}

#[derive(Debug, Clone)]
pub struct DeadlineService<S> {
    inner: S,
}

type ScopedFuture<F> = Either<tokio::task::futures::TaskLocalFuture<Instant, F>, F>;

impl<S, B> Service<http::Request<B>> for DeadlineService<S>
where
    S: Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ScopedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let deadline = req.headers().get(&GRPC_TIMEOUT).and_then(parse_grpc_timeout).map(|t| Instant::now() + t);
        let fut = self.inner.call(req);
        match deadline {
            Some(d) => Either::Left(DEADLINE.scope(d, fut)),
            None => Either::Right(fut),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_round_trips() {
        for (text, d) in
            [("5S", Duration::from_secs(5)), ("250m", Duration::from_millis(250)), ("1H", Duration::from_secs(3600))]
        {
            assert_eq!(parse_grpc_timeout(&HeaderValue::from_static(text)), Some(d));
        }
        for bad in ["", "5", "S", "123456789S", "5x", "-5S"] {
            assert_eq!(parse_grpc_timeout(&HeaderValue::from_static(bad)), None, "{bad:?}");
        }
        for d in [
            Duration::from_micros(1),
            Duration::from_millis(1500),
            Duration::from_secs(500),
            Duration::from_secs(10 * 86400),
        ] {
            let back = parse_grpc_timeout(&format_grpc_timeout(d)).unwrap();
            assert!(
                back <= d.max(Duration::from_micros(1))
                    && back + Duration::from_secs(1) >= d.min(Duration::from_secs(99_999_999)),
                "{d:?} -> {back:?}"
            );
        }
    }

    #[test]
    fn grpc_timeout_is_formatted_in_the_finest_unit_that_fits() {
        for (d, text) in [
            (Duration::ZERO, "1u"),
            (Duration::from_nanos(1_500), "1u"),
            (Duration::from_millis(250), "250000u"),
            (Duration::from_secs(10), "10000000u"),
            (Duration::from_secs(100), "100000m"),
            (Duration::from_secs(200_000), "200000S"),
            (Duration::from_secs(u64::MAX), "99999999S"),
        ] {
            assert_eq!(format_grpc_timeout(d).to_str().unwrap(), text, "{d:?}");
        }
        assert!(remaining_grpc_timeout(Duration::from_secs(1)).is_sensitive());
    }

    #[test]
    fn a_cap_keeps_a_sooner_value_as_it_came_and_replaces_a_later_or_missing_one() {
        let limit = Duration::from_secs(15);
        let value = format_grpc_timeout(limit);
        let after = |own: Option<&'static str>| {
            let mut headers = http::HeaderMap::new();
            if let Some(own) = own {
                headers.insert("grpc-timeout", HeaderValue::from_static(own));
            }
            let set = cap_grpc_timeout(&mut headers, limit, &value);
            (headers.get("grpc-timeout").map(|v| v.to_str().unwrap_or_default().to_owned()), set)
        };
        let configured = value.to_str().unwrap_or_default().to_owned();
        assert_eq!(after(Some("2S")), (Some("2S".to_owned()), false));
        assert_eq!(after(Some("250m")), (Some("250m".to_owned()), false));
        assert_eq!(after(Some("1M")), (Some(configured.clone()), true));
        assert_eq!(after(None), (Some(configured.clone()), true));
        assert_eq!(after(Some("soon")), (Some(configured.clone()), true));
        assert_eq!(after(Some("15000000u")), (Some(configured), false));
    }

    #[tokio::test]
    async fn inherited_deadline_wins_when_sooner() {
        let now = Instant::now();
        let req = http::Request::builder().header("grpc-timeout", "10S").body(()).unwrap();
        assert_eq!(call_deadline(&req, now).map(|d| d.at), Some(now + Duration::from_secs(10)));
        let inner = now + Duration::from_secs(1);
        let got = with_deadline(inner, async { call_deadline(&req, now).map(|d| d.at) }).await;
        assert_eq!(got, Some(inner));
        assert_eq!(call_deadline(&req, now), Some(CallDeadline { at: now + Duration::from_secs(10), own: true }));
        let got = with_deadline(inner, async { call_deadline(&req, now) }).await;
        assert_eq!(got, Some(CallDeadline { at: inner, own: false }));
        let later = now + Duration::from_secs(60);
        let got = with_deadline(later, async { call_deadline(&req, now) }).await;
        assert_eq!(got, Some(CallDeadline { at: now + Duration::from_secs(10), own: true }));
        assert_eq!(current(), None, "the scope ends with the future");
    }

    #[tokio::test]
    async fn the_server_layer_makes_grpc_timeout_the_tasks_deadline() {
        use tower::ServiceExt;
        let svc = DeadlineLayer
            .layer(tower::service_fn(|_: http::Request<()>| async { Ok::<_, std::convert::Infallible>(current()) }));
        let req = http::Request::builder().header("grpc-timeout", "2S").body(()).unwrap();
        let seen = svc.clone().oneshot(req).await.unwrap().expect("a deadline inside the handler");
        let left = seen - Instant::now();
        assert!(left <= Duration::from_secs(2) && left > Duration::from_millis(1500), "{left:?}");
        let none = svc.oneshot(http::Request::new(())).await.unwrap();
        assert_eq!(none, None, "no header, no deadline");
    }
}
