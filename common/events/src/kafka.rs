//! A lazily connected rskafka client with bounded requests.
//!
//! rskafka retries a failing request forever by default; here every request
//! gives up after `events.request_timeout_ms`, so the relay and the consumers
//! decide themselves when to try again (and a stopped broker never hangs a
//! shutdown). The client is built on first use and rebuilt after a failure, so
//! a process starts while the broker is down and connects once it is back.

use std::{collections::HashMap, sync::Arc, time::Duration};

use rskafka::{
    BackoffConfig,
    client::{
        Client, ClientBuilder,
        error::{Error as KafkaError, ProtocolError},
        partition::{Compression, OffsetAt, PartitionClient, UnknownTopicHandling},
    },
    record::{Record, RecordAndOffset},
};
use tokio::sync::Mutex;

use crate::{
    error::{Error, Result},
    settings::EventSettings,
};

/// Shared by the relay and the consumers of a process; cheap to clone.
#[derive(Clone)]
pub struct Kafka {
    inner: Arc<Inner>,
}

struct Inner {
    settings: EventSettings,
    client_id: String,
    client: Mutex<Option<Arc<Client>>>,
    partitions: Mutex<HashMap<(String, i32), Arc<PartitionClient>>>,
    topics: Mutex<HashMap<String, i32>>,
    /// Requests failing since when, if they do.
    outage: std::sync::Mutex<Option<Outage>>,
}

/// A spell of failing requests: all of them (every broker down) or some
/// (one broker of several down, its partitions' requests failing while the
/// others' succeed).
struct Outage {
    since: std::time::Instant,
    last_failure: std::time::Instant,
    failures: u64,
}

/// How long requests must go without a failure before a success ends an
/// outage: longer than the relay's and the consumers' longest backoff, so
/// one broker down among several stays one outage.
const OUTAGE_QUIET: std::time::Duration = std::time::Duration::from_secs(10);

/// What one fetch returned.
pub struct Fetched {
    pub records: Vec<RecordAndOffset>,
    pub high_watermark: i64,
    /// Where the read started: the offset asked for, or where the broker's
    /// log forced it to move (see [`Kafka::fetch`]).
    pub start: i64,
}

impl Kafka {
    pub fn new(settings: EventSettings, client_id: impl Into<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                client_id: client_id.into(),
                client: Mutex::new(None),
                partitions: Mutex::new(HashMap::new()),
                topics: Mutex::new(HashMap::new()),
                outage: std::sync::Mutex::new(None),
            }),
        }
    }

    /// Notes how a request went, so a broker outage logs one line when it
    /// starts and one when it ends, not one per retry of the relay and of
    /// every partition worker. Errors the broker itself sent back (a
    /// protocol error code) prove it answers.
    fn observe<T>(&self, result: Result<T>) -> Result<T> {
        let failed = matches!(&result, Err(Error::Kafka { code: None, .. }));
        let Ok(mut outage) = self.inner.outage.lock() else { return result };
        let now = std::time::Instant::now();
        match (&result, outage.as_mut()) {
            (Err(e), None) if failed => {
                *outage = Some(Outage { since: now, last_failure: now, failures: 1 });
                self.log_failure(e);
            }
            (Err(_), Some(o)) if failed => {
                o.last_failure = now;
                o.failures += 1;
            }
            (Ok(_), Some(o)) if o.last_failure.elapsed() >= OUTAGE_QUIET => {
                tracing::info!(
                    brokers = self.inner.settings.brokers.join(","),
                    after_secs = o.since.elapsed().as_secs(),
                    failed_requests = o.failures,
                    "Kafka requests succeed again"
                );
                *outage = None;
            }
            _ => {}
        }
        result
    }

    /// The one line for the start of an outage: settings to fix when the
    /// brokers refused us, else the broker that does not answer.
    fn log_failure(&self, e: &Error) {
        let settings = &self.inner.settings;
        let brokers = settings.brokers.join(",");
        match Refusal::of(e) {
            Some(Refusal::Login) => tracing::error!(
                brokers,
                mechanism = settings.sasl_mechanism,
                user = settings.sasl_username,
                error = %e,
                "Kafka refused the SASL login (events.sasl_username, events.sasl_password); retrying quietly until it accepts"
            ),
            Some(Refusal::Certificate) => tracing::error!(
                brokers,
                ca_file = settings.tls_ca_file,
                error = %e,
                "the Kafka brokers' TLS certificate is not trusted by events.tls_ca_file; retrying quietly until it is"
            ),
            Some(Refusal::Handshake) => tracing::error!(
                brokers,
                ca_file = settings.tls_ca_file,
                cert_file = settings.tls_cert_file,
                error = %e,
                "the TLS handshake with Kafka failed (events.tls_*); retrying quietly until it succeeds"
            ),
            None => tracing::warn!(
                brokers,
                error = %e,
                "Kafka requests fail (the error names the broker); retrying quietly until they succeed"
            ),
        }
    }

    pub fn settings(&self) -> &EventSettings {
        &self.inner.settings
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.inner.settings.request_timeout_ms)
    }

    async fn client(&self) -> Result<Arc<Client>> {
        let mut slot = self.inner.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let backoff = BackoffConfig {
            init_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
            base: 2.0,
            // A few quick retries in rskafka (a leader that moved, a broker
            // restarting), then it gives up with the last error: a refused
            // login or an untrusted certificate, which the bare timeout of
            // our own bound would hide. Its deadline counts the sleeps only,
            // not the attempts (a refused SCRAM login takes about 0.5 s), so
            // it is a twentieth of ours.
            deadline: Some(self.timeout() / 20),
        };
        let mut builder = ClientBuilder::new(self.inner.settings.brokers.clone())
            .client_id(self.inner.client_id.as_str())
            .backoff_config(backoff);
        if let Some(tls) = broker_tls(&self.inner.settings)? {
            builder = builder.tls_config(tls);
        }
        if let Some(sasl) = sasl(&self.inner.settings) {
            builder = builder.sasl_config(sasl);
        }
        let client = Arc::new(bounded(self.timeout(), "connect", builder.build()).await?);
        *slot = Some(client.clone());
        Ok(client)
    }

    /// Forgets the client and every partition client after a failure, so the
    /// next request connects afresh.
    async fn reset(&self) {
        self.inner.client.lock().await.take();
        self.inner.partitions.lock().await.clear();
    }

    async fn partition(&self, topic: &str, partition: i32) -> Result<Arc<PartitionClient>> {
        let key = (topic.to_owned(), partition);
        if let Some(client) = self.inner.partitions.lock().await.get(&key) {
            return Ok(client.clone());
        }
        let client = self.client().await?;
        let pc = bounded(
            self.timeout(),
            "partition lookup",
            client.partition_client(topic, partition, UnknownTopicHandling::Retry),
        )
        .await;
        // rskafka 0.6 looks the leader up in its client's metadata cache and,
        // when that cache says "no leader" (taken while the cluster was
        // electing, e.g. just after every broker restarted), returns
        // LeaderNotAvailable without invalidating it: every later lookup gets
        // the same stale answer, though the partition has long had a leader.
        // Dropping the client drops its cache; the next lookup asks afresh.
        let pc = match pc {
            Ok(pc) => pc,
            Err(e) => {
                self.reset().await;
                return Err(e);
            }
        };
        let pc = Arc::new(pc);
        self.inner.partitions.lock().await.insert(key, pc.clone());
        Ok(pc)
    }

    /// Creates `topic` with `events.partitions` partitions unless it exists;
    /// returns its partition count.
    pub async fn ensure_topic(&self, topic: &str) -> Result<i32> {
        if let Some(n) = self.inner.topics.lock().await.get(topic) {
            return Ok(*n);
        }
        let result = self.create_if_missing(topic).await;
        self.observe(result)
    }

    async fn create_if_missing(&self, topic: &str) -> Result<i32> {
        let client = self.client().await?;
        let count = |topics: Vec<rskafka::topic::Topic>| {
            topics.into_iter().find(|t| t.name == topic).map(|t| t.partitions.len() as i32).filter(|n| *n > 0)
        };
        let mut partitions = count(bounded(self.timeout(), "list topics", client.list_topics()).await?);
        if partitions.is_none() {
            let settings = &self.inner.settings;
            let controller = client.controller_client().map_err(kafka_error("controller"))?;
            let created = bounded(
                self.timeout(),
                "create topic",
                controller.create_topic(
                    topic,
                    settings.partitions,
                    settings.replication_factor,
                    settings.request_timeout_ms as i32,
                ),
            )
            .await;
            match created {
                Ok(()) => tracing::info!(topic, partitions = settings.partitions, "topic created"),
                Err(Error::Kafka { code: Some(ProtocolError::TopicAlreadyExists), .. }) => {}
                Err(e) => return Err(e),
            }
            // Kafka answers CreateTopics before every broker's metadata has
            // the topic: ask again until it shows, within the request timeout.
            let deadline = tokio::time::Instant::now() + self.timeout();
            loop {
                partitions = count(bounded(self.timeout(), "list topics", client.list_topics()).await?);
                if partitions.is_some() || tokio::time::Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let n = partitions.ok_or_else(|| Error::kafka(format!("topic {topic:?} has no partitions after creation")))?;
        self.inner.topics.lock().await.insert(topic.to_owned(), n);
        Ok(n)
    }

    /// Every topic on the brokers with its partition count.
    pub async fn topics(&self) -> Result<Vec<(String, i32)>> {
        let result = async {
            let client = self.client().await?;
            let topics = bounded(self.timeout(), "list topics", client.list_topics()).await?;
            Ok(topics.into_iter().map(|t| (t.name, t.partitions.len() as i32)).collect())
        }
        .await;
        if result.is_err() {
            self.reset().await;
        }
        self.observe(result)
    }

    /// A partition's earliest offset and its high watermark.
    pub async fn offsets(&self, topic: &str, partition: i32) -> Result<(i64, i64)> {
        let result = async {
            let pc = self.partition(topic, partition).await?;
            let earliest = bounded(self.timeout(), "list offsets", pc.get_offset(OffsetAt::Earliest)).await?;
            let latest = bounded(self.timeout(), "list offsets", pc.get_offset(OffsetAt::Latest)).await?;
            Ok((earliest, latest))
        }
        .await;
        self.observe(result)
    }

    /// Appends `records` to one partition, in order; returns their offsets.
    pub async fn produce(&self, topic: &str, partition: i32, records: Vec<Record>) -> Result<Vec<i64>> {
        let pc = self.observe(self.partition(topic, partition).await)?;
        let result = bounded(self.timeout(), "produce", pc.produce(records, Compression::NoCompression)).await;
        if result.is_err() {
            self.reset().await;
        }
        self.observe(result)
    }

    /// Reads records from `offset` on. An offset below the log start moves
    /// to the earliest record the broker still has; one past the log end
    /// (the topic was deleted and made again, or its log truncated) moves to
    /// the start too: consumers skip by event id what they already applied,
    /// where staying would silently skip every record up to the old offset.
    pub async fn fetch(&self, topic: &str, partition: i32, offset: i64) -> Result<Fetched> {
        let result = self.fetch_from(topic, partition, offset).await;
        self.observe(result)
    }

    async fn fetch_from(&self, topic: &str, partition: i32, offset: i64) -> Result<Fetched> {
        let settings = &self.inner.settings;
        let pc = self.partition(topic, partition).await?;
        let wait = Duration::from_millis(settings.fetch_max_wait_ms as u64);
        let fetch = pc.fetch_records(offset, 1..settings.fetch_max_bytes, settings.fetch_max_wait_ms);
        match tokio::time::timeout(self.timeout() + wait, fetch).await {
            Ok(Ok((records, high_watermark))) => Ok(Fetched { records, high_watermark, start: offset }),
            Ok(Err(KafkaError::ServerError { protocol_error: ProtocolError::OffsetOutOfRange, .. })) => {
                let earliest = bounded(self.timeout(), "list offsets", pc.get_offset(OffsetAt::Earliest)).await?;
                let latest = bounded(self.timeout(), "list offsets", pc.get_offset(OffsetAt::Latest)).await?;
                if (earliest..=latest).contains(&offset) {
                    // The log moved while we asked: nothing to read there yet.
                    return Ok(Fetched { records: Vec::new(), high_watermark: latest, start: offset });
                }
                if offset < earliest {
                    tracing::warn!(topic, partition, offset, earliest, "offset below the log start; skipping ahead");
                } else {
                    tracing::warn!(
                        topic,
                        partition,
                        offset,
                        latest,
                        "offset past the log end (topic made again or truncated?); reading from its start"
                    );
                }
                let mut fetched = Box::pin(self.fetch_from(topic, partition, earliest)).await?;
                fetched.start = earliest;
                Ok(fetched)
            }
            Ok(Err(e)) => {
                self.reset().await;
                Err(kafka_error("fetch")(e))
            }
            Err(_) => {
                self.reset().await;
                Err(Error::kafka("fetch: timed out"))
            }
        }
    }
}

/// Why brokers that answer would not let this client in: settings to fix,
/// not an outage to wait out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// SASL: a wrong user or password, or a mechanism the broker lacks.
    Login,
    /// The broker's certificate does not chain to `events.tls_ca_file`, or
    /// does not name the broker.
    Certificate,
    /// Another TLS failure: a broker that wants a client certificate, no
    /// common protocol version, a plaintext listener.
    Handshake,
}

impl Refusal {
    /// rskafka reports these inside its connection errors' text (the typed
    /// errors are private to it).
    fn of(error: &Error) -> Option<Self> {
        let Error::Kafka { message, code: None } = error else { return None };
        if message.contains("Sasl") || message.contains("SASL") {
            Some(Self::Login)
        } else if message.contains("invalid peer certificate") {
            Some(Self::Certificate)
        } else if message.contains("received fatal alert") || message.contains("InvalidContentType") {
            Some(Self::Handshake)
        } else {
            None
        }
    }
}

async fn bounded<T>(
    timeout: Duration,
    what: &'static str,
    fut: impl Future<Output = std::result::Result<T, KafkaError>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(result) => result.map_err(kafka_error(what)),
        Err(_) => Err(Error::kafka(format!("{what}: timed out after {} ms", timeout.as_millis()))),
    }
}

fn kafka_error(what: &'static str) -> impl Fn(KafkaError) -> Error {
    move |e| {
        let code = match &e {
            KafkaError::ServerError { protocol_error, .. } => Some(*protocol_error),
            _ => None,
        };
        Error::Kafka { message: format!("{what}: {e}"), code }
    }
}

/// Kafka's default partitioner for keyed records: murmur2 of the key, so a
/// key lands on the same partition whichever client (Java, Go, Rust) sent it.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) as i32) % partitions.max(1)
}

/// The 32-bit murmur2 hash as Kafka's `Utils.murmur2` computes it.
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// TLS to the brokers when `events.tls_ca_file` is set: their certificates
/// checked against that CA (names included), and a client certificate when
/// one is configured.
pub fn broker_tls(settings: &EventSettings) -> Result<Option<Arc<rustls::ClientConfig>>> {
    use meshkit_tls::{pem_chain, pem_key, pem_roots, read_file};
    if settings.tls_ca_file.is_empty() {
        return Ok(None);
    }
    let (ca, cert, key) = (&settings.tls_ca_file, &settings.tls_cert_file, &settings.tls_key_file);
    let roots = pem_roots("events.tls_ca_file", ca, &read_file("events.tls_ca_file", ca)?)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("events.tls: {e}")))?
        .with_root_certificates(roots);
    let config = if cert.is_empty() {
        builder.with_no_client_auth()
    } else {
        let chain = pem_chain("events.tls_cert_file", cert, &read_file("events.tls_cert_file", cert)?)?;
        let key = pem_key("events.tls_key_file", key, &read_file("events.tls_key_file", key)?)?;
        builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| Error::Config(format!("events.tls_key_file: does not match events.tls_cert_file: {e}")))?
    };
    Ok(Some(Arc::new(config)))
}

/// SASL credentials when `events.sasl_mechanism` is set.
pub fn sasl(settings: &EventSettings) -> Option<rskafka::client::SaslConfig> {
    use rskafka::client::{Credentials, SaslConfig};
    let credentials = || Credentials::new(settings.sasl_username.clone(), settings.sasl_password.clone());
    match settings.sasl_mechanism.as_str() {
        "PLAIN" => Some(SaslConfig::Plain(credentials())),
        "SCRAM-SHA-256" => Some(SaslConfig::ScramSha256(credentials())),
        "SCRAM-SHA-512" => Some(SaslConfig::ScramSha512(credentials())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_kafka() {
        // Kafka's UtilsTest.testMurmur2.
        let cases: &[(&str, i32)] = &[
            ("21", -973932308),
            ("foobar", -790332482),
            ("a-little-bit-long-string", -985981536),
            ("a-little-bit-longer-string", -1486304829),
            ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
            ("abc", 479470107),
        ];
        for (input, expected) in cases {
            assert_eq!(murmur2(input.as_bytes()) as i32, *expected, "murmur2({input:?})");
        }
    }

    #[test]
    fn partitions_stay_in_range_and_are_stable() {
        for n in 1..20 {
            for key in ["a", "order-1", "", "0192f3a0-7c1e-7d3b-9e0f-123456789abc"] {
                let p = partition_for(key.as_bytes(), n);
                assert!((0..n).contains(&p));
                assert_eq!(p, partition_for(key.as_bytes(), n));
            }
        }
    }

    #[test]
    fn refusals_are_told_from_outages_by_rskafka_s_words() {
        let kafka = |message: &str| Error::Kafka { message: message.into(), code: None };
        for (message, expected) in [
            (
                "connect: Connection error: Sasl handshake failed: API error: SaslAuthenticationFailed",
                Some(Refusal::Login),
            ),
            (
                "connect: Connection error: all retries failed: Retry exceeded deadline. Source: error connecting to \
                 broker \"127.0.0.1:1\": IO Error: invalid peer certificate: UnknownIssuer",
                Some(Refusal::Certificate),
            ),
            (
                "connect: error connecting to broker: IO Error: received fatal alert: CertificateRequired",
                Some(Refusal::Handshake),
            ),
            ("connect: error connecting to broker \"127.0.0.1:1\": IO Error: Connection refused (os error 111)", None),
            ("connect: timed out after 5000 ms", None),
        ] {
            assert_eq!(Refusal::of(&kafka(message)), expected, "{message}");
        }
        let answered = Error::Kafka { message: "produce: SASL".into(), code: Some(ProtocolError::NotLeaderOrFollower) };
        assert_eq!(Refusal::of(&answered), None, "an error the broker sent back is not a refusal to connect");
    }

    #[test]
    fn broker_security_settings_map_onto_rskafka_and_name_bad_files() {
        let mut settings = EventSettings::default();
        assert!(super::broker_tls(&settings).unwrap().is_none(), "no CA: plaintext");
        assert!(super::sasl(&settings).is_none());
        settings.sasl_mechanism = "SCRAM-SHA-512".into();
        settings.sasl_username = "order".into();
        settings.sasl_password = "pw".into();
        assert!(
            matches!(super::sasl(&settings), Some(rskafka::client::SaslConfig::ScramSha512(c)) if c.username == "order")
        );
        settings.tls_ca_file = "/nonexistent/ca.pem".into();
        let err = super::broker_tls(&settings).unwrap_err().to_string();
        assert!(err.contains("events.tls_ca_file") && err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
