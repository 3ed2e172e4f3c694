//! Publish acks routed by reply subject. Every publish asks JetStream to answer on `<inbox>.<ticket>`; one
//! subscription per bus receives the answers, and one task settles each publish in the window by its ticket.
//! Nothing is left waiting per message on the client (no future, no timer, no entry in the client's request
//! map): the window's collector times out the publishes whose answer does not come, with one timer for all.

use std::sync::Mutex;

use async_nats::{Client, Message, StatusCode, Subscriber};
use eventbus_core::envelope::EventId;
use eventbus_core::inflight::{AckSettler, AckTicket};
use eventbus_core::{Error, PublishAck, Result};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio_util::task::AbortOnDropHandle;

/// Why a publish failed when no stream takes its subject: the server's "no responders".
pub(crate) const NO_STREAM: &str = "no stream answers for this subject (was it deleted?)";

/// The bus's inbox for publish acks and the task reading it.
pub(crate) struct AckInbox {
    prefix: String,
    reader: Mutex<Option<AbortOnDropHandle<()>>>,
}

impl AckInbox {
    /// Subscribes to a fresh inbox of `client` and starts settling what arrives there through `settler`.
    pub(crate) async fn open(client: &Client, settler: AckSettler) -> Result<Self> {
        let prefix = client.new_inbox();
        let subscriber = client
            .subscribe(format!("{prefix}.>"))
            .await
            .map_err(|e| Error::broker("cannot subscribe to the inbox for publish acks", e))?;
        let reader = tokio::spawn(read(subscriber, settler, prefix.len() + 1));
        Ok(Self { prefix, reader: Mutex::new(Some(AbortOnDropHandle::new(reader))) })
    }

    /// The reply subject of the publish registered under `ticket`.
    pub(crate) fn reply_subject(&self, ticket: AckTicket) -> String {
        format!("{}.{ticket}", self.prefix)
    }

    /// Stops the reader; acks arriving later settle nothing (the window has given up on them by then).
    pub(crate) async fn stop(&self) {
        let reader = self.reader.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(reader) = reader {
            reader.abort();
            let _ = reader.await;
        }
    }
}

async fn read(mut subscriber: Subscriber, settler: AckSettler, ticket_at: usize) {
    while let Some(message) = subscriber.next().await {
        // Anything else on the inbox is not an answer to this bus's publishes.
        let Some(ticket) = message.subject.get(ticket_at..).and_then(|ticket| ticket.parse().ok()) else {
            continue;
        };
        settler.settle(ticket, |event_id, topic| answer(&message, event_id, topic));
    }
    // Only a closed connection or a refused subscription ends the stream before close() stops the reader.
    tracing::warn!("the inbox for publish acks closed; publishes will time out until the bus is reconnected");
}

/// JetStream's answer to a publish: the stored position, or why it was not stored.
#[derive(Deserialize)]
struct Answer {
    seq: Option<u64>,
    #[serde(default)]
    duplicate: bool,
    error: Option<Refusal>,
}

#[derive(Deserialize)]
struct Refusal {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    err_code: u16,
    #[serde(default)]
    description: String,
}

fn answer(message: &Message, event_id: EventId, topic: &str) -> Result<PublishAck> {
    if message.status == Some(StatusCode::NO_RESPONDERS) {
        return Err(Error::Broker { message: NO_STREAM.into(), source: None });
    }
    match serde_json::from_slice::<Answer>(&message.payload) {
        Ok(Answer { error: Some(refusal), .. }) => Err(Error::Broker {
            message: format!(
                "the stream refused the message: {} (status {}, JetStream error {})",
                refusal.description, refusal.code, refusal.err_code
            ),
            source: None,
        }),
        Ok(Answer { seq: Some(sequence), duplicate, error: None }) => {
            Ok(PublishAck::new(event_id, topic).with_sequence(sequence).with_duplicate(duplicate))
        }
        _ => Err(Error::Broker {
            message: format!("unreadable answer from JetStream: {:?}", String::from_utf8_lossy(&message.payload)),
            source: None,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload: &str, status: Option<StatusCode>) -> Message {
        Message {
            subject: "_INBOX.x.0.1".into(),
            reply: None,
            payload: payload.to_owned().into(),
            headers: None,
            status,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn answers_map_to_acks_and_errors() {
        let id = EventId::new();
        let stored = answer(&message(r#"{"stream":"EVENTBUS_orders","seq":42}"#, None), id, "orders").expect("stored");
        assert_eq!(
            (stored.event_id, stored.topic.as_str(), stored.sequence, stored.duplicate),
            (id, "orders", Some(42), false)
        );
        let again =
            answer(&message(r#"{"stream":"S","seq":42,"duplicate":true}"#, None), id, "orders").expect("stored");
        assert!(again.duplicate);
        let refused = r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"},"seq":0}"#;
        let refused = answer(&message(refused, None), id, "orders").expect_err("refused").to_string();
        assert!(refused.contains("maximum messages exceeded") && refused.contains("10077"), "{refused}");
        let gone = answer(&message("", Some(StatusCode::NO_RESPONDERS)), id, "orders").expect_err("no stream");
        assert!(gone.to_string().contains("no stream answers"), "{gone}");
        let garbled = answer(&message("not json", None), id, "orders").expect_err("unreadable").to_string();
        assert!(garbled.contains("unreadable") && garbled.contains("not json"), "{garbled}");
    }
}
