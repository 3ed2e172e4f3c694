//! A level run through async-nats JetStream directly: what a careful hand-rolled client does, with nothing
//! of the bus in between.
//!
//! One file-storage stream per topic, one durable pull consumer per stream (explicit acks, the server's
//! default of 1000 unacked messages), one consuming task per stream that decodes, records and acks each
//! message. Publishers send with the same headers as the bus (`Nats-Msg-Id` included, for the server's
//! de-duplication) and hand each ack future to one collector task, which settles them in order; the
//! collector's queue holds as many acks as the bus's publish window.

use std::sync::Arc;
use std::time::Instant;

use async_nats::jetstream::{self, consumer, context::PublishAckFuture, stream};
use async_nats::HeaderMap;
use eventbus::wire;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::bus::{collect_acks, hand_over, workload, Baseline, PublishTimings};
use super::report::{Client, Measurement};
use super::tally::DeliveryTally;
use super::{aggregate_index, Level, DRAIN_DEADLINE};
use crate::probe::Sampler;

/// Runs `level` on the server at `url` through the bare client.
pub async fn run(url: &str, level: Level, payload: usize, window: usize) -> anyhow::Result<Measurement> {
    let baseline = Baseline::take();
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    let workload = workload(Client::Bare, level, payload);
    let tally = Arc::new(DeliveryTally::new(level.aggregates, level.versions()));
    let stop = CancellationToken::new();
    let mut streams = Vec::new();
    let mut consumers = tokio::task::JoinSet::new();
    for topic in &workload.topics {
        let name = format!("BARE_{}", topic.replace(['.', '-'], "_"));
        let created = js
            .create_stream(stream::Config {
                name: name.clone(),
                subjects: vec![topic.clone()],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await?;
        streams.push(name);
        let consumer = created
            .create_consumer(consumer::pull::Config {
                durable_name: Some("bench".into()),
                ack_policy: consumer::AckPolicy::Explicit,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
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
                match wire::decode(headers, message.payload.clone()) {
                    Ok(event) => {
                        tally.record(aggregate_index(&event.aggregate_id), event.event_version, event.timestamp)
                    }
                    Err(_) => tally.record(None, 0, std::time::SystemTime::now()),
                }
                let _ = message.ack().await;
            }
        });
    }
    let sampler = Sampler::start();
    let timings = Arc::new(PublishTimings::new());
    let (acks, collector) = collect_acks::<PublishAckFuture>(window, timings.clone(), Result::is_ok);
    let started = Instant::now();
    let mut publishers = tokio::task::JoinSet::new();
    for i in 0..workload.aggregates {
        let (js, workload, timings, acks) = (js.clone(), workload.clone(), timings.clone(), acks.clone());
        publishers.spawn(async move {
            let subject = workload.topic_of(i).to_owned();
            for version in 1..=workload.versions {
                let event = workload.event(i, version);
                let wire = wire::encode(&event);
                let mut headers = HeaderMap::new();
                for (name, value) in &wire.headers {
                    headers.insert(name.as_str(), value.as_str());
                }
                headers.insert("Nats-Msg-Id", event.event_id.to_string().as_str());
                let sent = Instant::now();
                match js.publish_with_headers(subject.clone(), headers, wire.payload).await {
                    Ok(ack) => hand_over(&acks, &timings, sent, ack).await,
                    Err(_) => timings.failed(),
                }
            }
        });
    }
    drop(acks);
    timings.join(publishers).await;
    let _ = collector.await;
    tally.wait_complete(DRAIN_DEADLINE).await;
    let elapsed = started.elapsed();
    stop.cancel();
    while consumers.join_next().await.is_some() {}
    for name in streams {
        let _ = js.delete_stream(name).await;
    }
    drop(js);
    let _ = client.drain().await;
    drop(client);
    Ok(baseline.measure("nats", Client::Bare, level, elapsed, sampler, &timings, &tally).await)
}
