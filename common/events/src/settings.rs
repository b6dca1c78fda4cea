//! The `events` section: brokers, the outbox relay and the consumers.

use meshkit_config::{Result, Settings, bad};
use serde::{Deserialize, Serialize};

/// Kafka and the event pipeline: the outbox relay and the consumers.
/// `Debug` leaves the SASL password out.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventSettings {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    /// Put before every topic name this process uses (its dead-letter topics
    /// too), so several environments or tenants can share one Kafka cluster:
    /// `staging.` gives `staging.order-events`. Empty: the names as they are.
    pub topic_prefix: String,
    /// Partitions of the topics this process creates when they are missing.
    pub partitions: i32,
    /// Replication factor of the topics this process creates.
    pub replication_factor: i16,
    /// Upper bound on one broker request, retries included; the relay and the
    /// consumers then back off and try again.
    pub request_timeout_ms: u64,
    /// Outbox rows published per round.
    pub relay_batch: u32,
    /// How often the relay looks for rows written by other instances.
    pub relay_poll_ms: u64,
    /// How long published outbox rows are kept before they are pruned.
    pub outbox_retention_secs: u64,
    /// Attempts of a failing handler before the event goes to the dead-letter topic.
    pub max_attempts: u32,
    /// Upper bound on the bytes of one fetch.
    pub fetch_max_bytes: i32,
    /// How long a fetch waits on the broker for new records; the broker
    /// answers as soon as records arrive.
    pub fetch_max_wait_ms: i32,
    /// How long a consumer remembers the id of an event it applied, counted
    /// from the event's time (its record timestamp, which every re-published
    /// copy keeps). Older ids are pruned; a record older than this window,
    /// less a margin for clock skew, is dead-lettered rather than applied,
    /// since nothing can tell any more whether it was. Keep it at least as
    /// long as the topic's retention (the default matches `make up`'s 7 days).
    pub dedup_window_secs: u64,
    /// The dead-letter topic of topic `t` is `t` followed by this.
    pub dead_letter_suffix: String,
    /// TLS to the brokers, checked against this CA bundle (PEM); empty: plaintext.
    pub tls_ca_file: String,
    /// A client certificate and key for brokers that ask for one.
    pub tls_cert_file: String,
    pub tls_key_file: String,
    /// SASL: `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`; empty: none.
    pub sasl_mechanism: String,
    pub sasl_username: String,
    pub sasl_password: String,
}

impl std::fmt::Debug for EventSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSettings")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.topic_prefix)
            .field("partitions", &self.partitions)
            .field("replication_factor", &self.replication_factor)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("relay_batch", &self.relay_batch)
            .field("relay_poll_ms", &self.relay_poll_ms)
            .field("outbox_retention_secs", &self.outbox_retention_secs)
            .field("max_attempts", &self.max_attempts)
            .field("fetch_max_bytes", &self.fetch_max_bytes)
            .field("fetch_max_wait_ms", &self.fetch_max_wait_ms)
            .field("dedup_window_secs", &self.dedup_window_secs)
            .field("dead_letter_suffix", &self.dead_letter_suffix)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &if self.sasl_password.is_empty() { "" } else { "<redacted>" })
            .finish()
    }
}

impl Default for EventSettings {
    fn default() -> Self {
        Self {
            brokers: vec!["127.0.0.1:9092".into()],
            topic_prefix: String::new(),
            partitions: 6,
            replication_factor: 1,
            request_timeout_ms: 5_000,
            relay_batch: 500,
            relay_poll_ms: 100,
            outbox_retention_secs: 3_600,
            max_attempts: 3,
            fetch_max_bytes: 1 << 20,
            fetch_max_wait_ms: 100,
            dedup_window_secs: 7 * 24 * 3600,
            dead_letter_suffix: ".dlq".into(),
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            sasl_mechanism: String::new(),
            sasl_username: String::new(),
            sasl_password: String::new(),
        }
    }
}

impl EventSettings {
    /// The broker's name for topic `name`: `events.topic_prefix` then `name`.
    pub fn topic(&self, name: &str) -> String {
        format!("{}{name}", self.topic_prefix)
    }

    /// The dedup window: how long consumed event ids are kept.
    pub fn dedup_window(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.dedup_window_secs)
    }

    /// How much younger than the window a record must be to be applied: a
    /// tenth of the window, at most an hour, covers clock skew between the
    /// members that prune and the member that checks.
    pub fn dedup_margin(&self) -> std::time::Duration {
        (self.dedup_window() / 10).min(std::time::Duration::from_secs(3600))
    }
}

impl Settings for EventSettings {
    fn validate(&self) -> Result<()> {
        if self.brokers.is_empty() {
            return bad("events.brokers", "at least one broker is required");
        }
        if let Some(b) = self.brokers.iter().find(|b| !b.contains(':') || b.contains(' ') || b.contains("://")) {
            return bad("events.brokers", format!("{b:?} is not host:port"));
        }
        if !(1..=10_000).contains(&self.partitions) {
            return bad("events.partitions", format!("{} is outside 1..=10000", self.partitions));
        }
        if self.replication_factor < 1 {
            return bad("events.replication_factor", "must be at least 1");
        }
        if self.request_timeout_ms < 100 {
            return bad("events.request_timeout_ms", format!("{} is below 100", self.request_timeout_ms));
        }
        if !(1..=10_000).contains(&self.relay_batch) {
            return bad("events.relay_batch", format!("{} is outside 1..=10000", self.relay_batch));
        }
        if self.relay_poll_ms == 0 {
            return bad("events.relay_poll_ms", "must be at least 1");
        }
        if self.max_attempts == 0 {
            return bad("events.max_attempts", "must be at least 1");
        }
        if self.fetch_max_bytes < 1024 {
            return bad("events.fetch_max_bytes", format!("{} is below 1024", self.fetch_max_bytes));
        }
        if !(0..=30_000).contains(&self.fetch_max_wait_ms) {
            return bad("events.fetch_max_wait_ms", format!("{} is outside 0..=30000", self.fetch_max_wait_ms));
        }
        if self.dedup_window_secs < 2 {
            return bad("events.dedup_window_secs", format!("{} is below 2", self.dedup_window_secs));
        }
        if let Some(c) =
            self.topic_prefix.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return bad(
                "events.topic_prefix",
                format!("{c:?} cannot be in a Kafka topic name (letters, digits, . _ -)"),
            );
        }
        if self.dead_letter_suffix.is_empty() {
            return bad("events.dead_letter_suffix", "must not be empty");
        }
        if !matches!(self.sasl_mechanism.as_str(), "" | "PLAIN" | "SCRAM-SHA-256" | "SCRAM-SHA-512") {
            return bad(
                "events.sasl_mechanism",
                format!("{:?} is not PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", self.sasl_mechanism),
            );
        }
        if !self.sasl_mechanism.is_empty() && self.sasl_username.is_empty() {
            return bad("events.sasl_username", "SASL needs a user");
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            return bad("events.tls_cert_file", "events.tls_cert_file and events.tls_key_file go together");
        }
        if !self.tls_cert_file.is_empty() && self.tls_ca_file.is_empty() {
            return bad("events.tls_ca_file", "a client certificate needs the brokers' CA");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn security_settings_are_checked_naming_the_key() {
        for (mechanism, user, cert, expect) in [
            ("GSSAPI", "", "", "events.sasl_mechanism"),
            ("PLAIN", "", "", "events.sasl_username"),
            ("", "", "c.pem", "events.tls_cert_file"),
        ] {
            let settings = EventSettings {
                sasl_mechanism: mechanism.into(),
                sasl_username: user.into(),
                tls_cert_file: cert.into(),
                ..EventSettings::default()
            };
            let err = settings.validate().expect_err(expect);
            assert!(err.to_string().contains(expect), "{err}");
        }
    }

    #[test]
    fn topic_names_take_the_prefix_and_bad_prefixes_are_refused() {
        let settings = EventSettings { topic_prefix: "staging.".into(), ..EventSettings::default() };
        assert_eq!(settings.topic("order-events"), "staging.order-events");
        settings.validate().unwrap();
        let bad = EventSettings { topic_prefix: "a/b".into(), ..EventSettings::default() };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("events.topic_prefix") && err.contains("'/'"), "{err}");
        let short = EventSettings { dedup_window_secs: 1, ..EventSettings::default() };
        assert!(short.validate().unwrap_err().to_string().contains("events.dedup_window_secs"));
        let week = EventSettings::default();
        assert_eq!(week.dedup_margin(), std::time::Duration::from_secs(3600));
        let test = EventSettings { dedup_window_secs: 4, ..EventSettings::default() };
        assert_eq!(test.dedup_margin(), std::time::Duration::from_millis(400));
    }

    #[test]
    fn the_sasl_password_never_shows_in_debug_output() {
        let settings = EventSettings {
            sasl_mechanism: "PLAIN".into(),
            sasl_username: "order".into(),
            sasl_password: "kafka-pass-456".into(),
            ..EventSettings::default()
        };
        let shown = format!("{settings:?} {settings:#?}");
        assert!(!shown.contains("kafka-pass-456"), "{shown}");
        assert!(shown.contains("<redacted>") && shown.contains("\"order\""));
    }
}
