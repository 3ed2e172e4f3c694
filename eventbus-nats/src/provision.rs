//! Creating or checking streams and durable consumers, per the configured strategy.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind, KeyValueErrorKind};
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::{kv, Context};
use eventbus_core::config::{NatsConfig, Provisioning, RetentionKind, StorageKind};
use eventbus_core::{Error, Result};

use crate::naming;

/// A topic whose stream is known to exist, with what publishing to it needs.
#[derive(Debug)]
pub(crate) struct Topic {
    pub(crate) name: Arc<str>,
    /// Subject of each partition, indexed by partition.
    pub(crate) subjects: Vec<String>,
}

/// A partition's consumer as its new owner starts on it.
pub(crate) struct TakenOver {
    pub(crate) consumer: PullConsumer,
    /// The ack wait the server holds for it.
    pub(crate) ack_wait: Duration,
    /// The consumer sequence its next delivery carries.
    pub(crate) next_delivery: u64,
}

/// Provisions streams (once per topic per bus) and consumers.
pub(crate) struct Provisioner {
    js: Context,
    config: NatsConfig,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    leases: tokio::sync::OnceCell<(kv::Store, Duration)>,
}

impl Provisioner {
    pub(crate) fn new(js: Context, config: NatsConfig) -> Self {
        Self { js, config, topics: RwLock::new(HashMap::new()), leases: tokio::sync::OnceCell::new() }
    }

    pub(crate) fn partitions(&self) -> u16 {
        self.config.partitions
    }

    pub(crate) fn config(&self) -> &NatsConfig {
        &self.config
    }

    /// The topic, its stream created or checked on first use.
    pub(crate) async fn topic(&self, topic: &str) -> Result<Arc<Topic>> {
        if let Some(known) = self.topics.read().unwrap_or_else(|p| p.into_inner()).get(topic) {
            return Ok(known.clone());
        }
        // Boxed: the stream requests make a large future, and inline it would enlarge every publish future, of
        // which thousands may wait for window room at once.
        Box::pin(self.provision_topic(topic)).await
    }

    async fn provision_topic(&self, topic: &str) -> Result<Arc<Topic>> {
        self.ensure_stream(topic).await?;
        let known = Arc::new(Topic {
            name: Arc::from(topic),
            subjects: (0..self.config.partitions)
                .map(|p| naming::subject(&self.config.subject_prefix, topic, p))
                .collect(),
        });
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        Ok(topics.entry(topic.to_owned()).or_insert(known).clone())
    }

    fn desired_stream(&self, topic: &str) -> stream::Config {
        let settings = &self.config.stream;
        stream::Config {
            name: naming::stream_name(&self.config.stream_prefix, topic),
            subjects: vec![naming::stream_subjects(&self.config.subject_prefix, topic)],
            storage: match settings.storage {
                StorageKind::Memory => StorageType::Memory,
                _ => StorageType::File,
            },
            retention: match settings.retention {
                RetentionKind::Interest => RetentionPolicy::Interest,
                _ => RetentionPolicy::Limits,
            },
            max_age: settings.max_age,
            // The server stores "no limit" as -1, whether it was asked for 0 or nothing.
            max_bytes: settings.max_bytes.filter(|&b| b > 0).map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
            duplicate_window: settings.duplicate_window,
            num_replicas: usize::from(settings.replicas.max(1)),
            ..Default::default()
        }
    }

    async fn ensure_stream(&self, topic: &str) -> Result<()> {
        let desired = self.desired_stream(topic);
        let what = format!("stream {}", desired.name);
        let timeout = self.config.request_timeout;
        match self.config.provisioning {
            Provisioning::ValidateOnly => {
                let mut stream = match tokio::time::timeout(timeout, self.js.get_stream(&desired.name)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(error)) if matches!(error.kind(), GetStreamErrorKind::JetStream(e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
                    {
                        return Err(missing(what));
                    }
                    Ok(Err(error)) => return Err(failed(&what, error)),
                    Err(_) => return Err(timed_out(&what, timeout)),
                };
                let info = within(timeout, &what, stream.info()).await?;
                compare(&info.config, &desired).map_err(|detail| Error::Mismatch { what, detail })
            }
            Provisioning::CreateOrUpdate => {
                within(timeout, &what, self.js.create_or_update_stream(desired)).await.map(drop)
            }
            _ => within(timeout, &what, self.js.get_or_create_stream(desired)).await.map(drop),
        }
    }

    /// The durable consumer of `group` for one partition of `topic`, as the bus creates it.
    fn desired_consumer(&self, topic: &str, group: &str, partition: u16, ack_wait: Duration) -> pull::Config {
        pull::Config {
            durable_name: Some(naming::durable_name(group, partition)),
            filter_subject: naming::subject(&self.config.subject_prefix, topic, partition),
            // An owner acks the settled prefix of its partition with one ack (`floor.rs`); with one message
            // per partition outstanding, an ack of it is an ack of it alone.
            ack_policy: AckPolicy::All,
            ack_wait,
            max_ack_pending: i64::from(self.config.max_ack_pending),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        }
    }

    async fn stream(&self, topic: &str) -> Result<stream::Stream> {
        self.topic(topic).await?;
        let stream_name = naming::stream_name(&self.config.stream_prefix, topic);
        within(self.config.request_timeout, &format!("stream {stream_name}"), self.js.get_stream(&stream_name)).await
    }

    /// Every partition's consumer of `group`, for the layout where every member pulls from every partition
    /// (`max_ack_pending` 1). Returns each consumer with the ack wait the server holds for it.
    pub(crate) async fn shared_consumers(
        &self,
        topic: &str,
        group: &str,
        ack_wait: Duration,
    ) -> Result<Vec<(PullConsumer, Duration)>> {
        let stream = self.stream(topic).await?;
        let wanted = (0..self.config.partitions).map(|partition| {
            let desired = self.desired_consumer(topic, group, partition, ack_wait);
            let stream = &stream;
            async move {
                let (consumer, info) = self.consumer(stream, desired).await?;
                Ok((consumer, info.config.ack_wait))
            }
        });
        futures_util::future::try_join_all(wanted).await
    }

    /// Takes over one partition's consumer for a member that has just leased the partition. When the previous
    /// owner left messages unacknowledged (it died, or released the partition with messages still in its
    /// client's buffer) or pull requests waiting, the consumer is re-created at the first unacknowledged
    /// message: the server would otherwise deliver newer messages before redelivering those, and a pull request
    /// of the previous owner could still take one. Acknowledged messages after that point come again
    /// (at-least-once); none is skipped.
    pub(crate) async fn take_over(
        &self,
        topic: &str,
        group: &str,
        partition: u16,
        ack_wait: Duration,
    ) -> Result<TakenOver> {
        let stream = self.stream(topic).await?;
        let desired = self.desired_consumer(topic, group, partition, ack_wait);
        self.finish_take_over(&stream, &desired).await?;
        let (consumer, info) = self.consumer(&stream, desired.clone()).await?;
        // A delivery floor past the deliveries is an ack of a consumer of the same name before it was
        // re-created: the server would ignore the new owner's acks, so the consumer is re-created.
        let acks_applied = info.ack_floor.consumer_sequence <= info.delivered.consumer_sequence;
        if info.num_ack_pending == 0 && info.num_waiting == 0 && acks_applied {
            let next_delivery = info.delivered.consumer_sequence + 1;
            return Ok(TakenOver { consumer, ack_wait: info.config.ack_wait, next_delivery });
        }
        let timeout = self.config.request_timeout;
        let name = info.name.clone();
        let start = DeliverPolicy::ByStartSequence { start_sequence: info.ack_floor.stream_sequence + 1 };
        tracing::debug!(
            consumer = %name,
            unacknowledged = info.num_ack_pending,
            waiting = info.num_waiting,
            from = info.ack_floor.stream_sequence + 1,
            "re-creating a partition consumer taken over from another member"
        );
        // Under interest retention, deleting the consumer would drop the messages only it still wanted: a
        // stand-in at the same position keeps them until the replacement exists. It expires on its own if this
        // member dies half-way.
        let stand_in = pull::Config {
            durable_name: Some(stand_in_name(&name)),
            deliver_policy: start,
            inactive_threshold: Duration::from_secs(60),
            ..desired.clone()
        };
        let stand_in_name = stand_in_name(&name);
        let what = format!("consumer {name} (taking over partition {partition})");
        within(timeout, &what, stream.create_consumer(stand_in)).await?;
        within(timeout, &what, stream.delete_consumer(&name)).await?;
        let replacement = pull::Config {
            deliver_policy: start,
            ack_wait: info.config.ack_wait,
            max_ack_pending: info.config.max_ack_pending,
            ..desired
        };
        let consumer: PullConsumer = within(timeout, &what, stream.create_consumer(replacement)).await?;
        within(timeout, &what, stream.delete_consumer(&stand_in_name)).await?;
        Ok(TakenOver { consumer, ack_wait: info.config.ack_wait, next_delivery: 1 })
    }

    /// Completes a take-over that stopped half-way (its member died between deleting the consumer and
    /// re-creating it): the consumer is re-created at its stand-in's position, then the stand-in goes.
    async fn finish_take_over(&self, stream: &stream::Stream, desired: &pull::Config) -> Result<()> {
        let timeout = self.config.request_timeout;
        let name = desired.durable_name.clone().unwrap_or_default();
        let stand_in_name = stand_in_name(&name);
        let Ok(Ok(stand_in)) = tokio::time::timeout(timeout, stream.consumer_info(&stand_in_name)).await else {
            return Ok(());
        };
        let what = format!("consumer {name} (finishing an interrupted take-over)");
        let missing = matches!(
            tokio::time::timeout(timeout, stream.consumer_info(&name)).await,
            Ok(Err(error)) if error.kind() == ConsumerInfoErrorKind::NotFound
        );
        if missing {
            let replacement = pull::Config { deliver_policy: stand_in.config.deliver_policy, ..desired.clone() };
            within(timeout, &what, stream.create_consumer(replacement)).await?;
        }
        within(timeout, &what, stream.delete_consumer(&stand_in_name)).await.map(drop)
    }

    /// One partition's consumer, created or checked per the provisioning strategy, with its state.
    async fn consumer(
        &self,
        stream: &stream::Stream,
        desired: pull::Config,
    ) -> Result<(PullConsumer, async_nats::jetstream::consumer::Info)> {
        let timeout = self.config.request_timeout;
        let name = desired.durable_name.clone().unwrap_or_default();
        let what = format!("consumer {name} of stream {}", stream.cached_info().config.name);
        let mut consumer: PullConsumer = match self.config.provisioning {
            Provisioning::ValidateOnly => {
                match tokio::time::timeout(timeout, stream.consumer_info(&name)).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(error)) if error.kind() == ConsumerInfoErrorKind::NotFound => return Err(missing(what)),
                    Ok(Err(error)) => return Err(failed(&what, error)),
                    Err(_) => return Err(timed_out(&what, timeout)),
                }
                within(timeout, &what, stream.get_consumer(&name)).await?
            }
            Provisioning::CreateOrUpdate => {
                // The server cannot change where a consumer starts, and one taken over from another member
                // starts at its first unacknowledged message: the update keeps that. Nor can it change how a
                // consumer acknowledges: explicit acks are kept, and acked one by one.
                let mut update = desired.clone();
                if let Ok(Ok(info)) = tokio::time::timeout(timeout, stream.consumer_info(&name)).await {
                    update.deliver_policy = info.config.deliver_policy;
                    update.ack_policy = info.config.ack_policy;
                }
                within(timeout, &what, stream.create_consumer(update)).await?
            }
            _ => within(timeout, &what, stream.get_or_create_consumer(&name, desired.clone())).await?,
        };
        let info = within(timeout, &what, consumer.info()).await?.clone();
        let actual = &info.config;
        // An existing consumer with other settings would silently lose the order across members. Partition
        // owners keep the order whatever its `max_ack_pending`; members that share every partition need 1.
        let differences = [
            (self.config.max_ack_pending == 1 && actual.max_ack_pending != 1).then(|| {
                format!(
                    "max_ack_pending is {}, and nats.max_ack_pending 1 needs 1 (every member pulls from every \
                     partition)",
                    actual.max_ack_pending
                )
            }),
            (actual.filter_subject != desired.filter_subject).then(|| {
                format!("filter_subject is {:?}, the bus needs {:?}", actual.filter_subject, desired.filter_subject)
            }),
            (actual.ack_policy == AckPolicy::None)
                .then(|| "ack_policy is none (the server would forget each message once delivered)".to_owned()),
        ];
        let differences: Vec<String> = differences.into_iter().flatten().collect();
        if !differences.is_empty() {
            return Err(Error::Mismatch { what, detail: differences.join("; ") });
        }
        Ok((consumer, info))
    }

    /// The bucket of partition leases and the lifetime of its entries. Created on first use (entries live
    /// `ack_wait`), except under `validate-only`; a bucket that exists keeps its own lifetime.
    pub(crate) async fn leases(&self, ack_wait: Duration) -> Result<(kv::Store, Duration)> {
        let leases = self
            .leases
            .get_or_try_init(|| async {
                let bucket = naming::lease_bucket(&self.config.stream_prefix);
                let what = format!("lease bucket {bucket}");
                let timeout = self.config.request_timeout;
                let store = match tokio::time::timeout(timeout, self.js.get_key_value(bucket.as_str())).await {
                    Ok(Ok(store)) => store,
                    Ok(Err(error)) if self.config.provisioning == Provisioning::ValidateOnly => {
                        return Err(match error.kind() {
                            KeyValueErrorKind::GetBucket => missing(what),
                            _ => failed(&what, error),
                        });
                    }
                    Ok(Err(_)) => {
                        // The stream a key-value bucket is made of, created directly: the client's own bucket
                        // creation first asks for account details that servers before 2.10 describe otherwise.
                        let config = stream::Config {
                            name: format!("KV_{bucket}"),
                            description: Some("partition leases of eventbus consumer groups".into()),
                            subjects: vec![format!("$KV.{bucket}.>")],
                            max_messages_per_subject: 1,
                            max_age: ack_wait,
                            storage: StorageType::File,
                            num_replicas: usize::from(self.config.stream.replicas.max(1)),
                            allow_rollup: true,
                            deny_delete: true,
                            allow_direct: true,
                            discard: stream::DiscardPolicy::New,
                            ..Default::default()
                        };
                        // Another member may create it first, perhaps with another lifetime: that one stays.
                        if let Err(error) = within(timeout, &what, self.js.get_or_create_stream(config)).await {
                            tracing::debug!(%error, "creating the lease bucket failed; reading it");
                        }
                        within(timeout, &what, self.js.get_key_value(bucket.as_str())).await?
                    }
                    Err(_) => return Err(timed_out(&what, timeout)),
                };
                let lifetime = within(timeout, &what, store.status()).await?.max_age();
                if lifetime.is_zero() {
                    // A lease that never expires would keep a dead member's partitions from everyone.
                    let detail = "its entries never expire (max_age 0); partition leases need a lifetime".into();
                    return Err(Error::Mismatch { what, detail });
                }
                Ok::<_, Error>((store, lifetime))
            })
            .await?;
        Ok(leases.clone())
    }
}

/// The consumer that holds a partition's position while its consumer is re-created.
fn stand_in_name(consumer: &str) -> String {
    format!("{consumer}_handover")
}

fn missing(what: String) -> Error {
    Error::Mismatch { what, detail: "it does not exist, and provisioning is validate-only".into() }
}

/// Runs a management request under the request deadline, turning every failure into a bus error.
pub(crate) async fn within<T, E: Into<Box<dyn std::error::Error + Send + Sync>>>(
    timeout: Duration,
    what: &str,
    request: impl std::future::IntoFuture<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, request.into_future()).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(failed(what, error)),
        Err(_) => Err(timed_out(what, timeout)),
    }
}

pub(crate) fn failed(what: &str, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    let error: Box<dyn std::error::Error + Send + Sync> = error.into();
    Error::Broker { message: format!("{what}: {error}"), source: Some(Arc::from(error)) }
}

pub(crate) fn timed_out(what: &str, timeout: Duration) -> Error {
    Error::Broker { message: format!("{what}: no answer within {timeout:?} (nats.request_timeout)"), source: None }
}

/// Which settings of the broker's stream differ from the configuration.
fn compare(actual: &stream::Config, desired: &stream::Config) -> std::result::Result<(), String> {
    let mut differences = Vec::new();
    let mut check = |name: &str, actual: String, desired: String| {
        if actual != desired {
            differences.push(format!("{name} is {actual} on the broker, {desired} in the configuration"));
        }
    };
    let mut subjects = actual.subjects.clone();
    subjects.sort();
    check("subjects", format!("{subjects:?}"), format!("{:?}", desired.subjects));
    check("storage", format!("{:?}", actual.storage), format!("{:?}", desired.storage));
    check("retention", format!("{:?}", actual.retention), format!("{:?}", desired.retention));
    check("max_age", format!("{:?}", actual.max_age), format!("{:?}", desired.max_age));
    check("max_bytes", actual.max_bytes.max(-1).to_string(), desired.max_bytes.to_string());
    check("duplicate_window", format!("{:?}", actual.duplicate_window), format!("{:?}", desired.duplicate_window));
    check("replicas", actual.num_replicas.max(1).to_string(), desired.num_replicas.to_string());
    if differences.is_empty() {
        Ok(())
    } else {
        Err(differences.join("; "))
    }
}
