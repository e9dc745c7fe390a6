//! The scale bench's plots: one SVG line chart per measured quantity, drawn with `plotters`'
//! SVG backend (no fonts needed: text goes into the SVG as text elements). Owns the look of
//! the charts only; the numbers come from the curves.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// Logarithmic x axis (for 10 -> 10,000 style curves).
    pub log_x: bool,
    pub series: Vec<Series>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Writes `chart` to `path` (SVG). Series without finite points are left out.
pub fn draw(path: &Path, chart: &Chart) -> anyhow::Result<()> {
    let series: Vec<&Series> = chart
        .series
        .iter()
        .filter(|s| s.points.iter().any(|(x, y)| x.is_finite() && y.is_finite()))
        .collect();
    let all = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|(x, y)| x.is_finite() && y.is_finite())
    };
    let (mut x0, mut x1) = all().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| {
        (a.min(*x), b.max(*x))
    });
    let y1 = all().fold(0.0f64, |a, (_, y)| a.max(*y));
    if x0 > x1 {
        (x0, x1) = (1.0, 10.0);
    }
    let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(chart.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64);
    let style = |c: usize| COLORS[c % COLORS.len()];
    macro_rules! body {
        ($ctx:expr) => {{
            let mut ctx = $ctx;
            ctx.configure_mesh()
                .x_desc(chart.x_label)
                .y_desc(chart.y_label)
                .draw()
                .map_err(plot_err)?;
            for (i, s) in series.iter().enumerate() {
                let color = style(i);
                let pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|(x, y)| x.is_finite() && y.is_finite())
                    .collect();
                ctx.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                    .map_err(plot_err)?
                    .label(s.name.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                    });
                ctx.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))
                    .map_err(plot_err)?;
            }
            ctx.configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperLeft)
                .draw()
                .map_err(plot_err)?;
        }};
    }
    if chart.log_x {
        body!(
            builder
                .build_cartesian_2d((x0.max(1e-3)..x1 * 1.1).log_scale(), 0.0..y1)
                .map_err(plot_err)?
        );
    } else {
        let pad = (x1 - x0).max(1.0) * 0.05;
        body!(
            builder
                .build_cartesian_2d((x0 - pad)..(x1 + pad), 0.0..y1)
                .map_err(plot_err)?
        );
    }
    root.present()
        .map_err(plot_err)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e:?}")
}
