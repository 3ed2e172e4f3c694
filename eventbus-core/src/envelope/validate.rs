//! The rules an envelope and a topic name must meet before anything is sent.

use super::{wire, Envelope};

/// Longest accepted aggregate id, in bytes.
pub const MAX_AGGREGATE_ID_LEN: usize = 256;

/// Longest accepted topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 200;

/// One broken rule of an [`Envelope`] or a topic name. Each variant names the field it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// `aggregate_id` is empty.
    #[error("aggregate_id is empty: every event needs the id of the aggregate it belongs to")]
    EmptyAggregateId,
    /// `aggregate_id` is longer than [`MAX_AGGREGATE_ID_LEN`].
    #[error("aggregate_id is {len} bytes long; the limit is {MAX_AGGREGATE_ID_LEN}")]
    AggregateIdTooLong {
        /// Length of the rejected id, in bytes.
        len: usize,
    },
    /// `aggregate_id` holds a character outside `[A-Za-z0-9:_\-./]`.
    #[error("aggregate_id has {character:?} at byte {position}; only A-Z a-z 0-9 : _ - . / are allowed")]
    AggregateIdCharacter {
        /// The rejected character.
        character: char,
        /// Its byte offset in the id.
        position: usize,
    },
    /// `event_type` is empty.
    #[error("event_type is empty: name the kind of event, such as \"OrderPlaced\"")]
    EmptyEventType,
    /// `event_type` holds a control character, which no broker header can carry.
    #[error("event_type has a control character at byte {position}")]
    EventTypeCharacter {
        /// Byte offset of the control character.
        position: usize,
    },
    /// `event_version` is 0.
    #[error("event_version is 0: versions start at 1")]
    ZeroVersion,
    /// `timestamp` is before 1970 or after the year 9999, which RFC 3339 on the wire cannot carry.
    #[error("timestamp is outside 1970-01-01..=9999-12-31, which the wire format cannot carry")]
    TimestampOutOfRange,
    /// `payload` is empty.
    #[error("payload is empty: an event must carry a body")]
    EmptyPayload,
    /// A user header uses a name the bus reserves for its own metadata.
    #[error("header {name:?} is reserved for envelope metadata; rename it")]
    ReservedHeader {
        /// The rejected header name.
        name: String,
    },
    /// A user header name is empty or holds characters a broker header cannot carry.
    #[error("header name {name:?} is invalid: use printable ASCII without spaces or ':'")]
    InvalidHeaderName {
        /// The rejected header name.
        name: String,
    },
    /// A header or metadata value holds a line break or another control character.
    #[error("value of {field} holds a control character, which broker headers cannot carry")]
    ControlCharacterInValue {
        /// The field or header whose value was rejected.
        field: String,
    },
    /// The consumer group name is empty, too long or holds characters outside `[A-Za-z0-9_\-.]`.
    #[error("consumer group {group:?} is invalid: {reason}")]
    InvalidGroup {
        /// The rejected group name.
        group: String,
        /// Which rule it broke.
        reason: &'static str,
    },
    /// The topic name is empty, too long or holds characters outside `[A-Za-z0-9_\-.]`.
    #[error("topic {topic:?} is invalid: {reason}")]
    InvalidTopic {
        /// The rejected topic.
        topic: String,
        /// Which rule it broke.
        reason: &'static str,
    },
}

pub(super) fn validate_envelope(envelope: &Envelope) -> Result<(), ValidationError> {
    validate_aggregate_id(&envelope.aggregate_id)?;
    if envelope.event_type.is_empty() {
        return Err(ValidationError::EmptyEventType);
    }
    if let Some(position) = first_control(&envelope.event_type) {
        return Err(ValidationError::EventTypeCharacter { position });
    }
    if envelope.event_version == 0 {
        return Err(ValidationError::ZeroVersion);
    }
    if !wire::timestamp_in_range(envelope.timestamp) {
        return Err(ValidationError::TimestampOutOfRange);
    }
    if envelope.payload.is_empty() {
        return Err(ValidationError::EmptyPayload);
    }
    for (field, value) in [
        ("trace_id", &envelope.trace_id),
        ("correlation_id", &envelope.correlation_id),
        ("tenant_id", &envelope.tenant_id),
    ] {
        if value.as_deref().is_some_and(|value| first_control(value).is_some()) {
            return Err(ValidationError::ControlCharacterInValue { field: field.into() });
        }
    }
    for (name, value) in &envelope.headers {
        if wire::is_reserved(name) {
            return Err(ValidationError::ReservedHeader { name: name.clone() });
        }
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err(ValidationError::InvalidHeaderName { name: name.clone() });
        }
        if first_control(value).is_some() {
            return Err(ValidationError::ControlCharacterInValue { field: format!("header {name:?}") });
        }
    }
    Ok(())
}

/// Bit of [`BYTE_CLASSES`]: the byte may appear in a topic or group name, `[A-Za-z0-9_\-.]`.
const NAME_BYTE: u8 = 1;
/// Bit of [`BYTE_CLASSES`]: the byte may appear in an aggregate id, `[A-Za-z0-9:_\-./]`.
const AGGREGATE_ID_BYTE: u8 = 2;

/// The classes of every byte, looked up rather than computed: one load per byte instead of a chain of compares
/// over the short ids and names every publish checks.
static BYTE_CLASSES: [u8; 256] = byte_classes();

const fn byte_classes() -> [u8; 256] {
    let mut classes = [0; 256];
    let mut byte = 0;
    while byte < 256 {
        let b = byte as u8;
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.' {
            classes[byte] = NAME_BYTE | AGGREGATE_ID_BYTE;
        } else if b == b':' || b == b'/' {
            classes[byte] = AGGREGATE_ID_BYTE;
        }
        byte += 1;
    }
    classes
}

/// Whether `b` is in `class`.
fn in_class(b: u8, class: u8) -> bool {
    BYTE_CLASSES[usize::from(b)] & class != 0
}

/// Whether every byte of `bytes` is in `class`. Reads every byte without stopping early: nearly every value
/// passes.
fn all_in_class(bytes: &[u8], class: u8) -> bool {
    bytes.iter().fold(class, |common, &b| common & BYTE_CLASSES[usize::from(b)]) == class
}

/// Whether any byte of `bytes` is `flagged`. Reads every byte without stopping early, which the compiler turns
/// into vector code: every publish checks several fields, and nearly all of them pass.
fn any_byte(bytes: &[u8], flagged: impl Fn(u8) -> bool) -> bool {
    bytes.iter().fold(false, |found, &b| found | flagged(b))
}

fn validate_aggregate_id(id: &str) -> Result<(), ValidationError> {
    if id.is_empty() {
        return Err(ValidationError::EmptyAggregateId);
    }
    if id.len() > MAX_AGGREGATE_ID_LEN {
        return Err(ValidationError::AggregateIdTooLong { len: id.len() });
    }
    // Bytes rather than chars: every allowed character is ASCII, so the first refused byte starts a character.
    if !all_in_class(id.as_bytes(), AGGREGATE_ID_BYTE) {
        let position = id.bytes().position(|b| !in_class(b, AGGREGATE_ID_BYTE)).expect("a refused byte is there");
        let character = id[position..].chars().next().expect("a refused byte starts a character");
        return Err(ValidationError::AggregateIdCharacter { character, position });
    }
    Ok(())
}

/// The byte offset of the first control character (Unicode category Cc: U+0000–U+001F and U+007F–U+009F).
///
/// Every publish checks several fields, so this reads bytes instead of decoding chars: in UTF-8 those
/// characters are the bytes below 0x20, 0x7F, and 0xC2 followed by 0x80–0x9F (0xC2 is only ever a lead byte).
fn first_control(value: &str) -> Option<usize> {
    let bytes = value.as_bytes();
    // Values without a byte that can start a control character are the rule: they need no exact scan.
    if !any_byte(bytes, |b| (b < 0x20) | (b == 0x7F) | (b == 0xC2)) {
        return None;
    }
    (0..bytes.len()).find(|&i| match bytes[i] {
        b if b < 0x20 || b == 0x7F => true,
        0xC2 => bytes.get(i + 1).is_some_and(|next| (0x80..=0x9F).contains(next)),
        _ => false,
    })
}

/// Checks a topic name: 1 to [`MAX_TOPIC_LEN`] bytes of `[A-Za-z0-9_\-.]`, not starting or ending with `.`,
/// without `..`. The rule is the intersection of what NATS subjects and Kafka topics accept, so a topic name
/// means the same on every backend.
pub fn validate_topic(topic: &str) -> Result<(), ValidationError> {
    check_name(topic).map_err(|reason| ValidationError::InvalidTopic { topic: topic.to_owned(), reason })
}

/// Checks a consumer group name, by the same rule as topic names.
pub fn validate_group(group: &str) -> Result<(), ValidationError> {
    check_name(group).map_err(|reason| ValidationError::InvalidGroup { group: group.to_owned(), reason })
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err("it is longer than 200 bytes");
    }
    // Every publish checks its topic: both passes read every byte without stopping early.
    let bytes = name.as_bytes();
    if !all_in_class(bytes, NAME_BYTE) {
        return Err("only A-Z a-z 0-9 _ - . are allowed");
    }
    let double_dot = bytes.iter().zip(&bytes[1..]).fold(false, |found, (&a, &b)| found | ((a == b'.') & (b == b'.')));
    if bytes[0] == b'.' || bytes[bytes.len() - 1] == b'.' || double_dot {
        return Err("'.' separates words and cannot start, end or repeat");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Envelope {
        Envelope::builder("order-1", "Placed").payload("x").build().unwrap()
    }

    #[test]
    fn each_rule_has_its_own_error() {
        type BreakRule = Box<dyn Fn(&mut Envelope)>;
        let cases: Vec<(BreakRule, ValidationError)> = vec![
            (Box::new(|e| e.aggregate_id.clear()), ValidationError::EmptyAggregateId),
            (Box::new(|e| e.aggregate_id = "a".repeat(257)), ValidationError::AggregateIdTooLong { len: 257 }),
            (
                Box::new(|e| e.aggregate_id = "ord er".into()),
                ValidationError::AggregateIdCharacter { character: ' ', position: 3 },
            ),
            (Box::new(|e| e.event_type.clear()), ValidationError::EmptyEventType),
            (Box::new(|e| e.event_version = 0), ValidationError::ZeroVersion),
            (Box::new(|e| e.payload = Default::default()), ValidationError::EmptyPayload),
            (
                Box::new(|e| {
                    e.headers.insert("Event-Id".into(), "x".into());
                }),
                ValidationError::ReservedHeader { name: "Event-Id".into() },
            ),
        ];
        for (break_rule, expected) in cases {
            let mut envelope = valid();
            break_rule(&mut envelope);
            assert_eq!(envelope.validate(), Err(expected));
        }
    }

    #[test]
    fn boundary_values_are_accepted() {
        let mut envelope = valid();
        envelope.aggregate_id = "a".repeat(MAX_AGGREGATE_ID_LEN);
        assert_eq!(envelope.validate(), Ok(()));
        envelope.aggregate_id = "Aa0:_-./".into();
        assert_eq!(envelope.validate(), Ok(()));
    }

    #[test]
    fn topics() {
        for ok in ["orders", "orders.v1", "a-b_c", "T"] {
            assert_eq!(validate_topic(ok), Ok(()), "{ok}");
        }
        for bad in ["", ".a", "a.", "a..b", "a b", "a*", "a>", "ü", &"t".repeat(201)] {
            assert!(validate_topic(bad).is_err(), "{bad}");
        }
    }

    /// The byte-wise check finds exactly the characters `char::is_control` names, at their byte offsets.
    #[test]
    fn control_characters_match_the_unicode_category() {
        for c in (0..=0x10FFFF).filter_map(char::from_u32) {
            let value = format!("aé{c}b");
            assert_eq!(first_control(&value), value.find(char::is_control), "U+{:04X}", c as u32);
        }
    }

    /// The byte-class table holds exactly the documented character sets.
    #[test]
    fn byte_classes_match_their_character_sets() {
        for b in 0..=u8::MAX {
            let name = b.is_ascii_alphanumeric() || b"_-.".contains(&b);
            assert_eq!(all_in_class(&[b], NAME_BYTE), name, "{b:#04x}");
            assert_eq!(all_in_class(&[b], AGGREGATE_ID_BYTE), name || b":/".contains(&b), "{b:#04x}");
        }
        assert!(all_in_class(b"order-1:lines/2", AGGREGATE_ID_BYTE) && !all_in_class(b"order-1:lines/2", NAME_BYTE));
        assert!(all_in_class(b"", NAME_BYTE));
    }

    #[test]
    fn a_refused_aggregate_id_character_is_named_whole() {
        let mut envelope = valid();
        envelope.aggregate_id = "order-é".into();
        assert_eq!(envelope.validate(), Err(ValidationError::AggregateIdCharacter { character: 'é', position: 6 }));
    }
}
