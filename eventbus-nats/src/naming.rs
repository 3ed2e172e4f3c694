//! How topics, partitions and consumer groups map onto JetStream streams, subjects and durable consumers.
//!
//! | bus | JetStream |
//! |---|---|
//! | topic `t` | stream `<stream_prefix>_<escaped t>` over subjects `<subject_prefix>.t.*` |
//! | event of aggregate `a` | subject `<subject_prefix>.t.<partition_of(a)>` |
//! | group `g`, partition `p` | durable pull consumer `<escaped g>_<p>` filtered on `<subject_prefix>.t.<p>` |
//! | member of `g` on `t` | key `<stream of t>.<escaped g>.members.<member id>` in bucket `<stream_prefix>_LEASES` |
//! | lease of partition `p` | key `<stream of t>.<escaped g>.partitions.<p>` in the same bucket, valued the owner's id |
//!
//! Stream and consumer names may not hold `.`; the escape keeps the mapping one-to-one: `_` becomes `__` and
//! `.` becomes `_-`, every other allowed character stays.

/// The partition of `aggregate_id` among `partitions`: 32-bit FNV-1a of its bytes, modulo the count. Stable
/// across processes, versions and languages, so every publisher and consumer agrees.
pub fn partition_of(aggregate_id: &str, partitions: u16) -> u16 {
    let hash =
        aggregate_id.bytes().fold(0x811c_9dc5_u32, |hash, byte| (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193));
    (hash % u32::from(partitions.max(1))) as u16
}

/// The stream holding `topic`.
pub fn stream_name(stream_prefix: &str, topic: &str) -> String {
    format!("{stream_prefix}_{}", escape(topic))
}

/// The subject of `topic`'s partition `partition`.
pub fn subject(subject_prefix: &str, topic: &str, partition: u16) -> String {
    format!("{subject_prefix}.{topic}.{partition}")
}

/// The subjects of `topic`'s stream.
pub fn stream_subjects(subject_prefix: &str, topic: &str) -> String {
    format!("{subject_prefix}.{topic}.*")
}

/// The durable consumer of `group` for one partition.
pub fn durable_name(group: &str, partition: u16) -> String {
    format!("{}_{partition}", escape(group))
}

/// The key-value bucket of partition leases.
pub fn lease_bucket(stream_prefix: &str) -> String {
    format!("{stream_prefix}_LEASES")
}

/// The lease bucket's key prefix of `group`'s members and leases on `topic`.
pub fn lease_scope(stream_prefix: &str, topic: &str, group: &str) -> String {
    format!("{}.{}", stream_name(stream_prefix, topic), escape(group))
}

fn escape(name: &str) -> String {
    let mut escaped = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        match c {
            '_' => escaped.push_str("__"),
            '.' => escaped.push_str("_-"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_is_fnv1a_and_stable() {
        // FNV-1a of "" is the offset basis.
        assert_eq!(partition_of("", u16::MAX), (0x811c_9dc5_u32 % 65535) as u16);
        assert_eq!(partition_of("order-1", 16), partition_of("order-1", 16));
        let spread: std::collections::HashSet<u16> = (0..1000).map(|i| partition_of(&format!("a-{i}"), 16)).collect();
        assert_eq!(spread.len(), 16, "1000 aggregates should reach every partition");
    }

    #[test]
    fn names_never_collide() {
        let topics = ["a.b", "a_b", "a-b", "a__b", "a_-b", "a._b"];
        let names: std::collections::HashSet<String> = topics.iter().map(|t| stream_name("EB", t)).collect();
        assert_eq!(names.len(), topics.len());
        assert!(names.iter().all(|n| !n.contains('.')));
    }
}
