//! Lock-free counters behind [`Metrics`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::bus::Metrics;

/// Counters a backend shares between its publish window, its subscriptions and `metrics()`.
#[derive(Debug, Default)]
pub struct Counters {
    pub(crate) published: AtomicU64,
    pub(crate) publish_failed: AtomicU64,
    pub(crate) publish_rejected: AtomicU64,
    pub(crate) handler_calls: AtomicU64,
    pub(crate) handler_failures: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) undecodable: AtomicU64,
}

impl Counters {
    /// Counts a publish rejected before it was sent.
    pub fn publish_rejected(&self) {
        self.publish_rejected.fetch_add(1, Relaxed);
    }

    /// A snapshot; `in_flight` and `subscriptions` come from their owners.
    pub fn snapshot(&self, in_flight: u64, subscriptions: u64) -> Metrics {
        Metrics {
            published: self.published.load(Relaxed),
            publish_failed: self.publish_failed.load(Relaxed),
            publish_rejected: self.publish_rejected.load(Relaxed),
            in_flight,
            handler_calls: self.handler_calls.load(Relaxed),
            handler_failures: self.handler_failures.load(Relaxed),
            acked: self.acked.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            undecodable: self.undecodable.load(Relaxed),
            subscriptions,
        }
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}
