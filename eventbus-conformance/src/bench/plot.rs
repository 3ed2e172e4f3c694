//! The throughput plot: one group of bars per level, one bar per backend and client, bus beside bare, on a
//! logarithmic axis (the in-memory backend runs two orders of magnitude above the brokers).

use std::path::Path;

use plotters::prelude::*;

use super::report::{Client, Measurement};
use super::LEVELS;

/// Where the plot's font is looked for, first match wins; `EVENTBUS_PLOT_FONT` overrides them.
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Environment variable naming a TrueType font for the plot's text.
pub const FONT_VARIABLE: &str = "EVENTBUS_PLOT_FONT";

/// One hue per backend: the bus in its full shade, the bare client in its light one; greys for the bare
/// clients with the bus's consumer layout.
fn colour(backend: &str, client: Client) -> RGBColor {
    match (backend, client) {
        ("memory", _) => RGBColor(31, 119, 180),
        ("nats", Client::Bus) => RGBColor(44, 160, 44),
        ("nats", Client::Bare) => RGBColor(152, 223, 138),
        (_, Client::BareOrdered) => RGBColor(127, 127, 127),
        (_, Client::BarePerTopic) => RGBColor(189, 189, 189),
        (_, Client::Bus) => RGBColor(214, 39, 40),
        (_, Client::Bare) => RGBColor(255, 152, 150),
    }
}

/// Writes an SVG bar chart of the throughput of every measurement to `path`.
pub fn write_svg(measurements: &[Measurement], path: &Path) -> anyhow::Result<()> {
    register_font()?;
    let levels: Vec<&str> =
        LEVELS.iter().map(|l| l.name).filter(|name| measurements.iter().any(|m| m.level == *name)).collect();
    let mut series: Vec<(String, Client)> = Vec::new();
    for m in measurements {
        if !series.iter().any(|(b, c)| *b == m.backend && *c == m.client) {
            series.push((m.backend.clone(), m.client));
        }
    }
    anyhow::ensure!(!levels.is_empty() && !series.is_empty(), "nothing was measured, so there is nothing to plot");
    let highest = measurements.iter().map(|m| m.throughput).fold(1.0, f64::max);
    let lowest = measurements.iter().map(|m| m.throughput).filter(|t| *t > 0.0).fold(highest, f64::min);

    let root = SVGBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("eventbus-bench: throughput per level (msg/s, log scale)", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(80)
        // A decade of headroom above the highest bar keeps the legend (upper left) clear of the bars.
        .build_cartesian_2d(0f64..levels.len() as f64, ((lowest / 2.0).max(1.0)..highest * 10.0).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(levels.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let index = x.floor() as usize;
            if (x - index as f64 - 0.5).abs() < 0.01 {
                levels.get(index).map_or(String::new(), |l| (*l).to_owned())
            } else {
                String::new()
            }
        })
        .y_desc("messages per second")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;

    let width = 0.8 / series.len() as f64;
    for (s, (backend, client)) in series.iter().enumerate() {
        let colour = colour(backend, *client);
        let bars = measurements.iter().filter(|m| m.backend == *backend && m.client == *client).filter_map(|m| {
            let level = levels.iter().position(|l| *l == m.level)? as f64;
            let left = level + 0.1 + width * s as f64;
            Some(Rectangle::new(
                [(left, (lowest / 2.0).max(1.0)), (left + width * 0.95, m.throughput)],
                colour.filled(),
            ))
        });
        chart
            .draw_series(bars)?
            .label(format!("{backend} {client}"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Registers a TrueType font as `sans-serif` once; SVG text needs one for its layout.
fn register_font() -> anyhow::Result<()> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let candidates: Vec<String> = std::env::var(FONT_VARIABLE)
                .ok()
                .into_iter()
                .chain(FONT_PATHS.iter().map(|p| (*p).to_owned()))
                .collect();
            let (path, bytes) = candidates
                .iter()
                .find_map(|path| std::fs::read(path).ok().map(|bytes| (path, bytes)))
                .ok_or_else(|| {
                    format!(
                        "--plot needs a TrueType font: install DejaVu Sans (Debian: fonts-dejavu-core) or set \
                         {FONT_VARIABLE} to a .ttf file; looked in {candidates:?}"
                    )
                })?;
            // plotters keeps registered fonts for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{path} is not a usable TrueType font"))
        })
        .clone()
        .map_err(|message| anyhow::anyhow!(message))
}
