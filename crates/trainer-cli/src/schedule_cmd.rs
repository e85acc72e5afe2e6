//! `trainer schedule RECIPE`: the learning rate over the whole run, seen before any compute is
//! spent. stdout: a table of the LR at the phase boundaries and a coarse ASCII plot; `--csv`:
//! `step,lr` for every step; `--png`: a plot.
//!
//! The PNG is drawn by plotters into an RGB buffer and encoded by `png`; plotters' own text
//! needs a font library, so the axis labels are drawn from the public-domain 8x8 bitmap font of
//! `font8x8`.

use anyhow::{anyhow, Context};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use trainer::config;
use trainer::config::ScheduleConfig;
use trainer::schedule::{report, Schedule};

#[derive(clap::Args)]
pub struct ScheduleArgs {
    recipe: PathBuf,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Write `step,lr` for every step of the run to this file.
    #[arg(long, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Write a plot of the learning rate to this PNG file.
    #[arg(long, value_name = "FILE")]
    png: Option<PathBuf>,
    /// The run's length in optimizer steps (default: the recipe's; needed when it gives
    /// epochs).
    #[arg(long, value_name = "N")]
    steps: Option<i64>,
}

/// Prints the schedule of the recipe's run (a `[[stages]]` recipe's stages joined end to end)
/// and writes the files asked for. Output paths are checked before anything is written.
pub fn run(args: &ScheduleArgs) -> anyhow::Result<ExitCode> {
    let overrides = crate::parse_overrides(&args.set)?;
    let (path, csv, png) = (&args.recipe, args.csv.as_deref(), args.png.as_deref());
    if let Some(stages) = trainer::config::stages::load(path, &overrides)? {
        anyhow::ensure!(
            args.steps.is_none(),
            "--steps: a [[stages]] recipe is as long as its stages"
        );
        let peak = stages
            .iter()
            .map(|s| s.recipe.optim.lr())
            .fold(0.0, f64::max);
        show(&trainer::config::stages::schedule(&stages), peak, csv, png)?;
        return Ok(ExitCode::SUCCESS);
    }
    let (schedule, lr, recipe_steps) = match config::load_any(path, &overrides)? {
        config::AnyRecipe::Pretrain(r) => (r.schedule.clone(), r.optim.lr(), Some(r.max_steps())),
        config::AnyRecipe::Classify(r) => (r.schedule, r.optim.lr(), r.train.max_steps),
    };
    let steps = run_length(path, &schedule, lr, recipe_steps, args.steps)?;
    show(&Schedule::new(&schedule, lr, steps), lr, csv, png)?;
    Ok(ExitCode::SUCCESS)
}

/// Prints a schedule whose peak LR is `peak_lr` and writes the files asked for.
pub fn show(
    s: &Schedule,
    peak_lr: f64,
    csv: Option<&Path>,
    png: Option<&Path>,
) -> anyhow::Result<()> {
    for (flag, path) in [("--csv", csv), ("--png", png)] {
        if let Some(path) = path {
            check_output(flag, path)?;
        }
    }
    println!(
        "schedule {}: {} steps, peak lr {} (optim.lr), final lr {} (step {})",
        s.kind,
        s.total_steps,
        peak_lr,
        report::fmt_lr(s.lr(s.total_steps - 1)),
        s.total_steps - 1
    );
    print!("{}", report::table(s));
    println!();
    print!("{}", report::ascii_plot(s, 64, 12));
    if let Some(path) = csv {
        write_file(path, report::csv(s).as_bytes())
            .with_context(|| format!("--csv {}", path.display()))?;
        eprintln!("wrote {} ({} steps)", path.display(), s.total_steps);
    }
    if let Some(path) = png {
        let bytes = plot_png(s).with_context(|| format!("--png {}", path.display()))?;
        write_file(path, &bytes).with_context(|| format!("--png {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// The run's length: `--steps` if given (checked against the schedule here, as the recipe's
/// own length was when it was loaded), else the recipe's.
pub fn run_length(
    recipe: &Path,
    cfg: &ScheduleConfig,
    peak_lr: f64,
    recipe_steps: Option<i64>,
    flag: Option<i64>,
) -> anyhow::Result<i64> {
    match (flag, recipe_steps) {
        (Some(n), _) => {
            anyhow::ensure!(n > 0, "--steps: expected a positive integer, got {n}");
            cfg.check_lengths(peak_lr, n)
                .map_err(|e| anyhow!("--steps {n}: {}: {}", e.key, e.msg))?;
            Ok(n)
        }
        (None, Some(n)) => Ok(n),
        (None, None) => Err(anyhow!(
            "{}: train.epochs: the run's length in steps is known once the data is opened; \
             give --steps N to see the schedule",
            recipe.display()
        )),
    }
}

/// The directory must exist and the path must not be a directory.
pub(crate) fn check_output(flag: &str, path: &Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        !path.is_dir(),
        "{flag} {}: is a directory, expected a file path",
        path.display()
    );
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    anyhow::ensure!(
        parent.is_dir(),
        "{flag} {}: no directory {}",
        path.display(),
        parent.display()
    );
    Ok(())
}

/// Written beside the target and renamed into place: a failure leaves no half-written file.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("expected a file path"))?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow!("renaming into place: {e}")
    })
}

const WIDTH: u32 = 800;
const HEIGHT: u32 = 400;

/// The LR over the run as a PNG: the curve, a light grid with labelled ticks, and a vertical
/// line at every phase boundary.
fn plot_png(s: &Schedule) -> anyhow::Result<Vec<u8>> {
    let n = s.total_steps.max(1);
    let peak = s.peak();
    let top = if peak > 0.0 { peak * 1.05 } else { 1.0 };
    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let draw_err = |e: DrawingAreaErrorKind<_>| anyhow!("drawing the plot: {e}");
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .margin_top(28)
            .margin_right(24)
            .margin_left(8)
            .margin_bottom(8)
            .x_label_area_size(24)
            .y_label_area_size(72)
            .build_cartesian_2d(0f64..n as f64, 0f64..top)
            .map_err(draw_err)?;
        let grid = RGBColor(225, 225, 225);
        let ticks = 4;
        for i in 0..=ticks {
            let y = peak.max(0.0) * i as f64 / ticks as f64;
            let x = (n as f64 * i as f64 / ticks as f64).round();
            chart
                .draw_series(LineSeries::new([(0.0, y), (n as f64, y)], grid))
                .map_err(draw_err)?;
            chart
                .draw_series(LineSeries::new([(x, 0.0), (x, top)], grid))
                .map_err(draw_err)?;
            let (px, py) = chart.backend_coord(&(0.0, y));
            label(&root, &report::fmt_lr(y), px - 6, py - 4, Align::Right).map_err(draw_err)?;
            let (px, py) = chart.backend_coord(&(x, 0.0));
            label(&root, &(x as i64).to_string(), px, py + 8, Align::Center).map_err(draw_err)?;
        }
        let boundary = RGBColor(255, 170, 120);
        for ph in s.phases.iter().skip(1) {
            let x = ph.start as f64;
            chart
                .draw_series(LineSeries::new([(x, 0.0), (x, top)], boundary))
                .map_err(draw_err)?;
        }
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, 0.0), (n as f64, top)],
                BLACK,
            )))
            .map_err(draw_err)?;
        let points = sample_steps(s, 2000)
            .into_iter()
            .map(|step| (step as f64, s.lr(step)));
        chart
            .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))
            .map_err(draw_err)?;
        let title = format!(
            "learning rate: {} schedule, {} steps",
            s.kind, s.total_steps
        );
        label(&root, &title, 80, 10, Align::Left).map_err(draw_err)?;
        label(
            &root,
            "step",
            WIDTH as i32 - 40,
            HEIGHT as i32 - 12,
            Align::Left,
        )
        .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, WIDTH, HEIGHT);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().context("encoding the PNG")?;
    writer.write_image_data(&rgb).context("encoding the PNG")?;
    writer.finish().context("encoding the PNG")?;
    Ok(out)
}

/// Steps to draw: about `budget` evenly spaced ones plus the first and last step of every phase,
/// so that corners stay sharp however long the run.
fn sample_steps(s: &Schedule, budget: i64) -> Vec<i64> {
    let n = s.total_steps.max(1);
    let stride = (n / budget.max(1)).max(1);
    let mut steps: Vec<i64> = (0..n).step_by(stride as usize).collect();
    for ph in &s.phases {
        steps.extend([ph.start, ph.end() - 1]);
    }
    steps.push(n - 1);
    steps.sort_unstable();
    steps.dedup();
    steps
}

#[derive(Clone, Copy)]
pub(crate) enum Align {
    Left,
    Center,
    Right,
}

/// Draws ASCII `text` with its top at `y`, 8 pixels per character.
pub(crate) fn label<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    text: &str,
    x: i32,
    y: i32,
    align: Align,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let width = 8 * text.chars().count() as i32;
    let x0 = match align {
        Align::Left => x,
        Align::Center => x - width / 2,
        Align::Right => x - width,
    };
    for (i, ch) in text.chars().enumerate() {
        let glyph = font8x8::legacy::BASIC_LEGACY
            .get(ch as usize)
            .unwrap_or(&font8x8::legacy::BASIC_LEGACY[b'?' as usize]);
        for (r, row) in glyph.iter().enumerate() {
            for c in 0..8 {
                // Bit 0 is the leftmost pixel.
                if row >> c & 1 == 1 {
                    area.draw_pixel((x0 + 8 * i as i32 + c, y + r as i32), &BLACK)?;
                }
            }
        }
    }
    Ok(())
}
