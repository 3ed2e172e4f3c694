//! The producing side: the producer's context settles every publish from librdkafka's delivery report, on the
//! producer's polling thread, without a task in between.

use std::time::Duration;

use eventbus_core::inflight::AckCallback;
use eventbus_core::{Error, PublishAck};
use rdkafka::client::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext};
use tokio::sync::oneshot;

use crate::client::BusContext;

/// A record for the bus's producer, carrying what its delivery report settles.
pub(crate) type Record<'a> = BaseRecord<'a, str, [u8], Box<Awaiting>>;

/// What a record's delivery report settles.
pub(crate) enum Awaiting {
    /// A publish: its receipt and window slot.
    Publish(AckCallback),
    /// A dead letter, whose sender waits for the report.
    DeadLetter(oneshot::Sender<Result<(), KafkaError>>),
}

/// The context of the bus's producer. librdkafka reports every record within `message.timeout.ms`, which the bus
/// sets to `publish.ack_timeout`, so no publish needs a timer of its own.
pub(crate) struct ProducerCallbacks {
    pub(crate) bus: BusContext,
    pub(crate) ack_timeout: Duration,
}

impl ClientContext for ProducerCallbacks {
    fn error(&self, error: KafkaError, reason: &str) {
        self.bus.error(error, reason);
    }
}

impl ProducerContext for ProducerCallbacks {
    type DeliveryOpaque = Box<Awaiting>;

    fn delivery(&self, report: &DeliveryResult<'_>, awaiting: Box<Awaiting>) {
        match *awaiting {
            Awaiting::Publish(callback) => {
                let result = match report {
                    Ok(record) => {
                        self.bus.connection.up();
                        Ok(PublishAck::new(callback.event_id(), record.topic())
                            .with_partition(record.partition())
                            .with_sequence(u64::try_from(record.offset()).unwrap_or_default()))
                    }
                    Err((error, _)) => Err(delivery_error(error, self.ack_timeout)),
                };
                callback.settle(result);
            }
            Awaiting::DeadLetter(sender) => {
                let _ = sender.send(report.as_ref().map(drop).map_err(|(error, _)| error.clone()));
            }
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
