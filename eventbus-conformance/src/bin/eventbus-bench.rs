//! `eventbus-bench`: the seed's workload levels, measured end to end through the bus and, with `--raw`,
//! through the bare broker client on the same broker in the same invocation, twice: as a plain application would
//! use it, and laid out as the bus lays out its consumers, the broker's pace under that layout (NATS
//! `bare-ordered`: a consumer per partition allowed `nats.max_ack_pending` unacked messages; Kafka
//! `bare-per-topic`: a consumer per topic, each in a group of its own, as the bus's subscriptions).
//!
//! ```text
//! eventbus-bench --backend memory --level all
//! eventbus-bench --backend nats --level all --raw                       # starts a NATS container
//! eventbus-bench --backend kafka --url kafka://127.0.0.1:9092 --level extreme --raw --json bench.jsonl
//! eventbus-bench --backend all --level all --raw --json bench.jsonl --plot throughput.svg
//! eventbus-bench --backend kafka --level extreme --level scale --raw --repeat 5    # medians of five rounds
//! eventbus-bench --plot-from bench.jsonl --plot throughput.svg                # redraw, run nothing
//! ```
//!
//! `--repeat N` runs each level N times in a row (bus and bare clients in turn each round), prints every
//! round, then a table of the bus's median and range per level; the plot draws each level's median round.
//! `--fresh-broker` starts a new broker container for every run (each client, level and round) instead of one per
//! backend, so that no run meets the topics, groups and stored batches an earlier run left in the broker.
//!
//! `--client NAME` (repeatable: `bus`, `bare`, `bare-per-topic`, `bare-ordered`) runs only the clients named, in
//! that order: one client alone, say, for a profiler to watch. The bus's ratios compare it with the bare
//! clients named beside it.
//!
//! `--config FILE.json` runs the bus with those settings (the `BusConfig` JSON of docs/configuration.md; its
//! `url` is replaced by the broker's). Without `--url`, a broker container is started the way the conformance
//! suites start theirs (the image from `EVENTBUS_NATS_IMAGE` / `EVENTBUS_KAFKA_IMAGE`, else the official one)
//! and removed afterwards. See `eventbus_conformance::bench` for what is measured and how.
//! `EVENTBUS_LOG=eventbus_nats=debug` (any tracing filter) prints the bus's logs on stderr. Any order violation,
//! loss, duplicate, failed publish or task left after close makes the exit status 1; bad arguments make it 2.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use eventbus::BusConfig;
use eventbus_conformance::bench::kafka_bare::Consumers;
use eventbus_conformance::bench::nats_bare::Layout;
use eventbus_conformance::bench::report::{Client, Measurement};
use eventbus_conformance::bench::rounds::{self, RoundsSummary};
use eventbus_conformance::bench::{bus, kafka_bare, nats_bare, plot, Level, LEVELS};
use eventbus_conformance::kafka::Kafka;
use eventbus_conformance::nats::Nats;

/// Every run, bus and bare alike, allocates through mimalloc: with 10,000 publisher tasks glibc's allocator
/// spent over a quarter of the in-memory `scale` run in malloc and free (perf), which measured the allocator
/// rather than the bus. An application picks its allocator the same way.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str = "usage: eventbus-bench [--backend memory|nats|kafka|all] [--url URL] \
[--level low|mid|high|extreme|scale|all]... [--raw] [--client NAME]... [--repeat N] [--fresh-broker] [--payload BYTES] \
[--config FILE.json] [--json FILE] [--plot FILE.svg]\n       eventbus-bench --plot-from FILE.jsonl --plot FILE.svg";

/// Most rounds `--repeat` accepts: each `scale` round of every client takes about a minute.
const MAX_ROUNDS: usize = 20;

struct Options {
    backends: Vec<String>,
    url: Option<String>,
    levels: Vec<Level>,
    payload: usize,
    raw: bool,
    /// The clients `--client` names; empty for the bus and, with `--raw`, the bare clients.
    clients: Vec<Client>,
    /// Rounds per level (`--repeat`).
    rounds: usize,
    /// A new broker container for every run (`--fresh-broker`).
    fresh_broker: bool,
    config: Option<PathBuf>,
    json: Option<PathBuf>,
    plot: Option<PathBuf>,
    plot_from: Option<PathBuf>,
}

fn parse() -> Result<Options, String> {
    let mut args = std::env::args().skip(1);
    let mut options = Options {
        backends: Vec::new(),
        url: None,
        levels: Vec::new(),
        payload: 200,
        raw: false,
        clients: Vec::new(),
        rounds: 1,
        fresh_broker: false,
        config: None,
        json: None,
        plot: None,
        plot_from: None,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--backend" => match value()?.as_str() {
                "all" => options.backends.extend(["memory", "nats", "kafka"].map(String::from)),
                backend @ ("memory" | "nats" | "kafka") => options.backends.push(backend.to_owned()),
                other => return Err(format!("unknown backend {other:?}")),
            },
            "--url" => options.url = Some(value()?),
            "--payload" => options.payload = value()?.parse().map_err(|e| format!("--payload: {e}"))?,
            "--raw" => options.raw = true,
            "--client" => {
                let name = value()?;
                options.clients.push(Client::named(&name).ok_or(format!("unknown client {name:?}"))?);
            }
            "--fresh-broker" => options.fresh_broker = true,
            "--repeat" => options.rounds = value()?.parse().map_err(|e| format!("--repeat: {e}"))?,
            "--json" => options.json = Some(value()?.into()),
            "--config" => options.config = Some(value()?.into()),
            "--plot" => options.plot = Some(value()?.into()),
            "--plot-from" => options.plot_from = Some(value()?.into()),
            "--level" => match value()?.as_str() {
                "all" => options.levels.extend(LEVELS),
                name => options.levels.push(Level::named(name).ok_or(format!("unknown level {name:?}"))?),
            },
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if options.backends.is_empty() {
        options.backends.push("memory".to_owned());
    }
    if options.levels.is_empty() {
        options.levels.push(LEVELS[0]);
    }
    if options.url.is_some() && options.backends.len() != 1 {
        return Err("--url names one broker: use it with a single --backend".to_owned());
    }
    if options.fresh_broker && options.url.is_some() {
        return Err("--fresh-broker starts its own broker containers: leave out --url".to_owned());
    }
    if !(1..=MAX_ROUNDS).contains(&options.rounds) {
        return Err(format!("--repeat takes 1 to {MAX_ROUNDS} rounds"));
    }
    if options.raw && !options.clients.is_empty() {
        return Err("--client names the clients to run: leave out --raw".to_owned());
    }
    if options.payload == 0 {
        return Err("--payload must be at least 1 byte".to_owned());
    }
    if options.plot_from.is_some() && options.plot.is_none() {
        return Err("--plot-from needs --plot FILE.svg to write to".to_owned());
    }
    if let Some(plot) = &options.plot {
        if plot.extension().is_none_or(|e| e != "svg") {
            return Err(format!("--plot writes SVG: give a file ending in .svg, not {}", plot.display()));
        }
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
    eventbus_conformance::harness::init_logging();
    if let (Some(input), Some(output)) = (&options.plot_from, &options.plot) {
        return match replot(input, output) {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("eventbus-bench: {error:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    match runtime.block_on(run(&options)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("eventbus-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Draws the plot of earlier runs saved with `--json`, without running anything.
fn replot(input: &std::path::Path, output: &std::path::Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(input).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", input.display()))?;
    let measured = Measurement::read_json_lines(&text).map_err(|e| anyhow::anyhow!("{}: {e}", input.display()))?;
    plot::write_svg(&rounds::median_runs(&measured), output)?;
    eprintln!("eventbus-bench: wrote {}", output.display());
    Ok(())
}

/// A broker to run against: the one at `--url`, or a container started here.
enum Broker {
    None,
    Given(String),
    Nats(Nats),
    Kafka(Kafka),
}

impl Broker {
    /// The broker of `backend`: none for memory, the one at `url`, or a container started here, whose process
    /// the runs' clocks then watch until [`stop`](Self::stop).
    async fn for_backend(backend: &str, url: Option<&String>) -> anyhow::Result<Self> {
        let broker = match (backend, url) {
            ("memory", _) => Broker::None,
            (_, Some(url)) => Broker::Given(url.clone()),
            ("nats", None) => {
                eprintln!("eventbus-bench: starting a NATS container ({})", Nats::image());
                Broker::Nats(Nats::start().await?)
            }
            _ => {
                eprintln!("eventbus-bench: starting a Kafka container ({})", Kafka::image());
                Broker::Kafka(Kafka::start().await?)
            }
        };
        eventbus_conformance::probe::watch_broker_process(broker.process_id().await);
        Ok(broker)
    }

    /// The broker's process on this host, where the bench started its container here.
    async fn process_id(&self) -> Option<u32> {
        match self {
            Broker::Nats(nats) => nats.process_id().await,
            Broker::Kafka(kafka) => kafka.process_id().await,
            Broker::None | Broker::Given(_) => None,
        }
    }

    fn url(&self) -> String {
        match self {
            Broker::None => "memory://".to_owned(),
            Broker::Given(url) => url.clone(),
            Broker::Nats(nats) => nats.url(),
            Broker::Kafka(kafka) => kafka.url(),
        }
    }

    async fn stop(self) {
        eventbus_conformance::probe::watch_broker_process(None);
        match self {
            Broker::Nats(nats) => nats.stop().await,
            Broker::Kafka(kafka) => kafka.stop().await,
            Broker::None | Broker::Given(_) => {}
        }
    }
}

async fn run(options: &Options) -> anyhow::Result<bool> {
    let mut json = match &options.json {
        Some(path) => {
            Some(std::fs::File::create(path).map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?)
        }
        None => None,
    };
    let mut clean = true;
    let mut measured = Vec::new();
    println!("{}", Measurement::table_header());
    for backend in &options.backends {
        if options.raw && backend == "memory" {
            eprintln!("eventbus-bench: memory has no bare client to compare with; --raw applies to nats and kafka");
        }
        let (shared, brokers) = if options.fresh_broker && backend != "memory" {
            (Broker::None, Brokers::Fresh)
        } else {
            let broker = Broker::for_backend(backend, options.url.as_ref()).await?;
            let url = broker.url();
            (broker, Brokers::Shared(url))
        };
        let outcome = run_backend(options, backend, &brokers, &mut measured, &mut json).await;
        shared.stop().await;
        clean &= outcome?;
    }
    let summaries = RoundsSummary::of_all(&measured);
    if options.rounds > 1 && !summaries.is_empty() {
        println!("\n{}", RoundsSummary::table_header());
        for summary in &summaries {
            println!("{}", summary.table_row());
        }
    }
    if let Some(path) = &options.plot {
        plot::write_svg(&rounds::median_runs(&measured), path)?;
        eprintln!("eventbus-bench: wrote {}", path.display());
    }
    Ok(clean)
}

/// Where each run of a backend finds its broker.
enum Brokers {
    /// One broker for every run, at this URL.
    Shared(String),
    /// A container started for each run and removed after it.
    Fresh,
}

impl Brokers {
    /// Runs `client` on its broker: the shared one, or a container started for this run alone (whose process
    /// the run's clock watches) and stopped after it, whether the run succeeds or fails. `config` holds the
    /// settings of `--config`; its url becomes the run's broker's.
    async fn run(
        &self,
        client: Client,
        config: &mut BusConfig,
        backend: &str,
        level: Level,
        payload: usize,
    ) -> anyhow::Result<Measurement> {
        let fresh = match self {
            Brokers::Shared(url) => {
                config.url = url.clone();
                None
            }
            Brokers::Fresh => {
                let broker = Broker::for_backend(backend, None).await?;
                config.url = broker.url();
                Some(broker)
            }
        };
        let measured = run_client(client, config, backend, level, payload).await;
        if let Some(broker) = fresh {
            broker.stop().await;
        }
        measured
    }
}

async fn run_backend(
    options: &Options,
    backend: &str,
    brokers: &Brokers,
    measured: &mut Vec<Measurement>,
    json: &mut Option<std::fs::File>,
) -> anyhow::Result<bool> {
    let mut config = match &options.config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            serde_json::from_str::<BusConfig>(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => {
            let mut config = BusConfig::default();
            // The benchmark's groups all subscribe before publishing: nothing needs to be kept for later ones.
            config.memory.history = 0;
            config
        }
    };
    let clients = clients(options, backend)?;
    let mut clean = true;
    for level in &options.levels {
        for round in 1..=options.rounds {
            let mut runs = Vec::new();
            for &client in &clients {
                runs.push(brokers.run(client, &mut config, backend, *level, options.payload).await?);
            }
            let bare: Vec<Measurement> = runs.iter().filter(|run| run.client != Client::Bus).cloned().collect();
            for bus in runs.iter_mut().filter(|run| run.client == Client::Bus) {
                bare.iter().for_each(|bare| bus.compare_to(bare));
            }
            for mut run in runs {
                run.round = round;
                println!("{}", run.table_row());
                let problems = run.problems();
                if !problems.is_empty() {
                    clean = false;
                    eprintln!("eventbus-bench: {} {} {}: {}", run.backend, run.client, run.level, problems.join(", "));
                }
                if let Some(file) = json {
                    writeln!(file, "{}", run.json_line())?;
                }
                measured.push(run);
            }
        }
    }
    Ok(clean)
}

/// The clients to run on `backend`, in order: those `--client` names, else the bus and, with `--raw`, the bare
/// clients. Fails on a client `backend` does not have.
fn clients(options: &Options, backend: &str) -> anyhow::Result<Vec<Client>> {
    if options.clients.is_empty() {
        let bare = if options.raw { bare_clients(backend) } else { &[] };
        return Ok([Client::Bus].into_iter().chain(bare.iter().copied()).collect());
    }
    if let Some(missing) = options.clients.iter().find(|&&c| c != Client::Bus && !bare_clients(backend).contains(&c)) {
        anyhow::bail!("{backend} has no {missing} client");
    }
    Ok(options.clients.clone())
}

/// The bare clients `--raw` runs beside the bus on `backend`: each broker's client as a plain application would
/// use it, then laid out as the bus lays out its consumers, to show the broker's pace under that layout (NATS
/// with the bus's consumer per partition, Kafka with its member per subscription). None for memory.
fn bare_clients(backend: &str) -> &'static [Client] {
    match backend {
        "nats" => &[Client::Bare, Client::BareOrdered],
        "kafka" => &[Client::Bare, Client::BarePerTopic],
        _ => &[],
    }
}

/// One level through `client` on the broker at `config.url`.
async fn run_client(
    client: Client,
    config: &BusConfig,
    backend: &str,
    level: Level,
    payload: usize,
) -> anyhow::Result<Measurement> {
    let url = config.url.as_str();
    let window = config.publish.window;
    let bootstrap = url.trim_start_matches("kafka://");
    match (backend, client) {
        (_, Client::Bus) => bus::run(config, backend, level, payload).await,
        ("nats", Client::Bare) => nats_bare::run(url, level, payload, window, Layout::PerTopic).await,
        ("nats", Client::BareOrdered) => {
            let layout = Layout::PerPartition {
                partitions: config.nats.partitions,
                max_ack_pending: config.nats.max_ack_pending,
            };
            nats_bare::run(url, level, payload, window, layout).await
        }
        ("kafka", Client::Bare) => kafka_bare::run(bootstrap, level, payload, config, Consumers::Shared).await,
        ("kafka", Client::BarePerTopic) => {
            kafka_bare::run(bootstrap, level, payload, config, Consumers::PerSubscription).await
        }
        (backend, client) => anyhow::bail!("{backend} has no {client} client"),
    }
}
