//! Peak alive tokio tasks and peak resident memory during a run, sampled from a plain thread (so the sampler
//! is not itself one of the tasks it counts).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;

/// How often the sampler looks.
const PERIOD: Duration = Duration::from_millis(1);

/// A running sampler; [`finish`](Self::finish) stops it and returns the peaks.
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
