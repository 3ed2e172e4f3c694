//! bad input: invalid envelopes and topic names are rejected with a clear error before anything is sent;
//! oversize payloads are rejected naming the limit, payloads near the limit pass intact; an invalid
//! configuration is refused naming the setting; what was accepted before and after is delivered.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure};
use eventbus::{Envelope, Error, EventBusExt, SubscribeOptions, ValidationError};

use super::DELIVERY_DEADLINE;
use crate::backend::Backend;
use crate::harness::figures;
use crate::recorder::Recorder;
use crate::workload::{forward_into, record_into, unique};

const SUITE: &str = "bad_input";

/// Runs every bad-input scenario.
pub async fn run(backend: &dyn Backend) -> anyhow::Result<()> {
    invalid_envelopes_and_topics(backend).await?;
    payload_limit(backend).await?;
    invalid_config(backend).await?;
    Ok(())
}

fn valid(aggregate: &str, version: u64) -> Envelope {
    Envelope::builder(aggregate, "Checked").version(version).payload("ok").build().expect("valid")
}

async fn invalid_envelopes_and_topics(backend: &dyn Backend) -> anyhow::Result<()> {
    let connection = backend.connect(backend.config()).await?;
    let bus = &*connection.bus;
    let topic = unique("bad-input");
    let recorder = Arc::new(Recorder::default());
    let subscription = record_into(bus, &topic, SubscribeOptions::group("g"), recorder.clone()).await?;
    bus.publish(&topic, valid("good", 1)).await?.await?;

    type Breaker = fn(&mut Envelope);
    type Expected = fn(&ValidationError) -> bool;
    let cases: [(&str, Breaker, Expected); 8] = [
        ("empty aggregate_id", |e| e.aggregate_id.clear(), |v| matches!(v, ValidationError::EmptyAggregateId)),
        (
            "aggregate_id of 257 bytes",
            |e| e.aggregate_id = "a".repeat(257),
            |v| matches!(v, ValidationError::AggregateIdTooLong { len: 257 }),
        ),
        (
            "aggregate_id with a space",
            |e| e.aggregate_id = "order 1".into(),
            |v| matches!(v, ValidationError::AggregateIdCharacter { character: ' ', .. }),
        ),
        (
            "aggregate_id with a NATS wildcard",
            |e| e.aggregate_id = "order.*".into(),
            |v| matches!(v, ValidationError::AggregateIdCharacter { character: '*', .. }),
        ),
        ("empty event_type", |e| e.event_type.clear(), |v| matches!(v, ValidationError::EmptyEventType)),
        ("event_version 0", |e| e.event_version = 0, |v| matches!(v, ValidationError::ZeroVersion)),
        ("empty payload", |e| e.payload = Default::default(), |v| matches!(v, ValidationError::EmptyPayload)),
        (
            "reserved header",
            |e| {
                e.headers.insert("aggregate-id".into(), "spoofed".into());
            },
            |v| matches!(v, ValidationError::ReservedHeader { .. }),
        ),
    ];
    let published_before = bus.metrics().published;
    let mut messages = Vec::new();
    for (case, break_rule, expected) in cases {
        let mut envelope = valid("bad", 1);
        break_rule(&mut envelope);
        match bus.publish(&topic, envelope).await {
            Err(Error::Invalid(v)) if expected(&v) => messages.push(format!("{case}: {v}")),
            other => bail!("{case}: expected its own validation error, got {other:?}"),
        }
    }
    let bad_topics = ["", "orders.*", "orders >", "a..b", ".orders"];
    for bad in bad_topics {
        match bus.publish(bad, valid("bad", 1)).await {
            Err(Error::Invalid(ValidationError::InvalidTopic { .. })) => {}
            other => bail!("publish to topic {bad:?}: expected InvalidTopic, got {other:?}"),
        }
        let subscribed = bus.subscribe_with(bad, SubscribeOptions::group("g"), |_| async { Ok(()) }).await;
        ensure!(
            matches!(subscribed, Err(Error::Invalid(ValidationError::InvalidTopic { .. }))),
            "subscribe to topic {bad:?}: expected InvalidTopic"
        );
    }
    for bad in ["", "billing team", "billing.*"] {
        let subscribed = bus.subscribe_with(&topic, SubscribeOptions::group(bad), |_| async { Ok(()) }).await;
        ensure!(
            matches!(subscribed, Err(Error::Invalid(ValidationError::InvalidGroup { .. }))),
            "subscribe with group {bad:?}: expected InvalidGroup"
        );
    }
    let sent_by_rejects = bus.metrics().published - published_before;
    bus.publish(&topic, valid("good", 2)).await?.await?;
    let complete = recorder.wait_for(2, DELIVERY_DEADLINE).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    subscription.close().await;
    let stored = match &connection.raw {
        Some(raw) => Some(raw.read_raw(&topic, 2, Duration::from_secs(5)).await?.len()),
        None => None,
    };
    connection.bus.close().await;
    figures(
        backend,
        SUITE,
        "invalid-envelopes-and-topics",
        format_args!(
            "rejected_envelopes={} rejected_topics={} rejected_groups=3 sent_by_rejected={sent_by_rejects} stored_in_topic={stored:?} \
             delivered={:?}",
            messages.len(),
            bad_topics.len(),
            recorder.versions("good")
        ),
    );
    for message in &messages {
        println!("    {message}");
    }
    ensure!(sent_by_rejects == 0, "a rejected publish was sent");
    ensure!(complete && recorder.versions("good") == [1, 2], "accepted events around the rejects were not delivered");
    ensure!(recorder.versions("bad").is_empty(), "a rejected event was delivered");
    ensure!(stored.is_none_or(|n| n == 2), "the topic holds {stored:?} messages, expected the 2 valid ones");
    Ok(())
}

async fn payload_limit(backend: &dyn Backend) -> anyhow::Result<()> {
    let limit = backend.capabilities().max_payload;
    let connection = backend.connect(backend.config()).await?;
    let bus = &*connection.bus;
    let topic = unique("bad-input-size");
    let (subscription, mut rx) = forward_into(bus, &topic, SubscribeOptions::group("g")).await?;
    // Leave room for the metadata headers, which count towards the limit on some brokers.
    let near: Vec<u8> = (0..limit - 4096).map(|i| (i % 251) as u8).collect();
    let near = Envelope::builder("big", "Large").payload(near).build()?;
    bus.publish(&topic, near.clone()).await?.await?;
    let received = tokio::time::timeout(DELIVERY_DEADLINE, rx.recv()).await?;
    let oversize = Envelope::builder("big", "Large").version(2).payload(vec![7u8; limit + 1]).build()?;
    let rejected = bus.publish(&topic, oversize).await;
    subscription.close().await;
    connection.bus.close().await;
    let message = rejected.as_ref().err().map(ToString::to_string).unwrap_or_default();
    figures(
        backend,
        SUITE,
        "payload-limit",
        format_args!(
            "limit={limit} near_limit_bytes={} intact={} oversize_error={:?}",
            near.payload.len(),
            received.as_deref() == Some(&near),
            message
        ),
    );
    ensure!(received.as_deref() == Some(&near), "a payload near the limit did not arrive intact");
    match rejected {
        Err(Error::PayloadTooLarge { limit: l, .. }) if l == limit && message.contains(&limit.to_string()) => Ok(()),
        other => bail!("expected PayloadTooLarge naming {limit}, got {other:?}"),
    }
}

async fn invalid_config(backend: &dyn Backend) -> anyhow::Result<()> {
    let mut config = backend.config();
    config.publish.window = 0;
    let outcome = backend.connect(config).await;
    let message = outcome.as_ref().err().map(ToString::to_string).unwrap_or_default();
    figures(backend, SUITE, "invalid-config", format_args!("error={message:?}"));
    ensure!(
        matches!(outcome, Err(Error::Config(_))) && message.contains("publish.window"),
        "expected a config error naming publish.window"
    );
    Ok(())
}
