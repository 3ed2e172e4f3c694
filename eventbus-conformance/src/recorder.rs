//! Records what handlers receive and counts order violations, duplicates and losses.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use eventbus::Envelope;
use tokio::sync::Notify;

/// What a consumer group received, per aggregate.
#[derive(Default)]
pub struct Recorder {
    state: Mutex<State>,
    progress: Notify,
}

#[derive(Default)]
struct State {
    aggregates: HashMap<String, Aggregate>,
    deliveries: usize,
    distinct: usize,
    duplicates: usize,
    violations: usize,
    first_violation: Option<String>,
}

#[derive(Default)]
struct Aggregate {
    last: u64,
    seen: Vec<u64>,
}

/// Counts after a run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Handler deliveries recorded (duplicates included).
    pub deliveries: usize,
    /// Distinct events (aggregate, version) received.
    pub distinct: usize,
    /// Events received more than once.
    pub duplicates: usize,
    /// Events received out of order: not the successor of the last version seen for their aggregate.
    pub violations: usize,
    /// Events expected and never received.
    pub losses: usize,
}

impl std::fmt::Display for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "delivered={} violations={} losses={} duplicates={}",
            self.deliveries, self.violations, self.losses, self.duplicates
        )
    }
}

impl Recorder {
    /// Records one delivered event.
    pub fn record(&self, envelope: &Envelope) {
        let mut state = self.state.lock().unwrap();
        state.deliveries += 1;
        let aggregate = state.aggregates.entry(envelope.aggregate_id.clone()).or_default();
        let version = envelope.event_version;
        let (duplicate, violation) = if aggregate.seen.contains(&version) {
            (true, false)
        } else {
            aggregate.seen.push(version);
            let in_order = version == aggregate.last + 1;
            aggregate.last = aggregate.last.max(version);
            (false, !in_order)
        };
        if duplicate {
            state.duplicates += 1;
        } else {
            state.distinct += 1;
        }
        if violation {
            state.violations += 1;
            if state.first_violation.is_none() {
                state.first_violation = Some(format!("{} v{version}", envelope.aggregate_id));
            }
        }
        drop(state);
        self.progress.notify_waiters();
    }

    /// Distinct events received so far.
    pub fn distinct(&self) -> usize {
        self.state.lock().unwrap().distinct
    }

    /// Versions received for `aggregate`, in arrival order (duplicates excluded).
    pub fn versions(&self, aggregate: &str) -> Vec<u64> {
        let state = self.state.lock().unwrap();
        state.aggregates.get(aggregate).map(|a| a.seen.clone()).unwrap_or_default()
    }

    /// The first out-of-order event, if any.
    pub fn first_violation(&self) -> Option<String> {
        self.state.lock().unwrap().first_violation.clone()
    }

    /// Waits until `expected` distinct events have arrived, at most `within`. Returns whether they did.
    pub async fn wait_for(&self, expected: usize, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.progress.notified();
            if self.distinct() >= expected {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.distinct() >= expected;
            }
        }
    }

    /// Counts against `expected` distinct events.
    pub fn tally(&self, expected: usize) -> Tally {
        let state = self.state.lock().unwrap();
        Tally {
            deliveries: state.deliveries,
            distinct: state.distinct,
            duplicates: state.duplicates,
            violations: state.violations,
            losses: expected.saturating_sub(state.distinct),
        }
    }
}
