//! A level run through async-nats JetStream directly: what a careful hand-rolled client does, with nothing
//! of the bus in between.
//!
//! One file-storage stream per topic. With [`Layout::PerTopic`], one durable pull consumer per stream
//! (explicit acks, the server's default of 1000 unacked messages): the broker's own pace. With
//! [`Layout::PerPartition`], the bus's consumer layout without the bus: events go to one subject per
//! partition, and each partition has its own filtered durable consumer allowed as many unacked messages as the
//! bus's (`nats.max_ack_pending`), as a partition's owner pulls them. Either way one consuming task
//! per consumer decodes, records and acks each message. Publishers send with the same headers as the bus
//! (`Nats-Msg-Id` included, for the server's de-duplication) and hand each ack future to one collector task
//! (`bench/acks.rs`); at most the bus's publish window of them are in flight.

use std::sync::Arc;
use std::time::Instant;

use async_nats::header::NATS_MESSAGE_ID;
use async_nats::jetstream::{self, consumer, context::PublishAckFuture, stream};
use async_nats::HeaderMap;
use eventbus::wire;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::acks;
use super::bus::{workload, Baseline, PublishTimings, StartGate};
use super::report::{Client, Measurement};
use super::tally::DeliveryTally;
use super::{Level, DRAIN_DEADLINE};
use crate::probe::Sampler;

/// How the bare run lays out its consumers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One consumer per topic, with the server's default of 1000 unacked messages.
    PerTopic,
    /// Partitions per topic, each with its own consumer, allowed `max_ack_pending` unacked messages, as the bus.
    PerPartition {
        /// Partitions per topic (`nats.partitions`).
        partitions: u16,
        /// Unacked messages per partition consumer (`nats.max_ack_pending`).
        max_ack_pending: u32,
    },
}

impl Layout {
    /// The report's name for a run with this layout.
    pub fn client(self) -> Client {
        match self {
            Layout::PerTopic => Client::Bare,
            Layout::PerPartition { .. } => Client::BareOrdered,
        }
    }
}

/// Runs `level` on the server at `url` through the bare client, with its consumers laid out as `layout` says.
pub async fn run(
    url: &str,
    level: Level,
    payload: usize,
    window: usize,
    layout: Layout,
) -> anyhow::Result<Measurement> {
    let baseline = Baseline::take();
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    let workload = workload(layout.client(), level, payload);
    // Subject of each partition of a topic; a single one, the topic itself, without partitions.
    let (partitions, max_ack_pending) = match layout {
        Layout::PerTopic => (None, 0),
        Layout::PerPartition { partitions, max_ack_pending } => {
            (Some(usize::from(partitions.max(1))), i64::from(max_ack_pending))
        }
    };
    let subject = move |topic: &str, partition: usize| match partitions {
        None => topic.to_owned(),
        Some(_) => format!("{topic}.{partition}"),
    };
    let tally = Arc::new(DeliveryTally::new(level.aggregates, level.versions()));
    let stop = CancellationToken::new();
    let mut streams = Vec::new();
    let mut consumers = tokio::task::JoinSet::new();
    for topic in &workload.topics {
        let name = format!("BARE_{}", topic.replace(['.', '-'], "_"));
        let created = js
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![partitions.map_or_else(|| topic.clone(), |_| format!("{topic}.*"))],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        streams.push(name);
        for partition in 0..partitions.unwrap_or(1) {
            let config = match partitions {
                None => consumer::pull::Config {
                    durable_name: Some("bench".into()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ..Default::default()
                },
                Some(_) => consumer::pull::Config {
                    durable_name: Some(format!("bench-{partition}")),
                    filter_subject: subject(topic, partition),
                    ack_policy: consumer::AckPolicy::Explicit,
                    max_ack_pending,
                    ..Default::default()
                },
            };
            let mut messages = created.create_consumer(config).await?.messages().await?;
            let (tally, stop) = (tally.clone(), stop.clone());
            consumers.spawn(async move {
                loop {
                    let message = tokio::select! {
                        _ = stop.cancelled() => return,
                        message = messages.next() => message,
                    };
                    let Some(Ok(message)) = message else { continue };
                    let headers = message.headers.iter().flat_map(|h| h.iter()).flat_map(|(name, values)| {
                        values.iter().map(move |value| (name.as_ref(), value.as_str().as_bytes()))
                    });
                    tally.record_decoded(wire::decode(headers, message.payload.clone()));
                    let _ = message.ack().await;
                }
            });
        }
    }
    let sampler = Sampler::start();
    let timings = Arc::new(PublishTimings::new());
    let (pending, collector) = acks::collect::<PublishAckFuture>(window, timings.clone(), Result::is_ok);
    let gate = StartGate::new();
    let mut publishers = tokio::task::JoinSet::new();
    // One copy shared by every publisher: 10,000 copies of the topic names at `scale` would be read cold.
    let shared = Arc::new(workload.clone());
    for i in 0..workload.aggregates {
        let (js, workload, timings, pending) = (js.clone(), shared.clone(), timings.clone(), pending.clone());
        let start = gate.waiter();
        publishers.spawn(async move {
            let aggregate_id = workload.aggregate_id(i);
            start.await;
            // Aggregates spread evenly over the partitions, as the bus's hash spreads them.
            let subject = subject(workload.topic_of(i), i / workload.topics.len() % partitions.unwrap_or(1));
            for version in 1..=workload.versions {
                let event = workload.event_for(aggregate_id.as_str(), version);
                // The wire mapping's headers, with the id again as `Nats-Msg-Id`, built from the event as the
                // bus builds them.
                let mut headers = HeaderMap::new();
                wire::for_each_header(&event, |name, value| {
                    if name.as_str() == wire::EVENT_ID {
                        headers.insert(NATS_MESSAGE_ID, value);
                    }
                    headers.insert(name.as_str(), value);
                });
                let sent = Instant::now();
                let slot = pending.reserve().await;
                match js.publish_with_headers(subject.clone(), headers, event.payload).await {
                    Ok(ack) => pending.hand_over(&timings, slot, sent, ack),
                    Err(_) => timings.failed(),
                }
            }
        });
    }
    let clock = gate.open(&sampler);
    acks::join_publishers(&timings, publishers, pending, collector).await;
    tally.wait_complete(DRAIN_DEADLINE).await;
    let elapsed = clock.stop();
    stop.cancel();
    while consumers.join_next().await.is_some() {}
    for name in streams {
        let _ = js.delete_stream(name).await;
    }
    drop(js);
    let _ = client.drain().await;
    drop(client);
    Ok(baseline.measure("nats", layout.client(), level, elapsed, sampler, &timings, &tally).await)
}
