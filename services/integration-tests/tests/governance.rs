//! Governance on real servers: each rule trips and recovers, rules follow
//! etcd within a second (a bad one is refused and reported), and a server at
//! three times its capacity keeps the latency of the calls it admits.

#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use meshkit_common::{
    ChannelBuilder, RunningServer,
    config::{BreakerRule, GovernanceSettings, MethodRule},
    governance::{Governance, PUSHBACK_HEADER},
};
use meshkit_integration_tests::{
    Etcd, bin_dir,
    echo::{COMPONENT, ECHO, EchoRequest, EchoServiceClient, Faults, direct_client, start_governed},
    eventually, init_logs,
};
use tonic::{Code, transport::Channel};

const ECHO_PATH: &str = "/meshkit.echo.v1.EchoService/Echo";

fn rules(pattern: &str, rule: MethodRule) -> GovernanceSettings {
    GovernanceSettings { methods: [(pattern.to_owned(), rule)].into(), ..GovernanceSettings::default() }
}

async fn echo_server(etcd: &Etcd, governance: GovernanceSettings, faults: Faults) -> RunningServer {
    start_governed(etcd, governance, faults).await.unwrap()
}

async fn direct(server: &RunningServer) -> EchoServiceClient<Channel> {
    direct_client(server).await.unwrap()
}

async fn call(client: &mut EchoServiceClient<Channel>, caller: Option<&str>) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(EchoRequest { text: "hi".into(), ..Default::default() });
    if let Some(caller) = caller {
        request.metadata_mut().insert("x-meshkit-caller", caller.parse().unwrap());
    }
    client.echo(request).await.map(|_| ())
}

#[tokio::test]
async fn a_rate_limit_refuses_with_a_pushback_and_recovers() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let rule = MethodRule { qps: 5.0, burst: 5, ..MethodRule::default() };
    let server = echo_server(&etcd, rules(ECHO_PATH, rule), Faults::default()).await;
    let mut client = direct(&server).await;
    let mut refused = Vec::new();
    for _ in 0..10 {
        if let Err(status) = call(&mut client, None).await {
            refused.push(status);
        }
    }
    assert_eq!(refused.len(), 5, "a burst of 5 passes, the rest is refused");
    let status = &refused[0];
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("rate limit of 5/s on /meshkit.echo.v1.EchoService/Echo"), "{status:?}");
    let pushback: u64 = status.metadata().get(PUSHBACK_HEADER).unwrap().to_str().unwrap().parse().unwrap();
    assert!((1..=200).contains(&pushback), "retry in {pushback} ms");
    // Other methods are not limited by this rule.
    let expand = meshkit_integration_tests::echo::ExpandRequest { text: "x".into(), times: 1 };
    assert!(client.expand(expand).await.is_ok());
    // The bucket refills at 5/s.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert!(call(&mut client, None).await.is_ok());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_per_caller_limit_keeps_callers_apart() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let rule = MethodRule { caller_qps: 2.0, caller_burst: 2, ..MethodRule::default() };
    let server = echo_server(&etcd, rules("/meshkit.echo.v1.EchoService/*", rule), Faults::default()).await;
    let mut client = direct(&server).await;
    let a: Vec<bool> = futures::future::join_all((0..3).map(|_| {
        let mut c = client.clone();
        async move { call(&mut c, Some("caller-a")).await.is_ok() }
    }))
    .await;
    assert_eq!(a.iter().filter(|ok| **ok).count(), 2, "caller-a gets its burst of 2");
    let status = call(&mut client, Some("caller-a")).await.unwrap_err();
    assert!(status.message().contains("per caller") && status.message().contains("caller-a"), "{status:?}");
    assert!(call(&mut client, Some("caller-b")).await.is_ok(), "caller-b has its own allowance");
    assert!(call(&mut client, Some("caller-b")).await.is_ok());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_concurrency_limit_refuses_calls_over_it_and_a_method_timeout_is_the_deadline() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let mut governance = rules(ECHO_PATH, MethodRule { concurrency: 2, ..MethodRule::default() });
    governance
        .methods
        .insert("/meshkit.echo.v1.EchoService/Collect".into(), MethodRule { timeout_ms: 100, ..MethodRule::default() });
    let server = echo_server(&etcd, governance, Faults::with_bottleneck(10, 300)).await;
    let client = direct(&server).await;
    let results = futures::future::join_all((0..4).map(|_| {
        let mut c = client.clone();
        async move { call(&mut c, None).await }
    }))
    .await;
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(refused.len(), 2, "{results:?}");
    assert!(
        refused
            .iter()
            .all(|s| s.code() == Code::ResourceExhausted && s.message().contains("concurrency limit of 2 calls"))
    );
    assert!(call(&mut client.clone(), None).await.is_ok(), "permits come back when calls end");

    // Collect waits for the client's stream to end: the rule's 100 ms deadline ends it.
    let started = Instant::now();
    let (_tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
    let status = client.clone().collect(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(90) && took < Duration::from_millis(1_000), "{took:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_breaker_opens_on_errors_probes_and_closes() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let faults = Faults::default();
    let server = echo_server(&etcd, GovernanceSettings::default(), faults.clone()).await;
    let breaker = BreakerRule {
        enabled: true,
        error_ratio: 0.5,
        min_requests: 5,
        window_ms: 2_000,
        open_ms: 300,
        probes: 1,
        ..BreakerRule::default()
    };
    let governance = Governance::new(rules(ECHO_PATH, MethodRule { breaker, ..MethodRule::default() }));
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit").with_governance(governance.clone());
    let mut client = EchoServiceClient::new(channels.balanced(ECHO));
    assert!(client.echo(EchoRequest::default()).await.is_ok());

    // With the call above, four failures make the five calls a decision needs (4/5 ≥ 0.5).
    faults.fail_with.store(Code::Internal as i32, Ordering::Relaxed);
    for _ in 0..4 {
        assert_eq!(client.echo(EchoRequest::default()).await.unwrap_err().code(), Code::Internal);
    }
    let served = || meshkit_common::metrics::server_method(ECHO_PATH).calls(Code::Internal);
    let before = served();
    let open = client.echo(EchoRequest::default()).await.unwrap_err();
    assert_eq!(open.code(), Code::Unavailable);
    assert!(open.message().contains("circuit breaker on /meshkit.echo.v1.EchoService/Echo is open"), "{open:?}");
    assert!(open.message().contains("error ratio"), "{open:?}");
    assert_eq!(served(), before, "an open breaker answers without a network call");
    let report = governance.report();
    assert_eq!(report.breakers[0].state, "open");

    // The backend recovers; after open_ms one probe goes through and closes it.
    faults.fail_with.store(0, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(client.echo(EchoRequest::default()).await.is_ok(), "the probe");
    assert_eq!(governance.report().breakers[0].state, "closed");
    for _ in 0..10 {
        assert!(client.echo(EchoRequest::default()).await.is_ok());
    }
    assert!(governance.report().rejections.iter().any(|r| r.rule == "breaker" && r.count >= 1));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn adaptive_throttling_sheds_calls_locally_while_the_backend_refuses_them() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let faults = Faults::default();
    let server = echo_server(&etcd, GovernanceSettings::default(), faults.clone()).await;
    let mut settings = GovernanceSettings::default();
    settings.throttling.enabled = true;
    let governance = Governance::new(settings);
    let channels = ChannelBuilder::new(etcd.client().await, "/meshkit").with_governance(governance.clone());
    let mut client = EchoServiceClient::new(channels.balanced(ECHO));
    faults.fail_with.store(Code::ResourceExhausted as i32, Ordering::Relaxed);
    let served = || meshkit_common::metrics::server_method(ECHO_PATH).calls(Code::ResourceExhausted);
    let before = served();
    let mut local = 0;
    for _ in 0..200 {
        let status = client.echo(EchoRequest::default()).await.unwrap_err();
        local += u32::from(status.message().starts_with("adaptive throttling"));
    }
    let reached = served() - before;
    assert!(local > 100, "most calls refused locally: {local} of 200");
    assert_eq!(reached + u64::from(local), 200, "each call either reached the server or was refused here");
    assert!(governance.report().throttling[ECHO] > 0.5);
    server.shutdown().await.unwrap();
}

/// meshctl's outcome as (succeeded, stdout, stderr).
async fn meshctl(etcd: &Etcd, args: &[&str]) -> (bool, String, String) {
    let (code, out, err) = meshkit_integration_tests::meshctl(etcd, args).await;
    (code == 0, out, err)
}

#[tokio::test]
async fn a_rule_set_in_etcd_applies_within_a_second_and_a_bad_one_is_refused() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let server = echo_server(&etcd, GovernanceSettings::default(), Faults::default()).await;
    let mut client = direct(&server).await;
    for _ in 0..20 {
        assert!(call(&mut client, None).await.is_ok(), "no rule yet");
    }

    let rule = format!(r#"{{"{ECHO_PATH}":{{"qps":1,"burst":1}}}}"#);
    let set_at = Instant::now();
    let (ok, out, err) = meshctl(&etcd, &["config", "set", COMPONENT, "governance.methods", &rule]).await;
    assert!(ok, "{out}{err}");
    let limited = eventually("the rule is in force", Duration::from_secs(2), || async {
        let refused = call(&mut client.clone(), None).await.is_err();
        refused.then(|| set_at.elapsed())
    })
    .await;
    assert!(limited < Duration::from_secs(1), "applied {limited:?} after the write");

    // meshctl refuses an invalid value and writes nothing.
    let (ok, _, err) = meshctl(
        &etcd,
        &["config", "set", COMPONENT, "governance.methods", &format!(r#"{{"{ECHO_PATH}":{{"qps":-1}}}}"#)],
    )
    .await;
    assert!(!ok && err.contains("refused, nothing written") && err.contains("qps"), "{err}");
    // Written around meshctl, the process refuses it, says why, and keeps the last good rule.
    let mut etcd_client = etcd.client().await;
    etcd_client
        .put(
            format!("/meshkit/config/{COMPONENT}/governance.methods"),
            format!(r#"{{"{ECHO_PATH}":{{"qps":"fast"}}}}"#),
            None,
        )
        .await
        .unwrap();
    let admin = server.admin_addr().unwrap().to_string();
    let reason = eventually("the refusal is reported", Duration::from_secs(2), || async {
        let reports: serde_json::Value =
            serde_json::from_str(&meshkit_common::admin::http_get(&admin, "/reports").await.ok()?).ok()?;
        reports["config"]["last_rejection"].as_str().map(str::to_owned)
    })
    .await;
    assert!(reason.contains("governance.methods") && reason.contains("qps"), "{reason}");
    let first = call(&mut client, None).await;
    let refused = match first {
        Err(status) => status,
        Ok(()) => call(&mut client, None).await.unwrap_err(),
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "the last good rule stays");

    // get, history and governance show what happened.
    let (ok, out, _) = meshctl(&etcd, &["config", "get", COMPONENT]).await;
    assert!(ok && out.contains("governance.methods") && out.contains("fast"), "{out}");
    let (ok, out, _) = meshctl(&etcd, &["config", "history", COMPONENT, "governance.methods"]).await;
    assert!(ok, "{out}");
    let lines: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(lines.len(), 2, "two values, newest first: {out}");
    assert!(lines[0].contains("fast") && lines[1].contains(r#""qps":1"#), "{out}");
    let metrics = meshkit_integration_tests::prometheus::parse(
        &meshkit_common::admin::http_get(&admin, "/metrics").await.unwrap(),
    );
    let series = format!(r#"meshkit_governance_rejections_total{{side="server",target="{ECHO_PATH}",rule="qps"}}"#);
    assert!(metrics.get(&series).is_some_and(|n| *n >= 1.0), "{series} in /metrics");
    assert!(metrics.get("meshkit_config_rejections_total").is_some_and(|n| *n >= 1.0));
    let (ok, out, _) = meshctl(&etcd, &["governance", &admin]).await;
    assert!(ok && out.contains(ECHO_PATH) && out.contains("qps=1"), "{out}");
    assert!(out.lines().any(|l| l.contains("server") && l.contains("qps")), "refusals by rule: {out}");

    // Deleting the rule lifts the limit.
    let (ok, _, err) = meshctl(&etcd, &["config", "delete", COMPONENT, "governance.methods"]).await;
    assert!(ok, "{err}");
    eventually("the limit is gone", Duration::from_secs(2), || async {
        let all = futures::future::join_all((0..5).map(|_| call_owned(client.clone()))).await;
        all.iter().all(Result::is_ok).then_some(())
    })
    .await;
    server.shutdown().await.unwrap();
}

async fn call_owned(mut client: EchoServiceClient<Channel>) -> Result<(), tonic::Status> {
    call(&mut client, None).await
}

#[tokio::test]
async fn meshctl_config_watch_prints_changes_as_they_happen() {
    init_logs();
    let etcd = Etcd::start().await.unwrap();
    let mut watch = tokio::process::Command::new(bin_dir().join("meshctl"))
        .args(["--etcd", &etcd.endpoint(), "config", "watch", "order"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(meshctl(&etcd, &["config", "set", "order", "log.filter", "debug"]).await.0);
    assert!(meshctl(&etcd, &["config", "set", "_global", "governance.shedding.enabled", "true"]).await.0);
    assert!(meshctl(&etcd, &["config", "set", "user", "log.filter", "warn"]).await.0, "another component's change");
    assert!(meshctl(&etcd, &["config", "delete", "order", "log.filter"]).await.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    watch.start_kill().unwrap();
    let out = watch.wait_with_output().await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].contains(r#"set     order/log.filter = "debug""#), "{text}");
    assert!(lines[1].contains("set     _global/governance.shedding.enabled = true"), "{text}");
    assert!(lines[2].contains("delete  order/log.filter"), "{text}");
}
