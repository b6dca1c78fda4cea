//! The gRPC project's own interop cases: grpc-go's (package
//! `google.golang.org/grpc/interop`, driven by `tools/grpc-interop`, which
//! install-deps builds from the Go module proxy) against the interop
//! `TestService` served by a `MeshServer`, directly and through the gateway's
//! passthrough, cleartext and TLS (mTLS to the server, HTTPS to the gateway
//! with mTLS on to the server behind it). Every case passes, or is one of the
//! exceptions docs/GATEWAY.md lists with its reason.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{net::SocketAddr, path::Path, time::Duration};

use meshkit_integration_tests::{
    Etcd, TestConfig, init_logs,
    interop::{INTEROP_DESCRIPTOR_SET, pb::Empty, start_interop},
    mesh_config, tls_files, tool,
};
use meshkit_meshctl::certs::issue;

/// The cases a client and a proxy can both pass: every case of grpc-go's
/// interop client but those needing Google credentials, ALTS or ORCA load
/// reports (which meshkit does not produce).
const CASES: &[&str] = &[
    "empty_unary",
    "large_unary",
    "client_streaming",
    "server_streaming",
    "ping_pong",
    "empty_stream",
    "timeout_on_sleeping_server",
    "cancel_after_begin",
    "cancel_after_first_response",
    "status_code_and_message",
    "special_status_message",
    "custom_metadata",
    "unimplemented_method",
    "unimplemented_service",
    "pick_first_unary",
    "rpc_soak",
    "channel_soak",
];

/// (target, case, why) of the cases known to fail; docs/GATEWAY.md says the same.
const EXCEPTIONS: &[(&str, &str, &str)] = &[
    ("the gateway, cleartext", "unimplemented_service", UNIMPLEMENTED_SERVICE),
    ("the gateway, HTTPS", "unimplemented_service", UNIMPLEMENTED_SERVICE),
];

const UNIMPLEMENTED_SERVICE: &str = "grpc.testing.UnimplementedService is declared in test.proto, which the gateway \
     loads, so the gateway fronts it; with no instance registered it answers UNAVAILABLE, as for any known \
     service that is down. A service in no loaded contract gets UNIMPLEMENTED (asserted below).";

/// How the client reaches its target.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// CA file, and the client certificate and key to present, if any.
    tls: Option<(String, Option<(String, String)>)>,
}

/// Runs every case against `target`, one client process each; the failures
/// that are not listed exceptions, with what the client said.
async fn run_cases(target: &Target) -> Vec<String> {
    let bin = tool("grpc-interop");
    let mut unexpected = Vec::new();
    for case in CASES {
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.arg(format!("-server_host={}", target.addr.ip()))
            .arg(format!("-server_port={}", target.addr.port()))
            .arg(format!("-test_case={case}"))
            .kill_on_drop(true);
        if let Some((ca, client)) = &target.tls {
            cmd.arg("-use_tls").arg(format!("-ca_file={ca}"));
            if let Some((cert, key)) = client {
                cmd.arg(format!("-cert_file={cert}")).arg(format!("-key_file={key}"));
            }
        }
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await;
        let failure = match out {
            Err(_) => Some("still running after 60 s".to_owned()),
            Ok(Err(e)) => panic!("running {}: {e}", bin.display()),
            Ok(Ok(out)) if out.status.success() => None,
            Ok(Ok(out)) => Some(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).lines().rev().take(3).collect::<Vec<_>>().join(" | ")
            )),
        };
        let excepted = EXCEPTIONS.iter().any(|(t, c, _)| *t == target.name && c == case);
        match failure {
            Some(why) if !excepted => unexpected.push(format!("{}: {case}: {why}", target.name)),
            None if excepted => unexpected.push(format!("{}: {case} passed; remove it from EXCEPTIONS", target.name)),
            _ => {}
        }
    }
    eprintln!("grpc interop against {}: {} cases, {} unexpected results", target.name, CASES.len(), unexpected.len());
    unexpected
}

async fn gateway(etcd: &Etcd, dir: &Path, edge: Option<(&Path, &str)>) -> meshkit_gateway::RunningGateway {
    let descriptors = dir.join("interop.binpb");
    std::fs::write(&descriptors, INTEROP_DESCRIPTOR_SET).unwrap();
    let mut config: TestConfig = mesh_config(etcd, "sqlite::memory:");
    config.gateway.listen = "127.0.0.1:0".into();
    config.gateway.descriptor_sets = vec![descriptors.display().to_string()];
    if let Some((certs, name)) = edge {
        config.gateway.tls_cert_file = certs.join(format!("{name}.pem")).display().to_string();
        config.gateway.tls_key_file = certs.join(format!("{name}.key")).display().to_string();
        config.tls = tls_files(certs, name);
    }
    meshkit_gateway::start(config.into()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_interop_cases_pass_directly_and_through_the_gateway_in_cleartext_and_tls() {
    init_logs();
    // Cleartext and mTLS servers in one registry would share one service
    // name, so each pair of targets has its own etcd.
    let (plain_etcd, tls_etcd) = (Etcd::start().await.unwrap(), Etcd::start().await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    issue(&certs, "meshkit", &["interop", "gateway", "client"], 1).unwrap();

    let plain = start_interop(mesh_config(&plain_etcd, "sqlite::memory:")).await.unwrap();
    let plain_gateway = gateway(&plain_etcd, dir.path(), None).await;
    let mut config = mesh_config(&tls_etcd, "sqlite::memory:");
    config.tls = tls_files(&certs, "interop");
    let secure = start_interop(config).await.unwrap();
    let secure_gateway = gateway(&tls_etcd, dir.path(), Some((&certs, "gateway"))).await;

    let ca = certs.join("ca.pem").display().to_string();
    let client = Some((certs.join("client.pem").display().to_string(), certs.join("client.key").display().to_string()));
    let targets = [
        Target { name: "a MeshServer, cleartext", addr: plain.local_addr(), tls: None },
        Target { name: "the gateway, cleartext", addr: plain_gateway.local_addr(), tls: None },
        Target { name: "a MeshServer, mTLS", addr: secure.local_addr(), tls: Some((ca.clone(), client)) },
        Target { name: "the gateway, HTTPS", addr: secure_gateway.local_addr(), tls: Some((ca, None)) },
    ];
    let mut unexpected = Vec::new();
    for target in &targets {
        unexpected.extend(run_cases(target).await);
    }
    assert!(unexpected.is_empty(), "interop cases failed that are not listed exceptions: {unexpected:#?}");

    // The gateway's answer for a service in none of its contracts.
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", plain_gateway.local_addr()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/grpc.testing.NoSuchService/UnimplementedCall");
    let codec = tonic_prost::ProstCodec::<Empty, Empty>::default();
    let status = grpc.unary(tonic::Request::new(Empty {}), path, codec).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unimplemented, "{status:?}");
    assert!(status.message().contains("grpc.testing.NoSuchService"), "{status:?}");

    plain_gateway.shutdown().await;
    secure_gateway.shutdown().await;
    plain.shutdown().await.unwrap();
    secure.shutdown().await.unwrap();
}
