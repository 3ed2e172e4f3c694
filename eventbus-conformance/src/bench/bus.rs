//! A level run through the `EventBus`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use eventbus::{BusConfig, EventBus, EventBusExt, HandlerError, PublishReceipt, SubscribeOptions};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::acks;
use super::report::{Client, Measurement};
use super::tally::{DeliveryTally, LatencyHistogram, Percentiles};
use super::{Level, DRAIN_DEADLINE, TOPICS};
use crate::probe::{broker_cpu_ms, process_cpu_ms, resources, rss_kib, tasks_settled, Sampler};
use crate::workload::Workload;

/// Enqueue and ack latencies and failures of every publisher task.
pub(crate) struct PublishTimings {
    pub(crate) enqueue: LatencyHistogram,
    pub(crate) ack: LatencyHistogram,
    pub(crate) failures: AtomicUsize,
}

impl PublishTimings {
    pub(crate) fn new() -> Self {
        Self { enqueue: LatencyHistogram::new(), ack: LatencyHistogram::new(), failures: AtomicUsize::new(0) }
    }

    pub(crate) fn enqueue(&self) -> Percentiles {
        self.enqueue.percentiles()
    }

    pub(crate) fn ack(&self) -> Percentiles {
        self.ack.percentiles()
    }

    pub(crate) fn failed(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Waits for every publisher task; one that panicked counts as a failed publish.
    pub(crate) async fn join(&self, mut publishers: JoinSet<()>) {
        while let Some(joined) = publishers.join_next().await {
            if joined.is_err() {
                self.failed();
            }
        }
    }
}

/// Holds every publisher task of a run until all are spawned. Without it the first publishers of `scale` fill
/// the window and finish before the last one starts, so the peak task count would not hold every publisher;
/// and the clock starts at the first publish, not before the spawning.
pub(crate) struct StartGate {
    open: watch::Sender<bool>,
}

impl StartGate {
    /// A closed gate.
    pub(crate) fn new() -> Self {
        Self { open: watch::Sender::new(false) }
    }

    /// What a publisher task awaits before its first publish.
    pub(crate) fn waiter(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut gate = self.open.subscribe();
        async move {
            let _ = gate.wait_for(|open| *open).await;
        }
    }

    /// Lets every publisher go and starts the clock. `sampler` first counts the tasks alive: every publisher
    /// and everything the client runs.
    pub(crate) fn open(self, sampler: &Sampler) -> Clock {
        sampler.sample_now();
        let clock = Clock { started: Instant::now(), cpu_ms: process_cpu_ms(), broker_cpu_ms: broker_cpu_ms() };
        self.open.send_replace(true);
        clock
    }
}

/// A run's clock, started at the first publish: wall time, this process's CPU time and the broker's.
pub(crate) struct Clock {
    started: Instant,
    cpu_ms: u64,
    broker_cpu_ms: Option<u64>,
}

/// What a run's clock read when the last event was consumed.
pub(crate) struct Elapsed {
    wall: std::time::Duration,
    cpu_ms: u64,
    broker_cpu_ms: Option<u64>,
}

impl Clock {
    /// Reads the clock: wall time, process CPU time and broker CPU time since it started.
    pub(crate) fn stop(&self) -> Elapsed {
        let broker_cpu_ms = self.broker_cpu_ms.zip(broker_cpu_ms()).map(|(start, now)| now.saturating_sub(start));
        Elapsed { wall: self.started.elapsed(), cpu_ms: process_cpu_ms().saturating_sub(self.cpu_ms), broker_cpu_ms }
    }
}

/// What every run measures around its client: the state before, the sampler during.
pub(crate) struct Baseline {
    tasks: usize,
    fds: usize,
    rss_kib: u64,
}

impl Baseline {
    pub(crate) fn take() -> Self {
        let now = resources();
        Self { tasks: now.tasks, fds: now.fds, rss_kib: rss_kib() }
    }

    /// Assembles the measurement once the client is closed and dropped.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn measure(
        self,
        backend: &str,
        client: Client,
        level: Level,
        elapsed: Elapsed,
        sampler: Sampler,
        timings: &PublishTimings,
        tally: &DeliveryTally,
    ) -> Measurement {
        let peaks = sampler.finish();
        let tasks_after = tasks_settled(self.tasks).await;
        let fds_after = resources().fds;
        let counts = tally.counts();
        Measurement {
            backend: backend.to_owned(),
            client,
            level: level.name.to_owned(),
            round: 1,
            messages: level.messages,
            elapsed_ms: elapsed.wall.as_secs_f64() * 1000.0,
            cpu_ms: elapsed.cpu_ms,
            broker_cpu_ms: elapsed.broker_cpu_ms,
            throughput: counts.distinct as f64 / elapsed.wall.as_secs_f64(),
            publish_us: timings.enqueue(),
            ack_us: timings.ack(),
            e2e_us: tally.end_to_end(),
            publishers: level.aggregates,
            peak_tasks: peaks.tasks,
            rss_before_mb: self.rss_kib as f64 / 1024.0,
            rss_delta_mb: peaks.rss_kib.saturating_sub(self.rss_kib) as f64 / 1024.0,
            counts: counts.into(),
            publish_failures: timings.failures.load(Ordering::Relaxed),
            tasks_left: tasks_after as isize - self.tasks as isize,
            fds_left: fds_after as isize - self.fds as isize,
            throughput_ratio: None,
            publish_p99_ratio: None,
            layout_throughput_ratio: None,
        }
    }
}

/// The level's workload: its topics are named after `client` and `level` plus a unique suffix.
pub(crate) fn workload(client: Client, level: Level, payload: usize) -> Workload {
    let mut workload =
        Workload::new(&format!("bench-{client}-{}", level.name), level.aggregates, level.versions(), TOPICS);
    workload.payload = payload;
    workload
}

/// Runs `level` through a bus connected with `config`: one subscription per topic in group `bench`, live
/// before the clock starts, and one publisher task per aggregate.
pub async fn run(config: &BusConfig, backend: &str, level: Level, payload: usize) -> anyhow::Result<Measurement> {
    let baseline = Baseline::take();
    let bus = eventbus::connect(config).await?;
    let workload = workload(Client::Bus, level, payload);
    let tally = Arc::new(DeliveryTally::new(level.aggregates, level.versions()));
    let mut subscriptions = Vec::new();
    for topic in &workload.topics {
        let tally = tally.clone();
        // subscribe returns once the consumer is live on the broker: no sleep needed before publishing.
        let subscription = bus
            .subscribe_with(topic, SubscribeOptions::group("bench"), move |event| {
                tally.record_event(&event);
                std::future::ready(Ok::<(), HandlerError>(()))
            })
            .await?;
        subscriptions.push(subscription);
    }
    let sampler = Sampler::start();
    let timings = Arc::new(PublishTimings::new());
    let clock = publish_all(&bus, &workload, config.publish.window, &timings, &sampler).await;
    tally.wait_complete(DRAIN_DEADLINE).await;
    let elapsed = clock.stop();
    for subscription in subscriptions {
        subscription.close().await;
    }
    bus.close().await;
    drop(bus);
    Ok(baseline.measure(backend, Client::Bus, level, elapsed, sampler, &timings, &tally).await)
}

/// One task per aggregate publishes its versions in order and hands each receipt to one collector task, as
/// the bare runs hand their ack futures: the ack latency is taken when the ack settles, not when a publisher
/// gets round to awaiting it, and the publishers hold no receipts. Returns the run's clock.
async fn publish_all(
    bus: &Arc<dyn EventBus>,
    workload: &Workload,
    window: usize,
    timings: &Arc<PublishTimings>,
    sampler: &Sampler,
) -> Clock {
    // The bus's window bounds the publishes awaiting an ack, but not the receipts already settled that the
    // collector has yet to take: room for a window of each keeps those from piling up without holding the
    // publishers back before the bus's own window does.
    let (receipts, collector) = acks::collect::<PublishReceipt>(2 * window, timings.clone(), Result::is_ok);
    let gate = StartGate::new();
    let mut publishers = JoinSet::new();
    // One copy shared by every publisher: 10,000 copies of the topic names at `scale` would be read cold.
    let shared = Arc::new(workload.clone());
    for i in 0..workload.aggregates {
        let (bus, workload, timings, receipts) = (bus.clone(), shared.clone(), timings.clone(), receipts.clone());
        let start = gate.waiter();
        publishers.spawn(async move {
            let aggregate_id = workload.aggregate_id(i);
            start.await;
            let topic = workload.topic_of(i);
            for version in 1..=workload.versions {
                let event = workload.event_for(aggregate_id.as_str(), version);
                let sent = Instant::now();
                match bus.publish(topic, event).await {
                    Ok(mut receipt) => {
                        // The bus's publish latency, its window's wait included and this bench's bookkeeping not.
                        let accepted = sent.elapsed();
                        match receipt.try_result() {
                            Some(acked) => receipts.settled(&timings, accepted, acked.is_ok()),
                            None => {
                                // Room is taken only for a receipt the collector has to wait for: the bus's own
                                // window bounds what is in flight.
                                let slot = receipts.reserve().await;
                                receipts.hand_over_accepted(&timings, slot, sent, accepted, receipt);
                            }
                        }
                    }
                    Err(_) => timings.failed(),
                }
            }
        });
    }
    let clock = gate.open(sampler);
    acks::join_publishers(timings, publishers, receipts, collector).await;
    clock
}
