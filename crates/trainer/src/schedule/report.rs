//! Text views of a schedule for `trainer schedule`: a table of the LR at the phase boundaries,
//! a coarse ASCII plot of the whole run, and `step,lr` CSV rows.

use super::Schedule;
use std::fmt::Write;

/// One row per phase: its shape, steps, first and last step, and the LR at both.
pub fn table(s: &Schedule) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>5}  {:<11} {:>9} {:>10} {:>10}  {:>12} {:>12}",
        "phase", "shape", "steps", "first", "last", "lr at first", "lr at last"
    );
    for (i, ph) in s.phases.iter().enumerate() {
        let last = ph.end() - 1;
        let _ = writeln!(
            out,
            "{:>5}  {:<11} {:>9} {:>10} {:>10}  {:>12} {:>12}",
            i,
            ph.shape.as_str(),
            ph.steps,
            ph.start,
            last,
            fmt_lr(s.lr(ph.start)),
            fmt_lr(s.lr(last)),
        );
    }
    out
}

/// The whole run in `width` x `height` characters: one `*` per column at the LR of the step
/// that column samples, the y axis from 0 to the peak LR.
pub fn ascii_plot(s: &Schedule, width: usize, height: usize) -> String {
    let n = s.total_steps.max(1);
    let width = width.clamp(2, n.max(2) as usize);
    let height = height.max(2);
    let peak = s.peak();
    let top = if peak > 0.0 { peak } else { 1.0 };
    let mut grid = vec![vec![' '; width]; height];
    for (c, col) in (0..width).map(|c| (c, sample_step(c, width, n))) {
        let frac = (s.lr(col) / top).clamp(0.0, 1.0);
        let row = ((1.0 - frac) * (height - 1) as f64).round() as usize;
        grid[row.min(height - 1)][c] = '*';
    }
    let top_label = fmt_lr(top);
    let pad = top_label.len().max(1);
    let mut out = String::new();
    for (r, row) in grid.iter().enumerate() {
        let label = match r {
            0 => top_label.clone(),
            r if r == height - 1 => "0".to_string(),
            _ => String::new(),
        };
        let line: String = row.iter().collect();
        let _ = writeln!(out, "{label:>pad$} |{}", line.trim_end());
    }
    let _ = writeln!(out, "{:>pad$} +{}", "", "-".repeat(width));
    let last = (n - 1).to_string();
    // Right-aligned under the last column.
    let gap = (width - 1).max(last.len());
    let _ = writeln!(out, "{:>pad$}  0{:>gap$}  (step)", "", last);
    out
}

/// The step that column `c` of `width` samples, first and last step included.
fn sample_step(c: usize, width: usize, n: i64) -> i64 {
    if width <= 1 {
        return 0;
    }
    ((c as f64) * (n - 1) as f64 / (width - 1) as f64).round() as i64
}

/// `step,lr` for every step of the run, the LR written exactly (shortest round-trip form).
pub fn csv(s: &Schedule) -> String {
    let mut out = String::with_capacity(16 * s.total_steps.max(0) as usize + 8);
    out.push_str("step,lr\n");
    for step in 0..s.total_steps {
        let _ = writeln!(out, "{step},{}", s.lr(step));
    }
    out
}

/// An LR for people: four significant digits.
pub fn fmt_lr(v: f64) -> String {
    if v == 0.0 {
        "0".to_string()
    } else {
        format!("{v:.3e}")
    }
}
