//! timeout: a hung handler is timed out and retried while other aggregates go on; close with a hung handler
//! returns inside close_timeout and reports what it abandoned; with the broker paused, a publish fails with
//! the ack timeout inside its deadline, a full window fails with backpressure inside enqueue_timeout, and close
//! returns inside close_timeout reporting the unacked events; after the outage a new bus works; an unreachable
//! broker fails connect inside the connect deadline.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use eventbus::{Error, EventBusExt, HandlerError, SubscribeOptions};
use tokio::sync::Notify;

use super::{quick_retry, DELIVERY_DEADLINE};
use crate::backend::Backend;
use crate::harness::{figures, not_run};
use crate::recorder::Recorder;
use crate::workload::{record_into, Workload};

const SUITE: &str = "timeout";

/// Slack allowed past a deadline for scheduling and the broker round trip.
const MARGIN: Duration = Duration::from_millis(500);

/// Runs every timeout scenario.
pub async fn run(backend: &dyn Backend) -> anyhow::Result<()> {
    hung_handler_retried(backend).await.context("hung handler")?;
    close_with_hung_handler(backend).await.context("close with hung handler")?;
    paused_broker(backend).await.context("paused broker")?;
    match backend.unreachable_config() {
        Some(config) => unreachable(backend, config).await.context("unreachable broker")?,
        None => {
            let reason = backend.capabilities().notes.into_iter().find(|(c, _)| *c == "unreachable_config");
            not_run(backend, SUITE, "unreachable-broker", reason.map_or("not declared".into(), |(_, r)| r));
        }
    }
    Ok(())
}

async fn hung_handler_retried(backend: &dyn Backend) -> anyhow::Result<()> {
    let handler_timeout = Duration::from_millis(1_000);
    let mut config = backend.config();
    config.retry = quick_retry(3);
    config.subscribe.handler_timeout = handler_timeout;
    let connection = backend.connect(config).await?;
    let bus = &*connection.bus;
    let workload = Workload::new("timeout-hung", 51, 10, 1);
    let hung = workload.aggregate_id(0);
    let recorder = Arc::new(Recorder::default());
    let hung_attempts = Arc::new(AtomicU32::new(0));
    let others_done_at: Arc<Mutex<Option<Duration>>> = Arc::default();
    let hung_done_at: Arc<Mutex<Option<Duration>>> = Arc::default();
    // On a partitioned backend the aggregates sharing the hung one's partition wait with it, as declared;
    // every other aggregate must go on.
    let partitioning = backend.capabilities().partitioning;
    let waits_with_hung = |aggregate: &str| partitioning.is_some_and(|p| p.shared(aggregate, &hung));
    let independent: Vec<String> =
        (1..workload.aggregates).map(|i| workload.aggregate_id(i)).filter(|a| !waits_with_hung(a)).collect();
    let sharing = workload.aggregates - 1 - independent.len();
    let others_total = independent.len() * workload.versions as usize;
    let started = Instant::now();
    let subscription = {
        let (recorder, hung, hung_attempts) = (recorder.clone(), hung.clone(), hung_attempts.clone());
        let (others_done_at, hung_done_at) = (others_done_at.clone(), hung_done_at.clone());
        let others_seen = Arc::new(AtomicU32::new(0));
        let independent: Arc<std::collections::HashSet<String>> = Arc::new(independent.into_iter().collect());
        bus.subscribe_with(&workload.topics[0], SubscribeOptions::group("g"), move |event| {
            let (recorder, hung_attempts, others_seen) = (recorder.clone(), hung_attempts.clone(), others_seen.clone());
            let (others_done_at, hung_done_at) = (others_done_at.clone(), hung_done_at.clone());
            let is_hung = event.aggregate_id == hung;
            let is_independent = independent.contains(&event.aggregate_id);
            async move {
                if is_hung && event.event_version == 1 {
                    if hung_attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                        std::future::pending::<()>().await;
                    }
                    *hung_done_at.lock().unwrap() = Some(started.elapsed());
                } else if is_independent && others_seen.fetch_add(1, Ordering::SeqCst) + 1 == others_total as u32 {
                    *others_done_at.lock().unwrap() = Some(started.elapsed());
                }
                recorder.record(&event);
                Ok::<(), HandlerError>(())
            }
        })
        .await?
    };
    let published = workload.publish(connection.bus.clone()).await;
    let complete = recorder.wait_for(workload.total(), DELIVERY_DEADLINE).await;
    subscription.close().await;
    connection.bus.close().await;
    let tally = recorder.tally(workload.total());
    let others = *others_done_at.lock().unwrap();
    let unhung = *hung_done_at.lock().unwrap();
    figures(
        backend,
        SUITE,
        "hung-handler-timed-out-and-retried",
        format_args!(
            "handler_timeout={handler_timeout:?} hung_attempts={} hung_event_done_at={unhung:?} \
             other_aggregates({others_total} events)_done_at={others:?} sharing_the_hung_partition={sharing} {tally}",
            hung_attempts.load(Ordering::SeqCst)
        ),
    );
    ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
    ensure!(complete && tally.violations == 0 && tally.duplicates == 0, "{tally}");
    ensure!(hung_attempts.load(Ordering::SeqCst) == 2, "the hung call was not retried exactly once");
    let (others, unhung) = (others.context("others")?, unhung.context("hung")?);
    ensure!(unhung >= handler_timeout, "the hung call was retried before its timeout");
    ensure!(others < unhung, "other aggregates waited for the hung one");
    ensure!(recorder.versions(&hung) == (1..=10).collect::<Vec<_>>(), "the hung aggregate lost its order");
    Ok(())
}

async fn close_with_hung_handler(backend: &dyn Backend) -> anyhow::Result<()> {
    let close_timeout = Duration::from_millis(500);
    let mut config = backend.config();
    config.close_timeout = close_timeout;
    let connection = backend.connect(config).await?;
    let bus = &*connection.bus;
    let workload = Workload::new("timeout-close-hung", 1, 1, 1);
    let entered = Arc::new(Notify::new());
    let subscription = {
        let entered = entered.clone();
        bus.subscribe_with(&workload.topics[0], SubscribeOptions::group("g"), move |_| {
            let entered = entered.clone();
            async move {
                entered.notify_one();
                std::future::pending::<Result<(), HandlerError>>().await
            }
        })
        .await?
    };
    subscription.detach();
    bus.publish(&workload.topics[0], workload.event(0, 1)).await?.await?;
    tokio::time::timeout(DELIVERY_DEADLINE, entered.notified()).await.context("handler never called")?;
    let started = Instant::now();
    let report = bus.close().await;
    let took = started.elapsed();
    figures(
        backend,
        SUITE,
        "close-with-hung-handler",
        format_args!(
            "close_timeout={close_timeout:?} close_took={took:?} abandoned={} timed_out={}",
            report.abandoned, report.timed_out
        ),
    );
    ensure!(took <= close_timeout + MARGIN, "close took {took:?}");
    ensure!(report.abandoned == 1 && report.timed_out, "close did not report the abandoned delivery: {report:?}");
    Ok(())
}

async fn paused_broker(backend: &dyn Backend) -> anyhow::Result<()> {
    let (ack_timeout, enqueue_timeout, close_timeout, window) =
        (Duration::from_millis(1_000), Duration::from_millis(300), Duration::from_millis(800), 8);
    // One bus whose acks time out quickly, and one whose acks outlast its close deadline, so that close is what
    // settles them.
    let mut quick_acks = backend.config();
    quick_acks.publish.ack_timeout = ack_timeout;
    let mut slow_acks = backend.config();
    slow_acks.publish.ack_timeout = Duration::from_secs(60);
    slow_acks.publish.enqueue_timeout = enqueue_timeout;
    slow_acks.publish.window = window;
    slow_acks.close_timeout = close_timeout;
    let (quick, slow) = (backend.connect(quick_acks).await?, backend.connect(slow_acks).await?);
    let (Some(quick_faults), Some(slow_faults)) = (quick.faults.clone(), slow.faults.clone()) else {
        not_run(backend, SUITE, "paused-broker", "the backend offers no fault injection");
        quick.bus.close().await;
        slow.bus.close().await;
        return Ok(());
    };
    let workload = Workload::new("timeout-paused", window + 1, 1, 1);
    let topic = &workload.topics[0];
    // The topic exists before the outage, as it does for a running service.
    let warm_up = Workload::new("timeout-paused-warm-up", 1, 1, 1);
    quick.bus.publish(topic, warm_up.event(0, 1)).await?.await?;
    slow.bus.publish(topic, warm_up.event(0, 1)).await?.await?;
    quick_faults.pause().await?;
    slow_faults.pause().await?;
    // The outage ends whatever happens inside it, so a failure here cannot leave the broker paused.
    let during = async {
        // One publish: its ack must time out inside ack_timeout.
        let started = Instant::now();
        let outcome = quick.bus.publish(topic, workload.event(0, 1)).await?.await;
        let ack_failed_after = started.elapsed();
        let health = quick.bus.health();
        quick.bus.close().await;

        // Fill the window: the next publish fails with backpressure inside enqueue_timeout.
        let mut receipts = Vec::new();
        for i in 1..=window {
            receipts.push(slow.bus.publish(topic, workload.event(i, 1)).await?);
        }
        let started = Instant::now();
        let overflow = slow.bus.publish(topic, workload.event(0, 2)).await;
        let backpressure_after = started.elapsed();

        // Close while paused: inside close_timeout, reporting what was not acked.
        let started = Instant::now();
        let report = slow.bus.close().await;
        let close_took = started.elapsed();
        let settled = futures_util::future::join_all(receipts).await;
        anyhow::Ok((outcome, ack_failed_after, health, overflow, backpressure_after, report, close_took, settled))
    }
    .await;
    quick_faults.unpause().await?;
    slow_faults.unpause().await?;
    drop((quick, slow));
    let (outcome, ack_failed_after, health, overflow, backpressure_after, report, close_took, settled) = during?;

    // After the outage a new bus works.
    let fresh = backend.connect(backend.config()).await?;
    let recorder = Arc::new(Recorder::default());
    let after = Workload::new("timeout-after-outage", 1, 3, 1);
    let subscription =
        record_into(&*fresh.bus, &after.topics[0], SubscribeOptions::group("g"), recorder.clone()).await?;
    let republished = after.publish(fresh.bus.clone()).await;
    let recovered = recorder.wait_for(after.total(), DELIVERY_DEADLINE).await;
    subscription.close().await;
    fresh.bus.close().await;

    figures(
        backend,
        SUITE,
        "paused-broker",
        format_args!(
            "ack_timeout={ack_timeout:?} ack_failed_after={ack_failed_after:?} ({}) health_while_paused={:?} \
             enqueue_timeout={enqueue_timeout:?} backpressure_after={backpressure_after:?} ({}) \
             close_timeout={close_timeout:?} close_took={close_took:?} unacked_reported={} \
             new_bus_after_outage_delivered={}",
            outcome.as_ref().err().map_or("acked".into(), short),
            health.state,
            overflow.as_ref().err().map_or("accepted".into(), short),
            report.unacked.len(),
            recorder.distinct(),
        ),
    );
    ensure!(matches!(outcome, Err(Error::AckTimeout(_))), "expected an ack timeout, got {outcome:?}");
    ensure!(ack_failed_after <= ack_timeout + MARGIN, "ack timeout took {ack_failed_after:?}");
    ensure!(matches!(overflow, Err(Error::Backpressure { .. })), "expected backpressure, got {overflow:?}");
    ensure!(
        backpressure_after >= enqueue_timeout && backpressure_after <= enqueue_timeout + MARGIN,
        "backpressure after {backpressure_after:?}"
    );
    ensure!(close_took <= close_timeout + MARGIN, "close took {close_took:?}");
    ensure!(report.unacked.len() == window, "close reported {} unacked of {window}", report.unacked.len());
    ensure!(settled.iter().all(|r| matches!(r, Err(Error::ClosedBeforeAck))), "receipts: {settled:?}");
    ensure!(republished.failed == 0 && recovered, "a new bus did not work after the outage");
    Ok(())
}

async fn unreachable(backend: &dyn Backend, mut config: eventbus::BusConfig) -> anyhow::Result<()> {
    let connect_timeout = Duration::from_millis(1_000);
    config.connect_timeout = connect_timeout;
    let started = Instant::now();
    let outcome = backend.connect(config).await;
    let took = started.elapsed();
    let error = outcome.as_ref().err().map(short);
    figures(
        backend,
        SUITE,
        "unreachable-broker",
        format_args!("connect_timeout={connect_timeout:?} failed_after={took:?} error={error:?}"),
    );
    ensure!(matches!(outcome, Err(Error::Connect { .. })), "expected a connect error, got {error:?}");
    ensure!(took <= connect_timeout + MARGIN, "connect took {took:?}");
    Ok(())
}

fn short(error: &Error) -> String {
    let text = error.to_string();
    text.split(';').next().unwrap_or(&text).to_owned()
}
