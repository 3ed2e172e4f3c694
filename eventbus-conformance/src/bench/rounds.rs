//! `--repeat`: a level run several times in a row, summed up as the median and the range of the bus's
//! figures. On two shared cores one run's ratio swings by a third from run to run; a median of several says
//! more than any one of them.

use super::report::{Client, Measurement};

/// Median, lowest and highest of one figure over the rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// The middle value (the lower middle one for an even count).
    pub median: f64,
    /// The lowest value.
    pub min: f64,
    /// The highest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` when there are none.
    pub fn of(mut values: Vec<f64>) -> Option<Self> {
        values.retain(|v| v.is_finite());
        values.sort_by(f64::total_cmp);
        let (&min, &max) = (values.first()?, values.last()?);
        Some(Self { median: values[(values.len() - 1) / 2], min, max })
    }
}

impl std::fmt::Display for Spread {
    /// `median (min–max)`, to two decimals.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.2} ({:.2}–{:.2})", self.median, self.min, self.max)
    }
}

/// The bus's figures at one level of one backend over every round.
#[derive(Clone, Debug)]
pub struct RoundsSummary {
    /// `memory`, `nats` or `kafka`.
    pub backend: String,
    /// The level's name.
    pub level: String,
    /// Rounds run.
    pub rounds: usize,
    /// Bus throughput, msg/s.
    pub throughput: Option<Spread>,
    /// Bus ÷ bare throughput.
    pub throughput_ratio: Option<Spread>,
    /// Bus ÷ throughput of the bare client in the bus's layout (bare-ordered, bare-per-topic).
    pub layout_throughput_ratio: Option<Spread>,
    /// Bus ÷ bare publish p99.
    pub publish_p99_ratio: Option<Spread>,
}

impl RoundsSummary {
    /// One summary per backend and level among `runs`, in the order they first appear.
    pub fn of_all(runs: &[Measurement]) -> Vec<Self> {
        groups(runs, |a, b| a.backend == b.backend && a.level == b.level)
            .into_iter()
            .filter_map(|group| Self::of(&group))
            .collect()
    }

    /// Sums up the bus runs among `runs` (every round of one level of one backend).
    fn of(runs: &[&Measurement]) -> Option<Self> {
        let bus: Vec<&Measurement> = runs.iter().copied().filter(|m| m.client == Client::Bus).collect();
        let first = bus.first()?;
        let spread =
            |figure: fn(&Measurement) -> Option<f64>| Spread::of(bus.iter().filter_map(|m| figure(m)).collect());
        Some(Self {
            backend: first.backend.clone(),
            level: first.level.clone(),
            rounds: bus.len(),
            throughput: spread(|m| Some(m.throughput)),
            throughput_ratio: spread(|m| m.throughput_ratio),
            layout_throughput_ratio: spread(|m| m.layout_throughput_ratio),
            publish_p99_ratio: spread(|m| m.publish_p99_ratio),
        })
    }

    /// The summary table's header lines.
    pub fn table_header() -> &'static str {
        "| backend | level | rounds | bus msg/s median (min–max) | bus÷bare msg/s | bus÷bare in the bus's layout msg/s \
         | bus÷bare publish p99 |\n|---|---|---|---|---|---|---|"
    }

    /// This summary as a table row.
    pub fn table_row(&self) -> String {
        let shown = |spread: Option<Spread>| spread.map_or("—".to_owned(), |s| s.to_string());
        let throughput =
            self.throughput.map_or("—".to_owned(), |s| format!("{:.0} ({:.0}–{:.0})", s.median, s.min, s.max));
        format!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            self.backend,
            self.level,
            self.rounds,
            throughput,
            shown(self.throughput_ratio),
            shown(self.layout_throughput_ratio),
            shown(self.publish_p99_ratio),
        )
    }
}

/// For each backend, client and level among `runs`, the round with the median throughput: what the plot
/// draws when a level ran more than once.
pub fn median_runs(runs: &[Measurement]) -> Vec<Measurement> {
    groups(runs, |a, b| a.backend == b.backend && a.client == b.client && a.level == b.level)
        .into_iter()
        .map(|mut group| {
            group.sort_by(|a, b| a.throughput.total_cmp(&b.throughput));
            group[(group.len() - 1) / 2].clone()
        })
        .collect()
}

/// `runs` grouped by `same`, each group in run order, the groups in the order they first appear.
fn groups(runs: &[Measurement], same: impl Fn(&Measurement, &Measurement) -> bool) -> Vec<Vec<&Measurement>> {
    let mut groups: Vec<Vec<&Measurement>> = Vec::new();
    for run in runs {
        match groups.iter_mut().find(|group| same(group[0], run)) {
            Some(group) => group.push(run),
            None => groups.push(vec![run]),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_lower_middle_of_an_even_count() {
        let spread = Spread::of(vec![0.9, 0.7, 1.1, 0.8]).expect("values");
        assert_eq!(spread, Spread { median: 0.8, min: 0.7, max: 1.1 });
        assert_eq!(Spread::of(vec![0.66, 1.05, 0.87]).expect("values").median, 0.87);
        assert_eq!(Spread::of(Vec::new()), None);
    }
}
