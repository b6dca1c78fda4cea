//! A circuit breaker with Sentinel's semantics: closed while the error ratio
//! and slow-call ratio over a sliding window stay under their thresholds (and
//! the window holds at least `min_requests` calls); open for `open_ms`,
//! answering at once; then half-open, letting `probes` calls through: all
//! succeed → closed (statistics reset), one fails → open again.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::settings::BreakerRule;

/// The breaker's state, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Which bucket-length slot since the breaker's start this counts.
    slot: u64,
    total: u32,
    errors: u32,
    slow: u32,
}

#[derive(Debug)]
struct Inner {
    state: State,
    open_until: Instant,
    /// Probes let through and not yet answered, and answered well.
    probes_out: u32,
    probes_ok: u32,
    buckets: Vec<Bucket>,
    /// Why it last opened.
    reason: String,
}

/// One breaker (one method of one service, on the calling side).
#[derive(Debug)]
pub struct Breaker {
    rule: BreakerRule,
    started: Instant,
    bucket_len: Duration,
    inner: Mutex<Inner>,
}

/// Refused: the breaker is open (or half-open with its probes out).
#[derive(Debug, Clone, PartialEq)]
pub struct Refused {
    pub retry_in: Duration,
    pub reason: String,
}

/// A call let through: report how it went.
#[derive(Debug)]
#[must_use = "report the outcome with Breaker::record"]
pub struct Permit {
    probe: bool,
}

const BUCKETS: u32 = 10;

impl Breaker {
    pub fn new(rule: BreakerRule) -> Self {
        let bucket_len = Duration::from_millis((rule.window_ms / u64::from(BUCKETS)).max(10));
        Self {
            rule,
            started: Instant::now(),
            bucket_len,
            inner: Mutex::new(Inner {
                state: State::Closed,
                open_until: Instant::now(),
                probes_out: 0,
                probes_ok: 0,
                buckets: vec![Bucket::default(); BUCKETS as usize],
                reason: String::new(),
            }),
        }
    }

    pub fn rule(&self) -> &BreakerRule {
        &self.rule
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state now (an open breaker whose time is up reads half-open).
    pub fn state(&self) -> State {
        let inner = self.lock();
        if inner.state == State::Open && Instant::now() >= inner.open_until { State::HalfOpen } else { inner.state }
    }

    /// Lets a call through, or refuses it.
    pub fn acquire(&self) -> Result<Permit, Refused> {
        self.acquire_at(Instant::now())
    }

    pub(crate) fn acquire_at(&self, now: Instant) -> Result<Permit, Refused> {
        let mut inner = self.lock();
        if inner.state == State::Open {
            if now < inner.open_until {
                return Err(Refused { retry_in: inner.open_until - now, reason: inner.reason.clone() });
            }
            inner.state = State::HalfOpen;
            inner.probes_out = 0;
            inner.probes_ok = 0;
        }
        if inner.state == State::HalfOpen {
            if inner.probes_out + inner.probes_ok >= self.rule.probes {
                return Err(Refused {
                    retry_in: Duration::from_millis(self.rule.open_ms.min(1_000)),
                    reason: format!("half-open, {} probe calls already out", inner.probes_out),
                });
            }
            inner.probes_out += 1;
            return Ok(Permit { probe: true });
        }
        Ok(Permit { probe: false })
    }

    /// Reports a call's outcome: `failed` (a server-side failure) and how long it took.
    pub fn record(&self, permit: Permit, failed: bool, latency: Duration) {
        self.record_at(permit, failed, latency, Instant::now());
    }

    pub(crate) fn record_at(&self, permit: Permit, failed: bool, latency: Duration, now: Instant) {
        let slow = self.rule.slow_ratio > 0.0 && latency >= Duration::from_millis(self.rule.slow_ms);
        let mut inner = self.lock();
        if permit.probe {
            if inner.state != State::HalfOpen {
                return;
            }
            inner.probes_out = inner.probes_out.saturating_sub(1);
            if failed || slow {
                let reason = if failed { "a probe call failed" } else { "a probe call was slow" };
                self.open(&mut inner, now, reason.into());
            } else {
                inner.probes_ok += 1;
                if inner.probes_ok >= self.rule.probes {
                    inner.state = State::Closed;
                    inner.buckets.iter_mut().for_each(|b| *b = Bucket::default());
                }
            }
            return;
        }
        if inner.state != State::Closed {
            return;
        }
        let slot = now.saturating_duration_since(self.started).as_millis() as u64
            / (self.bucket_len.as_millis() as u64).max(1);
        let index = (slot % u64::from(BUCKETS)) as usize;
        let bucket = &mut inner.buckets[index];
        if bucket.slot != slot {
            *bucket = Bucket { slot, ..Bucket::default() };
        }
        bucket.total += 1;
        bucket.errors += u32::from(failed);
        bucket.slow += u32::from(slow);
        let (total, errors, slow_calls) = inner
            .buckets
            .iter()
            .filter(|b| slot.saturating_sub(b.slot) < u64::from(BUCKETS))
            .fold((0u32, 0u32, 0u32), |(t, e, s), b| (t + b.total, e + b.errors, s + b.slow));
        if total < self.rule.min_requests.max(1) {
            return;
        }
        let window = Duration::from_millis(self.rule.window_ms);
        let error_ratio = f64::from(errors) / f64::from(total);
        let slow_ratio = f64::from(slow_calls) / f64::from(total);
        if self.rule.error_ratio > 0.0 && error_ratio >= self.rule.error_ratio {
            let reason =
                format!("error ratio {error_ratio:.2} ≥ {:.2} over {total} calls in {window:?}", self.rule.error_ratio);
            self.open(&mut inner, now, reason);
        } else if self.rule.slow_ratio > 0.0 && slow_ratio >= self.rule.slow_ratio {
            let reason = format!(
                "slow-call ratio {slow_ratio:.2} ≥ {:.2} (calls over {} ms) over {total} calls in {window:?}",
                self.rule.slow_ratio, self.rule.slow_ms
            );
            self.open(&mut inner, now, reason);
        }
    }

    fn open(&self, inner: &mut Inner, now: Instant, reason: String) {
        inner.state = State::Open;
        inner.open_until = now + Duration::from_millis(self.rule.open_ms);
        inner.probes_out = 0;
        inner.probes_ok = 0;
        inner.reason = reason;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> BreakerRule {
        BreakerRule {
            enabled: true,
            error_ratio: 0.5,
            slow_ratio: 0.0,
            slow_ms: 100,
            min_requests: 10,
            window_ms: 1_000,
            open_ms: 500,
            probes: 2,
        }
    }

    fn call(b: &Breaker, now: Instant, failed: bool) -> bool {
        match b.acquire_at(now) {
            Ok(p) => {
                b.record_at(p, failed, Duration::from_millis(1), now);
                true
            }
            Err(_) => false,
        }
    }

    #[test]
    fn opens_on_the_error_ratio_then_probes_and_closes() {
        let b = Breaker::new(rule());
        let t0 = Instant::now();
        // Under min_requests: no decision even at 100% errors.
        for _ in 0..9 {
            assert!(call(&b, t0, true));
        }
        assert_eq!(b.lock().state, State::Closed);
        assert!(call(&b, t0, true), "the tenth call goes through and opens it");
        assert_eq!(b.lock().state, State::Open);
        let refused = b.acquire_at(t0 + Duration::from_millis(100)).expect_err("open");
        assert!(refused.reason.contains("error ratio 1.00 ≥ 0.50"), "{}", refused.reason);
        assert_eq!(refused.retry_in, Duration::from_millis(400));
        // Half-open after open_ms: two probes, a third refused while they are out.
        let t1 = t0 + Duration::from_millis(500);
        let p1 = b.acquire_at(t1).expect("probe 1");
        let p2 = b.acquire_at(t1).expect("probe 2");
        assert!(b.acquire_at(t1).is_err(), "no more than `probes` at once");
        b.record_at(p1, false, Duration::from_millis(1), t1);
        b.record_at(p2, false, Duration::from_millis(1), t1);
        assert_eq!(b.lock().state, State::Closed);
        assert!(call(&b, t1, false));
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let b = Breaker::new(rule());
        let t0 = Instant::now();
        for _ in 0..10 {
            call(&b, t0, true);
        }
        let t1 = t0 + Duration::from_millis(600);
        let p = b.acquire_at(t1).expect("probe");
        b.record_at(p, true, Duration::from_millis(1), t1);
        assert!(b.acquire_at(t1 + Duration::from_millis(10)).is_err());
        assert!(b.acquire_at(t1 + Duration::from_millis(500)).is_ok(), "half-open again after open_ms");
    }

    #[test]
    fn slow_calls_open_it_and_old_buckets_age_out() {
        let b = Breaker::new(BreakerRule { error_ratio: 0.0, slow_ratio: 0.6, ..rule() });
        let t0 = Instant::now();
        for i in 0..10 {
            let p = b.acquire_at(t0).expect("closed");
            let latency = Duration::from_millis(if i < 5 { 150 } else { 1 });
            b.record_at(p, false, latency, t0);
        }
        assert_eq!(b.lock().state, State::Closed, "5 of 10 slow is under 0.6");
        // A window later the old calls no longer count.
        let t1 = t0 + Duration::from_millis(1_100);
        for _ in 0..10 {
            let p = b.acquire_at(t1).expect("closed");
            b.record_at(p, false, Duration::from_millis(150), t1);
        }
        assert_eq!(b.lock().state, State::Open);
        assert!(b.lock().reason.contains("slow-call ratio 1.00"), "{}", b.lock().reason);
    }

    #[test]
    fn failures_under_the_ratio_keep_it_closed() {
        let b = Breaker::new(rule());
        let t0 = Instant::now();
        for i in 0..100 {
            assert!(call(&b, t0, i % 3 == 0), "a third failing stays under 0.5");
        }
    }
}
