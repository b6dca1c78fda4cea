//! What the contract's rules cost per request: each request message of the
//! reference services checked by `meshkit_validate` as a server checks it
//! (decode against the descriptor, then every rule), beside the decode alone.
//! In process, one core, rounds alternating; the medians and the spread.

use std::hint::black_box;
use std::time::{Duration, Instant};

use meshkit_validate::Validator;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};

const ROUNDS: usize = 7;

/// Nanoseconds per call of `f`, run for about `budget`.
fn per_call(budget: Duration, mut f: impl FnMut()) -> f64 {
    let mut n = 0u64;
    let started = Instant::now();
    while started.elapsed() < budget {
        for _ in 0..64 {
            f();
        }
        n += 64;
    }
    started.elapsed().as_nanos() as f64 / n as f64
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

pub fn run(secs: u64) -> anyhow::Result<()> {
    let pool = DescriptorPool::decode(meshkit_proto::FILE_DESCRIPTOR_SET)?;
    let validator = Validator::for_services(
        &pool,
        &["meshkit.user.v1.UserService", "meshkit.order.v1.OrderService", "meshkit.scheduler.v1.JobExecutor"],
    )?;
    let uuid = "0190f0c2-7b1e-7a3c-9d2e-4f5a6b7c8d9e";
    let items: Vec<serde_json::Value> =
        (0..10).map(|i| serde_json::json!({"sku": format!("book-{i}"), "quantity": i + 1})).collect();
    let cases = [
        ("GetUser", "/meshkit.user.v1.UserService/GetUser", serde_json::json!({"id": uuid})),
        (
            "CreateUser",
            "/meshkit.user.v1.UserService/CreateUser",
            serde_json::json!({"name": "Ada Lovelace", "email": "ada@example.com"}),
        ),
        (
            "CreateOrder (10 items)",
            "/meshkit.order.v1.OrderService/CreateOrder",
            serde_json::json!({"userId": uuid, "items": items}),
        ),
        (
            "RunJob (CEL rule)",
            "/meshkit.scheduler.v1.JobExecutor/RunJob",
            serde_json::json!({"runId": uuid, "job": "j", "handler": "h", "shardIndex": 1, "shardTotal": 4,
                "fence": {"clusterId": "1", "revision": "9"}}),
        ),
    ];
    let budget = Duration::from_millis((secs * 1000 / (ROUNDS as u64 * cases.len() as u64 * 2)).max(50));
    println!("\n== validate: each request checked against its rules, as the server layer does (in process, one core)");
    println!("  {:<24} {:>8} {:>12} {:>12} {:>14}", "request", "bytes", "decode ns", "check ns", "rules ns");
    for (name, path, json) in cases {
        let desc = validator.method(path).ok_or_else(|| anyhow::anyhow!("{path} has no rules"))?.clone();
        let encoded = DynamicMessage::deserialize(desc.clone(), &json)?.encode_to_vec();
        anyhow::ensure!(validator.check_encoded(&desc, &encoded).is_ok(), "{name} should be valid");
        let (mut decode, mut check) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            decode.push(per_call(budget, || {
                black_box(DynamicMessage::decode(desc.clone(), black_box(encoded.as_slice())).ok());
            }));
            check.push(per_call(budget, || {
                black_box(validator.check_encoded(&desc, black_box(&encoded)).is_ok());
            }));
        }
        let ((d, dmin, dmax), (c, cmin, cmax)) = (median(decode), median(check));
        println!(
            "  {:<24} {:>8} {:>12.0} {:>12.0} {:>14.0}   (spread decode {dmin:.0}-{dmax:.0}, check {cmin:.0}-{cmax:.0})",
            name,
            encoded.len(),
            d,
            c,
            c - d
        );
    }
    println!("  check = decode + every rule; {ROUNDS} alternating rounds, medians");
    Ok(())
}
