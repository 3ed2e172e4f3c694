//! Measures what a bus holds on to: alive tokio tasks, open file descriptors and OS threads.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;

/// Alive tasks, open file descriptors and OS threads of this process at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resources {
    /// Tasks alive on the current tokio runtime.
    pub tasks: usize,
    /// Entries of `/proc/self/fd`.
    pub fds: usize,
    /// OS threads of the process.
    pub threads: usize,
}

impl std::fmt::Display for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "tasks={} fds={} threads={}", self.tasks, self.fds, self.threads)
    }
}

/// Tasks alive on the current runtime.
pub fn alive_tasks() -> usize {
    Handle::current().metrics().num_alive_tasks()
}

/// Measures the process now (tasks on the current runtime).
pub fn resources() -> Resources {
    Resources {
        tasks: alive_tasks(),
        fds: std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count()),
        threads: std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok()))
            .unwrap_or(0),
    }
}

/// Waits up to `within` for the process to come back to `baseline`; returns the last measurement.
/// Tasks end, and threads and descriptors are released, a moment after the code that ended them returns.
pub async fn settle_to(baseline: Resources, within: Duration) -> Resources {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let now = resources();
        if now == baseline || tokio::time::Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Alive tasks once the runtime has caught up with tasks that just ended: polls for up to 200 ms until the
/// count is back at `baseline`.
///
/// A task is removed from the runtime's count a moment after whoever awaited its `JoinHandle` has seen it
/// finish, so a count taken right after `close()` returns may still include a task that has ended.
pub async fn tasks_settled(baseline: usize) -> usize {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(200);
    loop {
        let tasks = alive_tasks();
        if tasks <= baseline || tokio::time::Instant::now() >= deadline {
            return tasks;
        }
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Samples the alive task count from an OS thread (so the sampler is not itself a task) and keeps the peak.
pub struct PeakTasks {
    peak: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl PeakTasks {
    /// Starts sampling the current runtime every millisecond.
    pub fn start() -> Self {
        let handle = Handle::current();
        let peak = Arc::new(AtomicUsize::new(handle.metrics().num_alive_tasks()));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(handle.metrics().num_alive_tasks(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        Self { peak, stop, sampler: Some(sampler) }
    }

    /// Stops sampling and returns the peak.
    pub fn finish(mut self) -> usize {
        self.stop_sampler();
        self.peak.load(Ordering::Relaxed)
    }

    fn stop_sampler(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sampler) = self.sampler.take() {
            let _ = sampler.join();
        }
    }
}

impl Drop for PeakTasks {
    fn drop(&mut self) {
        self.stop_sampler();
    }
}
