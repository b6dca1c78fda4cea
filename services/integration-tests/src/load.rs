//! A bounded load generator for chaos tests: a few workers calling back to
//! back (with a pause) until stopped, or until a hard cap on time.

use std::{
    collections::HashMap,
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{task::JoinHandle, time::Instant};

/// Never run longer than this, whatever the test does (unless the test says
/// how long it means to run: [`LoadGen::start_for`]).
const HARD_CAP: Duration = Duration::from_secs(180);

/// What a run did.
#[derive(Debug, Default)]
pub struct Tally {
    pub ok: u64,
    pub failed: u64,
    /// The first few failures, for the assertion message.
    pub errors: Vec<String>,
    /// Instance id (from `x-meshkit-instance`) → calls it served.
    pub served_by: HashMap<String, u64>,
    /// How long each call took, succeeded or not, in the order each worker made them.
    pub latencies: Vec<Duration>,
    /// The slowest call: when it started, and how long it took.
    pub slowest: Option<(Instant, Duration)>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.errors.extend(other.errors.into_iter().take(10usize.saturating_sub(self.errors.len())));
        for (k, v) in other.served_by {
            *self.served_by.entry(k).or_default() += v;
        }
        self.latencies.extend(other.latencies);
        if other.slowest.is_some_and(|(_, o)| self.slowest.is_none_or(|(_, s)| o > s)) {
            self.slowest = other.slowest;
        }
    }

    /// The `q` quantile (0.0–1.0) of the calls' latencies; zero when there were none.
    pub fn latency(&self, q: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let Some(last) = sorted.len().checked_sub(1) else { return Duration::ZERO };
        sorted[((last as f64) * q.clamp(0.0, 1.0)).round() as usize]
    }
}

/// Running workers; [`stop`](Self::stop) ends them and adds up their tallies.
pub struct LoadGen {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    workers: Vec<JoinHandle<Tally>>,
}

impl LoadGen {
    /// `call` returns the instance that served the call, if known.
    pub fn start<F, Fut>(workers: usize, pause: Duration, call: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<String>, tonic::Status>> + Send,
    {
        Self::start_for(workers, pause, HARD_CAP, call)
    }

    /// [`start`](Self::start), stopping by itself after `cap` at the latest.
    pub fn start_for<F, Fut>(workers: usize, pause: Duration, cap: Duration, call: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Option<String>, tonic::Status>> + Send,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let call = Arc::new(call);
        let cap = Instant::now() + cap;
        let workers = (0..workers)
            .map(|_| {
                let (stop, ok, call) = (stop.clone(), ok.clone(), call.clone());
                tokio::spawn(async move {
                    let mut tally = Tally::default();
                    while !stop.load(Ordering::Relaxed) && Instant::now() < cap {
                        let started = Instant::now();
                        let outcome = call().await;
                        let took = started.elapsed();
                        tally.latencies.push(took);
                        if tally.slowest.is_none_or(|(_, s)| took > s) {
                            tally.slowest = Some((started, took));
                        }
                        match outcome {
                            Ok(by) => {
                                tally.ok += 1;
                                ok.fetch_add(1, Ordering::Relaxed);
                                if let Some(by) = by {
                                    *tally.served_by.entry(by).or_default() += 1;
                                }
                            }
                            Err(status) => {
                                tally.failed += 1;
                                if tally.errors.len() < 10 {
                                    tally.errors.push(format!("{:?}: {}", status.code(), status.message()));
                                }
                            }
                        }
                        tokio::time::sleep(pause).await;
                    }
                    tally
                })
            })
            .collect();
        Self { stop, ok, workers }
    }

    /// Successful calls so far.
    pub fn ok_so_far(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub async fn stop(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        for worker in self.workers {
            if let Ok(tally) = worker.await {
                total.merge(tally);
            }
        }
        total
    }
}
