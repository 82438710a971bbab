//! PNG line plots for the benchmarks (plotters, bitmap backend). Text needs a TrueType font: the
//! first DejaVu / Liberation sans found on the system (`apt install fonts-dejavu-core`).
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::sync::OnceLock;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    });
    ok.then_some(()).ok_or_else(|| anyhow!("no TrueType font found (install fonts-dejavu-core)"))
}

/// Named series of (x, y) points.
pub type Series = Vec<(String, Vec<(f64, f64)>)>;

/// One panel per (title, series), two panels per row: cumulative service (y) against seconds (x).
pub fn service_grid(path: &str, panels: &[(String, Series)]) -> Result<()> {
    let panels: Vec<_> = panels
        .iter()
        .map(|(t, s)| (t.clone(), "seconds".to_string(), "weighted service".to_string(), s.clone()))
        .collect();
    line_grid(path, &panels)
}

/// One panel per (title, x label, y label, series), two panels per row.
pub fn line_grid(path: &str, panels: &[(String, String, String, Series)]) -> Result<()> {
    register_font()?;
    let rows = panels.len().div_ceil(2).max(1);
    let root = BitMapBackend::new(path, (1200, 330 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let areas = root.split_evenly((rows, 2));
    for ((title, x_desc, y_desc, series), area) in panels.iter().zip(areas) {
        let x_max = series.iter().flat_map(|s| s.1.iter().map(|p| p.0)).fold(1.0, f64::max);
        let y_max = series.iter().flat_map(|s| s.1.iter().map(|p| p.1)).fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(&area)
            .caption(title, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max * 1.05)
            .map_err(|e| anyhow!("{e}"))?;
        chart.configure_mesh().x_desc(x_desc.as_str()).y_desc(y_desc.as_str()).draw().map_err(|e| anyhow!("{e}"))?;
        for (i, (name, points)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            // Markers too: a series of one point (a method at one cost) has no line to show.
            chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| anyhow!("{e}"))?;
            chart
                .draw_series(LineSeries::new(points.iter().copied(), color.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
