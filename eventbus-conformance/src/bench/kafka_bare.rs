//! A level run through rdkafka directly: an idempotent `FutureProducer` and a plain `StreamConsumer`, with
//! nothing of the bus in between.
//!
//! The topics get the partition count the bus gives its topics, and the producer and consumer the bus's
//! `linger.ms` and `fetch.wait.max.ms`; everything else is librdkafka's default. With [`Consumers::Shared`], one
//! consumer (auto-commit, reading from the earliest offset) takes every topic, as a plain Kafka application would;
//! with [`Consumers::PerSubscription`], each topic has a consumer of its own in a group of its own, the bus's layout
//! (one member per subscription). The clock starts once every partition is assigned.
//! Publishers send with the same headers as the bus, keyed by aggregate, and hand each delivery future to one
//! collector task (`bench/acks.rs`); at most the bus's publish window of them are in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventbus::{wire, BusConfig};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;

use super::acks;
use super::bus::{workload, Baseline, PublishTimings, StartGate};
use super::report::{Client, Measurement};
use super::tally::DeliveryTally;
use super::{Level, DRAIN_DEADLINE};
use crate::probe::Sampler;

/// Longest the consumers may take to be assigned every partition.
const ASSIGNMENT_DEADLINE: Duration = Duration::from_secs(60);

/// How the bare run lays out its consumers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Consumers {
    /// One consumer subscribed to every topic.
    Shared,
    /// One consumer per topic, each in a group of its own: the bus's layout, a member per subscription.
    PerSubscription,
}

impl Consumers {
    /// The report's name for a run with this layout.
    pub fn client(self) -> Client {
        match self {
            Consumers::Shared => Client::Bare,
            Consumers::PerSubscription => Client::BarePerTopic,
        }
    }
}

/// Runs `level` on the broker at `bootstrap` (`host:port`) through the bare client, its consumers laid out as
/// `consumers` says.
pub async fn run(
    bootstrap: &str,
    level: Level,
    payload: usize,
    config: &BusConfig,
    consumers: Consumers,
) -> anyhow::Result<Measurement> {
    let partitions = config.kafka.topic.partitions;
    let window = config.publish.window;
    let baseline = Baseline::take();
    let client = consumers.client();
    let workload = workload(client, level, payload);
    let mut base = ClientConfig::new();
    base.set("bootstrap.servers", bootstrap);
    let admin: AdminClient<DefaultClientContext> = base.create()?;
    let warm_up_topic = format!("{}-warm-up", workload.topics[0]);
    let new_topics: Vec<NewTopic<'_>> = workload
        .topics
        .iter()
        .chain([&warm_up_topic])
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(1)))
        .collect();
    for result in admin.create_topics(&new_topics, &AdminOptions::new()).await? {
        result.map_err(|(topic, code)| anyhow::anyhow!("cannot create topic {topic}: {code}"))?;
    }
    // The same batching delay and fetch wait as the bus, so that the ratio compares the clients, not two sets
    // of defaults (librdkafka waits up to 500 ms per fetch on its own).
    let producer: FutureProducer = base
        .clone()
        .set("enable.idempotence", "true")
        .set("linger.ms", config.kafka.linger.as_millis().to_string())
        .create()?;
    // Like the bus's connect(), learn the cluster before the clock starts.
    let probe = producer.clone();
    tokio::task::spawn_blocking(move || probe.client().fetch_metadata(None, Duration::from_secs(10)).map(drop))
        .await??;
    // The bus's producer has its idempotent producer id and broker connections long before its first publish;
    // one acked record to a topic of its own gives the bare producer the same start (without it, some runs
    // held the first publishes ~0.5 s).
    producer
        .send(FutureRecord::<str, [u8]>::to(&warm_up_topic).payload(b"warm-up"), Duration::from_secs(10))
        .await
        .map_err(|(error, _)| anyhow::anyhow!("the bare producer's warm-up record failed: {error}"))?;
    let topics: Vec<&str> = workload.topics.iter().map(String::as_str).collect();
    let subscriptions: Vec<(String, Vec<&str>)> = match consumers {
        Consumers::Shared => vec![(format!("{}-bare", workload.topics[0]), topics.clone())],
        Consumers::PerSubscription => topics.iter().map(|topic| (format!("{topic}-bare"), vec![*topic])).collect(),
    };
    let tally = Arc::new(DeliveryTally::new(level.aggregates, level.versions()));
    let stop = CancellationToken::new();
    // Consumer tasks already started stop with the run, whichever way it ends.
    let _stopped_on_return = stop.clone().drop_guard();
    // Each consumer with its group and the number of partitions it must be assigned before the clock starts.
    let mut members = Vec::new();
    let mut consuming = Vec::new();
    for (group, topics) in &subscriptions {
        let consumer: Arc<StreamConsumer> = Arc::new(
            base.clone()
                .set("group.id", group)
                .set("auto.offset.reset", "earliest")
                .set("fetch.wait.max.ms", config.kafka.fetch_wait.as_millis().to_string())
                .set("enable.partition.eof", "false")
                .create()?,
        );
        consumer.subscribe(topics)?;
        let (reader, tally, stop) = (consumer.clone(), tally.clone(), stop.clone());
        consuming.push(tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    _ = stop.cancelled() => return,
                    message = reader.recv() => message,
                };
                let Ok(message) = message else { continue };
                let headers =
                    message.headers().into_iter().flat_map(|h| h.iter()).map(|h| (h.key, h.value.unwrap_or_default()));
                let payload = bytes::Bytes::copy_from_slice(message.payload().unwrap_or_default());
                tally.record_decoded(wire::decode(headers, payload));
            }
        }));
        members.push((consumer, group, topics.len() * partitions as usize));
    }
    let deadline = Instant::now() + ASSIGNMENT_DEADLINE;
    for (consumer, group, partitions) in &members {
        wait_for_assignment(consumer, group, *partitions, deadline).await?;
    }

    let sampler = Sampler::start();
    let timings = Arc::new(PublishTimings::new());
    let (deliveries, collector) =
        acks::collect::<DeliveryFuture>(window, timings.clone(), |delivered| matches!(delivered, Ok(Ok(_))));
    let gate = StartGate::new();
    let mut publishers = tokio::task::JoinSet::new();
    // One copy shared by every publisher: 10,000 copies of the topic names at `scale` would be read cold.
    let shared = Arc::new(workload.clone());
    for i in 0..workload.aggregates {
        let (producer, workload, timings, deliveries) =
            (producer.clone(), shared.clone(), timings.clone(), deliveries.clone());
        let start = gate.waiter();
        publishers.spawn(async move {
            let aggregate_id = workload.aggregate_id(i);
            start.await;
            let topic = workload.topic_of(i);
            for version in 1..=workload.versions {
                let event = workload.event_for(aggregate_id.as_str(), version);
                // The wire mapping's headers, copied by librdkafka straight from the event, as the bus does.
                let mut headers = Some(OwnedHeaders::new_with_capacity(8));
                wire::for_each_header(&event, |name, value| {
                    let header = Header { key: name.as_str(), value: Some(value.as_bytes()) };
                    headers = headers.take().map(|headers| headers.insert(header));
                });
                let sent = Instant::now();
                let slot = deliveries.reserve().await;
                let mut record = FutureRecord::<str, [u8]>::to(topic)
                    .key(&event.aggregate_id)
                    .payload(&event.payload[..])
                    .headers(headers.expect("every insert gives the headers back"));
                let delivery = loop {
                    match producer.send_result(record) {
                        Ok(delivery) => break Some(delivery),
                        // The producer hands the record back: sent again as it is, once its queue has room.
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), refused)) => {
                            record = refused;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        Err(_) => break None,
                    }
                };
                match delivery {
                    Some(delivery) => deliveries.hand_over(&timings, slot, sent, delivery),
                    None => timings.failed(),
                }
            }
        });
    }
    let clock = gate.open(&sampler);
    acks::join_publishers(&timings, publishers, deliveries, collector).await;
    tally.wait_complete(DRAIN_DEADLINE).await;
    let elapsed = clock.stop();
    stop.cancel();
    for task in consuming {
        let _ = task.await;
    }
    // The topics stay, as the bus run's do: deleting them while the clients still cache their metadata
    // crashed librdkafka 2.12.1 (a segfault in rd_kafka_metadata_cache_find, seen against tansu).
    // Dropping rdkafka clients blocks while their threads stop: off the runtime.
    let consumers: Vec<Arc<StreamConsumer>> = members.into_iter().map(|(consumer, _, _)| consumer).collect();
    let _ = tokio::task::spawn_blocking(move || drop((consumers, producer, admin))).await;
    Ok(baseline.measure("kafka", client, level, elapsed, sampler, &timings, &tally).await)
}

async fn wait_for_assignment(
    consumer: &StreamConsumer,
    group: &str,
    partitions: usize,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        if consumer.assignment()?.count() >= partitions {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "the bare consumer of group {group} was not assigned {partitions} partitions within \
                 {ASSIGNMENT_DEADLINE:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
