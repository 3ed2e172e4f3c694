//! A level run through the `EventBus`.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use eventbus::{BusConfig, EventBus, EventBusExt, HandlerError, SubscribeOptions};
use hdrhistogram::Histogram;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

use super::report::{Client, Measurement};
use super::tally::{latency_histogram, record_latency, DeliveryTally, Percentiles};
use super::{Level, DRAIN_DEADLINE, PUBLISHER_PIPELINE, TOPICS};
use crate::probe::{resources, rss_kib, tasks_settled, Sampler};
use crate::workload::Workload;

/// Enqueue and ack latencies and failures of every publisher task.
pub(crate) struct PublishTimings {
    pub(crate) enqueue: Mutex<Histogram<u64>>,
    pub(crate) ack: Mutex<Histogram<u64>>,
    pub(crate) failures: AtomicUsize,
}

impl PublishTimings {
    pub(crate) fn new() -> Self {
        Self {
            enqueue: Mutex::new(latency_histogram()),
            ack: Mutex::new(latency_histogram()),
            failures: AtomicUsize::new(0),
        }
    }

    pub(crate) fn enqueue(&self) -> Percentiles {
        Percentiles::of(&self.enqueue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn ack(&self) -> Percentiles {
        Percentiles::of(&self.ack.lock().unwrap_or_else(|p| p.into_inner()))
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

/// Where bare publishers hand their acks (futures, or what turns into one): one task settles them in the order they were sent, at most
/// `window` waiting. `acked` tells a stored message from a failed one. Dropping every sender ends the task.
pub(crate) fn collect_acks<F>(
    window: usize,
    timings: Arc<PublishTimings>,
    acked: fn(&F::Output) -> bool,
) -> (mpsc::Sender<(Instant, F)>, JoinHandle<()>)
where
    F: IntoFuture + Send + 'static,
    F::IntoFuture: Send,
    F::Output: Send,
{
    let (acks, mut pending) = mpsc::channel::<(Instant, F)>(window);
    let collector = tokio::spawn(async move {
        while let Some((sent, ack)) = pending.recv().await {
            if acked(&ack.into_future().await) {
                record_latency(&timings.ack, sent.elapsed());
            } else {
                timings.failed();
            }
        }
    });
    (acks, collector)
}

/// Waits for every bare publisher task, then for the collector to settle every ack they handed over; `acks`
/// is the run's own sender, dropped first so the collector ends with the last publisher.
pub(crate) async fn join_publishers<F>(
    timings: &PublishTimings,
    publishers: JoinSet<()>,
    acks: mpsc::Sender<(Instant, F)>,
    collector: JoinHandle<()>,
) {
    drop(acks);
    timings.join(publishers).await;
    let _ = collector.await;
}

/// Hands the ack future of a publish sent at `sent` to the collector; the wait for room in its queue counts in
/// the publish latency, as the wait for window room does on the bus.
pub(crate) async fn hand_over<F>(acks: &mpsc::Sender<(Instant, F)>, timings: &PublishTimings, sent: Instant, ack: F) {
    if acks.send((sent, ack)).await.is_err() {
        timings.failed();
    }
    record_latency(&timings.enqueue, sent.elapsed());
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
        elapsed: std::time::Duration,
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
            messages: level.messages,
            elapsed_ms: elapsed.as_secs_f64() * 1000.0,
            throughput: counts.distinct as f64 / elapsed.as_secs_f64(),
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
            ordered_throughput_ratio: None,
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
    let started = Instant::now();
    publish_all(&bus, &workload, &timings).await;
    tally.wait_complete(DRAIN_DEADLINE).await;
    let elapsed = started.elapsed();
    for subscription in subscriptions {
        subscription.close().await;
    }
    bus.close().await;
    drop(bus);
    Ok(baseline.measure(backend, Client::Bus, level, elapsed, sampler, &timings, &tally).await)
}

/// One task per aggregate publishes its versions in order, with at most [`PUBLISHER_PIPELINE`] receipts
/// outstanding.
async fn publish_all(bus: &Arc<dyn EventBus>, workload: &Workload, timings: &Arc<PublishTimings>) {
    let mut publishers = JoinSet::new();
    for i in 0..workload.aggregates {
        let (bus, workload, timings) = (bus.clone(), workload.clone(), timings.clone());
        publishers.spawn(async move {
            let topic = workload.topic_of(i);
            let mut pending = VecDeque::with_capacity(PUBLISHER_PIPELINE);
            for version in 1..=workload.versions {
                if pending.len() == PUBLISHER_PIPELINE {
                    if let Some((sent, receipt)) = pending.pop_front() {
                        settle(&timings, sent, receipt).await;
                    }
                }
                let event = workload.event(i, version);
                let sent = Instant::now();
                match bus.publish(topic, event).await {
                    Ok(receipt) => {
                        record_latency(&timings.enqueue, sent.elapsed());
                        pending.push_back((sent, receipt));
                    }
                    Err(_) => timings.failed(),
                }
            }
            for (sent, receipt) in pending {
                settle(&timings, sent, receipt).await;
            }
        });
    }
    timings.join(publishers).await;
}

async fn settle(timings: &PublishTimings, sent: Instant, receipt: eventbus::PublishReceipt) {
    match receipt.await {
        Ok(_) => record_latency(&timings.ack, sent.elapsed()),
        Err(_) => timings.failed(),
    }
}
