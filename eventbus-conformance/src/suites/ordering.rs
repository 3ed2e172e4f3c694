//! ordering: the seed's extreme scenario — 1000 aggregates × 10 versions, one publisher task per aggregate,
//! 5 topics — with zero order violations, losses and duplicates; again with handler failures injected; again
//! with three subscribers in one group.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::ensure;
use eventbus::{EventBusExt, EventId, HandlerError, SubscribeOptions};

use super::{quick_retry, DELIVERY_DEADLINE};
use crate::backend::Backend;
use crate::harness::figures;
use crate::probe::{alive_tasks, tasks_settled, Sampler};
use crate::recorder::Recorder;
use crate::workload::Workload;

const SUITE: &str = "ordering";
/// Tasks a client library may start briefly under load (pull requests, reconnect checks).
const TASK_SLACK: usize = 16;

/// Runs the three scenarios.
pub async fn run(backend: &dyn Backend) -> anyhow::Result<()> {
    scenario(backend, "extreme", false, 1).await?;
    scenario(backend, "extreme-with-failures", true, 1).await?;
    scenario(backend, "extreme-group-of-3", false, 3).await?;
    Ok(())
}

/// `fail`: every 7th version of each aggregate fails twice before it succeeds.
async fn scenario(backend: &dyn Backend, name: &str, fail: bool, members: usize) -> anyhow::Result<()> {
    let workload = Workload::new(SUITE, 1000, 10, 5);
    let total = workload.total();
    let mut config = backend.config();
    config.retry = quick_retry(5);
    let tasks_before = alive_tasks();
    let connection = backend.connect(config).await?;
    let bus = connection.bus.clone();

    let recorder = Arc::new(Recorder::default());
    let attempts: Arc<Mutex<HashMap<EventId, u32>>> = Arc::default();
    let injected = Arc::new(AtomicUsize::new(0));
    let per_member: Vec<Arc<AtomicUsize>> = (0..members).map(|_| Arc::default()).collect();
    let mut subscriptions = Vec::new();
    for topic in &workload.topics {
        for handled in &per_member {
            let (recorder, attempts, injected, handled) =
                (recorder.clone(), attempts.clone(), injected.clone(), handled.clone());
            let subscription = bus
                .subscribe_with(topic, SubscribeOptions::group("ordering"), move |event| {
                    let (recorder, attempts, injected, handled) =
                        (recorder.clone(), attempts.clone(), injected.clone(), handled.clone());
                    async move {
                        if fail && event.event_version % 7 == 0 {
                            let mut attempts = attempts.lock().unwrap();
                            let attempt = attempts.entry(event.event_id).or_insert(0);
                            *attempt += 1;
                            if *attempt <= 2 {
                                injected.fetch_add(1, Ordering::Relaxed);
                                return Err(HandlerError::transient("injected failure"));
                            }
                        }
                        recorder.record(&event);
                        handled.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }
                })
                .await?;
            subscriptions.push(subscription);
        }
    }

    // With the subscriptions live and nothing published, the bus owns all the tasks it will ever own here.
    let tasks_idle = alive_tasks();
    let peak = Sampler::start();
    let started = Instant::now();
    let published = workload.publish(bus.clone()).await;
    let complete = recorder.wait_for(total, DELIVERY_DEADLINE).await;
    let elapsed = started.elapsed();
    for subscription in subscriptions {
        subscription.close().await;
    }
    let report = bus.close().await;
    let peak = peak.finish().tasks;
    drop((bus, connection));
    let tasks_after = tasks_settled(tasks_before).await;

    let tally = recorder.tally(total);
    let shares: Vec<usize> = per_member.iter().map(|h| h.load(Ordering::Relaxed)).collect();
    figures(
        backend,
        SUITE,
        name,
        format_args!(
            "messages={total} acked={} publish_errors={} {tally} injected_failures={} members={members} \
             per_member={shares:?} published_in={:.2}s elapsed={:.2}s rate={:.0}/s tasks before={tasks_before} \
             subscribed={tasks_idle} peak={peak} (publishers={}) after={tasks_after} unacked_at_close={}",
            published.acked,
            published.failed,
            injected.load(Ordering::Relaxed),
            published.elapsed.as_secs_f64(),
            elapsed.as_secs_f64(),
            total as f64 / elapsed.as_secs_f64(),
            workload.aggregates,
            report.unacked.len(),
        ),
    );
    ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
    ensure!(complete, "only {} of {total} events arrived within {DELIVERY_DEADLINE:?}", tally.distinct);
    ensure!(tally.violations == 0, "{} order violations, first at {:?}", tally.violations, recorder.first_violation());
    ensure!(tally.losses == 0 && tally.duplicates == 0, "{tally}");
    if fail {
        ensure!(injected.load(Ordering::Relaxed) == 2 * workload.aggregates, "failures were not injected as planned");
    }
    if members > 1 {
        ensure!(shares.iter().all(|&s| s > 0), "a group member received nothing: {shares:?}");
    }
    // The seed's regression: tasks are the publishers plus what the subscriptions own, never one per message.
    let bound = tasks_idle + workload.aggregates + TASK_SLACK;
    ensure!(peak <= bound, "peak of {peak} tasks exceeds publishers + subscribed tasks + {TASK_SLACK} = {bound}");
    ensure!(tasks_after == tasks_before, "tasks after close: {tasks_after}, before: {tasks_before}");
    Ok(())
}
