//! Which offsets of each assigned partition are in flight, so offsets are committed only up to the contiguous
//! prefix of handled records: a crash never skips a record that was not handled.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Offsets in flight per partition of one subscription's consumer.
#[derive(Default)]
pub(crate) struct Tracker {
    state: Mutex<State>,
    settled: Condvar,
    /// Bumped (under the lock) on every assignment and revocation; deliveries of an older generation are stale.
    /// Readable without the lock: while it has not moved since a delivery was received, no partition was
    /// assigned or revoked, and the delivery is current.
    generation: AtomicU64,
}

#[derive(Default)]
struct State {
    /// A B-tree rather than a hash map: a member holds a few partitions, found in a node or two without hashing.
    partitions: BTreeMap<i32, Partition>,
    /// Threads blocked in `wait_settled_blocking` (settling notifies only when there are some).
    waiters: usize,
}

struct Partition {
    /// The assignment this state belongs to; tickets of another assignment of the same partition are ignored.
    epoch: u64,
    generation: u64,
    /// Offsets handed to the dispatcher, ascending, each with whether it has been settled (handled or handed
    /// back). The first is always unsettled: settled offsets leave from the front.
    in_flight: VecDeque<(i64, bool)>,
    /// Handed back unhandled (the subscription closed or the partition was revoked): not to be committed past.
    returned: BTreeSet<i64>,
    /// One past the highest offset received.
    next: i64,
    /// Last position committed (or queued for commit).
    committed: i64,
}

impl Partition {
    /// Records `offset` as handed to the dispatcher. Records arrive in offset order, so this appends; an offset
    /// out of order (read again) is put in its place, or made unsettled again if it is still there.
    fn receive(&mut self, offset: i64) {
        match self.in_flight.back() {
            Some(&(last, _)) if last >= offset => match self.in_flight.binary_search_by_key(&offset, |&(o, _)| o) {
                Ok(at) => self.in_flight[at].1 = false,
                Err(at) => self.in_flight.insert(at, (offset, false)),
            },
            _ => self.in_flight.push_back((offset, false)),
        }
        self.next = self.next.max(offset + 1);
    }

    /// Where `offset` is in flight, if it is.
    fn index_of(&self, offset: i64) -> Option<usize> {
        // A partition's offsets are nearly always consecutive: the offset's distance from the front is its
        // place, and the search is only for the gaps compaction or transaction markers leave.
        let front = self.in_flight.front()?.0;
        let guess = usize::try_from(offset - front).ok()?;
        if self.in_flight.get(guess).is_some_and(|&(o, _)| o == offset) {
            return Some(guess);
        }
        self.in_flight.binary_search_by_key(&offset, |&(o, _)| o).ok()
    }

    /// Settles `offset` if it is in flight and unsettled; returns whether it was.
    fn settle(&mut self, offset: i64) -> bool {
        let Some(at) = self.index_of(offset) else {
            return false;
        };
        let settled = std::mem::replace(&mut self.in_flight[at].1, true);
        while self.in_flight.front().is_some_and(|&(_, settled)| settled) {
            self.in_flight.pop_front();
        }
        !settled
    }

    fn new(generation: u64) -> Self {
        Self {
            epoch: generation,
            generation,
            in_flight: VecDeque::new(),
            returned: BTreeSet::new(),
            next: -1,
            committed: -1,
        }
    }

    /// The next offset a new owner must read: the first one not handled.
    fn position(&self) -> i64 {
        match (self.in_flight.front().map(|&(offset, _)| offset), self.returned.first().copied()) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => self.next,
        }
    }
}

/// A delivery's place in the tracker.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ticket {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    epoch: u64,
    generation: u64,
    /// The tracker's generation when the delivery was received.
    received_in: u64,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts a new generation, under the lock: a partition was assigned or revoked.
    fn next_generation(&self, _locked: &mut State) -> u64 {
        self.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Partitions newly assigned to this consumer.
    pub(crate) fn assign(&self, partitions: &[i32]) {
        let mut state = self.lock();
        let generation = self.next_generation(&mut state);
        for &partition in partitions {
            state.partitions.insert(partition, Partition::new(generation));
        }
    }

    /// Marks the deliveries of `partitions` stale, so workers skip those not started yet.
    pub(crate) fn revoke(&self, partitions: &[i32]) {
        let mut state = self.lock();
        let generation = self.next_generation(&mut state);
        for partition in partitions {
            if let Some(p) = state.partitions.get_mut(partition) {
                p.generation = generation;
            }
        }
    }

    /// Forgets `partitions` (after their final commit).
    pub(crate) fn forget(&self, partitions: &[i32]) {
        let mut state = self.lock();
        for partition in partitions {
            state.partitions.remove(partition);
        }
    }

    /// Records that `offset` of `partition` was handed to the dispatcher.
    pub(crate) fn received(&self, partition: i32, offset: i64) -> Ticket {
        let mut state = self.lock();
        // Read under the lock, which every change of it holds.
        let generation = self.generation.load(Ordering::Relaxed);
        let p = state.partitions.entry(partition).or_insert_with(|| Partition::new(generation));
        p.receive(offset);
        Ticket { partition, offset, epoch: p.epoch, generation: p.generation, received_in: generation }
    }

    /// Whether the delivery's partition is still assigned to this consumer, in the same generation.
    pub(crate) fn is_current(&self, ticket: &Ticket) -> bool {
        if self.generation.load(Ordering::Acquire) == ticket.received_in {
            return true;
        }
        self.lock().partitions.get(&ticket.partition).is_some_and(|p| p.generation == ticket.generation)
    }

    /// The record was handled (or dead-lettered): the commit position may move past it.
    pub(crate) fn handled(&self, ticket: &Ticket) {
        self.settle(ticket, false);
    }

    /// The record was handed back unhandled: the commit position must stop at it.
    pub(crate) fn returned(&self, ticket: &Ticket) {
        self.settle(ticket, true);
    }

    fn settle(&self, ticket: &Ticket, returned: bool) {
        let mut state = self.lock();
        if let Some(p) = state.partitions.get_mut(&ticket.partition).filter(|p| p.epoch == ticket.epoch) {
            if p.settle(ticket.offset) && returned {
                p.returned.insert(ticket.offset);
            }
        }
        let waiting = state.waiters > 0;
        drop(state);
        if waiting {
            self.settled.notify_all();
        }
    }

    /// Positions that moved since the last call, of `only` these partitions or of all; each is then taken as
    /// committed.
    pub(crate) fn advanced(&self, only: Option<&[i32]>) -> Vec<(i32, i64)> {
        let mut state = self.lock();
        let mut moved = Vec::new();
        for (&partition, p) in state.partitions.iter_mut() {
            if only.is_some_and(|only| !only.contains(&partition)) || p.next < 0 {
                continue;
            }
            let position = p.position();
            if position > p.committed {
                p.committed = position;
                moved.push((partition, position));
            }
        }
        moved
    }

    /// Waits, blocking the thread, until no delivery of `partitions` (or of any) is in flight, at most `limit`.
    pub(crate) fn wait_settled_blocking(&self, only: Option<&[i32]>, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        loop {
            if !Self::busy(&state, only) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            state.waiters += 1;
            state = self.settled.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0;
            state.waiters -= 1;
        }
    }

    /// Whether any delivery of `only` these partitions (or of any) is in flight.
    pub(crate) fn in_flight(&self, only: Option<&[i32]>) -> bool {
        Self::busy(&self.lock(), only)
    }

    fn busy(state: &State, only: Option<&[i32]>) -> bool {
        state
            .partitions
            .iter()
            .any(|(partition, p)| only.is_none_or(|o| o.contains(partition)) && !p.in_flight.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_stop_at_the_first_unhandled_offset() {
        let tracker = Tracker::default();
        tracker.assign(&[0]);
        let tickets: Vec<Ticket> = (10..15).map(|o| tracker.received(0, o)).collect();
        // 11 and 13 handled; 10 still running: nothing may be committed yet.
        tracker.handled(&tickets[1]);
        tracker.handled(&tickets[3]);
        assert_eq!(tracker.advanced(None), [(0, 10)]);
        tracker.handled(&tickets[0]);
        assert_eq!(tracker.advanced(None), [(0, 12)]);
        // 12 handed back unhandled: the position stays at 12 for whoever reads next.
        tracker.returned(&tickets[2]);
        tracker.handled(&tickets[4]);
        assert_eq!(tracker.advanced(None), []);
        assert!(!tracker.in_flight(None));
    }

    #[test]
    fn offsets_read_again_out_of_order_hold_the_position_until_handled() {
        let tracker = Tracker::default();
        tracker.assign(&[0]);
        let first: Vec<Ticket> = (0..4).map(|o| tracker.received(0, o)).collect();
        tracker.handled(&first[1]);
        tracker.handled(&first[2]);
        // Offsets 1 and 2 read again while 0 is still running: both are in flight once more.
        let again: Vec<Ticket> = (1..3).map(|o| tracker.received(0, o)).collect();
        tracker.handled(&first[0]);
        assert_eq!(tracker.advanced(None), [(0, 1)]);
        tracker.handled(&again[0]);
        tracker.handled(&again[1]);
        assert_eq!(tracker.advanced(None), [(0, 3)]);
        tracker.handled(&first[3]);
        assert_eq!(tracker.advanced(None), [(0, 4)]);
        assert!(!tracker.in_flight(None));
    }

    #[test]
    fn offsets_with_gaps_settle_in_their_place() {
        let tracker = Tracker::default();
        tracker.assign(&[0]);
        // Compaction or transaction markers leave gaps: 11 and 14..=16 never arrive.
        let tickets: Vec<Ticket> = [10, 12, 13, 17].iter().map(|&o| tracker.received(0, o)).collect();
        tracker.handled(&tickets[2]);
        tracker.handled(&tickets[3]);
        assert_eq!(tracker.advanced(None), [(0, 10)]);
        // A ticket for an offset never received settles nothing.
        tracker.handled(&Ticket { offset: 11, ..tickets[0] });
        assert_eq!(tracker.advanced(None), []);
        tracker.handled(&tickets[0]);
        assert_eq!(tracker.advanced(None), [(0, 12)]);
        tracker.handled(&tickets[1]);
        assert_eq!(tracker.advanced(None), [(0, 18)]);
        assert!(!tracker.in_flight(None));
    }

    #[test]
    fn a_ticket_of_an_earlier_assignment_does_not_touch_the_new_one() {
        let tracker = Tracker::default();
        tracker.assign(&[0]);
        let old = tracker.received(0, 7);
        tracker.revoke(&[0]);
        tracker.forget(&[0]);
        tracker.assign(&[0]);
        let new = tracker.received(0, 7);
        tracker.returned(&old);
        tracker.handled(&new);
        assert_eq!(tracker.advanced(None), [(0, 8)]);
    }

    #[test]
    fn revoked_deliveries_are_stale() {
        let tracker = Tracker::default();
        tracker.assign(&[0, 1]);
        let (a, b) = (tracker.received(0, 0), tracker.received(1, 0));
        tracker.revoke(&[0]);
        assert!(!tracker.is_current(&a));
        assert!(tracker.is_current(&b));
    }
}
