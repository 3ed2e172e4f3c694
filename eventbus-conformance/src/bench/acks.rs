//! Where the publishers of every run hand their acks: one collector task settles them as they complete, and
//! takes each ack's latency then.
//!
//! Every run bounds what it has handed over to the publish window: a slot is taken per ack handed over, and
//! frees when the collector takes the completed ack. A bare publisher takes its slot before it sends: this is
//! the bus's window rebuilt (without it, the bare client would have up to one message per publisher more in
//! flight than the bus: 10,000 more at `scale`). A bus publisher, whose bus bounds what is in flight with its
//! own window, takes a slot after `publish` returns, for a receipt still pending, from a bound twice the
//! window: up to a window of receipts pending in the bus and a window settled but not yet taken, so that only
//! the bus's own window holds its publishers back. Its publish latency ends when `publish` returns. A receipt
//! already settled then (the in-memory backend's, outside an outage) is recorded by its publisher at once
//! ([`Acks::settled`]).

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};

use super::bus::PublishTimings;

/// A publisher's handle on the collector.
pub(crate) struct Acks<F> {
    slots: Arc<Semaphore>,
    handed: mpsc::UnboundedSender<Handed<F>>,
}

impl<F> Clone for Acks<F> {
    fn clone(&self) -> Self {
        Self { slots: self.slots.clone(), handed: self.handed.clone() }
    }
}

/// Room for one message in flight; freed when its ack completes.
pub(crate) struct AckSlot {
    _permit: OwnedSemaphorePermit,
}

struct Handed<F> {
    sent: Instant,
    slot: AckSlot,
    ack: F,
}

/// Starts the collector. `window` bounds the acks handed over and not yet taken; `acked` tells a stored
/// message from a failed one. The collector ends once every [`Acks`] is dropped and every ack
/// handed over has completed.
pub(crate) fn collect<F>(
    window: usize,
    timings: Arc<PublishTimings>,
    acked: fn(&F::Output) -> bool,
) -> (Acks<F>, JoinHandle<()>)
where
    F: IntoFuture + Send + 'static,
    F::IntoFuture: Send,
    F::Output: Send,
{
    let (handed, mut receiver) = mpsc::unbounded_channel::<Handed<F>>();
    let collector = tokio::spawn(async move {
        let mut waiting = FuturesUnordered::new();
        let mut open = true;
        loop {
            tokio::select! {
                received = receiver.recv(), if open => match received {
                    Some(Handed { sent, slot, ack }) => waiting.push(async move {
                        let output = ack.into_future().await;
                        drop(slot);
                        (sent, output)
                    }),
                    None => open = false,
                },
                Some((sent, output)) = waiting.next(), if !waiting.is_empty() => {
                    if acked(&output) {
                        timings.ack.record(sent.elapsed());
                    } else {
                        timings.failed();
                    }
                }
                else => break,
            }
        }
    });
    (Acks { slots: Arc::new(Semaphore::new(window)), handed }, collector)
}

impl<F> Acks<F> {
    /// Waits for room in the window.
    pub(crate) async fn reserve(&self) -> AckSlot {
        let permit = self.slots.clone().acquire_owned().await.expect("the window's semaphore is never closed");
        AckSlot { _permit: permit }
    }

    /// Hands over the ack of a publish begun at `sent` (before its [`reserve`](Self::reserve)), and takes the
    /// publish latency: the wait for room plus the send.
    pub(crate) fn hand_over(&self, timings: &PublishTimings, slot: AckSlot, sent: Instant, ack: F) {
        self.hand_over_accepted(timings, slot, sent, sent.elapsed(), ack);
    }

    /// Hands over the ack of a publish begun at `sent` that was accepted after `accepted`: for a client with a
    /// window of its own, whose publish latency ends when it accepts, before this room was taken.
    pub(crate) fn hand_over_accepted(
        &self,
        timings: &PublishTimings,
        slot: AckSlot,
        sent: Instant,
        accepted: Duration,
        ack: F,
    ) {
        timings.enqueue.record(accepted);
        if self.handed.send(Handed { sent, slot, ack }).is_err() {
            timings.failed();
        }
    }

    /// Records a publish accepted after `accepted` whose ack was there as soon as it was sent (the in-memory
    /// backend's receipts): the collector has nothing to wait for, and the ack took as long as the publish, so
    /// the clock is not read again.
    pub(crate) fn settled(&self, timings: &PublishTimings, accepted: Duration, acked: bool) {
        timings.enqueue.record(accepted);
        if acked {
            timings.ack.record(accepted);
        } else {
            timings.failed();
        }
    }
}

/// Waits for every publisher task, then for the collector to settle every ack they handed over; `acks` is the
/// run's own handle, dropped first so the collector ends with the last publisher.
pub(crate) async fn join_publishers<F>(
    timings: &PublishTimings,
    publishers: JoinSet<()>,
    acks: Acks<F>,
    collector: JoinHandle<()>,
) {
    drop(acks);
    timings.join(publishers).await;
    let _ = collector.await;
}
