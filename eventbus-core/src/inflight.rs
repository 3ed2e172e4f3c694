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

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
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
/// [`submit`](Self::submit) the ack future.
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
        let collector = Collector {
            receiver,
            results: results.clone(),
            counters: counters.clone(),
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
        // A timeout too large to add is as good as none (tokio's own far future is 30 years).
        let deadline = Instant::now()
            .checked_add(self.ack_timeout)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365 * 30));
        let aggregate_id = self.results.as_ref().map(|_| aggregate_id.to_owned());
        let (reply, receiver) = oneshot::channel();
        let pending = Pending { event_id, topic: topic.clone(), aggregate_id, reply, _slot: slot };
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
        record(&self.counters, &result);
        if let Some(results) = &self.results {
            // A reader that stopped reading must not hold publishers past close().
            report(results, &self.give_up, event_id, topic, aggregate_id.to_owned(), &result).await;
        }
        drop(slot);
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
    /// passed settles with [`Error::ClosedBeforeAck`] too, but is not in the returned list. Cancel-safe: if the
    /// returned future is dropped, a later call picks up where it stopped.
    pub async fn close(&self, deadline: Instant) -> Vec<EventId> {
        if !self.closed.load(Ordering::Acquire) {
            self.pending_at_close.store(self.in_flight(), Ordering::Relaxed);
        }
        self.closed.store(true, Ordering::Release);
        let mut collector = self.collector.lock().await;
        if collector.is_none() {
            return Vec::new();
        }
        // Every slot back means every accepted publish has settled.
        let size = u32::try_from(self.size).unwrap_or(u32::MAX);
        let all_settled = tokio::time::timeout_at(deadline, self.slots.acquire_many(size)).await;
        if let Ok(Ok(permits)) = all_settled {
            permits.forget();
        }
        self.give_up.cancel();
        self.slots.close();
        let abandoned = match collector.take() {
            Some(handle) => handle.await.unwrap_or_default(),
            None => Vec::new(),
        };
        self.pending_at_close.store(0, Ordering::Relaxed);
        self.finished.cancel();
        abandoned
    }
}

impl Drop for PublishWindow {
    fn drop(&mut self) {
        self.give_up.cancel();
        self.finished.cancel();
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
        // Giving up: refuse late submissions, then settle what is left as closed-before-ack.
        self.receiver.close();
        let mut abandoned: Vec<Pending> = acks.iter_mut().filter_map(|settling| settling.pending.take()).collect();
        drop(acks);
        while let Some(mut settling) = self.receiver.recv().await {
            abandoned.extend(settling.pending.take());
        }
        let ids = abandoned.iter().map(|p| p.event_id).collect();
        for pending in abandoned {
            self.settle(pending, Err(Error::ClosedBeforeAck), &give_up).await;
        }
        ids
    }

    /// Settles every ack whose deadline has passed as timed out, dropping its future. Returns how many timed
    /// out and the earliest deadline left.
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
                settling.ack = None;
                expired.extend(settling.pending.take());
            } else if earliest.is_none_or(|at| settling.deadline < at) {
                earliest = Some(settling.deadline);
            }
        }
        let count = expired.len();
        for pending in expired {
            self.settle(pending, Err(Error::AckTimeout(self.ack_timeout)), give_up).await;
        }
        (count, earliest)
    }

    async fn settle(&self, pending: Pending, result: Result<PublishAck>, give_up: &CancellationToken) {
        record(&self.counters, &result);
        if let (Some(results), Some(aggregate_id)) = (&self.results, pending.aggregate_id) {
            // A reader that stopped reading must not hold close() past its deadline.
            report(results, give_up, pending.event_id, &pending.topic, aggregate_id, &result).await;
        }
        let _ = pending.reply.send(result);
    }
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
}
