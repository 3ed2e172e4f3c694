//! The consuming side: one consumer-group member per subscription, read by one fetch task that feeds the
//! keyed dispatcher, commits contiguous offsets as records are handled, and follows rebalances.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use eventbus_core::dispatch::{Acker, Delivery, Dispatcher, Message};
use eventbus_core::wire::{self, DecodeError, WireMessage};
use eventbus_core::Result;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message as _};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::client::BusContext;
use crate::tracker::{Ticket, Tracker};

/// How often handled offsets are committed while consuming.
const COMMIT_EVERY: Duration = Duration::from_millis(200);

/// The context of a subscription's consumer: follows assignments and, before partitions are revoked, lets
/// their running handlers finish and commits what was handled, so the next owner starts right after it.
pub(crate) struct GroupContext {
    pub(crate) bus: BusContext,
    pub(crate) topic: String,
    pub(crate) tracker: Arc<Tracker>,
    /// Set once the first assignment arrived: the member has joined the group.
    pub(crate) joined: watch::Sender<bool>,
    /// Longest wait for running handlers of revoked partitions.
    pub(crate) drain: Duration,
}

impl ClientContext for GroupContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.bus.error(error, reason);
    }
}

impl GroupContext {
    fn partitions(&self, list: &TopicPartitionList) -> Vec<i32> {
        list.elements_for_topic(&self.topic).iter().map(|e| e.partition()).collect()
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(list) = rebalance else {
            return;
        };
        let revoked = self.partitions(list);
        self.tracker.revoke(&revoked);
        // The callback runs inside the consumer's poll, on a runtime worker: waiting is only allowed where the
        // runtime can move its other tasks elsewhere.
        let can_wait = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
        let settle_and_commit = || {
            if can_wait {
                self.tracker.wait_settled_blocking(Some(&revoked), self.drain);
            }
            commit(consumer, &self.topic, &self.tracker, Some(&revoked), CommitMode::Sync)
        };
        let committed = if can_wait { tokio::task::block_in_place(settle_and_commit) } else { settle_and_commit() };
        tracing::debug!(topic = %self.topic, ?revoked, ?committed, "partitions revoked");
        self.tracker.forget(&revoked);
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let assigned = self.partitions(list);
            tracing::debug!(topic = %self.topic, ?assigned, "partitions assigned");
            self.tracker.assign(&assigned);
            self.joined.send_replace(true);
        }
    }
}

/// Commits the positions that moved (of `only` these partitions, or all).
/// Returns the positions committed.
fn commit<C: Consumer<GroupContext> + ?Sized>(
    consumer: &C,
    topic: &str,
    tracker: &Tracker,
    only: Option<&[i32]>,
    mode: CommitMode,
) -> Vec<(i32, i64)> {
    let moved = tracker.advanced(only);
    if moved.is_empty() {
        return moved;
    }
    let mut list = TopicPartitionList::new();
    for &(partition, position) in &moved {
        if list.add_partition_offset(topic, partition, Offset::Offset(position)).is_err() {
            return Vec::new();
        }
    }
    if let Err(error) = consumer.commit(&list, mode) {
        tracing::warn!(%topic, %error, "offset commit failed; records after the last commit may be delivered again");
    }
    moved
}

/// Moves records to the dispatcher until `stop`, committing as they are handled; then hands back what was
/// not started, waits for running handlers (at most `drain`), commits, and closes the consumer off the async
/// runtime.
pub(crate) async fn fetch(
    consumer: OffRuntime<Arc<StreamConsumer<GroupContext>>>,
    dispatcher: Dispatcher,
    tracker: Arc<Tracker>,
    drain: Duration,
    stop: CancellationToken,
) {
    let topic = consumer.get().context().topic.clone();
    let mut commits = tokio::time::interval(COMMIT_EVERY);
    commits.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One cancellation waiter for the task's life: registering one per record takes the token's locks, which
    // the subscription's workers share.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            _ = commits.tick() => {
                let committed = commit(&**consumer.get(), &topic, &tracker, None, CommitMode::Async);
                if !committed.is_empty() {
                    tracing::trace!(%topic, ?committed, "committing");
                }
            }
            received = consumer.get().recv() => match received {
                Ok(record) => {
                    consumer.get().context().bus.connection.up();
                    tracing::trace!(%topic, partition = record.partition(), offset = record.offset(), "received");
                    let ticket = tracker.received(record.partition(), record.offset());
                    let delivery = delivery(&record, KafkaAcker { tracker: tracker.clone(), ticket, settled: false });
                    let slot = match dispatcher.try_reserve() {
                        Some(slot) => slot,
                        None => tokio::select! {
                            biased;
                            // Never dispatched: dropping the delivery hands its offset back.
                            _ = &mut stopped => break,
                            slot = dispatcher.reserve() => slot,
                        },
                    };
                    dispatcher.push(slot, delivery);
                }
                Err(error) => {
                    tracing::warn!(%topic, %error, "consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    // Closing: what was queued is handed back (its offsets stay uncommitted), running handlers finish. A worker
    // stopped in a retry's backoff puts its delivery back in the queue, so the queue is emptied on every turn.
    let settle = tokio::time::Instant::now() + drain;
    loop {
        drop(dispatcher.take_queued());
        if !tracker.in_flight(None) || tokio::time::Instant::now() >= settle {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let consumer = consumer.take();
    let closing = tokio::task::spawn_blocking(move || {
        let committed = commit(&*consumer, &topic, &tracker, None, CommitMode::Sync);
        tracing::debug!(%topic, ?committed, "final commit");
        // Leaving the group and destroying the client block on the network.
        drop(consumer);
    });
    let _ = closing.await;
}

/// Decodes a record into a delivery; what cannot be decoded is kept raw for the dead-letter topic.
fn delivery<M: rdkafka::Message>(record: &M, acker: KafkaAcker) -> Delivery {
    // Copied again only for a record that cannot be decoded: sharing one copy would cost every record a
    // reference-counted buffer.
    let payload = || bytes::Bytes::copy_from_slice(record.payload().unwrap_or_default());
    let headers = || {
        record.headers().into_iter().flat_map(|headers| headers.iter()).map(|h| (h.key, h.value.unwrap_or_default()))
    };
    // rdkafka panics on a header name that is not UTF-8, which any producer can write: such a record is
    // undecodable, not a reason to stop consuming.
    let message = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match wire::decode(headers(), payload()) {
        Ok(envelope) => Message::Event(Arc::new(envelope)),
        Err(error) => {
            let headers = headers().map(|(k, v)| (k.to_owned(), String::from_utf8_lossy(v).into_owned())).collect();
            Message::undecodable(WireMessage { headers, payload: payload() }, error)
        }
    }));
    let message = message.unwrap_or_else(|_| {
        Message::undecodable(
            WireMessage { headers: Vec::new(), payload: payload() },
            DecodeError::MalformedHeader { name: "header name", reason: "not valid UTF-8".into() },
        )
    });
    Delivery { message, acker: Box::new(acker) }
}

/// Settles one record in the tracker. Dropped unsettled (not handled: closing, revoked), it hands the
/// offset back so the commit position stops before it.
struct KafkaAcker {
    tracker: Arc<Tracker>,
    ticket: Ticket,
    settled: bool,
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(mut self: Box<Self>) -> Result<()> {
        self.ack_now().unwrap_or(Ok(()))
    }

    fn ack_now(&mut self) -> Option<Result<()>> {
        if !self.settled {
            self.tracker.handled(&self.ticket);
            self.settled = true;
        }
        Some(Ok(()))
    }

    fn is_current(&self) -> bool {
        self.tracker.is_current(&self.ticket)
    }
}

impl Drop for KafkaAcker {
    fn drop(&mut self) {
        if !self.settled {
            self.tracker.returned(&self.ticket);
        }
    }
}

/// Owns a librdkafka client and destroys it on a blocking thread when dropped, even when the owner is an
/// aborted task: destroying a client joins its threads and talks to the brokers.
pub(crate) struct OffRuntime<T: Send + 'static>(Option<T>);

impl<T: Send + 'static> OffRuntime<T> {
    pub(crate) fn new(value: T) -> Self {
        Self(Some(value))
    }

    pub(crate) fn get(&self) -> &T {
        self.0.as_ref().expect("present until taken")
    }

    /// Takes the client out, for an owner that destroys it itself.
    pub(crate) fn take(mut self) -> T {
        self.0.take().expect("present until taken")
    }
}

impl<T: Send + 'static> Drop for OffRuntime<T> {
    fn drop(&mut self) {
        if let Some(value) = self.0.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn_blocking(move || drop(value))),
                Err(_) => drop(value),
            }
        }
    }
}
