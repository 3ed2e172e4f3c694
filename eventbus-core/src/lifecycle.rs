//! What every backend's bus holds besides its broker client: the counters, the publish window, the
//! subscriptions, and the closing state — with the close sequence they share.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::bus::{CloseReport, Metrics, PublishResults};
use crate::config::BusConfig;
use crate::inflight::{PublishWindow, WindowSlot};
use crate::metrics::Counters;
use crate::subscription::SubscriptionRegistry;
use crate::{Error, Result};

/// The backend-independent half of a bus. A backend keeps one, routes publishes through
/// [`admit`](Self::admit) and the [`window`](Self::window), registers subscriptions with
/// [`subscriptions`](Self::subscriptions), and closes through [`close`](Self::close).
pub struct BusCore {
    /// Counters behind `metrics()`.
    pub counters: Arc<Counters>,
    /// The in-flight publish window.
    pub window: PublishWindow,
    /// Every live subscription.
    pub subscriptions: SubscriptionRegistry,
    closed: AtomicBool,
    close_timeout: Duration,
    close_report: tokio::sync::Mutex<Option<CloseReport>>,
}

impl BusCore {
    /// Starts the window's collector on the current tokio runtime.
    pub fn new(config: &BusConfig) -> Self {
        let counters = Arc::new(Counters::default());
        Self {
            window: PublishWindow::new(&config.publish, counters.clone()),
            counters,
            subscriptions: SubscriptionRegistry::new(),
            closed: AtomicBool::new(false),
            close_timeout: config.close_timeout,
            close_report: tokio::sync::Mutex::new(None),
        }
    }

    /// Fails with [`Error::Closed`] once `close()` began or the bus was dropped.
    pub fn ensure_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    /// Counts `result` as a rejected publish when it is an error, and passes it on.
    pub fn count_rejection<T>(&self, result: Result<T>) -> Result<T> {
        if result.is_err() {
            self.counters.publish_rejected();
        }
        result
    }

    /// Admits one publish whose input was already checked: the bus must be open and the window must free a
    /// slot within `publish.enqueue_timeout`. Refusals are counted.
    pub async fn admit(&self) -> Result<WindowSlot> {
        self.count_rejection(self.ensure_open())?;
        let slot = self.window.reserve().await;
        self.count_rejection(slot)
    }

    /// The counters, with what is in flight and the live subscriptions.
    pub fn metrics(&self) -> Metrics {
        self.counters.snapshot(self.window.in_flight(), self.subscriptions.live() as u64)
    }

    /// The publish-result stream, once.
    pub fn publish_results(&self) -> Option<PublishResults> {
        self.window.take_results()
    }

    /// Refuses publishes, settles the window and closes every subscription — concurrently, by one
    /// `close_timeout` deadline — then runs the backend's `teardown` with that deadline (closing its
    /// connection). Idempotent: later calls return the first report.
    pub async fn close<F, Fut>(&self, teardown: F) -> CloseReport
    where
        F: FnOnce(Instant) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut report = self.close_report.lock().await;
        if let Some(report) = &*report {
            return report.clone();
        }
        let started = Instant::now();
        let deadline = started + self.close_timeout;
        self.closed.store(true, Ordering::Release);
        let (unacked, subscriptions) =
            tokio::join!(self.window.close(deadline), self.subscriptions.close_all(deadline));
        teardown(deadline).await;
        let timed_out = subscriptions.timed_out || !unacked.is_empty() || Instant::now() > deadline;
        let closed = CloseReport::new(unacked, subscriptions.abandoned, timed_out, started.elapsed());
        *report = Some(closed.clone());
        closed
    }

    /// Stops everything at once, for a bus dropped without `close()`: publishes are refused and every
    /// subscription's tasks are aborted. The window's collector ends when the core is dropped.
    pub fn abort(&self) {
        self.closed.store(true, Ordering::Release);
        self.subscriptions.abort_all();
    }
}
