//! `trainer report RUN... [--out FILE.png|FILE.svg] [--metrics loss,lr,...]`: the curves of one
//! or several runs from their `metrics.jsonl`, one panel per metric, for a quick look without
//! TensorBoard.
//!
//! In the panel of metric `m`, each run draws its training rows' `m` against the step as a line,
//! and each of its evaluation splits (rows with `split`) that has `m` as a line with a dot per
//! evaluation: so `loss` shows training and validation loss, `lr` the schedule, `perplexity` or
//! `top1` the evaluations only. One colour per run. The PNG is lettered with the 8x8 bitmap
//! font of `trainer schedule --png`; the SVG with SVG text.

use crate::schedule_cmd::{check_output, label, write_file, Align};
use anyhow::{anyhow, Context};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde_json::Value;
use std::path::{Path, PathBuf};

const WIDTH: u32 = 1000;
const PANEL_HEIGHT: u32 = 320;
const LEGEND_WIDTH: u32 = 260;

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// One curve: a run's training rows or one of its evaluation splits.
struct Series {
    name: String,
    color: RGBColor,
    eval: bool,
    points: Vec<(f64, f64)>,
}

struct Panel {
    metric: String,
    series: Vec<Series>,
}

pub fn run(runs: &[PathBuf], out: Option<&Path>, metrics: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(
        !runs.is_empty(),
        "report: expected at least one run directory"
    );
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| runs[0].join("report.png"));
    let svg = match out.extension().and_then(|e| e.to_str()) {
        Some("png") => false,
        Some("svg") => true,
        _ => anyhow::bail!("--out {}: expected a .png or .svg file name", out.display()),
    };
    check_output("--out", &out)?;
    anyhow::ensure!(
        !metrics.is_empty(),
        "--metrics: expected at least one metric"
    );

    let mut rows_of = Vec::new();
    for run in runs {
        let path = run.join(trainer::metrics::METRICS_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            anyhow!(
                "{}: cannot read {} ({e}); expected a run directory",
                run.display(),
                trainer::metrics::METRICS_FILE
            )
        })?;
        let rows: Vec<Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .with_context(|| format!("{}:{}: malformed JSON", path.display(), i + 1))
            })
            .collect::<anyhow::Result<_>>()?;
        rows_of.push(rows);
    }

    let mut panels = Vec::new();
    for m in metrics {
        let mut series = Vec::new();
        for (i, (run, rows)) in runs.iter().zip(&rows_of).enumerate() {
            let color = COLORS[i % COLORS.len()];
            let name = run.display().to_string();
            let mut splits: Vec<Option<String>> = Vec::new();
            for r in rows {
                let split = r.get("split").and_then(Value::as_str).map(str::to_string);
                if !splits.contains(&split) {
                    splits.push(split);
                }
            }
            for split in splits {
                let points: Vec<(f64, f64)> = rows
                    .iter()
                    .filter(|r| r.get("split").and_then(Value::as_str) == split.as_deref())
                    .filter_map(|r| {
                        let x = r.get("step")?.as_f64()?;
                        let y = r.get(m.as_str())?.as_f64()?;
                        y.is_finite().then_some((x, y))
                    })
                    .collect();
                if points.is_empty() {
                    continue;
                }
                series.push(Series {
                    name: match &split {
                        Some(s) => format!("{name} {s}"),
                        None => format!("{name} train"),
                    },
                    color,
                    eval: split.is_some(),
                    points,
                });
            }
        }
        if series.is_empty() {
            let mut keys: Vec<String> = rows_of
                .iter()
                .flatten()
                .filter_map(|r| r.as_object())
                .flat_map(|o| {
                    o.iter()
                        .filter(|(_, v)| v.is_number())
                        .map(|(k, _)| k.clone())
                })
                .filter(|k| k != "step")
                .collect();
            keys.sort();
            keys.dedup();
            anyhow::bail!(
                "--metrics {m}: no run logs it in metrics.jsonl (numeric fields there: {})",
                keys.join(", ")
            );
        }
        panels.push(Panel {
            metric: m.clone(),
            series,
        });
    }

    let height = PANEL_HEIGHT * panels.len() as u32;
    let bytes = if svg {
        let mut text = String::new();
        {
            let root = SVGBackend::with_string(&mut text, (WIDTH, height)).into_drawing_area();
            draw(&root, &panels, true)?;
        }
        text.into_bytes()
    } else {
        let mut rgb = vec![0u8; (WIDTH * height * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, height)).into_drawing_area();
            draw(&root, &panels, false)?;
        }
        let mut out = Vec::new();
        let mut enc = png::Encoder::new(&mut out, WIDTH, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().context("encoding the PNG")?;
        writer.write_image_data(&rgb).context("encoding the PNG")?;
        writer.finish().context("encoding the PNG")?;
        out
    };
    write_file(&out, &bytes).with_context(|| format!("--out {}", out.display()))?;
    eprintln!(
        "wrote {} ({} run{}, {})",
        out.display(),
        runs.len(),
        if runs.len() == 1 { "" } else { "s" },
        metrics.join(", ")
    );
    Ok(())
}

/// Text at (x, y) (top of the text): bitmap letters, or SVG text.
fn text<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    svg: bool,
    s: &str,
    x: i32,
    y: i32,
    align: Align,
) -> anyhow::Result<()> {
    if svg {
        let h = match align {
            Align::Left => HPos::Left,
            Align::Center => HPos::Center,
            Align::Right => HPos::Right,
        };
        let style = TextStyle::from(("monospace", 14).into_font()).pos(Pos::new(h, VPos::Top));
        area.draw_text(s, &style, (x, y))
            .map_err(|e| anyhow!("drawing the plot: {e}"))
    } else {
        label(area, s, x, y, align).map_err(|e| anyhow!("drawing the plot: {e}"))
    }
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    panels: &[Panel],
    svg: bool,
) -> anyhow::Result<()> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| anyhow!("drawing the plot: {e}");
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((panels.len(), 1));
    for (panel, area) in panels.iter().zip(&areas) {
        let (plot, legend) = area.split_horizontally(WIDTH - LEGEND_WIDTH);
        let xs = panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0));
        let ys = panel
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1));
        let (x0, x1) = range(xs, false);
        let (y0, y1) = range(ys, true);
        let mut chart = ChartBuilder::on(&plot)
            .margin_top(30)
            .margin_right(16)
            .margin_left(8)
            .margin_bottom(8)
            .x_label_area_size(24)
            .y_label_area_size(80)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(err)?;
        let grid = RGBColor(225, 225, 225);
        let ticks = 4;
        for i in 0..=ticks {
            let y = y0 + (y1 - y0) * i as f64 / ticks as f64;
            let x = x0 + (x1 - x0) * i as f64 / ticks as f64;
            chart
                .draw_series(LineSeries::new([(x0, y), (x1, y)], grid))
                .map_err(err)?;
            chart
                .draw_series(LineSeries::new([(x, y0), (x, y1)], grid))
                .map_err(err)?;
            // backend_coord is in the whole picture's pixels: letter on the root area.
            let (px, py) = chart.backend_coord(&(x0, y));
            text(root, svg, &fmt_tick(y), px - 6, py - 4, Align::Right)?;
            let (px, py) = chart.backend_coord(&(x, y0));
            text(
                root,
                svg,
                &format!("{}", x.round() as i64),
                px,
                py + 8,
                Align::Center,
            )?;
        }
        chart
            .draw_series(std::iter::once(Rectangle::new([(x0, y0), (x1, y1)], BLACK)))
            .map_err(err)?;
        for s in &panel.series {
            let width = if s.eval { 1 } else { 2 };
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    s.color.stroke_width(width),
                ))
                .map_err(err)?;
            if s.eval {
                chart
                    .draw_series(
                        s.points
                            .iter()
                            .map(|&p| Circle::new(p, 3, s.color.filled())),
                    )
                    .map_err(err)?;
            }
        }
        text(&plot, svg, &panel.metric, 90, 10, Align::Left)?;
        text(
            &plot,
            svg,
            "step",
            (WIDTH - LEGEND_WIDTH) as i32 - 44,
            PANEL_HEIGHT as i32 - 14,
            Align::Left,
        )?;
        // Legend: a line (with a dot for evaluations) and the series' name.
        for (i, s) in panel.series.iter().enumerate() {
            let y = 36 + 18 * i as i32;
            let width = if s.eval { 1 } else { 2 };
            legend
                .draw(&PathElement::new(
                    vec![(4, y + 4), (28, y + 4)],
                    s.color.stroke_width(width),
                ))
                .map_err(err)?;
            if s.eval {
                legend
                    .draw(&Circle::new((16, y + 4), 3, s.color.filled()))
                    .map_err(err)?;
            }
            let max_chars = (LEGEND_WIDTH as usize - 40) / 8;
            let name = shorten(&s.name, max_chars);
            text(&legend, svg, &name, 34, y, Align::Left)?;
        }
    }
    root.present().map_err(err)?;
    Ok(())
}

/// The axis range of `values` with a margin; `pad` adds 5% on both ends.
fn range(values: impl Iterator<Item = f64>, pad: bool) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let d = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
        return (lo - d, hi + d);
    }
    if pad {
        let d = (hi - lo) * 0.05;
        (lo - d, hi + d)
    } else {
        (lo, hi)
    }
}

/// Tick labels: four significant digits, scientific notation when small or large.
fn fmt_tick(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 {
        "0".into()
    } else if (1e-2..1e5).contains(&a) {
        let digits = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
        format!("{x:.digits$}")
    } else {
        format!("{x:.2e}")
    }
}

/// Keeps the end of a long name (the part that tells runs apart).
fn shorten(s: &str, max: usize) -> String {
    let n = s.chars().count();
    if n <= max {
        return s.to_string();
    }
    let tail: String = s.chars().skip(n - (max - 3)).collect();
    format!("...{tail}")
}
