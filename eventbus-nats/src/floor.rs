//! Acknowledging an owned partition in bulk. The bus creates its partition consumers with JetStream's `AckAll`
//! policy: an ack of one message acknowledges every pending message of the consumer up to its stream sequence.
//! The partition's owner is its only puller, so its deliveries come in consumer-sequence order without gaps; its
//! workers settle them out of that order (one aggregate's handler may take longer than the next one's), so the
//! floor keeps the settled deliveries past the first unsettled one and acks only the settled prefix's delivery
//! of highest stream sequence, once for as many deliveries as settled meanwhile. Each ack is a message the
//! server parses and applies; sparing most of them raised a saturated server's throughput by about a tenth
//! (docs/benchmarks.md).
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
//! reconnecting, possibly after a take-over).

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_nats::connection::State as ConnectionState;
use async_nats::jetstream::{self, AckKind};
use eventbus_core::{Error, Result};

/// The settled prefix of an owned partition's deliveries, and the ack that covers it. `M` is the delivered
/// message (generic only for the tests).
pub(crate) struct AckFloor<M = jetstream::Message> {
    state: Mutex<State<M>>,
}

/// A settled delivery.
struct Settled<M> {
    stream_sequence: u64,
    message: M,
}

struct State<M> {
    /// Consumer sequence through which every delivery is settled.
    through: u64,
    /// Highest stream sequence of the prefix, acknowledged or due.
    covered: u64,
    /// The prefix's delivery of highest stream sequence, while its ack is not sent. Usually the last delivery;
    /// a redelivery of an older message can end the prefix with a lower stream sequence.
    due: Option<Settled<M>>,
    /// Settled deliveries after the first unsettled one, by consumer sequence.
    ahead: BTreeMap<u64, Settled<M>>,
    /// A caller is sending the due ack; others leave theirs to it.
    sending: bool,
    /// The partition passed to another member: nothing more is acked.
    abandoned: bool,
}

impl<M> AckFloor<M> {
    fn state(&self) -> std::sync::MutexGuard<'_, State<M>> {
        // Every critical section leaves the state whole: a panic elsewhere does not poison its meaning.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<M: Clone> AckFloor<M> {
    /// A floor for deliveries from consumer sequence `next_delivery` on.
    pub(crate) fn new(next_delivery: u64) -> Self {
        Self {
            state: Mutex::new(State {
                through: next_delivery.saturating_sub(1),
                covered: 0,
                due: None,
                ahead: BTreeMap::new(),
                sending: false,
                abandoned: false,
            }),
        }
    }

    /// Records the delivery of consumer sequence `sequence` and stream sequence `stream_sequence` as settled
    /// (handled, or dead-lettered). Returns whether the caller is to send the ack now due
    /// ([`AckFloor::send_due`]): true when the prefix grew past what is acknowledged and no other caller is
    /// sending.
    pub(crate) fn settle(&self, sequence: u64, stream_sequence: u64, message: M) -> bool {
        let mut state = self.state();
        let state = &mut *state;
        if state.abandoned || sequence <= state.through {
            return false;
        }
        let settled = Settled { stream_sequence, message };
        if sequence != state.through + 1 {
            state.ahead.insert(sequence, settled);
            return false;
        }
        state.through = sequence;
        state.cover(settled);
        while let Some(next) = state.ahead.remove(&(state.through + 1)) {
            state.through += 1;
            state.cover(next);
        }
        state.take_turn()
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

    /// Deliveries settled behind an unsettled one, to report in progress: they stay unacknowledged until the
    /// floor reaches them, and the server would otherwise deliver them again after its ack wait.
    pub(crate) fn waiting_behind(&self) -> Vec<M> {
        self.state().ahead.values().map(|settled| settled.message.clone()).collect()
    }

    /// The turn to send an ack due with no one sending it (its sender failed or was cancelled).
    fn take_unsent(&self) -> bool {
        let mut state = self.state();
        state.due.is_some() && state.take_turn()
    }
}

impl<M> State<M> {
    /// Makes `settled` the due ack if it reaches further into the stream than what is already covered.
    fn cover(&mut self, settled: Settled<M>) {
        if settled.stream_sequence > self.covered {
            self.covered = settled.stream_sequence;
            self.due = Some(settled);
        }
    }

    /// Takes the sending turn if no one has it and an ack is due.
    fn take_turn(&mut self) -> bool {
        if self.sending || self.due.is_none() {
            return false;
        }
        self.sending = true;
        true
    }
}

impl AckFloor {
    /// Sends the due ack, and again while settling goes on meanwhile, until none is due. Called by the one
    /// caller [`settle`](AckFloor::settle) chose. Dropped half-way, it gives the turn back and the ack waits for
    /// the next settle or [`send_unsent`](AckFloor::send_unsent).
    pub(crate) async fn send_due(&self) -> Result<()> {
        let sending = Sending { floor: self, done: false };
        // Workers finishing beside this one settle first, so one ack covers their deliveries too.
        tokio::task::yield_now().await;
        sending.send_all().await
    }

    /// Sends an ack left due by a sender that failed or was cancelled, unless another caller is sending.
    pub(crate) async fn send_unsent(&self) -> Result<()> {
        if !self.take_unsent() {
            return Ok(());
        }
        Sending { floor: self, done: false }.send_all().await
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

impl<M> Sending<'_, M> {
    /// The due ack, or `None` (and the turn given back) when none is.
    fn next_due(&mut self) -> Option<M> {
        let mut state = self.floor.state();
        let due = state.due.take();
        if due.is_none() {
            state.sending = false;
            self.done = true;
        }
        due.map(|settled| settled.message)
    }
}

impl Sending<'_, jetstream::Message> {
    /// Sends due acks until none is. A failed send is reported once the turn is given back; what it would
    /// have acknowledged is delivered again.
    async fn send_all(mut self) -> Result<()> {
        let mut failure = None;
        while let Some(message) = self.next_due() {
            if message.context.client().connection_state() != ConnectionState::Connected {
                // Queued now, it would be sent on reconnecting, perhaps after another member took over. Left
                // out, its messages are covered by a later ack, or delivered again.
                tracing::debug!("not acking settled deliveries while disconnected");
                continue;
            }
            if let Err(error) = message.ack().await {
                failure.get_or_insert(Error::Broker { message: format!("ack failed: {error}"), source: None });
            }
        }
        failure.map_or(Ok(()), Err)
    }
}

impl<M> Drop for Sending<'_, M> {
    fn drop(&mut self) {
        if !self.done {
            self.floor.state().sending = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes every due ack the way `send_due` does, returning the ones it would send.
    fn send(floor: &AckFloor<u64>) -> Vec<u64> {
        let mut sending = Sending { floor, done: false };
        std::iter::from_fn(|| sending.next_due()).collect()
    }

    /// Settles consumer sequence `n`, delivered first (stream sequence `n` too); the message is `n`.
    fn settle(floor: &AckFloor<u64>, n: u64) -> bool {
        floor.settle(n, n, n)
    }

    #[test]
    fn one_ack_covers_the_prefix_settled_while_another_is_sent() {
        let floor = AckFloor::new(1);
        assert!(settle(&floor, 1), "the first settle sends");
        assert!(!settle(&floor, 2), "a settle while sending leaves it to the sender");
        assert!(!settle(&floor, 3));
        assert!(!floor.is_acknowledged());
        assert_eq!(send(&floor), vec![3], "only the end of the prefix is acked");
        assert!(floor.is_acknowledged());
        assert!(settle(&floor, 4), "the turn was given back");
    }

    #[test]
    fn settled_deliveries_past_a_gap_wait_for_it() {
        let floor = AckFloor::new(10);
        assert!(!settle(&floor, 11));
        assert!(!settle(&floor, 13));
        assert!(floor.is_acknowledged(), "nothing of the prefix is settled yet");
        assert!(settle(&floor, 10));
        assert_eq!(send(&floor), vec![11], "13 waits behind the unsettled 12");
        assert_eq!(floor.waiting_behind(), vec![13]);
        assert!(settle(&floor, 12));
        assert_eq!(send(&floor), vec![13]);
        assert!(floor.waiting_behind().is_empty());
        assert!(!settle(&floor, 12), "a sequence already covered is ignored");
    }

    #[test]
    fn the_ack_goes_to_the_delivery_reaching_furthest_into_the_stream() {
        let floor = AckFloor::new(1);
        // Stream message 2 delivered again as delivery 4, after 3: the prefix ends with the older message.
        assert!(floor.settle(1, 1, 1));
        assert!(!floor.settle(3, 3, 3));
        assert!(!floor.settle(4, 2, 4));
        assert!(!floor.settle(2, 2, 2));
        assert_eq!(send(&floor), vec![3], "the ack of delivery 4 would leave stream message 3 pending");
        assert!(!floor.settle(5, 3, 5), "a redelivery of what is covered needs no ack");
        assert!(floor.is_acknowledged());
    }

    #[test]
    fn a_sender_dropped_half_way_leaves_the_ack_to_the_next_sender() {
        let floor = AckFloor::new(1);
        assert!(settle(&floor, 1));
        drop(Sending { floor: &floor, done: false });
        assert!(!floor.is_acknowledged(), "the ack of 1 is still due");
        assert!(floor.take_unsent(), "the ack left due can be sent by anyone");
        assert!(!floor.take_unsent(), "but by one at a time");
        assert_eq!(send(&floor), vec![1]);
        assert!(!floor.take_unsent(), "nothing left");
    }

    #[test]
    fn an_abandoned_floor_acks_nothing_more() {
        let floor = AckFloor::new(1);
        assert!(!settle(&floor, 2));
        assert!(settle(&floor, 1));
        floor.abandon();
        assert!(send(&floor).is_empty(), "the due ack is dropped");
        assert!(floor.is_acknowledged(), "the partition can be let go");
        assert!(!settle(&floor, 3));
        assert!(floor.waiting_behind().is_empty());
    }
}
