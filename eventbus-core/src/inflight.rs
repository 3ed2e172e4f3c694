//! The bounded in-flight publish window.
//!
//! A publish takes a slot (waiting at most `enqueue_timeout`), the backend sends the message and hands the
//! window a future of the broker's ack. One collector task per bus drives every pending ack future, each under
//! its `ack_timeout`, settles the receipts and frees the slots. No task is spawned per message, and publishers
//! never hold a lock while they wait.
//!
//! The collector keeps one timer for all pending acks rather than one each: it is set to the earliest
//! deadline, and when that passes, one sweep settles every ack past its deadline and finds the next earliest.
//! Every ack has the same timeout and they arrive in the order they were sent, so while acks come back in time
//! the timer fires about once per `ack_timeout`, not once per message.
//!
//! A broker client that reports every ack through a callback (librdkafka's delivery report) needs no future
//! driven per message: the backend registers the publish with [`expect_ack`](PublishWindow::expect_ack) and
//! settles the returned [`AckCallback`] from the callback, which frees the slot at once, on the client's
//! thread (with the publish-result stream on, once the collector has reported the outcome). A client that
//! carries a number with each message registers with [`expect_ack_ticket`](PublishWindow::expect_ack_ticket)
//! instead, sends the [packed](AckTicket::pack) ticket along, and settles through an [`AckSettler`]: nothing
//! is allocated per publish. The collector only enforces their deadlines, with one more timer of the same
//! kind, and reports them on the publish-result stream when that is on (its sends may wait; a callback must
//! not).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use slab::Slab;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::{PublishAck, PublishReceipt, PublishResult, PublishResults};
use crate::config::PublishConfig;
use crate::envelope::EventId;
use crate::metrics::{Counter, Counters};
use crate::{Error, Result};

/// A slot in the window, held from before the send until the ack settles.
#[derive(Debug)]
pub struct WindowSlot {
    _permit: OwnedSemaphorePermit,
}

/// What the window needs to know about one publish to settle and report it.
#[derive(Debug)]
struct Pending {
    event_id: EventId,
    topic: Arc<str>,
    aggregate_id: Option<String>,
    reply: oneshot::Sender<Result<PublishAck>>,
    _slot: WindowSlot,
}

type AckFuture = BoxFuture<'static, Result<PublishAck>>;

/// The publishes registered with [`PublishWindow::expect_ack`] whose callback has not settled them yet.
#[derive(Debug)]
struct Expected {
    acks: Mutex<ExpectedAcks>,
    counters: Arc<Counters>,
    /// The collector, which reports outcomes on the publish-result stream; `None` when that stream is off.
    reporter: Option<mpsc::UnboundedSender<Settling>>,
}

#[derive(Debug, Default)]
struct ExpectedAcks {
    /// Set by close() once it gave up on what is pending: later callbacks find nothing to settle.
    given_up: bool,
    pending: Slab<Registered>,
    /// Numbers the registrations: a slab key is reused once its publish settles, so a late callback (of a
    /// publish that timed out) must not settle the publish registered under its key since. Wraps at
    /// [`REGISTRATION_LIMIT`], so that a packed ticket carries it whole.
    registrations: u64,
}

/// Bits of a [packed](AckTicket::pack) ticket that hold the slab key: every registered publish holds a window
/// slot, so keys stay below the largest window.
const KEY_BITS: u32 = crate::config::MAX_WINDOW.trailing_zeros();

/// Registrations are numbered from 1 up to this, then from 1 again: the bits a packed ticket leaves them, less
/// its top bit (2^43 − 1 on 64-bit targets: never reached in practice).
const REGISTRATION_LIMIT: u64 = (usize::MAX >> (KEY_BITS + 1)) as u64;

#[derive(Debug)]
struct Registered {
    pending: Pending,
    deadline: Instant,
    registration: u64,
}

/// Where a publish registered with [`PublishWindow::expect_ack`] is, for a client that routes acks by a token
/// rather than a value (NATS: in the reply subject). Written as `<key>.<registration>` and parsed back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckTicket {
    key: usize,
    registration: u64,
}

impl AckTicket {
    /// The ticket as one number, for a client that carries a plain number with each message (librdkafka's
    /// per-message opaque) rather than an allocation. The top bit is never set: the client may use it to tell
    /// numbers of its own from tickets.
    pub fn pack(self) -> usize {
        // Lossless: registrations never exceed REGISTRATION_LIMIT, keys never reach 1 << KEY_BITS.
        ((self.registration as usize) << KEY_BITS) | self.key
    }

    /// The ticket [`pack`](Self::pack) made this number of.
    pub fn unpack(packed: usize) -> Self {
        Self { key: packed & ((1 << KEY_BITS) - 1), registration: (packed >> KEY_BITS) as u64 }
    }
}

impl std::fmt::Display for AckTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.key, self.registration)
    }
}

impl std::str::FromStr for AckTicket {
    type Err = ();

    fn from_str(text: &str) -> std::result::Result<Self, ()> {
        let (key, registration) = text.split_once('.').ok_or(())?;
        Ok(Self { key: key.parse().map_err(drop)?, registration: registration.parse().map_err(drop)? })
    }
}

impl ExpectedAcks {
    /// Takes the publish of `ticket`, if it is still the one registered under its key.
    fn take(&mut self, ticket: AckTicket) -> Option<Pending> {
        let current = self.pending.get(ticket.key).is_some_and(|r| r.registration == ticket.registration);
        current.then(|| self.pending.remove(ticket.key).pending)
    }
}

impl Expected {
    fn acks(&self) -> MutexGuard<'_, ExpectedAcks> {
        self.acks.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Settles the publish of `ticket` with what `ack` makes of its event id and topic, unless it timed out or
    /// close() gave up on it.
    fn settle(&self, ticket: AckTicket, ack: impl FnOnce(EventId, &str) -> Result<PublishAck>) {
        let Some(reporter) = &self.reporter else {
            let Some(pending) = self.acks().take(ticket) else {
                return;
            };
            let result = ack(pending.event_id, &pending.topic);
            record(&self.counters, &result);
            let _ = pending.reply.send(result);
            return;
        };
        // Taken and handed to the collector under one lock: close() gives up on registered publishes (under this
        // lock) before it stops the collector, so the collector has every publish taken before that.
        let mut acks = self.acks();
        let Some(pending) = acks.take(ticket) else {
            return;
        };
        let result = ack(pending.event_id, &pending.topic);
        // Answered already: no deadline of its own while it waits to be reported.
        let deadline = deadline_in(Duration::MAX);
        let settling = Settling { pending: Some(pending), deadline, ack: Some(std::future::ready(result).boxed()) };
        let sent = reporter.send(settling);
        drop(acks);
        // The collector is gone only when the window was dropped: the outcome still reaches the receipt,
        // unreported.
        if let Err(mpsc::error::SendError(mut settling)) = sent {
            if let (Some(pending), Some(ack)) = (settling.pending.take(), settling.ack.take()) {
                let result = ack.now_or_never().unwrap_or(Err(Error::ClosedBeforeAck));
                record(&self.counters, &result);
                let _ = pending.reply.send(result);
            }
        }
    }

    /// Forgets the publish of `ticket` without settling it: its slot frees, nothing is counted or reported.
    fn withdraw(&self, ticket: AckTicket) {
        let withdrawn = self.acks().take(ticket);
        drop(withdrawn);
    }

    /// Takes every publish whose deadline has passed by `now`; returns them and the earliest deadline left.
    fn expire(&self, now: Instant) -> (Vec<Pending>, Option<Instant>) {
        let mut acks = self.acks();
        let expired: Vec<usize> =
            acks.pending.iter().filter(|(_, registered)| registered.deadline <= now).map(|(key, _)| key).collect();
        let expired = expired.into_iter().map(|key| acks.pending.remove(key).pending).collect();
        let earliest = acks.pending.iter().map(|(_, registered)| registered.deadline).min();
        (expired, earliest)
    }

    /// Takes every publish still pending and refuses new ones.
    fn give_up(&self) -> Vec<Pending> {
        let mut acks = self.acks();
        acks.given_up = true;
        acks.pending.drain().map(|registered| registered.pending).collect()
    }
}

/// The settling end of a publish registered with [`PublishWindow::expect_ack`], for the broker client's
/// delivery callback. Settle it once. A publish whose callback does not come in time times out at its deadline;
/// one whose callback is dropped unsettled settles as [`Error::ClosedBeforeAck`].
#[derive(Debug)]
pub struct AckCallback {
    ticket: AckTicket,
    event_id: EventId,
    expected: Arc<Expected>,
    armed: bool,
}

impl AckCallback {
    /// The id of the event this callback settles.
    pub fn event_id(&self) -> EventId {
        self.event_id
    }

    /// Settles the publish with the broker's answer: its receipt resolves and its window slot is free again
    /// (with the publish-result stream on, once the collector has reported it). Safe to call from any thread;
    /// never blocks on the publish-result stream. Does nothing once the publish timed out or close() gave up.
    pub fn settle(mut self, result: Result<PublishAck>) {
        self.armed = false;
        self.expected.settle(self.ticket, |_, _| result);
    }

    /// The ticket of this publish, for a client that sends it along and gets it back with the ack.
    pub fn ticket(&self) -> AckTicket {
        self.ticket
    }

    /// Leaves the publish to be settled through its [ticket](Self::ticket) by an [`AckSettler`], or to time
    /// out at its deadline; the callback itself settles nothing any more.
    pub fn detach(mut self) {
        self.armed = false;
    }

    /// Withdraws a publish the client refused before sending: its slot is freed and nothing is counted or
    /// reported, since `publish` returns the refusal itself.
    pub fn withdraw(mut self) {
        self.armed = false;
        self.expected.withdraw(self.ticket);
    }
}

/// Settles publishes registered with [`PublishWindow::expect_ack`] by their [`AckTicket`], from a task that
/// reads acks routed by ticket. Holds only the window's registry, not the window.
#[derive(Clone, Debug)]
pub struct AckSettler {
    expected: Arc<Expected>,
}

impl AckSettler {
    /// Settles the publish of `ticket` with what `ack` makes of its event id and topic (called once, and only
    /// when the publish is still pending). Does nothing once it timed out, was settled, or close() gave up.
    pub fn settle(&self, ticket: AckTicket, ack: impl FnOnce(EventId, &str) -> Result<PublishAck>) {
        self.expected.settle(ticket, ack);
    }

    /// Withdraws the publish of `ticket`, which the client refused before sending: its slot is freed and
    /// nothing is counted or reported, since `publish` returns the refusal itself.
    pub fn withdraw(&self, ticket: AckTicket) {
        self.expected.withdraw(ticket);
    }
}

impl Drop for AckCallback {
    fn drop(&mut self) {
        if self.armed {
            self.expected.settle(self.ticket, |_, _| Err(Error::ClosedBeforeAck));
        }
    }
}

/// A publish awaiting its ack until its deadline, as the collector drives it. It keeps its [`Pending`] so
/// the collector needs no lookup to settle it, and gives it up when the collector gives up or the deadline
/// passes.
struct Settling {
    pending: Option<Pending>,
    deadline: Instant,
    /// `None` once timed out: the ack future is dropped at once, and the entry waits to be swept out.
    ack: Option<AckFuture>,
}

impl Future for Settling {
    type Output = (Option<Pending>, Result<PublishAck>);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(ack) = self.ack.as_mut() else {
            // Timed out (and settled) by the collector's sweep; polled only if woken just before it.
            return Poll::Ready((None, Err(Error::ClosedBeforeAck)));
        };
        let result = std::task::ready!(ack.as_mut().poll(cx));
        Poll::Ready((self.pending.take(), result))
    }
}

/// The in-flight window of one bus. Backends call [`reserve`](Self::reserve), send, then
/// [`submit`](Self::submit) the ack future; or, for a client that reports acks through a callback,
/// [`reserve`](Self::reserve), [`expect_ack`](Self::expect_ack), then send.
#[derive(Debug)]
pub struct PublishWindow {
    slots: Arc<Semaphore>,
    size: usize,
    enqueue_timeout: Duration,
    ack_timeout: Duration,
    closed: AtomicBool,
    /// Publishes in flight when close began (the semaphore cannot tell once close holds the free slots).
    pending_at_close: AtomicU64,
    pending: mpsc::UnboundedSender<Settling>,
    results: Option<mpsc::Sender<PublishResult>>,
    results_receiver: std::sync::Mutex<Option<PublishResults>>,
    give_up: CancellationToken,
    /// Tells the publish-result stream that no report will follow.
    finished: CancellationToken,
    collector: tokio::sync::Mutex<Option<JoinHandle<Vec<EventId>>>>,
    /// Publishes whose acks arrive through an [`AckCallback`].
    expected: Arc<Expected>,
    counters: Arc<Counters>,
}

impl PublishWindow {
    /// Starts the window and its collector task on the current tokio runtime.
    pub fn new(config: &PublishConfig, counters: Arc<Counters>) -> Self {
        let (pending, receiver) = mpsc::unbounded_channel();
        let finished = CancellationToken::new();
        let (results, results_receiver) = if config.report_results {
            let (tx, rx) = mpsc::channel(config.window);
            let stream = PublishResults { receiver: rx, finished: finished.clone() };
            (Some(tx), Some(stream))
        } else {
            (None, None)
        };
        let give_up = CancellationToken::new();
        let expected = Expected {
            acks: Mutex::default(),
            counters: counters.clone(),
            reporter: results.as_ref().map(|_| pending.clone()),
        };
        let expected = Arc::new(expected);
        let collector = Collector {
            receiver,
            results: results.clone(),
            counters: counters.clone(),
            expected: expected.clone(),
            ack_timeout: config.ack_timeout,
        };
        let collector = tokio::spawn(collector.run(give_up.clone()));
        Self {
            slots: Arc::new(Semaphore::new(config.window)),
            size: config.window,
            enqueue_timeout: config.enqueue_timeout,
            ack_timeout: config.ack_timeout,
            closed: AtomicBool::new(false),
            pending_at_close: AtomicU64::new(0),
            pending,
            results,
            results_receiver: std::sync::Mutex::new(results_receiver),
            give_up,
            finished,
            collector: tokio::sync::Mutex::new(Some(collector)),
            expected,
            counters,
        }
    }

    /// Waits for a free slot, at most `enqueue_timeout`. Fails with [`Error::Backpressure`] when none frees
    /// up in time and with [`Error::Closed`] once the window is closing.
    pub async fn reserve(&self) -> Result<WindowSlot> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => match tokio::time::timeout(self.enqueue_timeout, self.slots.clone().acquire_owned()).await {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => return Err(Error::Closed),
                Err(_) => return Err(Error::Backpressure { window: self.size, waited: self.enqueue_timeout }),
            },
        };
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(WindowSlot { _permit: permit })
    }

    /// Hands over the ack future of a message sent under `slot`, and returns its receipt. The ack is awaited
    /// by the collector, at most `ack_timeout` from now. A future that is already complete (as on the
    /// in-memory backend) settles right here.
    pub async fn submit<F>(
        &self,
        slot: WindowSlot,
        topic: &Arc<str>,
        event_id: EventId,
        aggregate_id: &str,
        ack: F,
    ) -> PublishReceipt
    where
        F: Future<Output = Result<PublishAck>> + Send + 'static,
    {
        let mut ack: AckFuture = ack.boxed();
        if let Some(result) = (&mut ack).now_or_never() {
            return self.settle(slot, topic, event_id, aggregate_id, result).await;
        }
        let deadline = deadline_in(self.ack_timeout);
        let (pending, receiver) = self.new_pending(slot, topic, event_id, aggregate_id);
        match self.pending.send(Settling { pending: Some(pending), deadline, ack: Some(ack) }) {
            Ok(()) => PublishReceipt::pending(event_id, receiver),
            // The collector is gone: close() gave up on pending acks while this one was being sent.
            Err(mpsc::error::SendError(settling)) => {
                self.counters.bump(Counter::PublishFailed);
                drop(settling);
                PublishReceipt::settled(event_id, Err(Error::ClosedBeforeAck))
            }
        }
    }

    /// Registers a publish about to be sent under `slot` whose ack the broker client will report through a
    /// callback, and returns its receipt and the [`AckCallback`] to settle it with. Unsettled `ack_timeout` from
    /// now, it times out like a submitted ack. Fails with [`Error::Closed`] once close() gave up on pending
    /// publishes; nothing should be sent then.
    pub fn expect_ack(
        &self,
        slot: WindowSlot,
        topic: &Arc<str>,
        event_id: EventId,
        aggregate_id: &str,
    ) -> Result<(PublishReceipt, AckCallback)> {
        let (receipt, ticket) = self.expect_ack_ticket(slot, topic, event_id, aggregate_id)?;
        Ok((receipt, AckCallback { ticket, event_id, expected: self.expected.clone(), armed: true }))
    }

    /// Registers a publish like [`expect_ack`](Self::expect_ack), for a client that hands every ack back with
    /// the publish's ticket, to an [`AckSettler`]: returns its receipt and ticket. Nothing settles it when the
    /// ticket is lost: it then times out at its deadline.
    pub fn expect_ack_ticket(
        &self,
        slot: WindowSlot,
        topic: &Arc<str>,
        event_id: EventId,
        aggregate_id: &str,
    ) -> Result<(PublishReceipt, AckTicket)> {
        let (pending, receiver) = self.new_pending(slot, topic, event_id, aggregate_id);
        let deadline = deadline_in(self.ack_timeout);
        let mut acks = self.expected.acks();
        if acks.given_up {
            return Err(Error::Closed);
        }
        acks.registrations = if acks.registrations >= REGISTRATION_LIMIT { 1 } else { acks.registrations + 1 };
        let registration = acks.registrations;
        let key = acks.pending.insert(Registered { pending, deadline, registration });
        drop(acks);
        Ok((PublishReceipt::pending(event_id, receiver), AckTicket { key, registration }))
    }

    /// A handle that settles registered publishes by ticket.
    pub fn ack_settler(&self) -> AckSettler {
        AckSettler { expected: self.expected.clone() }
    }

    /// A publish's pending state, holding its slot, and the receiver its receipt waits on.
    fn new_pending(
        &self,
        slot: WindowSlot,
        topic: &Arc<str>,
        event_id: EventId,
        aggregate_id: &str,
    ) -> (Pending, oneshot::Receiver<Result<PublishAck>>) {
        let aggregate_id = self.results.as_ref().map(|_| aggregate_id.to_owned());
        let (reply, receiver) = oneshot::channel();
        (Pending { event_id, topic: topic.clone(), aggregate_id, reply, _slot: slot }, receiver)
    }

    /// Settles, under `slot`, a publish whose outcome is already known (the message was stored, or refused,
    /// as it was sent), and returns its receipt, ready at once. The collector is not involved.
    pub async fn settle(
        &self,
        slot: WindowSlot,
        topic: &Arc<str>,
        event_id: EventId,
        aggregate_id: &str,
        result: Result<PublishAck>,
    ) -> PublishReceipt {
        let receipt = self.settle_stored(topic, event_id, aggregate_id, result).await;
        drop(slot);
        receipt
    }

    /// Settles a publish that was stored, or refused, as it was sent without ever taking a slot: a backend that
    /// stores synchronously (the in-memory one) has nothing in flight to bound. Counted and reported like any
    /// other, and its receipt is ready at once.
    pub async fn settle_stored(
        &self,
        topic: &Arc<str>,
        event_id: EventId,
        aggregate_id: &str,
        result: Result<PublishAck>,
    ) -> PublishReceipt {
        record(&self.counters, &result);
        if let Some(results) = &self.results {
            // A reader that stopped reading must not hold publishers past close().
            report(results, &self.give_up, event_id, topic, aggregate_id.to_owned(), &result).await;
        }
        PublishReceipt::settled(event_id, result)
    }

    /// Publishes awaiting an ack right now.
    pub fn in_flight(&self) -> u64 {
        if self.closed.load(Ordering::Acquire) {
            // close() holds every free slot while it waits; what is in flight then is what it waits for.
            return self.pending_at_close.load(Ordering::Relaxed);
        }
        (self.size - self.slots.available_permits()) as u64
    }

    /// Takes the publish-result stream (once), when `report_results` is on.
    pub fn take_results(&self) -> Option<PublishResults> {
        self.results_receiver.lock().ok()?.take()
    }

    /// Refuses new publishes, then waits until `deadline` for every pending ack. Acks still pending then are
    /// settled with [`Error::ClosedBeforeAck`] and their ids returned. Idempotent.
    ///
    /// A publish that was between [`reserve`](Self::reserve) and [`submit`](Self::submit) when the deadline
    /// passed settles with [`Error::ClosedBeforeAck`] too, but is not in the returned list; one not yet
    /// registered with [`expect_ack`](Self::expect_ack) is refused there with [`Error::Closed`]. An ack that
    /// has arrived by the time the collector stops settles with the broker's answer, not as abandoned. Cancel-safe: if the
    /// returned future is dropped, a later call picks up where it stopped.
    pub async fn close(&self, deadline: Instant) -> Vec<EventId> {
        if !self.closed.load(Ordering::Acquire) {
            self.pending_at_close.store(self.in_flight(), Ordering::Relaxed);
        }
        self.closed.store(true, Ordering::Release);
        let mut collector = self.collector.lock().await;
        let Some(handle) = collector.as_mut() else {
            return Vec::new();
        };
        // Every slot back means every accepted publish has settled.
        let size = u32::try_from(self.size).unwrap_or(u32::MAX);
        let all_settled = tokio::time::timeout_at(deadline, self.slots.acquire_many(size)).await;
        if let Ok(Ok(permits)) = all_settled {
            permits.forget();
        }
        // Callbacks that have not come by now find nothing to settle; one that came just before handed its
        // outcome to the collector, which settles it before it stops.
        let unanswered = self.expected.give_up();
        self.give_up.cancel();
        self.slots.close();
        // Awaited in place: a close() dropped here leaves the handle for the next call to await.
        let mut abandoned = handle.await.unwrap_or_default();
        *collector = None;
        for pending in unanswered {
            abandoned.push(pending.event_id);
            settle_pending(&self.counters, self.results.as_ref(), &self.give_up, pending, Err(Error::ClosedBeforeAck))
                .await;
        }
        self.pending_at_close.store(0, Ordering::Relaxed);
        self.finished.cancel();
        abandoned
    }
}

impl Drop for PublishWindow {
    fn drop(&mut self) {
        self.give_up.cancel();
        self.finished.cancel();
        // Their receipts resolve as closed-before-ack; a late callback finds nothing to settle.
        drop(self.expected.give_up());
        if let Ok(mut collector) = self.collector.try_lock() {
            if let Some(handle) = collector.take() {
                handle.abort();
            }
        }
    }
}

struct Collector {
    receiver: mpsc::UnboundedReceiver<Settling>,
    results: Option<mpsc::Sender<PublishResult>>,
    counters: Arc<Counters>,
    expected: Arc<Expected>,
    ack_timeout: Duration,
}

impl Collector {
    /// Drives every pending ack until told to give up; returns the ids it gave up on.
    async fn run(mut self, give_up: CancellationToken) -> Vec<EventId> {
        let mut acks: FuturesUnordered<Settling> = FuturesUnordered::new();
        let stopped = give_up.cancelled();
        tokio::pin!(stopped);
        // The earliest deadline of a pending ack, once one is pending.
        let expiry = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(expiry);
        let mut earliest: Option<Instant> = None;
        // Timed-out entries still in `acks`: swept out once they are half of it, so a long outage neither grows
        // the set nor rebuilds it on every expiry.
        let mut timed_out = 0;
        // The earliest deadline of the acks expected through callbacks. With none pending it is re-armed
        // `ack_timeout` ahead: whatever is registered meanwhile expires later than that, so no deadline is missed
        // and registering needs no wake-up.
        let callback_expiry = tokio::time::sleep(self.ack_timeout);
        tokio::pin!(callback_expiry);
        loop {
            tokio::select! {
                biased;
                _ = &mut stopped => break,
                // Before the acks: an ack past its deadline times out even while others keep arriving.
                _ = &mut expiry, if earliest.is_some() => {
                    let (expired, next) = self.expire(&mut acks, &give_up).await;
                    timed_out += expired;
                    if timed_out * 2 > acks.len() {
                        acks = std::mem::take(&mut acks).into_iter().filter(|s| s.ack.is_some()).collect();
                        timed_out = 0;
                    }
                    earliest = next;
                    if let Some(at) = earliest {
                        expiry.as_mut().reset(at);
                    }
                }
                _ = &mut callback_expiry => {
                    let (expired, next) = self.expected.expire(Instant::now());
                    // Taken now: what is registered while the reports below wait expires after it.
                    callback_expiry.as_mut().reset(next.unwrap_or_else(|| deadline_in(self.ack_timeout)));
                    for pending in expired {
                        self.settle(pending, Err(Error::AckTimeout(self.ack_timeout)), &give_up).await;
                    }
                }
                Some(settling) = self.receiver.recv() => {
                    if earliest.is_none_or(|at| settling.deadline < at) {
                        earliest = Some(settling.deadline);
                        expiry.as_mut().reset(settling.deadline);
                    }
                    acks.push(settling);
                }
                Some((Some(pending), result)) = acks.next(), if !acks.is_empty() => {
                    self.settle(pending, result, &give_up).await;
                }
            }
        }
        // Giving up: refuse late submissions. What has its answer already (an ack that came with the last ones, a
        // callback's outcome waiting to be reported) settles with it; the rest as closed-before-ack.
        self.receiver.close();
        let mut left: Vec<Settling> = acks.into_iter().collect();
        while let Some(settling) = self.receiver.recv().await {
            left.push(settling);
        }
        let mut abandoned = Vec::new();
        for mut settling in left {
            let Some(pending) = settling.pending.take() else {
                continue;
            };
            match settling.ack.as_mut().and_then(|ack| ack.now_or_never()) {
                Some(result) => self.settle(pending, result, &give_up).await,
                None => abandoned.push(pending),
            }
        }
        let ids = abandoned.iter().map(|p| p.event_id).collect();
        for pending in abandoned {
            self.settle(pending, Err(Error::ClosedBeforeAck), &give_up).await;
        }
        ids
    }

    /// Settles every ack whose deadline has passed as timed out (or with its answer, should it have come while
    /// it waited), dropping its future. Returns how many it settled and the earliest deadline left.
    async fn expire(
        &self,
        acks: &mut FuturesUnordered<Settling>,
        give_up: &CancellationToken,
    ) -> (usize, Option<Instant>) {
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut earliest: Option<Instant> = None;
        for settling in acks.iter_mut() {
            if settling.ack.is_none() {
                continue;
            }
            if settling.deadline <= now {
                // An answer that came in while the reports waited is no timeout.
                let result = settling.ack.as_mut().and_then(|ack| ack.now_or_never());
                settling.ack = None;
                expired.extend(settling.pending.take().map(|pending| (pending, result)));
            } else if earliest.is_none_or(|at| settling.deadline < at) {
                earliest = Some(settling.deadline);
            }
        }
        let count = expired.len();
        for (pending, answer) in expired {
            let result = answer.unwrap_or(Err(Error::AckTimeout(self.ack_timeout)));
            self.settle(pending, result, give_up).await;
        }
        (count, earliest)
    }

    async fn settle(&self, pending: Pending, result: Result<PublishAck>, give_up: &CancellationToken) {
        settle_pending(&self.counters, self.results.as_ref(), give_up, pending, result).await;
    }
}

/// Counts and reports the outcome of a pending publish, then resolves its receipt and frees its slot.
async fn settle_pending(
    counters: &Counters,
    results: Option<&mpsc::Sender<PublishResult>>,
    give_up: &CancellationToken,
    pending: Pending,
    result: Result<PublishAck>,
) {
    record(counters, &result);
    if let (Some(results), Some(aggregate_id)) = (results, pending.aggregate_id) {
        // A reader that stopped reading must not hold close() past its deadline.
        report(results, give_up, pending.event_id, &pending.topic, aggregate_id, &result).await;
    }
    let _ = pending.reply.send(result);
}

/// The deadline `timeout` from now; a timeout too large to add is as good as none (tokio's own far future is
/// 30 years).
fn deadline_in(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout).unwrap_or_else(|| now + Duration::from_secs(86_400 * 365 * 30))
}

fn record(counters: &Counters, result: &Result<PublishAck>) {
    match result {
        Ok(_) => counters.bump(Counter::Published),
        Err(_) => counters.bump(Counter::PublishFailed),
    }
}

/// Sends one outcome to the publish-result stream, unless `give_up` fires first. Boxed: the send's state is
/// large, and only buses that report results should carry it in every publish future (10,000 publishers
/// waiting at once hold 10,000 of them).
fn report<'a>(
    results: &'a mpsc::Sender<PublishResult>,
    give_up: &'a CancellationToken,
    event_id: EventId,
    topic: &str,
    aggregate_id: String,
    outcome: &Result<PublishAck>,
) -> BoxFuture<'a, ()> {
    let result = PublishResult { event_id, topic: topic.to_owned(), aggregate_id, outcome: outcome.clone() };
    Box::pin(async move {
        tokio::select! {
            // A closed receiver means nobody reads the stream any more; the receipt still carries the outcome.
            _ = results.send(result) => {}
            _ = give_up.cancelled() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(size: usize, ack_timeout: Duration) -> PublishWindow {
        let config = PublishConfig { window: size, ack_timeout, ..PublishConfig::default() };
        PublishWindow::new(&config, Arc::default())
    }

    async fn submit_pending(window: &PublishWindow, ack: oneshot::Receiver<()>) -> PublishReceipt {
        let slot = window.reserve().await.expect("a free slot");
        let topic: Arc<str> = "orders".into();
        let event_id = EventId::new();
        let ack = async move {
            ack.await.map_err(|_| Error::ClosedBeforeAck)?;
            Ok(PublishAck::new(event_id, "orders"))
        };
        window.submit(slot, &topic, event_id, "order-1", ack).await
    }

    #[test]
    fn a_packed_ticket_unpacks_whole_and_leaves_the_top_bit_clear() {
        let largest = AckTicket { key: crate::config::MAX_WINDOW - 1, registration: REGISTRATION_LIMIT };
        for ticket in [AckTicket { key: 0, registration: 1 }, largest] {
            let packed = ticket.pack();
            assert_eq!(AckTicket::unpack(packed), ticket);
            assert_eq!(packed >> (usize::BITS - 1), 0, "{ticket}");
        }
    }

    #[tokio::test]
    async fn a_ticket_settles_its_publish_once_and_a_withdrawn_one_frees_its_slot() {
        let window = window(1, Duration::from_secs(10));
        let settler = window.ack_settler();
        let topic: Arc<str> = "orders".into();
        let event_id = EventId::new();
        let slot = window.reserve().await.expect("a free slot");
        let (receipt, ticket) = window.expect_ack_ticket(slot, &topic, event_id, "order-1").expect("registered");
        settler.settle(ticket, |id, topic| Ok(PublishAck::new(id, topic).with_sequence(7)));
        // A second report for the same ticket finds nothing to settle.
        settler.settle(ticket, |_, _| Err(Error::ClosedBeforeAck));
        let ack = receipt.await.expect("acked");
        assert_eq!((ack.event_id, ack.topic.as_str(), ack.sequence), (event_id, "orders", Some(7)));
        let slot = window.reserve().await.expect("the settled publish freed its slot");
        let (refused, ticket) = window.expect_ack_ticket(slot, &topic, EventId::new(), "order-1").expect("registered");
        settler.withdraw(ticket);
        drop(refused);
        assert_eq!(window.in_flight(), 0);
        window.reserve().await.expect("the withdrawn publish freed its slot");
    }

    #[tokio::test]
    async fn a_receipt_gives_its_outcome_without_waiting_once_settled() {
        let window = window(1, Duration::from_secs(10));
        let topic: Arc<str> = "orders".into();
        let event_id = EventId::new();
        let slot = window.reserve().await.expect("a free slot");
        let (mut receipt, ticket) = window.expect_ack_ticket(slot, &topic, event_id, "order-1").expect("registered");
        assert!(receipt.try_result().is_none(), "in flight");
        window.ack_settler().settle(ticket, |id, topic| Ok(PublishAck::new(id, topic)));
        let ack = receipt.try_result().expect("settled").expect("acked");
        assert_eq!(ack.event_id, event_id);
        // Taken once: the receipt has nothing more to give.
        assert!(receipt.try_result().is_none());
        assert!(matches!(receipt.await, Err(Error::Closed)));
    }

    #[tokio::test(start_paused = true)]
    async fn acks_time_out_at_their_own_deadlines_and_free_their_slots() {
        let window = window(4, Duration::from_secs(10));
        let started = Instant::now();
        let (too_late, never) = oneshot::channel();
        let first = submit_pending(&window, never).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        let (answer, answered) = oneshot::channel();
        let second = submit_pending(&window, answered).await;
        let (_never, never) = oneshot::channel();
        let third = submit_pending(&window, never).await;

        assert!(matches!(first.await, Err(Error::AckTimeout(_))));
        assert_eq!(started.elapsed(), Duration::from_secs(10), "the first ack times out at its deadline");
        assert!(too_late.send(()).is_err(), "a timed-out ack's future is dropped, not left running");
        answer.send(()).expect("the collector still drives the second ack");
        assert!(second.await.is_ok(), "an ack that arrives in time is not timed out by the sweep");
        assert!(matches!(third.await, Err(Error::AckTimeout(_))));
        assert_eq!(started.elapsed(), Duration::from_secs(14), "the timer is re-armed for the next deadline");
        assert_eq!(window.in_flight(), 0, "timed-out publishes give their slots back");

        // After a quiet spell with nothing pending, a new ack still gets its deadline.
        tokio::time::sleep(Duration::from_secs(30)).await;
        let (_never, never) = oneshot::channel();
        let later = submit_pending(&window, never).await;
        let submitted = Instant::now();
        assert!(matches!(later.await, Err(Error::AckTimeout(_))));
        assert_eq!(submitted.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn an_ack_that_arrived_before_close_gave_up_settles_with_its_answer() {
        let window = window(4, Duration::from_secs(60));
        let (answer, answered) = oneshot::channel();
        let receipt = submit_pending(&window, answered).await;
        let (_never, never) = oneshot::channel();
        let unanswered = submit_pending(&window, never).await;
        // Answered, but the collector has not run since: close() finds it pending past its deadline.
        answer.send(()).expect("the collector holds the ack");
        let abandoned = window.close(Instant::now()).await;
        assert!(receipt.await.is_ok(), "an ack already answered is not abandoned");
        assert!(matches!(unanswered.await, Err(Error::ClosedBeforeAck)));
        assert_eq!(abandoned.len(), 1);
    }

    async fn expect(window: &PublishWindow, aggregate_id: &str) -> (PublishReceipt, AckCallback) {
        let slot = window.reserve().await.expect("a free slot");
        window.expect_ack(slot, &"orders".into(), EventId::new(), aggregate_id).expect("the window is open")
    }

    fn ack_for(callback: &AckCallback) -> Result<PublishAck> {
        Ok(PublishAck::new(callback.event_id(), "orders"))
    }

    #[tokio::test]
    async fn a_callback_settles_its_receipt_frees_its_slot_and_reports_the_outcome() {
        let config = PublishConfig { window: 2, report_results: true, ..PublishConfig::default() };
        let counters = Arc::new(Counters::default());
        let window = PublishWindow::new(&config, counters.clone());
        let mut results = window.take_results().expect("results are reported");
        let (stored, stored_callback) = expect(&window, "order-1").await;
        let (refused, refused_callback) = expect(&window, "order-2").await;
        assert_eq!(window.in_flight(), 2);

        // Settled from a thread of the broker client's own, as librdkafka's delivery reports are.
        let stored_ack = ack_for(&stored_callback);
        std::thread::spawn(move || {
            stored_callback.settle(stored_ack);
            refused_callback.settle(Err(Error::Broker { message: "refused".into(), source: None }));
        })
        .join()
        .expect("the callbacks do not panic");

        assert_eq!(stored.await.expect("stored").topic, "orders");
        assert!(matches!(refused.await, Err(Error::Broker { .. })));
        let reporting = async { [results.recv().await.expect("a result"), results.recv().await.expect("a result")] };
        let reported = tokio::time::timeout(Duration::from_secs(5), reporting).await.expect("reported in time");
        let mut aggregates: Vec<&str> = reported.iter().map(|r| r.aggregate_id.as_str()).collect();
        aggregates.sort_unstable();
        assert_eq!(aggregates, ["order-1", "order-2"]);
        assert_eq!(window.in_flight(), 0, "settling frees the slots");
        let metrics = counters.snapshot(0, 0);
        assert_eq!((metrics.published, metrics.publish_failed), (1, 1));
    }

    #[tokio::test]
    async fn without_the_result_stream_a_callback_frees_its_slot_on_its_own_thread() {
        let counters = Arc::new(Counters::default());
        let window = PublishWindow::new(&PublishConfig { window: 1, ..PublishConfig::default() }, counters.clone());
        let (receipt, callback) = expect(&window, "order-1").await;
        let (event_id, ack) = (callback.event_id(), ack_for(&callback));
        std::thread::spawn(move || callback.settle(ack)).join().expect("the callback does not panic");
        // No await since the callback: no task took part in settling.
        assert_eq!(window.in_flight(), 0);
        assert_eq!(receipt.now_or_never().expect("resolved").expect("acked").event_id, event_id);
        assert_eq!(counters.snapshot(0, 0).published, 1);
    }

    #[tokio::test]
    async fn a_ticket_settles_its_own_publish_once() {
        let window = window(4, Duration::from_secs(60));
        let settler = window.ack_settler();
        let (receipt, callback) = expect(&window, "order-1").await;
        let ticket: AckTicket = callback.ticket().to_string().parse().expect("a ticket reads back");
        assert_eq!(ticket, callback.ticket());
        let event_id = callback.event_id();
        callback.detach();
        assert_eq!(window.in_flight(), 1, "a detached callback settles nothing");
        settler.settle(ticket, |id, topic| Ok(PublishAck::new(id, topic).with_sequence(7)));
        let ack = receipt.await.expect("acked");
        assert_eq!((ack.event_id, ack.topic.as_str(), ack.sequence), (event_id, "orders", Some(7)));
        // Settled once: the same ticket again, even with the key reused, settles nothing.
        let (next, next_callback) = expect(&window, "order-2").await;
        settler.settle(ticket, |_, _| panic!("a settled ticket is not asked for its ack"));
        assert_eq!(window.in_flight(), 1);
        drop(next_callback);
        assert!(matches!(next.await, Err(Error::ClosedBeforeAck)));
        assert!("7".parse::<AckTicket>().is_err() && "a.1".parse::<AckTicket>().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn an_unsettled_callback_times_out_at_its_deadline() {
        let window = window(4, Duration::from_secs(10));
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (receipt, callback) = expect(&window, "order-1").await;
        assert!(matches!(receipt.await, Err(Error::AckTimeout(_))));
        assert_eq!(started.elapsed(), Duration::from_secs(13), "timed out at its own deadline, not a tick's");
        assert_eq!(window.in_flight(), 0);
        // The broker's late answer finds nothing left to settle, not even the publish registered since under
        // the same slab key.
        let (next, next_callback) = expect(&window, "order-2").await;
        let late = ack_for(&callback);
        callback.settle(late);
        assert_eq!(window.in_flight(), 1, "the late answer settled another publish");
        let (next_id, next_ack) = (next_callback.event_id(), ack_for(&next_callback));
        next_callback.settle(next_ack);
        assert_eq!(next.await.expect("acked").event_id, next_id);
        assert_eq!(window.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn close_gives_up_on_unsettled_callbacks_and_refuses_new_ones() {
        let window = window(4, Duration::from_secs(60));
        let (receipt, callback) = expect(&window, "order-1").await;
        let (dropped, dropped_callback) = expect(&window, "order-2").await;
        let (withdrawn, withdrawn_callback) = expect(&window, "order-3").await;
        drop(dropped_callback);
        assert!(matches!(dropped.await, Err(Error::ClosedBeforeAck)), "a dropped callback settles its publish");
        withdrawn_callback.withdraw();
        assert!(matches!(withdrawn.await, Err(Error::ClosedBeforeAck)));
        assert_eq!(window.in_flight(), 1, "dropping and withdrawing free their slots");
        let metrics = window.counters.snapshot(0, 0);
        assert_eq!(metrics.publish_failed, 1, "the dropped callback counts as failed, the withdrawn one not");

        let abandoned = window.close(Instant::now() + Duration::from_secs(1)).await;
        assert_eq!(abandoned, [callback.event_id()]);
        assert!(matches!(receipt.await, Err(Error::ClosedBeforeAck)));
        let late = ack_for(&callback);
        callback.settle(late);
        assert_eq!(window.counters.snapshot(0, 0).publish_failed, 2, "a callback after close settles nothing");
        let slot = WindowSlot { _permit: Arc::new(Semaphore::new(1)).try_acquire_owned().expect("a permit") };
        let refused = window.expect_ack(slot, &"orders".into(), EventId::new(), "order-4");
        assert!(matches!(refused, Err(Error::Closed)));
    }
}
