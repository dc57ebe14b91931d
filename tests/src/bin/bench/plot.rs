//! PNG plots of benchmark results: panels of grouped bars, drawn with `plotters` in the
//! DejaVu Sans font (Debian's `fonts-dejavu-core`, which `cargo xtask bench` installs).

use std::path::Path;

use plotters::prelude::*;

/// The font every label is drawn in.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One panel: a title, and series of one value per group.
pub struct Panel<'a> {
    pub title: &'a str,
    pub series: Vec<(&'a str, Vec<f64>)>,
}

const COLOURS: [RGBColor; 3] = [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xff, 0x7f, 0x0e), RGBColor(0x2c, 0xa0, 0x2c)];

/// Draws `panels` side by side into `png`, each with one group of bars per name in `groups`.
pub fn grouped_bars(png: &Path, groups: &[&str], panels: &[Panel]) -> Result<(), String> {
    let font = std::fs::read(FONT).map_err(|e| format!("reading the font {FONT}: {e} (Debian package fonts-dejavu-core)"))?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(font.into_boxed_slice())).map_err(|_| format!("{FONT} is not a font"))?;
    let width = 560 * u32::try_from(panels.len()).map_err(|_| "too many panels")?;
    let root = BitMapBackend::new(png, (width, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(text)?;
    for (area, panel) in root.split_evenly((1, panels.len())).iter().zip(panels) {
        draw_panel(area, groups, panel)?;
    }
    root.present().map_err(|e| format!("writing {}: {e}", png.display()))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn draw_panel(area: &Area, groups: &[&str], panel: &Panel) -> Result<(), String> {
    // Room above the bars for the legend.
    let top = panel.series.iter().flat_map(|(_, v)| v.iter().copied()).fold(0.0, f64::max) * 1.35;
    #[expect(clippy::cast_precision_loss, reason = "a handful of groups")]
    let n = groups.len() as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(32)
        .y_label_area_size(72)
        .build_cartesian_2d(-0.5..n - 0.5, 0.0..top.max(f64::MIN_POSITIVE))
        .map_err(text)?;
    let label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "a small non-negative index")]
            groups.get(i as usize).map_or_else(String::new, |g| (*g).to_string())
        } else {
            String::new()
        }
    };
    let value = |y: &f64| if top >= 100.0 { format!("{y:.0}") } else { format!("{y:.1}") };
    chart.configure_mesh().disable_x_mesh().x_labels(groups.len() + 1).x_label_formatter(&label).y_label_formatter(&value).label_style(("sans-serif", 14)).draw().map_err(text)?;
    #[expect(clippy::cast_precision_loss, reason = "a handful of series")]
    let width = 0.8 / panel.series.len() as f64;
    for (k, (name, values)) in panel.series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        #[expect(clippy::cast_precision_loss, reason = "small indexes")]
        let bars = values.iter().enumerate().map(move |(i, v)| {
            let x0 = i as f64 - 0.4 + k as f64 * width;
            Rectangle::new([(x0 + 0.01, 0.0), (x0 + width - 0.01, *v)], colour.filled())
        });
        chart.draw_series(bars).map_err(text)?.label(*name).legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(text)?;
    Ok(())
}

fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}
