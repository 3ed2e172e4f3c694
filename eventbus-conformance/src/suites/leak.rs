//! leak: 50 cycles of connect → subscribe → publish 1000 → close bring alive tokio tasks, open file
//! descriptors and OS threads back to (never beyond) the baseline taken before the first bus, measured after
//! close; a bus dropped without close leaves no task behind within a second; a publish in progress stays
//! small, because thousands of publishers may each hold one while they wait for window room.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::ensure;
use eventbus::SubscribeOptions;

use super::DELIVERY_DEADLINE;
use crate::backend::Backend;
use crate::harness::figures;
use crate::probe::{resources, settle_to, tasks_settled, Resources};
use crate::recorder::Recorder;
use crate::workload::{record_into, Workload};

const SUITE: &str = "leak";
const CYCLES: usize = 50;
/// Most a publish in progress may occupy: 10,000 publishers waiting for window room then hold at most 40 MiB.
const MAX_PUBLISH_FUTURE_BYTES: usize = 4096;

/// Runs both scenarios.
pub async fn run(backend: &dyn Backend) -> anyhow::Result<()> {
    // Let the runtime's own start-up settle before taking the baseline.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let baseline = resources();
    cycles(backend, baseline).await?;
    drop_without_close(backend, baseline).await?;
    waiting_publish_size(backend).await?;
    Ok(())
}

async fn cycles(backend: &dyn Backend, baseline: Resources) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut peak_tasks = 0;
    let mut delivered = 0;
    for _ in 0..CYCLES {
        let connection = backend.connect(backend.config()).await?;
        let workload = Workload::new("leak", 100, 10, 1);
        let recorder = Arc::new(Recorder::default());
        let subscription =
            record_into(&*connection.bus, &workload.topics[0], SubscribeOptions::group("g"), recorder.clone()).await?;
        let published = workload.publish(connection.bus.clone()).await;
        ensure!(published.failed == 0, "publishes failed: {:?}", published.errors);
        ensure!(recorder.wait_for(workload.total(), DELIVERY_DEADLINE).await, "events lost");
        peak_tasks = peak_tasks.max(resources().tasks);
        delivered += recorder.distinct();
        subscription.close().await;
        let report = connection.bus.close().await;
        ensure!(report.unacked.is_empty() && report.abandoned == 0, "close cut work short: {report:?}");
    }
    // Tasks must be back once close returns (allowing the runtime's bookkeeping to catch up); descriptors and
    // threads are given a moment to be released.
    let tasks_right_after_close = tasks_settled(baseline.tasks).await;
    let after = settle_to(baseline, Duration::from_secs(5)).await;
    figures(
        backend,
        SUITE,
        "connect-subscribe-publish-close-x50",
        format_args!(
            "cycles={CYCLES} messages={delivered} baseline=[{baseline}] peak_tasks_with_bus={peak_tasks} \
             tasks_right_after_close={tasks_right_after_close} after=[{after}] elapsed={:.2}s",
            started.elapsed().as_secs_f64()
        ),
    );
    ensure!(tasks_right_after_close <= baseline.tasks, "close returned with {tasks_right_after_close} tasks alive");
    ensure!(after.within(baseline), "after 50 cycles: [{after}], baseline: [{baseline}]");
    Ok(())
}

async fn drop_without_close(backend: &dyn Backend, baseline: Resources) -> anyhow::Result<()> {
    let connection = backend.connect(backend.config()).await?;
    let workload = Workload::new("leak-drop", 100, 10, 1);
    let recorder = Arc::new(Recorder::default());
    let subscription =
        record_into(&*connection.bus, &workload.topics[0], SubscribeOptions::group("g"), recorder.clone()).await?;
    subscription.detach();
    let published = workload.publish(connection.bus.clone()).await;
    let with_bus = resources();
    let dropped_at = Instant::now();
    drop(connection);
    let after = settle_to(baseline, Duration::from_secs(1)).await;
    let took = dropped_at.elapsed();
    figures(
        backend,
        SUITE,
        "drop-without-close",
        format_args!(
            "published={} consumed_before_drop={} with_bus=[{with_bus}] after_drop=[{after}] settled_in={took:?}",
            published.acked,
            recorder.distinct()
        ),
    );
    ensure!(after.tasks <= baseline.tasks, "{} tasks alive 1 s after drop, baseline {}", after.tasks, baseline.tasks);
    ensure!(after.within(baseline), "after drop: [{after}], baseline: [{baseline}]");
    Ok(())
}

async fn waiting_publish_size(backend: &dyn Backend) -> anyhow::Result<()> {
    let connection = backend.connect(backend.config()).await?;
    let workload = Workload::new("leak-publish-size", 1, 1, 1);
    // Never polled, so nothing is sent: only the size of the future is of interest.
    let publish = connection.bus.publish(&workload.topics[0], workload.event(0, 1));
    let bytes = std::mem::size_of_val(&*publish);
    drop(publish);
    connection.bus.close().await;
    figures(
        backend,
        SUITE,
        "waiting-publish-size",
        format_args!("publish_future_bytes={bytes} limit={MAX_PUBLISH_FUTURE_BYTES}"),
    );
    ensure!(
        bytes <= MAX_PUBLISH_FUTURE_BYTES,
        "a publish in progress takes {bytes} bytes; 10,000 waiting publishers would hold {} MiB",
        bytes * 10_000 / (1 << 20)
    );
    Ok(())
}
