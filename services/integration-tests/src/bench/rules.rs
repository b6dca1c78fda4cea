//! What each governance rule costs, in process, with nothing else in the
//! way: the serving side's layer (`GovernanceLayer` over a handler that
//! answers at once) and the calling side's check (`before_call`, then the
//! guard's `finish`), each rule alone and all together, set so that none
//! refuses. One thread, `CALLS` calls per round, rounds alternating the
//! rule sets so drift hits all alike; figures are medians of the rounds, in
//! ns per call, against the same governance with no rule set (as every
//! meshkit process runs until one is), and the layer's own cost against no
//! layer at all.
//!
//! The end-to-end figure (the `governance` phase) says what a call pays on
//! the wire; this one says which rule it pays for.

use std::time::{Duration, Instant};

use meshkit_common::{
    config::{BreakerRule, GovernanceSettings, MethodRule},
    governance::{Governance, GovernanceLayer},
};
use tower::{Layer, Service, ServiceExt};

use crate::{median, spread};

const PATH: &str = "/grpc.health.v1.Health/Check";
const SERVICE: &str = "grpc.health.v1.Health";
const CALLS: u32 = 50_000;
const ROUNDS: usize = 9;

/// Every rule set measured: name, settings.
fn rule_sets() -> Vec<(&'static str, Option<GovernanceSettings>)> {
    let with_rule = |rule: MethodRule| {
        let mut s = GovernanceSettings::default();
        s.methods.insert(PATH.into(), rule);
        s
    };
    let qps = MethodRule { qps: 1e9, burst: 1_000_000_000, ..MethodRule::default() };
    let caller = MethodRule { caller_qps: 1e9, caller_burst: 1_000_000_000, ..MethodRule::default() };
    let concurrency = MethodRule { concurrency: 100_000, ..MethodRule::default() };
    let timeout = MethodRule { timeout_ms: 10_000, ..MethodRule::default() };
    let breaker =
        MethodRule { breaker: BreakerRule { enabled: true, ..BreakerRule::default() }, ..MethodRule::default() };
    let mut shedding = GovernanceSettings::default();
    shedding.shedding.enabled = true;
    let mut throttling = GovernanceSettings::default();
    throttling.throttling.enabled = true;
    let mut all = with_rule(MethodRule {
        qps: 1e9,
        burst: 1_000_000_000,
        caller_qps: 1e9,
        caller_burst: 1_000_000_000,
        concurrency: 100_000,
        timeout_ms: 10_000,
        breaker: BreakerRule { enabled: true, ..BreakerRule::default() },
        ..MethodRule::default()
    });
    all.shedding.enabled = true;
    all.throttling.enabled = true;
    vec![
        ("no layer", None),
        ("no rule", Some(GovernanceSettings::default())),
        ("qps", Some(with_rule(qps))),
        ("caller_qps", Some(with_rule(caller))),
        ("concurrency", Some(with_rule(concurrency))),
        ("timeout_ms", Some(with_rule(timeout))),
        ("shedding", Some(shedding)),
        ("breaker", Some(with_rule(breaker))),
        ("throttling", Some(throttling)),
        ("all", Some(all)),
    ]
}

fn request() -> http::Request<tonic::body::Body> {
    http::Request::builder()
        .uri(format!("http://echo{PATH}"))
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "1S")
        .header("x-meshkit-caller", "order-service")
        .body(tonic::body::Body::empty())
        .expect("a valid request")
}

/// Serving side: `CALLS` calls through the layer (or none) to a handler
/// that answers at once; ns per call.
async fn serve_round(governance: Option<&std::sync::Arc<Governance>>) -> f64 {
    let handler = tower::service_fn(|_req: http::Request<tonic::body::Body>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
    });
    let started = Instant::now();
    match governance {
        Some(g) => {
            let mut svc = GovernanceLayer(g.clone()).layer(handler);
            for _ in 0..CALLS {
                let svc = svc.ready().await.expect("always ready");
                let _ = std::hint::black_box(svc.call(request()).await);
            }
        }
        None => {
            let mut svc = handler;
            for _ in 0..CALLS {
                let svc = svc.ready().await.expect("always ready");
                let _ = std::hint::black_box(svc.call(request()).await);
            }
        }
    }
    started.elapsed().as_nanos() as f64 / f64::from(CALLS)
}

/// Calling side: `CALLS` checks before a call and reports after it; ns per call.
fn call_round(governance: Option<&std::sync::Arc<Governance>>) -> f64 {
    let mut headers = request().headers().clone();
    let started = Instant::now();
    for _ in 0..CALLS {
        if let Some(g) = governance {
            let guard = g.before_call(SERVICE, PATH, &mut headers).expect("no rule refuses");
            if let Some(guard) = guard {
                guard.finish(tonic::Code::Ok);
            }
        }
        std::hint::black_box(&mut headers);
    }
    started.elapsed().as_nanos() as f64 / f64::from(CALLS)
}

pub async fn run() -> anyhow::Result<()> {
    let sets = rule_sets();
    let governances: Vec<Option<std::sync::Arc<Governance>>> =
        sets.iter().map(|(_, s)| s.clone().map(Governance::new)).collect();
    let (mut serve, mut call) = (vec![Vec::new(); sets.len()], vec![Vec::new(); sets.len()]);
    // Warm up every set once (limiter and breaker maps, the CPU sampler).
    for g in &governances {
        serve_round(g.as_ref()).await;
        call_round(g.as_ref());
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for round in 0..ROUNDS {
        for k in 0..sets.len() {
            let i = (k + round) % sets.len();
            serve[i].push(serve_round(governances[i].as_ref()).await);
            call[i].push(call_round(governances[i].as_ref()));
        }
        if Instant::now() > deadline {
            break;
        }
    }
    println!(
        "\n== governance, rule by rule, in process: ns per call (medians of {} rounds of {CALLS}), none refusing",
        serve[0].len()
    );
    println!(
        "  {:<12} {:>10} {:>10} {:>10} {:>10} {:>12} {:>14}",
        "rule", "serving", "added", "calling", "added", "both added", "serving spread"
    );
    let base = (median(&serve[1]), median(&call[1]));
    for (i, (name, _)) in sets.iter().enumerate() {
        let (s, c) = (median(&serve[i]), median(&call[i]));
        let (low, high) = spread(&serve[i]);
        let spread = format!("{low:.0}–{high:.0}");
        println!(
            "  {name:<12} {s:>10.0} {:>+10.0} {c:>10.0} {:>+10.0} {:>+12.0} {spread:>14}",
            s - base.0,
            c - base.1,
            (s - base.0) + (c - base.1)
        );
    }
    println!(
        "  (\"added\": against \"no rule\", the layer and check every process has; \"no layer\" is the handler alone)"
    );
    Ok(())
}
