//! The Rust side of `make bench`'s peers phase: meshkit's balanced channel
//! and tonic's own balanced `Channel`, driving the same load as the Go side
//! (`clients/peers`, `peer-go client`), with the same flags and output.
//!
//! ```text
//! peer-client --client meshkit|tonic [--etcd ENDPOINT [--prefix /meshkit]]
//!     [--addrs A,B,C] [--rate 2000 | --concurrency 64] [--seconds 5]
//!     [--warmup-seconds 1] [--deadline-ms 1000] [--governance RULES_JSON]
//! ```
//!
//! Calls `meshkit.echo.v1.EchoService/Echo`: open loop at `--rate` (each
//! call on its own task, so a slow call holds back none), or closed loop with
//! `--concurrency` callers back to back. Prints `{"event":"measuring"}` when
//! the warm-up ends, then one summary line: calls, failures by code, and the
//! latency quantiles, in µs (nearest rank), of every call started in the
//! measured `--seconds`, failed ones included, and stays until its stdin closes, so the caller can read
//! its CPU time.
//!
//! - `meshkit`: the channel every meshkit service calls with, from the
//!   registry in etcd: p2c over measured latency, outlier ejection, retries
//!   only of calls that never reached a server (Echo is not marked
//!   idempotent), the call's metrics and span.
//! - `tonic`: `Channel::balance_list` over `--addrs`, tonic's defaults; it
//!   retries nothing.
//!
//! Each call carries the deadline as `grpc-timeout` and is abandoned when it
//! passes, as grpc-go's context deadline does; `--deadline-ms 0` sends none.
//! `--governance` gives the meshkit channel the calling side's rules (the
//! JSON of a `governance` config section).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use meshkit_common::methods::MethodTable;
use meshkit_common::{
    ChannelBuilder,
    config::{GovernanceSettings, Settings as _},
    governance::Governance,
};
use meshkit_integration_tests::echo::{ECHO, ECHO_DESCRIPTOR_SET, EchoRequest, EchoServiceClient};
use tokio::time::Instant;
use tonic::{Code, transport::Endpoint};

/// Bounds the open loop's tasks: a call beyond it is counted as failed
/// (RESOURCE_EXHAUSTED) rather than started.
const MAX_IN_FLIGHT: u64 = 20_000;

struct Args {
    client: String,
    etcd: String,
    prefix: String,
    addrs: Vec<String>,
    rate: u64,
    concurrency: usize,
    seconds: f64,
    warmup: f64,
    deadline: Duration,
    governance: Option<GovernanceSettings>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        client: String::new(),
        etcd: String::new(),
        prefix: "/meshkit".into(),
        addrs: Vec::new(),
        rate: 2000,
        concurrency: 0,
        seconds: 5.0,
        warmup: 1.0,
        deadline: Duration::from_secs(1),
        governance: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        let number = |v: &str| v.parse::<f64>().map_err(|e| anyhow::anyhow!("{flag} {v:?}: {e}"));
        match flag.as_str() {
            "--client" => args.client = value,
            "--etcd" => args.etcd = value,
            "--prefix" => args.prefix = value,
            "--addrs" => args.addrs = value.split(',').filter(|a| !a.is_empty()).map(str::to_owned).collect(),
            "--rate" => args.rate = number(&value)? as u64,
            "--concurrency" => args.concurrency = number(&value)? as usize,
            "--seconds" => args.seconds = number(&value)?,
            "--warmup-seconds" => args.warmup = number(&value)?,
            "--deadline-ms" => args.deadline = Duration::from_millis(number(&value)? as u64),
            "--governance" => {
                let settings: GovernanceSettings =
                    serde_json::from_str(&value).map_err(|e| anyhow::anyhow!("--governance: {e}"))?;
                settings.validate().map_err(|e| anyhow::anyhow!("--governance: {e}"))?;
                args.governance = Some(settings);
            }
            other => anyhow::bail!("unknown flag {other}"),
        }
    }
    anyhow::ensure!(args.rate > 0 || args.concurrency > 0, "--rate or --concurrency must be above 0");
    Ok(args)
}

/// The latency (µs) of every call started in the measured window, and each
/// failure's code.
struct Recorder {
    from: Instant,
    until: Instant,
    calls: Mutex<(Vec<u64>, BTreeMap<&'static str, u64>)>,
}

impl Recorder {
    fn record(&self, started: Instant, took: Duration, code: Code) {
        if started < self.from || started >= self.until {
            return;
        }
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.0.push(took.as_micros() as u64);
        if code != Code::Ok {
            *calls.1.entry(code_name(code)).or_default() += 1;
        }
    }

    fn summary(&self, seconds: f64) -> serde_json::Value {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        let (latencies, by_code) = &mut *calls;
        latencies.sort_unstable();
        let quantile = |q: f64| -> u64 {
            let rank = ((q * latencies.len() as f64).ceil() as usize).saturating_sub(1);
            latencies.get(rank).copied().unwrap_or(0)
        };
        serde_json::json!({
            "event": "summary",
            "calls": latencies.len(),
            "failed": by_code.values().sum::<u64>(),
            "by_code": by_code,
            "seconds": seconds,
            "p50_us": quantile(0.5),
            "p99_us": quantile(0.99),
            "p999_us": quantile(0.999),
            "max_us": latencies.last().copied().unwrap_or(0),
        })
    }
}

/// The spec's names of the status codes, as the Go side prints them.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// One Echo call on either client: the deadline goes out as `grpc-timeout`
/// and the call is abandoned when it passes.
async fn echo<T>(mut client: EchoServiceClient<T>, deadline: Duration, recorder: &Recorder)
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let mut request = tonic::Request::new(EchoRequest { text: "bench".into(), ..Default::default() });
    let started = Instant::now();
    let result = if deadline.is_zero() {
        Ok(client.echo(request).await)
    } else {
        request.set_timeout(deadline);
        tokio::time::timeout(deadline, client.echo(request)).await
    };
    let code = match result {
        Ok(Ok(_)) => Code::Ok,
        Ok(Err(status)) => {
            // The first few failures, whole, on stderr: what a count cannot say.
            static SHOWN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            if SHOWN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 10 {
                eprintln!("failed call: {:?}: {}", status.code(), status.message());
            }
            status.code()
        }
        Err(_) => Code::DeadlineExceeded,
    };
    recorder.record(started, started.elapsed(), code);
}

async fn drive<T>(client: EchoServiceClient<T>, args: &Args) -> anyhow::Result<()>
where
    T: tonic::client::GrpcService<tonic::body::Body> + Clone + Send + 'static,
    T::Future: Send,
    T::Error: Into<tonic::codegen::StdError>,
    T::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
{
    let deadline = args.deadline;
    let measure_at = Instant::now() + Duration::from_secs_f64(args.warmup);
    let stop = measure_at + Duration::from_secs_f64(args.seconds);
    let recorder = Arc::new(Recorder { from: measure_at, until: stop, calls: Mutex::default() });
    let mut measuring = false;
    let mut tasks = tokio::task::JoinSet::new();
    if args.concurrency > 0 {
        for _ in 0..args.concurrency {
            let (client, recorder) = (client.clone(), recorder.clone());
            tasks.spawn(async move {
                while Instant::now() < stop {
                    echo(client.clone(), deadline, &recorder).await;
                }
            });
        }
        tokio::time::sleep_until(measure_at).await;
        println!(r#"{{"event":"measuring"}}"#);
    } else {
        let in_flight = Arc::new(AtomicU64::new(0));
        let mut ticker = tokio::time::interval(Duration::from_nanos(1_000_000_000 / args.rate));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        loop {
            let now = ticker.tick().await;
            if !measuring && now >= measure_at {
                measuring = true;
                println!(r#"{{"event":"measuring"}}"#);
            }
            if now >= stop {
                break;
            }
            if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
                recorder.record(now, Duration::ZERO, Code::ResourceExhausted);
                continue;
            }
            in_flight.fetch_add(1, Ordering::Relaxed);
            let (client, recorder, in_flight) = (client.clone(), recorder.clone(), in_flight.clone());
            tasks.spawn(async move {
                echo(client, deadline, &recorder).await;
                in_flight.fetch_sub(1, Ordering::Relaxed);
            });
            // Finished tasks leave the set as the loop goes, so it stays small.
            while tasks.try_join_next().is_some() {}
        }
    }
    while tasks.join_next().await.is_some() {}
    println!("{}", recorder.summary(args.seconds));
    // Stay until stdin closes, so the caller can read this process's CPU time.
    let _ = tokio::task::spawn_blocking(|| std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new())).await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    match args.client.as_str() {
        "meshkit" => {
            let etcd = etcd_client::Client::connect([args.etcd.as_str()], None).await?;
            // As for a contract under proto/: the client knows Echo's
            // methods, so a call that never left is retried elsewhere.
            let mut methods = MethodTable::meshkit();
            methods.extend(MethodTable::from_descriptor_set(ECHO_DESCRIPTOR_SET)?);
            let mut builder = ChannelBuilder::new(etcd, args.prefix.clone()).with_methods(methods);
            if let Some(settings) = &args.governance {
                builder = builder.with_governance(Governance::new(settings.clone()));
            }
            let channel = builder.balanced(ECHO);
            drive(EchoServiceClient::new(channel), &args).await
        }
        "tonic" => {
            let endpoints = args
                .addrs
                .iter()
                .map(|a| Endpoint::from_shared(format!("http://{a}")))
                .collect::<Result<Vec<_>, _>>()?;
            anyhow::ensure!(!endpoints.is_empty(), "--addrs names no backend");
            let channel = tonic::transport::Channel::balance_list(endpoints.into_iter());
            drive(EchoServiceClient::new(channel), &args).await
        }
        other => anyhow::bail!("--client must be meshkit or tonic, not {other:?}"),
    }
}
