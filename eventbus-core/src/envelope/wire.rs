//! The wire mapping every backend shares: an [`Envelope`] travels as message headers (its metadata) and the
//! raw message body (its payload), so any client of the broker can read both without this library.
//!
//! | header | value |
//! |---|---|
//! | `event-id` | the event id, hyphenated UUID |
//! | `aggregate-id` | the aggregate id |
//! | `event-type` | the event type |
//! | `event-version` | decimal `u64`, ≥ 1 |
//! | `event-timestamp` | RFC 3339, UTC, nanoseconds (`2026-11-28T16:40:03.123456789Z`) |
//! | `trace-id`, `correlation-id`, `tenant-id` | optional, copied as is |
//!
//! User headers travel under their own names. Names are matched without regard to case on decode. Headers
//! starting with `dead-letter-` are written by the bus when it dead-letters a message (see
//! [`DEAD_LETTER_REASON`]); names starting with `nats-` belong to the NATS server.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::{Envelope, EventId, ValidationError};

/// Header carrying [`Envelope::event_id`].
pub const EVENT_ID: &str = "event-id";
/// Header carrying [`Envelope::aggregate_id`].
pub const AGGREGATE_ID: &str = "aggregate-id";
/// Header carrying [`Envelope::event_type`].
pub const EVENT_TYPE: &str = "event-type";
/// Header carrying [`Envelope::event_version`].
pub const EVENT_VERSION: &str = "event-version";
/// Header carrying [`Envelope::timestamp`].
pub const EVENT_TIMESTAMP: &str = "event-timestamp";
/// Header carrying [`Envelope::trace_id`].
pub const TRACE_ID: &str = "trace-id";
/// Header carrying [`Envelope::correlation_id`].
pub const CORRELATION_ID: &str = "correlation-id";
/// Header carrying [`Envelope::tenant_id`].
pub const TENANT_ID: &str = "tenant-id";

/// Header the bus adds to a dead-lettered message: why it was dead-lettered.
pub const DEAD_LETTER_REASON: &str = "dead-letter-reason";
/// Header the bus adds to a dead-lettered message: how many handler attempts were made.
pub const DEAD_LETTER_ATTEMPTS: &str = "dead-letter-attempts";
/// Header the bus adds to a dead-lettered message: the topic it was consumed from.
pub const DEAD_LETTER_TOPIC: &str = "dead-letter-topic";

/// Every metadata header name; user headers may not use them.
pub const RESERVED_HEADERS: [&str; 8] =
    [EVENT_ID, AGGREGATE_ID, EVENT_TYPE, EVENT_VERSION, EVENT_TIMESTAMP, TRACE_ID, CORRELATION_ID, TENANT_ID];

/// Whether a user header named `name` would collide with the bus's metadata or the broker's own headers.
pub fn is_reserved(name: &str) -> bool {
    RESERVED_HEADERS.iter().any(|r| r.eq_ignore_ascii_case(name))
        || name.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("nats-"))
}

/// A message as it travels on a broker: headers and raw body.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WireMessage {
    /// Header names and values, metadata first, then user headers.
    pub headers: Vec<(String, String)>,
    /// The raw payload.
    pub payload: Bytes,
}

impl WireMessage {
    /// Decodes this message into an [`Envelope`].
    pub fn decode(&self) -> Result<Envelope, DecodeError> {
        decode(self.headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())), self.payload.clone())
    }

    /// The value of the first header named `name` (ignoring case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Sets `name` to `value`, replacing any header of that name (ignoring case).
    pub fn set_header(&mut self, name: &str, value: impl Into<String>) {
        self.headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
        self.headers.push((name.to_owned(), value.into()));
    }
}

/// Why a message could not be turned into an [`Envelope`]. The consumer dead-letters such a message with this
/// text as the reason and goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// A required metadata header is absent.
    #[error("header {name} is missing; was this message published by eventbus or with its header format?")]
    MissingHeader {
        /// The missing header.
        name: &'static str,
    },
    /// A metadata header is present but its value cannot be read.
    #[error("header {name} is malformed: {reason}")]
    MalformedHeader {
        /// The malformed header.
        name: &'static str,
        /// What is wrong with its value.
        reason: String,
    },
    /// The headers decode, but the envelope they describe breaks a rule.
    #[error("decoded envelope is invalid: {0}")]
    Invalid(#[from] ValidationError),
}

/// Encodes an envelope as headers plus raw payload.
pub fn encode(envelope: &Envelope) -> WireMessage {
    let mut headers = Vec::with_capacity(5 + 3 + envelope.headers.len());
    for_each_header(envelope, |name, value| headers.push((name.as_str().to_owned(), value.to_owned())));
    WireMessage { headers, payload: envelope.payload.clone() }
}

/// The name of one header of an envelope's encoding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderName<'a> {
    /// One of the [`RESERVED_HEADERS`], carrying envelope metadata.
    Metadata(&'static str),
    /// A user header, from [`Envelope::headers`].
    User(&'a str),
}

impl<'a> HeaderName<'a> {
    /// The name as it travels.
    pub fn as_str(&self) -> &'a str {
        match *self {
            HeaderName::Metadata(name) => name,
            HeaderName::User(name) => name,
        }
    }
}

/// Hands every header of `envelope`'s encoding to `header`, in wire order: what [`encode`] collects, for a
/// backend that builds its client's own headers from them without an owned copy of each. Values that are
/// formatted (the id, the version, the timestamp) are written on the stack.
pub fn for_each_header<'a>(envelope: &'a Envelope, mut header: impl FnMut(HeaderName<'a>, &str)) {
    let mut id = uuid::Uuid::encode_buffer();
    header(HeaderName::Metadata(EVENT_ID), envelope.event_id.as_uuid().hyphenated().encode_lower(&mut id));
    header(HeaderName::Metadata(AGGREGATE_ID), &envelope.aggregate_id);
    header(HeaderName::Metadata(EVENT_TYPE), &envelope.event_type);
    header(HeaderName::Metadata(EVENT_VERSION), itoa::Buffer::new().format(envelope.event_version));
    let mut timestamp = StackText::<TIMESTAMP_LEN>::new();
    header(HeaderName::Metadata(EVENT_TIMESTAMP), timestamp.format(format_timestamp(envelope.timestamp)));
    for (name, value) in optional_headers(envelope) {
        header(HeaderName::Metadata(name), value);
    }
    for (name, value) in &envelope.headers {
        header(HeaderName::User(name), value);
    }
}

/// Length of every timestamp on the wire: RFC 3339 with nanoseconds and a four-digit year (see
/// `format_timestamp`).
const TIMESTAMP_LEN: usize = "2026-11-28T16:40:03.123456789Z".len();

/// Text formatted into a buffer on the stack, for header values written per event.
struct StackText<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> StackText<N> {
    fn new() -> Self {
        Self { bytes: [0; N], len: 0 }
    }

    /// Formats `value` into the buffer and returns it.
    fn format(&mut self, value: impl std::fmt::Display) -> &str {
        use std::fmt::Write;
        self.len = 0;
        write!(self, "{value}").expect("the buffer fits every value formatted into it");
        std::str::from_utf8(&self.bytes[..self.len]).expect("only text is written")
    }
}

impl<const N: usize> std::fmt::Write for StackText<N> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        let end = self.len + text.len();
        self.bytes.get_mut(self.len..end).ok_or(std::fmt::Error)?.copy_from_slice(text.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// The optional metadata headers `envelope` carries, in wire order.
fn optional_headers(envelope: &Envelope) -> impl Iterator<Item = (&'static str, &str)> {
    [(TRACE_ID, &envelope.trace_id), (CORRELATION_ID, &envelope.correlation_id), (TENANT_ID, &envelope.tenant_id)]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value.as_deref()?)))
}

/// The size of an envelope's encoding, measured without building it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EncodedSize {
    /// Number of headers.
    pub headers: usize,
    /// Bytes of every header name and value, plus the payload's.
    pub bytes: usize,
}

/// What [`encode`] would produce, in size only. A backend checks its message-size limit with it before a
/// publish waits for window room, so a waiting publish holds its envelope and nothing encoded.
pub fn encoded_size(envelope: &Envelope) -> EncodedSize {
    let version_len = envelope.event_version.checked_ilog10().map_or(1, |digits| digits as usize + 1);
    let mut size = EncodedSize {
        headers: 5,
        bytes: EVENT_ID.len()
            + uuid::fmt::Hyphenated::LENGTH
            + AGGREGATE_ID.len()
            + envelope.aggregate_id.len()
            + EVENT_TYPE.len()
            + envelope.event_type.len()
            + EVENT_VERSION.len()
            + version_len
            + EVENT_TIMESTAMP.len()
            + TIMESTAMP_LEN
            + envelope.payload.len(),
    };
    for (name, value) in optional_headers(envelope) {
        size.headers += 1;
        size.bytes += name.len() + value.len();
    }
    size.headers += envelope.headers.len();
    size.bytes += envelope.headers.iter().map(|(name, value)| name.len() + value.len()).sum::<usize>();
    size
}

impl WireMessage {
    /// The size of this message, counted as [`encoded_size`] counts it.
    pub fn size(&self) -> EncodedSize {
        EncodedSize {
            headers: self.headers.len(),
            bytes: self.payload.len()
                + self.headers.iter().map(|(name, value)| name.len() + value.len()).sum::<usize>(),
        }
    }
}

/// Decodes headers and a raw payload into an [`Envelope`]. Never panics: every defect is a [`DecodeError`]
/// naming the header at fault.
pub fn decode<'a, I>(headers: I, payload: Bytes) -> Result<Envelope, DecodeError>
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    let mut fields: [Option<&'a [u8]>; 8] = [None; 8];
    let mut user = std::collections::BTreeMap::new();
    for (name, value) in headers {
        if let Some(slot) = RESERVED_HEADERS.iter().position(|r| r.eq_ignore_ascii_case(name)) {
            fields[slot].get_or_insert(value);
        } else if !is_reserved(name) {
            let value =
                text(name, value).map_err(|reason| DecodeError::MalformedHeader { name: "user header", reason })?;
            user.insert(name.to_owned(), value.to_owned());
        }
    }
    let required = |slot: usize| -> Result<&'a str, DecodeError> {
        let name = RESERVED_HEADERS[slot];
        let value = fields[slot].ok_or(DecodeError::MissingHeader { name })?;
        text(name, value).map_err(|reason| DecodeError::MalformedHeader { name, reason })
    };
    let optional = |slot: usize| -> Result<Option<String>, DecodeError> {
        match fields[slot] {
            None => Ok(None),
            Some(_) => required(slot).map(|v| Some(v.to_owned())),
        }
    };
    let malformed = |name: &'static str, reason: String| DecodeError::MalformedHeader { name, reason };

    let event_id = required(0)?.parse::<EventId>().map_err(|e| malformed(EVENT_ID, format!("expected a UUID: {e}")))?;
    let version = required(3)?;
    let event_version = version
        .parse::<u64>()
        .map_err(|_| malformed(EVENT_VERSION, format!("expected a positive integer, got {version:?}")))?;
    let timestamp = required(4)?;
    let timestamp = humantime::parse_rfc3339(timestamp)
        .map_err(|e| malformed(EVENT_TIMESTAMP, format!("expected RFC 3339 UTC time, got {timestamp:?}: {e}")))?;

    let envelope = Envelope {
        event_id,
        aggregate_id: required(1)?.to_owned(),
        event_type: required(2)?.to_owned(),
        event_version,
        timestamp,
        trace_id: optional(5)?,
        correlation_id: optional(6)?,
        tenant_id: optional(7)?,
        headers: user,
        payload,
    };
    envelope.validate()?;
    Ok(envelope)
}

fn text<'a>(name: &str, value: &'a [u8]) -> Result<&'a str, String> {
    std::str::from_utf8(value).map_err(|_| format!("{name} is not valid UTF-8"))
}

/// Latest timestamp the wire format can carry (9999-12-31T23:59:59.999999999Z).
pub(crate) const MAX_TIMESTAMP: Duration = Duration::new(253_402_300_799, 999_999_999);

/// Whether `timestamp` can be written as an RFC 3339 time (between 1970 and the end of year 9999).
pub(crate) fn timestamp_in_range(timestamp: SystemTime) -> bool {
    timestamp.duration_since(UNIX_EPOCH).is_ok_and(|since| since <= MAX_TIMESTAMP)
}

fn format_timestamp(timestamp: SystemTime) -> humantime::Rfc3339Timestamp {
    // Validation keeps timestamps inside the RFC 3339 range; clamp anyway so encoding can never panic.
    let since = timestamp.duration_since(UNIX_EPOCH).unwrap_or_default().min(MAX_TIMESTAMP);
    humantime::format_rfc3339_nanos(UNIX_EPOCH + since)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header_text() -> impl Strategy<Value = String> {
        "[ -~]{0,24}"
    }

    prop_compose! {
        fn envelope()(
            aggregate in "[A-Za-z0-9:_./-]{1,64}",
            event_type in "[A-Za-z][ -~]{0,31}",
            version in 1u64..,
            nanos in 0u64..253_402_300_799_999_999_999u128 as u64,
            trace in proptest::option::of(header_text()),
            correlation in proptest::option::of(header_text()),
            tenant in proptest::option::of(header_text()),
            headers in proptest::collection::btree_map("x-[a-z0-9-]{1,12}", header_text(), 0..4),
            payload in proptest::collection::vec(any::<u8>(), 1..256),
            uuid in any::<u128>(),
        ) -> Envelope {
            let mut e = Envelope::builder(aggregate, event_type)
                .event_id(EventId::from_uuid(uuid::Uuid::from_u128(uuid)))
                .version(version)
                .timestamp(UNIX_EPOCH + Duration::from_nanos(nanos))
                .payload(payload)
                .build()
                .unwrap();
            e.trace_id = trace;
            e.correlation_id = correlation;
            e.tenant_id = tenant;
            e.headers = headers;
            e
        }
    }

    proptest! {
        #[test]
        fn encoded_size_is_the_size_of_the_encoding(e in envelope()) {
            prop_assert_eq!(encoded_size(&e), encode(&e).size());
        }

        #[test]
        fn encode_then_decode_is_identity(e in envelope()) {
            let wire = encode(&e);
            prop_assert_eq!(wire.decode(), Ok(e));
        }

        #[test]
        fn decoding_arbitrary_input_never_panics(
            headers in proptest::collection::vec(
                (prop_oneof![
                    Just(EVENT_ID.to_owned()), Just(AGGREGATE_ID.to_owned()), Just(EVENT_TYPE.to_owned()),
                    Just(EVENT_VERSION.to_owned()), Just(EVENT_TIMESTAMP.to_owned()), Just("TRACE-ID".to_owned()),
                    "[ -~]{0,16}",
                ], proptest::collection::vec(any::<u8>(), 0..48)),
                0..12),
            payload in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let _ = decode(headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())), payload.into());
        }

        #[test]
        fn any_single_corrupted_header_is_named(e in envelope(), slot in 0usize..5, junk in "[ -~]{0,8}") {
            let mut wire = encode(&e);
            wire.headers[slot].1 = junk;
            if let Err(err) = wire.decode() {
                let text = err.to_string();
                prop_assert!(
                    text.contains(RESERVED_HEADERS[slot]) || matches!(err, DecodeError::Invalid(_)),
                    "{}", text
                );
            }
        }
    }

    #[test]
    fn missing_and_malformed_headers_say_which_and_why() {
        let e = Envelope::builder("a-1", "T").payload("p").build().unwrap();
        let mut wire = encode(&e);
        wire.headers.retain(|(n, _)| n != EVENT_TYPE);
        assert_eq!(wire.decode(), Err(DecodeError::MissingHeader { name: EVENT_TYPE }));

        let mut wire = encode(&e);
        wire.set_header(EVENT_VERSION, "seven");
        let err = wire.decode().unwrap_err();
        assert!(err.to_string().contains("event-version is malformed"), "{err}");

        let mut wire = encode(&e);
        wire.set_header(EVENT_VERSION, "0");
        assert_eq!(wire.decode(), Err(DecodeError::Invalid(ValidationError::ZeroVersion)));
    }

    #[test]
    fn header_names_match_without_case_and_broker_headers_are_not_user_headers() {
        let e = Envelope::builder("a-1", "T").payload("p").build().unwrap();
        let mut wire = encode(&e);
        for (name, _) in &mut wire.headers {
            *name = name.to_uppercase();
        }
        wire.headers.push(("Nats-Msg-Id".into(), e.event_id.to_string()));
        assert_eq!(wire.decode(), Ok(e));
    }
}
