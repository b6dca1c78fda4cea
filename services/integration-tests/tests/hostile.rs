//! Hostile clients against meshkit's listeners: what a peer that breaks the
//! protocol on purpose gets, and that everyone else keeps being served.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::time::{Duration, Instant};

use meshkit_common::admin::http_get;
use meshkit_integration_tests::{
    Etcd,
    echo::{EchoRequest, direct_client, start_echo},
    init_logs, mesh_config,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads until the peer closes (Ok(0) or an error); how long after `started` that was.
async fn closed_within(stream: &mut tokio::net::TcpStream, started: Instant, limit: Duration) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(tokio::time::Instant::from_std(started + limit), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn a_mesh_server_closes_a_connection_that_never_sends_its_preface() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let mut config = mesh_config(&etcd, "sqlite::memory:");
    config.mesh.server.preface_timeout_ms = 700;
    let server = start_echo(config).await.unwrap();
    let addr = server.local_addr();

    // Silent, and a few bytes short of the preface: both are cut off.
    let connected = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    for (name, stream) in [("silent", &mut silent), ("partial preface", &mut partial)] {
        let took = closed_within(stream, connected, Duration::from_secs(5)).await;
        let took = took.unwrap_or_else(|| panic!("the {name} connection was still open after 5 s"));
        assert!(took >= Duration::from_millis(600), "{name}: closed after {took:?}, before the limit");
    }

    // A client that speaks HTTP/2 is served, and stays connected past the limit.
    let mut client = direct_client(&server).await.unwrap();
    client.echo(EchoRequest { text: "a".into(), ..Default::default() }).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    client.echo(EchoRequest { text: "b".into(), ..Default::default() }).await.unwrap();

    let admin = server.admin_addr().unwrap().to_string();
    let metrics = http_get(&admin, "/metrics").await.unwrap();
    let counted = metrics
        .lines()
        .find(|l| l.starts_with("meshkit_server_preface_timeouts_total"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no meshkit_server_preface_timeouts_total in /metrics"));
    assert!(counted >= 2.0, "{counted} preface timeouts counted");
    server.shutdown().await.unwrap();
}
