//! restart: the broker is stopped and started twice while 10,000 events flow from 100 publishers; every acked
//! event is delivered, per-aggregate order holds, and the bus reports reconnecting, then connected.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use eventbus::{ConnectionState, EventBus, SubscribeOptions};

use crate::backend::Backend;
use crate::harness::{figures, not_run};
use crate::recorder::Recorder;
use crate::workload::{record_into, Workload};

const SUITE: &str = "restart";
const RESTARTS: usize = 2;

/// Runs the scenario where the backend declares restartable, durable storage.
pub async fn run(backend: &dyn Backend) -> anyhow::Result<()> {
    if !backend.capabilities().restart {
        let reason = backend.capabilities().notes.into_iter().find(|(c, _)| *c == "restart");
        not_run(backend, SUITE, "broker-restarted-under-load", reason.map_or("not declared".into(), |(_, r)| r));
        return Ok(());
    }
    let mut config = backend.config();
    config.publish.ack_timeout = Duration::from_secs(5);
    config.nats.reconnect.max_delay = Duration::from_millis(250);
    let connection = backend.connect(config).await?;
    let faults = connection.faults.clone().context("restart needs fault controls")?;
    let bus = connection.bus.clone();
    let workload = Workload::new(SUITE, 100, 100, 1);
    let recorder = Arc::new(Recorder::default());
    let subscription = record_into(&*bus, &workload.topics[0], SubscribeOptions::group("g"), recorder.clone()).await?;

    let states = Arc::new(Mutex::new(Vec::<(Duration, ConnectionState)>::new()));
    let started = Instant::now();
    let watcher = tokio::spawn(watch_health(bus.clone(), states.clone(), started));
    let publishers = tokio::spawn(publish_until_acked(bus.clone(), workload.clone()));

    let mut outages = Vec::new();
    for _ in 0..RESTARTS {
        // Let events flow, then take the broker down mid-stream.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let stopped_at = started.elapsed();
        faults.restart(Duration::from_millis(500)).await?;
        outages.push(stopped_at);
    }
    let (acked, resent) = publishers.await.context("publishers")?;
    let complete = recorder.wait_for(workload.total(), Duration::from_secs(120)).await;
    watcher.abort();
    subscription.close().await;
    bus.close().await;

    let tally = recorder.tally(workload.total());
    let states = states.lock().unwrap().clone();
    // An outage counts as reported when health() says reconnecting after the stop, or already did (the client
    // was still reconnecting from the previous restart).
    let detected: Vec<Option<Duration>> = outages
        .iter()
        .map(|&at| {
            let in_effect = states.iter().rev().find(|(t, _)| *t <= at).map(|(_, s)| *s);
            if in_effect == Some(ConnectionState::Reconnecting) {
                return Some(Duration::ZERO);
            }
            states.iter().find(|(t, s)| *t >= at && *s == ConnectionState::Reconnecting).map(|(t, _)| *t - at)
        })
        .collect();
    let reconnected = states.iter().filter(|(_, s)| *s == ConnectionState::Connected).count();
    figures(
        backend,
        SUITE,
        "broker-restarted-under-load",
        format_args!(
            "restarts={RESTARTS} publishers={} messages={} acked={acked} resent_after_failure={resent} {tally} \
             outage_detected_after={detected:?} state_changes={:?} elapsed={:.1}s",
            workload.aggregates,
            workload.total(),
            states.iter().map(|(t, s)| format!("{s:?}@{:.2}s", t.as_secs_f64())).collect::<Vec<_>>(),
            started.elapsed().as_secs_f64()
        ),
    );
    ensure!(acked == workload.total(), "only {acked} events were acked despite re-sends");
    ensure!(complete && tally.losses == 0, "acked events were lost: {tally}");
    ensure!(tally.violations == 0, "order broke across restarts: {tally}");
    ensure!(detected.iter().all(Option::is_some), "an outage was never reported by health()");
    ensure!(reconnected >= RESTARTS, "health() did not report connected after each restart");
    Ok(())
}

/// Each aggregate's versions in order; a publish that fails is re-sent with the same event id until acked.
/// Returns (acked, re-sends).
async fn publish_until_acked(bus: Arc<dyn EventBus>, workload: Workload) -> (usize, usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..workload.aggregates {
        let (bus, workload) = (bus.clone(), workload.clone());
        tasks.spawn(async move {
            let (mut acked, mut resent) = (0, 0);
            for version in 1..=workload.versions {
                let event = workload.event(i, version);
                for attempt in 0..120 {
                    if attempt > 0 {
                        resent += 1;
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                    let outcome = match bus.publish(workload.topic_of(i), event.clone()).await {
                        Ok(receipt) => receipt.await.map(drop),
                        Err(e) => Err(e),
                    };
                    if outcome.is_ok() {
                        acked += 1;
                        break;
                    }
                }
            }
            (acked, resent)
        });
    }
    let mut totals = (0, 0);
    while let Some(Ok((acked, resent))) = tasks.join_next().await {
        totals.0 += acked;
        totals.1 += resent;
    }
    totals
}

async fn watch_health(bus: Arc<dyn EventBus>, states: Arc<Mutex<Vec<(Duration, ConnectionState)>>>, started: Instant) {
    let mut last = None;
    loop {
        let state = bus.health().state;
        if last != Some(state) {
            states.lock().unwrap().push((started.elapsed(), state));
            last = Some(state);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
