//! `NatsBus`: the `EventBus` over NATS JetStream.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::header::{HeaderName, HeaderValue, NATS_MESSAGE_ID};
use async_nats::jetstream::context::{ContextBuilder, PublishErrorKind};
use async_nats::{Client, HeaderMap};
use async_trait::async_trait;
use eventbus_core::deadline::lazy_timeout;
use eventbus_core::dispatch::{DeadLetterSink, Dispatcher, WorkerSettings};
use eventbus_core::inflight::{AckCallback, WindowSlot};
use eventbus_core::lifecycle::BusCore;
use eventbus_core::subscription::SubscriptionControl;
use eventbus_core::wire::{self, WireMessage};
use eventbus_core::{
    validate_group, validate_topic, BusConfig, CloseReport, ConnectionState, Envelope, Error, EventBus, Handler,
    Health, Metrics, PublishReceipt, PublishResults, Result, SubscribeOptions, Subscription, ValidationError,
};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::acks::{AckInbox, NO_STREAM};
use crate::connect::{self, ConnectionEvents};
use crate::consume::{self, Claim};
use crate::naming::{self, partition_of};
use crate::ownership;
use crate::provision::Provisioner;

/// The NATS JetStream backend. See the [crate documentation](crate) for how topics and groups map onto
/// JetStream.
pub struct NatsBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: BusConfig,
    core: BusCore,
    events: Arc<ConnectionEvents>,
    /// The connection; taken by `close()`.
    live: RwLock<Option<Arc<Live>>>,
}

/// What exists while the bus is connected.
struct Live {
    client: Client,
    acks: AckInbox,
    js: async_nats::jetstream::Context,
    provisioner: Arc<Provisioner>,
    ack_timeout: Duration,
}

impl NatsBus {
    /// Connects to the servers of `config` (`url` and `nats.servers`), within `connect_timeout`.
    pub async fn connect(config: BusConfig) -> Result<Self> {
        config.validate()?;
        if config.scheme() != "nats" {
            return Err(Error::Config(format!("NatsBus needs a nats:// url, got {:?}", connect::redact(&config.url))));
        }
        let events = Arc::new(ConnectionEvents::default());
        let client = connect::connect(&config, events.clone()).await?;
        // Dead letters and the bus's API requests go through this context; events do not (see `Inner::send`), so
        // its in-flight limit only bounds dead letters.
        let js = ContextBuilder::new()
            .timeout(config.publish.ack_timeout.max(config.nats.request_timeout) + Duration::from_secs(1))
            .max_ack_inflight(config.publish.window)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let provisioner = Arc::new(Provisioner::new(js.clone(), config.nats.clone()));
        let core = BusCore::new(&config);
        let acks = AckInbox::open(&client, core.window.ack_settler()).await?;
        let live = Live { client, acks, js, provisioner, ack_timeout: config.publish.ack_timeout };
        Ok(Self { inner: Arc::new(Inner { core, config, events, live: RwLock::new(Some(Arc::new(live))) }) })
    }

    /// The underlying client, for what the bus does not cover. `None` once closed.
    pub fn client(&self) -> Option<Client> {
        self.inner.live().ok().map(|live| live.client.clone())
    }
}

impl Inner {
    fn live(&self) -> Result<Arc<Live>> {
        self.core.ensure_open()?;
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or(Error::Closed)
    }

    /// Everything `publish` checks before anything is sent.
    fn check(&self, live: &Live, topic: &str, envelope: &Envelope) -> Result<()> {
        validate_topic(topic)?;
        envelope.validate()?;
        // Measured without encoding: a publish that then waits for window room holds only its envelope.
        let encoded = wire::encoded_size(envelope);
        let size = encoded.bytes + encoded.headers * 4 + 64;
        let limit = live.client.max_payload();
        if size > limit {
            return Err(Error::PayloadTooLarge { size, limit, backend: "the NATS server's max_payload".into() });
        }
        Ok(())
    }

    /// Sends a checked `envelope` under the window slot it was admitted with. JetStream answers on the bus's
    /// ack inbox, under the publish's ticket, and the inbox's reader settles it there.
    async fn send(&self, live: &Live, slot: WindowSlot, topic: &str, envelope: Envelope) -> Result<PublishReceipt> {
        let core = &self.core;
        let known = core.count_rejection(live.provisioner.topic(topic).await)?;
        let headers = envelope_headers(&envelope);
        let payload = envelope.payload.clone();
        let partition = partition_of(&envelope.aggregate_id, live.provisioner.partitions());
        let subject = known.subjects[usize::from(partition)].clone();
        // Queuing on the client waits only while its send queue is full: bounded like the window itself.
        let enqueue_timeout = self.config.publish.enqueue_timeout;
        let expected = core.window.expect_ack(slot, &known.name, envelope.event_id, &envelope.aggregate_id);
        let (receipt, callback) = core.count_rejection(expected)?;
        let reply = live.acks.reply_subject(callback.ticket());
        // A publish cancelled while its message waits for room on the client was never sent: withdrawn, not
        // failed.
        let unsent = Unsent(Some(callback));
        let sending = live.client.publish_with_reply_and_headers(subject, reply, headers, payload);
        let refusal = match lazy_timeout(enqueue_timeout, sending).await {
            Ok(Ok(())) => {
                unsent.sent();
                return Ok(receipt);
            }
            Ok(Err(error)) => Error::broker("publish failed", error),
            Err(_) => Error::Backpressure { window: self.config.publish.window, waited: enqueue_timeout },
        };
        drop(unsent);
        core.count_rejection(Err(refusal))
    }
}

/// A registered publish whose message is not on the client yet; dropped so, it is withdrawn.
struct Unsent(Option<AckCallback>);

impl Unsent {
    /// The message is on the client: the ack inbox settles the publish from here.
    fn sent(mut self) {
        if let Some(callback) = self.0.take() {
            callback.detach();
        }
    }
}

impl Drop for Unsent {
    fn drop(&mut self) {
        if let Some(callback) = self.0.take() {
            callback.withdraw();
        }
    }
}

/// The message headers of a checked `envelope`, its id as `Nats-Msg-Id` for the server's de-duplication
/// included, built straight from it: its validation already holds every name and value to the client's rules.
fn envelope_headers(envelope: &Envelope) -> HeaderMap {
    let mut headers = HeaderMap::new();
    wire::for_each_header(envelope, |name, value| match name {
        wire::HeaderName::Metadata(name) => {
            if name == wire::EVENT_ID {
                // The server de-duplicates re-sent events by their id.
                headers.insert(NATS_MESSAGE_ID, value);
            }
            // Static names: no copy, no check.
            headers.insert(HeaderName::from_static(name), value);
        }
        wire::HeaderName::User(name) => headers.insert(name, value),
    });
    headers
}

/// The message headers of a wire message, refusing names or values NATS cannot carry (validation already
/// keeps them out; this never panics whatever the input). The strings become the headers without a copy.
fn headers(wire_headers: Vec<(String, String)>) -> Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    for (name, value) in wire_headers {
        // The client's own rules, checked first so the conversions below neither fail nor panic.
        let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':');
        if !name_ok || value.contains(['\r', '\n']) {
            return Err(ValidationError::InvalidHeaderName { name }.into());
        }
        let header =
            HeaderName::try_from(name).map_err(|e| ValidationError::InvalidHeaderName { name: e.to_string() })?;
        headers.append(header, HeaderValue::from(value));
    }
    Ok(headers)
}

impl Live {
    /// Sends `wire` to `topic` and waits for the stream's ack (dead letters, raw publishes).
    async fn publish_and_wait(&self, topic: &str, wire: WireMessage, message_id: Option<String>) -> Result<()> {
        validate_topic(topic)?;
        let known = self.provisioner.topic(topic).await?;
        let partition = wire
            .header(wire::AGGREGATE_ID)
            .map_or(0, |aggregate| partition_of(aggregate, self.provisioner.partitions()));
        let mut headers = headers(wire.headers)?;
        if let Some(id) = message_id {
            headers.insert(NATS_MESSAGE_ID, id.as_str());
        }
        let subject = known.subjects[usize::from(partition)].clone();
        let ack = self.js.publish_with_headers(subject, headers, wire.payload).await.map_err(publish_error)?;
        match tokio::time::timeout(self.ack_timeout, ack).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(publish_error(error)),
            Err(_) => Err(Error::AckTimeout(self.ack_timeout)),
        }
    }
}

/// The layout where every member pulls from every partition (`nats.max_ack_pending` 1): claims every
/// partition for good.
async fn share_every_partition(
    live: &Live,
    topic: &str,
    group: &str,
    ack_wait: Duration,
    claims: &mpsc::UnboundedSender<(Arc<Claim>, consume::PartitionStream)>,
) -> Result<()> {
    let consumers = live.provisioner.shared_consumers(topic, group, ack_wait).await?;
    // Each consumer's ack wait as the server holds it rules, whatever the configuration says.
    let opened = consumers.into_iter().enumerate().map(|(partition, (consumer, ack_wait))| async move {
        let claim = Claim::shared(partition as u16, consumer, ack_wait);
        consume::open(claim.clone()).await.map(|stream| (claim, stream))
    });
    for claimed in futures_util::future::try_join_all(opened).await? {
        let _ = claims.send(claimed);
    }
    Ok(())
}

fn publish_error(error: async_nats::jetstream::context::PublishError) -> Error {
    match error.kind() {
        PublishErrorKind::TimedOut => Error::Broker { message: format!("publish timed out: {error}"), source: None },
        PublishErrorKind::StreamNotFound => Error::Broker { message: NO_STREAM.into(), source: Some(Arc::new(error)) },
        _ => Error::broker("publish failed", error),
    }
}

/// Dead-letters through the bus's own connection.
struct NatsDeadLetters(Arc<Live>);

#[async_trait]
impl DeadLetterSink for NatsDeadLetters {
    async fn dead_letter(&self, topic: &str, message: WireMessage) -> Result<()> {
        // A message dead-lettered twice (redelivered after a crash) is stored once.
        let message_id = message.header(wire::EVENT_ID).map(|id| format!("{id}.dead-letter"));
        self.0.publish_and_wait(topic, message, message_id).await
    }
}

#[async_trait]
impl EventBus for NatsBus {
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<PublishReceipt> {
        let inner = &self.inner;
        let core = &inner.core;
        let live = core.count_rejection(inner.live())?;
        core.count_rejection(inner.check(&live, topic, &envelope))?;
        let slot = core.admit().await?;
        // Boxed: thousands of publishes may wait for window room above, and each of them is only as large as
        // the state it waits in.
        Box::pin(inner.send(&live, slot, topic, envelope)).await
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
        let ack_wait = config.nats.ack_wait;
        let settings = WorkerSettings::resolve(config, &options, topic);
        if let Some(dead_letter_topic) = &settings.dead_letter_topic {
            // Provisioned now, so a dead-letter stream that cannot exist fails the subscribe, not a message later.
            live.provisioner.topic(dead_letter_topic).await?;
        }
        let capacity = options.max_in_flight.unwrap_or(config.subscribe.max_in_flight);
        let dispatcher =
            Dispatcher::new(topic, capacity, inner.core.counters.clone(), Arc::new(NatsDeadLetters(live.clone())));
        let stop = CancellationToken::new();
        let abandoned = Arc::new(AtomicUsize::new(0));
        let control = SubscriptionControl::new(
            topic,
            options.group.as_str(),
            config.close_timeout,
            stop.clone(),
            abandoned.clone(),
        );
        let (claims, claimed) = mpsc::unbounded_channel();
        let acks_due = Arc::new(tokio::sync::Notify::new());
        if config.nats.max_ack_pending == 1 {
            share_every_partition(&live, topic, &options.group, ack_wait, &claims).await?;
        } else {
            let (leases, ttl) = live.provisioner.leases(ack_wait).await?;
            let scope = naming::lease_scope(&config.nats.stream_prefix, topic, &options.group);
            let target = ownership::Target {
                provisioner: live.provisioner.clone(),
                topic: topic.to_owned(),
                group: options.group.clone(),
                ack_wait,
                claims,
                dispatcher: dispatcher.clone(),
                acks_due: acks_due.clone(),
            };
            let keeper = ownership::Keeper::new(leases, ttl, scope, config.nats.partitions, target);
            let (ready_tx, ready) = oneshot::channel();
            control.with_tasks(|tasks| {
                tasks.spawn(keeper.run(ready_tx, stop.clone()));
            });
            // A member that joins a busy group waits for the others to hand over its share, within a bound.
            match tokio::time::timeout(ttl * 2, ready).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => {
                    control.abort();
                    return Err(error);
                }
                Ok(Err(_)) => {
                    control.abort();
                    return Err(Error::Closed);
                }
                Err(_) => {
                    tracing::warn!(topic, group = %options.group, "subscribed before holding a fair share of the partitions")
                }
            }
        }
        let topic: Arc<str> = Arc::from(topic);
        control.with_tasks(|tasks| {
            dispatcher.spawn_workers(tasks, handler, settings, stop.clone(), abandoned);
            tasks.spawn(consume::fetch(topic, claimed, dispatcher.clone(), ack_wait / 3, acks_due, stop));
        });
        control.release_on_close(dispatcher);
        inner.core.subscriptions.register(control)
    }

    fn publish_results(&self) -> Option<PublishResults> {
        self.inner.core.publish_results()
    }

    fn health(&self) -> Health {
        self.inner.events.health()
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
                    // The window has settled or given up on every publish by now.
                    live.acks.stop().await;
                    // Acks and terms of the last handled messages are written before the connection goes away.
                    let _ = tokio::time::timeout_at(deadline, live.client.flush()).await;
                    let closed = inner.events.closed.notified();
                    if let Ok(Ok(())) = tokio::time::timeout_at(deadline, live.client.drain()).await {
                        let _ = tokio::time::timeout_at(deadline, closed).await;
                    }
                }
                inner.events.set_state(ConnectionState::Closed, None);
            })
            .await
    }
}

impl Drop for NatsBus {
    fn drop(&mut self) {
        // Dropped without close(): stop every subscription now; the connection closes with its last handle.
        self.inner.core.abort();
        self.inner.live.write().unwrap_or_else(|p| p.into_inner()).take();
    }
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("url", &connect::redact(&self.inner.config.url))
            .field("state", &self.inner.events.health().state)
            .finish()
    }
}
