//! The consuming side: one fetch task per subscription merges the pull streams of every partition consumer
//! and feeds the keyed dispatcher; each delivery carries its JetStream message to ack, terminate or release.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::{self, AckKind};
use async_trait::async_trait;
use eventbus_core::dispatch::{Acker, Delivery, Dispatcher, Message};
use eventbus_core::wire::{self, WireMessage};
use eventbus_core::{Error, Result};
use futures_util::stream::{self, BoxStream, FuturesUnordered, SelectAll, StreamExt};
use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

/// Server heartbeat on idle pull streams: a dead connection is noticed within two of them.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Lifetime of one pull request. A closed subscription's pull requests linger on the server this long, and a
/// message the server hands to one of them in that time is lost until its ack wait passes.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// Delay of the `Nak` that hands back a closing subscription's messages: past the lifetime of its own pull
/// requests, so the server gives them to a live member.
const HAND_BACK_DELAY: Duration = Duration::from_secs(6);
/// Wait before re-opening a partition's pull stream that ended.
const REOPEN_DELAY: Duration = Duration::from_secs(1);

/// What a partition's tagged pull stream yields.
// Nearly every item is a message; boxing it would cost an allocation per message to shrink the rare end marker.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Pulled {
    Message(std::result::Result<jetstream::Message, String>),
    Ended(u16),
}

pub(crate) type PartitionStream = BoxStream<'static, Pulled>;
type Reopen = Pin<Box<dyn std::future::Future<Output = (u16, Result<PartitionStream>)> + Send>>;

/// Opens the pull stream of one partition consumer.
pub(crate) async fn open(partition: u16, consumer: PullConsumer) -> Result<PartitionStream> {
    let messages = consumer
        .stream()
        .max_messages_per_batch(16)
        .heartbeat(HEARTBEAT)
        .expires(PULL_EXPIRES)
        .messages()
        .await
        .map_err(|e| Error::broker(format!("cannot pull from partition {partition}"), e))?;
    // A pull stream that reports an error (missed heartbeats after a broker restart, a failed pull) may have
    // lost its pending pull request on the server and wait for nothing: it ends at its first error, after
    // reporting it, and the fetch loop opens a fresh one.
    let messages = messages.scan(false, |failed, item| {
        let next = (!*failed).then(|| Pulled::Message(item.map_err(|e| e.to_string())));
        *failed = matches!(next, Some(Pulled::Message(Err(_))));
        std::future::ready(next)
    });
    Ok(messages.chain(stream::once(async move { Pulled::Ended(partition) })).boxed())
}

/// Moves messages from every partition to the dispatcher until `stop`; re-opens a partition whose stream ends
/// (for example after its consumer was deleted and re-created).
pub(crate) async fn fetch(
    topic: Arc<str>,
    consumers: Vec<PullConsumer>,
    opened: Vec<PartitionStream>,
    dispatcher: Dispatcher,
    ack_wait: Duration,
    stop: CancellationToken,
) {
    let mut streams: SelectAll<PartitionStream> = opened.into_iter().collect();
    let mut reopening: FuturesUnordered<Reopen> = FuturesUnordered::new();
    loop {
        let pulled = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            Some((partition, reopened)) = reopening.next(), if !reopening.is_empty() => {
                match reopened {
                    Ok(stream) => streams.push(stream),
                    Err(error) => {
                        tracing::warn!(%topic, partition, %error, "re-opening a partition failed; retrying");
                        reopening.push(reopen(partition, consumers[usize::from(partition)].clone()));
                    }
                }
                continue;
            }
            Some(pulled) = streams.next(), if !streams.is_empty() => pulled,
        };
        match pulled {
            Pulled::Message(Ok(message)) => {
                let delivery = delivery(message, ack_wait / 3);
                let slot = tokio::select! {
                    biased;
                    _ = stop.cancelled() => {
                        delivery.acker.release().await;
                        break;
                    }
                    slot = dispatcher.reserve() => slot,
                };
                dispatcher.push(slot, delivery);
            }
            // Missed heartbeats and failed pulls are reported by the stream and recovered by it.
            Pulled::Message(Err(error)) => tracing::warn!(%topic, %error, "pull stream failed; re-opening it"),
            Pulled::Ended(partition) => {
                tracing::debug!(%topic, partition, "pull stream ended; re-opening it");
                reopening.push(reopen(partition, consumers[usize::from(partition)].clone()));
            }
        }
    }
    // Messages the client already received for this subscription go back to the group too.
    while let Some(Some(pulled)) = streams.next().now_or_never() {
        if let Pulled::Message(Ok(message)) = pulled {
            delivery(message, ack_wait / 3).acker.release().await;
        }
    }
}

fn reopen(partition: u16, consumer: PullConsumer) -> Reopen {
    async move {
        tokio::time::sleep(REOPEN_DELAY).await;
        (partition, open(partition, consumer).await)
    }
    .boxed()
}

/// Decodes a JetStream message into a delivery; what cannot be decoded is kept raw for the dead-letter topic.
pub(crate) fn delivery(message: jetstream::Message, progress_interval: Duration) -> Delivery {
    let decoded = {
        let headers: Vec<(&str, &str)> = message
            .headers
            .iter()
            .flat_map(|headers| headers.iter())
            .flat_map(|(name, values)| values.iter().map(move |value| (name.as_ref(), value.as_str())))
            .collect();
        wire::decode(headers.iter().map(|(n, v)| (*n, v.as_bytes())), message.payload.clone())
            .map_err(|error| (error, raw(&headers, &message.payload)))
    };
    let message_kind = match decoded {
        Ok(envelope) => Message::Event(Arc::new(envelope)),
        Err((error, wire)) => Message::Undecodable { wire, error },
    };
    Delivery { message: message_kind, acker: Box::new(NatsAcker { message, progress_interval }) }
}

fn raw(headers: &[(&str, &str)], payload: &bytes::Bytes) -> WireMessage {
    WireMessage {
        headers: headers.iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect(),
        payload: payload.clone(),
    }
}

/// Acknowledges one JetStream message.
struct NatsAcker {
    message: jetstream::Message,
    /// A third of the consumer's ack wait.
    progress_interval: Duration,
}

#[async_trait]
impl Acker for NatsAcker {
    async fn ack(self: Box<Self>) -> Result<()> {
        if let Ok(info) = self.message.info() {
            tracing::trace!(
                consumer = info.consumer,
                stream_sequence = info.stream_sequence,
                delivered = info.delivered,
                "ack"
            );
        }
        self.message.ack().await.map_err(|e| Error::Broker { message: format!("ack failed: {e}"), source: None })
    }

    /// Dead-lettered: `Term` tells the server never to redeliver it.
    async fn terminate(self: Box<Self>) -> Result<()> {
        self.message
            .ack_with(AckKind::Term)
            .await
            .map_err(|e| Error::Broker { message: format!("term failed: {e}"), source: None })
    }

    /// Unhandled at close: `Nak` lets the server hand it to another member once this subscription's pull
    /// requests have expired, instead of after the full ack wait.
    async fn release(self: Box<Self>) {
        if let Ok(info) = self.message.info() {
            tracing::trace!(
                consumer = info.consumer,
                stream_sequence = info.stream_sequence,
                delivered = info.delivered,
                "nak"
            );
        }
        if let Err(error) = self.message.ack_with(AckKind::Nak(Some(HAND_BACK_DELAY))).await {
            tracing::debug!(%error, "nak at close failed; the message returns after its ack wait");
        }
    }

    fn progress_interval(&self) -> Option<Duration> {
        Some(self.progress_interval)
    }

    /// Still handled or retried: restart the server's ack-wait timer.
    async fn in_progress(&self) {
        if let Err(error) = self.message.ack_with(AckKind::Progress).await {
            tracing::debug!(%error, "in-progress notice failed");
        }
    }
}
