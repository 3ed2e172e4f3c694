//! Lock-free counters behind [`Metrics`].

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use crate::bus::Metrics;

/// Counters a backend shares between its publish window, its subscriptions and `metrics()`.
///
/// Every thread counts on cache lines of its own, summed when read: publishes and deliveries bump a counter
/// each on every runtime thread, and counters on one shared line made those threads take the line from each
/// other several times per event.
#[derive(Debug)]
pub struct Counters {
    shards: Box<[Shard]>,
}

/// One thread's counts, indexed by [`Counter`].
#[derive(Debug, Default)]
#[repr(align(128))]
struct Shard([AtomicU64; Counter::COUNT]);

/// Shards per [`Counters`]; threads beyond this many share them.
const SHARDS: usize = 16;

thread_local! {
    /// This thread's shard, the same in every `Counters`.
    static SHARD: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Relaxed) % SHARDS
    };
}

/// What [`Counters`] count.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Counter {
    Published,
    PublishFailed,
    PublishRejected,
    HandlerCalls,
    HandlerFailures,
    Acked,
    DeadLettered,
    Undecodable,
}

impl Counter {
    const COUNT: usize = Counter::Undecodable as usize + 1;
}

impl Default for Counters {
    fn default() -> Self {
        Self { shards: (0..SHARDS).map(|_| Shard::default()).collect() }
    }
}

impl Counters {
    /// Counts a publish rejected before it was sent.
    pub fn publish_rejected(&self) {
        self.bump(Counter::PublishRejected);
    }

    /// Adds one to `counter`.
    pub(crate) fn bump(&self, counter: Counter) {
        // A thread whose locals are already gone (counting from a destructor) uses the first shard.
        let shard = SHARD.try_with(|shard| *shard).unwrap_or(0);
        self.shards[shard].0[counter as usize].fetch_add(1, Relaxed);
    }

    fn total(&self, counter: Counter) -> u64 {
        self.shards.iter().map(|shard| shard.0[counter as usize].load(Relaxed)).sum()
    }

    /// A snapshot; `in_flight` and `subscriptions` come from their owners.
    pub fn snapshot(&self, in_flight: u64, subscriptions: u64) -> Metrics {
        Metrics {
            published: self.total(Counter::Published),
            publish_failed: self.total(Counter::PublishFailed),
            publish_rejected: self.total(Counter::PublishRejected),
            in_flight,
            handler_calls: self.total(Counter::HandlerCalls),
            handler_failures: self.total(Counter::HandlerFailures),
            acked: self.total(Counter::Acked),
            dead_lettered: self.total(Counter::DeadLettered),
            undecodable: self.total(Counter::Undecodable),
            subscriptions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_from_every_thread_add_up() {
        let counters = Counters::default();
        std::thread::scope(|scope| {
            for _ in 0..20 {
                scope.spawn(|| {
                    for _ in 0..100 {
                        counters.bump(Counter::Acked);
                    }
                    counters.bump(Counter::Undecodable);
                });
            }
        });
        let metrics = counters.snapshot(3, 2);
        assert_eq!((metrics.acked, metrics.undecodable, metrics.published), (2000, 20, 0));
        assert_eq!((metrics.in_flight, metrics.subscriptions), (3, 2));
    }
}
