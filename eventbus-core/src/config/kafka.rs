//! Settings of the Kafka backend (used when `url` is `kafka://host:port`).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Provisioning, Secret};

/// Settings of the Kafka backend.
///
/// Records are keyed by aggregate id, so one aggregate stays in one partition; a consumer group is a Kafka
/// consumer group whose members share the partitions. Offsets are committed only up to the contiguous prefix
/// of handled records of each partition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct KafkaConfig {
    /// Bootstrap servers besides the one in `url`.
    pub servers: Vec<String>,
    /// Client id, shown in broker logs and metrics.
    pub client_id: String,
    /// `plaintext`, `ssl`, `sasl-plaintext` or `sasl-ssl`.
    pub security_protocol: SecurityProtocol,
    /// SASL credentials (with `sasl-plaintext` or `sasl-ssl`).
    pub sasl: KafkaSasl,
    /// TLS files (with `ssl` or `sasl-ssl`).
    pub tls: KafkaTls,
    /// How long the producer waits to fill a batch (`linger.ms`).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub linger: Duration,
    /// Largest producer batch, in bytes (`batch.size`).
    pub batch_size: usize,
    /// Largest accepted record (payload plus headers), in bytes.
    pub max_message_bytes: usize,
    /// Settings of the topics the bus creates.
    pub topic: KafkaTopicConfig,
    /// How topics are created or checked.
    pub provisioning: Provisioning,
    /// Consumer group session timeout: a member silent this long loses its partitions.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub session_timeout: Duration,
    /// Longest the broker holds a consumer's fetch open waiting for new records (`fetch.wait.max.ms`;
    /// librdkafka's own default is 500 ms). Apache Kafka answers as soon as a record arrives, so there it only
    /// sets how often an idle member asks; tansu 0.6 holds every fetch this long (half of it from 250 ms up),
    /// records or not, which makes it the floor of end-to-end latency there.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub fetch_wait: Duration,
    /// Any other librdkafka property, passed through as is (for example `"compression.type": "lz4"`).
    /// Values of keys naming a password, secret or key are never printed.
    pub properties: KafkaProperties,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            client_id: "eventbus".to_owned(),
            security_protocol: SecurityProtocol::default(),
            sasl: KafkaSasl::default(),
            tls: KafkaTls::default(),
            linger: Duration::from_millis(5),
            batch_size: 1_000_000,
            max_message_bytes: 1_000_000,
            topic: KafkaTopicConfig::default(),
            provisioning: Provisioning::default(),
            session_timeout: Duration::from_secs(10),
            fetch_wait: Duration::from_millis(20),
            properties: KafkaProperties::default(),
        }
    }
}

/// How clients talk to the brokers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum SecurityProtocol {
    /// No TLS, no authentication.
    #[default]
    Plaintext,
    /// TLS.
    Ssl,
    /// SASL without TLS.
    SaslPlaintext,
    /// SASL over TLS.
    SaslSsl,
}

impl SecurityProtocol {
    /// The librdkafka name (`security.protocol`).
    pub fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
            Self::SaslPlaintext => "sasl_plaintext",
            Self::SaslSsl => "sasl_ssl",
        }
    }
}

/// SASL credentials.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct KafkaSasl {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: Option<String>,
    /// User name.
    pub username: Option<String>,
    /// Password (never printed).
    pub password: Option<Secret>,
}

/// TLS files.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct KafkaTls {
    /// PEM file of the certificate authorities to trust.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM key of the client certificate.
    pub key_file: Option<PathBuf>,
    /// Password of the key (never printed).
    pub key_password: Option<Secret>,
}

/// Settings of a topic the bus creates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct KafkaTopicConfig {
    /// Partitions: how many members of one group can share the topic.
    pub partitions: i32,
    /// Replication factor.
    pub replication_factor: i16,
    /// How long records are kept (`retention.ms`); unset for the broker's default.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "Option<String>")]
    pub retention: Option<Duration>,
}

impl Default for KafkaTopicConfig {
    fn default() -> Self {
        Self { partitions: 3, replication_factor: 1, retention: None }
    }
}

/// librdkafka properties passed through as they are. `Debug` hides the values of keys that name a password,
/// secret or key.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct KafkaProperties(pub BTreeMap<String, String>);

impl KafkaProperties {
    /// Whether the value of `key` must never be printed.
    pub fn is_sensitive(key: &str) -> bool {
        let key = key.to_ascii_lowercase();
        ["password", "secret", "key", "token", "jaas"].iter().any(|word| key.contains(word))
    }
}

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.iter().map(|(k, v)| (k, if Self::is_sensitive(k) { "***" } else { v.as_str() })))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_not_printed() {
        let mut config = KafkaConfig::default();
        config.sasl.password = Some(Secret::new("sasl-pass-1"));
        config.tls.key_password = Some(Secret::new("key-pass-2"));
        config.properties.0.insert("sasl.oauthbearer.client.secret".into(), "oauth-3".into());
        config.properties.0.insert("compression.type".into(), "lz4".into());
        let printed = format!("{config:?}");
        for secret in ["sasl-pass-1", "key-pass-2", "oauth-3"] {
            assert!(!printed.contains(secret), "{printed}");
        }
        assert!(printed.contains("lz4"));
    }
}
