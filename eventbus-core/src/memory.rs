//! The in-process backend: the embedded default, and the reference the conformance suites hold every broker
//! backend to.
//!
//! Each topic is an in-memory log. Each consumer group has a cursor into it and one fetch task that feeds the
//! group's keyed dispatcher; every member of the group adds its workers to that dispatcher, so one aggregate is
//! handled by one worker at a time across all members, and deliveries a closing member had not handled stay
//! queued for the others. The log keeps what some group has yet to read plus the last `memory.history` events
//! for groups that subscribe later. What some group has yet to read is bounded by `memory.max_backlog`: a
//! publish beyond it waits for the slowest group, so memory stays bounded when publishers outrun consumers.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use async_trait::async_trait;
use tokio::sync::{watch, Notify, Semaphore, SemaphorePermit};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::{
    CloseReport, ConnectionState, EventBus, Handler, Health, Metrics, PublishAck, PublishReceipt, PublishResults,
    SubscribeOptions,
};
use crate::config::BusConfig;
use crate::deadline::lazy_timeout;
use crate::dispatch::{DeadLetterSink, Delivery, Dispatcher, Message, NoAck, WorkerSettings};
use crate::envelope::wire::WireMessage;
use crate::envelope::{validate_group, validate_topic, Envelope};
use crate::lifecycle::BusCore;
use crate::subscription::{Subscription, SubscriptionControl};
use crate::{Error, Result};

/// Messages a group fetch task moves from the log to the dispatcher per lock of the log.
const FETCH_BATCH: usize = 256;
/// Appends between two trims of a topic's log.
const TRIM_EVERY: usize = 1024;

/// The in-memory backend. See the [module documentation](self).
///
/// ```
/// use eventbus_core::{BusConfig, Envelope, EventBus, MemoryBus};
///
/// # #[tokio::main] async fn main() -> eventbus_core::Result<()> {
/// let bus = MemoryBus::new(BusConfig::default())?;
/// let event = Envelope::builder("cart-9", "ItemAdded").payload("sku-1").build()?;
/// let ack = bus.publish("carts", event).await?.await?;
/// assert_eq!(ack.sequence, Some(0));
/// bus.close().await;
/// # Ok(()) }
/// ```
pub struct MemoryBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: BusConfig,
    core: BusCore,
    /// Looked up by every publish: read-locked, and hashed with foldhash rather than SipHash.
    topics: RwLock<Topics>,
    health: Mutex<Health>,
    outage: Outage,
}

/// A simulated broker outage (see [`MemoryBus::pause`]): publishes are held without an ack and nothing is
/// delivered until [`MemoryBus::resume`].
struct Outage {
    /// Fast check on the publish path; `held` is the truth.
    paused: AtomicBool,
    /// Publishes sent during the outage, in order; `None` when there is no outage.
    held: Mutex<Option<VecDeque<HeldPublish>>>,
    /// Whether delivery is paused, watched by the group fetch tasks.
    delivery: watch::Sender<bool>,
}

struct HeldPublish {
    topic: Arc<Topic>,
    stored: Stored,
    stored_at: tokio::sync::oneshot::Sender<u64>,
}

/// The bus's topics by name.
type Topics = HashMap<String, Arc<Topic>, foldhash::fast::RandomState>;

struct Topic {
    name: Arc<str>,
    log: Mutex<Log>,
    /// Woken by an append while some group's fetch task waits for one (`Log::waiting_fetchers`).
    appended: Notify,
    groups: Mutex<HashMap<String, Arc<Group>>>,
    /// `groups.len()`, read without the lock on every publish and every event read.
    group_count: AtomicUsize,
    /// One permit per event some group may still have to read (`memory.max_backlog`): a publish takes one,
    /// and it comes back once every group has read past its event. Waiters are served in order, each woken
    /// once, however many publishers wait.
    room: Semaphore,
    /// Offset below which every event's permit is back (or was never needed).
    released: AtomicU64,
}

#[derive(Default)]
struct Log {
    /// Offset of `entries[0]`.
    base: u64,
    entries: VecDeque<Stored>,
    appends_since_trim: usize,
    /// Fetch tasks that found nothing to read and wait on `Topic::appended`. Counted under the log's lock, so
    /// an append either sees the waiter or is seen by its last read, and appends wake nobody while every
    /// fetch task is busy.
    waiting_fetchers: usize,
}

#[derive(Clone)]
enum Stored {
    Event(Arc<Envelope>),
    Raw(Arc<WireMessage>),
}

struct Group {
    dispatcher: Dispatcher,
    /// Offset of the next entry to hand to the dispatcher.
    cursor: AtomicU64,
    fetcher: Mutex<Fetcher>,
}

#[derive(Default)]
struct Fetcher {
    members: usize,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl MemoryBus {
    /// Starts an in-memory bus. Needs a tokio runtime.
    pub fn new(config: BusConfig) -> Result<Self> {
        config.validate()?;
        if config.scheme() != "memory" {
            return Err(Error::Config(format!("MemoryBus needs a memory:// url, got {:?}", config.url)));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                core: BusCore::new(&config),
                config,
                topics: RwLock::default(),
                health: Mutex::new(Health::new(ConnectionState::Connected)),
                outage: Outage {
                    paused: AtomicBool::new(false),
                    held: Mutex::new(None),
                    delivery: watch::Sender::new(false),
                },
            }),
        })
    }

    /// Appends a raw message to `topic` as a foreign producer would, bypassing validation. Returns its offset.
    /// Meant for tests of undecodable input and interop.
    pub fn publish_raw(&self, topic: &str, message: WireMessage) -> Result<u64> {
        validate_topic(topic)?;
        self.inner.core.ensure_open()?;
        Ok(self.inner.topic(topic).append(Stored::Raw(Arc::new(message)), &self.inner.config))
    }

    /// Simulates a broker outage, for tests of code that must survive one: until [`resume`](Self::resume),
    /// publishes are accepted into the window but not acked (so they time out after `publish.ack_timeout`
    /// and fill the window), nothing more is fetched for any group (deliveries already queued in a group's
    /// dispatcher are still handled), and `health()` reports [`ConnectionState::Reconnecting`].
    pub fn pause(&self) {
        let outage = &self.inner.outage;
        let mut held = lock(&outage.held);
        if held.is_none() {
            *held = Some(VecDeque::new());
            outage.paused.store(true, Ordering::Release);
            outage.delivery.send_replace(true);
            let mut health = Health::new(ConnectionState::Reconnecting);
            health.last_error = Some("broker unreachable (paused by MemoryBus::pause)".to_owned());
            *lock(&self.inner.health) = health;
        }
    }

    /// Ends a simulated outage: publishes held during it are stored in the order they were sent (those whose
    /// ack already timed out too, as a broker may store a message whose ack was lost), and delivery resumes.
    pub fn resume(&self) {
        let outage = &self.inner.outage;
        let mut held = lock(&outage.held);
        if let Some(publishes) = held.take() {
            for publish in publishes {
                let offset = publish.topic.append_reserved(publish.stored, &self.inner.config);
                let _ = publish.stored_at.send(offset);
            }
            outage.paused.store(false, Ordering::Release);
            outage.delivery.send_replace(false);
            if self.inner.core.ensure_open().is_ok() {
                let mut health = Health::new(ConnectionState::Connected);
                health.last_error = Some("broker unreachable (paused by MemoryBus::pause)".to_owned());
                *lock(&self.inner.health) = health;
            }
        }
    }

    /// The messages `topic` retains, oldest first, as they would travel on a broker.
    pub fn read_raw(&self, topic: &str) -> Vec<WireMessage> {
        let topic = self.inner.topic(topic);
        let log = lock(&topic.log);
        log.entries
            .iter()
            .map(|stored| match stored {
                Stored::Event(envelope) => crate::envelope::wire::encode(envelope),
                Stored::Raw(wire) => (**wire).clone(),
            })
            .collect()
    }
}

impl Inner {
    /// Everything `publish` checks before anything is sent.
    fn check(&self, topic: &str, envelope: &Envelope) -> Result<()> {
        validate_topic(topic)?;
        envelope.validate()?;
        let limit = self.config.memory.max_payload;
        if envelope.payload.len() > limit {
            let size = envelope.payload.len();
            return Err(Error::PayloadTooLarge { size, limit, backend: "memory.max_payload".into() });
        }
        Ok(())
    }

    /// Publishes during an outage: the publish takes a window slot and waits for its ack there, as on a broker
    /// that does not answer, until [`MemoryBus::resume`] stores it (or it times out). An outage that ended in
    /// the meantime stores it at once.
    async fn publish_in_outage(
        &self,
        topic: &Arc<Topic>,
        room: SemaphorePermit<'_>,
        envelope: &Arc<Envelope>,
        ack: PublishAck,
    ) -> Result<PublishReceipt> {
        let slot = self.core.admit().await?;
        // Kept until every group has read the event (see `reserve_room`); a failed admit above gave it back.
        room.forget();
        let (event_id, aggregate_id) = (envelope.event_id, envelope.aggregate_id.as_str());
        let receipt = match self.hold_if_paused(topic, Stored::Event(envelope.clone())) {
            Ok(stored_at) => {
                let ack = async move {
                    stored_at.await.map(|offset| ack.with_sequence(offset)).map_err(|_| Error::ClosedBeforeAck)
                };
                self.core.window.submit(slot, &topic.name, event_id, aggregate_id, ack).await
            }
            Err(stored) => {
                let offset = topic.append_reserved(stored, &self.config);
                let acked = Ok(ack.with_sequence(offset));
                self.core.window.settle(slot, &topic.name, event_id, aggregate_id, acked).await
            }
        };
        Ok(receipt)
    }

    /// During an outage, holds `stored` and returns where its offset will be reported; otherwise gives it back.
    fn hold_if_paused(
        &self,
        topic: &Arc<Topic>,
        stored: Stored,
    ) -> std::result::Result<tokio::sync::oneshot::Receiver<u64>, Stored> {
        if !self.outage.paused.load(Ordering::Acquire) {
            return Err(stored);
        }
        match lock(&self.outage.held).as_mut() {
            Some(held) => {
                let (stored_at, receiver) = tokio::sync::oneshot::channel();
                held.push_back(HeldPublish { topic: topic.clone(), stored, stored_at });
                Ok(receiver)
            }
            None => Err(stored),
        }
    }

    fn topic(&self, name: &str) -> Arc<Topic> {
        if let Some(topic) = self.topics().get(name) {
            return topic.clone();
        }
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let topic = topics.entry(name.to_owned()).or_insert_with(|| {
            Arc::new(Topic {
                name: Arc::from(name),
                log: Mutex::new(Log::default()),
                appended: Notify::new(),
                groups: Mutex::new(HashMap::new()),
                group_count: AtomicUsize::new(0),
                room: Semaphore::new(self.config.memory.max_backlog),
                released: AtomicU64::new(0),
            })
        });
        topic.clone()
    }

    fn topics(&self) -> std::sync::RwLockReadGuard<'_, Topics> {
        self.topics.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses publishes waiting for room, now that the bus is closed.
    fn refuse_waiting_publishes(&self) {
        for topic in self.topics().values() {
            topic.room.close();
        }
    }

    fn all_groups(&self) -> Vec<Arc<Group>> {
        self.topics().values().flat_map(|topic| lock(&topic.groups).values().cloned().collect::<Vec<_>>()).collect()
    }
}

impl Topic {
    /// Waits for room for one more unread event, at most `publish.enqueue_timeout` (see [`Topic::room`]); no
    /// timer starts when there is room at once. The room is given back if the permit is dropped; once the event
    /// is stored, [`SemaphorePermit::forget`] it: it comes back through `release_read` when every group has read
    /// the event.
    async fn reserve_room(&self, config: &BusConfig) -> Result<SemaphorePermit<'_>> {
        match lazy_timeout(config.publish.enqueue_timeout, self.room.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            // Closed by close(): the bus no longer takes publishes.
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Broker {
                message: format!(
                    "memory topic {:?} is full: memory.max_backlog = {} events are unread by its slowest group, \
                     which did not catch up within publish.enqueue_timeout = {:?}",
                    self.name, config.memory.max_backlog, config.publish.enqueue_timeout
                ),
                source: None,
            }),
        }
    }

    /// Appends an event published with room reserved: with no group to read it, its room is given back now.
    fn append_reserved(&self, stored: Stored, config: &BusConfig) -> u64 {
        let offset = self.append(stored, config);
        if self.group_count.load(Ordering::Acquire) == 0 {
            self.released.fetch_max(offset + 1, Ordering::AcqRel);
            self.room.add_permits(1);
        }
        offset
    }

    /// Gives back the room of every event all groups have now read; `cursor` is the reading group's.
    fn release_read(&self, cursor: u64) {
        let slowest = if self.group_count.load(Ordering::Acquire) == 1 {
            cursor
        } else {
            lock(&self.groups).values().map(|g| g.cursor.load(Ordering::Acquire)).min().unwrap_or(cursor)
        };
        let before = self.released.fetch_max(slowest, Ordering::AcqRel);
        if slowest > before {
            // Raw and dead-letter appends take no room, so this may return a little more than was taken.
            self.room.add_permits((slowest - before) as usize);
        }
    }

    fn append(&self, stored: Stored, config: &BusConfig) -> u64 {
        let (offset, trim, wake) = {
            let mut log = lock(&self.log);
            let offset = log.base + log.entries.len() as u64;
            log.entries.push_back(stored);
            log.appends_since_trim += 1;
            let trim = log.appends_since_trim >= TRIM_EVERY && log.entries.len() > config.memory.history;
            (offset, trim, log.waiting_fetchers > 0)
        };
        if wake {
            self.appended.notify_waiters();
        }
        if trim {
            self.trim(config.memory.history);
        }
        offset
    }

    /// Drops entries every group has read, beyond the `history` most recent ones.
    fn trim(&self, history: usize) {
        let slowest = lock(&self.groups).values().map(|g| g.cursor.load(Ordering::Acquire)).min().unwrap_or(u64::MAX);
        let mut log = lock(&self.log);
        log.appends_since_trim = 0;
        let end = log.base + log.entries.len() as u64;
        let keep_from = slowest.min(end.saturating_sub(history as u64));
        while log.base < keep_from && log.entries.pop_front().is_some() {
            log.base += 1;
        }
    }

    /// The group named `name`, created (reading from the oldest retained event) if new.
    fn group(&self, name: &str, create: impl FnOnce() -> Dispatcher) -> Arc<Group> {
        let mut groups = lock(&self.groups);
        if let Some(group) = groups.get(name) {
            return group.clone();
        }
        let group = Arc::new(Group {
            dispatcher: create(),
            cursor: AtomicU64::new(lock(&self.log).base),
            fetcher: Mutex::new(Fetcher::default()),
        });
        groups.insert(name.to_owned(), group.clone());
        self.group_count.store(groups.len(), Ordering::Release);
        group
    }
}

/// Membership of one subscription in its group; the group's fetch task runs while it has members.
struct Membership {
    group: Arc<Group>,
}

impl Group {
    fn join(self: &Arc<Self>, topic: &Arc<Topic>, paused: watch::Receiver<bool>) -> Membership {
        let mut fetcher = lock(&self.fetcher);
        fetcher.members += 1;
        if fetcher.members == 1 {
            // The previous fetch task, if any, was told to stop; the new one waits for it so that only one
            // task ever moves this group's cursor.
            let previous = fetcher.task.take();
            fetcher.stop = CancellationToken::new();
            let task = fetch(topic.clone(), self.clone(), fetcher.stop.clone(), paused, previous);
            fetcher.task = Some(tokio::spawn(task));
        }
        Membership { group: self.clone() }
    }

    /// Stops the fetch task and waits for it, at most until `deadline`.
    async fn stop_fetching(&self, deadline: Instant) {
        let task = {
            let mut fetcher = lock(&self.fetcher);
            fetcher.stop.cancel();
            fetcher.task.take()
        };
        if let Some(task) = task {
            let abort = task.abort_handle();
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                abort.abort();
            }
        }
    }

    fn abort_fetching(&self) {
        let mut fetcher = lock(&self.fetcher);
        fetcher.stop.cancel();
        if let Some(task) = fetcher.task.take() {
            task.abort();
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut fetcher = lock(&self.group.fetcher);
        fetcher.members -= 1;
        if fetcher.members == 0 {
            fetcher.stop.cancel();
        }
    }
}

async fn fetch(
    topic: Arc<Topic>,
    group: Arc<Group>,
    stop: CancellationToken,
    mut paused: watch::Receiver<bool>,
    previous: Option<JoinHandle<()>>,
) {
    if let Some(previous) = previous {
        let _ = previous.await;
    }
    let mut batch = Vec::with_capacity(FETCH_BATCH);
    loop {
        if stop.is_cancelled() {
            return;
        }
        if *paused.borrow() {
            tokio::select! {
                _ = stop.cancelled() => return,
                resumed = paused.wait_for(|paused| !paused) => if resumed.is_err() { return },
            }
        }
        let cursor = group.cursor.load(Ordering::Acquire);
        // Registered before the log is read, so an append after the read below wakes it.
        let appended = topic.appended.notified();
        tokio::pin!(appended);
        let waiting = {
            let mut log = lock(&topic.log);
            let start = cursor.max(log.base);
            let skip = (start - log.base) as usize;
            batch.extend(
                log.entries
                    .iter()
                    .skip(skip)
                    .take(FETCH_BATCH)
                    .enumerate()
                    .map(|(i, stored)| (start + i as u64, stored.clone())),
            );
            batch.is_empty().then(|| {
                appended.as_mut().enable();
                WaitingFetcher::new(&topic, &mut log)
            })
        };
        if let Some(_waiting) = waiting {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = appended => continue,
            }
        }
        let stopped = dispatch_batch(&topic, &group, &stop, &paused, &mut batch).await;
        // Read events give their room back once per batch (and before any wait for the handlers) rather
        // than once per event.
        topic.release_read(group.cursor.load(Ordering::Acquire));
        if stopped {
            return;
        }
    }
}

/// Hands a fetched batch to the group's dispatcher, moving the cursor past each event. Stops early when the
/// bus is paused (the rest is fetched again later) or, returning `true`, when told to stop.
async fn dispatch_batch(
    topic: &Topic,
    group: &Group,
    stop: &CancellationToken,
    paused: &watch::Receiver<bool>,
    batch: &mut Vec<(u64, Stored)>,
) -> bool {
    for (offset, stored) in batch.drain(..) {
        if *paused.borrow() {
            // The rest of the batch is fetched again after the outage.
            break;
        }
        let message = match stored {
            Stored::Event(envelope) => Message::Event(envelope),
            Stored::Raw(wire) => match wire.decode() {
                Ok(envelope) => Message::Event(Arc::new(envelope)),
                Err(error) => Message::undecodable((*wire).clone(), error),
            },
        };
        let slot = match group.dispatcher.try_reserve() {
            Some(slot) => slot,
            None => {
                topic.release_read(group.cursor.load(Ordering::Acquire));
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => return true,
                    slot = group.dispatcher.reserve() => slot,
                }
            }
        };
        group.dispatcher.push(slot, Delivery { message, acker: Box::new(NoAck) });
        group.cursor.store(offset + 1, Ordering::Release);
    }
    false
}

/// A fetch task counted in [`Log::waiting_fetchers`] until dropped (woken, stopped or aborted).
struct WaitingFetcher<'a> {
    topic: &'a Topic,
}

impl<'a> WaitingFetcher<'a> {
    fn new(topic: &'a Topic, log: &mut Log) -> Self {
        log.waiting_fetchers += 1;
        Self { topic }
    }
}

impl Drop for WaitingFetcher<'_> {
    fn drop(&mut self) {
        lock(&self.topic.log).waiting_fetchers -= 1;
    }
}

/// Dead-letters into the bus's own topics. Holds the bus weakly so the bus can still be dropped.
struct MemoryDeadLetters(Weak<Inner>);

#[async_trait]
impl DeadLetterSink for MemoryDeadLetters {
    async fn dead_letter(&self, topic: &str, message: WireMessage) -> Result<()> {
        let inner = self.0.upgrade().ok_or(Error::Closed)?;
        inner.topic(topic).append(Stored::Raw(Arc::new(message)), &inner.config);
        Ok(())
    }
}

#[async_trait]
impl EventBus for MemoryBus {
    async fn publish(&self, topic: &str, envelope: Envelope) -> Result<PublishReceipt> {
        let inner = &self.inner;
        inner.core.count_rejection(inner.check(topic, &envelope))?;
        // Shared with the log and the groups' dispatchers once stored.
        let envelope = Arc::new(envelope);
        let topic = inner.topic(topic);
        // Room first: a publish waiting for consumers to catch up then holds no window slot.
        let room = topic.reserve_room(&inner.config).await?;
        let (event_id, aggregate_id) = (envelope.event_id, envelope.aggregate_id.as_str());
        let ack = PublishAck::new(event_id, &*topic.name);
        if inner.outage.paused.load(Ordering::Acquire) {
            // Boxed: an outage is rare, and this path's state would otherwise size every publish future.
            return Box::pin(inner.publish_in_outage(&topic, room, &envelope, ack)).await;
        }
        inner.core.count_rejection(inner.core.ensure_open())?;
        // Kept until every group has read the event (see `reserve_room`).
        room.forget();
        // Stored at once, so the publish never waits for an ack and needs no slot in the window: the window's
        // semaphore, shared by every publisher, stays untouched on this path.
        let offset = topic.append_reserved(Stored::Event(envelope.clone()), &inner.config);
        let acked = Ok(ack.with_sequence(offset));
        Ok(inner.core.window.settle_stored(&topic.name, event_id, aggregate_id, acked).await)
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
        inner.core.ensure_open()?;
        let config = &inner.config;
        let settings = WorkerSettings::resolve(config, &options, topic);
        let capacity = options.max_in_flight.unwrap_or(config.subscribe.max_in_flight);
        let topic = inner.topic(topic);
        let group = topic.group(&options.group, || {
            let sink = Arc::new(MemoryDeadLetters(Arc::downgrade(inner)));
            Dispatcher::new(&*topic.name, capacity, inner.core.counters.clone(), sink)
        });
        let stop = CancellationToken::new();
        let abandoned = Arc::new(AtomicUsize::new(0));
        let control = SubscriptionControl::new(
            &*topic.name,
            options.group.as_str(),
            config.close_timeout,
            stop.clone(),
            abandoned.clone(),
        );
        control.with_tasks(|tasks| group.dispatcher.spawn_workers(tasks, handler, settings, stop, abandoned));
        control.hold(group.join(&topic, inner.outage.delivery.subscribe()));
        inner.core.subscriptions.register(control)
    }

    fn publish_results(&self) -> Option<PublishResults> {
        self.inner.core.publish_results()
    }

    fn health(&self) -> Health {
        lock(&self.inner.health).clone()
    }

    fn metrics(&self) -> Metrics {
        self.inner.core.metrics()
    }

    async fn close(&self) -> CloseReport {
        let inner = &self.inner;
        inner
            .core
            .close(|deadline| async move {
                for group in inner.all_groups() {
                    group.stop_fetching(deadline).await;
                }
                inner.refuse_waiting_publishes();
                *lock(&inner.health) = Health::new(ConnectionState::Closed);
            })
            .await
    }
}

impl Drop for MemoryBus {
    fn drop(&mut self) {
        // Dropped without close(): stop everything now rather than leave tasks running.
        self.inner.core.abort();
        for group in self.inner.all_groups() {
            group.abort_fetching();
        }
        self.inner.refuse_waiting_publishes();
    }
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus")
            .field("topics", &self.inner.topics().len())
            .field("closed", &self.inner.core.ensure_open().is_err())
            .finish()
    }
}
