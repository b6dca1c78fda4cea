use std::time::Duration;

use tokio::sync::mpsc;
use tower::ServiceExt;

use super::*;

fn watch(synced: bool) -> (mpsc::Sender<Change<String, Instance>>, ServiceWatch) {
    let (tx, changes) = mpsc::channel(8);
    (tx, ServiceWatch { changes, synced: Arc::new(AtomicBool::new(synced)) })
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
    let (_tx, w) = watch(true);
    let channel = BalancedChannel::from_watch("meshkit.test.v1.Empty", w, &ChannelConfig::default());
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
    let (_tx, w) = watch(false);
    let config = ChannelConfig::default().discovery_wait(Duration::from_millis(100));
    let channel = BalancedChannel::from_watch("meshkit.test.v1.Empty", w, &config);
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
    let (tx, w) = watch(false);
    let channel = BalancedChannel::from_watch("meshkit.test.v1.Bad", w, &ChannelConfig::default());
    let bad = Instance {
        addr: "not an address".into(),
        zone: String::new(),
        weight: 100,
        version: String::new(),
        metadata: Default::default(),
    };
    tx.send(Change::Insert("i-1".into(), bad)).await.expect("open");
    let (_tx2, _) = mpsc::channel::<()>(1);
    // Mark synced only after the bad insert is queued, as discovery does.
    drop(tx);
    let err = tokio::time::timeout(Duration::from_secs(5), channel.oneshot(request()))
        .await
        .expect("bounded")
        .expect_err("no usable instance");
    assert_eq!(status_of(err).code(), tonic::Code::Unavailable);
}
