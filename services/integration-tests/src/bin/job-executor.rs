//! A job executor for the scheduler tests: a meshkit process serving
//! `JobExecutor` with handlers whose behaviour a test controls, run as a real
//! process so a test can kill it mid-run.
//!
//! Settings as any service (`MESHKIT_*`), plus `JOB_EXECUTOR_COMPONENT` (the
//! `component` it registers, default `worker`) and `JOB_RECORD_FILE`, where
//! every run appends one line:
//! `EVENT JOB SLOT_MS SHARD/TOTAL ATTEMPT INSTANCE FENCE`, EVENT being
//! `start` or `end`.
//!
//! Handlers: `record` (ends at once), `sleep` (sleeps `param` ms, then ends),
//! `fail-first` (fails its first attempt, succeeds after).

use std::io::Write;

use meshkit_common::{
    Mesh, MeshConfig, MeshServer,
    config::ProcessEnv,
    jobs::{Executor, JobContext},
    shutdown::Signals,
    telemetry,
};

fn record(event: &str, ctx: &JobContext, instance: &str) -> Result<(), String> {
    let Ok(path) = std::env::var("JOB_RECORD_FILE") else { return Ok(()) };
    let line = format!(
        "{event} {} {} {}/{} {} {instance}\n",
        ctx.job, ctx.scheduled_ms, ctx.shard_index, ctx.shard_total, ctx.attempt
    );
    // One write of one short line to a file opened for appending: lines of
    // several processes do not interleave.
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| e.to_string())?;
    file.write_all(line.as_bytes()).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let signals = Signals::install()?;
    let config = MeshConfig::load("job-executor", &ProcessEnv)?;
    let telemetry = telemetry::init(&config.log, "job-executor");
    let component = std::env::var("JOB_EXECUTOR_COMPONENT").unwrap_or_else(|_| "worker".into());
    let mesh = Mesh::connect(&config, &component).await?;
    let config = mesh.config();
    let me = config.registry.instance_id.clone();
    let (a, b, c) = (me.clone(), me.clone(), me.clone());
    let executor = Executor::new(mesh.etcd.clone(), &config.etcd.prefix)
        .handler_fn("record", move |ctx| {
            let me = a.clone();
            async move {
                record("start", &ctx, &me)?;
                record("end", &ctx, &me)?;
                Ok(format!("recorded on {me}"))
            }
        })
        .handler_fn("sleep", move |ctx| {
            let me = b.clone();
            async move {
                let ms: u64 =
                    ctx.param.trim().parse().map_err(|_| format!("param {:?} is not milliseconds", ctx.param))?;
                record("start", &ctx, &me)?;
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                record("end", &ctx, &me)?;
                Ok(format!("slept {ms} ms on {me}"))
            }
        })
        .handler_fn("fail-first", move |ctx| {
            let me = c.clone();
            async move {
                record("start", &ctx, &me)?;
                if ctx.attempt == 1 {
                    return Err(format!("first attempt fails on purpose (on {me})"));
                }
                record("end", &ctx, &me)?;
                Ok(format!("attempt {} succeeded on {me}", ctx.attempt))
            }
        });
    let server = MeshServer::new(mesh.config())
        .with_mesh(&mesh)
        .metadata("component", component)
        .add_service(executor.into_service())
        .start()
        .await?;
    server.run_until(signals.recv()).await?;
    telemetry.shutdown();
    Ok(())
}
