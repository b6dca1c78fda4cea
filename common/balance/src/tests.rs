use std::time::Duration;

use tokio::sync::mpsc;
use tower::ServiceExt;

use super::*;
use meshkit_registry::registry::Instance;

/// A hand-fed discovery source: its change sender and its "first read sent" flag.
fn watch(synced: bool) -> (mpsc::Sender<Change<String, Instance>>, tokio::sync::watch::Sender<bool>, ServiceWatch) {
    let (tx, changes) = mpsc::channel(8);
    let (synced_tx, synced) = tokio::sync::watch::channel(synced);
    (tx, synced_tx, ServiceWatch { changes, synced, resyncs: Arc::default(), resumes: Arc::default() })
}

fn request() -> Request {
    http::Request::builder()
        .uri("/grpc.health.v1.Health/Check")
        .body(tonic::body::Body::empty())
        .expect("static request")
}

fn status_of(err: BoxError) -> tonic::Status {
    tonic::Status::from_error(err)
}

#[tokio::test]
async fn no_instance_fails_fast_with_unavailable() {
    let (_tx, _synced, w) = watch(true);
    let channel = BalancedChannel::from_watch("meshkit.test.v1.Empty", w, &ChannelConfig::default(), Arc::default());
    let err = tokio::time::timeout(Duration::from_secs(2), channel.oneshot(request()))
        .await
        .expect("answers without waiting")
        .expect_err("no instance");
    let status = status_of(err);
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("meshkit.test.v1.Empty"), "{}", status.message());
}

#[tokio::test]
async fn unsynced_discovery_fails_after_the_wait() {
    let (_tx, _synced, w) = watch(false);
    let config = ChannelConfig::default().discovery_wait(Duration::from_millis(100));
    let channel = BalancedChannel::from_watch("meshkit.test.v1.Empty", w, &config, Arc::default());
    let started = std::time::Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(2), channel.oneshot(request()))
        .await
        .expect("bounded wait")
        .expect_err("no instance");
    assert!(started.elapsed() >= Duration::from_millis(90));
    assert_eq!(status_of(err).code(), tonic::Code::Unavailable);
}

#[tokio::test]
async fn bad_address_is_skipped_not_fatal() {
    let (tx, synced, w) = watch(false);
    let channel = BalancedChannel::from_watch("meshkit.test.v1.Bad", w, &ChannelConfig::default(), Arc::default());
    let bad = Instance {
        addr: "not an address".into(),
        zone: String::new(),
        weight: 100,
        version: String::new(),
        metadata: Default::default(),
    };
    tx.send(Change::Insert("i-1".into(), bad)).await.expect("open");
    // Marked synced only after the insert is queued, as discovery does.
    synced.send_replace(true);
    // Well inside the 3 s discovery wait: the answer comes from the sync.
    let err = tokio::time::timeout(Duration::from_secs(1), channel.oneshot(request()))
        .await
        .expect("bounded")
        .expect_err("no usable instance");
    assert_eq!(status_of(err).code(), tonic::Code::Unavailable);
}

/// A gRPC server on loopback answering every call with OK (trailers only).
async fn ok_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut connection) = h2::server::handshake(socket).await else { return };
                while let Some(Ok((_, mut respond))) = connection.accept().await {
                    let response = http::Response::builder()
                        .header("content-type", "application/grpc")
                        .header("grpc-status", "0")
                        .body(())
                        .expect("static response");
                    let _ = respond.send_response(response, true);
                }
            });
        }
    });
    addr
}

fn instance(addr: std::net::SocketAddr, version: &str) -> Instance {
    Instance {
        addr: addr.to_string(),
        zone: String::new(),
        weight: 100,
        version: version.into(),
        metadata: Default::default(),
    }
}

fn calls_by_version(channel: &BalancedChannel, versions: &[(&str, &str)]) -> BTreeMap<String, u64> {
    let mut by_version = BTreeMap::new();
    for (id, endpoint) in channel.view().snapshot() {
        let version = versions.iter().find(|(i, _)| *i == id).map(|(_, v)| *v).expect("known id");
        *by_version.entry(version.to_owned()).or_default() += endpoint.calls;
    }
    by_version
}

#[tokio::test]
async fn a_split_holds_each_versions_share_and_skips_a_version_with_no_instance() {
    use meshkit_governance::{Governance, GovernanceSettings};
    let (tx, synced, w) = watch(false);
    let versions = [("a-1", "old"), ("a-2", "old"), ("b-1", "new")];
    for (id, version) in versions {
        tx.send(Change::Insert(id.into(), instance(ok_server().await, version))).await.expect("open");
    }
    synced.send_replace(true);
    let mut settings = GovernanceSettings::default();
    settings.split.insert("meshkit.test.v1.Split".into(), [("old".into(), 90), ("new".into(), 10)].into());
    let governance = Governance::new(settings.clone());
    let channel = BalancedChannel::from_watch_governed(
        "meshkit.test.v1.Split",
        w,
        &ChannelConfig::default(),
        Arc::default(),
        Some(governance.clone()),
    );
    let call = |channel: &BalancedChannel| {
        let channel = channel.clone();
        async move { tokio::time::timeout(Duration::from_secs(5), channel.oneshot(request())).await }
    };
    for _ in 0..200 {
        call(&channel).await.expect("in time").expect("answered");
    }
    assert_eq!(calls_by_version(&channel, &versions), [("new".into(), 20), ("old".into(), 180)].into());

    // Changed live: the next calls follow the new shares.
    settings.split.insert("meshkit.test.v1.Split".into(), [("old".into(), 50), ("new".into(), 50)].into());
    governance.replace(settings.clone());
    for _ in 0..100 {
        call(&channel).await.expect("in time").expect("answered");
    }
    assert_eq!(calls_by_version(&channel, &versions), [("new".into(), 70), ("old".into(), 230)].into());

    // The new version's only instance leaves: no call fails, all go to the old.
    tx.send(Change::Remove("b-1".into())).await.expect("open");
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..50 {
        call(&channel).await.expect("in time").expect("answered");
    }
    let old: u64 = channel.view().snapshot().values().map(|e| e.calls).sum();
    assert_eq!(old, 280, "50 more calls, all to the old version's two instances");

    // No split: p2c over every instance again.
    settings.split.clear();
    governance.replace(settings);
    tx.send(Change::Insert("b-1".into(), instance(ok_server().await, "new"))).await.expect("open");
    for _ in 0..20 {
        call(&channel).await.expect("in time").expect("answered");
    }
}

mod endpoint_stats {
    use std::time::Instant;

    use super::super::endpoint::{EndpointConfig, EndpointStats, Outcome, PoolCounts};
    use super::*;

    fn pool(n: usize, config: EndpointConfig) -> (Arc<PoolCounts>, Vec<Arc<EndpointStats>>) {
        let counts = Arc::new(PoolCounts::new());
        let config = Arc::new(config);
        let stats = (0..n)
            .map(|i| {
                Arc::new(EndpointStats::new(
                    format!("i-{i}"),
                    format!("127.0.0.1:{i}"),
                    100,
                    config.clone(),
                    counts.clone(),
                ))
            })
            .collect();
        (counts, stats)
    }

    fn call(stats: &EndpointStats, outcome: Outcome, latency: Duration) {
        let now = Instant::now();
        stats.test_started(now);
        stats.test_finished(Some(outcome), latency, now);
    }

    #[test]
    fn load_follows_latency_in_flight_failures_and_weight() {
        let (counts, s) = pool(2, EndpointConfig::default());
        let now = Instant::now();
        let base = s[0].load(now);
        call(&s[0], Outcome::Success, Duration::from_millis(50));
        assert!(s[0].load(Instant::now()) > base * 5.0, "a slow answer raises the load at once");
        s[1].test_started(now);
        let one = s[1].load(now);
        s[1].test_started(now);
        assert!(s[1].load(now) >= one * 1.49, "calls in flight add load: 3 vs 2 shares");
        let (_, fresh) = pool(1, EndpointConfig::default());
        let before = fresh[0].load(now);
        call(&fresh[0], Outcome::Failure, Duration::from_millis(5));
        assert!(fresh[0].load(Instant::now()) > before * 2.0, "failures are penalised");
        drop(counts);
        let fresh_pool = Arc::new(PoolCounts::new());
        let config = Arc::new(EndpointConfig::default());
        let normal = EndpointStats::new("n".into(), "a:1".into(), 100, config.clone(), fresh_pool.clone());
        let heavy = EndpointStats::new("w".into(), "a:2".into(), 400, config, fresh_pool);
        let (n, h) = (normal.load(now), heavy.load(now));
        assert!((h * 4.0 - n).abs() < n * 0.01, "weight 400 costs a quarter of weight 100: {h} vs {n}");
    }

    #[test]
    fn a_slow_estimate_fades_back_to_the_pool_so_the_endpoint_is_tried_again() {
        let (_counts, s) = pool(2, EndpointConfig::default());
        for _ in 0..50 {
            call(&s[0], Outcome::Success, Duration::from_millis(2));
        }
        // One attempt abandoned after 300 ms: the estimate jumps, and p2c avoids it.
        let now = Instant::now();
        s[1].test_started(now);
        s[1].test_finished(None, Duration::from_millis(300), now);
        assert!(s[1].load(now) > 30.0 * s[0].load(now), "at once, the slow endpoint costs far more");
        let later = now + Duration::from_secs(10);
        let (mid, fast) = (s[1].load(later), s[0].load(later));
        assert!(
            mid < s[1].load(now) / 5.0 && mid > 2.0 * fast,
            "10 s on, it costs less but still more: {mid} vs {fast}"
        );
        let much_later = now + Duration::from_secs(40);
        assert!(s[1].load(much_later) < 1.5 * fast, "40 s on, it competes again: {} vs {fast}", s[1].load(much_later));
        // A fast answer replaces the faded estimate.
        s[1].test_started(much_later);
        s[1].test_finished(Some(Outcome::Success), Duration::from_millis(2), much_later);
        assert!(s[1].load(much_later) < 1.5 * fast);
    }

    #[test]
    fn a_new_endpoint_starts_from_the_pools_typical_latency() {
        let (counts, s) = pool(1, EndpointConfig { default_rtt: Duration::from_millis(5), ..Default::default() });
        for _ in 0..50 {
            call(&s[0], Outcome::Success, Duration::from_micros(200));
        }
        let newcomer = EndpointStats::new("new".into(), "a:2".into(), 100, Arc::new(EndpointConfig::default()), counts);
        let rtt = newcomer.snapshot().rtt_ms;
        assert!(rtt < 1.0, "a newcomer must not look 25 times slower than its peers: {rtt} ms");
    }

    #[test]
    fn consecutive_failures_eject_and_a_probe_brings_back() {
        let config = EndpointConfig { eject_after: 3, eject_base: Duration::from_millis(30), ..Default::default() };
        let (counts, s) = pool(3, config);
        for _ in 0..2 {
            call(&s[0], Outcome::Failure, Duration::from_millis(1));
        }
        assert_eq!(s[0].snapshot().state, "ready");
        call(&s[0], Outcome::Failure, Duration::from_millis(1));
        assert_eq!(s[0].snapshot().state, "ejected");
        assert_eq!(counts.ejected.load(Ordering::Relaxed), 1);
        std::thread::sleep(Duration::from_millis(40));
        assert!(s[0].test_ejected_until().is_none(), "backoff over: probing");
        assert_eq!(s[0].snapshot().state, "probing");
        // A failed probe ejects again, for twice as long.
        call(&s[0], Outcome::Failure, Duration::from_millis(1));
        let snap = s[0].snapshot();
        assert_eq!(snap.state, "ejected");
        assert!(snap.ejected_for_ms > 30, "{}", snap.ejected_for_ms);
        std::thread::sleep(Duration::from_millis(70));
        assert!(s[0].test_ejected_until().is_none());
        call(&s[0], Outcome::Success, Duration::from_millis(1));
        assert_eq!(s[0].snapshot().state, "ready");
        assert_eq!(counts.ejected.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_lost_connection_ejects_at_once_but_never_the_last_endpoint() {
        let (counts, s) = pool(2, EndpointConfig::default());
        call(&s[0], Outcome::ConnectionLost, Duration::from_millis(1));
        assert_eq!(s[0].snapshot().state, "ejected");
        call(&s[1], Outcome::ConnectionLost, Duration::from_millis(1));
        assert_eq!(s[1].snapshot().state, "ready", "the last endpoint in rotation stays");
        assert_eq!(counts.ejected.load(Ordering::Relaxed), 1);
        drop(s);
        assert_eq!(counts.ejected.load(Ordering::Relaxed), 0, "removed endpoints leave the counts");
        assert_eq!(counts.endpoints.load(Ordering::Relaxed), 0);
    }
}

mod retries {
    use std::io::ErrorKind;

    use tower_test::mock;

    use super::super::{body::TrackedBody, retry::Retry};
    use super::*;
    use meshkit_base::methods::{MethodInfo, MethodTable};

    const IDEMPOTENT: &str = "/t.S/Get";
    const UNSAFE: &str = "/t.S/Create";

    fn table() -> Arc<MethodTable> {
        let mut t = MethodTable::default();
        t.insert(IDEMPOTENT, MethodInfo { idempotent: true, client_streaming: false });
        t.insert(UNSAFE, MethodInfo { idempotent: false, client_streaming: false });
        Arc::new(t)
    }

    fn req(path: &str) -> Request {
        http::Request::builder().uri(path).body(tonic::body::Body::empty()).expect("static request")
    }

    fn ok() -> Response {
        http::Response::new(TrackedBody::new(tonic::body::Body::empty(), None))
    }

    /// Runs one call whose attempts meet `errors` in turn (then success);
    /// returns how many attempts reached the inner service and whether the call succeeded.
    async fn run(path: &str, errors: Vec<ErrorKind>, config: RetryConfig) -> (usize, bool) {
        let (svc, mut handle) = mock::pair::<Request, Response>();
        let mut retry = Retry::new(svc, table(), config, "test.Retry");
        retry.ready().await.expect("ready");
        let call = tokio::spawn(retry.call(req(path)));
        let mut attempts = 0;
        let mut errors = errors.into_iter();
        loop {
            let next = tokio::time::timeout(Duration::from_millis(300), handle.next_request()).await;
            let Ok(Some((_, respond))) = next else { break };
            attempts += 1;
            match errors.next() {
                Some(kind) => respond.send_error(std::io::Error::from(kind)),
                None => respond.send_response(ok()),
            }
        }
        (attempts, call.await.expect("no panic").is_ok())
    }

    #[tokio::test]
    async fn refused_connections_are_retried_for_any_method() {
        assert_eq!(run(UNSAFE, vec![ErrorKind::ConnectionRefused], RetryConfig::default()).await, (2, true));
    }

    #[tokio::test]
    async fn a_reset_after_sending_is_retried_only_when_idempotent() {
        assert_eq!(run(UNSAFE, vec![ErrorKind::ConnectionReset], RetryConfig::default()).await, (1, false));
        assert_eq!(run(IDEMPOTENT, vec![ErrorKind::ConnectionReset], RetryConfig::default()).await, (2, true));
    }

    #[tokio::test]
    async fn attempts_are_capped() {
        let three = vec![ErrorKind::ConnectionReset; 5];
        assert_eq!(run(IDEMPOTENT, three, RetryConfig::default()).await, (3, false));
    }

    #[tokio::test]
    async fn the_budget_stops_retries_once_spent() {
        // No floor and no share of traffic: no retry at all.
        let config = RetryConfig { budget_min_per_sec: 0, budget_percent: 0.0, ..Default::default() };
        assert_eq!(run(IDEMPOTENT, vec![ErrorKind::ConnectionReset], config).await, (1, false));
    }

    #[test]
    fn the_budget_is_a_share_of_traffic_plus_a_floor() {
        use super::super::retry::RetryBudget;
        let budget = RetryBudget::new(0, 0.2);
        assert!(!budget.withdraw(), "no traffic, no floor: no retry");
        for _ in 0..100 {
            budget.deposit();
        }
        let granted = (0..50).filter(|_| budget.withdraw()).count();
        assert_eq!(granted, 20, "20% of 100 calls");
        let floor = RetryBudget::new(2, 0.0);
        let granted = (0..50).filter(|_| floor.withdraw()).count();
        assert_eq!(granted, 20, "2 per second over the 10 s window");
    }

    #[tokio::test]
    async fn unknown_methods_are_sent_once() {
        assert_eq!(run("/t.S/Unknown", vec![ErrorKind::ConnectionRefused], RetryConfig::default()).await, (1, false));
    }

    /// Starts an idempotent call carrying `grpc-timeout: timeout` through a
    /// retry layer over a mock service.
    async fn call_with_timeout(
        timeout: &'static str,
    ) -> (tokio::task::JoinHandle<Result<Response, BoxError>>, mock::Handle<Request, Response>) {
        let (svc, handle) = mock::pair::<Request, Response>();
        let mut retry = Retry::new(svc, table(), RetryConfig::default(), "test.Retry");
        let mut request = req(IDEMPOTENT);
        request.headers_mut().insert("grpc-timeout", http::HeaderValue::from_static(timeout));
        retry.ready().await.expect("ready");
        (tokio::spawn(retry.call(request)), handle)
    }

    #[tokio::test]
    async fn no_retry_outlives_the_deadline() {
        let started = std::time::Instant::now();
        let (call, mut handle) = call_with_timeout("100m").await;
        // The first attempt never answers.
        let (_, _respond) = handle.next_request().await.expect("first attempt");
        let err = call.await.expect("no panic").expect_err("deadline");
        let status = tonic::Status::from_error(err);
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(started.elapsed() < Duration::from_millis(400), "took {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_deadline_spent_before_sending_fails_without_a_call() {
        // One nanosecond: gone before the request can leave.
        let (call, mut handle) = call_with_timeout("1n").await;
        let err = call.await.expect("no panic").expect_err("deadline");
        assert_eq!(tonic::Status::from_error(err).code(), tonic::Code::DeadlineExceeded);
        let sent = tokio::time::timeout(Duration::from_millis(50), handle.next_request()).await;
        assert!(!matches!(sent, Ok(Some(_))), "the request reached the service");
    }

    #[tokio::test]
    async fn the_first_attempt_keeps_its_own_grpc_timeout_and_a_retry_sends_what_is_left() {
        let (call, mut handle) = call_with_timeout("5S").await;
        let (first, respond) = handle.next_request().await.expect("first attempt");
        let header = &first.headers()["grpc-timeout"];
        // As the caller wrote it: the same value on every call stays indexed in HPACK.
        assert_eq!(header, "5S");
        assert!(!header.is_sensitive());
        tokio::time::sleep(Duration::from_millis(20)).await;
        respond.send_error(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        let (second, respond) = handle.next_request().await.expect("a retry");
        let header = &second.headers()["grpc-timeout"];
        let left = meshkit_base::deadline::parse_grpc_timeout(header).expect("a grpc-timeout");
        assert!(left < Duration::from_millis(4_980) && left > Duration::from_secs(4), "{left:?}");
        // A value of its own: sent without taking a place in the header table.
        assert!(header.is_sensitive());
        respond.send_response(ok());
        call.await.expect("no panic").expect("answered");
    }

    #[tokio::test]
    async fn an_inherited_deadline_travels_as_grpc_timeout() {
        let (svc, mut handle) = mock::pair::<Request, Response>();
        let mut retry = Retry::new(svc, table(), RetryConfig::default(), "test.Retry");
        let deadline = tokio::time::Instant::now() + Duration::from_millis(250);
        retry.ready().await.expect("ready");
        let call = tokio::spawn(meshkit_base::deadline::with_deadline(deadline, retry.call(req(IDEMPOTENT))));
        let (sent, respond) = handle.next_request().await.expect("one attempt");
        let timeout =
            sent.headers().get("grpc-timeout").and_then(meshkit_base::deadline::parse_grpc_timeout).expect("header");
        assert!(timeout <= Duration::from_millis(250) && timeout > Duration::from_millis(150), "{timeout:?}");
        assert!(sent.headers()["grpc-timeout"].is_sensitive(), "its value is this call's alone");
        respond.send_response(ok());
        call.await.expect("no panic").expect("answered");
    }
}

/// A call of a method no table knows, so it is never retried.
fn unknown_call() -> Request {
    http::Request::builder()
        .uri("/meshkit.test.v1.Refused/Call")
        .body(tonic::body::Body::empty())
        .expect("static request")
}

/// A loopback address nothing listens on: connecting is refused.
async fn refusing_addr() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

#[tokio::test]
async fn an_endpoint_that_refuses_connections_takes_no_call_while_another_is_live() {
    let (tx, synced, w) = watch(false);
    // Short ejections, so the refusing endpoint is probed many times meanwhile.
    let endpoint = EndpointConfig {
        eject_base: Duration::from_millis(5),
        eject_max: Duration::from_millis(20),
        ..Default::default()
    };
    let config = ChannelConfig::default().endpoint(endpoint);
    // No method table: nothing is retried, so a call sent to the refusing
    // endpoint would fail.
    let channel = BalancedChannel::from_watch("meshkit.test.v1.Refused", w, &config, Arc::default());
    tx.send(Change::Insert("live".into(), instance(ok_server().await, ""))).await.expect("open");
    tx.send(Change::Insert("dead".into(), instance(refusing_addr().await, ""))).await.expect("open");
    synced.send_replace(true);
    // Several callers at once, so the live endpoint is often busy and the
    // dead one's load looks lower.
    let callers: Vec<_> = (0..8)
        .map(|c| {
            let channel = channel.clone();
            tokio::spawn(async move {
                for i in 0..40 {
                    let res = tokio::time::timeout(Duration::from_secs(2), channel.clone().oneshot(unknown_call()))
                        .await
                        .expect("bounded")
                        .unwrap_or_else(|e| panic!("caller {c}, call {i} failed: {}", status_of(e).message()));
                    assert_eq!(meshkit_telemetry::metrics::status_of(res.headers()), Some(tonic::Code::Ok));
                    if i % 10 == 9 {
                        // Let ejections end, so the dead endpoint is probed again.
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.expect("no call failed");
    }
    let endpoints = channel.view().snapshot();
    let dead = endpoints.iter().find(|(id, _)| id.as_str() == "dead").map(|(_, e)| e).expect("the dead endpoint");
    assert_eq!(dead.calls, 0, "calls were spent on an endpoint that refuses connections");
    assert!(dead.failures >= 2, "its refusals were not counted: {} failures", dead.failures);
}

#[tokio::test]
async fn the_last_endpoint_refusing_connections_fails_calls_at_once() {
    let (tx, synced, w) = watch(false);
    let channel = BalancedChannel::from_watch("meshkit.test.v1.Refused", w, &ChannelConfig::default(), Arc::default());
    tx.send(Change::Insert("dead".into(), instance(refusing_addr().await, ""))).await.expect("open");
    synced.send_replace(true);
    for _ in 0..3 {
        let err = tokio::time::timeout(Duration::from_secs(1), channel.clone().oneshot(unknown_call()))
            .await
            .expect("fails without waiting")
            .expect_err("nothing listens");
        assert_eq!(status_of(err).code(), tonic::Code::Unavailable);
    }
}
