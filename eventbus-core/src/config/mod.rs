//! Configuration of a bus: which backend, and the limits and deadlines every backend honours.
//!
//! Every part has defaults fit for production, deserializes with serde (durations as human strings such as
//! `"5s"` or `"250ms"`) and describes itself as JSON Schema through schemars; `docs/config.schema.json` is the
//! generated schema.
//!
//! ```
//! use eventbus_core::BusConfig;
//!
//! let config: BusConfig = serde_json::from_str(r#"{
//!     "url": "memory://",
//!     "publish": { "window": 256, "ack_timeout": "2s" },
//!     "subscribe": { "concurrency": 8 },
//!     "retry": { "max_attempts": 3, "initial_backoff": "50ms" }
//! }"#)?;
//! assert_eq!(config.publish.window, 256);
//! assert_eq!(config.publish.ack_timeout, std::time::Duration::from_secs(2));
//! # Ok::<(), serde_json::Error>(())
//! ```

mod kafka;
mod nats;
mod secret;

use std::time::Duration;

pub use kafka::{KafkaConfig, KafkaProperties, KafkaSasl, KafkaTls, KafkaTopicConfig, SecurityProtocol};
pub use nats::{
    NatsAuth, NatsConfig, NatsStreamConfig, NatsTls, Provisioning, ReconnectConfig, RetentionKind, StorageKind,
};
pub use secret::Secret;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::envelope::validate_topic;
use crate::{Error, Result};

/// Largest accepted `publish.window`.
pub const MAX_WINDOW: usize = 1 << 20;

/// Everything a bus needs to start. Start from [`BusConfig::default`] (the in-memory backend) or
/// [`BusConfig::from_url`], then adjust fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BusConfig {
    /// Which backend to use and where it is: `memory://` (in-process), `nats://host:4222` or
    /// `kafka://host:9092`. The scheme selects the backend.
    pub url: String,
    /// Publishing: in-flight window and deadlines.
    pub publish: PublishConfig,
    /// Consuming: parallelism, queue bounds and the handler deadline.
    pub subscribe: SubscribeConfig,
    /// How failed handler calls are retried before dead-lettering.
    pub retry: RetryPolicy,
    /// Where messages go that cannot be handled.
    pub dead_letter: DeadLetterConfig,
    /// How long connecting to the broker may take before it fails with a connect error. The in-memory
    /// backend connects at once.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub connect_timeout: Duration,
    /// Upper bound on `close()`: flushing acks, finishing handlers and joining tasks all fit in it.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub close_timeout: Duration,
    /// Settings of the in-memory backend (used when `url` is `memory://`).
    pub memory: MemoryConfig,
    /// Settings of the NATS JetStream backend (used when `url` is `nats://...`).
    pub nats: NatsConfig,
    /// Settings of the Kafka backend (used when `url` is `kafka://...`).
    pub kafka: KafkaConfig,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            url: "memory://".to_owned(),
            publish: PublishConfig::default(),
            subscribe: SubscribeConfig::default(),
            retry: RetryPolicy::default(),
            dead_letter: DeadLetterConfig::default(),
            connect_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(10),
            memory: MemoryConfig::default(),
            nats: NatsConfig::default(),
            kafka: KafkaConfig::default(),
        }
    }
}

impl BusConfig {
    /// The default configuration pointed at `url`.
    pub fn from_url(url: impl Into<String>) -> Self {
        Self { url: url.into(), ..Self::default() }
    }

    /// The scheme of [`BusConfig::url`] (`memory`, `nats`, `kafka`, ...).
    pub fn scheme(&self) -> &str {
        self.url.split_once("://").map_or(self.url.as_str(), |(scheme, _)| scheme)
    }

    /// Checks every limit and name; backends call this before they connect.
    pub fn validate(&self) -> Result<()> {
        let positive = |name: &str, value: Duration| {
            if value.is_zero() {
                Err(Error::Config(format!("{name} must be greater than zero")))
            } else {
                Ok(())
            }
        };
        if !self.url.contains("://") {
            return Err(Error::Config(format!(
                "url {:?} has no scheme; use memory://, nats://host:port or kafka://host:port",
                self.url
            )));
        }
        if !(1..=MAX_WINDOW).contains(&self.publish.window) {
            return Err(Error::Config(format!("publish.window must be between 1 and {MAX_WINDOW}")));
        }
        positive("publish.enqueue_timeout", self.publish.enqueue_timeout)?;
        positive("publish.ack_timeout", self.publish.ack_timeout)?;
        self.subscribe.validate("subscribe")?;
        self.retry.validate("retry")?;
        positive("connect_timeout", self.connect_timeout)?;
        positive("close_timeout", self.close_timeout)?;
        if self.memory.max_backlog == 0 {
            return Err(Error::Config("memory.max_backlog must be at least 1".into()));
        }
        if self.nats.partitions == 0 {
            return Err(Error::Config("nats.partitions must be at least 1".into()));
        }
        let stream = &self.nats.stream;
        if stream.duplicate_window.is_zero() || (!stream.max_age.is_zero() && stream.duplicate_window > stream.max_age)
        {
            return Err(Error::Config(
                "nats.stream.duplicate_window must be greater than zero and not above nats.stream.max_age".into(),
            ));
        }
        if self.nats.max_ack_pending == 0 {
            return Err(Error::Config("nats.max_ack_pending must be at least 1".into()));
        }
        if self.nats.ack_wait < Duration::from_secs(1) {
            return Err(Error::Config("nats.ack_wait must be at least 1s".into()));
        }
        if self.kafka.topic.partitions < 1 || self.kafka.topic.replication_factor < 1 {
            return Err(Error::Config(
                "kafka.topic.partitions and kafka.topic.replication_factor must be at least 1".into(),
            ));
        }
        if self.dead_letter.enabled {
            validate_topic(&self.dead_letter.topic_for("topic")).map_err(|e| {
                Error::Config(format!(
                    "dead_letter.topic {:?} does not make a valid topic name: {e}",
                    self.dead_letter.topic
                ))
            })?;
        }
        Ok(())
    }
}

/// Publishing limits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct PublishConfig {
    /// Most publishes awaiting a broker ack at once, for the whole bus. A publish beyond it waits for room.
    pub window: usize,
    /// How long a publish waits for room in the window before failing with a backpressure error.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub enqueue_timeout: Duration,
    /// How long after sending a publish waits for the broker's ack before settling as a timeout.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub ack_timeout: Duration,
    /// Report every settled publish (event id, topic, aggregate id, outcome) on the stream returned by
    /// `EventBus::publish_results`, for the outbox pattern. A consumer of that stream that falls behind
    /// holds publishers back rather than losing reports.
    pub report_results: bool,
}

impl Default for PublishConfig {
    fn default() -> Self {
        Self {
            window: 4096,
            enqueue_timeout: Duration::from_secs(5),
            ack_timeout: Duration::from_secs(10),
            report_results: false,
        }
    }
}

/// Consuming limits, the defaults of every subscription (see `SubscribeOptions` to override per subscription).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SubscribeConfig {
    /// Handler calls that may run at once per subscription (each on a different aggregate). This is also the
    /// number of worker tasks a subscription owns.
    pub concurrency: usize,
    /// Most messages fetched but not yet acked per subscription; fetching pauses beyond it.
    pub max_in_flight: usize,
    /// Longest a single handler call may run before it counts as failed and is retried.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub handler_timeout: Duration,
}

impl Default for SubscribeConfig {
    fn default() -> Self {
        Self { concurrency: 16, max_in_flight: 1024, handler_timeout: Duration::from_secs(30) }
    }
}

impl SubscribeConfig {
    fn validate(&self, at: &str) -> Result<()> {
        if self.concurrency == 0 || self.max_in_flight == 0 {
            return Err(Error::Config(format!("{at}.concurrency and {at}.max_in_flight must be at least 1")));
        }
        if self.handler_timeout.is_zero() {
            return Err(Error::Config(format!("{at}.handler_timeout must be greater than zero")));
        }
        Ok(())
    }
}

/// Retries of a failed handler call: in place (later events of the same aggregate wait), with exponential
/// backoff, up to `max_attempts` calls in all; then the message is dead-lettered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Handler calls per message, the first included. 1 means no retry.
    pub max_attempts: u32,
    /// Wait before the first retry.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub initial_backoff: Duration,
    /// Longest wait between two attempts.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_backoff: Duration,
    /// Factor applied to the wait after each failed attempt (≥ 1).
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(10),
            multiplier: 2.0,
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let factor = self.multiplier.powi(attempt.saturating_sub(1).min(64) as i32);
        self.initial_backoff.mul_f64(factor.min(1e9)).min(self.max_backoff)
    }

    fn validate(&self, at: &str) -> Result<()> {
        if self.max_attempts == 0 {
            return Err(Error::Config(format!("{at}.max_attempts must be at least 1")));
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(Error::Config(format!("{at}.multiplier must be a finite number ≥ 1")));
        }
        if self.max_backoff < self.initial_backoff {
            return Err(Error::Config(format!("{at}.max_backoff must not be below {at}.initial_backoff")));
        }
        Ok(())
    }
}

/// Dead-letter topic naming.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct DeadLetterConfig {
    /// Whether failed and undecodable messages are dead-lettered. When off they are logged and acked.
    pub enabled: bool,
    /// Name of the dead-letter topic; `{topic}` stands for the topic the message came from.
    pub topic: String,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        Self { enabled: true, topic: "{topic}.dlq".to_owned() }
    }
}

impl DeadLetterConfig {
    /// The dead-letter topic for messages consumed from `topic`.
    pub fn topic_for(&self, topic: &str) -> String {
        self.topic.replace("{topic}", topic)
    }
}

/// Settings of the in-memory backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct MemoryConfig {
    /// Events kept per topic for groups that subscribe later, beyond those some group has yet to consume.
    pub history: usize,
    /// Most events a topic holds that some group has yet to read. Beyond it a publish waits for the slowest
    /// group to catch up, at most `publish.enqueue_timeout`, and then fails: the process's memory, which is
    /// this backend's storage, stays bounded however far publishers run ahead of consumers.
    pub max_backlog: usize,
    /// Largest accepted payload, in bytes.
    pub max_payload: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self { history: 10_000, max_backlog: 8192, max_payload: 1024 * 1024 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_human_strings_and_unknown_fields_are_rejected() {
        let c: BusConfig =
            serde_json::from_str(r#"{"close_timeout":"1m 30s","retry":{"max_backoff":"250ms"}}"#).unwrap();
        assert_eq!(c.close_timeout, Duration::from_secs(90));
        assert_eq!(c.retry.max_backoff, Duration::from_millis(250));
        let err = serde_json::from_str::<BusConfig>(r#"{"publish":{"windw":3}}"#).unwrap_err();
        assert!(err.to_string().contains("windw"), "{err}");
    }

    #[test]
    fn defaults_validate_and_bad_limits_are_named() {
        BusConfig::default().validate().unwrap();
        let mut c = BusConfig::default();
        c.publish.window = 0;
        assert!(c.validate().unwrap_err().to_string().contains("publish.window"));
        let mut c = BusConfig::default();
        c.dead_letter.topic = "bad topic".into();
        assert!(c.validate().unwrap_err().to_string().contains("dead_letter.topic"));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            multiplier: 2.0,
        };
        let waits: Vec<_> = (1..=5).map(|a| p.backoff(a).as_millis()).collect();
        assert_eq!(waits, [10, 20, 40, 50, 50]);
    }

    #[test]
    fn scheme_selects_backend() {
        assert_eq!(BusConfig::from_url("nats://localhost:4222").scheme(), "nats");
        assert_eq!(BusConfig::default().scheme(), "memory");
    }
}
