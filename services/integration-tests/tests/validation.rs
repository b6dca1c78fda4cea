//! The contract's rules seen from outside: protovalidate's own conformance
//! suite run against the evaluator meshkit's servers use, protovalidate-python
//! on the shared table (the Rust and Java runs of it are `meshkit-validate`'s
//! and the starter's tests), and schemathesis generating requests from the
//! gateway's `/openapi.json` against real services: what the schema allows
//! the servers accept, what it forbids they refuse, and nothing answers 5xx.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::path::PathBuf;

use meshkit_integration_tests::{Etcd, TestConfig, init_logs, mesh_config, sqlite_url, tool};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// protovalidate's conformance cases (runner v1.2.2, 2,872 cases) against
/// `prost-protovalidate` as meshkit runs it. The cases in files written in
/// protobuf editions cannot be run: prost-reflect 0.16 cannot load those
/// files (it panics building the error). Every other case passes.
#[tokio::test]
async fn protovalidate_conformance_every_case_that_loads_passes() {
    let out = tokio::process::Command::new(tool("protovalidate-conformance"))
        .args(["--timeout", "120s", env!("CARGO_BIN_EXE_protovalidate-executor")])
        .output()
        .await
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let summary = report.lines().rev().find(|l| l.contains("total:")).unwrap_or_default().to_owned();
    let count = |key: &str| -> u64 {
        summary.split(&format!("{key}: ")).nth(1).and_then(|r| r.split([',', ')']).next()?.parse().ok()).unwrap_or(0)
    };
    let (passed, failed, total) = (count("passed"), count("failed"), count("total"));
    println!("protovalidate conformance: {passed} of {total} passed, {failed} failed");
    let results: Vec<&str> = report.lines().filter(|l| l.trim_start().starts_with("got:")).collect();
    let not_loaded = results.iter().filter(|l| l.contains("unexpected error: no message")).count() as u64;
    let other: Vec<&&str> = results.iter().filter(|l| !l.contains("unexpected error: no message")).take(10).collect();
    assert!(total > 2000, "the runner ran: {summary}\n{}", report.lines().take(20).collect::<Vec<_>>().join("\n"));
    assert!(other.is_empty(), "cases that loaded and failed: {other:?}");
    assert_eq!(failed, not_loaded, "every failure is a case whose file did not load");
    assert!(passed * 100 >= total * 80, "{summary}");
}

#[tokio::test]
async fn protovalidate_python_reports_what_the_shared_table_lists() {
    let out = tokio::process::Command::new("python3")
        .arg(root().join("clients/python/validation_cases.py"))
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        out.status.success() && last.ends_with(" passed, 0 failed"),
        "{}\n{}",
        stdout.lines().filter(|l| !l.starts_with("ok ")).collect::<Vec<_>>().join("\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("protovalidate-python: {last}");
}

/// The one service this test does not run (notification-service needs a
/// Kafka broker); its route answers UNAVAILABLE without it.
const SKIPPED: &str = "/notifications$";

#[tokio::test]
async fn schemathesis_finds_no_failure_against_the_gateways_openapi() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let user = meshkit_user::start(mesh_config(&etcd, &sqlite_url(dir.path(), "user")).into()).await.unwrap();
    let order = meshkit_order::start(mesh_config(&etcd, &sqlite_url(dir.path(), "order")).into()).await.unwrap();
    let scheduler =
        meshkit_scheduler::start(mesh_config(&etcd, &sqlite_url(dir.path(), "scheduler")).into()).await.unwrap();
    let mut config: TestConfig = mesh_config(&etcd, "sqlite::memory:");
    config.gateway.listen = "127.0.0.1:0".into();
    let gateway = meshkit_gateway::start(config.into()).await.unwrap();
    let base = format!("http://{}", gateway.local_addr());

    let report = dir.path().join("junit.xml");
    let out = tokio::process::Command::new("schemathesis")
        .arg("--config-file")
        .arg(root().join("fixtures/schemathesis.toml"))
        .args(["--no-color", "run", &format!("{base}/openapi.json"), "--url", &base])
        .args([
            "--checks",
            "all",
            "--max-examples",
            "20",
            "--seed",
            "1",
            "--workers",
            "1",
            "--generation-database",
            "none",
        ])
        .args(["--exclude-path-regex", SKIPPED, "--report", "junit", "--report-junit-path"])
        .arg(&report)
        // Its caches go in the test's temp dir, not the source tree.
        .current_dir(dir.path())
        .output()
        .await
        .expect("schemathesis: deploy/local/install-deps.sh --test installs it");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "schemathesis found failures:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    gateway.shutdown().await;
    user.shutdown().await.unwrap();
    order.shutdown().await.unwrap();
    scheduler.shutdown().await.unwrap();
}
