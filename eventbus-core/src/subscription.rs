//! Subscription handles, and the registry a bus keeps so `close()` and drop reach every subscription.

use std::any::Any;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::{Error, Result};

/// A live subscription. Close it with [`close`](Self::close) to let running handlers finish; dropping it
/// stops it at once (a delivery whose handler was cut short is not acked, so it is delivered again).
/// [`detach`](Self::detach) keeps it running until the bus closes.
#[must_use = "dropping a Subscription stops it; keep it, or call detach()"]
pub struct Subscription {
    control: Arc<SubscriptionControl>,
    detached: bool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("topic", &self.control.topic)
            .field("group", &self.control.group)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Subscription {
    /// Wraps a control registered with the bus.
    pub fn new(control: Arc<SubscriptionControl>) -> Self {
        Self { control, detached: false }
    }

    /// The topic consumed.
    pub fn topic(&self) -> &str {
        &self.control.topic
    }

    /// The consumer group.
    pub fn group(&self) -> &str {
        &self.control.group
    }

    /// Whether the subscription was closed (by itself or by the bus).
    pub fn is_closed(&self) -> bool {
        self.control.is_closed()
    }

    /// Stops fetching, lets running handlers finish and ack, and joins the subscription's tasks, within the
    /// bus's `close_timeout`. Handlers still running at the deadline are stopped and reported as abandoned.
    pub async fn close(self) -> SubscriptionReport {
        let deadline = Instant::now() + self.control.close_timeout;
        self.control.close(deadline).await
    }

    /// Lets the subscription run until the bus closes, without holding this handle.
    pub fn detach(mut self) {
        self.detached = true;
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.detached {
            self.control.abort();
        }
    }
}

/// What closing a subscription did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionReport {
    /// Deliveries whose handling was cut short; they were not acked and will be delivered again.
    pub abandoned: usize,
    /// Whether the deadline was reached before every task finished on its own.
    pub timed_out: bool,
}

/// The shared state behind a [`Subscription`]: its tasks, its stop signal and what to release on close.
/// Backends build one per subscription and register it with their [`SubscriptionRegistry`].
pub struct SubscriptionControl {
    topic: String,
    group: String,
    close_timeout: Duration,
    stop: CancellationToken,
    tasks: Mutex<Option<JoinSet<()>>>,
    resources: Mutex<Option<Box<dyn Any + Send>>>,
    release: Mutex<Option<Dispatcher>>,
    abandoned: Arc<AtomicUsize>,
    closed: tokio::sync::Mutex<Option<SubscriptionReport>>,
}

impl SubscriptionControl {
    /// A control for a subscription to `topic` in `group`. Its tasks stop taking work when `stop` is cancelled.
    pub fn new(
        topic: impl Into<String>,
        group: impl Into<String>,
        close_timeout: Duration,
        stop: CancellationToken,
        abandoned: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            topic: topic.into(),
            group: group.into(),
            close_timeout,
            stop,
            tasks: Mutex::new(Some(JoinSet::new())),
            resources: Mutex::new(None),
            release: Mutex::new(None),
            abandoned,
            closed: tokio::sync::Mutex::new(None),
        }
    }

    /// Runs `f` on the subscription's task set, to spawn its fetch loop and workers.
    pub fn with_tasks(&self, f: impl FnOnce(&mut JoinSet<()>)) {
        if let Some(tasks) = lock(&self.tasks).as_mut() {
            f(tasks);
        }
    }

    /// Keeps `resource` alive while the subscription runs; it is dropped after the tasks are joined (for
    /// example a consumer-group membership to leave).
    pub fn hold(&self, resource: impl Any + Send) {
        *lock(&self.resources) = Some(Box::new(resource));
    }

    /// On close, once the tasks are joined, hands every delivery still queued in `dispatcher` back to the
    /// broker ([`Acker::release`](crate::dispatch::Acker::release)) instead of leaving it to a redelivery
    /// timeout. For dispatchers owned by the subscription alone.
    pub fn release_on_close(&self, dispatcher: Dispatcher) {
        *lock(&self.release) = Some(dispatcher);
    }

    /// Whether close or abort has begun.
    pub fn is_closed(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Stops the tasks and joins them, aborting those still running at `deadline`. Idempotent.
    pub async fn close(&self, deadline: Instant) -> SubscriptionReport {
        let mut closed = self.closed.lock().await;
        if let Some(report) = *closed {
            return report;
        }
        self.stop.cancel();
        let tasks = lock(&self.tasks).take();
        let mut timed_out = false;
        if let Some(mut tasks) = tasks {
            let finished =
                tokio::time::timeout_at(deadline, async { while tasks.join_next().await.is_some() {} }).await;
            if finished.is_err() {
                timed_out = true;
                tasks.abort_all();
                while tasks.join_next().await.is_some() {}
            }
        }
        let dispatcher = lock(&self.release).take();
        if let Some(dispatcher) = dispatcher {
            let released = dispatcher.take_queued().into_iter().map(|delivery| delivery.acker.release());
            let _ = tokio::time::timeout_at(deadline, futures_util::future::join_all(released)).await;
        }
        drop(lock(&self.resources).take());
        let report = SubscriptionReport { abandoned: self.abandoned.load(Ordering::Relaxed), timed_out };
        *closed = Some(report);
        report
    }

    /// Stops at once, without waiting: the tasks are aborted (used on drop).
    pub fn abort(&self) {
        self.stop.cancel();
        drop(lock(&self.tasks).take());
        drop(lock(&self.release).take());
        drop(lock(&self.resources).take());
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The subscriptions of one bus, so `close()` can close them all and dropping the bus aborts them all.
pub struct SubscriptionRegistry {
    /// `None` once the bus is closing: no subscription may be added after `close_all` took the list.
    controls: Mutex<Option<Vec<Arc<SubscriptionControl>>>>,
}

impl Default for SubscriptionRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl SubscriptionRegistry {
    /// A registry accepting subscriptions.
    pub fn new() -> Self {
        Self { controls: Mutex::new(Some(Vec::new())) }
    }

    /// Registers a control and returns the user's handle to it. Fails with [`Error::Closed`] (and stops the
    /// control) when the bus began closing while the subscription was being set up.
    pub fn register(&self, control: SubscriptionControl) -> Result<Subscription> {
        let control = Arc::new(control);
        let mut controls = lock(&self.controls);
        let Some(controls) = controls.as_mut() else {
            control.abort();
            return Err(Error::Closed);
        };
        controls.retain(|c| !c.is_closed());
        controls.push(control.clone());
        Ok(Subscription::new(control))
    }

    /// Subscriptions not yet closed.
    pub fn live(&self) -> usize {
        lock(&self.controls).as_ref().map_or(0, |controls| controls.iter().filter(|c| !c.is_closed()).count())
    }

    /// Refuses further subscriptions and closes every one registered, concurrently, all by `deadline`;
    /// returns the summed report.
    pub async fn close_all(&self, deadline: Instant) -> SubscriptionReport {
        let controls = lock(&self.controls).take().unwrap_or_default();
        let reports = futures_util::future::join_all(controls.iter().map(|c| c.close(deadline))).await;
        reports.into_iter().fold(SubscriptionReport::default(), |sum, r| SubscriptionReport {
            abandoned: sum.abandoned + r.abandoned,
            timed_out: sum.timed_out || r.timed_out,
        })
    }

    /// Aborts every subscription at once and refuses further ones (used when a bus is dropped without close).
    pub fn abort_all(&self) {
        for control in lock(&self.controls).take().unwrap_or_default() {
            control.abort();
        }
    }
}
