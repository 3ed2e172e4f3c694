//! What a benchmark run counts while it runs, cheaply enough not to be what it measures: deliveries checked
//! for order, loss and duplicates per aggregate with atomics, and latencies in fixed-size histograms, one per
//! thread.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use eventbus::Envelope;
use hdrhistogram::Histogram;
use tokio::sync::Notify;

use super::aggregate_index;

/// Per-aggregate delivery checks for a workload of `aggregates` × `versions` events.
///
/// Each aggregate has a bit per version (a second delivery of a version is a duplicate) and the last version
/// seen (a first delivery that is not last + 1 is an order violation). Aggregates are identified by their
/// index in the workload, so recording is two atomic operations and no lock.
pub struct DeliveryTally {
    versions: u64,
    words: usize,
    seen: Vec<AtomicU64>,
    last: Vec<AtomicU64>,
    distinct: AtomicUsize,
    deliveries: AtomicUsize,
    duplicates: AtomicUsize,
    violations: AtomicUsize,
    unknown: AtomicUsize,
    expected: usize,
    complete: Notify,
    end_to_end: LatencyHistogram,
}

/// The counts of a finished run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Deliveries, duplicates included.
    pub deliveries: usize,
    /// Distinct events delivered.
    pub distinct: usize,
    /// Events delivered more than once.
    pub duplicates: usize,
    /// Events delivered before an earlier version of their aggregate.
    pub violations: usize,
    /// Events never delivered.
    pub losses: usize,
    /// Deliveries that named no aggregate or version of the workload.
    pub unknown: usize,
}

impl DeliveryTally {
    /// A tally expecting versions `1..=versions` of aggregates `0..aggregates`.
    pub fn new(aggregates: usize, versions: u64) -> Self {
        let words = (versions as usize + 1).div_ceil(64);
        Self {
            versions,
            words,
            seen: (0..aggregates * words).map(|_| AtomicU64::new(0)).collect(),
            last: (0..aggregates).map(|_| AtomicU64::new(0)).collect(),
            distinct: AtomicUsize::new(0),
            deliveries: AtomicUsize::new(0),
            duplicates: AtomicUsize::new(0),
            violations: AtomicUsize::new(0),
            unknown: AtomicUsize::new(0),
            expected: aggregates * versions as usize,
            complete: Notify::new(),
            end_to_end: LatencyHistogram::new(),
        }
    }

    /// Records a delivered event of the workload.
    pub fn record_event(&self, event: &Envelope) {
        self.record(aggregate_index(&event.aggregate_id), event.event_version, event.timestamp);
    }

    /// Records what a bare consumer decoded; a message that did not decode counts as an unknown delivery.
    pub fn record_decoded<E>(&self, decoded: Result<Envelope, E>) {
        match decoded {
            Ok(event) => self.record_event(&event),
            Err(_) => self.record(None, 0, SystemTime::now()),
        }
    }

    /// Records one delivery of `version` of aggregate `index`, published at `timestamp`.
    pub fn record(&self, index: Option<usize>, version: u64, timestamp: SystemTime) {
        self.deliveries.fetch_add(1, Ordering::Relaxed);
        let latency = SystemTime::now().duration_since(timestamp).unwrap_or_default();
        self.end_to_end.record(latency);
        let Some(index) = index.filter(|&i| i < self.last.len() && (1..=self.versions).contains(&version)) else {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let bit = 1u64 << (version % 64);
        let word = &self.seen[index * self.words + version as usize / 64];
        if word.fetch_or(bit, Ordering::AcqRel) & bit != 0 {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let previous = self.last[index].fetch_max(version, Ordering::AcqRel);
        if version != previous + 1 {
            self.violations.fetch_add(1, Ordering::Relaxed);
        }
        if self.distinct.fetch_add(1, Ordering::AcqRel) + 1 == self.expected {
            // notify_one keeps a permit, so a waiter that is not yet waiting still wakes.
            self.complete.notify_one();
        }
    }

    /// Waits until every expected event was delivered once, at most `within`; whether they all were.
    pub async fn wait_complete(&self, within: Duration) -> bool {
        if self.distinct.load(Ordering::Acquire) >= self.expected {
            return true;
        }
        let _ = tokio::time::timeout(within, self.complete.notified()).await;
        self.distinct.load(Ordering::Acquire) >= self.expected
    }

    /// The counts so far.
    pub fn counts(&self) -> Counts {
        let distinct = self.distinct.load(Ordering::Acquire);
        Counts {
            deliveries: self.deliveries.load(Ordering::Acquire),
            distinct,
            duplicates: self.duplicates.load(Ordering::Acquire),
            violations: self.violations.load(Ordering::Acquire),
            losses: self.expected.saturating_sub(distinct),
            unknown: self.unknown.load(Ordering::Acquire),
        }
    }

    /// End-to-end latency (consume time − envelope timestamp) of every delivery.
    pub fn end_to_end(&self) -> Percentiles {
        self.end_to_end.percentiles()
    }
}

/// Latencies in microseconds, 1 µs to 1 hour, three significant digits, recorded from any thread.
///
/// Every thread records into a histogram of its own: one histogram behind one lock, recorded into for every
/// event by both runtime threads, cost the in-memory `scale` run a tenth of its time (perf), most of it the
/// two threads taking the lock and its counts' cache lines from each other.
pub struct LatencyHistogram {
    shards: Box<[Shard]>,
}

/// One thread's histogram, on cache lines of its own.
#[repr(align(128))]
struct Shard(Mutex<Histogram<u64>>);

/// Histograms per [`LatencyHistogram`]; threads beyond this many share them.
const SHARDS: usize = 8;

thread_local! {
    /// This thread's shard, the same in every histogram.
    static SHARD: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS
    };
}

impl LatencyHistogram {
    /// An empty histogram.
    pub fn new() -> Self {
        Self { shards: (0..SHARDS).map(|_| Shard(Mutex::new(latency_histogram()))).collect() }
    }

    /// Adds `latency` (values beyond the bounds are clamped to them).
    pub fn record(&self, latency: Duration) {
        // Whole microseconds without `as_micros`, whose 128-bit division would be paid on every record.
        let micros = (latency.as_secs().saturating_mul(1_000_000) + u64::from(latency.subsec_micros())).max(1);
        let shard = &self.shards[SHARD.try_with(|shard| *shard).unwrap_or(0)];
        shard.0.lock().unwrap_or_else(|p| p.into_inner()).saturating_record(micros);
    }

    /// The percentiles of everything recorded so far, on every thread.
    pub fn percentiles(&self) -> Percentiles {
        let mut merged = latency_histogram();
        for shard in &*self.shards {
            let shard = shard.0.lock().unwrap_or_else(|p| p.into_inner());
            merged.add(&*shard).expect("histograms with the same bounds add up");
        }
        Percentiles::of(&merged)
    }
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid")
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// Largest value.
    pub max: u64,
    /// Number of samples.
    pub count: u64,
}

impl Percentiles {
    /// The percentiles of `histogram`.
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return Self::default();
        }
        Self {
            p50: histogram.value_at_quantile(0.5),
            p99: histogram.value_at_quantile(0.99),
            max: histogram.max(),
            count: histogram.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_order_violations_duplicates_losses_and_strangers() {
        let tally = DeliveryTally::new(3, 70);
        let now = SystemTime::now();
        for version in 1..=70 {
            tally.record(Some(0), version, now);
        }
        tally.record(Some(1), 2, now);
        tally.record(Some(1), 1, now);
        tally.record(Some(0), 65, now);
        tally.record(Some(7), 1, now);
        tally.record(None, 1, now);
        tally.record(Some(2), 71, now);
        let counts = tally.counts();
        assert_eq!(counts.distinct, 72);
        assert_eq!(counts.duplicates, 1);
        assert_eq!(counts.violations, 2, "aggregate 1 got v2 first, then v1 after v2");
        assert_eq!(counts.losses, 3 * 70 - 72);
        assert_eq!(counts.unknown, 3);
        assert_eq!(counts.deliveries, 76);
    }

    #[test]
    fn latencies_recorded_on_any_thread_add_up() {
        let histogram = LatencyHistogram::new();
        std::thread::scope(|scope| {
            for thread in 1..=4u64 {
                let histogram = &histogram;
                scope.spawn(move || {
                    for _ in 0..25 {
                        histogram.record(Duration::from_micros(thread * 100));
                    }
                });
            }
        });
        histogram.record(Duration::ZERO);
        let percentiles = histogram.percentiles();
        assert_eq!(percentiles.count, 101);
        assert_eq!(percentiles.p50, 200);
        assert_eq!(percentiles.max, 400);
    }

    #[tokio::test]
    async fn completion_wakes_a_waiter_that_arrives_late() {
        let tally = DeliveryTally::new(1, 2);
        tally.record(Some(0), 1, SystemTime::now());
        assert!(!tally.wait_complete(Duration::from_millis(10)).await);
        tally.record(Some(0), 2, SystemTime::now());
        assert!(tally.wait_complete(Duration::from_millis(10)).await);
    }
}
