//! Acknowledging an owned partition in bulk. The bus creates its partition consumers with JetStream's `AckAll`
//! policy: an ack of one message acknowledges every message the consumer delivered before it. The partition's
//! owner is its only puller, so its deliveries come in consumer-sequence order without gaps; its workers settle
//! them out of that order (one aggregate's handler may take longer than the next one's), so the floor keeps the
//! settled deliveries past the first unsettled one and acks only the last delivery of the settled prefix, once
//! for as many deliveries as settled meanwhile. Each ack is a message the server parses and applies; sparing
//! most of them raised a saturated server's throughput by about a tenth (docs/benchmarks.md).
//!
//! A delivery that is never settled (skipped because the partition passed to another member, or left unhandled
//! at close) holds the floor below it: the settled deliveries after it are left unacknowledged, and the next
//! owner, which starts at the first unacknowledged message, handles them again — at least once, as before.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use eventbus_core::{Error, Result};

/// The settled prefix of an owned partition's deliveries, and the ack that covers it. `M` is the delivered
/// message (generic only for the tests).
pub(crate) struct AckFloor<M = jetstream::Message> {
    state: Mutex<State<M>>,
}

struct State<M> {
    /// Consumer sequence through which every delivery is settled.
    through: u64,
    /// The delivery at `through`, while its ack is not sent: acking it acknowledges the whole prefix.
    due: Option<M>,
    /// Settled deliveries after the first unsettled one, by consumer sequence.
    ahead: BTreeMap<u64, M>,
    /// A worker is sending the due ack; others leave theirs to it.
    sending: bool,
    /// When the deliveries in `ahead` were last reported in progress.
    kept_alive: Instant,
}

impl<M: Clone> AckFloor<M> {
    /// A floor for deliveries from consumer sequence `next_delivery` on.
    pub(crate) fn new(next_delivery: u64) -> Self {
        Self {
            state: Mutex::new(State {
                through: next_delivery.saturating_sub(1),
                due: None,
                ahead: BTreeMap::new(),
                sending: false,
                kept_alive: Instant::now(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State<M>> {
        // Every critical section leaves the state whole: a panic elsewhere does not poison its meaning.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records delivery `sequence` as settled (handled, or dead-lettered). Returns whether the caller is to
    /// send the ack now due ([`AckFloor::send_due`]): true when the prefix grew and no other caller is
    /// sending.
    pub(crate) fn settle(&self, sequence: u64, message: M) -> bool {
        let mut state = self.state();
        if sequence <= state.through {
            return false;
        }
        if sequence != state.through + 1 {
            if state.ahead.is_empty() {
                state.kept_alive = Instant::now();
            }
            state.ahead.insert(sequence, message);
            return false;
        }
        let state = &mut *state;
        state.through = sequence;
        state.due = Some(message);
        while let Some(next) = state.ahead.first_entry() {
            if *next.key() != state.through + 1 {
                break;
            }
            state.through += 1;
            state.due = Some(next.remove());
        }
        !std::mem::replace(&mut state.sending, true)
    }

    /// Whether every settled delivery of the prefix is acknowledged (its ack on the client's way to the
    /// server): until then the partition must not pass to another member, whose consumer would take a late
    /// ack as its own.
    pub(crate) fn is_acknowledged(&self) -> bool {
        let state = self.state();
        state.due.is_none() && !state.sending
    }

    /// Deliveries settled behind an unsettled one, to report in progress, when they last were `interval` ago
    /// or longer: they stay unacknowledged until the floor reaches them, and the server would otherwise
    /// deliver them again after its ack wait.
    pub(crate) fn waiting_behind(&self, interval: Duration) -> Vec<M> {
        let mut state = self.state();
        if state.ahead.is_empty() || state.kept_alive.elapsed() < interval {
            return Vec::new();
        }
        state.kept_alive = Instant::now();
        state.ahead.values().cloned().collect()
    }
}

impl AckFloor {
    /// Sends the due ack, and again while settling goes on meanwhile, until none is due. Called by the one
    /// caller [`settle`](Self::settle) chose; dropped half-way, it leaves the sending to the next settle.
    pub(crate) async fn send_due(&self) -> Result<()> {
        let mut sending = Sending { floor: self, done: false };
        // Workers finishing beside this one settle first, so one ack covers their deliveries too.
        tokio::task::yield_now().await;
        while let Some(message) = sending.next_due() {
            message.ack().await.map_err(|e| Error::Broker { message: format!("ack failed: {e}"), source: None })?;
        }
        sending.done = true;
        Ok(())
    }

    /// Reports `messages` in progress (see [`waiting_behind`](Self::waiting_behind)).
    pub(crate) async fn keep_alive(messages: Vec<jetstream::Message>) {
        for message in messages {
            if let Err(error) = message.ack_with(AckKind::Progress).await {
                tracing::debug!(%error, "in-progress notice for a settled delivery failed");
            }
        }
    }
}

/// The sending turn of one caller; given back when it ends, however it ends.
struct Sending<'a, M> {
    floor: &'a AckFloor<M>,
    /// Ended by finding nothing due, which already gave the turn back.
    done: bool,
}

impl<M: Clone> Sending<'_, M> {
    /// The due ack, or `None` (and the turn given back) when none is.
    fn next_due(&mut self) -> Option<M> {
        let mut state = self.floor.state();
        let due = state.due.take();
        if due.is_none() {
            state.sending = false;
        }
        due
    }
}

impl<M> Drop for Sending<'_, M> {
    fn drop(&mut self) {
        if !self.done {
            self.floor.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner).sending = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes every due ack the way `send_due` does, returning the ones it would send.
    fn send(floor: &AckFloor<u64>) -> Vec<u64> {
        let mut sending = Sending { floor, done: false };
        let sent: Vec<u64> = std::iter::from_fn(|| sending.next_due()).collect();
        sending.done = true;
        sent
    }

    #[test]
    fn one_ack_covers_the_prefix_settled_while_another_is_sent() {
        let floor = AckFloor::new(1);
        assert!(floor.settle(1, 1), "the first settle sends");
        assert!(!floor.settle(2, 2), "a settle while sending leaves it to the sender");
        assert!(!floor.settle(3, 3));
        assert!(!floor.is_acknowledged());
        assert_eq!(send(&floor), vec![3], "only the end of the prefix is acked");
        assert!(floor.is_acknowledged());
        assert!(floor.settle(4, 4), "the turn was given back");
    }

    #[test]
    fn settled_deliveries_past_a_gap_wait_for_it() {
        let floor = AckFloor::new(10);
        assert!(!floor.settle(11, 11));
        assert!(!floor.settle(13, 13));
        assert!(floor.is_acknowledged(), "nothing of the prefix is settled yet");
        assert!(floor.settle(10, 10));
        assert_eq!(send(&floor), vec![11], "13 waits behind the unsettled 12");
        assert_eq!(floor.waiting_behind(Duration::ZERO), vec![13]);
        assert!(floor.settle(12, 12));
        assert_eq!(send(&floor), vec![13]);
        assert!(floor.waiting_behind(Duration::ZERO).is_empty());
        assert!(!floor.settle(12, 12), "a sequence already covered is ignored");
    }

    #[test]
    fn a_sender_dropped_half_way_gives_the_turn_back() {
        let floor = AckFloor::new(1);
        assert!(floor.settle(1, 1));
        drop(Sending { floor: &floor, done: false });
        assert!(!floor.is_acknowledged(), "the ack of 1 is still due");
        assert!(floor.settle(2, 2), "the next settle sends");
        assert_eq!(send(&floor), vec![2]);
    }

    #[test]
    fn deliveries_waiting_behind_a_gap_are_reported_once_per_interval() {
        let floor = AckFloor::new(1);
        floor.settle(2, 2);
        assert!(floor.waiting_behind(Duration::from_secs(60)).is_empty(), "not yet due");
        assert_eq!(floor.waiting_behind(Duration::ZERO), vec![2]);
    }
}
