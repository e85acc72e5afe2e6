//! A sweep's results: per point, the mean, sample standard deviation and count over seeds of
//! each chosen `summary.json` metric, written as `results.csv` and `results.md` in the sweep
//! directory, with every run's own values in `runs.csv`.
//!
//! The standard deviation is the sample one (divided by n - 1, numpy's `std(ddof=1)`), empty for
//! a single seed. A run without `summary.json` (failed, interrupted, not run) counts in
//! `unfinished`, not in the statistics.

use super::{Sweep, SweepRun, SUMMARY_FILE};
use crate::error::{io_err, Result};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One point's row of the results table.
#[derive(Debug, Clone)]
pub struct PointResult {
    pub label: String,
    /// The point's value of every sweep key (empty where it sets none).
    pub values: Vec<String>,
    /// Per metric: (mean, sample std, count of runs that report it).
    pub stats: Vec<Stats>,
    pub runs: usize,
    /// Runs without a summary.json (failed, interrupted or not run yet).
    pub unfinished: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub mean: Option<f64>,
    pub std: Option<f64>,
    pub n: usize,
}

impl Stats {
    pub fn of(xs: &[f64]) -> Stats {
        let n = xs.len();
        if n == 0 {
            return Stats {
                mean: None,
                std: None,
                n,
            };
        }
        let mean = xs.iter().sum::<f64>() / n as f64;
        let std = (n > 1).then(|| {
            (xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64).sqrt()
        });
        Stats {
            mean: Some(mean),
            std,
            n,
        }
    }
}

/// A metric of a summary.json: a top-level key, or a dotted path into nested objects
/// (`final_valid_losses.upstream`). None when absent or not a number.
pub fn metric(summary: &Value, key: &str) -> Option<f64> {
    let mut v = summary;
    if let Some(x) = v.get(key) {
        return x.as_f64();
    }
    for part in key.split('.') {
        v = v.get(part)?;
    }
    v.as_f64()
}

fn read_summary(run_dir: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(run_dir.join(SUMMARY_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Collects the summaries of `runs` into one row per point of `sweep`.
pub fn collect(sweep: &Sweep, runs: &[SweepRun]) -> Vec<PointResult> {
    sweep
        .points
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mine: Vec<&SweepRun> = runs.iter().filter(|r| r.point == i).collect();
            let summaries: Vec<Value> = mine
                .iter()
                .filter_map(|r| read_summary(&r.run_dir))
                .collect();
            let stats = sweep
                .metrics
                .iter()
                .map(|m| {
                    let xs: Vec<f64> = summaries.iter().filter_map(|s| metric(s, m)).collect();
                    Stats::of(&xs)
                })
                .collect();
            PointResult {
                label: p.label.clone(),
                values: sweep
                    .keys
                    .iter()
                    .map(|k| p.value_text(k).unwrap_or_default())
                    .collect(),
                stats,
                runs: mine.len(),
                unfinished: mine.len() - summaries.len(),
            }
        })
        .collect()
}

/// Writes `results.csv`, `results.md` and `runs.csv` into the sweep's `out_dir`; returns the
/// paths written.
pub fn write(sweep: &Sweep, runs: &[SweepRun]) -> Result<Vec<PathBuf>> {
    let rows = collect(sweep, runs);
    let dir = &sweep.out_dir;
    std::fs::create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let files = [
        ("results.csv", results_csv(sweep, &rows)),
        ("results.md", results_md(sweep, &rows)),
        ("runs.csv", runs_csv(sweep, runs)),
    ];
    let mut written = Vec::new();
    for (name, text) in files {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        std::fs::write(&tmp, text).map_err(io_err(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(io_err(format!("renaming {}", path.display())))?;
        written.push(path);
    }
    Ok(written)
}

/// `point,<keys...>,<m>_mean,<m>_std,<m>_n...,runs,unfinished`; numbers in full precision.
pub fn results_csv(sweep: &Sweep, rows: &[PointResult]) -> String {
    let mut header: Vec<String> = vec!["point".into()];
    header.extend(sweep.keys.iter().cloned());
    for m in &sweep.metrics {
        header.extend([format!("{m}_mean"), format!("{m}_std"), format!("{m}_n")]);
    }
    header.extend(["runs".into(), "unfinished".into()]);
    let mut out = csv_line(&header);
    for r in rows {
        let mut cells = vec![r.label.clone()];
        cells.extend(r.values.iter().cloned());
        for s in &r.stats {
            cells.push(s.mean.map(|x| x.to_string()).unwrap_or_default());
            cells.push(s.std.map(|x| x.to_string()).unwrap_or_default());
            cells.push(s.n.to_string());
        }
        cells.extend([r.runs.to_string(), r.unfinished.to_string()]);
        out.push_str(&csv_line(&cells));
    }
    out
}

/// A Markdown table: one column per sweep key, `mean ± std (n)` per metric.
pub fn results_md(sweep: &Sweep, rows: &[PointResult]) -> String {
    let mut out = format!(
        "# Sweep {}\n\nBase recipe `{}`, seeds {}; mean ± sample standard deviation (number of \
         seeds) over seeds.\n\n",
        sweep.name,
        sweep.base.display(),
        if sweep.seeds.is_empty() {
            "(the recipe's)".to_string()
        } else {
            format!("{:?}", sweep.seeds)
        }
    );
    let mut header: Vec<String> = sweep.keys.iter().map(|k| format!("`{k}`")).collect();
    if header.is_empty() {
        header.push("point".into());
    }
    header.extend(sweep.metrics.iter().cloned());
    header.push("unfinished".into());
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(header.len()));
    for r in rows {
        let mut cells: Vec<String> = if sweep.keys.is_empty() {
            vec![r.label.clone()]
        } else {
            r.values.clone()
        };
        for s in &r.stats {
            cells.push(match (s.mean, s.std) {
                (Some(m), Some(sd)) => format!("{} ± {} ({})", fmt_g(m), fmt_g(sd), s.n),
                (Some(m), None) => format!("{} ({})", fmt_g(m), s.n),
                _ => "–".into(),
            });
        }
        cells.push(format!("{} of {}", r.unfinished, r.runs));
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    out
}

/// One row per run: `point,<keys...>,seed,status,run_dir,<metrics...>`.
pub fn runs_csv(sweep: &Sweep, runs: &[SweepRun]) -> String {
    let mut header: Vec<String> = vec!["point".into()];
    header.extend(sweep.keys.iter().cloned());
    header.extend(["seed".into(), "finished".into(), "run_dir".into()]);
    header.extend(sweep.metrics.iter().cloned());
    let mut out = csv_line(&header);
    for r in runs {
        let p = &sweep.points[r.point];
        let summary = read_summary(&r.run_dir);
        let mut cells = vec![p.label.clone()];
        cells.extend(
            sweep
                .keys
                .iter()
                .map(|k| p.value_text(k).unwrap_or_default()),
        );
        cells.extend([
            r.seed.to_string(),
            summary.is_some().to_string(),
            r.run_dir.display().to_string(),
        ]);
        for m in &sweep.metrics {
            cells.push(
                summary
                    .as_ref()
                    .and_then(|s| metric(s, m))
                    .map(|x| x.to_string())
                    .unwrap_or_default(),
            );
        }
        out.push_str(&csv_line(&cells));
    }
    out
}

/// A CSV line; cells with a comma, quote or newline are quoted (RFC 4180).
fn csv_line(cells: &[String]) -> String {
    let quoted: Vec<String> = cells
        .iter()
        .map(|c| {
            if c.contains([',', '"', '\n']) {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c.clone()
            }
        })
        .collect();
    quoted.join(",") + "\n"
}

/// Four significant digits, in scientific notation when very small or large.
fn fmt_g(x: f64) -> String {
    let a = x.abs();
    if a == 0.0 || (1e-3..1e5).contains(&a) {
        let digits = (3 - a.log10().floor() as i32).clamp(0, 7) as usize;
        format!("{x:.digits$}")
    } else {
        format!("{x:.3e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_match_numpy() {
        // numpy: x = [1.5, 2.0, 4.0]; x.mean() = 2.5, x.std(ddof=1) = 1.3228756555322954
        let s = Stats::of(&[1.5, 2.0, 4.0]);
        assert_eq!(s.mean, Some(2.5));
        assert!(
            (s.std.expect("two or more values have a std") - 1.322_875_655_532_295_4).abs() < 1e-15
        );
        assert_eq!(s.n, 3);
        let one = Stats::of(&[3.0]);
        assert_eq!((one.mean, one.std, one.n), (Some(3.0), None, 1));
        assert_eq!(Stats::of(&[]).n, 0);
    }

    #[test]
    fn metrics_read_nested_keys_and_format() {
        let v = serde_json::json!({"final_valid_loss": 1.25, "final_valid_losses": {"up": 2.0}});
        assert_eq!(metric(&v, "final_valid_loss"), Some(1.25));
        assert_eq!(metric(&v, "final_valid_losses.up"), Some(2.0));
        assert_eq!(metric(&v, "nope"), None);
        assert_eq!(fmt_g(1.53321), "1.533");
        assert_eq!(fmt_g(0.0123456), "0.01235");
        assert_eq!(fmt_g(1.5e-6), "1.500e-6");
        assert_eq!(csv_line(&["a,b".into(), "c".into()]), "\"a,b\",c\n");
    }
}
