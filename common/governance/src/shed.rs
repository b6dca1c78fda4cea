//! Adaptive load shedding, in the spirit of BBR (Kratos, go-zero): the
//! process can serve about `max_pass × min_rt` calls at once, where
//! `max_pass` is the most calls completed in one bucket of the window and
//! `min_rt` the shortest average latency of a bucket, in buckets. A call that
//! arrives with more than that in flight (and at least `min_in_flight`), while
//! the CPU is at its threshold (if one is set), is refused at once instead of
//! queueing behind the others, so the calls admitted keep their latency.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::settings::SheddingSettings;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    slot: u64,
    passed: u64,
    rt_sum_us: u64,
}

/// The shedder of one process (one per server).
#[derive(Debug)]
pub struct Shedder {
    settings: SheddingSettings,
    started: Instant,
    bucket_len: Duration,
    in_flight: AtomicI64,
    buckets: Mutex<Vec<Bucket>>,
    /// Calls refused since start.
    pub(crate) refused: AtomicU64,
}

/// Why a call was shed.
#[derive(Debug, Clone, PartialEq)]
pub struct Shed {
    pub in_flight: i64,
    pub capacity: u64,
    pub cpu: f64,
}

/// One admitted call; dropping it records its completion.
#[derive(Debug)]
pub struct InFlight {
    shedder: Arc<Shedder>,
    started: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shedder.in_flight.fetch_sub(1, Ordering::AcqRel);
        let now = Instant::now();
        self.shedder.complete(now.saturating_duration_since(self.started), now);
    }
}

impl Shedder {
    pub fn new(settings: SheddingSettings) -> Self {
        let bucket_len = Duration::from_millis((settings.window_ms / u64::from(settings.buckets.max(1))).max(1));
        Self {
            buckets: Mutex::new(vec![Bucket::default(); settings.buckets.max(1) as usize]),
            settings,
            started: Instant::now(),
            bucket_len,
            in_flight: AtomicI64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    pub fn settings(&self) -> &SheddingSettings {
        &self.settings
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Acquire)
    }

    fn slot(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.started).as_micros() as u64 / (self.bucket_len.as_micros() as u64).max(1)
    }

    fn complete(&self, rt: Duration, now: Instant) {
        let slot = self.slot(now);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let n = buckets.len() as u64;
        let bucket = &mut buckets[(slot % n) as usize];
        if bucket.slot != slot {
            *bucket = Bucket { slot, ..Bucket::default() };
        }
        bucket.passed += 1;
        bucket.rt_sum_us += rt.as_micros() as u64;
    }

    /// Calls the process can have in flight, from the window's completed
    /// buckets (the current one is still filling); None before there is any.
    pub fn capacity(&self) -> Option<u64> {
        self.capacity_at(Instant::now())
    }

    fn capacity_at(&self, now: Instant) -> Option<u64> {
        let slot = self.slot(now);
        let buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let n = buckets.len() as u64;
        let recent = buckets.iter().filter(|b| b.passed > 0 && b.slot < slot && slot - b.slot <= n);
        let (mut max_pass, mut min_rt_us) = (0u64, u64::MAX);
        for b in recent {
            max_pass = max_pass.max(b.passed);
            min_rt_us = min_rt_us.min(b.rt_sum_us / b.passed);
        }
        if max_pass == 0 {
            return None;
        }
        let bucket_us = self.bucket_len.as_micros().max(1) as u64;
        // Little's law: completions per bucket × latency in buckets, rounded
        // down: admitting one call more than fits makes the others queue.
        Some(((max_pass * min_rt_us.max(1)) / bucket_us).max(1))
    }

    /// Admits a call, or sheds it.
    pub fn admit(self: &Arc<Self>, cpu: f64) -> Result<InFlight, Shed> {
        self.admit_at(cpu, Instant::now())
    }

    fn admit_at(self: &Arc<Self>, cpu: f64, now: Instant) -> Result<InFlight, Shed> {
        let in_flight = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        let hot = self.settings.cpu_threshold <= 0.0 || cpu >= self.settings.cpu_threshold;
        if hot && in_flight > i64::from(self.settings.min_in_flight) {
            if let Some(capacity) = self.capacity_at(now) {
                if in_flight as u64 > capacity {
                    self.in_flight.fetch_sub(1, Ordering::AcqRel);
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return Err(Shed { in_flight: in_flight - 1, capacity, cpu });
                }
            }
        }
        Ok(InFlight { shedder: self.clone(), started: now })
    }
}

/// The process's CPU use as a share of its cores, sampled every 250 ms from
/// `/proc/self/stat` (0 where that is not available).
pub fn cpu_usage() -> f64 {
    static USAGE: AtomicU64 = AtomicU64::new(0);
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let _ = std::thread::Builder::new().name("cpu-sampler".into()).spawn(|| {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let ticks_per_sec = 100.0; // USER_HZ on Linux
            let mut last = (process_ticks(), Instant::now());
            loop {
                std::thread::sleep(Duration::from_millis(250));
                let now = (process_ticks(), Instant::now());
                if let (Some(a), Some(b)) = (last.0, now.0) {
                    let secs = now.1.duration_since(last.1).as_secs_f64().max(1e-3);
                    let share = ((b.saturating_sub(a)) as f64 / ticks_per_sec / secs / cores).clamp(0.0, 1.0);
                    USAGE.store(share.to_bits(), Ordering::Relaxed);
                }
                last = now;
            }
        });
    });
    f64::from_bits(USAGE.load(Ordering::Relaxed))
}

/// utime + stime of this process, in clock ticks.
fn process_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> SheddingSettings {
        SheddingSettings { enabled: true, cpu_threshold: 0.0, window_ms: 1_000, buckets: 10, min_in_flight: 2 }
    }

    #[test]
    fn capacity_follows_littles_law_and_excess_calls_are_shed() {
        let s = Arc::new(Shedder::new(settings()));
        let t0 = s.started;
        // One bucket (100 ms) with 40 calls of 10 ms each: 40 × 10/100 = 4 at once.
        for _ in 0..40 {
            s.complete(Duration::from_millis(10), t0 + Duration::from_millis(5));
        }
        assert_eq!(s.capacity_at(t0 + Duration::from_millis(50)), None, "the current bucket does not count yet");
        assert_eq!(s.capacity_at(t0 + Duration::from_millis(150)), Some(4));
        let t1 = t0 + Duration::from_millis(150);
        let admitted: Vec<_> = (0..4).map(|_| s.admit_at(0.0, t1).expect("within capacity")).collect();
        let shed = s.admit_at(0.0, t1).expect_err("the fifth is over capacity");
        assert_eq!((shed.in_flight, shed.capacity), (4, 4));
        assert_eq!(s.refused.load(Ordering::Relaxed), 1);
        drop(admitted);
        assert_eq!(s.in_flight(), 0);
    }

    #[test]
    fn nothing_is_shed_below_the_cpu_threshold_or_the_floor() {
        let s = Arc::new(Shedder::new(SheddingSettings { cpu_threshold: 0.9, min_in_flight: 100, ..settings() }));
        let t0 = s.started;
        s.complete(Duration::from_millis(1), t0);
        let calls: Vec<_> = (0..50).map(|_| s.admit(0.95).expect("under the floor")).collect();
        drop(calls);
        let s = Arc::new(Shedder::new(SheddingSettings { cpu_threshold: 0.9, min_in_flight: 0, ..settings() }));
        s.complete(Duration::from_millis(1), s.started);
        let calls: Vec<_> = (0..50).map(|_| s.admit(0.5).expect("the CPU is not hot")).collect();
        drop(calls);
    }

    #[test]
    fn the_process_cpu_is_read() {
        assert!(process_ticks().is_some());
        let share = cpu_usage();
        assert!((0.0..=1.0).contains(&share));
    }
}
