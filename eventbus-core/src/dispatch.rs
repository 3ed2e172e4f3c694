//! The keyed dispatcher: strict order per aggregate, parallelism across aggregates, bounded memory.
//!
//! Deliveries are queued per key (the aggregate id). A key is handed to at most one worker at a time, so the
//! events of one aggregate are handled one after the other in arrival order, while workers take other keys in
//! parallel. A failing event is retried in place: its key stays with its worker through the backoff, so later
//! events of that aggregate wait and every other aggregate goes on. The number of queued deliveries is bounded
//! by a semaphore that the source waits on, which pushes back to the broker instead of buffering without end.
//!
//! The worker count is fixed by configuration; no task is spawned per message.

use std::any::Any;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::FutureExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::bus::Handler;
use crate::config::RetryPolicy;
use crate::deadline::lazy_timeout;
use crate::envelope::wire::{self, DecodeError, WireMessage};
use crate::envelope::Envelope;
use crate::metrics::{Counter, Counters};
use crate::Result;

/// One message handed to the dispatcher by a backend's source.
pub struct Delivery {
    /// The decoded event, or the raw message and why it could not be decoded.
    pub message: Message,
    /// Acknowledges the message to the broker once it is handled or dead-lettered.
    pub acker: Box<dyn Acker>,
}

/// What a delivery carries.
///
/// Two words either way: deliveries move through queues and workers by value, and the rare undecodable
/// message is boxed so it does not size all of them.
#[derive(Debug)]
pub enum Message {
    /// A decoded event.
    Event(Arc<Envelope>),
    /// A message that could not be decoded: it is dead-lettered as it is.
    Undecodable(Box<Undecodable>),
}

/// A message that could not be decoded, kept whole for the dead-letter topic.
#[derive(Debug)]
pub struct Undecodable {
    /// The raw message.
    pub wire: WireMessage,
    /// Why decoding failed.
    pub error: DecodeError,
}

impl Message {
    /// A message that could not be decoded, for `error`.
    pub fn undecodable(wire: WireMessage, error: DecodeError) -> Self {
        Message::Undecodable(Box::new(Undecodable { wire, error }))
    }

    fn key(&self) -> Key {
        match self {
            Message::Event(envelope) => Key(Some(envelope.clone())),
            // Undecodable messages have no trustworthy aggregate; they share one key of their own.
            Message::Undecodable(_) => Key(None),
        }
    }
}

/// A delivery's aggregate id as the dispatcher's key. It shares the envelope the id belongs to instead of
/// copying the id: a key is made for nearly every delivery. Hashes and compares as the id (`""` for
/// undecodable messages), so queues can be looked up by `&str`.
#[derive(Clone)]
struct Key(Option<Arc<Envelope>>);

impl Key {
    fn as_str(&self) -> &str {
        self.0.as_deref().map_or("", |envelope| envelope.aggregate_id.as_str())
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Key {}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The same as `str`'s, which `Borrow<str>` requires.
        self.as_str().hash(state);
    }
}

impl std::borrow::Borrow<str> for Key {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

/// Acknowledges one message to its broker.
#[async_trait]
pub trait Acker: Send + Sync + 'static {
    /// Tells the broker the message was handled. An error is logged; the broker will deliver it again.
    async fn ack(self: Box<Self>) -> Result<()>;

    /// Acks right here, for a backend whose ack needs no waiting (one that records handled offsets in
    /// process): `Some` with the outcome once acked, after which the acker is only dropped. `None` (the
    /// default) leaves the ack to [`ack`](Self::ack); workers try this first on every handled message, sparing it
    /// a boxed future.
    fn ack_now(&mut self) -> Option<Result<()>> {
        None
    }

    /// Tells the broker the message was dead-lettered and must never be delivered again. Defaults to
    /// [`ack`](Self::ack).
    async fn terminate(self: Box<Self>) -> Result<()> {
        self.ack().await
    }

    /// Hands the message back unhandled (its subscription closed before handling it), so the broker can
    /// deliver it to another member at once. Defaults to nothing: the broker redelivers it in its own time.
    async fn release(self: Box<Self>) {}

    /// Whether this consumer still owns the message. A message whose partition was handed to another member
    /// of the group (a rebalance) is skipped without being handled or acked: the new owner handles it.
    /// Defaults to `true`.
    fn is_current(&self) -> bool {
        true
    }

    /// How often to tell the broker, while the message is handled or waits for a retry, that it is still being
    /// worked on ([`in_progress`](Self::in_progress)). `None` (the default) for brokers without a redelivery
    /// timer.
    fn progress_interval(&self) -> Option<Duration> {
        None
    }

    /// Tells the broker the message is still being worked on, so its redelivery timer starts again.
    async fn in_progress(&self) {}

    /// The same notice, detached from the acker, for a delivery still waiting in its queue: a queue longer than
    /// the broker's redelivery timer would otherwise see its tail delivered again. `None` (the default) for
    /// brokers without a redelivery timer.
    fn queued_progress(&self) -> Option<futures_util::future::BoxFuture<'static, ()>> {
        None
    }
}

/// The acker of backends where taking a message from the source already settles it (the in-memory backend).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoAck;

#[async_trait]
impl Acker for NoAck {
    async fn ack(self: Box<Self>) -> Result<()> {
        Ok(())
    }
}

/// Where dead-lettered messages are sent; a backend publishes them to its broker.
#[async_trait]
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Publishes `message` to `topic` and waits for the broker's ack.
    async fn dead_letter(&self, topic: &str, message: WireMessage) -> Result<()>;
}

/// How the workers of one subscription treat each delivery.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    /// Number of worker tasks.
    pub concurrency: usize,
    /// Deadline of one handler call.
    pub handler_timeout: Duration,
    /// Retries before dead-lettering.
    pub retry: RetryPolicy,
    /// Dead-letter topic; `None` when dead-lettering is off (the message is then logged and acked).
    pub dead_letter_topic: Option<String>,
}

/// Room for one delivery in a [`Dispatcher`], from [`Dispatcher::reserve`].
#[derive(Debug)]
pub struct DispatchSlot(OwnedSemaphorePermit);

impl WorkerSettings {
    /// The settings of a subscription to `topic`: `options` where set, the bus's `config` otherwise.
    pub fn resolve(config: &crate::BusConfig, options: &crate::SubscribeOptions, topic: &str) -> Self {
        Self {
            concurrency: options.concurrency.unwrap_or(config.subscribe.concurrency).max(1),
            handler_timeout: options.handler_timeout.unwrap_or(config.subscribe.handler_timeout),
            retry: options.retry.clone().unwrap_or_else(|| config.retry.clone()),
            dead_letter_topic: config.dead_letter.enabled.then(|| config.dead_letter.topic_for(topic)),
        }
    }
}

/// A keyed dispatcher for one topic and consumer group.
#[derive(Clone)]
pub struct Dispatcher {
    shared: Arc<Shared>,
}

struct Shared {
    topic: String,
    state: Mutex<State>,
    /// Wakes a waiting worker when a key becomes ready.
    work: Notify,
    capacity: Arc<Semaphore>,
    counters: Arc<Counters>,
    dead_letters: Arc<dyn DeadLetterSink>,
}

/// The queues and their schedule, under one lock: a worker settles its key and takes the next in one turn.
#[derive(Default)]
struct State {
    /// Keyed by aggregate id; foldhash because it is hashed on every delivery and stays seeded per process.
    /// A key has a queue exactly while it is scheduled: in `ready` or held by a worker.
    queues: HashMap<Key, VecDeque<Queued>, foldhash::fast::RandomState>,
    /// Keys with deliveries waiting and no worker, in the order they became ready.
    ready: VecDeque<Key>,
    /// Workers waiting for a ready key; a key made ready wakes one only when some wait.
    idle: usize,
    /// Emptied queues, kept for keys that become ready later: most keys have one delivery queued at a time, so
    /// reusing a queue saves an allocation and a free per delivery.
    spare: Vec<VecDeque<Queued>>,
}

/// Most emptied queues [`State::spare`] keeps.
const SPARE_QUEUES: usize = 64;
/// Largest capacity of a queue [`State::spare`] keeps: one grown by a backlog goes back to the allocator.
const SPARE_CAPACITY: usize = 8;

impl State {
    /// Takes the next ready key and its first delivery.
    fn take(&mut self) -> Option<(Key, Queued)> {
        while let Some(key) = self.ready.pop_front() {
            if let Some(item) = self.queues.get_mut(key.as_str()).and_then(VecDeque::pop_front) {
                return Some((key, item));
            }
            // A key in line always has deliveries waiting; one without ends its turn here, so that its next
            // delivery schedules it again.
            self.retire(&key);
        }
        None
    }

    /// Removes the queue of `key`, keeping it for another key if it is empty and small.
    fn retire(&mut self, key: &Key) {
        if let Some(queue) = self.queues.remove(key.as_str()) {
            if queue.is_empty() && queue.capacity() <= SPARE_CAPACITY && self.spare.len() < SPARE_QUEUES {
                self.spare.push(queue);
            }
        }
    }

    /// Ends a worker's turn with `key`: to the back of the line if deliveries remain (keys take turns with
    /// each other), otherwise its queue is removed.
    fn release(&mut self, key: &Key) {
        match self.queues.get(key.as_str()) {
            Some(queue) if !queue.is_empty() => self.ready.push_back(key.clone()),
            _ => self.retire(key),
        }
    }

    /// Whether a waiting worker should be woken: a key is ready and some worker waits.
    fn wake_one(&self) -> bool {
        !self.ready.is_empty() && self.idle > 0
    }
}

struct Queued {
    delivery: Delivery,
    attempts: u32,
    _permit: OwnedSemaphorePermit,
}

impl Dispatcher {
    /// A dispatcher for `topic` holding at most `capacity` deliveries that are not yet acked.
    pub fn new(
        topic: impl Into<String>,
        capacity: usize,
        counters: Arc<Counters>,
        dead_letters: Arc<dyn DeadLetterSink>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                topic: topic.into(),
                state: Mutex::default(),
                work: Notify::new(),
                capacity: Arc::new(Semaphore::new(capacity.max(1))),
                counters,
                dead_letters,
            }),
        }
    }

    /// Queues a delivery behind earlier ones of its key, waiting while the dispatcher is full. Cancel-safe:
    /// if the returned future is dropped before it completes, nothing was queued.
    pub async fn dispatch(&self, delivery: Delivery) {
        let slot = self.reserve().await;
        self.push(slot, delivery);
    }

    /// Waits for room for one delivery. Reserving before taking a message lets a source that is told to stop
    /// in the meantime hand the message back. Cancel-safe.
    pub async fn reserve(&self) -> DispatchSlot {
        let permit = self.shared.capacity.clone().acquire_owned().await;
        DispatchSlot(permit.expect("the dispatcher never closes its semaphore"))
    }

    /// Room for one delivery if there is some now, without waiting.
    pub fn try_reserve(&self) -> Option<DispatchSlot> {
        self.shared.capacity.clone().try_acquire_owned().ok().map(DispatchSlot)
    }

    /// Queues `delivery` in the room `slot` reserved.
    pub fn push(&self, slot: DispatchSlot, delivery: Delivery) {
        let queued = Queued { delivery, attempts: 0, _permit: slot.0 };
        // Only a key without a queue is made ready, so no two workers ever hold the same key.
        let wake = {
            let mut guard = lock(&self.shared.state);
            let state = &mut *guard;
            // One hash of the key, whether it has a queue or not.
            match state.queues.entry(queued.delivery.message.key()) {
                Entry::Occupied(mut queue) => {
                    queue.get_mut().push_back(queued);
                    false
                }
                Entry::Vacant(vacant) => {
                    let key = vacant.key().clone();
                    let mut queue = state.spare.pop().unwrap_or_default();
                    queue.push_back(queued);
                    vacant.insert(queue);
                    state.ready.push_back(key);
                    state.wake_one()
                }
            }
        };
        if wake {
            self.shared.work.notify_one();
        }
    }

    /// Takes every queued delivery out, in key order, for a closing subscription to hand back to the broker.
    /// Only for a dispatcher whose workers are stopped: a delivery pushed afterwards for a key a worker still
    /// held would give that key a second turn.
    pub fn take_queued(&self) -> Vec<Delivery> {
        let queues = {
            let mut state = lock(&self.shared.state);
            state.ready.clear();
            std::mem::take(&mut state.queues)
        };
        queues.into_values().flatten().map(|queued| queued.delivery).collect()
    }

    /// Progress notices for every queued delivery (a worker sends its own for the one it handles), to be
    /// sent every [`Acker::progress_interval`].
    pub fn queued_progress(&self) -> Vec<futures_util::future::BoxFuture<'static, ()>> {
        let state = lock(&self.shared.state);
        state.queues.values().flatten().filter_map(|queued| queued.delivery.acker.queued_progress()).collect()
    }

    /// Deliveries queued, not counting those a worker is handling.
    pub fn pending(&self) -> usize {
        lock(&self.shared.state).queues.values().map(VecDeque::len).sum()
    }

    /// Spawns `settings.concurrency` workers into `tasks`, calling `handler`. They stop taking work when `stop`
    /// is cancelled; a worker stopped or aborted before it settled its delivery puts it back at the head of its
    /// key's queue and counts it in `abandoned`.
    pub fn spawn_workers(
        &self,
        tasks: &mut JoinSet<()>,
        handler: Arc<dyn Handler>,
        settings: WorkerSettings,
        stop: CancellationToken,
        abandoned: Arc<AtomicUsize>,
    ) {
        let settings = Arc::new(settings);
        for _ in 0..settings.concurrency {
            let worker = Worker {
                shared: self.shared.clone(),
                handler: handler.clone(),
                settings: settings.clone(),
                stop: stop.clone(),
                abandoned: abandoned.clone(),
            };
            tasks.spawn(worker.run());
        }
    }
}

/// Tells the broker at the acker's interval that a delivery is still being worked on, across every handler
/// call and backoff of that delivery.
struct KeepAlive {
    every: Option<Duration>,
    /// Started at the first piece of work that does not finish at once: most handler calls do, and need no
    /// timer.
    ticks: Option<tokio::time::Interval>,
}

impl KeepAlive {
    fn new(acker: &dyn Acker) -> Self {
        Self { every: acker.progress_interval(), ticks: None }
    }

    /// Runs `work`, sending progress notices while it runs.
    async fn run<F: Future>(&mut self, acker: &dyn Acker, work: F) -> F::Output {
        let Some(every) = self.every else {
            return work.await;
        };
        tokio::pin!(work);
        if let Poll::Ready(output) = futures_util::poll!(work.as_mut()) {
            return output;
        }
        let ticks = self.ticks.get_or_insert_with(|| {
            let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        loop {
            tokio::select! {
                biased;
                output = &mut work => return output,
                _ = ticks.tick() => acker.in_progress().await,
            }
        }
    }
}

/// `reason` as a header value: control characters (a multi-line panic message) become spaces, and it is cut
/// to a length every broker accepts.
fn header_safe(reason: &str) -> String {
    const MAX: usize = 1024;
    let mut safe: String = reason.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    if safe.len() > MAX {
        let mut cut = MAX;
        while !safe.is_char_boundary(cut) {
            cut -= 1;
        }
        safe.truncate(cut);
    }
    safe
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a non-text panic payload")
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The queues stay consistent even if a holder panicked: no critical section calls code outside this module
    // (handlers and ackers run without the lock).
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Worker {
    shared: Arc<Shared>,
    handler: Arc<dyn Handler>,
    settings: Arc<WorkerSettings>,
    stop: CancellationToken,
    abandoned: Arc<AtomicUsize>,
}

/// The delivery a worker holds. Until it is settled, dropping the hold (worker stopped or aborted) returns
/// the delivery to the head of its key's queue, so it is neither lost nor overtaken.
struct Held<'a> {
    shared: &'a Shared,
    key: Key,
    item: Option<Queued>,
    abandoned: &'a AtomicUsize,
    /// Set once [`Held::finish`] has ended the key's turn.
    finished: bool,
}

impl Held<'_> {
    /// Ends the turn of a settled delivery's key and takes the next ready key, under one lock.
    fn finish(mut self) -> Option<(Key, Queued)> {
        debug_assert!(self.item.is_none(), "only a settled delivery finishes its turn");
        self.finished = true;
        let (next, wake) = {
            let mut state = lock(&self.shared.state);
            state.release(&self.key);
            let next = state.take();
            (next, state.wake_one())
        };
        if wake {
            self.shared.work.notify_one();
        }
        next
    }

    /// Puts the delivery back at the head of its key's queue, untouched and not counted as abandoned.
    fn put_back(&mut self) {
        if let Some(item) = self.item.take() {
            lock(&self.shared.state).queues.entry(self.key.clone()).or_default().push_front(item);
        }
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let wake = {
            let mut state = lock(&self.shared.state);
            if let Some(item) = self.item.take() {
                self.abandoned.fetch_add(1, Ordering::Relaxed);
                state.queues.entry(self.key.clone()).or_default().push_front(item);
            }
            state.release(&self.key);
            state.wake_one()
        };
        if wake {
            self.shared.work.notify_one();
        }
    }
}

/// A worker counted in `State::idle` while it waits for a key. However the wait ends (woken, stopped, or the
/// task aborted), the count comes down: a count left too high would only cost needless wake-ups, but a
/// dispatcher outlives the workers of one subscription (the in-memory backend shares it across a group).
struct Waiting<'a> {
    shared: &'a Shared,
    counted: bool,
}

impl<'a> Waiting<'a> {
    fn start(shared: &'a Shared, state: &mut State) -> Self {
        state.idle += 1;
        Self { shared, counted: true }
    }

    /// Uncounts the worker under the lock the caller already holds.
    fn end(mut self, state: &mut State) {
        state.idle -= 1;
        self.counted = false;
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.counted {
            lock(&self.shared.state).idle -= 1;
        }
    }
}

enum Outcome {
    Settled,
    Stopped,
}

impl Worker {
    async fn run(self) {
        // Registered once for the worker's life: registering and dropping a cancellation waiter per delivery
        // takes locks shared by every worker of the subscription.
        let stopped = self.stop.cancelled();
        tokio::pin!(stopped);
        let mut next = None;
        loop {
            // A worker that just settled a delivery took its next key then; otherwise it waits for one.
            let (key, item) = match next.take() {
                Some(taken) => taken,
                None => match self.wait_for_key(stopped.as_mut()).await {
                    Some(taken) => taken,
                    None => return,
                },
            };
            // Dropping `held` before it finishes settles the key's schedule: back in line if deliveries remain,
            // otherwise its queue is removed.
            let mut held =
                Held { shared: &self.shared, key, item: Some(item), abandoned: &self.abandoned, finished: false };
            if self.stop.is_cancelled() {
                // Stopped between taking the key and starting: hand the delivery back untouched.
                held.put_back();
                return;
            }
            match self.process(&mut held).await {
                Outcome::Settled => next = held.finish(),
                // Stopped in a retry's backoff: the delivery goes back to its queue as `held` drops.
                Outcome::Stopped => return,
            }
        }
    }

    /// The next ready key and its first delivery, waiting while there is none; `None` once `stopped`.
    async fn wait_for_key(
        &self,
        mut stopped: std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFuture<'_>>,
    ) -> Option<(Key, Queued)> {
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            let woken = self.shared.work.notified();
            tokio::pin!(woken);
            {
                let mut state = lock(&self.shared.state);
                if let Some(waited) = waiting.take() {
                    waited.end(&mut state);
                }
                if let Some(taken) = state.take() {
                    // Several keys made ready while few workers waited: wake another for the rest.
                    let wake = state.wake_one();
                    drop(state);
                    if wake {
                        self.shared.work.notify_one();
                    }
                    return Some(taken);
                }
                // Registered while the lock is held: a key made ready after it is released wakes this worker.
                woken.as_mut().enable();
                waiting = Some(Waiting::start(&self.shared, &mut state));
            }
            tokio::select! {
                biased;
                _ = &mut woken => {}
                // `waiting` uncounts this worker as it drops, here or when the task is aborted.
                _ = &mut stopped => return None,
            }
        }
    }

    async fn process(&self, held: &mut Held<'_>) -> Outcome {
        let counters = &self.shared.counters;
        let envelope = match &held.item.as_ref().expect("a held delivery").delivery.message {
            Message::Event(envelope) => envelope.clone(),
            Message::Undecodable(undecodable) => {
                counters.bump(Counter::Undecodable);
                let mut wire = undecodable.wire.clone();
                let reason = format!("undecodable: {}", undecodable.error);
                tracing::warn!(topic = %self.shared.topic, %reason, "dead-lettering a message that cannot be decoded");
                wire.set_header(wire::DEAD_LETTER_REASON, header_safe(&reason));
                wire.set_header(wire::DEAD_LETTER_ATTEMPTS, "0");
                return self.dead_letter_and_ack(held, wire).await;
            }
        };
        let mut keep_alive = KeepAlive::new(&*held.item.as_ref().expect("a held delivery").delivery.acker);
        loop {
            if !held.item.as_ref().expect("a held delivery").delivery.acker.is_current() {
                tracing::debug!(topic = %self.shared.topic, "skipping a delivery whose partition was reassigned");
                held.item = None;
                return Outcome::Settled;
            }
            let attempts = {
                let item = held.item.as_mut().expect("a held delivery");
                item.attempts += 1;
                item.attempts
            };
            counters.bump(Counter::HandlerCalls);
            // A panicking handler is a failed attempt like any other: the worker survives it.
            let call = AssertUnwindSafe(self.handler.handle(envelope.clone())).catch_unwind();
            let call = lazy_timeout(self.settings.handler_timeout, call);
            let reason = match keep_alive.run(&*held.item.as_ref().expect("a held delivery").delivery.acker, call).await
            {
                Ok(Err(panic)) => format!("handler panicked: {}", panic_message(&*panic)),
                Ok(Ok(outcome)) => match outcome {
                    Ok(()) => {
                        // The capacity permit is kept until the acker has taken the delivery, so at most
                        // `capacity` deliveries are ever held unsettled.
                        let Queued { mut delivery, _permit, .. } = held.item.take().expect("a held delivery");
                        let acked = match delivery.acker.ack_now() {
                            Some(acked) => acked,
                            None => delivery.acker.ack().await,
                        };
                        if let Err(error) = acked {
                            tracing::warn!(topic = %self.shared.topic, %error, "ack failed; the broker will redeliver");
                        } else {
                            counters.bump(Counter::Acked);
                        }
                        return Outcome::Settled;
                    }
                    Err(error) if error.is_permanent() => {
                        counters.bump(Counter::HandlerFailures);
                        let reason = format!("permanent handler error: {error}");
                        return self.give_up(held, &envelope, reason).await;
                    }
                    Err(error) => format!("handler error: {error}"),
                },
                Err(_) => format!("handler timed out after {:?}", self.settings.handler_timeout),
            };
            counters.bump(Counter::HandlerFailures);
            if attempts >= self.settings.retry.max_attempts {
                let reason = format!("gave up after {attempts} attempts; last: {reason}");
                return self.give_up(held, &envelope, reason).await;
            }
            tracing::debug!(
                topic = %self.shared.topic, aggregate_id = %envelope.aggregate_id, attempts, %reason, "retrying"
            );
            let acker = &*held.item.as_ref().expect("a held delivery").delivery.acker;
            tokio::select! {
                _ = keep_alive.run(acker, tokio::time::sleep(self.settings.retry.backoff(attempts))) => {}
                _ = self.stop.cancelled() => return Outcome::Stopped,
            }
        }
    }

    async fn give_up(&self, held: &mut Held<'_>, envelope: &Envelope, reason: String) -> Outcome {
        let attempts = held.item.as_ref().map_or(0, |item| item.attempts);
        tracing::warn!(
            topic = %self.shared.topic, aggregate_id = %envelope.aggregate_id, event_id = %envelope.event_id,
            %reason, "dead-lettering"
        );
        let mut wire = wire::encode(envelope);
        wire.set_header(wire::DEAD_LETTER_REASON, header_safe(&reason));
        wire.set_header(wire::DEAD_LETTER_ATTEMPTS, attempts.to_string());
        self.dead_letter_and_ack(held, wire).await
    }

    async fn dead_letter_and_ack(&self, held: &mut Held<'_>, mut wire: WireMessage) -> Outcome {
        if let Some(topic) = &self.settings.dead_letter_topic {
            wire.set_header(wire::DEAD_LETTER_TOPIC, self.shared.topic.as_str());
            let mut attempt = 0;
            // The original is acked only once the dead-letter copy is stored, so nothing is lost.
            while let Err(error) = self.shared.dead_letters.dead_letter(topic, wire.clone()).await {
                attempt += 1;
                tracing::warn!(%topic, %error, "dead-letter publish failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(self.settings.retry.backoff(attempt)) => {}
                    _ = self.stop.cancelled() => return Outcome::Stopped,
                }
            }
            self.shared.counters.bump(Counter::DeadLettered);
        }
        let Queued { delivery, _permit, .. } = held.item.take().expect("a held delivery");
        if let Err(error) = delivery.acker.terminate().await {
            tracing::warn!(topic = %self.shared.topic, %error, "ack after dead-lettering failed");
        }
        Outcome::Settled
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::HandlerError;
    use crate::config::BusConfig;
    use crate::envelope::wire::WireMessage;

    struct Discard;

    #[async_trait]
    impl DeadLetterSink for Discard {
        async fn dead_letter(&self, _: &str, _: WireMessage) -> Result<()> {
            Ok(())
        }
    }

    /// Starts `concurrency` workers calling `handler`, stopped by the returned token.
    fn start_workers(
        dispatcher: &Dispatcher,
        handler: impl Handler,
        concurrency: usize,
    ) -> (JoinSet<()>, CancellationToken) {
        let settings = WorkerSettings {
            concurrency,
            handler_timeout: Duration::from_secs(5),
            retry: BusConfig::default().retry,
            dead_letter_topic: None,
        };
        let mut tasks = JoinSet::new();
        let stop = CancellationToken::new();
        dispatcher.spawn_workers(&mut tasks, Arc::new(handler), settings, stop.clone(), Arc::default());
        (tasks, stop)
    }

    fn delivery(aggregate: &str, version: u64) -> Delivery {
        let envelope = Envelope::builder(aggregate, "T").version(version).payload("p").build().unwrap();
        Delivery { message: Message::Event(Arc::new(envelope)), acker: Box::new(NoAck) }
    }

    #[test]
    fn dead_letter_reasons_fit_in_a_header() {
        assert_eq!(header_safe("assertion failed\n  left: 1\n right: 2"), "assertion failed   left: 1  right: 2");
        let long = "é".repeat(2000);
        let safe = header_safe(&long);
        assert!(safe.len() <= 1024 && safe.chars().all(|c| c == 'é'));
    }

    /// A delivery dispatched while an earlier one of its key is being handled waits for it, even when the
    /// key's queue was empty in between.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn one_key_is_never_handled_twice_at_once() {
        let dispatcher = Dispatcher::new("t", 64, Arc::default(), Arc::new(Discard));
        let running = Arc::new(AtomicUsize::new(0));
        let order = Arc::new(Mutex::new(Vec::new()));
        let handler = {
            let (running, order) = (running.clone(), order.clone());
            move |event: Arc<Envelope>| {
                let (running, order) = (running.clone(), order.clone());
                async move {
                    assert_eq!(running.fetch_add(1, Ordering::SeqCst), 0, "two handlers ran for one key");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    order.lock().unwrap().push(event.event_version);
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok::<(), HandlerError>(())
                }
            }
        };
        let (mut tasks, stop) = start_workers(&dispatcher, handler, 4);
        for version in 1..=5 {
            dispatcher.dispatch(delivery("a", version)).await;
            // Let a worker take the delivery so the key's queue is empty when the next one arrives.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        while order.lock().unwrap().len() < 5 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(*order.lock().unwrap(), [1, 2, 3, 4, 5]);
        stop.cancel();
        while tasks.join_next().await.is_some() {}
        assert_eq!(dispatcher.pending(), 0);
    }

    /// Deliveries of many keys pushed faster than the workers handle them: every one is handled once, in order
    /// per key, the workers share them out, and all of them end when stopped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_keys_are_handled_once_each_in_order_per_key() {
        const KEYS: u64 = 200;
        const VERSIONS: u64 = 20;
        let dispatcher = Dispatcher::new("t", 64, Arc::default(), Arc::new(Discard));
        let seen = Arc::new(Mutex::new(HashMap::<String, Vec<u64>>::new()));
        let handled = Arc::new(tokio::sync::Notify::new());
        let handler = {
            let (seen, handled) = (seen.clone(), handled.clone());
            move |event: Arc<Envelope>| {
                let mut seen = seen.lock().unwrap();
                let versions = seen.entry(event.aggregate_id.clone()).or_default();
                versions.push(event.event_version);
                if seen.values().map(Vec::len).sum::<usize>() == (KEYS * VERSIONS) as usize {
                    handled.notify_one();
                }
                std::future::ready(Ok::<(), HandlerError>(()))
            }
        };
        let (mut tasks, stop) = start_workers(&dispatcher, handler, 8);
        let all_handled = async {
            for version in 1..=VERSIONS {
                for key in 0..KEYS {
                    dispatcher.dispatch(delivery(&format!("key-{key}"), version)).await;
                }
            }
            handled.notified().await;
        };
        tokio::time::timeout(Duration::from_secs(10), all_handled).await.expect("every delivery handled");
        let expected: Vec<u64> = (1..=VERSIONS).collect();
        assert!(seen.lock().unwrap().values().all(|versions| *versions == expected));
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), async { while tasks.join_next().await.is_some() {} })
            .await
            .expect("every worker ends once stopped");
        assert_eq!(dispatcher.pending(), 0);
        assert!(lock(&dispatcher.shared.state).ready.is_empty());
    }

    #[test]
    fn a_message_stays_two_words() {
        // Deliveries move by value through queues and workers; a wider message turns each move into a memcpy.
        assert_eq!(std::mem::size_of::<Message>(), 2 * std::mem::size_of::<usize>());
    }

    /// Workers waiting for work are counted as idle, and uncounted however they stop: a dispatcher outlives the
    /// workers of one subscription.
    #[tokio::test]
    async fn stopped_and_aborted_workers_leave_no_idle_count() {
        let dispatcher = Dispatcher::new("t", 64, Arc::default(), Arc::new(Discard));
        let idle = || lock(&dispatcher.shared.state).idle;
        let handler = |_: Arc<Envelope>| std::future::ready(Ok::<(), HandlerError>(()));
        let (mut stopped, stop) = start_workers(&dispatcher, handler, 3);
        let (mut aborted, _) = start_workers(&dispatcher, handler, 2);
        while idle() < 5 {
            tokio::task::yield_now().await;
        }
        stop.cancel();
        while stopped.join_next().await.is_some() {}
        assert_eq!(idle(), 2);
        aborted.abort_all();
        while aborted.join_next().await.is_some() {}
        assert_eq!(idle(), 0);
    }

    /// A burst of keys for slow handlers reaches every worker: each worker that takes a key wakes the next.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_keys_wakes_every_worker() {
        let dispatcher = Dispatcher::new("t", 64, Arc::default(), Arc::new(Discard));
        let (running, most, done) =
            (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let handler = {
            let (running, most, done) = (running.clone(), most.clone(), done.clone());
            move |_: Arc<Envelope>| {
                let (running, most, done) = (running.clone(), most.clone(), done.clone());
                async move {
                    most.fetch_max(running.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    done.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), HandlerError>(())
                }
            }
        };
        let (mut tasks, stop) = start_workers(&dispatcher, handler, 8);
        while lock(&dispatcher.shared.state).idle < 8 {
            tokio::task::yield_now().await;
        }
        for key in 0..8 {
            dispatcher.dispatch(delivery(&format!("key-{key}"), 1)).await;
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while done.load(Ordering::SeqCst) < 8 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("every key handled");
        assert_eq!(most.load(Ordering::SeqCst), 8, "the eight keys were handled at once");
        stop.cancel();
        while tasks.join_next().await.is_some() {}
    }
}
