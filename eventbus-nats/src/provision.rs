//! Creating or checking streams and durable consumers, per the configured strategy.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use async_nats::jetstream::ErrorCode;
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

/// Provisions streams (once per topic per bus) and consumers.
pub(crate) struct Provisioner {
    js: Context,
    config: NatsConfig,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
}

impl Provisioner {
    pub(crate) fn new(js: Context, config: NatsConfig) -> Self {
        Self { js, config, topics: RwLock::new(HashMap::new()) }
    }

    pub(crate) fn partitions(&self) -> u16 {
        self.config.partitions
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

    /// One durable pull consumer of `group` per partition of `topic`, each allowed one unacknowledged
    /// message, so a partition is handled by one member of the group at a time. Returns each consumer with the
    /// ack wait the server holds for it.
    pub(crate) async fn consumers(
        &self,
        topic: &str,
        group: &str,
        ack_wait: Duration,
    ) -> Result<Vec<(PullConsumer, Duration)>> {
        self.topic(topic).await?;
        let stream_name = naming::stream_name(&self.config.stream_prefix, topic);
        let timeout = self.config.request_timeout;
        let stream = within(timeout, &format!("stream {stream_name}"), self.js.get_stream(&stream_name)).await?;
        let wanted = (0..self.config.partitions).map(|partition| {
            let name = naming::durable_name(group, partition);
            let desired = pull::Config {
                durable_name: Some(name.clone()),
                filter_subject: naming::subject(&self.config.subject_prefix, topic, partition),
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                max_ack_pending: 1,
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            };
            let (stream, stream_name) = (&stream, &stream_name);
            async move {
                let what = format!("consumer {name} of stream {stream_name}");
                let mut consumer: PullConsumer = match self.config.provisioning {
                    Provisioning::ValidateOnly => {
                        match tokio::time::timeout(timeout, stream.consumer_info(&name)).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(error)) if error.kind() == ConsumerInfoErrorKind::NotFound => {
                                return Err(missing(what))
                            }
                            Ok(Err(error)) => return Err(failed(&what, error)),
                            Err(_) => return Err(timed_out(&what, timeout)),
                        }
                        within(timeout, &what, stream.get_consumer(&name)).await?
                    }
                    Provisioning::CreateOrUpdate => {
                        within(timeout, &what, stream.create_consumer(desired.clone())).await?
                    }
                    _ => within(timeout, &what, stream.get_or_create_consumer(&name, desired.clone())).await?,
                };
                let actual = within(timeout, &what, consumer.info()).await?.config.clone();
                // An existing consumer with other settings would silently lose the order across members.
                let differences = [
                    (actual.max_ack_pending != 1)
                        .then(|| format!("max_ack_pending is {}, the bus needs 1", actual.max_ack_pending)),
                    (actual.filter_subject != desired.filter_subject).then(|| {
                        format!(
                            "filter_subject is {:?}, the bus needs {:?}",
                            actual.filter_subject, desired.filter_subject
                        )
                    }),
                    (actual.ack_policy != AckPolicy::Explicit).then(|| "ack_policy is not explicit".to_owned()),
                ];
                let differences: Vec<String> = differences.into_iter().flatten().collect();
                if !differences.is_empty() {
                    return Err(Error::Mismatch { what, detail: differences.join("; ") });
                }
                Ok((consumer, actual.ack_wait))
            }
        });
        futures_util::future::try_join_all(wanted).await
    }
}

fn missing(what: String) -> Error {
    Error::Mismatch { what, detail: "it does not exist, and provisioning is validate-only".into() }
}

/// Runs a management request under the request deadline, turning every failure into a bus error.
async fn within<T, E: Into<Box<dyn std::error::Error + Send + Sync>>>(
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

fn failed(what: &str, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
    let error: Box<dyn std::error::Error + Send + Sync> = error.into();
    Error::Broker { message: format!("{what}: {error}"), source: Some(Arc::from(error)) }
}

fn timed_out(what: &str, timeout: Duration) -> Error {
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
