//! The consuming side: one fetch task per subscription merges the pull streams of the partitions the member
//! holds and feeds the keyed dispatcher; each delivery carries its JetStream message to ack, terminate or
//! release, and the claim on its partition.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer};
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use eventbus_core::dispatch::{Acker, Delivery, DispatchSlot, Dispatcher, Message};
use eventbus_core::wire::{self, WireMessage};
use eventbus_core::{Error, Result};
use futures_util::stream::{self, BoxStream, FuturesUnordered, SelectAll, StreamExt};
use futures_util::FutureExt;
use tokio::sync::{mpsc, Notify};

use crate::floor::{AckFloor, Placed};
use crate::provision::TakenOver;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

/// Server heartbeat on idle pull streams: a dead connection is noticed within two of them.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Lifetime of one pull request. A closed subscription's pull requests linger on the server this long, and a
/// message the server hands to one of them in that time is lost until its ack wait passes.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Delay of the `Nak` that hands back a closing subscription's messages: past the lifetime of its own pull
/// requests, so the server gives them to a live member.
const HAND_BACK_DELAY: Duration = Duration::from_secs(6);
/// Wait before re-opening a partition's pull stream that ended.
const REOPEN_DELAY: Duration = Duration::from_secs(1);

/// A member's hold on one partition: the partition's consumer, and a token cancelled when the member stops
/// owning it. Every delivery from the partition keeps the claim, so the member can tell when none is left.
pub(crate) struct Claim {
    pub(crate) partition: u16,
    pub(crate) consumer: PullConsumer,
    /// Cancelled when the partition passes to another member (or this one closes): its pull stream ends and
    /// its deliveries not yet handled are skipped, for the new owner to handle.
    pub(crate) revoked: CancellationToken,
    /// How often a delivery being handled is reported in progress: a third of the consumer's ack wait, as the
    /// server holds it.
    progress_interval: Duration,
    /// Whether a message handed back at close is released at once (`Nak`), for members that share every
    /// partition; a partition owner's successor re-creates the consumer at the first unacknowledged message.
    hand_back: bool,
    /// Deliveries of this claim not yet settled.
    unsettled: AtomicUsize,
    /// Pull streams of this claim open or being re-opened: each may still ask the server for messages.
    pulling: AtomicUsize,
    /// For a partition owner, the consumer sequence the next delivery must carry (0 for members that share
    /// every partition, which see gaps as a matter of course).
    next_delivery: AtomicU64,
    /// For a partition owner whose consumer acknowledges under `AckAll`, the settled prefix of its deliveries,
    /// acked in bulk; `None` where each delivery is acked on its own.
    floor: Option<AckFloor>,
}

impl Claim {
    /// A partition every member of the group pulls from, one message at a time.
    pub(crate) fn shared(partition: u16, consumer: PullConsumer, ack_wait: Duration) -> Arc<Self> {
        Self::new(partition, consumer, ack_wait, true, 0, None)
    }

    /// A partition this member owns, from the position its take-over left. Acks that fall due are signalled
    /// on `acks_due`, for the subscription's fetch loop to send.
    pub(crate) fn owned(partition: u16, taken: TakenOver, acks_due: Arc<Notify>) -> Arc<Self> {
        // A consumer created by the bus acknowledges under `AckAll`; one created otherwise (explicit acks) keeps
        // an ack per delivery.
        let ack_all = taken.consumer.cached_info().config.ack_policy == AckPolicy::All;
        let floor = ack_all.then(|| AckFloor::new(taken.next_delivery, acks_due));
        Self::new(partition, taken.consumer, taken.ack_wait, false, taken.next_delivery, floor)
    }

    fn new(
        partition: u16,
        consumer: PullConsumer,
        ack_wait: Duration,
        hand_back: bool,
        next: u64,
        floor: Option<AckFloor>,
    ) -> Arc<Self> {
        Arc::new(Self {
            floor,
            partition,
            consumer,
            revoked: CancellationToken::new(),
            progress_interval: ack_wait / 3,
            hand_back,
            unsettled: AtomicUsize::new(0),
            pulling: AtomicUsize::new(0),
            next_delivery: AtomicU64::new(next),
        })
    }

    /// For a partition owner, where `message` stands in the partition, checked to be the delivery after the
    /// previous one (`None` for members that share every partition). A partition's owner is its only puller,
    /// so a gap means a delivery was lost on the way (a connection dropped with messages in flight): the server
    /// redelivers it only after its ack wait, and a later event of its aggregate would overtake it.
    fn place(&self, message: &jetstream::Message) -> std::result::Result<Option<Placed>, OutOfSequence> {
        let expected = self.next_delivery.load(Ordering::Acquire);
        if expected == 0 {
            return Ok(None);
        }
        // Every JetStream delivery carries its sequences in its reply subject; one without them cannot be
        // placed, and is treated as a gap: the partition is read again from its first unacknowledged message.
        let info = message.info().map_err(|_| OutOfSequence)?;
        let placed = Placed {
            consumer_sequence: info.consumer_sequence,
            stream_sequence: info.stream_sequence,
            redelivered: info.delivered > 1,
        };
        self.next_delivery.store(placed.consumer_sequence + 1, Ordering::Release);
        if placed.consumer_sequence == expected {
            Ok(Some(placed))
        } else {
            Err(OutOfSequence)
        }
    }

    /// Whether every delivery of this claim is settled and acknowledged and none of its pull streams is open,
    /// so another member may take the partition over.
    pub(crate) fn idle(&self) -> bool {
        self.unsettled.load(Ordering::Acquire) == 0
            && self.pulling.load(Ordering::Acquire) == 0
            && self.floor.as_ref().is_none_or(AckFloor::is_acknowledged)
    }

    /// Reports in progress the deliveries settled behind an unsettled one (see [`AckFloor::waiting_behind`]).
    async fn keep_settled_alive(&self) {
        if let Some(floor) = &self.floor {
            floor.keep_waiting_alive().await;
        }
    }

    /// When acked messages came again, checks that the server still applies this member's acks: an ack of
    /// another member's, sent before it lost the partition and arriving after this member re-created the
    /// consumer, moves the consumer's delivery floor past this member's deliveries, and the server ignores
    /// their acks from then on. The partition is then read again from the first unacknowledged message through
    /// a fresh consumer (the gap path: revoked here, taken over again once idle; the take-over re-creates a
    /// consumer whose delivery floor is past its deliveries). Called by the partition's keeper, not the fetch
    /// loop: the request may take up to `timeout`.
    pub(crate) async fn check_acks_applied(&self, timeout: Duration) {
        let Some(floor) = self.floor.as_ref().filter(|floor| floor.take_suspicion()) else { return };
        let Ok(Ok(info)) = tokio::time::timeout(timeout, self.consumer.get_info()).await else {
            floor.suspect_again();
            return;
        };
        if info.ack_floor.consumer_sequence > floor.settled_through() {
            tracing::warn!(
                partition = self.partition,
                acked_through = info.ack_floor.consumer_sequence,
                delivered_through = floor.settled_through(),
                "the partition's consumer applied an ack of another member's; re-reading the partition"
            );
            self.revoked.cancel();
        }
    }

    /// Sends the ack due for the settled deliveries, if one is and no one else is sending it.
    pub(crate) async fn send_due_ack(&self) {
        if let Some(floor) = &self.floor {
            if let Err(error) = floor.send_due().await {
                tracing::debug!(partition = self.partition, %error, "acking the settled deliveries failed; they are delivered again");
            }
        }
    }

    /// The partition passed to another member without this one letting it go: its settled deliveries are no
    /// longer acked (see `floor.rs`).
    pub(crate) fn lost(&self) {
        self.revoked.cancel();
        if let Some(floor) = &self.floor {
            floor.abandon();
        }
    }
}

/// A delivery that does not follow the previous one of its partition, or cannot be placed at all.
struct OutOfSequence;

/// A delivery of a claim not settled yet, counted in the claim while it lives.
struct Unsettled(Arc<Claim>);

impl Unsettled {
    fn new(claim: Arc<Claim>) -> Self {
        claim.unsettled.fetch_add(1, Ordering::AcqRel);
        Self(claim)
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        self.0.unsettled.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts one pull stream of a claim, from before its pull requests are sent until the stream is dropped
/// (carried through a re-open).
pub(crate) struct Pulling(Arc<Claim>);

impl Pulling {
    fn new(claim: Arc<Claim>) -> Self {
        claim.pulling.fetch_add(1, Ordering::AcqRel);
        Self(claim)
    }
}

impl Drop for Pulling {
    fn drop(&mut self) {
        self.0.pulling.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a partition's pull stream yields.
// Nearly every item is a message; boxing it would cost an allocation per message to shrink the rare end marker.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Pulled {
    Message(std::result::Result<jetstream::Message, String>, Arc<Claim>),
    Ended(Arc<Claim>, Pulling),
}

pub(crate) type PartitionStream = BoxStream<'static, Pulled>;
type Reopen = Pin<Box<dyn std::future::Future<Output = (Arc<Claim>, Pulling, Result<PartitionStream>)> + Send>>;

/// Opens the pull stream of a claimed partition; it ends when the claim is revoked.
pub(crate) async fn open(claim: Arc<Claim>) -> Result<PartitionStream> {
    open_counted(claim.clone(), Pulling::new(claim)).await
}

async fn open_counted(claim: Arc<Claim>, pulling: Pulling) -> Result<PartitionStream> {
    let partition = claim.partition;
    let messages = claim
        .consumer
        .stream()
        .max_messages_per_batch(pull_batch(&claim.consumer))
        .heartbeat(HEARTBEAT)
        .expires(PULL_EXPIRES)
        .messages()
        .await
        .map_err(|e| Error::broker(format!("cannot pull from partition {partition}"), e))?;
    // A pull stream that reports an error (missed heartbeats after a broker restart, a failed pull) may have
    // lost its pending pull request on the server and wait for nothing: it ends at its first error, after
    // reporting it, and the fetch loop opens a fresh one.
    let tagged = claim.clone();
    let messages = messages.scan(false, move |failed, item| {
        let next = (!*failed).then(|| Pulled::Message(item.map_err(|e| e.to_string()), tagged.clone()));
        *failed = matches!(next, Some(Pulled::Message(Err(_), _)));
        std::future::ready(next)
    });
    let revoked = claim.revoked.clone().cancelled_owned();
    Ok(messages.take_until(revoked).chain(stream::once(async move { Pulled::Ended(claim, pulling) })).boxed())
}

/// Messages one pull request asks for: as many as the partition's consumer lets a member hold unacknowledged
/// (the server sends no more than that at once anyway), at least 16 and at most 1024. Smaller batches only
/// cost more pull requests: at 16 against 64, one request per eight messages.
fn pull_batch(consumer: &PullConsumer) -> usize {
    usize::try_from(consumer.cached_info().config.max_ack_pending).map_or(16, |pending| pending.clamp(16, 1024))
}

/// Moves messages from every claimed partition to the dispatcher until `stop`. Claims arrive on `claims`
/// with their opened streams; a stream that ends while its claim holds is re-opened (for example after its
/// consumer was deleted and re-created).
pub(crate) async fn fetch(
    topic: Arc<str>,
    mut claims: mpsc::UnboundedReceiver<(Arc<Claim>, PartitionStream)>,
    dispatcher: Dispatcher,
    progress_interval: Duration,
    acks_due: Arc<Notify>,
    stop: CancellationToken,
) {
    let mut streams: SelectAll<PartitionStream> = SelectAll::new();
    // Queued deliveries are kept alive too: a member may hold more than its workers handle within the ack wait.
    let mut progress = progress_ticks(progress_interval);
    let mut reopening: FuturesUnordered<Reopen> = FuturesUnordered::new();
    // Claims of owned partitions, whose deliveries settled behind a slow one are kept alive with the queue's.
    let mut owned: Vec<Arc<Claim>> = Vec::new();
    // One cancellation waiter for the task's life: registering one per message takes the token's locks, which
    // the subscription's workers share.
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    // Likewise one waiter for the acks that fall due, renewed each time it fires.
    let acks = acks_due.notified();
    tokio::pin!(acks);
    loop {
        let pulled = tokio::select! {
            biased;
            _ = &mut stopped => break,
            _ = &mut acks => {
                acks.set(acks_due.notified());
                send_due_acks(&mut owned).await;
                continue;
            }
            _ = progress.tick() => {
                keep_alive(&dispatcher, &mut owned).await;
                continue;
            }
            Some((claim, stream)) = claims.recv() => {
                // An existing consumer keeps its own ack wait, which may be shorter than the configured one.
                if claim.progress_interval < progress.period() {
                    progress = progress_ticks(claim.progress_interval);
                }
                if claim.floor.is_some() {
                    owned.push(claim);
                }
                streams.push(stream);
                continue;
            }
            Some((claim, pulling, reopened)) = reopening.next(), if !reopening.is_empty() => {
                match reopened {
                    Ok(stream) => streams.push(stream),
                    Err(_) if claim.revoked.is_cancelled() => {}
                    Err(error) => {
                        tracing::warn!(%topic, partition = claim.partition, %error, "re-opening a partition failed; retrying");
                        reopening.push(reopen(claim, pulling));
                    }
                }
                continue;
            }
            Some(pulled) = streams.next(), if !streams.is_empty() => pulled,
        };
        match pulled {
            Pulled::Message(Ok(message), claim) => {
                let Ok(placed) = claim.place(&message) else {
                    // Left unacknowledged: the member re-reads the partition from its first unacknowledged
                    // message once everything of this claim has settled.
                    tracing::warn!(%topic, partition = claim.partition, "a delivery was lost in transit; re-reading the partition");
                    claim.revoked.cancel();
                    continue;
                };
                let delivery = delivery(message, claim, placed);
                let waits = Waits {
                    progress: &mut progress,
                    acks_due: &acks_due,
                    acks: acks.as_mut(),
                    stopped: stopped.as_mut(),
                };
                let Some(slot) = reserve(&dispatcher, &mut owned, waits).await else {
                    delivery.acker.release().await;
                    break;
                };
                dispatcher.push(slot, delivery);
            }
            // Missed heartbeats and failed pulls are reported by the stream and recovered by it.
            Pulled::Message(Err(error), _) => tracing::warn!(%topic, %error, "pull stream failed; re-opening it"),
            Pulled::Ended(claim, _) if claim.revoked.is_cancelled() => {
                tracing::debug!(%topic, partition = claim.partition, "stopped pulling from a partition no longer owned");
            }
            Pulled::Ended(claim, pulling) => {
                tracing::debug!(%topic, partition = claim.partition, "pull stream ended; re-opening it");
                reopening.push(reopen(claim, pulling));
            }
        }
    }
    // Messages the client already received for this subscription go back to the group too.
    while let Some(Some(pulled)) = streams.next().now_or_never() {
        if let Pulled::Message(Ok(message), claim) = pulled {
            delivery(message, claim, None).acker.release().await;
        }
    }
}

/// Ticks every `interval`, from one `interval` on.
fn progress_ticks(interval: Duration) -> tokio::time::Interval {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks
}

/// Progress notices for every delivery waiting in the dispatcher and every one settled behind a slow one in a
/// partition still `owned` (claims revoked since are dropped from it: their partition's next reader gets those
/// deliveries again anyway).
async fn keep_alive(dispatcher: &Dispatcher, owned: &mut Vec<Arc<Claim>>) {
    futures_util::future::join_all(dispatcher.queued_progress()).await;
    owned.retain(|claim| !claim.revoked.is_cancelled());
    for claim in owned.iter() {
        claim.keep_settled_alive().await;
    }
}

/// Sends the acks due in the partitions still `owned` (a revoked partition's are sent by its keeper, before it
/// lets the partition go or reads it again).
async fn send_due_acks(owned: &mut Vec<Arc<Claim>>) {
    owned.retain(|claim| !claim.revoked.is_cancelled());
    for claim in owned.iter() {
        claim.send_due_ack().await;
    }
}

/// What the fetch loop goes on waiting for while it waits for room in the dispatcher.
struct Waits<'a, 'b> {
    progress: &'a mut tokio::time::Interval,
    acks_due: &'b Notify,
    acks: Pin<&'a mut tokio::sync::futures::Notified<'b>>,
    stopped: Pin<&'a mut WaitForCancellationFuture<'b>>,
}

/// Room in the dispatcher, or `None` once `stopped` completes. A full dispatcher is when its queues are
/// longest: their progress notices go on while this waits, and so do the acks that free room on the server.
async fn reserve(
    dispatcher: &Dispatcher,
    owned: &mut Vec<Arc<Claim>>,
    mut waits: Waits<'_, '_>,
) -> Option<DispatchSlot> {
    if let Some(slot) = dispatcher.try_reserve() {
        return Some(slot);
    }
    let reserve = dispatcher.reserve();
    tokio::pin!(reserve);
    loop {
        tokio::select! {
            biased;
            _ = &mut waits.stopped => return None,
            _ = &mut waits.acks => {
                waits.acks.set(waits.acks_due.notified());
                send_due_acks(owned).await;
            }
            _ = waits.progress.tick() => keep_alive(dispatcher, owned).await,
            slot = &mut reserve => return Some(slot),
        }
    }
}

fn reopen(claim: Arc<Claim>, pulling: Pulling) -> Reopen {
    async move {
        tokio::time::sleep(REOPEN_DELAY).await;
        // Revoked while waiting: the pull requests of a fresh stream could take the next owner's messages.
        if claim.revoked.is_cancelled() {
            return (claim, pulling, Err(Error::Closed));
        }
        let opened = open_counted(claim.clone(), Pulling::new(claim.clone())).await;
        (claim, pulling, opened)
    }
    .boxed()
}

/// Decodes a JetStream message into a delivery (`placed` where an owner acks in bulk); what cannot be decoded
/// is kept raw for the dead-letter topic.
fn delivery(message: jetstream::Message, claim: Arc<Claim>, placed: Option<Placed>) -> Delivery {
    let headers = || {
        message
            .headers
            .iter()
            .flat_map(|headers| headers.iter())
            .flat_map(|(name, values)| values.iter().map(move |value| (name.as_ref(), value.as_str())))
    };
    let decoded = wire::decode(headers().map(|(n, v)| (n, v.as_bytes())), message.payload.clone());
    let message_kind = match decoded {
        Ok(envelope) => Message::Event(Arc::new(envelope)),
        Err(error) => Message::undecodable(raw(headers(), &message.payload), error),
    };
    Delivery { message: message_kind, acker: Box::new(NatsAcker { message, placed, claim: Unsettled::new(claim) }) }
}

fn raw<'a>(headers: impl Iterator<Item = (&'a str, &'a str)>, payload: &bytes::Bytes) -> WireMessage {
    WireMessage { headers: headers.map(|(n, v)| (n.to_owned(), v.to_owned())).collect(), payload: payload.clone() }
}

/// Acknowledges one JetStream message, on its own or as part of its partition's settled prefix.
struct NatsAcker {
    message: jetstream::Message,
    /// Where the delivery stands in its partition, for an owner acking in bulk.
    placed: Option<Placed>,
    claim: Unsettled,
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        self.trace("ack");
        let NatsAcker { message, placed, claim } = *self;
        match (&claim.0.floor, placed) {
            // The fetch loop sends the ack; until it has, the claim counts as not idle.
            (Some(floor), Some(placed)) => {
                floor.settle(placed, message);
                Ok(())
            }
            _ => message.ack().await.map_err(|e| Error::Broker { message: format!("ack failed: {e}"), source: None }),
        }
    }

    /// Dead-lettered: `Term` tells the server never to redeliver it. Under `AckAll` a `Term` would acknowledge
    /// every earlier delivery too, handled or not: there the dead-lettered delivery joins the settled prefix.
    async fn terminate(self: Box<Self>) -> Result<()> {
        if self.claim.0.floor.is_some() && self.placed.is_some() {
            return self.ack().await;
        }
        self.message
            .ack_with(AckKind::Term)
            .await
            .map_err(|e| Error::Broker { message: format!("term failed: {e}"), source: None })
    }

    /// Unhandled at close. Members that share every partition `Nak` it, so the server hands it to another
    /// member once this subscription's pull requests have expired, instead of after the full ack wait. A
    /// partition owner leaves it: the next owner re-creates the consumer at the first unacknowledged message.
    async fn release(self: Box<Self>) {
        if !self.claim.0.hand_back {
            return;
        }
        self.trace("nak");
        if let Err(error) = self.message.ack_with(AckKind::Nak(Some(HAND_BACK_DELAY))).await {
            tracing::debug!(%error, "nak at close failed; the message returns after its ack wait");
        }
    }

    /// False once the partition passed to another member: the delivery is skipped, for the new owner.
    fn is_current(&self) -> bool {
        !self.claim.0.revoked.is_cancelled()
    }

    fn progress_interval(&self) -> Option<Duration> {
        Some(self.claim.0.progress_interval)
    }

    fn queued_progress(&self) -> Option<futures_util::future::BoxFuture<'static, ()>> {
        let message = self.message.clone();
        Some(
            async move {
                if let Err(error) = message.ack_with(AckKind::Progress).await {
                    tracing::debug!(%error, "in-progress notice for a queued delivery failed");
                }
            }
            .boxed(),
        )
    }

    /// Still handled or retried: restart the server's ack-wait timer.
    async fn in_progress(&self) {
        if let Err(error) = self.message.ack_with(AckKind::Progress).await {
            tracing::debug!(%error, "in-progress notice failed");
        }
    }
}

impl NatsAcker {
    /// Traces what is settled; the message's metadata is parsed only when tracing wants it.
    fn trace(&self, what: &str) {
        if tracing::enabled!(tracing::Level::TRACE) {
            if let Ok(info) = self.message.info() {
                let (consumer, stream_sequence, delivered) = (info.consumer, info.stream_sequence, info.delivered);
                tracing::trace!(consumer, stream_sequence, delivered, "{what}");
            }
        }
    }
}
