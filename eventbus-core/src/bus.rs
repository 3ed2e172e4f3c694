//! The `EventBus` trait every backend implements, and the types that travel through it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::config::RetryPolicy;
use crate::envelope::{Envelope, EventId};
use crate::subscription::Subscription;
use crate::{Error, Result};

/// An async event bus over one backend.
///
/// All backends meet the same contract (see `docs/guarantees.md`): per-aggregate order with parallelism across
/// aggregates, at-least-once delivery with retries and a dead-letter topic, bounded memory and tasks, deadlines
/// on every wait, and a [`close`](EventBus::close) that leaves nothing running.
///
/// ```
/// use eventbus_core::{BusConfig, Envelope, EventBus, EventBusExt, MemoryBus, SubscribeOptions};
///
/// # #[tokio::main] async fn main() -> eventbus_core::Result<()> {
/// let bus = MemoryBus::new(BusConfig::default())?;
/// let subscription = bus
///     .subscribe_with("orders", SubscribeOptions::group("billing"), |event| async move {
///         println!("{} v{}", event.aggregate_id, event.event_version);
///         Ok(())
///     })
///     .await?;
/// let event = Envelope::builder("order-1", "OrderPlaced").payload("{}").build()?;
/// let ack = bus.publish("orders", event).await?.await?;
/// assert_eq!(ack.topic, "orders");
/// subscription.close().await;
/// bus.close().await;
/// # Ok(()) }
/// ```
#[async_trait]
pub trait EventBus: Send + Sync + 'static {
    /// Validates `envelope`, waits for room in the in-flight window (up to `publish.enqueue_timeout`), sends it
    /// and returns a receipt; awaiting the receipt gives the broker's ack (or a timeout after
    /// `publish.ack_timeout`). An invalid envelope or topic fails here, before anything is sent.
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<PublishReceipt>;

    /// Publishes several envelopes, pipelined, and returns one result per entry in the same order. An invalid
    /// entry fails alone; the others are still sent.
    async fn publish_batch(&self, topic: &str, envelopes: Vec<Envelope>) -> Vec<Result<PublishAck>> {
        let mut receipts = Vec::with_capacity(envelopes.len());
        for envelope in envelopes {
            receipts.push(self.publish(topic, envelope).await);
        }
        let mut results = Vec::with_capacity(receipts.len());
        for receipt in receipts {
            results.push(match receipt {
                Ok(receipt) => receipt.await,
                Err(e) => Err(e),
            });
        }
        results
    }

    /// Starts delivering events of `topic` to `handler`. Returns once the consumer is live: events published
    /// after this call returns are delivered to it. Subscriptions sharing `options.group` share the events;
    /// each group gets every event, including those retained from before it first subscribed.
    async fn subscribe(
        &self,
        topic: &str,
        options: SubscribeOptions,
        handler: Arc<dyn Handler>,
    ) -> Result<Subscription>;

    /// Takes the stream of publish outcomes, when `publish.report_results` is on. Only the first call gets it.
    fn publish_results(&self) -> Option<PublishResults>;

    /// Connection state and the last error seen.
    fn health(&self) -> Health;

    /// Counters since the bus started.
    fn metrics(&self) -> Metrics;

    /// Stops accepting publishes, settles every pending ack, stops every subscription (running handlers finish),
    /// and joins every task the bus spawned, all within `close_timeout`. Idempotent: later calls return the
    /// report of the first.
    async fn close(&self) -> CloseReport;
}

/// Convenience methods for every [`EventBus`], including `dyn EventBus`.
#[async_trait]
pub trait EventBusExt: EventBus {
    /// [`EventBus::subscribe`] with an async closure as the handler.
    async fn subscribe_with<F, Fut>(&self, topic: &str, options: SubscribeOptions, handler: F) -> Result<Subscription>
    where
        F: Fn(Arc<Envelope>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.subscribe(topic, options, Arc::new(handler)).await
    }
}

impl<B: EventBus + ?Sized> EventBusExt for B {}

/// Handles the events of a subscription. Return `Ok` to ack; an error is retried per the retry policy, or
/// dead-lettered at once when [permanent](HandlerError::permanent).
///
/// Any `Fn(Arc<Envelope>) -> impl Future<Output = Result<(), HandlerError>>` is a handler.
///
/// The event arrives shared: the dispatcher keeps one `Envelope` per delivery and hands every attempt that same
/// one, so a handler call never copies it. Fields read through the `Arc` as through the envelope itself; clone
/// the ones a handler keeps beyond its call.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Handles one event. Called for one event of an aggregate at a time, in publish order.
    async fn handle(&self, envelope: Arc<Envelope>) -> Result<(), HandlerError>;
}

#[async_trait]
impl<F, Fut> Handler for F
where
    F: Fn(Arc<Envelope>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, envelope: Arc<Envelope>) -> Result<(), HandlerError> {
        self(envelope).await
    }
}

type BoxStdError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a handler failed, and whether retrying can help.
///
/// Any error converts into a transient `HandlerError` with `?`; use [`HandlerError::permanent`] for failures
/// no retry can fix (the message is dead-lettered at once).
pub struct HandlerError {
    permanent: bool,
    source: BoxStdError,
}

impl HandlerError {
    /// A failure that may pass on a later attempt.
    pub fn transient(error: impl Into<BoxStdError>) -> Self {
        Self { permanent: false, source: error.into() }
    }

    /// A failure no retry can fix: the message is dead-lettered without further attempts.
    pub fn permanent(error: impl Into<BoxStdError>) -> Self {
        Self { permanent: true, source: error.into() }
    }

    /// Whether this failure skips the remaining attempts.
    pub fn is_permanent(&self) -> bool {
        self.permanent
    }
}

impl<E: Into<BoxStdError>> From<E> for HandlerError {
    fn from(error: E) -> Self {
        Self::transient(error)
    }
}

impl std::fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerError").field("permanent", &self.permanent).field("source", &self.source).finish()
    }
}

impl std::fmt::Display for HandlerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.source.fmt(f)
    }
}

/// Per-subscription settings. Unset limits fall back to the bus's [`SubscribeConfig`](crate::SubscribeConfig)
/// and [`RetryPolicy`].
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct SubscribeOptions {
    /// Consumer group: subscriptions with the same group share the events of the topic.
    pub group: String,
    /// Overrides `subscribe.concurrency`.
    pub concurrency: Option<usize>,
    /// Overrides `subscribe.max_in_flight`.
    pub max_in_flight: Option<usize>,
    /// Overrides `subscribe.handler_timeout`.
    pub handler_timeout: Option<Duration>,
    /// Overrides the bus's retry policy.
    pub retry: Option<RetryPolicy>,
}

impl SubscribeOptions {
    /// Options for a subscription in consumer group `group`.
    pub fn group(group: impl Into<String>) -> Self {
        Self { group: group.into(), concurrency: None, max_in_flight: None, handler_timeout: None, retry: None }
    }

    /// Sets how many handler calls may run at once.
    pub fn concurrency(mut self, workers: usize) -> Self {
        self.concurrency = Some(workers);
        self
    }

    /// Sets how many messages may be fetched but not yet acked.
    pub fn max_in_flight(mut self, messages: usize) -> Self {
        self.max_in_flight = Some(messages);
        self
    }

    /// Sets the handler deadline.
    pub fn handler_timeout(mut self, timeout: Duration) -> Self {
        self.handler_timeout = Some(timeout);
        self
    }

    /// Sets the retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = Some(retry);
        self
    }
}

/// The broker's confirmation that it stored an event.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishAck {
    /// The event acknowledged.
    pub event_id: EventId,
    /// Topic it was stored in.
    pub topic: String,
    /// Position in the topic or stream (stream sequence, partition offset, log index), when the backend has one.
    pub sequence: Option<u64>,
    /// Partition, on backends that partition topics.
    pub partition: Option<i32>,
    /// Whether the broker recognised the event id as a re-send and did not store it again.
    pub duplicate: bool,
}

impl PublishAck {
    /// An ack for `event_id` in `topic`.
    pub fn new(event_id: EventId, topic: impl Into<String>) -> Self {
        Self { event_id, topic: topic.into(), sequence: None, partition: None, duplicate: false }
    }

    /// Sets the position.
    pub fn with_sequence(mut self, sequence: u64) -> Self {
        self.sequence = Some(sequence);
        self
    }

    /// Sets the partition.
    pub fn with_partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }

    /// Marks the ack as a recognised duplicate.
    pub fn with_duplicate(mut self, duplicate: bool) -> Self {
        self.duplicate = duplicate;
        self
    }
}

/// A publish accepted into the in-flight window. Await it for the broker's ack.
///
/// Dropping the receipt does not cancel the publish: it still settles, and is reported on the publish-result
/// stream when that is on.
#[must_use = "await the receipt to learn whether the broker stored the event"]
#[derive(Debug)]
pub struct PublishReceipt {
    event_id: EventId,
    state: ReceiptState,
}

#[derive(Debug)]
enum ReceiptState {
    Settled(Option<Result<PublishAck>>),
    Pending(oneshot::Receiver<Result<PublishAck>>),
}

impl PublishReceipt {
    pub(crate) fn settled(event_id: EventId, result: Result<PublishAck>) -> Self {
        Self { event_id, state: ReceiptState::Settled(Some(result)) }
    }

    pub(crate) fn pending(event_id: EventId, receiver: oneshot::Receiver<Result<PublishAck>>) -> Self {
        Self { event_id, state: ReceiptState::Pending(receiver) }
    }

    /// The id of the event this receipt is for.
    pub fn event_id(&self) -> EventId {
        self.event_id
    }

    /// The outcome if the publish has settled already, taken without waiting and without registering to be
    /// woken; `None` while it is still in flight (await the receipt for it then). Once taken, awaiting the
    /// receipt gives [`Error::Closed`].
    pub fn try_result(&mut self) -> Option<Result<PublishAck>> {
        let result = match &mut self.state {
            ReceiptState::Settled(result) => return result.take(),
            ReceiptState::Pending(receiver) => match receiver.try_recv() {
                Ok(result) => result,
                Err(oneshot::error::TryRecvError::Empty) => return None,
                // The sender only disappears without a value when the bus was dropped without close().
                Err(oneshot::error::TryRecvError::Closed) => Err(Error::ClosedBeforeAck),
            },
        };
        self.state = ReceiptState::Settled(None);
        Some(result)
    }
}

impl Future for PublishReceipt {
    type Output = Result<PublishAck>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.state {
            ReceiptState::Settled(result) => Poll::Ready(result.take().unwrap_or(Err(Error::Closed))),
            // The sender only disappears without a value when the bus was dropped without close().
            ReceiptState::Pending(receiver) => {
                Pin::new(receiver).poll(cx).map(|r| r.unwrap_or(Err(Error::ClosedBeforeAck)))
            }
        }
    }
}

/// How one publish settled, as reported on the [`PublishResults`] stream.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PublishResult {
    /// The event.
    pub event_id: EventId,
    /// Its topic.
    pub topic: String,
    /// Its aggregate.
    pub aggregate_id: String,
    /// The ack, or why there is none.
    pub outcome: Result<PublishAck>,
}

/// The stream of settled publishes; see [`EventBus::publish_results`].
#[derive(Debug)]
pub struct PublishResults {
    pub(crate) receiver: mpsc::Receiver<PublishResult>,
    /// Cancelled once the bus has settled its last publish.
    pub(crate) finished: CancellationToken,
}

impl PublishResults {
    /// The next settled publish, or `None` once the bus is closed and every report was read.
    pub async fn recv(&mut self) -> Option<PublishResult> {
        tokio::select! {
            biased;
            result = self.receiver.recv() => result,
            _ = self.finished.cancelled() => self.receiver.try_recv().ok(),
        }
    }
}

/// Connection state of a bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Connected to the broker (always, for the in-memory backend until closed).
    Connected,
    /// The connection was lost; the bus is reconnecting on its own.
    Reconnecting,
    /// `close()` was called.
    Closed,
}

/// What [`EventBus::health`] reports.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// Current state.
    pub state: ConnectionState,
    /// When the bus entered that state.
    pub since: SystemTime,
    /// The last connection or broker error seen, if any.
    pub last_error: Option<String>,
}

impl Health {
    /// A health report in `state` since now.
    pub fn new(state: ConnectionState) -> Self {
        Self { state, since: SystemTime::now(), last_error: None }
    }
}

/// Counters of a bus since it started; see [`EventBus::metrics`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Metrics {
    /// Publishes the broker acked.
    pub published: u64,
    /// Publishes that failed after being accepted (ack timeout, broker error, closed before ack).
    pub publish_failed: u64,
    /// Publishes rejected before sending (invalid input, backpressure, closed bus).
    pub publish_rejected: u64,
    /// Publishes currently awaiting an ack.
    pub in_flight: u64,
    /// Handler calls made, retries included.
    pub handler_calls: u64,
    /// Handler calls that failed or timed out.
    pub handler_failures: u64,
    /// Messages acked after their handler succeeded.
    pub acked: u64,
    /// Messages sent to a dead-letter topic.
    pub dead_lettered: u64,
    /// Messages that could not be decoded (also counted in `dead_lettered` when dead-lettering is on).
    pub undecodable: u64,
    /// Live subscriptions.
    pub subscriptions: u64,
}

impl CloseReport {
    /// A report of a close that left `unacked` publishes and `abandoned` deliveries.
    pub fn new(unacked: Vec<EventId>, abandoned: usize, timed_out: bool, elapsed: Duration) -> Self {
        Self { unacked, abandoned, timed_out, elapsed }
    }
}

/// What [`EventBus::close`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CloseReport {
    /// Publishes that were still awaiting an ack at the deadline; each settled with
    /// [`Error::ClosedBeforeAck`].
    pub unacked: Vec<EventId>,
    /// Deliveries whose handler was still running at the deadline and was stopped; they were not acked, so
    /// the broker delivers them again.
    pub abandoned: usize,
    /// Whether the deadline cut anything short.
    pub timed_out: bool,
    /// How long close took.
    pub elapsed: Duration,
}
