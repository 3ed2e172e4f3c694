//! `KafkaBus`: the `EventBus` over Kafka.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use eventbus_core::dispatch::{DeadLetterSink, Dispatcher, WorkerSettings};
use eventbus_core::inflight::WindowSlot;
use eventbus_core::lifecycle::BusCore;
use eventbus_core::subscription::SubscriptionControl;
use eventbus_core::wire::{self, WireMessage};
use eventbus_core::{
    validate_group, validate_topic, BusConfig, CloseReport, ConnectionState, Envelope, Error, EventBus, Handler,
    Health, Metrics, PublishReceipt, PublishResults, Result, SubscribeOptions, Subscription,
};
use rdkafka::admin::AdminClient;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{Producer, ThreadedProducer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::client::{self, millis, BusContext, Connection};
use crate::consume::{self, GroupContext};
use crate::produce::{delivery_error, ProducerCallbacks, Record};
use crate::provision::Provisioner;
use crate::tracker::Tracker;

/// The Kafka backend. See the [crate documentation](crate).
pub struct KafkaBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: BusConfig,
    core: BusCore,
    connection: Arc<Connection>,
    /// The producer and admin client; taken by `close()`.
    live: RwLock<Option<Arc<Live>>>,
}

struct Live {
    producer: Arc<ThreadedProducer<ProducerCallbacks>>,
    provisioner: Provisioner,
    ack_timeout: Duration,
}

impl KafkaBus {
    /// Creates the producer and checks that a broker answers, within `connect_timeout`.
    pub async fn connect(config: BusConfig) -> Result<Self> {
        config.validate()?;
        let connection = Arc::new(Connection::default());
        let context = BusContext { connection: connection.clone() };
        let kafka = &config.kafka;
        // The window first: the producer's reports settle publishes through it.
        let core = BusCore::new(&config);
        let callbacks = ProducerCallbacks::new(context.clone(), config.publish.ack_timeout, core.window.ack_settler());
        let producer: ThreadedProducer<ProducerCallbacks> = client::base(&config)?
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", millis(kafka.linger))
            .set("batch.size", kafka.batch_size.to_string())
            .set("message.max.bytes", (kafka.max_message_bytes + 64 * 1024).to_string())
            // librdkafka gives up on a record at the same deadline as the bus's window.
            .set("message.timeout.ms", millis(config.publish.ack_timeout))
            // The bus's window holds publishers back long before librdkafka's own queue is full.
            .set("queue.buffering.max.messages", (config.publish.window * 2).max(100_000).to_string())
            .create_with_context(callbacks)
            .map_err(|e| Error::Config(format!("cannot create the Kafka producer: {e}")))?;
        let producer = Arc::new(producer);
        let admin: AdminClient<BusContext> = client::base(&config)?
            .create_with_context(context)
            .map_err(|e| Error::Config(format!("cannot create the Kafka admin client: {e}")))?;
        let shown = config.url.clone();
        // A metadata request proves a broker answers; it blocks, so it runs off the async runtime.
        let probe = producer.clone();
        let timeout = config.connect_timeout;
        let reached = tokio::task::spawn_blocking(move || probe.client().fetch_metadata(None, timeout).map(drop)).await;
        match reached {
            Ok(Ok(())) => connection.set(ConnectionState::Connected, None),
            Ok(Err(error)) => {
                drop_off_runtime(producer, admin).await;
                return Err(Error::Connect {
                    url: shown,
                    message: format!("no broker answered within {timeout:?}: {error}"),
                });
            }
            Err(error) => return Err(Error::Connect { url: shown, message: error.to_string() }),
        }
        let provisioner = Provisioner::new(admin, kafka.clone(), config.connect_timeout.max(Duration::from_secs(5)));
        let live = Live { producer, provisioner, ack_timeout: config.publish.ack_timeout };
        Ok(Self { inner: Arc::new(Inner { core, config, connection, live: RwLock::new(Some(Arc::new(live))) }) })
    }
}

/// The Kafka consumer group of bus group `group` on `topic`. A bus subscription is per topic, so each
/// (group, topic) is a Kafka group of its own: a member joining one topic never makes the members of another
/// topic rebalance. `@` cannot appear in bus names, so the mapping is one-to-one.
pub fn group_id(group: &str, topic: &str) -> String {
    format!("{group}@{topic}")
}

/// Destroys librdkafka clients on a blocking thread: destruction waits on their threads and the network.
async fn drop_off_runtime<T: Send + 'static, U: Send + 'static>(a: T, b: U) {
    let _ = tokio::task::spawn_blocking(move || drop((a, b))).await;
}

impl Inner {
    fn live(&self) -> Result<Arc<Live>> {
        self.core.ensure_open()?;
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or(Error::Closed)
    }

    /// Everything `publish` checks before anything is sent, without encoding: a publish that then waits for
    /// window room holds only its envelope. The topic's name is checked when it first becomes known.
    fn check(&self, envelope: &Envelope) -> Result<()> {
        envelope.validate()?;
        let size = wire::encoded_size(envelope).bytes;
        let limit = self.config.kafka.max_message_bytes;
        if size > limit {
            return Err(Error::PayloadTooLarge { size, limit, backend: "kafka.max_message_bytes".into() });
        }
        Ok(())
    }

    /// Sends a checked `envelope` to the `known` topic under the window slot it was admitted with; the
    /// producer's delivery report settles it. Never waits: a publish holds nothing of it while it waits for room.
    fn send(&self, live: &Live, slot: WindowSlot, known: &Arc<str>, envelope: Envelope) -> Result<PublishReceipt> {
        let core = &self.core;
        let expected = core.window.expect_ack_ticket(slot, known, envelope.event_id, &envelope.aggregate_id);
        let (receipt, ticket) = core.count_rejection(expected)?;
        let record = Record::with_opaque_to(known, ticket.pack())
            .key(envelope.aggregate_id.as_str())
            .payload(&envelope.payload[..])
            .headers(envelope_headers(&envelope));
        match live.producer.send(record) {
            Ok(()) => Ok(receipt),
            Err((error, refused)) => {
                live.producer.context().refused(refused.delivery_opaque);
                let refusal = match error.rdkafka_error_code() {
                    Some(RDKafkaErrorCode::QueueFull) => {
                        Error::Backpressure { window: self.config.publish.window, waited: Duration::ZERO }
                    }
                    _ => Error::broker("the producer refused the record", error),
                };
                core.count_rejection(Err(refusal))
            }
        }
    }
}

/// The record headers of `envelope`, copied by librdkafka straight from the envelope.
fn envelope_headers(envelope: &Envelope) -> OwnedHeaders {
    // At most the five required and three optional metadata headers, then the user's.
    let mut headers = Some(OwnedHeaders::new_with_capacity(8 + envelope.headers.len()));
    wire::for_each_header(envelope, |name, value| {
        let header = Header { key: name.as_str(), value: Some(value.as_bytes()) };
        headers = headers.take().map(|headers| headers.insert(header));
    });
    headers.expect("every insert gives the headers back")
}

fn headers(wire: &WireMessage) -> OwnedHeaders {
    wire.headers.iter().fold(OwnedHeaders::new_with_capacity(wire.headers.len()), |headers, (key, value)| {
        headers.insert(Header { key, value: Some(value.as_bytes()) })
    })
}

impl Live {
    /// Sends a record and waits for its delivery report (dead letters).
    async fn send_and_wait(&self, topic: &str, wire: WireMessage) -> Result<()> {
        let topic = self.provisioner.topic(topic).await?;
        let key = wire.header(wire::AGGREGATE_ID).map(str::to_owned);
        let callbacks = self.producer.context();
        let (number, delivered) = callbacks.expect_dead_letter();
        let mut record = Record::with_opaque_to(&topic, number).payload(&wire.payload).headers(headers(&wire));
        if let Some(key) = &key {
            record = record.key(key.as_str());
        }
        if let Err((error, refused)) = self.producer.send(record) {
            callbacks.refused(refused.delivery_opaque);
            return Err(Error::broker("the producer refused the record", error));
        }
        match tokio::time::timeout(self.ack_timeout, delivered).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(error))) => Err(delivery_error(&error, self.ack_timeout)),
            Ok(Err(_)) => Err(Error::ClosedBeforeAck),
            Err(_) => Err(Error::AckTimeout(self.ack_timeout)),
        }
    }
}

/// Dead-letters through the bus's producer.
struct KafkaDeadLetters(Arc<Live>);

#[async_trait]
impl DeadLetterSink for KafkaDeadLetters {
    async fn dead_letter(&self, topic: &str, message: WireMessage) -> Result<()> {
        self.0.send_and_wait(topic, message).await
    }
}

#[async_trait]
impl EventBus for KafkaBus {
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<PublishReceipt> {
        let inner = &self.inner;
        let core = &inner.core;
        let live = core.count_rejection(inner.live())?;
        core.count_rejection(inner.check(&envelope))?;
        // Known (or created) before the publish waits for room: a topic being created holds no window slot.
        let known = core.count_rejection(live.provisioner.topic(topic).await)?;
        let slot = core.admit().await?;
        inner.send(&live, slot, &known, envelope)
    }

    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
        handler: Arc<dyn Handler>,
    ) -> Result<Subscription> {
        let inner = &self.inner;
        validate_topic(topic)?;
        validate_group(&options.group)?;
        let live = inner.live()?;
        let config = &inner.config;
        let settings = WorkerSettings::resolve(config, &options, topic);
        let handler_timeout = settings.handler_timeout;
        // The topic exists before the member joins: subscribing to a topic nobody published to yet works.
        let known = live.provisioner.topic(topic).await?;
        let tracker = Arc::new(Tracker::default());
        let (joined, mut has_joined) = watch::channel(false);
        // Running handlers of a revoked partition, and of a closing subscription, get this long to finish.
        let drain = handler_timeout.min(config.close_timeout);
        let context = GroupContext {
            bus: BusContext { connection: inner.connection.clone() },
            topic: known.to_string(),
            tracker: tracker.clone(),
            joined,
            drain,
        };
        let consumer: StreamConsumer<GroupContext> = client::base(config)?
            .set("group.id", group_id(&options.group, &known))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", millis(config.kafka.session_timeout))
            .set("fetch.wait.max.ms", millis(config.kafka.fetch_wait))
            .set("enable.partition.eof", "false")
            .create_with_context(context)
            .map_err(|e| Error::Config(format!("cannot create the Kafka consumer: {e}")))?;
        consumer.subscribe(&[&known]).map_err(|e| Error::broker(format!("cannot subscribe to {known}"), e))?;
        let consumer = consume::OffRuntime::new(Arc::new(consumer));

        let capacity = options.max_in_flight.unwrap_or(config.subscribe.max_in_flight);
        let dispatcher =
            Dispatcher::new(topic, capacity, inner.core.counters.clone(), Arc::new(KafkaDeadLetters(live.clone())));
        let stop = CancellationToken::new();
        let abandoned = Arc::new(AtomicUsize::new(0));
        let control = SubscriptionControl::new(
            topic,
            options.group.as_str(),
            config.close_timeout,
            stop.clone(),
            abandoned.clone(),
        );
        control.with_tasks(|tasks| {
            dispatcher.spawn_workers(tasks, handler, settings, stop.clone(), abandoned);
            tasks.spawn(consume::fetch(consumer, dispatcher.clone(), tracker, drain, stop));
        });
        let subscription = inner.core.subscriptions.register(control)?;
        // Live once the member has joined the group and received its partitions.
        let join_deadline = config.kafka.session_timeout * 3 + config.connect_timeout;
        if !matches!(tokio::time::timeout(join_deadline, has_joined.wait_for(|joined| *joined)).await, Ok(Ok(_))) {
            subscription.close().await;
            return Err(Error::Broker {
                message: format!(
                    "group {} did not assign partitions of {topic} within {join_deadline:?}",
                    options.group
                ),
                source: None,
            });
        }
        Ok(subscription)
    }

    fn publish_results(&self) -> Option<PublishResults> {
        self.inner.core.publish_results()
    }

    fn health(&self) -> Health {
        self.inner.connection.health()
    }

    fn metrics(&self) -> Metrics {
        self.inner.core.metrics()
    }

    async fn close(&self) -> CloseReport {
        let inner = &self.inner;
        inner
            .core
            .close(|deadline| async move {
                let live = inner.live.write().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(live) = live {
                    // Flushing and destroying block on librdkafka; they run on a blocking thread, bounded by
                    // the deadline (a broker that is gone cannot hold close past it).
                    // Destroying the producer after the flush takes a moment too.
                    let left = deadline
                        .saturating_duration_since(tokio::time::Instant::now())
                        .saturating_sub(Duration::from_millis(200));
                    let teardown = tokio::task::spawn_blocking(move || {
                        let _ = live.producer.flush(left);
                        drop(live);
                    });
                    let _ = tokio::time::timeout_at(deadline, teardown).await;
                }
                inner.connection.closed();
            })
            .await
    }
}

impl Drop for KafkaBus {
    fn drop(&mut self) {
        // Dropped without close(): stop every subscription now; the clients go with their last handle.
        self.inner.core.abort();
        let live = self.inner.live.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(consume::OffRuntime::new(live));
    }
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus").field("url", &self.inner.config.url).field("state", &self.health().state).finish()
    }
}
