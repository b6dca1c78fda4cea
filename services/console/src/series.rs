//! Per-second calls, errors and p99 per method of one component, for the
//! Governance page's charts.
//!
//! Where the figures come from: each instance's admin `/metrics`, scraped as
//! OpenMetrics (so the latency buckets carry exemplars) when a page asks and
//! the last sample is older than [`EVERY`], so nothing is scraped while no
//! page is open. A point is the difference between two samples, per
//! instance (a restarted instance's counters start again at zero and count
//! from there), summed over the component's instances.
//!
//! How coarse the p99 is: the histograms have 15 buckets (0.25, 0.5, 1, 2.5,
//! 5, 10, 25, 50, 100, 250, 500 ms, 1, 2.5, 5, 10 s); the p99 is found in
//! the bucket holding the 99th percentile and interpolated linearly within
//! it, as Prometheus's `histogram_quantile` does. So it is exact only at
//! the bounds, and within a bucket it can be off by up to the bucket's width
//! (a p99 of 30 ms reads anywhere within 25..50 ms).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    time::{Duration, Instant},
};

use serde::Serialize;

/// How often a component is scraped at most.
pub const EVERY: Duration = Duration::from_millis(900);

/// Points kept per component (five minutes at one a second).
const KEPT: usize = 300;

/// The latency buckets' upper bounds, in seconds, as the processes count them.
const BOUNDS: [f64; 15] =
    [0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// One method's counters in one scrape (cumulative since the process started).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub calls: u64,
    /// Calls that did not end `OK`.
    pub errors: u64,
    /// Calls per bucket (not cumulative); the last is above 10 s.
    pub buckets: [u64; 16],
    /// Exemplars: trace id, seconds, when (Unix ms).
    pub exemplars: Vec<(String, f64, u64)>,
}

/// What one scrape says, by method.
pub type Scrape = BTreeMap<String, Totals>;

/// Reads the server-side calls and latency families out of OpenMetrics (or
/// Prometheus) text.
pub fn parse(text: &str) -> Scrape {
    let mut out: Scrape = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("meshkit_server_requests_total{") {
            let Some((labels, value)) = rest.split_once("} ") else { continue };
            let labels = parse_labels(labels);
            let (Some(method), Some(code)) = (labels.get("method"), labels.get("code")) else { continue };
            let n: u64 = value.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) as u64;
            let t = out.entry(method.clone()).or_default();
            t.calls += n;
            if code != "OK" {
                t.errors += n;
            }
        } else if let Some(rest) = line.strip_prefix("meshkit_server_request_duration_seconds_bucket{") {
            let Some((labels, after)) = rest.split_once("} ") else { continue };
            let labels = parse_labels(labels);
            let (Some(method), Some(le)) = (labels.get("method"), labels.get("le")) else { continue };
            let (value, exemplar) = match after.split_once(" # ") {
                Some((v, e)) => (v, Some(e)),
                None => (after, None),
            };
            let cumulative = value.trim().parse::<f64>().unwrap_or(0.0) as u64;
            let index = if le == "+Inf" {
                BOUNDS.len()
            } else {
                let Ok(bound) = le.parse::<f64>() else { continue };
                let Some(i) = BOUNDS.iter().position(|b| (b - bound).abs() < 1e-12) else { continue };
                i
            };
            let t = out.entry(method.clone()).or_default();
            // Cumulative in the text; kept per bucket (filled in order, as written).
            let below: u64 = t.buckets[..index].iter().sum();
            t.buckets[index] = cumulative.saturating_sub(below);
            if let Some(e) = exemplar.and_then(parse_exemplar) {
                t.exemplars.push(e);
            }
        }
    }
    out
}

fn parse_labels(text: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = text;
    while let Some((name, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => {}
                },
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(name.trim_start_matches(',').trim().to_owned(), value);
        rest = &after[end..];
    }
    out
}

/// `{trace_id="…"} 0.043 1733500000.123`.
fn parse_exemplar(text: &str) -> Option<(String, f64, u64)> {
    let (labels, rest) = text.trim().strip_prefix('{')?.split_once("} ")?;
    let trace_id = parse_labels(labels).remove("trace_id")?;
    let mut parts = rest.split_whitespace();
    let seconds = parts.next()?.parse::<f64>().ok()?;
    let at = parts.next().and_then(|t| t.parse::<f64>().ok()).map_or(0, |t| (t * 1000.0) as u64);
    Some((trace_id, seconds, at))
}

/// One method at one point.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MethodPoint {
    pub calls: f64,
    pub errors: f64,
    /// `None` without calls; above 10 s it reads 10 000.
    pub p99_ms: Option<f64>,
    /// The slowest traced call of the interval, if one was traced.
    pub exemplar: Option<PointExemplar>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PointExemplar {
    pub trace_id: String,
    pub ms: f64,
}

/// One point: per-second rates over the interval that ends at `t` (Unix ms).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Point {
    pub t: u64,
    pub methods: BTreeMap<String, MethodPoint>,
}

/// The p99 (ms) of calls counted per bucket, interpolated within its bucket.
pub fn p99_ms(buckets: &[u64; 16]) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = 0.99 * total as f64;
    let mut below = 0u64;
    for (i, n) in buckets.iter().enumerate() {
        if *n > 0 && (below + n) as f64 >= rank {
            if i == BOUNDS.len() {
                return Some(BOUNDS[BOUNDS.len() - 1] * 1000.0);
            }
            let lower = if i == 0 { 0.0 } else { BOUNDS[i - 1] };
            let within = (rank - below as f64) / *n as f64;
            return Some((lower + (BOUNDS[i] - lower) * within) * 1000.0);
        }
        below += n;
    }
    None
}

/// The points of one component, and each instance's last scrape.
#[derive(Debug, Default)]
pub struct Series {
    pub last: Option<Instant>,
    last_unix_ms: u64,
    previous: HashMap<String, Scrape>,
    pub points: VecDeque<Point>,
}

impl Series {
    /// Whether a new sample is due.
    pub fn due(&self, now: Instant) -> bool {
        self.last.is_none_or(|l| now.duration_since(l) >= EVERY)
    }

    /// Adds the scrapes taken at `now` (`unix_ms`), by instance id; an
    /// instance's first scrape only sets its baseline.
    pub fn add(&mut self, now: Instant, unix_ms: u64, scrapes: HashMap<String, Scrape>) {
        let elapsed = self.last.map(|l| now.duration_since(l).as_secs_f64()).filter(|e| *e > 0.0);
        let since = self.last_unix_ms;
        let mut sums: BTreeMap<String, Totals> = BTreeMap::new();
        for (instance, scrape) in &scrapes {
            let Some(before) = self.previous.get(instance) else { continue };
            for (method, t) in scrape {
                let b = before.get(method).cloned().unwrap_or_default();
                // A restarted instance counts from zero again: its new counts are the delta.
                let restarted = t.calls < b.calls;
                let base = if restarted { Totals::default() } else { b };
                let sum = sums.entry(method.clone()).or_default();
                sum.calls += t.calls - base.calls;
                sum.errors += t.errors.saturating_sub(base.errors);
                for (i, n) in t.buckets.iter().enumerate() {
                    sum.buckets[i] += n.saturating_sub(base.buckets[i]);
                }
                sum.exemplars.extend(t.exemplars.iter().filter(|e| e.2 > since).cloned());
            }
        }
        if let Some(elapsed) = elapsed {
            let methods = sums
                .into_iter()
                .map(|(method, t)| {
                    let exemplar = t
                        .exemplars
                        .iter()
                        .max_by(|a, b| a.1.total_cmp(&b.1))
                        .map(|(trace_id, s, _)| PointExemplar { trace_id: trace_id.clone(), ms: s * 1000.0 });
                    let point = MethodPoint {
                        calls: t.calls as f64 / elapsed,
                        errors: t.errors as f64 / elapsed,
                        p99_ms: p99_ms(&t.buckets),
                        exemplar,
                    };
                    (method, point)
                })
                .collect();
            self.points.push_back(Point { t: unix_ms, methods });
            while self.points.len() > KEPT {
                self.points.pop_front();
            }
        }
        self.previous = scrapes;
        self.last = Some(now);
        self.last_unix_ms = unix_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# TYPE meshkit_server_requests counter
meshkit_server_requests_total{method=\"/a.B/Get\",code=\"OK\"} 90
meshkit_server_requests_total{method=\"/a.B/Get\",code=\"RESOURCE_EXHAUSTED\"} 10
meshkit_client_requests_total{service=\"x\",method=\"/a.B/Get\",code=\"OK\"} 5
meshkit_server_request_duration_seconds_bucket{method=\"/a.B/Get\",le=\"0.00025\"} 0
meshkit_server_request_duration_seconds_bucket{method=\"/a.B/Get\",le=\"0.0005\"} 0
meshkit_server_request_duration_seconds_bucket{method=\"/a.B/Get\",le=\"0.001\"} 50
meshkit_server_request_duration_seconds_bucket{method=\"/a.B/Get\",le=\"0.0025\"} 98
meshkit_server_request_duration_seconds_bucket{method=\"/a.B/Get\",le=\"0.005\"} 98
meshkit_server_request_duration_seconds_bucket{method=\"/a.B/Get\",le=\"0.01\"} 98
meshkit_server_request_duration_seconds_bucket{method=\"/a.B/Get\",le=\"0.025\"} 98
meshkit_server_request_duration_seconds_bucket{method=\"/a.B/Get\",le=\"0.05\"} 100 # {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 0.031 1700000000.5
meshkit_server_request_duration_seconds_bucket{method=\"/a.B/Get\",le=\"+Inf\"} 100
# EOF
";

    #[test]
    fn reads_calls_errors_buckets_and_exemplars_of_the_server_side() {
        let s = parse(TEXT);
        let t = &s["/a.B/Get"];
        assert_eq!((t.calls, t.errors), (100, 10), "the client side is left out");
        assert_eq!(t.buckets[2], 50);
        assert_eq!(t.buckets[3], 48);
        assert_eq!(t.buckets[7], 2);
        assert_eq!(t.buckets.iter().sum::<u64>(), 100);
        assert_eq!(t.exemplars, vec![("4bf92f3577b34da6a3ce929d0e0e4736".to_owned(), 0.031, 1_700_000_000_500)]);
    }

    #[test]
    fn p99_is_interpolated_within_its_bucket() {
        let mut b = [0u64; 16];
        b[2] = 99; // 0.5..1 ms
        b[7] = 1; // 25..50 ms
        let p = p99_ms(&b).unwrap();
        assert!((p - 1.0).abs() < 1e-9, "{p}");
        b[2] = 98;
        b[7] = 2;
        let p = p99_ms(&b).unwrap();
        assert!((25.0..=50.0).contains(&p), "{p}");
        assert_eq!(p99_ms(&[0; 16]), None);
        let mut slow = [0u64; 16];
        slow[15] = 3;
        assert_eq!(p99_ms(&slow), Some(10_000.0));
    }

    #[test]
    fn points_are_per_second_deltas_summed_over_instances_and_survive_a_restart() {
        let scrape = |calls: u64, errors: u64| {
            let mut t = Totals { calls, errors, ..Totals::default() };
            t.buckets[4] = calls;
            BTreeMap::from([("/a.B/Get".to_owned(), t)])
        };
        let mut s = Series::default();
        let t0 = Instant::now();
        s.add(t0, 1_000, HashMap::from([("a".into(), scrape(100, 0)), ("b".into(), scrape(50, 0))]));
        assert!(s.points.is_empty(), "the first sample is a baseline");
        s.add(
            t0 + Duration::from_secs(2),
            3_000,
            HashMap::from([("a".into(), scrape(140, 4)), ("b".into(), scrape(10, 0))]),
        );
        let p = &s.points[0].methods["/a.B/Get"];
        // a: 40 calls; b restarted and counted 10 since: 50 calls in 2 s.
        assert_eq!((p.calls, p.errors), (25.0, 2.0));
        let p99 = p.p99_ms.unwrap();
        assert!((2.5..=5.0).contains(&p99), "{p99}");
    }
}
