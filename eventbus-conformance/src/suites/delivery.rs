//! delivery: round trip with payload and headers intact, topic isolation, consumer groups (shared vs.
//! each-gets-all), history for a new group, a durable group resuming after a pause, batch partial failure,
//! subscription churn, and a close that flushes what was accepted.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context};
use eventbus::{Envelope, Error, EventBus, EventBusExt, SubscribeOptions, ValidationError};

use super::DELIVERY_DEADLINE;
use crate::backend::{Backend, Connection};
use crate::harness::{figures, not_run};
use crate::recorder::Recorder;
use crate::workload::{forward_into, record_into, share_into, unique, Workload};

const SUITE: &str = "delivery";

/// Runs every delivery scenario.
pub async fn run(backend: &dyn Backend) -> anyhow::Result<()> {
    let connection = backend.connect(backend.config()).await?;
    round_trip(backend, &connection).await.context("round trip")?;
    topic_isolation(backend, &connection).await.context("topic isolation")?;
    consumer_groups(backend, &connection).await.context("consumer groups")?;
    if backend.capabilities().history {
        history(backend, &connection).await.context("history")?;
    } else {
        not_run(backend, SUITE, "history", "the backend does not retain history for new groups");
    }
    durable_group(backend, &connection).await.context("durable group")?;
    batch(backend, &connection).await.context("batch")?;
    churn(backend, &connection).await.context("subscription churn")?;
    connection.bus.close().await;
    flush_on_close(backend).await.context("flush on close")?;
    publish_results(backend).await.context("publish results")?;
    Ok(())
}

async fn round_trip(backend: &dyn Backend, connection: &Connection) -> anyhow::Result<()> {
    let bus = &*connection.bus;
    let topic = unique("delivery-roundtrip");
    let (subscription, mut rx) = forward_into(bus, &topic, SubscribeOptions::group("g")).await?;
    let payload: Vec<u8> = (0..=255u8).chain([0, 0xff, b'\n', b'"']).collect();
    let sent = Envelope::builder("account:7/eu.west_1-a", "Funds Moved")
        .version(42)
        .timestamp(SystemTime::UNIX_EPOCH + Duration::new(1_764_000_000, 123_456_789))
        .trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .correlation_id("checkout-9")
        .tenant_id("tenant-eu")
        .header("x-source", "conformance")
        .header("content-type", "application/octet-stream")
        .payload(payload)
        .build()?;
    let ack = bus.publish(&topic, sent.clone()).await?.await?;
    let received = tokio::time::timeout(DELIVERY_DEADLINE, rx.recv()).await?.context("no delivery")?;
    subscription.close().await;
    let intact = *received == sent;
    figures(
        backend,
        SUITE,
        "round-trip",
        format_args!("payload_bytes={} headers={} intact={intact}", sent.payload.len(), sent.headers.len()),
    );
    ensure!(ack.event_id == sent.event_id && ack.topic == topic, "ack names another event: {ack:?}");
    ensure!(intact, "received {received:#?}\nsent {sent:#?}");
    Ok(())
}

async fn topic_isolation(backend: &dyn Backend, connection: &Connection) -> anyhow::Result<()> {
    let bus = &*connection.bus;
    let workload = Workload::new("delivery-isolation", 20, 5, 2);
    let [a, b] = [0, 1].map(|_| Arc::new(Recorder::default()));
    let sub_a = record_into(bus, &workload.topics[0], SubscribeOptions::group("g"), a.clone()).await?;
    let sub_b = record_into(bus, &workload.topics[1], SubscribeOptions::group("g"), b.clone()).await?;
    let published = workload.publish(connection.bus.clone()).await;
    let half = workload.total() / 2;
    let complete = a.wait_for(half, DELIVERY_DEADLINE).await && b.wait_for(half, DELIVERY_DEADLINE).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    sub_a.close().await;
    sub_b.close().await;
    let wrong = |recorder: &Recorder, topic: usize| {
        (0..workload.aggregates)
            .filter(|i| i % 2 != topic)
            .filter(|&i| !recorder.versions(&workload.aggregate_id(i)).is_empty())
            .count()
    };
    let (wrong_a, wrong_b) = (wrong(&a, 0), wrong(&b, 1));
    figures(
        backend,
        SUITE,
        "topic-isolation",
        format_args!(
            "topics=2 messages={} a=[{}] b=[{}] foreign_aggregates a={wrong_a} b={wrong_b}",
            workload.total(),
            a.tally(half),
            b.tally(half)
        ),
    );
    ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
    ensure!(complete, "not every event arrived");
    ensure!(wrong_a == 0 && wrong_b == 0, "a subscription received another topic's events");
    ensure!(a.tally(half).duplicates == 0 && b.tally(half).duplicates == 0, "duplicates");
    Ok(())
}

async fn consumer_groups(backend: &dyn Backend, connection: &Connection) -> anyhow::Result<()> {
    let bus = &*connection.bus;
    let workload = Workload::new("delivery-groups", 40, 5, 1);
    let topic = &workload.topics[0];
    let total = workload.total();
    let alone = Arc::new(Recorder::default());
    let shared = Arc::new(Recorder::default());
    let counts: [Arc<AtomicUsize>; 2] = Default::default();
    let mut subscriptions = vec![record_into(bus, topic, SubscribeOptions::group("alone"), alone.clone()).await?];
    for count in &counts {
        subscriptions.push(
            share_into(bus, topic, SubscribeOptions::group("shared").concurrency(4), shared.clone(), count.clone())
                .await?,
        );
    }
    let published = workload.publish(connection.bus.clone()).await;
    let complete = alone.wait_for(total, DELIVERY_DEADLINE).await && shared.wait_for(total, DELIVERY_DEADLINE).await;
    for subscription in subscriptions {
        subscription.close().await;
    }
    let shares = counts.map(|c| c.load(Ordering::Relaxed));
    figures(
        backend,
        SUITE,
        "consumer-groups",
        format_args!(
            "messages={total} group_alone=[{}] group_shared=[{}] shared_split={shares:?}",
            alone.tally(total),
            shared.tally(total)
        ),
    );
    ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
    ensure!(complete, "a group missed events");
    for tally in [alone.tally(total), shared.tally(total)] {
        ensure!(tally.losses == 0 && tally.duplicates == 0 && tally.violations == 0, "{tally}");
    }
    ensure!(shares.iter().all(|&s| s > 0), "one member of the shared group got nothing: {shares:?}");
    Ok(())
}

async fn history(backend: &dyn Backend, connection: &Connection) -> anyhow::Result<()> {
    let bus = &*connection.bus;
    let workload = Workload::new("delivery-history", 10, 5, 1);
    let published = workload.publish(connection.bus.clone()).await;
    let late = Arc::new(Recorder::default());
    let subscription = record_into(bus, &workload.topics[0], SubscribeOptions::group("late"), late.clone()).await?;
    let complete = late.wait_for(workload.total(), DELIVERY_DEADLINE).await;
    subscription.close().await;
    let tally = late.tally(workload.total());
    figures(
        backend,
        SUITE,
        "history-for-new-group",
        format_args!("published_before_subscribe={} {tally}", workload.total()),
    );
    ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
    ensure!(complete && tally.violations == 0 && tally.duplicates == 0, "{tally}");
    Ok(())
}

async fn durable_group(backend: &dyn Backend, connection: &Connection) -> anyhow::Result<()> {
    let bus = &*connection.bus;
    let workload = Workload::new("delivery-durable", 10, 4, 1);
    let topic = &workload.topics[0];
    let recorder = Arc::new(Recorder::default());
    let first = record_into(bus, topic, SubscribeOptions::group("durable"), recorder.clone()).await?;
    let events = |versions: std::ops::RangeInclusive<u64>| {
        (0..workload.aggregates).flat_map(move |i| versions.clone().map(move |v| (i, v)))
    };
    for (i, v) in events(1..=2) {
        bus.publish(topic, workload.event(i, v)).await?.await?;
    }
    let first_half = recorder.wait_for(workload.aggregates * 2, DELIVERY_DEADLINE).await;
    first.close().await;
    // Published while the group has no member: the group must receive them when it comes back.
    for (i, v) in events(3..=4) {
        bus.publish(topic, workload.event(i, v)).await?.await?;
    }
    let second = record_into(bus, topic, SubscribeOptions::group("durable"), recorder.clone()).await?;
    let complete = recorder.wait_for(workload.total(), DELIVERY_DEADLINE).await;
    second.close().await;
    let tally = recorder.tally(workload.total());
    figures(backend, SUITE, "durable-group-resumes", format_args!("messages={} {tally}", workload.total()));
    ensure!(first_half && complete, "the group did not resume where it stopped: {tally}");
    ensure!(tally.violations == 0 && tally.duplicates == 0, "{tally}");
    Ok(())
}

async fn batch(backend: &dyn Backend, connection: &Connection) -> anyhow::Result<()> {
    let bus = &*connection.bus;
    let topic = unique("delivery-batch");
    let recorder = Arc::new(Recorder::default());
    let subscription = record_into(bus, &topic, SubscribeOptions::group("g"), recorder.clone()).await?;
    let mut envelopes: Vec<Envelope> = (1..=5)
        .map(|v| Envelope::builder("batch-1", "Batched").version(v).payload("p").build())
        .collect::<Result<_, _>>()?;
    envelopes[2].event_version = 0;
    let results = bus.publish_batch(&topic, envelopes).await;
    let outcomes: Vec<&str> = results.iter().map(|r| if r.is_ok() { "ok" } else { "err" }).collect();
    let complete = recorder.wait_for(4, DELIVERY_DEADLINE).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    subscription.close().await;
    let received = recorder.versions("batch-1");
    figures(
        backend,
        SUITE,
        "batch-partial-failure",
        format_args!("entries=5 results={outcomes:?} received={received:?}"),
    );
    match &results[2] {
        Err(Error::Invalid(ValidationError::ZeroVersion)) => {}
        other => bail!("entry 2 should fail as invalid, got {other:?}"),
    }
    ensure!(results.iter().enumerate().all(|(i, r)| i == 2 || r.is_ok()), "valid entries failed: {results:?}");
    ensure!(complete && received == [1, 2, 4, 5], "received {received:?}");
    Ok(())
}

async fn churn(backend: &dyn Backend, connection: &Connection) -> anyhow::Result<()> {
    let bus = &*connection.bus;
    let topic = unique("delivery-churn");
    // Ten subscriptions opened and closed concurrently.
    let opened =
        futures_util::future::join_all((0..10).map(|i| {
            let topic = topic.clone();
            async move {
                bus.subscribe_with(&topic, SubscribeOptions::group(format!("churn-{i}")), |_| async { Ok(()) }).await
            }
        }))
        .await;
    let opened: Vec<_> = opened.into_iter().collect::<Result<_, _>>()?;
    futures_util::future::join_all(opened.into_iter().map(|s| s.close())).await;

    // Then: one subscription closed while another keeps receiving.
    let workload = Workload::new("delivery-churn", 10, 10, 1);
    let topic = &workload.topics[0];
    let (stays, leaves) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let staying = record_into(bus, topic, SubscribeOptions::group("stays"), stays.clone()).await?;
    let leaving = record_into(bus, topic, SubscribeOptions::group("leaves"), leaves.clone()).await?;
    for i in 0..workload.aggregates {
        for v in 1..=5 {
            bus.publish(topic, workload.event(i, v)).await?.await?;
        }
    }
    let half = workload.total() / 2;
    let first = leaves.wait_for(half, DELIVERY_DEADLINE).await;
    leaving.close().await;
    for i in 0..workload.aggregates {
        for v in 6..=10 {
            bus.publish(topic, workload.event(i, v)).await?.await?;
        }
    }
    let complete = stays.wait_for(workload.total(), DELIVERY_DEADLINE).await;
    staying.close().await;
    let metrics = bus.metrics();
    figures(
        backend,
        SUITE,
        "subscription-churn",
        format_args!(
            "opened_and_closed=10 remaining=[{}] closed_one_received={} live_subscriptions_after={}",
            stays.tally(workload.total()),
            leaves.distinct(),
            metrics.subscriptions
        ),
    );
    ensure!(first && complete, "the remaining subscription missed events");
    ensure!(stays.tally(workload.total()).violations == 0, "order broke");
    ensure!(leaves.distinct() <= half, "a closed subscription went on receiving");
    ensure!(metrics.subscriptions == 0, "subscriptions left live: {}", metrics.subscriptions);
    Ok(())
}

async fn flush_on_close(backend: &dyn Backend) -> anyhow::Result<()> {
    let connection = backend.connect(backend.config()).await?;
    let bus: Arc<dyn EventBus> = connection.bus.clone();
    let workload = Workload::new("delivery-flush", 50, 10, 1);
    let mut receipts = Vec::new();
    for v in 1..=workload.versions {
        for i in 0..workload.aggregates {
            receipts.push(bus.publish(&workload.topics[0], workload.event(i, v)).await?);
        }
    }
    let report = bus.close().await;
    let results = futures_util::future::join_all(receipts).await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    let published = bus.metrics().published;
    figures(
        backend,
        SUITE,
        "close-flushes-accepted",
        format_args!(
            "accepted={} acked={} failed={failed} unacked_at_close={} close_took={:?}",
            results.len(),
            results.len() - failed,
            report.unacked.len(),
            report.elapsed
        ),
    );
    ensure!(failed == 0 && report.unacked.is_empty(), "close dropped accepted publishes");
    ensure!(published == workload.total() as u64, "metrics counted {published} acks");
    let after = bus.publish(&workload.topics[0], workload.event(0, 11)).await;
    ensure!(matches!(after, Err(Error::Closed)), "publish after close: {after:?}");
    Ok(())
}

async fn publish_results(backend: &dyn Backend) -> anyhow::Result<()> {
    let mut config = backend.config();
    config.publish.report_results = true;
    let connection = backend.connect(config).await?;
    let bus = &*connection.bus;
    let mut results = bus.publish_results().context("report_results is on but there is no stream")?;
    ensure!(bus.publish_results().is_none(), "the stream was handed out twice");
    let workload = Workload::new("delivery-results", 4, 5, 1);
    let mut sent = Vec::new();
    for i in 0..workload.aggregates {
        for v in 1..=workload.versions {
            let event = workload.event(i, v);
            sent.push(event.event_id);
            let _receipt = bus.publish(&workload.topics[0], event).await?;
        }
    }
    let mut reported = Vec::new();
    while reported.len() < sent.len() {
        let result = tokio::time::timeout(DELIVERY_DEADLINE, results.recv()).await?.context("stream ended early")?;
        ensure!(result.topic == workload.topics[0], "result names topic {}", result.topic);
        ensure!(result.outcome.is_ok(), "publish failed: {:?}", result.outcome);
        reported.push(result.event_id);
    }
    bus.close().await;
    let end = tokio::time::timeout(Duration::from_secs(1), results.recv()).await;
    figures(
        backend,
        SUITE,
        "publish-result-stream",
        format_args!(
            "published={} reported={} stream_ends_after_close={}",
            sent.len(),
            reported.len(),
            matches!(end, Ok(None))
        ),
    );
    sent.sort();
    reported.sort();
    ensure!(sent == reported, "the stream did not report each publish exactly once");
    ensure!(matches!(end, Ok(None)), "the stream did not end after close: {end:?}");
    Ok(())
}
