//! The gateway binary's process model: one worker per core, each a
//! single-threaded runtime with its own listener (SO_REUSEPORT), etcd client
//! and balanced channels, as nginx and Envoy run their workers. A connection
//! and the upstream calls it makes stay on one thread, so no request pays
//! for cross-thread wake-ups; the kernel spreads connections over the
//! workers.

use std::{future::Future, sync::mpsc, thread};

use crate::settings::GatewayConfig;
use tokio::sync::watch;

use crate::server::{SharedFrontage, StartError, start_worker};

/// How many workers `gateway.workers` asks for (0: one per core).
pub fn count(config: &GatewayConfig) -> usize {
    match config.gateway.workers {
        0 => thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n as usize,
    }
}

/// Starts the workers, serves until `stop` resolves (polled on the calling
/// thread's runtime), then drains every worker. Fails if any worker fails to
/// start, after stopping the others.
pub async fn run(config: GatewayConfig, stop: impl Future<Output = ()>) -> Result<(), StartError> {
    let n = count(&config);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<String, StartError>>();
    // The first worker binds first, so a port 0 setting resolves to one port
    // that the others then share.
    let mut handles = Vec::new();
    let mut listen = config.gateway.listen.clone();
    // One frontage for the process (contracts, routes, policies, and the
    // limiter, so a client's allowance does not grow with the number of
    // workers its connections land on), built by the first worker.
    let shared = SharedFrontage::default();
    for index in 0..n {
        let (config, stop_rx, ready_tx, addr) = (config.clone(), stop_rx.clone(), ready_tx.clone(), listen.clone());
        let shared = shared.clone();
        let handle = thread::Builder::new()
            .name(format!("gateway-{index}"))
            .spawn(move || worker(index, config, addr, n > 1, shared, stop_rx, ready_tx))
            .map_err(|e| StartError::Config(format!("cannot start worker thread {index}: {e}")))?;
        handles.push(handle);
        match ready_rx.recv() {
            Ok(Ok(bound)) => {
                if index == 0 {
                    listen = bound;
                }
            }
            Ok(Err(e)) => {
                let _ = stop_tx.send(true);
                for h in handles {
                    let _ = h.join();
                }
                return Err(e);
            }
            Err(_) => return Err(StartError::Config(format!("worker {index} stopped while starting"))),
        }
    }
    tracing::info!(addr = %listen, workers = n, "gateway listening");
    stop.await;
    let _ = stop_tx.send(true);
    tokio::task::spawn_blocking(move || {
        for h in handles {
            let _ = h.join();
        }
    })
    .await
    .map_err(|e| StartError::Config(format!("joining the workers: {e}")))
}

fn worker(
    index: usize,
    config: GatewayConfig,
    listen: String,
    reuse_port: bool,
    front: SharedFrontage,
    mut stop: watch::Receiver<bool>,
    ready: mpsc::Sender<Result<String, StartError>>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(StartError::Config(format!("worker {index}: cannot build a runtime: {e}"))));
            return;
        }
    };
    runtime.block_on(async move {
        let running = match start_worker(config, &listen, reuse_port, index == 0, front).await {
            Ok(r) => r,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(running.local_addr().to_string()));
        let _ = stop.wait_for(|s| *s).await;
        running.shutdown().await;
    });
}
