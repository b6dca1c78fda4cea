//! Exponential backoff with jitter, for loops that retry a remote call
//! (re-registering, re-watching, reconnecting a broker).

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with full jitter between `base` and `cap`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap, current: base }
    }

    /// The next delay: a random point in (0, current], then current doubles.
    pub fn next_delay(&mut self) -> Duration {
        let upper = self.current;
        self.current = (self.current * 2).min(self.cap);
        upper.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap() {
        let mut b = Backoff::new(Duration::from_millis(10), Duration::from_millis(80));
        let delays: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(80)));
        assert!(delays[5] >= Duration::from_millis(40));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(10));
    }
}
