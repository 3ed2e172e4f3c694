//! The one error type of the bus. Every message says what happened and what to do about it.

use std::sync::Arc;
use std::time::Duration;

use crate::envelope::wire::DecodeError;
use crate::envelope::ValidationError;

/// Result with [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shared source error, so [`Error`] stays `Clone` and can be reported to several listeners.
pub type BoxError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in the bus.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The envelope or topic breaks a rule; nothing was sent.
    #[error("invalid event, nothing was sent: {0}")]
    Invalid(#[from] ValidationError),

    /// The payload is larger than the backend accepts; nothing was sent.
    #[error(
        "payload of {size} bytes exceeds the {limit}-byte limit of {backend}; nothing was sent. \
         Split the event, store the body elsewhere and send a reference, or raise the broker's limit"
    )]
    PayloadTooLarge {
        /// Size of the rejected payload plus headers, in bytes.
        size: usize,
        /// The limit it exceeds, in bytes.
        limit: usize,
        /// Which limit it is (for example `nats max_payload`).
        backend: String,
    },

    /// The in-flight window stayed full for the whole enqueue deadline; nothing was sent.
    #[error(
        "publish window full: {window} publishes were awaiting broker acks for {waited:?}; nothing was sent. \
         Slow publishers down, or raise publish.window or publish.enqueue_timeout"
    )]
    Backpressure {
        /// The configured window size.
        window: usize,
        /// How long the publish waited for room.
        waited: Duration,
    },

    /// The broker did not ack within the ack deadline. The event may or may not be stored.
    #[error(
        "no ack from the broker within {0:?} (publish.ack_timeout); the event may or may not be stored. \
         Re-send it if it must be stored: NATS drops a re-send with the same event id within its duplicate \
         window; elsewhere consumers may see it twice and can drop it by event id"
    )]
    AckTimeout(Duration),

    /// The bus, or the subscription, is closed.
    #[error("the bus is closed; connect a new one to go on")]
    Closed,

    /// `close()` reached its deadline before the broker acked this event.
    #[error(
        "the bus closed before the broker acked this event; it may not be stored. Re-send it with the same \
         event id, or raise close_timeout"
    )]
    ClosedBeforeAck,

    /// The broker could not be reached within the connect deadline.
    #[error("cannot connect to {url}: {message}. Check that the broker runs and that the address is right")]
    Connect {
        /// The address tried (credentials removed).
        url: String,
        /// What failed.
        message: String,
    },

    /// The broker refused the credentials.
    #[error("the broker refused the credentials: {0}. Check the token, user and password, nkey or credentials file")]
    Auth(String),

    /// The broker answered with an error.
    #[error("broker error: {message}")]
    Broker {
        /// What the broker or client library said.
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// The broker's topic or stream differs from the configuration, and provisioning may not change it.
    #[error(
        "{what} does not match the configuration: {detail}. Change the configuration or let provisioning update it"
    )]
    Mismatch {
        /// The broker object, such as `stream orders`.
        what: String,
        /// Which setting differs and how.
        detail: String,
    },

    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The configuration names a backend this build does not include.
    #[error("backend {scheme:?} is not available: {reason}")]
    UnsupportedBackend {
        /// The URL scheme asked for.
        scheme: String,
        /// Why it is not available and how to enable it.
        reason: String,
    },

    /// A message could not be decoded into an envelope.
    #[error("undecodable message: {0}")]
    Decode(#[from] DecodeError),
}

impl Error {
    /// A broker error from a message and its source.
    pub fn broker(message: impl Into<String>, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self::Broker { message: message.into(), source: Some(Arc::new(source)) }
    }

    /// Whether retrying the same call later may succeed (timeouts, backpressure, broker outages).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Backpressure { .. } | Self::AckTimeout(_) | Self::Connect { .. } | Self::Broker { .. })
    }
}
