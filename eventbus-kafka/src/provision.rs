//! Creating or checking topics through the admin client, per the configured strategy.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use eventbus_core::config::{KafkaConfig, Provisioning};
use eventbus_core::{validate_topic, Error, Result};
use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewPartitions, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::types::RDKafkaErrorCode;

use crate::client::{millis, BusContext};

/// Provisions each topic once per bus.
pub(crate) struct Provisioner {
    admin: Arc<AdminClient<BusContext>>,
    config: KafkaConfig,
    request_timeout: Duration,
    /// Looked up on every publish: foldhash rather than the default SipHash, which costs more than the lookup.
    topics: RwLock<HashMap<String, Arc<str>, foldhash::fast::RandomState>>,
}

impl Provisioner {
    pub(crate) fn new(admin: AdminClient<BusContext>, config: KafkaConfig, request_timeout: Duration) -> Self {
        Self { admin: Arc::new(admin), config, request_timeout, topics: RwLock::default() }
    }

    /// The topic, its name validated and the topic created or checked on first use.
    pub(crate) async fn topic(&self, topic: &str) -> Result<Arc<str>> {
        if let Some(known) = self.topics.read().unwrap_or_else(|p| p.into_inner()).get(topic) {
            return Ok(known.clone());
        }
        validate_topic(topic)?;
        // Boxed: the admin requests make a large future, and inline it would enlarge every publish future, of
        // which thousands may wait for window room at once.
        Box::pin(self.provision(topic)).await
    }

    async fn provision(&self, topic: &str) -> Result<Arc<str>> {
        match self.config.provisioning {
            Provisioning::ValidateOnly => self.validate(topic).await?,
            Provisioning::CreateOrUpdate => {
                if !self.create(topic).await? {
                    self.update(topic).await?;
                }
            }
            _ => {
                self.create(topic).await?;
            }
        }
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        Ok(topics.entry(topic.to_owned()).or_insert_with(|| Arc::from(topic)).clone())
    }

    fn options(&self) -> AdminOptions {
        AdminOptions::new().operation_timeout(Some(self.request_timeout)).request_timeout(Some(self.request_timeout))
    }

    /// Creates the topic; `false` when it already existed.
    async fn create(&self, topic: &str) -> Result<bool> {
        let settings = &self.config.topic;
        let retention = settings.retention.map(millis);
        let mut new =
            NewTopic::new(topic, settings.partitions, TopicReplication::Fixed(i32::from(settings.replication_factor)));
        if let Some(retention) = &retention {
            new = new.set("retention.ms", retention);
        }
        let results = self.admin.create_topics([&new], &self.options()).await.map_err(|e| admin_error(topic, e))?;
        match results.into_iter().next() {
            Some(Ok(_)) => Ok(true),
            Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) => Ok(false),
            Some(Err((_, code))) => {
                Err(Error::Broker { message: format!("creating topic {topic}: {code}"), source: None })
            }
            None => Err(Error::Broker { message: format!("creating topic {topic}: no answer"), source: None }),
        }
    }

    /// Brings an existing topic in line: more partitions (never fewer), retention.
    async fn update(&self, topic: &str) -> Result<()> {
        let actual = self.partitions(topic).await?;
        let wanted = self.config.topic.partitions;
        if actual.is_some_and(|actual| actual < wanted) {
            let grow = NewPartitions::new(topic, wanted as usize);
            self.admin.create_partitions([&grow], &self.options()).await.map_err(|e| admin_error(topic, e))?;
        }
        if let Some(retention) = self.config.topic.retention.map(millis) {
            let alter = AlterConfig::new(ResourceSpecifier::Topic(topic)).set("retention.ms", &retention);
            self.admin.alter_configs([&alter], &self.options()).await.map_err(|e| admin_error(topic, e))?;
        }
        Ok(())
    }

    /// Checks that the topic exists with the configured partition count.
    async fn validate(&self, topic: &str) -> Result<()> {
        let what = format!("topic {topic}");
        let wanted = self.config.topic.partitions;
        match self.partitions(topic).await? {
            None => {
                Err(Error::Mismatch { what, detail: "it does not exist, and provisioning is validate-only".into() })
            }
            Some(actual) if actual != wanted => Err(Error::Mismatch {
                what,
                detail: format!("it has {actual} partitions on the broker, {wanted} in the configuration"),
            }),
            Some(_) => Ok(()),
        }
    }

    /// The partition count of `topic`, `None` when it does not exist. Metadata requests block, so they run
    /// off the async runtime.
    async fn partitions(&self, topic: &str) -> Result<Option<i32>> {
        let (admin, name, timeout) = (self.admin.clone(), topic.to_owned(), self.request_timeout);
        let metadata = tokio::task::spawn_blocking(move || {
            admin.inner().fetch_metadata(Some(&name), timeout).map(|m| {
                m.topics().first().and_then(|t| {
                    if t.error().is_some() || t.partitions().is_empty() {
                        None
                    } else {
                        Some(t.partitions().len() as i32)
                    }
                })
            })
        })
        .await
        .map_err(|e| Error::Broker { message: format!("metadata of {topic}: {e}"), source: None })?;
        metadata.map_err(|e| admin_error(topic, e))
    }
}

fn admin_error(topic: &str, error: rdkafka::error::KafkaError) -> Error {
    Error::broker(format!("topic {topic}: {error}"), error)
}
