//! The benchmark behind `eventbus-bench`: the seed's workload levels, run through the bus and through the
//! bare broker client on the same broker, measured end to end.
//!
//! A run ([`bus::run`], [`nats_bare::run`], [`kafka_bare::run`]) starts its consumers, waits until they
//! report they are live, then starts the clock at the first publish and stops it at the last event consumed:
//! no fixed sleeps. One publisher task per aggregate sends its versions in order and hands each ack (a
//! receipt, or the bare client's ack future) to one collector task (`acks.rs`), which takes its latency when it
//! completes; at most the publish window's worth are in flight in every run. Every delivery goes through a
//! [`tally::DeliveryTally`], which finds order violations, losses and duplicates. Over the same clock the
//! run reads this process's CPU time and, when the bench started the broker's container on this host, the
//! broker's ([`crate::probe::watch_broker_process`]): on a machine the two share, the rate follows their sum.

mod acks;
pub mod bus;
pub mod kafka_bare;
pub mod nats_bare;
pub mod plot;
pub mod report;
pub mod rounds;
pub mod tally;

use std::time::Duration;

/// Longest a run waits for its last event once publishing is done.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(600);

/// The topics every level publishes to; aggregate `i` goes to topic `i mod TOPICS`.
pub const TOPICS: usize = 5;

/// One workload size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Level {
    /// Its name on the command line.
    pub name: &'static str,
    /// Events published.
    pub messages: usize,
    /// Aggregates (and publisher tasks); each gets `messages / aggregates` versions.
    pub aggregates: usize,
}

/// The seed's levels: N = 500 / 2000 / 5000 / 10000 with N/10 aggregates clamped to 50..1000, then `scale`.
pub const LEVELS: [Level; 5] = [
    Level { name: "low", messages: 500, aggregates: 50 },
    Level { name: "mid", messages: 2000, aggregates: 200 },
    Level { name: "high", messages: 5000, aggregates: 500 },
    Level { name: "extreme", messages: 10_000, aggregates: 1000 },
    Level { name: "scale", messages: 1_000_000, aggregates: 10_000 },
];

impl Level {
    /// The level named `name`.
    pub fn named(name: &str) -> Option<Self> {
        LEVELS.iter().copied().find(|level| level.name == name)
    }

    /// Versions per aggregate.
    pub fn versions(&self) -> u64 {
        (self.messages / self.aggregates) as u64
    }
}

/// The aggregate index of a workload aggregate id (`<run>-agg-<i>`).
pub fn aggregate_index(aggregate_id: &str) -> Option<usize> {
    // Split at the last '-' (a byte search), then check the rest: a substring search would set up a searcher for
    // every delivery the tally records.
    let (prefix, index) = aggregate_id.rsplit_once('-')?;
    prefix.ends_with("-agg").then(|| index.parse().ok()).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregate_index_reads_only_workload_ids() {
        assert_eq!(aggregate_index("bench-kafka-0a1b-agg-42"), Some(42));
        assert_eq!(aggregate_index("x-agg-0"), Some(0));
        for foreign in ["order-7", "agg-7", "x-agg-", "x-agg-7a", "x-agg--7", "x-aggregate-7", ""] {
            assert_eq!(aggregate_index(foreign), None, "{foreign:?}");
        }
    }
}
