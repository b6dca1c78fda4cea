//! Google SRE adaptive throttling (the calling side): over a sliding window,
//! a call is refused locally with probability
//! max(0, (requests − k × accepts) / (requests + 1)), where accepts are calls
//! the backend did not turn away as overloaded or unavailable. A healthy
//! backend is never throttled (requests ≤ k × accepts); one that refuses
//! everything sees only a trickle of calls, enough to notice recovery.

use std::{sync::Mutex, time::Instant};

use crate::settings::ThrottlingSettings;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    slot: u64,
    requests: u64,
    accepts: u64,
}

const BUCKETS: u64 = 10;

#[derive(Debug)]
pub struct Throttle {
    k: f64,
    started: Instant,
    bucket_ms: u64,
    buckets: Mutex<[Bucket; BUCKETS as usize]>,
}

impl Throttle {
    pub fn new(settings: &ThrottlingSettings) -> Self {
        Self {
            k: settings.k,
            started: Instant::now(),
            bucket_ms: (settings.window_ms / BUCKETS).max(1),
            buckets: Mutex::new([Bucket::default(); BUCKETS as usize]),
        }
    }

    fn slot(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_millis() as u64 / self.bucket_ms
    }

    fn totals(&self, now: Instant) -> (u64, u64) {
        let slot = self.slot(now);
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        buckets
            .iter()
            .filter(|b| slot.saturating_sub(b.slot) < BUCKETS)
            .fold((0, 0), |(r, a), b| (r + b.requests, a + b.accepts))
    }

    /// The probability a call is refused now.
    pub fn reject_probability(&self) -> f64 {
        self.probability(Instant::now())
    }

    fn probability(&self, now: Instant) -> f64 {
        let (requests, accepts) = self.totals(now);
        ((requests as f64 - self.k * accepts as f64) / (requests as f64 + 1.0)).max(0.0)
    }

    /// Whether to refuse this call locally; `draw` is uniform in [0, 1).
    pub fn refuse(&self, draw: f64) -> Option<f64> {
        self.refuse_at(draw, Instant::now())
    }

    pub(crate) fn refuse_at(&self, draw: f64, now: Instant) -> Option<f64> {
        let p = self.probability(now);
        (draw < p).then_some(p)
    }

    /// Records a call that went to the backend (refused ones count as requests too).
    pub fn record(&self, accepted: bool) {
        self.record_at(accepted, Instant::now());
    }

    pub(crate) fn record_at(&self, accepted: bool, now: Instant) {
        let slot = self.slot(now);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let bucket = &mut buckets[(slot % BUCKETS) as usize];
        if bucket.slot != slot {
            *bucket = Bucket { slot, ..Bucket::default() };
        }
        bucket.requests += 1;
        bucket.accepts += u64::from(accepted);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_healthy_backend_is_never_throttled_and_a_failing_one_mostly_is() {
        let t = Throttle::new(&ThrottlingSettings { enabled: true, k: 2.0, window_ms: 10_000 });
        for _ in 0..100 {
            t.record(true);
        }
        assert_eq!(t.reject_probability(), 0.0);
        // Half refused: requests 200, accepts 100 → (200 − 200) / 201 = 0.
        for _ in 0..100 {
            t.record(false);
        }
        assert_eq!(t.reject_probability(), 0.0);
        for _ in 0..800 {
            t.record(false);
        }
        // 1000 requests, 100 accepts: (1000 − 200) / 1001 ≈ 0.8.
        let p = t.reject_probability();
        assert!((p - 800.0 / 1001.0).abs() < 1e-9, "{p}");
        assert!(t.refuse(0.5).is_some());
        assert!(t.refuse(0.9).is_none());
    }

    #[test]
    fn the_window_forgets() {
        let t = Throttle::new(&ThrottlingSettings { enabled: true, k: 2.0, window_ms: 1_000 });
        let t0 = t.started;
        for _ in 0..100 {
            t.record_at(false, t0);
        }
        assert!(t.totals(t0).0 == 100);
        assert_eq!(t.totals(t0 + Duration::from_millis(1_100)), (0, 0));
    }
}
