//! The producing side: the producer's context settles every publish from librdkafka's delivery report, on the
//! producer's polling thread, without a task in between.
//!
//! Each record carries a plain number rather than an allocation: a publish's packed [`AckTicket`], or, with the
//! top bit set, the number of a dead letter whose sender waits for its report.

use std::sync::Mutex;
use std::time::Duration;

use eventbus_core::inflight::{AckSettler, AckTicket};
use eventbus_core::{Error, PublishAck};
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext};
use slab::Slab;
use tokio::sync::oneshot;

use crate::client::BusContext;

/// A record for the bus's producer, carrying the number its delivery report settles.
pub(crate) type Record<'a> = BaseRecord<'a, str, [u8], usize>;

/// The bit that marks a record's number as a dead letter's; a packed ticket never sets it.
const DEAD_LETTER: usize = 1 << (usize::BITS - 1);

/// The sender of a dead letter, which waits for the report of its record.
type DeadLetterReport = oneshot::Sender<Result<(), KafkaError>>;

/// The context of the bus's producer. librdkafka reports every record within `message.timeout.ms`, which the bus
/// sets to `publish.ack_timeout`, so no publish needs a timer of its own.
pub(crate) struct ProducerCallbacks {
    bus: BusContext,
    ack_timeout: Duration,
    /// Settles publishes by the ticket their records carry.
    acks: AckSettler,
    /// Dead letters sent and not yet reported, by the number their records carry (without the top bit).
    dead_letters: Mutex<Slab<DeadLetterReport>>,
}

impl ProducerCallbacks {
    /// The context of a producer whose publishes `acks` settles.
    pub(crate) fn new(bus: BusContext, ack_timeout: Duration, acks: AckSettler) -> Self {
        Self { bus, ack_timeout, acks, dead_letters: Mutex::default() }
    }

    /// Registers a dead letter about to be sent; returns the number its record carries and the receiver of
    /// its report.
    pub(crate) fn expect_dead_letter(&self) -> (usize, oneshot::Receiver<Result<(), KafkaError>>) {
        let (report, delivered) = oneshot::channel();
        (DEAD_LETTER | self.dead_letters().insert(report), delivered)
    }

    /// Forgets the dead letter or publish of `number`, whose record the producer refused.
    pub(crate) fn refused(&self, number: usize) {
        if number & DEAD_LETTER != 0 {
            drop(self.dead_letters().try_remove(number & !DEAD_LETTER));
        } else {
            self.acks.withdraw(AckTicket::unpack(number));
        }
    }

    fn dead_letters(&self) -> std::sync::MutexGuard<'_, Slab<DeadLetterReport>> {
        self.dead_letters.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl ClientContext for ProducerCallbacks {
    fn error(&self, error: KafkaError, reason: &str) {
        self.bus.error(error, reason);
    }
}

impl ProducerContext for ProducerCallbacks {
    type DeliveryOpaque = usize;

    fn delivery(&self, report: &DeliveryResult<'_>, number: usize) {
        if number & DEAD_LETTER != 0 {
            let waiting = self.dead_letters().try_remove(number & !DEAD_LETTER);
            if let Some(sender) = waiting {
                let _ = sender.send(report.as_ref().map(drop).map_err(|(error, _)| error.clone()));
            }
            return;
        }
        let ticket = AckTicket::unpack(number);
        match report {
            Ok(record) => {
                self.bus.connection.up();
                let position = (record.partition(), u64::try_from(record.offset()).unwrap_or_default());
                self.acks.settle(ticket, |event_id, topic| {
                    Ok(PublishAck::new(event_id, topic).with_partition(position.0).with_sequence(position.1))
                });
            }
            Err((error, _)) => self.acks.settle(ticket, |_, _| Err(delivery_error(error, self.ack_timeout))),
        }
    }
}

/// The bus error for a record librdkafka could not deliver.
pub(crate) fn delivery_error(error: &KafkaError, ack_timeout: Duration) -> Error {
    match error.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageTimedOut) => Error::AckTimeout(ack_timeout),
        // Purged when the producer is destroyed with the record still queued or in flight.
        Some(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight) => Error::ClosedBeforeAck,
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => {
            Error::Broker { message: format!("the broker refused the record as too large: {error}"), source: None }
        }
        _ => Error::broker("delivery failed", error.clone()),
    }
}
