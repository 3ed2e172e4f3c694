//! Acknowledging an owned partition in bulk. The bus creates its partition consumers with JetStream's `AckAll`
//! policy: an ack of one message acknowledges every pending message of the consumer up to its stream sequence.
//! The partition's owner is its only puller, so its deliveries come in consumer-sequence order without gaps; its
//! workers settle them out of that order (one aggregate's handler may take longer than the next one's), so the
//! floor keeps the settled deliveries past the first unsettled one and acks only the settled prefix's delivery
//! of highest stream sequence. Workers only record what they settled and signal the subscription's fetch loop,
//! which sends the ack: one for as many deliveries as settled before it got round to it, and no worker holds
//! its aggregate while an ack is sent. Each ack is a message the server parses and applies; sparing most of
//! them raised a saturated server's throughput by about a tenth (docs/benchmarks.md).
//!
//! Every stream sequence up to the acked one was first delivered within the prefix (a consumer delivers new
//! messages in stream order), so the ack covers only handled messages. A delivery that is never settled
//! (skipped because the partition passed to another member, or left unhandled at close) holds the floor below
//! it: the settled deliveries after it stay unacknowledged, and the next owner, which starts at the first
//! unacknowledged message, handles them again — at least once, as before.
//!
//! An ack names the consumer by its name only, and under `AckAll` it also moves the consumer's delivery floor:
//! a late ack reaching a consumer that another member re-created under the same name would make the server
//! ignore that member's own acks. So a floor whose partition was lost sends nothing more
//! ([`AckFloor::abandon`]), and no ack is queued while the client is disconnected (it would go out on
//! reconnecting, possibly after a take-over). A late ack that gets through all the same shows as acked messages
//! delivered again ([`AckFloor::take_suspicion`]); the owner then checks the consumer and reads the partition
//! again through a fresh one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_nats::connection::State as ConnectionState;
use async_nats::jetstream::{self, AckKind};
use eventbus_core::{Error, Result};
use tokio::sync::Notify;

/// The settled prefix of an owned partition's deliveries, and the ack that covers it. `M` is the delivered
/// message (generic only for the tests).
pub(crate) struct AckFloor<M = jetstream::Message> {
    state: Mutex<State<M>>,
    /// Signalled when an ack falls due; the subscription's fetch loop sends it.
    acks_due: Arc<Notify>,
}

/// Where a delivery of an owned partition stands.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Placed {
    pub(crate) consumer_sequence: u64,
    pub(crate) stream_sequence: u64,
    /// The server delivered this message before.
    pub(crate) redelivered: bool,
}

/// A settled delivery.
struct Settled<M> {
    stream_sequence: u64,
    redelivered: bool,
    message: M,
}

struct State<M> {
    /// Consumer sequence through which every delivery is settled.
    through: u64,
    /// Highest stream sequence of the prefix, acknowledged or due.
    covered: u64,
    /// Highest stream sequence whose ack was sent. An ack dropped unsent (while disconnected, failed, or
    /// cancelled) brings `covered` back here, so the redeliveries of what it would have acknowledged are acked
    /// when they settle.
    acked: u64,
    /// The prefix's delivery of highest stream sequence, while its ack is not sent. Usually the last delivery;
    /// a redelivery of an older message can end the prefix with a lower stream sequence.
    due: Option<Settled<M>>,
    /// Settled deliveries after the first unsettled one, by consumer sequence.
    ahead: BTreeMap<u64, Settled<M>>,
    /// A caller is sending the due ack; others leave theirs to it.
    sending: bool,
    /// The partition passed to another member: nothing more is acked.
    abandoned: bool,
    /// A message whose ack was sent came again: the server did not apply that ack (lost on the way, or
    /// ignored because a foreign ack moved the consumer's delivery floor past it; see
    /// [`AckFloor::take_suspicion`]).
    suspect: bool,
}

impl<M> AckFloor<M> {
    fn state(&self) -> std::sync::MutexGuard<'_, State<M>> {
        // Every critical section leaves the state whole: a panic elsewhere does not poison its meaning.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<M: Clone> AckFloor<M> {
    /// A floor for deliveries from consumer sequence `next_delivery` on, signalling `acks_due` when an ack
    /// falls due.
    pub(crate) fn new(next_delivery: u64, acks_due: Arc<Notify>) -> Self {
        Self {
            acks_due,
            state: Mutex::new(State {
                through: next_delivery.saturating_sub(1),
                covered: 0,
                acked: 0,
                due: None,
                ahead: BTreeMap::new(),
                sending: false,
                abandoned: false,
                suspect: false,
            }),
        }
    }

    /// Records the delivery `placed` as settled (handled, or dead-lettered). Returns whether an ack fell due
    /// (the prefix grew past what is acknowledged, or took in a redelivery of what was), which is then
    /// signalled for [`AckFloor::send_due`].
    pub(crate) fn settle(&self, placed: Placed, message: M) -> bool {
        let Placed { consumer_sequence: sequence, stream_sequence, redelivered } = placed;
        let mut state = self.state();
        let state = &mut *state;
        if state.abandoned || sequence <= state.through {
            return false;
        }
        let settled = Settled { stream_sequence, redelivered, message };
        if sequence != state.through + 1 {
            state.ahead.insert(sequence, settled);
            return false;
        }
        state.through = sequence;
        let mut due = state.cover(settled);
        while let Some(next) = state.ahead.remove(&(state.through + 1)) {
            state.through += 1;
            due |= state.cover(next);
        }
        if due {
            self.acks_due.notify_one();
        }
        due
    }

    /// Whether every settled delivery of the prefix is acknowledged (its ack on the client's way to the
    /// server) or given up: until then the partition must not pass to another member.
    pub(crate) fn is_acknowledged(&self) -> bool {
        let state = self.state();
        state.due.is_none() && !state.sending
    }

    /// Gives the prefix up: the partition passed to another member without this one letting it go, so an ack
    /// could reach the consumer that member re-creates. What is settled and not acknowledged is handled again
    /// there.
    pub(crate) fn abandon(&self) {
        let mut state = self.state();
        state.abandoned = true;
        state.due = None;
        state.ahead.clear();
    }

    /// Whether a message whose ack was sent came again since the last call. Mostly an ack lost with a
    /// connection, which the redelivery's own ack makes good; but an ack of another member's (a late one, sent
    /// before it lost the partition) can have moved the consumer's delivery floor past this member's
    /// deliveries, and the server then ignores every ack of theirs: the caller checks the consumer, and
    /// [`suspect_again`](Self::suspect_again) when it could not.
    pub(crate) fn take_suspicion(&self) -> bool {
        std::mem::take(&mut self.state().suspect)
    }

    /// Keeps the suspicion [`take_suspicion`](Self::take_suspicion) took, for a check that did not happen.
    pub(crate) fn suspect_again(&self) {
        self.state().suspect = true;
    }

    /// Consumer sequence through which every delivery is settled.
    pub(crate) fn settled_through(&self) -> u64 {
        self.state().through
    }

    /// Deliveries settled behind an unsettled one, to report in progress: they stay unacknowledged until the
    /// floor reaches them, and the server would otherwise deliver them again after its ack wait.
    pub(crate) fn waiting_behind(&self) -> Vec<M> {
        self.state().ahead.values().map(|settled| settled.message.clone()).collect()
    }

    /// The turn to send the due ack, if one is due and no one else is sending.
    fn take_turn(&self) -> bool {
        let mut state = self.state();
        if state.sending || state.due.is_none() {
            return false;
        }
        state.sending = true;
        true
    }
}

impl<M> State<M> {
    /// Makes `settled` the due ack if it reaches further into the stream than what is already covered, or if
    /// it is a redelivery of what is covered reaching further than the ack due: the server delivered it again,
    /// so it never applied the ack that covered it (lost with a connection), and would go on redelivering it on
    /// a quiet partition. Returns whether it did.
    fn cover(&mut self, settled: Settled<M>) -> bool {
        if settled.redelivered && settled.stream_sequence <= self.acked {
            self.suspect = true;
        }
        let reaches_further = |due: &Settled<M>| due.stream_sequence < settled.stream_sequence;
        if settled.stream_sequence > self.covered {
            self.covered = settled.stream_sequence;
        } else if !(settled.redelivered && self.due.as_ref().is_none_or(reaches_further)) {
            return false;
        }
        self.due = Some(settled);
        true
    }
}

impl AckFloor {
    /// Sends the ack due, if one is and no one else is sending it: the fetch loop when signalled, and the
    /// partition's keeper before it lets the partition go (the fetch loop has stopped by then at close).
    pub(crate) async fn send_due(&self) -> Result<()> {
        if !self.take_turn() {
            return Ok(());
        }
        Sending { floor: self, taken: None }.send_one().await
    }

    /// Reports in progress the deliveries [`waiting_behind`](Self::waiting_behind) an unsettled one.
    pub(crate) async fn keep_waiting_alive(&self) {
        for message in self.waiting_behind() {
            if let Err(error) = message.ack_with(AckKind::Progress).await {
                tracing::debug!(%error, "in-progress notice for a settled delivery failed");
            }
        }
    }
}

/// The sending turn of one caller; given back when it ends, however it ends.
struct Sending<'a, M> {
    floor: &'a AckFloor<M>,
    /// Stream sequence of the ack taken and not yet known to be sent.
    taken: Option<u64>,
}

impl<M> Sending<'_, M> {
    /// Takes the due ack, if any.
    fn take(&mut self) -> Option<M> {
        let settled = self.floor.state().due.take()?;
        self.taken = Some(settled.stream_sequence);
        Some(settled.message)
    }

    /// The ack taken is on its way.
    fn sent(&mut self) {
        if let Some(stream_sequence) = self.taken.take() {
            let mut state = self.floor.state();
            state.acked = state.acked.max(stream_sequence);
        }
    }
}

impl Sending<'_, jetstream::Message> {
    /// Sends the due ack, if any, then gives the turn back.
    async fn send_one(mut self) -> Result<()> {
        let Some(message) = self.take() else { return Ok(()) };
        if message.context.client().connection_state() != ConnectionState::Connected {
            // Queued now, it would be sent on reconnecting, perhaps after another member took over. Dropped,
            // its messages are covered by a later ack, or acked when they are delivered again.
            tracing::debug!("not acking settled deliveries while disconnected");
            return Ok(());
        }
        message.ack().await.map_err(|e| Error::Broker { message: format!("ack failed: {e}"), source: None })?;
        self.sent();
        Ok(())
    }
}

impl<M> Drop for Sending<'_, M> {
    fn drop(&mut self) {
        let mut state = self.floor.state();
        state.sending = false;
        if self.taken.is_some() {
            // Not sent: what it covered is acked again once delivered again; an ack due since stays due.
            let due = state.due.as_ref().map_or(0, |due| due.stream_sequence);
            state.covered = state.acked.max(due);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floor(next_delivery: u64) -> AckFloor<u64> {
        AckFloor::new(next_delivery, Arc::new(Notify::new()))
    }

    /// Takes the due ack the way `send_due` does and reports it sent, returning it.
    fn send(floor: &AckFloor<u64>) -> Option<u64> {
        if !floor.take_turn() {
            return None;
        }
        let mut sending = Sending { floor, taken: None };
        let taken = sending.take();
        sending.sent();
        taken
    }

    /// Settles consumer sequence `n`, delivered first (stream sequence `n` too); the message is `n`.
    fn settle(floor: &AckFloor<u64>, n: u64) -> bool {
        at(floor, n, n)
    }

    /// Settles consumer sequence `n` carrying stream sequence `stream` (delivered again when `stream < n`); the
    /// message is `n`.
    fn at(floor: &AckFloor<u64>, n: u64, stream: u64) -> bool {
        floor.settle(Placed { consumer_sequence: n, stream_sequence: stream, redelivered: stream < n }, n)
    }

    #[test]
    fn one_ack_covers_the_prefix_settled_before_it_is_sent() {
        let floor = floor(1);
        assert!(settle(&floor, 1), "an ack falls due");
        assert!(settle(&floor, 2));
        assert!(settle(&floor, 3));
        assert!(!floor.is_acknowledged());
        assert_eq!(send(&floor), Some(3), "only the end of the prefix is acked");
        assert!(floor.is_acknowledged());
        assert_eq!(send(&floor), None, "nothing more is due");
    }

    #[test]
    fn a_settle_signals_the_sender() {
        let acks_due = Arc::new(Notify::new());
        let floor = AckFloor::new(1, acks_due.clone());
        let signalled = acks_due.notified();
        tokio::pin!(signalled);
        assert!(futures_util::FutureExt::now_or_never(signalled.as_mut()).is_none());
        settle(&floor, 1);
        assert!(futures_util::FutureExt::now_or_never(signalled).is_some(), "the fetch loop is woken");
    }

    #[test]
    fn one_sender_at_a_time_and_what_falls_due_meanwhile_is_sent_next() {
        let floor = floor(1);
        settle(&floor, 1);
        assert!(floor.take_turn());
        assert!(!floor.take_turn(), "one sender at a time");
        let mut sending = Sending { floor: &floor, taken: None };
        assert_eq!(sending.take(), Some(1));
        assert!(settle(&floor, 2), "due while 1 is being sent");
        sending.sent();
        drop(sending);
        assert!(!floor.is_acknowledged());
        assert_eq!(send(&floor), Some(2));
    }

    #[test]
    fn settled_deliveries_past_a_gap_wait_for_it() {
        let floor = floor(10);
        assert!(!settle(&floor, 11));
        assert!(!settle(&floor, 13));
        assert!(floor.is_acknowledged(), "nothing of the prefix is settled yet");
        assert!(settle(&floor, 10));
        assert_eq!(send(&floor), Some(11), "13 waits behind the unsettled 12");
        assert_eq!(floor.waiting_behind(), vec![13]);
        assert!(settle(&floor, 12));
        assert_eq!(send(&floor), Some(13));
        assert!(floor.waiting_behind().is_empty());
        assert!(!settle(&floor, 12), "a sequence already covered is ignored");
    }

    #[test]
    fn the_ack_goes_to_the_delivery_reaching_furthest_into_the_stream() {
        let floor = floor(1);
        // Stream message 2 delivered again as delivery 4, after 3: the prefix ends with the older message.
        assert!(at(&floor, 1, 1));
        assert!(!at(&floor, 3, 3));
        assert!(!at(&floor, 4, 2));
        assert!(at(&floor, 2, 2));
        assert_eq!(send(&floor), Some(3), "the ack of delivery 4 would leave stream message 3 pending");
        assert!(floor.is_acknowledged());
    }

    #[test]
    fn a_redelivery_of_what_was_acked_is_acked_again() {
        let floor = floor(1);
        settle(&floor, 1);
        settle(&floor, 2);
        assert_eq!(send(&floor), Some(2));
        // The ack never reached the server (a connection lost with it): 1 and 2 come again as 3 and 4.
        assert!(at(&floor, 3, 1), "the server did not apply the ack that covered it");
        assert!(at(&floor, 4, 2), "the ack due moves to the redelivery reaching furthest");
        assert!(!at(&floor, 5, 1), "but never back");
        assert_eq!(send(&floor), Some(4));
        assert!(floor.take_suspicion(), "acked messages came again");
        assert!(!floor.take_suspicion(), "reported once");
        settle(&floor, 6);
        assert!(!at(&floor, 7, 2), "a redelivery behind a newer due ack is covered by it");
        assert_eq!(send(&floor), Some(6));
    }

    #[test]
    fn an_ack_dropped_unsent_is_made_again_by_the_redeliveries() {
        let floor = floor(1);
        settle(&floor, 1);
        assert_eq!(send(&floor), Some(1));
        settle(&floor, 2);
        settle(&floor, 3);
        assert!(floor.take_turn());
        let mut sending = Sending { floor: &floor, taken: None };
        assert_eq!(sending.take(), Some(3));
        drop(sending);
        assert!(floor.is_acknowledged(), "nothing is due: the ack was taken");
        // The server delivers stream messages 2 and 3 again, as deliveries 4 and 5.
        assert!(at(&floor, 4, 2), "stream message 2 is no longer counted as covered");
        assert!(at(&floor, 5, 3));
        assert_eq!(send(&floor), Some(5));
    }

    #[test]
    fn an_ack_dropped_unsent_leaves_the_newer_ack_due_in_place() {
        let floor = floor(1);
        settle(&floor, 1);
        assert!(floor.take_turn());
        let mut sending = Sending { floor: &floor, taken: None };
        assert_eq!(sending.take(), Some(1));
        settle(&floor, 2);
        drop(sending);
        assert!(!at(&floor, 3, 1), "the redelivery of 1 is covered by the ack of 2 still due");
        assert_eq!(send(&floor), Some(2));
    }

    #[test]
    fn a_sender_dropped_before_taking_leaves_the_ack_due() {
        let floor = floor(1);
        settle(&floor, 1);
        assert!(floor.take_turn());
        drop(Sending { floor: &floor, taken: None });
        assert!(!floor.is_acknowledged(), "the ack of 1 is still due");
        assert_eq!(send(&floor), Some(1), "and the next sender sends it");
    }

    #[test]
    fn an_abandoned_floor_acks_nothing_more() {
        let floor = floor(1);
        assert!(!settle(&floor, 2));
        assert!(settle(&floor, 1));
        floor.abandon();
        assert_eq!(send(&floor), None, "the due ack is dropped");
        assert!(floor.is_acknowledged(), "the partition can be let go");
        assert!(!settle(&floor, 3));
        assert!(floor.waiting_behind().is_empty());
    }
}
