//! retry: transient handler errors retried in order; permanent ones and exhausted ones dead-lettered with the
//! reason; undecodable messages dead-lettered while the consumer goes on; a subscriber failing on every message
//! is replaced by a fresh one that still gets everything.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context};
use bytes::Bytes;
use eventbus::wire::{self, WireMessage};
use eventbus::{EventBusExt, EventId, HandlerError, SubscribeOptions};

use super::{quick_retry, DELIVERY_DEADLINE};
use crate::backend::{Backend, Connection};
use crate::harness::{figures, not_run};
use crate::recorder::Recorder;
use crate::workload::{forward_into, record_into, Workload};

const SUITE: &str = "retry";

/// Runs every retry scenario.
pub async fn run(backend: &dyn Backend) -> anyhow::Result<()> {
    let mut config = backend.config();
    config.retry = quick_retry(3);
    let connection = backend.connect(config).await?;
    transient(backend, &connection).await.context("transient")?;
    panicking_handler(backend, &connection).await.context("panicking handler")?;
    dead_letters(backend, &connection).await.context("dead letters")?;
    if connection.raw.is_some() {
        undecodable(backend, &connection).await.context("undecodable")?;
    } else {
        not_run(backend, SUITE, "undecodable", "no raw broker access to publish a malformed message");
    }
    replaced_subscriber(backend, &connection).await.context("replaced subscriber")?;
    connection.bus.close().await;
    Ok(())
}

async fn transient(backend: &dyn Backend, connection: &Connection) -> anyhow::Result<()> {
    let bus = &*connection.bus;
    let workload = Workload::new("retry-transient", 10, 5, 1);
    let recorder = Arc::new(Recorder::default());
    let attempts: Arc<Mutex<HashMap<EventId, u32>>> = Arc::default();
    let subscription = {
        let (recorder, attempts) = (recorder.clone(), attempts.clone());
        bus.subscribe_with(&workload.topics[0], SubscribeOptions::group("g"), move |event| {
            let (recorder, attempts) = (recorder.clone(), attempts.clone());
            async move {
                let attempt = {
                    let mut attempts = attempts.lock().unwrap();
                    let attempt = attempts.entry(event.event_id).or_insert(0);
                    *attempt += 1;
                    *attempt
                };
                if attempt <= 2 {
                    return Err(HandlerError::transient(format!("attempt {attempt} fails")));
                }
                recorder.record(&event);
                Ok(())
            }
        })
        .await?
    };
    let published = workload.publish(connection.bus.clone()).await;
    let complete = recorder.wait_for(workload.total(), DELIVERY_DEADLINE).await;
    subscription.close().await;
    let tally = recorder.tally(workload.total());
    let calls: u32 = attempts.lock().unwrap().values().sum();
    figures(
        backend,
        SUITE,
        "transient-errors-retried-in-order",
        format_args!("messages={} handler_calls={calls} {tally}", workload.total()),
    );
    ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
    ensure!(complete && tally.violations == 0 && tally.duplicates == 0, "{tally}");
    ensure!(calls as usize == 3 * workload.total(), "expected three calls per event, made {calls}");
    Ok(())
}

async fn dead_letters(backend: &dyn Backend, connection: &Connection) -> anyhow::Result<()> {
    let bus = &*connection.bus;
    let workload = Workload::new("retry-dlq", 2, 5, 1);
    let topic = &workload.topics[0];
    let (permanent, exhausted) = (workload.aggregate_id(0), workload.aggregate_id(1));
    let recorder = Arc::new(Recorder::default());
    let subscription = {
        let (recorder, permanent, exhausted) = (recorder.clone(), permanent.clone(), exhausted.clone());
        bus.subscribe_with(topic, SubscribeOptions::group("g"), move |event| {
            let recorder = recorder.clone();
            let fails_for_good = event.aggregate_id == permanent && event.event_version == 3;
            let keeps_failing = event.aggregate_id == exhausted && event.event_version == 2;
            async move {
                if fails_for_good {
                    return Err(HandlerError::permanent("order total is negative"));
                }
                if keeps_failing {
                    return Err(HandlerError::transient("inventory service unavailable"));
                }
                recorder.record(&event);
                Ok(())
            }
        })
        .await?
    };
    let dead_letter_topic = backend.config().dead_letter.topic_for(topic);
    let (dlq_reader, mut dlq_rx) = forward_into(bus, &dead_letter_topic, SubscribeOptions::group("dlq-reader")).await?;
    let published = workload.publish(connection.bus.clone()).await;
    let mut dead = Vec::new();
    while dead.len() < 2 {
        let event =
            tokio::time::timeout(DELIVERY_DEADLINE, dlq_rx.recv()).await?.context("dead-letter reader ended")?;
        dead.push(event);
    }
    let delivered = recorder.wait_for(workload.total() - 2, DELIVERY_DEADLINE).await;
    subscription.close().await;
    dlq_reader.close().await;
    dead.sort_by_key(|e| e.aggregate_id.clone());
    let reasons: Vec<(String, u64, String, String)> = dead
        .iter()
        .map(|e| {
            let header = |name| e.headers.get(name).cloned().unwrap_or_default();
            (
                e.aggregate_id.clone(),
                e.event_version,
                header(wire::DEAD_LETTER_ATTEMPTS),
                header(wire::DEAD_LETTER_REASON),
            )
        })
        .collect();
    figures(
        backend,
        SUITE,
        "dead-lettered-with-reason",
        format_args!(
            "dead_letter_topic={dead_letter_topic} dead_letters={reasons:?} later_versions={:?}/{:?}",
            recorder.versions(&permanent),
            recorder.versions(&exhausted)
        ),
    );
    ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
    let permanent_dl =
        dead.iter().find(|e| e.aggregate_id == permanent).context("permanent failure not dead-lettered")?;
    ensure!(permanent_dl.event_version == 3, "wrong event dead-lettered");
    let reason = &permanent_dl.headers[wire::DEAD_LETTER_REASON];
    ensure!(reason.contains("permanent") && reason.contains("order total is negative"), "reason: {reason}");
    ensure!(permanent_dl.headers[wire::DEAD_LETTER_ATTEMPTS] == "1", "a permanent error was retried");
    ensure!(permanent_dl.headers[wire::DEAD_LETTER_TOPIC] == *topic, "origin topic missing");
    let exhausted_dl =
        dead.iter().find(|e| e.aggregate_id == exhausted).context("exhausted retries not dead-lettered")?;
    let reason = &exhausted_dl.headers[wire::DEAD_LETTER_REASON];
    ensure!(
        reason.contains("gave up after 3 attempts") && reason.contains("inventory service unavailable"),
        "reason: {reason}"
    );
    ensure!(delivered, "the aggregates did not go on after dead-lettering");
    ensure!(recorder.versions(&permanent) == [1, 2, 4, 5], "order after dead letter");
    ensure!(recorder.versions(&exhausted) == [1, 3, 4, 5], "order after dead letter");
    Ok(())
}

async fn undecodable(backend: &dyn Backend, connection: &Connection) -> anyhow::Result<()> {
    let bus = &*connection.bus;
    let raw = connection.raw.as_ref().expect("checked by the caller");
    let workload = Workload::new("retry-undecodable", 1, 2, 1);
    let topic = &workload.topics[0];
    let recorder = Arc::new(Recorder::default());
    let undecodable_before = bus.metrics().undecodable;
    let subscription = record_into(bus, topic, SubscribeOptions::group("g"), recorder.clone()).await?;
    bus.publish(topic, workload.event(0, 1)).await?.await?;
    let no_headers = WireMessage {
        headers: vec![("content-type".into(), "text/plain".into())],
        payload: Bytes::from_static(b"not an event"),
    };
    let mut bad_version = wire::encode(&workload.event(0, 1));
    bad_version.set_header(wire::EVENT_VERSION, "seven");
    bad_version.payload = Bytes::from_static(b"bad version");
    raw.publish_raw(topic, no_headers).await?;
    raw.publish_raw(topic, bad_version).await?;
    bus.publish(topic, workload.event(0, 2)).await?.await?;
    let complete = recorder.wait_for(2, DELIVERY_DEADLINE).await;
    let dead_letter_topic = backend.config().dead_letter.topic_for(topic);
    let dead = raw.read_raw(&dead_letter_topic, 2, DELIVERY_DEADLINE).await?;
    subscription.close().await;
    let undecodable = bus.metrics().undecodable - undecodable_before;
    let reasons: Vec<&str> = dead.iter().filter_map(|m| m.header(wire::DEAD_LETTER_REASON)).collect();
    figures(
        backend,
        SUITE,
        "undecodable-dead-lettered",
        format_args!(
            "undecodable={undecodable} dead_letters={} reasons={reasons:?} good_events={:?}",
            dead.len(),
            recorder.versions(&workload.aggregate_id(0))
        ),
    );
    ensure!(complete, "the consumer stopped at the undecodable messages");
    ensure!(undecodable == 2 && dead.len() == 2, "expected two undecodable messages dead-lettered");
    // The two may arrive in either order (they can travel in different partitions).
    let find = |payload: &str| {
        dead.iter().find(|m| m.payload == payload.as_bytes()).and_then(|m| m.header(wire::DEAD_LETTER_REASON))
    };
    let no_headers = find("not an event").context("the message without headers was not kept intact")?;
    let bad_version = find("bad version").context("the message with a bad version was not kept intact")?;
    ensure!(no_headers.contains("event-id is missing"), "reason: {no_headers}");
    ensure!(bad_version.contains("event-version is malformed"), "reason: {bad_version}");
    Ok(())
}

async fn replaced_subscriber(backend: &dyn Backend, connection: &Connection) -> anyhow::Result<()> {
    let bus = &*connection.bus;
    let workload = Workload::new("retry-replaced", 4, 5, 1);
    let topic = &workload.topics[0];
    let failures = Arc::new(AtomicUsize::new(0));
    let mut patient = quick_retry(1_000);
    patient.initial_backoff = Duration::from_millis(20);
    let failing = {
        let failures = failures.clone();
        bus.subscribe_with(topic, SubscribeOptions::group("replaced").retry(patient), move |_| {
            let failures = failures.clone();
            async move {
                failures.fetch_add(1, Ordering::Relaxed);
                Err::<(), _>(HandlerError::transient("downstream is down"))
            }
        })
        .await?
    };
    let published = workload.publish(connection.bus.clone()).await;
    while failures.load(Ordering::Relaxed) < workload.aggregates * 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = failing.close().await;
    let recorder = Arc::new(Recorder::default());
    let fresh = record_into(bus, topic, SubscribeOptions::group("replaced"), recorder.clone()).await?;
    let complete = recorder.wait_for(workload.total(), DELIVERY_DEADLINE).await;
    fresh.close().await;
    let tally = recorder.tally(workload.total());
    figures(
        backend,
        SUITE,
        "failing-subscriber-replaced",
        format_args!(
            "messages={} failed_calls={} handed_back_on_close={} fresh=[{tally}]",
            workload.total(),
            failures.load(Ordering::Relaxed),
            report.abandoned
        ),
    );
    ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
    ensure!(complete && tally.violations == 0 && tally.duplicates == 0, "{tally}");
    Ok(())
}

async fn panicking_handler(backend: &dyn Backend, connection: &Connection) -> anyhow::Result<()> {
    let bus = &*connection.bus;
    let workload = Workload::new("retry-panic", 4, 3, 1);
    let recorder = Arc::new(Recorder::default());
    let panicked = Arc::new(AtomicUsize::new(0));
    let first_calls: Arc<Mutex<HashSet<EventId>>> = Arc::default();
    let subscription = {
        let (recorder, panicked, first_calls) = (recorder.clone(), panicked.clone(), first_calls.clone());
        bus.subscribe_with(&workload.topics[0], SubscribeOptions::group("g").concurrency(2), move |event| {
            let (recorder, panicked, first_calls) = (recorder.clone(), panicked.clone(), first_calls.clone());
            async move {
                // Each aggregate's version 2 panics on its first call only.
                if event.event_version == 2 && first_calls.lock().unwrap().insert(event.event_id) {
                    panicked.fetch_add(1, Ordering::SeqCst);
                    panic!("handler bug on {} v2", event.aggregate_id);
                }
                recorder.record(&event);
                Ok::<(), HandlerError>(())
            }
        })
        .await?
    };
    // The panics are expected: print one line each instead of the default report with its backtrace.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| println!("    expected panic: {info}")));
    let published = workload.publish(connection.bus.clone()).await;
    let complete = recorder.wait_for(workload.total(), DELIVERY_DEADLINE).await;
    std::panic::set_hook(default_hook);
    subscription.close().await;
    let tally = recorder.tally(workload.total());
    figures(
        backend,
        SUITE,
        "panicking-handler-retried",
        format_args!("messages={} panics={} {tally}", workload.total(), panicked.load(Ordering::SeqCst)),
    );
    ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
    ensure!(complete && tally.violations == 0 && tally.duplicates == 0, "{tally}");
    ensure!(panicked.load(Ordering::SeqCst) == workload.aggregates, "each version 2 should have panicked once");
    ensure!(panicked.load(Ordering::SeqCst) == workload.aggregates, "each version 2 should have panicked once");
    Ok(())
}
