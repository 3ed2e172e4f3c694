//! One run's figures, and the table and JSON lines they are printed as.

use serde::{Deserialize, Serialize};

use super::tally::{Counts, Percentiles};

/// Which client a run went through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Client {
    /// The `EventBus`.
    Bus,
    /// The broker's own client, used directly.
    Bare,
    /// The broker's own client with the bus's consumer layout (NATS: a consumer per partition allowed one
    /// unacked message): what the broker does under the constraint the bus's ordering puts on it.
    #[serde(rename = "bare-ordered")]
    BareOrdered,
    /// The broker's own client with the bus's consumer layout on Kafka: one consumer per topic, each in a group
    /// of its own, as the bus's subscriptions are: what the broker does when as many members fetch.
    #[serde(rename = "bare-per-topic")]
    BarePerTopic,
}

impl Client {
    /// Every client, by the name the report gives it.
    pub const ALL: [Client; 4] = [Client::Bus, Client::Bare, Client::BareOrdered, Client::BarePerTopic];

    /// The client the report names `name`.
    pub fn named(name: &str) -> Option<Client> {
        Self::ALL.into_iter().find(|client| client.to_string() == name)
    }

    /// Whether this is a bare client laid out as the bus: the reference that leaves out only the bus's own cost.
    pub fn has_bus_layout(self) -> bool {
        matches!(self, Client::BareOrdered | Client::BarePerTopic)
    }
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Client::Bus => "bus",
            Client::Bare => "bare",
            Client::BareOrdered => "bare-ordered",
            Client::BarePerTopic => "bare-per-topic",
        })
    }
}

/// The figures of one run of one level through one client.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Measurement {
    /// `memory`, `nats` or `kafka`.
    pub backend: String,
    /// Bus or bare client.
    pub client: Client,
    /// The level's name.
    pub level: String,
    /// Which round of `--repeat` this was, from 1 (0 in files written before rounds existed).
    #[serde(default)]
    pub round: usize,
    /// Events published.
    pub messages: usize,
    /// From the first publish to the last event consumed, in milliseconds.
    pub elapsed_ms: f64,
    /// CPU time of the whole bench process (user and system, every thread) over `elapsed_ms`, milliseconds: the
    /// client's cost per event, apart from the broker's, when divided by `messages`.
    #[serde(default)]
    pub cpu_ms: u64,
    /// CPU time of the broker's process over `elapsed_ms`, milliseconds, where the bench started the broker's
    /// container on this host: the broker's cost per event, beside the client's.
    #[serde(default)]
    pub broker_cpu_ms: Option<u64>,
    /// Distinct events consumed per second over `elapsed_ms`.
    pub throughput: f64,
    /// Time for `publish` to accept an event (enqueue), µs.
    pub publish_us: Percentiles,
    /// Time from publish to the broker's ack, taken when the run's ack collector takes the completed ack, µs.
    pub ack_us: Percentiles,
    /// Consume time − envelope timestamp, µs.
    pub e2e_us: Percentiles,
    /// Publisher tasks (one per aggregate).
    pub publishers: usize,
    /// Most tokio tasks alive at once during the run.
    pub peak_tasks: usize,
    /// Resident memory before the run, MiB.
    pub rss_before_mb: f64,
    /// Highest resident memory during the run minus `rss_before_mb`, MiB.
    pub rss_delta_mb: f64,
    /// Delivery counts.
    pub counts: CountsReport,
    /// Publishes that failed (rejected or not acked).
    pub publish_failures: usize,
    /// Tokio tasks alive after close beyond those alive before the run.
    pub tasks_left: isize,
    /// Open file descriptors after close beyond those open before the run.
    pub fds_left: isize,
    /// Bus throughput ÷ bare throughput at the same level, on bus rows when `--raw` ran.
    pub throughput_ratio: Option<f64>,
    /// Bus publish p99 ÷ bare publish p99 at the same level, on bus rows when `--raw` ran.
    pub publish_p99_ratio: Option<f64>,
    /// Bus throughput ÷ the throughput of the bare client with the bus's consumer layout (`bare-ordered` on
    /// NATS, `bare-per-topic` on Kafka), on bus rows when that ran.
    #[serde(default, alias = "ordered_throughput_ratio")]
    pub layout_throughput_ratio: Option<f64>,
}

/// [`Counts`], serializable.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct CountsReport {
    /// Deliveries, duplicates included.
    pub deliveries: usize,
    /// Events delivered more than once.
    pub duplicates: usize,
    /// Events delivered before an earlier version of their aggregate.
    pub violations: usize,
    /// Events never delivered.
    pub losses: usize,
    /// Deliveries that named no aggregate or version of the workload.
    pub unknown: usize,
}

impl From<Counts> for CountsReport {
    fn from(c: Counts) -> Self {
        Self {
            deliveries: c.deliveries,
            duplicates: c.duplicates,
            violations: c.violations,
            losses: c.losses,
            unknown: c.unknown,
        }
    }
}

impl Measurement {
    /// Everything wrong with this run; empty when it is clean.
    pub fn problems(&self) -> Vec<String> {
        let c = &self.counts;
        let mut problems = Vec::new();
        for (count, what) in [
            (c.violations, "order violations"),
            (c.losses, "losses"),
            (c.duplicates, "duplicates"),
            (c.unknown, "unknown deliveries"),
            (self.publish_failures, "failed publishes"),
        ] {
            if count > 0 {
                problems.push(format!("{count} {what}"));
            }
        }
        if self.tasks_left > 0 {
            problems.push(format!("{} tasks left after close", self.tasks_left));
        }
        problems
    }

    /// Sets the ratios of this (bus) run to `bare`.
    pub fn compare_to(&mut self, bare: &Measurement) {
        if bare.client.has_bus_layout() {
            self.layout_throughput_ratio = (bare.throughput > 0.0).then(|| self.throughput / bare.throughput);
            return;
        }
        if bare.throughput > 0.0 {
            self.throughput_ratio = Some(self.throughput / bare.throughput);
        }
        if bare.publish_us.p99 > 0 {
            self.publish_p99_ratio = Some(self.publish_us.p99 as f64 / bare.publish_us.p99 as f64);
        }
    }

    /// The table's header lines.
    pub fn table_header() -> &'static str {
        "| backend | client | level | messages | msg/s | bus÷bare msg/s (÷bare in the bus's layout) | publish p50/p99/max µs | bus÷bare publish p99 \
         | ack p50/p99 ms | e2e p50/p99 ms | peak tasks (publishers + other) | RSS Δ MB | violations/losses/duplicates \
         | CPU ms per 1k events (broker) | tasks/fds left |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    }

    /// This run as a table row.
    pub fn table_row(&self) -> String {
        let ratio = |r: Option<f64>| r.map_or("—".to_owned(), |r| format!("{r:.2}"));
        let throughput_ratio = match self.layout_throughput_ratio {
            Some(layout) => format!("{} ({layout:.2})", ratio(self.throughput_ratio)),
            None => ratio(self.throughput_ratio),
        };
        let ms = |us: u64| us as f64 / 1000.0;
        let per_thousand = |cpu_ms: u64| cpu_ms as f64 * 1000.0 / self.messages.max(1) as f64;
        format!(
            "| {} | {} | {} | {} | {:.0} | {} | {}/{}/{} | {} | {:.2}/{:.2} | {:.2}/{:.2} | {} ({} + {}) | {:.1} | {}/{}/{} | {:.0}{} | {}/{} |",
            self.backend,
            self.client,
            self.level,
            self.messages,
            self.throughput,
            throughput_ratio,
            self.publish_us.p50,
            self.publish_us.p99,
            self.publish_us.max,
            ratio(self.publish_p99_ratio),
            ms(self.ack_us.p50),
            ms(self.ack_us.p99),
            ms(self.e2e_us.p50),
            ms(self.e2e_us.p99),
            self.peak_tasks,
            self.publishers,
            self.peak_tasks as isize - self.publishers as isize,
            self.rss_delta_mb,
            self.counts.violations,
            self.counts.losses,
            self.counts.duplicates,
            per_thousand(self.cpu_ms),
            self.broker_cpu_ms.map_or(String::new(), |ms| format!(" ({:.0})", per_thousand(ms))),
            self.tasks_left,
            self.fds_left,
        )
    }

    /// This run as one JSON line.
    pub fn json_line(&self) -> String {
        serde_json::to_string(self).expect("a measurement always serializes")
    }

    /// The measurements of a file of JSON lines written by `--json`.
    pub fn read_json_lines(text: &str) -> anyhow::Result<Vec<Measurement>> {
        text.lines()
            .filter(|line| !line.trim().is_empty())
            .enumerate()
            .map(|(i, line)| serde_json::from_str(line).map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1)))
            .collect()
    }
}
