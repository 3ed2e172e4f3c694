//! Settings of the NATS JetStream backend (used when `url` is `nats://...`).

use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Secret;

/// Settings of the NATS JetStream backend.
///
/// Each topic is one JetStream stream (`<stream_prefix>_<topic>`) over the subjects
/// `<subject_prefix>.<topic>.<partition>`; an event's partition is a hash of its aggregate id. A consumer group
/// is one durable pull consumer per partition. Each partition — and with it every aggregate — is handled by one
/// member of the group at a time, in order, however many members the group has: by default each member owns a
/// fair share of the partitions through leases in a key-value bucket and pulls many messages of them at once;
/// with [`max_ack_pending`](Self::max_ack_pending) `1`, every member pulls from every partition, one message at a
/// time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsConfig {
    /// Servers to connect to besides the one in `url`, for a cluster.
    pub servers: Vec<String>,
    /// Connection name, shown by the server's monitoring.
    pub name: String,
    /// Deadline of a request to the server (stream and consumer management).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub request_timeout: Duration,
    /// Interval of the client's keep-alive pings; a dead connection is noticed within about two intervals.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub ping_interval: Duration,
    /// What to do when the connection is lost.
    pub reconnect: ReconnectConfig,
    /// Credentials.
    pub auth: NatsAuth,
    /// TLS.
    pub tls: NatsTls,
    /// First token of every subject the bus publishes to.
    pub subject_prefix: String,
    /// Prefix of every stream name the bus creates.
    pub stream_prefix: String,
    /// Partitions per topic: how many members of a group can share one topic's events (with
    /// `max_ack_pending` 1, how many messages of a topic a group handles at once). Each partition is a consumer on
    /// the server, so more cost the server more per message. Publishers and consumers of one topic must agree on
    /// it, and changing it moves aggregates to other partitions.
    pub partitions: u16,
    /// How long the server waits for the ack of a delivered message before delivering it again. While a
    /// message is handled or waits for a retry, the bus tells the server it is in progress every third of this,
    /// so only a consumer that died (or lost its connection) lets it run out. Shorter means faster recovery of
    /// a partition after a crash or a broker restart.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub ack_wait: Duration,
    /// Messages of one partition a member may hold unacknowledged (the partition consumers' `max_ack_pending`).
    /// The default, 256 for each of 4 partitions, lets a topic hold about what one consumer with the server's
    /// default (1,000) would.
    ///
    /// Above 1, each partition is owned by one member of the group at a time: members hold leases in the
    /// key-value bucket `<stream_prefix>_LEASES` (entries live `ack_wait`), share the partitions fairly, and a
    /// member that takes over a partition its previous owner left with unacknowledged messages re-creates the
    /// partition's consumer at the first of them, so no event overtakes an earlier one of its aggregate. A
    /// member that dies without closing leaves its partitions to the others after `ack_wait`.
    ///
    /// `1` needs no bucket: every member pulls from every partition and the server hands out one message of a
    /// partition at a time, which caps a partition at one message per ack round trip. Every member of a group
    /// must use the same value.
    pub max_ack_pending: u32,
    /// How streams and consumers are created or checked.
    pub provisioning: Provisioning,
    /// Settings of the streams the bus creates (and checks, under `validate-only`).
    pub stream: NatsStreamConfig,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            servers: Vec::new(),
            name: "eventbus".to_owned(),
            request_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(10),
            reconnect: ReconnectConfig::default(),
            auth: NatsAuth::default(),
            tls: NatsTls::default(),
            subject_prefix: "eventbus".to_owned(),
            stream_prefix: "EVENTBUS".to_owned(),
            partitions: 4,
            ack_wait: Duration::from_secs(10),
            max_ack_pending: 256,
            provisioning: Provisioning::default(),
            stream: NatsStreamConfig::default(),
        }
    }
}

/// Reconnection after a lost connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ReconnectConfig {
    /// Attempts before giving up; unset means never give up.
    pub max_attempts: Option<usize>,
    /// Longest wait between two attempts (the wait grows up to it).
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_delay: Duration,
}

impl Default for ReconnectConfig {
    fn default() -> Self {
        Self { max_attempts: None, max_delay: Duration::from_secs(2) }
    }
}

/// Credentials for the NATS server. Set at most one kind. Secrets are never printed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsAuth {
    /// Token authentication.
    pub token: Option<Secret>,
    /// User for user/password authentication.
    pub user: Option<String>,
    /// Password for user/password authentication.
    pub password: Option<Secret>,
    /// NKey seed (`SU...`).
    pub nkey_seed: Option<Secret>,
    /// Path of a `.creds` file (JWT and seed).
    pub credentials_file: Option<PathBuf>,
}

/// TLS towards the NATS server.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsTls {
    /// Refuse to connect without TLS.
    pub required: bool,
    /// PEM file of the certificate authorities to trust.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// PEM key of the client certificate.
    pub key_file: Option<PathBuf>,
}

/// How the bus treats streams and consumers on the broker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Provisioning {
    /// Create what is missing; leave what exists as it is.
    #[default]
    CreateIfMissing,
    /// Create nothing; fail with a clear error when something is missing or differs from the configuration.
    ValidateOnly,
    /// Create what is missing and update what differs.
    CreateOrUpdate,
}

/// Where a stream keeps its messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum StorageKind {
    /// On disk: survives a server restart.
    #[default]
    File,
    /// In memory: faster, lost on restart.
    Memory,
}

/// When a stream discards messages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum RetentionKind {
    /// Keep messages up to the age and size limits, whoever has read them (new groups get the history).
    #[default]
    Limits,
    /// Keep messages while some consumer has not acknowledged them.
    Interest,
}

/// Settings of a stream the bus creates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsStreamConfig {
    /// File or memory storage.
    pub storage: StorageKind,
    /// Retention policy.
    pub retention: RetentionKind,
    /// Oldest message kept; `0s` keeps messages without an age limit.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub max_age: Duration,
    /// Most bytes kept per stream; unset for no limit.
    pub max_bytes: Option<u64>,
    /// Window in which a re-sent event (same event id) is recognised and not stored again.
    #[serde(with = "humantime_serde")]
    #[schemars(with = "String")]
    pub duplicate_window: Duration,
    /// Replicas of each stream (1 on a single server).
    pub replicas: u8,
}

impl Default for NatsStreamConfig {
    fn default() -> Self {
        Self {
            storage: StorageKind::File,
            retention: RetentionKind::Limits,
            max_age: Duration::ZERO,
            max_bytes: None,
            duplicate_window: Duration::from_secs(120),
            replicas: 1,
        }
    }
}
