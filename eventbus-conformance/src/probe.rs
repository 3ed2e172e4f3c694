//! Measures what a bus holds on to: alive tokio tasks, open file descriptors, OS threads and resident memory;
//! and the CPU time it uses.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
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

impl Resources {
    /// Whether nothing is held beyond `baseline`. Fewer is fine: a thread or descriptor that predates the
    /// baseline (a blocking-pool thread of the broker fixture's start-up, say) may end during the run.
    pub fn within(&self, baseline: Resources) -> bool {
        self.tasks <= baseline.tasks && self.fds <= baseline.fds && self.threads <= baseline.threads
    }
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

/// Waits up to `within` for the process to hold nothing beyond `baseline` ([`Resources::within`]); returns the
/// last measurement.
/// Tasks end, and threads and descriptors are released, a moment after the code that ended them returns.
pub async fn settle_to(baseline: Resources, within: Duration) -> Resources {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let now = resources();
        if now.within(baseline) || tokio::time::Instant::now() >= deadline {
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

/// How often the sampler looks.
const PERIOD: Duration = Duration::from_millis(1);

/// Samples the alive task count and resident memory from an OS thread (so the sampler is not itself a task)
/// and keeps the peaks; [`finish`](Self::finish) stops it and returns them.
pub struct Sampler {
    peak_tasks: Arc<AtomicUsize>,
    peak_rss_kib: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a sampler saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peaks {
    /// Most tokio tasks alive at once.
    pub tasks: usize,
    /// Highest resident set size, in KiB.
    pub rss_kib: u64,
}

impl Sampler {
    /// Starts sampling the current runtime and process. Needs a tokio runtime.
    pub fn start() -> Self {
        let handle = Handle::current();
        let peak_tasks = Arc::new(AtomicUsize::new(handle.metrics().num_alive_tasks()));
        let peak_rss_kib = Arc::new(AtomicU64::new(rss_kib()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (tasks, rss, stop) = (peak_tasks.clone(), peak_rss_kib.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut round = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    tasks.fetch_max(handle.metrics().num_alive_tasks(), Ordering::Relaxed);
                    // Reading /proc costs more than the task count; every tenth round is often enough.
                    if round % 10 == 0 {
                        rss.fetch_max(rss_kib(), Ordering::Relaxed);
                    }
                    round = round.wrapping_add(1);
                    std::thread::sleep(PERIOD);
                }
            })
        };
        Self { peak_tasks, peak_rss_kib, stop, thread: Some(thread) }
    }

    /// Takes one sample now, for a moment the caller knows to matter (every publisher spawned, none started),
    /// which a sample every millisecond can miss on a busy machine.
    pub fn sample_now(&self) {
        self.peak_tasks.fetch_max(alive_tasks(), Ordering::Relaxed);
    }

    /// Stops sampling; the peaks seen, the current RSS included.
    pub fn finish(mut self) -> Peaks {
        self.stop_thread();
        self.peak_rss_kib.fetch_max(rss_kib(), Ordering::Relaxed);
        Peaks { tasks: self.peak_tasks.load(Ordering::Relaxed), rss_kib: self.peak_rss_kib.load(Ordering::Relaxed) }
    }

    fn stop_thread(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

/// CPU time this process has used so far (user and system, every thread), in milliseconds; 0 where /proc is
/// unavailable.
pub fn process_cpu_ms() -> u64 {
    cpu_ms_of("self").unwrap_or(0)
}

/// CPU time process `pid` (`"self"` for this one) has used so far (user and system, every thread), in
/// milliseconds; `None` where its /proc entry cannot be read. /proc counts it in USER_HZ ticks, which Linux fixes
/// at 100 per second.
fn cpu_ms_of(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line: 12th and 13th after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10)
}

/// The host process id of the broker whose CPU time runs are measured against; 0 for none.
static BROKER_PROCESS: AtomicU32 = AtomicU32::new(0);

/// Measures the CPU time of process `pid` (a broker container's main process, as seen from this host) beside
/// this process's, from now on; `None` stops measuring it.
pub fn watch_broker_process(pid: Option<u32>) {
    BROKER_PROCESS.store(pid.unwrap_or(0), Ordering::Relaxed);
}

/// CPU time the watched broker process has used so far, in milliseconds; `None` without one.
pub fn broker_cpu_ms() -> Option<u64> {
    match BROKER_PROCESS.load(Ordering::Relaxed) {
        0 => None,
        pid => cpu_ms_of(&pid.to_string()),
    }
}

/// This process's resident set size in KiB (`VmRSS`), 0 where /proc is unavailable.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
