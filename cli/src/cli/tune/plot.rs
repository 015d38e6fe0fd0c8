//! The Pareto plot: p50 ms per token (back to back) against top-10 recall, every candidate a
//! dot (filled: exact mode, hollow: pipelined), the front joined by a line, the shipped presets
//! labelled and the chosen candidate ringed. Drawn once for PNG and once for SVG.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

pub struct PlotPoint {
    pub p50_ms: f64,
    pub recall: f64,
    pub pipelined: bool,
    /// Shown next to the dot (the shipped presets).
    pub label: Option<String>,
}

const SIZE: (u32, u32) = (1100, 720);

/// Writes `stem.png` and `stem.svg`.
pub fn write(
    stem: &Path,
    title: &str,
    points: &[PlotPoint],
    front: &[usize],
    chosen: Option<usize>,
) -> anyhow::Result<()> {
    super::super::plot::png_and_svg!(stem, SIZE, |root| draw(&root, title, points, front, chosen))
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    points: &[PlotPoint],
    front: &[usize],
    chosen: Option<usize>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    // Log scale: cascades sit within a few ms, exhaustive scoring an order of magnitude out.
    let finite = || points.iter().map(|p| p.p50_ms).filter(|v| v.is_finite() && *v > 0.0);
    let max_x = finite().fold(1e-3f64, f64::max) * 1.6;
    let min_x = finite().fold(f64::INFINITY, f64::min).min(max_x / 2.0) * 0.8;
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((min_x..max_x).log_scale(), 0.0..1.05f64)?;
    chart
        .configure_mesh()
        .x_desc("p50 ms per token, back to back (log scale)")
        .x_labels(12)
        .x_label_formatter(&|v| if *v < 1.0 { format!("{v:.2}") } else { format!("{v:.0}") })
        .y_desc("top-10 recall against the exhaustive oracle")
        .y_label_formatter(&|v| format!("{:.0}%", v * 100.0))
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 17))
        .draw()?;
    let exact = RGBColor(31, 119, 180);
    let pipelined = RGBColor(255, 127, 14);
    let front_color = RGBColor(44, 160, 44);
    chart
        .draw_series(LineSeries::new(
            front.iter().map(|&i| (points[i].p50_ms, points[i].recall)),
            front_color.stroke_width(2),
        ))?
        .label("Pareto front")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], front_color.stroke_width(2)));
    chart
        .draw_series(
            points.iter().filter(|p| !p.pipelined).map(|p| Circle::new((p.p50_ms, p.recall), 5, exact.filled())),
        )?
        .label("exact mode")
        .legend(move |(x, y)| Circle::new((x + 10, y), 5, exact.filled()));
    chart
        .draw_series(
            points
                .iter()
                .filter(|p| p.pipelined)
                .map(|p| Circle::new((p.p50_ms, p.recall), 5, pipelined.stroke_width(2))),
        )?
        .label("pipelined mode")
        .legend(move |(x, y)| Circle::new((x + 10, y), 5, pipelined.stroke_width(2)));
    chart.draw_series(
        front.iter().map(|&i| Circle::new((points[i].p50_ms, points[i].recall), 8, front_color.stroke_width(2))),
    )?;
    if let Some(c) = chosen {
        let p = &points[c];
        chart
            .draw_series(std::iter::once(Circle::new((p.p50_ms, p.recall), 12, RED.stroke_width(3))))?
            .label("chosen")
            .legend(|(x, y)| Circle::new((x + 10, y), 6, RED.stroke_width(3)));
    }
    chart.draw_series(points.iter().filter_map(|p| {
        let label = p.label.as_ref()?;
        let text = format!("{label}{}", if p.pipelined { " (pipelined)" } else { "" });
        // Beside the dot, below it for pipelined so the two modes' labels do not overlap.
        let offset = if p.pipelined { (9, 4) } else { (9, -18) };
        Some(EmptyElement::at((p.p50_ms, p.recall)) + Text::new(text, offset, ("sans-serif", 14).into_font()))
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()?;
    Ok(())
}
