//! `eventbus-bench`: the seed's workload levels, measured end to end on one backend.
//!
//! ```text
//! cargo run --release -p eventbus-conformance --bin eventbus-bench -- --backend memory --level all
//! cargo run --release -p eventbus-conformance --bin eventbus-bench -- --backend nats --url nats://127.0.0.1:4222 --level extreme
//! cargo run --release -p eventbus-conformance --bin eventbus-bench -- --backend kafka --url kafka://127.0.0.1:9092 --level low --json bench.jsonl
//! ```
//!
//! Levels: `low` / `mid` / `high` / `extreme` = 500 / 2000 / 5000 / 10000 messages over N/10 aggregates
//! (clamped to 50..1000, 10 versions each), 5 topics, one publisher task per aggregate; `scale` = 1,000,000
//! messages over 10,000 aggregates. The subscriptions are live before the clock starts (subscribe returns once
//! the consumer is); the clock runs from the first publish to the last event consumed. Any order violation,
//! loss, duplicate or task left after close makes the exit status non-zero.
//!
//! Not yet here: `--raw` (the same workload on the bare client) and `--plot`.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use eventbus::{BusConfig, EventBus, EventBusExt, HandlerError, SubscribeOptions};
use eventbus_conformance::probe::{alive_tasks, resources, tasks_settled, PeakTasks};
use eventbus_conformance::recorder::Recorder;
use eventbus_conformance::workload::Workload;

struct Options {
    backend: String,
    url: Option<String>,
    levels: Vec<(&'static str, usize, usize)>,
    payload: usize,
    json: Option<String>,
}

const LEVELS: [(&str, usize, usize); 5] = [
    ("low", 500, 50),
    ("mid", 2000, 200),
    ("high", 5000, 500),
    ("extreme", 10_000, 1000),
    ("scale", 1_000_000, 10_000),
];

fn parse() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut options = Options { backend: "memory".into(), url: None, levels: Vec::new(), payload: 200, json: None };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--backend" => options.backend = value()?,
            "--url" => options.url = Some(value()?),
            "--payload" => options.payload = value()?.parse().map_err(|e| format!("--payload: {e}"))?,
            "--json" => options.json = Some(value()?),
            "--level" => {
                let level = value()?;
                if level == "all" {
                    options.levels.extend(LEVELS);
                } else {
                    let found = LEVELS.iter().find(|(name, ..)| *name == level).ok_or(format!("unknown level {level}"))?;
                    options.levels.push(*found);
                }
            }
            "--raw" | "--plot" => return Err(format!("{arg} is not implemented yet")),
            "-h" | "--help" => return Err("usage: eventbus-bench --backend memory|nats|kafka [--url URL] --level low|mid|high|extreme|scale|all [--payload BYTES] [--json FILE]".into()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if options.levels.is_empty() {
        options.levels.push(LEVELS[0]);
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match parse() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("eventbus-bench: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let mut clean = true;
    println!("| backend | level | messages | msg/s | publish p50/p99/max µs | ack p50/p99 ms | e2e p50/p99 ms | peak tasks | rss delta MB | violations/losses/duplicates | tasks/fds after |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (level, messages, aggregates) in &options.levels {
        match runtime.block_on(run(&options, level, *messages, *aggregates)) {
            Ok(report) => {
                clean &= report.clean;
                println!("{}", report.row);
                if let Some(path) = &options.json {
                    use std::io::Write;
                    let line = report.json + "\n";
                    let written = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .and_then(|mut f| f.write_all(line.as_bytes()));
                    if let Err(error) = written {
                        eprintln!("eventbus-bench: cannot write {path}: {error}");
                        clean = false;
                    }
                }
            }
            Err(error) => {
                eprintln!("eventbus-bench: {level}: {error:#}");
                clean = false;
            }
        }
    }
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

struct Report {
    row: String,
    json: String,
    clean: bool,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

async fn run(options: &Options, level: &str, messages: usize, aggregates: usize) -> anyhow::Result<Report> {
    let url = match options.backend.as_str() {
        "memory" => "memory://".to_owned(),
        other => options.url.clone().ok_or_else(|| anyhow::anyhow!("--backend {other} needs --url"))?,
    };
    let mut config = BusConfig::from_url(&url);
    config.memory.history = 0;
    let tasks_before = alive_tasks();
    let rss_before = rss_kib();
    let bus = eventbus::connect(&config).await?;
    let mut workload = Workload::new(&format!("bench-{level}"), aggregates, (messages / aggregates) as u64, 5);
    workload.payload = options.payload;
    let total = workload.total();
    let recorder = Arc::new(Recorder::default());
    let end_to_end: Arc<Mutex<Vec<u64>>> = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let mut subscriptions = Vec::new();
    for topic in &workload.topics {
        let (recorder, end_to_end) = (recorder.clone(), end_to_end.clone());
        subscriptions.push(
            bus.subscribe_with(topic, SubscribeOptions::group("bench"), move |event| {
                let (recorder, end_to_end) = (recorder.clone(), end_to_end.clone());
                async move {
                    let latency = SystemTime::now().duration_since(event.timestamp).unwrap_or_default();
                    end_to_end.lock().unwrap().push(latency.as_micros() as u64);
                    recorder.record(&event);
                    Ok::<(), HandlerError>(())
                }
            })
            .await?,
        );
    }
    let peak = PeakTasks::start();
    let started = Instant::now();
    let (publish_latency, ack_latency, failures) = publish_timed(bus.clone(), &workload).await;
    let complete = recorder.wait_for(total, Duration::from_secs(600)).await;
    let elapsed = started.elapsed();
    let peak_tasks = peak.finish();
    let rss_peak = rss_kib();
    for subscription in subscriptions {
        subscription.close().await;
    }
    bus.close().await;
    drop(bus);
    let tasks_after = tasks_settled(tasks_before).await;
    let fds_after = resources().fds;
    let tally = recorder.tally(total);
    let mut e2e = std::mem::take(&mut *end_to_end.lock().unwrap());
    e2e.sort_unstable();
    let rate = total as f64 / elapsed.as_secs_f64();
    let rss_delta_mb = rss_peak.saturating_sub(rss_before) as f64 / 1024.0;
    let clean = complete
        && failures == 0
        && tally.violations == 0
        && tally.losses == 0
        && tally.duplicates == 0
        && tasks_after == tasks_before;
    let row = format!(
        "| {} | {level} | {total} | {rate:.0} | {}/{}/{} | {:.2}/{:.2} | {:.2}/{:.2} | {peak_tasks} | {rss_delta_mb:.1} | {}/{}/{} | {tasks_after}/{fds_after} |",
        options.backend,
        percentile(&publish_latency, 0.5),
        percentile(&publish_latency, 0.99),
        publish_latency.last().copied().unwrap_or(0),
        percentile(&ack_latency, 0.5) as f64 / 1000.0,
        percentile(&ack_latency, 0.99) as f64 / 1000.0,
        percentile(&e2e, 0.5) as f64 / 1000.0,
        percentile(&e2e, 0.99) as f64 / 1000.0,
        tally.violations,
        tally.losses,
        tally.duplicates,
    );
    let json = format!(
        r#"{{"backend":"{}","level":"{level}","messages":{total},"throughput":{rate:.1},"publish_us":{{"p50":{},"p99":{},"max":{}}},"ack_us":{{"p50":{},"p99":{}}},"e2e_us":{{"p50":{},"p99":{}}},"peak_tasks":{peak_tasks},"rss_delta_mb":{rss_delta_mb:.1},"violations":{},"losses":{},"duplicates":{},"publish_failures":{failures},"tasks_after":{tasks_after},"fds_after":{fds_after}}}"#,
        options.backend,
        percentile(&publish_latency, 0.5),
        percentile(&publish_latency, 0.99),
        publish_latency.last().copied().unwrap_or(0),
        percentile(&ack_latency, 0.5),
        percentile(&ack_latency, 0.99),
        percentile(&e2e, 0.5),
        percentile(&e2e, 0.99),
        tally.violations,
        tally.losses,
        tally.duplicates,
    );
    Ok(Report { row, json, clean })
}

/// Publishes the workload, one task per aggregate; returns sorted enqueue and ack latencies (µs) and failures.
async fn publish_timed(bus: Arc<dyn EventBus>, workload: &Workload) -> (Vec<u64>, Vec<u64>, usize) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..workload.aggregates {
        let (bus, workload) = (bus.clone(), workload.clone());
        tasks.spawn(async move {
            let (mut enqueue, mut acks, mut failures) = (Vec::new(), Vec::new(), 0);
            let mut receipts = Vec::with_capacity(workload.versions as usize);
            for version in 1..=workload.versions {
                let event = workload.event(i, version);
                let sent = Instant::now();
                match bus.publish(workload.topic_of(i), event).await {
                    Ok(receipt) => {
                        enqueue.push(sent.elapsed().as_micros() as u64);
                        receipts.push((sent, receipt));
                    }
                    Err(_) => failures += 1,
                }
            }
            for (sent, receipt) in receipts {
                match receipt.await {
                    Ok(_) => acks.push(sent.elapsed().as_micros() as u64),
                    Err(_) => failures += 1,
                }
            }
            (enqueue, acks, failures)
        });
    }
    let (mut enqueue, mut acks, mut failures) = (Vec::new(), Vec::new(), 0);
    while let Some(Ok((e, a, f))) = tasks.join_next().await {
        enqueue.extend(e);
        acks.extend(a);
        failures += f;
    }
    enqueue.sort_unstable();
    acks.sort_unstable();
    (enqueue, acks, failures)
}
