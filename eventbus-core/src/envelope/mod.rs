//! The event envelope: identity, ordering key, metadata and the raw payload.

mod validate;
pub mod wire;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use bytes::Bytes;

pub use validate::{validate_group, validate_topic, ValidationError, MAX_AGGREGATE_ID_LEN, MAX_TOPIC_LEN};

/// The unique identity of one event: a UUID, version 7 (time-ordered) unless the publisher supplies its own.
///
/// Backends use it for broker-side de-duplication (`Nats-Msg-Id` on NATS), so a re-sent event keeps its id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(uuid::Uuid);

thread_local! {
    /// The UUIDv7 clock of this thread. `Uuid::now_v7` shares one clock behind a lock between all threads,
    /// which publishers on every runtime thread then take turns at for every event they build.
    static CLOCK_V7: uuid::timestamp::context::ContextV7 = const { uuid::timestamp::context::ContextV7::new() };
}

impl EventId {
    /// A new time-ordered (UUIDv7) id: ids made on one thread sort in the order they were made; ids made on
    /// different threads sort by their millisecond.
    pub fn new() -> Self {
        Self::at(SystemTime::now())
    }

    /// A new time-ordered id for an event created at `time`: the envelope builder reads the clock once for
    /// both the id and the timestamp, so the two agree and building an event costs one clock read, not two.
    fn at(time: SystemTime) -> Self {
        let since_epoch = time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let (seconds, nanos) = (since_epoch.as_secs(), since_epoch.subsec_nanos());
        // A thread whose locals are already gone (an id made in a destructor) uses the shared clock.
        let id = CLOCK_V7.try_with(|clock| uuid::Uuid::new_v7(uuid::Timestamp::from_unix(clock, seconds, nanos)));
        Self(id.unwrap_or_else(|_| uuid::Uuid::now_v7()))
    }

    /// Wraps an existing UUID, for events whose id is assigned upstream (for example by an outbox table).
    pub const fn from_uuid(uuid: uuid::Uuid) -> Self {
        Self(uuid)
    }

    /// The UUID behind this id.
    pub const fn as_uuid(&self) -> &uuid::Uuid {
        &self.0
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({})", self.0.as_hyphenated())
    }
}

impl FromStr for EventId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(Self)
    }
}

/// One event as it travels through the bus.
///
/// Build one with [`Envelope::builder`]; the builder validates, and so does every `publish`, because the fields
/// stay public for handlers and tests to read and adjust.
///
/// ```
/// use eventbus_core::Envelope;
///
/// let event = Envelope::builder("order-42", "OrderPlaced")
///     .version(1)
///     .correlation_id("checkout-7")
///     .header("source", "web")
///     .payload(r#"{"total":1200}"#)
///     .build()?;
/// assert_eq!(event.aggregate_id, "order-42");
/// # Ok::<(), eventbus_core::ValidationError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Envelope {
    /// Unique id of this event (UUIDv7 unless given).
    pub event_id: EventId,
    /// The entity this event belongs to; events of one aggregate are delivered strictly in publish order.
    pub aggregate_id: String,
    /// The kind of event, such as `OrderPlaced`.
    pub event_type: String,
    /// Version of the aggregate this event produces, starting at 1.
    pub event_version: u64,
    /// When the event was created.
    pub timestamp: SystemTime,
    /// Distributed-tracing id, carried unchanged.
    pub trace_id: Option<String>,
    /// Correlation id linking the events of one business operation.
    pub correlation_id: Option<String>,
    /// Tenant the event belongs to, for multi-tenant services.
    pub tenant_id: Option<String>,
    /// User headers. Names must not collide with the reserved metadata names of [`wire`].
    pub headers: BTreeMap<String, String>,
    /// The event body, carried as raw bytes (no wrapping, no re-encoding).
    pub payload: Bytes,
}

impl Envelope {
    /// Starts an envelope for `aggregate_id` with the given `event_type`, version 1 and a fresh id and timestamp.
    pub fn builder(aggregate_id: impl Into<String>, event_type: impl Into<String>) -> EnvelopeBuilder {
        let now = SystemTime::now();
        EnvelopeBuilder {
            envelope: Envelope {
                event_id: EventId::at(now),
                aggregate_id: aggregate_id.into(),
                event_type: event_type.into(),
                event_version: 1,
                timestamp: now,
                trace_id: None,
                correlation_id: None,
                tenant_id: None,
                headers: BTreeMap::new(),
                payload: Bytes::new(),
            },
        }
    }

    /// Checks every rule of the envelope and returns the first one broken.
    pub fn validate(&self) -> Result<(), ValidationError> {
        validate::validate_envelope(self)
    }
}

/// Builds an [`Envelope`]; see [`Envelope::builder`].
#[derive(Clone, Debug)]
#[must_use = "an EnvelopeBuilder does nothing until `build` is called"]
pub struct EnvelopeBuilder {
    envelope: Envelope,
}

impl EnvelopeBuilder {
    /// Uses `id` instead of a fresh UUIDv7, for example the id an outbox row already carries.
    pub fn event_id(mut self, id: EventId) -> Self {
        self.envelope.event_id = id;
        self
    }

    /// Sets the aggregate version this event produces (≥ 1).
    pub fn version(mut self, version: u64) -> Self {
        self.envelope.event_version = version;
        self
    }

    /// Sets the creation time (defaults to now).
    pub fn timestamp(mut self, timestamp: SystemTime) -> Self {
        self.envelope.timestamp = timestamp;
        self
    }

    /// Sets the tracing id.
    pub fn trace_id(mut self, id: impl Into<String>) -> Self {
        self.envelope.trace_id = Some(id.into());
        self
    }

    /// Sets the correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.envelope.correlation_id = Some(id.into());
        self
    }

    /// Sets the tenant id.
    pub fn tenant_id(mut self, id: impl Into<String>) -> Self {
        self.envelope.tenant_id = Some(id.into());
        self
    }

    /// Adds a user header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.envelope.headers.insert(name.into(), value.into());
        self
    }

    /// Sets the payload bytes.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.envelope.payload = payload.into();
        self
    }

    /// Validates and returns the envelope.
    pub fn build(self) -> Result<Envelope, ValidationError> {
        self.envelope.validate()?;
        Ok(self.envelope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_made_on_one_thread_sort_in_the_order_they_were_made() {
        let ids: Vec<EventId> = (0..10_000).map(|_| EventId::new()).collect();
        assert!(ids.windows(2).all(|pair| pair[0] < pair[1]));
        assert!(ids.iter().all(|id| id.as_uuid().get_version_num() == 7));
    }

    #[test]
    fn a_built_envelope_carries_its_timestamp_in_its_id() {
        let envelope = Envelope::builder("cart-1", "ItemAdded").payload("{}").build().unwrap();
        let millis = envelope.timestamp.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis() as u64;
        let (seconds, nanos) = envelope.event_id.as_uuid().get_timestamp().unwrap().to_unix();
        assert_eq!(seconds * 1000 + u64::from(nanos) / 1_000_000, millis);
    }

    #[test]
    fn ids_made_on_different_threads_differ() {
        let ids: std::collections::HashSet<EventId> = std::thread::scope(|scope| {
            let threads: Vec<_> =
                (0..4).map(|_| scope.spawn(|| (0..5_000).map(|_| EventId::new()).collect::<Vec<_>>())).collect();
            threads.into_iter().flat_map(|thread| thread.join().unwrap()).collect()
        });
        assert_eq!(ids.len(), 20_000);
    }
}
