//! The seed's workload shape: aggregates spread over topics, one publisher task per aggregate sending its
//! versions in order.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus::{Envelope, EventBus, EventBusExt, HandlerError, SubscribeOptions, Subscription};

use crate::recorder::Recorder;

/// Aggregates × versions over several topics, with names unique to one run.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Topic names; aggregate `i` goes to `topics[i % topics.len()]`.
    pub topics: Vec<String>,
    /// Number of aggregates.
    pub aggregates: usize,
    /// Versions per aggregate, published 1..=versions in order.
    pub versions: u64,
    /// Payload bytes per event.
    pub payload: usize,
    run: String,
}

/// What publishing a workload did.
#[derive(Clone, Debug, Default)]
pub struct PublishStats {
    /// Events the broker acked.
    pub acked: usize,
    /// Publishes that failed, with the first few errors.
    pub failed: usize,
    /// First errors seen.
    pub errors: Vec<String>,
    /// From the first publish to the last ack.
    pub elapsed: Duration,
}

impl Workload {
    /// A workload named `name` (the run gets a unique suffix so topics never collide between runs).
    pub fn new(name: &str, aggregates: usize, versions: u64, topics: usize) -> Self {
        let run = unique(name);
        Self { topics: (0..topics).map(|t| format!("{run}.t{t}")).collect(), aggregates, versions, payload: 200, run }
    }

    /// Events in the workload.
    pub fn total(&self) -> usize {
        self.aggregates * self.versions as usize
    }

    /// Id of aggregate `i`.
    pub fn aggregate_id(&self, i: usize) -> String {
        format!("{}-agg-{i}", self.run)
    }

    /// Topic of aggregate `i`.
    pub fn topic_of(&self, i: usize) -> &str {
        &self.topics[i % self.topics.len()]
    }

    /// Event `version` of aggregate `i`.
    pub fn event(&self, i: usize, version: u64) -> Envelope {
        self.event_for(self.aggregate_id(i), version)
    }

    /// Event `version` of the aggregate whose id is `aggregate_id` (from [`aggregate_id`](Self::aggregate_id)),
    /// for a publisher that formats its aggregate's id once rather than per event.
    pub fn event_for(&self, aggregate_id: impl Into<String>, version: u64) -> Envelope {
        Envelope::builder(aggregate_id, "WorkloadEvent")
            .version(version)
            .payload(vec![b'x'; self.payload.max(1)])
            .build()
            .expect("workload events are valid")
    }

    /// Publishes the workload with one task per aggregate; each task sends its versions in order without
    /// waiting for acks in between, then awaits every receipt.
    pub async fn publish(&self, bus: Arc<dyn EventBus>) -> PublishStats {
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..self.aggregates {
            let (bus, workload) = (bus.clone(), self.clone());
            tasks.spawn(async move {
                let topic = workload.topic_of(i);
                let mut receipts = Vec::with_capacity(workload.versions as usize);
                let mut failures = Vec::new();
                for version in 1..=workload.versions {
                    match bus.publish(topic, workload.event(i, version)).await {
                        Ok(receipt) => receipts.push(receipt),
                        Err(e) => failures.push(e.to_string()),
                    }
                }
                for receipt in receipts {
                    if let Err(e) = receipt.await {
                        failures.push(e.to_string());
                    }
                }
                failures
            });
        }
        let mut stats = PublishStats::default();
        while let Some(result) = tasks.join_next().await {
            let failures = result.unwrap_or_else(|e| vec![format!("publisher task failed: {e}")]);
            stats.failed += failures.len();
            stats.errors.extend(failures.into_iter().take(3usize.saturating_sub(stats.errors.len())));
        }
        stats.acked = self.total() - stats.failed;
        stats.elapsed = started.elapsed();
        stats
    }
}

/// A name unique to this run: `prefix` plus random hex.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::now_v7().simple().to_string()[20..])
}

/// Subscribes a handler that records every event it receives into `recorder`.
pub async fn record_into(
    bus: &dyn EventBus,
    topic: &str,
    options: SubscribeOptions,
    recorder: Arc<Recorder>,
) -> eventbus::Result<Subscription> {
    bus.subscribe_with(topic, options, move |event| {
        let recorder = recorder.clone();
        async move {
            recorder.record(&event);
            Ok::<(), HandlerError>(())
        }
    })
    .await
}

/// Subscribes a consumer-group member (`options` names the group) that records every event it receives into
/// the group's `recorder` and counts it in its own `count`. Each event takes 2 ms, long enough that one member
/// cannot drain a topic alone, so the counts show how the group shared the events.
pub async fn share_into(
    bus: &dyn EventBus,
    topic: &str,
    options: SubscribeOptions,
    recorder: Arc<Recorder>,
    count: Arc<AtomicUsize>,
) -> eventbus::Result<Subscription> {
    bus.subscribe_with(topic, options, move |event| {
        let (recorder, count) = (recorder.clone(), count.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            recorder.record(&event);
            count.fetch_add(1, Ordering::Relaxed);
            Ok::<(), HandlerError>(())
        }
    })
    .await
}

/// Subscribes a handler that forwards every event it receives to the returned channel.
pub async fn forward_into(
    bus: &dyn EventBus,
    topic: &str,
    options: SubscribeOptions,
) -> eventbus::Result<(Subscription, tokio::sync::mpsc::UnboundedReceiver<Arc<Envelope>>)> {
    let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
    let subscription = bus
        .subscribe_with(topic, options, move |event| {
            let sender = sender.clone();
            async move {
                sender.send(event)?;
                Ok::<(), HandlerError>(())
            }
        })
        .await?;
    Ok((subscription, receiver))
}

/// A message as a foreign producer writes it with the documented headers (no bus involved): event `version`
/// of `aggregate_id`, a user header `x-origin` = `origin`, and a small JSON payload.
pub fn foreign_message(aggregate_id: &str, version: u64, origin: &str) -> eventbus::WireMessage {
    use eventbus::wire;
    eventbus::WireMessage {
        headers: vec![
            (wire::EVENT_ID.into(), uuid::Uuid::now_v7().to_string()),
            (wire::AGGREGATE_ID.into(), aggregate_id.into()),
            (wire::EVENT_TYPE.into(), "InvoiceIssued".into()),
            (wire::EVENT_VERSION.into(), version.to_string()),
            (wire::EVENT_TIMESTAMP.into(), "2026-11-28T10:00:00.5Z".into()),
            ("x-origin".into(), origin.into()),
        ],
        payload: bytes::Bytes::from_static(br#"{"amount":42}"#),
    }
}
