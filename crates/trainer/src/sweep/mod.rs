//! Sweeps: one base recipe, a grid (or list) of overrides and a list of seeds, each combination
//! a run of its own (`trainer sweep`), and a results table over seeds (`results.rs`).
//!
//! A sweep is a separate TOML file rather than a `[sweep]` table inside a recipe, so that a
//! recipe always describes exactly one run (`trainer run` never sees sweep keys) and one recipe
//! can serve several sweeps:
//!
//! ```toml
//! [sweep]
//! name = "lr"                        # default: the file's stem
//! base = "configs/quickstart.toml"   # relative to the working directory, like recipe paths
//! out_dir = "runs/lr"                # default: runs/<name>
//! seeds = [1, 2, 3]                  # default: the base recipe's run.seed
//! metrics = ["final_valid_loss"]     # summary.json keys (dotted for nested ones)
//! set = ["train.max_steps=200"]      # overrides applied to every point
//!
//! [sweep.grid]                       # the cartesian product of these lists
//! "optim.lr" = [1e-3, 3e-3]
//! "model.d_model" = [64, 128]
//!
//! [[sweep.points]]                   # and/or explicit points, after the grid's
//! "optim.lr" = 1e-2
//! "train.batch_size" = 8
//! ```
//!
//! Every point is the base recipe with typed overrides, read through the same machinery as
//! `--set` (`config::Override`), so a key that the recipe schema does not have, or a value of the
//! wrong type, is the same one-line error; all points are checked before any runs. Each (point,
//! seed) runs in `<out_dir>/<key=value,...>/seed=<s>` (`<out_dir>/base/seed=<s>` when the sweep
//! has no keys). [`Sweep::runs`] lists them with the arguments of their `trainer run`: what the
//! local runner and a Slurm job array both start.
//!
//! Imports: `config/` (each point is a recipe with overrides) and `train/` (the run directory);
//! only the CLI imports it.

pub mod results;

use crate::config::{self, Override};
use crate::error::{one_line, Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The `summary.json` of a finished run: its presence marks a sweep point as done.
pub const SUMMARY_FILE: &str = "summary.json";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepFile {
    sweep: SweepSection,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SweepSection {
    name: Option<String>,
    base: PathBuf,
    out_dir: Option<PathBuf>,
    #[serde(default)]
    seeds: Vec<u64>,
    #[serde(default = "default_metrics")]
    metrics: Vec<String>,
    #[serde(default)]
    set: Vec<String>,
    #[serde(default)]
    grid: toml::Table,
    #[serde(default)]
    points: Vec<toml::Table>,
}

fn default_metrics() -> Vec<String> {
    vec!["final_valid_loss".into(), "final_train_loss".into()]
}

/// A sweep file, read and expanded.
#[derive(Debug, Clone)]
pub struct Sweep {
    /// The sweep file (for messages).
    pub file: PathBuf,
    pub name: String,
    /// The base recipe.
    pub base: PathBuf,
    pub out_dir: PathBuf,
    pub seeds: Vec<u64>,
    /// summary.json keys aggregated in the results table.
    pub metrics: Vec<String>,
    /// `key=value` overrides shared by every point (`sweep.set`).
    pub set: Vec<String>,
    /// Every key that some point sets, in order of first appearance.
    pub keys: Vec<String>,
    pub points: Vec<Point>,
}

/// One point of the sweep: values for some of the sweep's keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// `key=value,...` (or `base`), also the point's directory name.
    pub label: String,
    pub values: Vec<(String, toml::Value)>,
}

impl Point {
    /// The value this point gives `key`, as text (strings unquoted), if any.
    pub fn value_text(&self, key: &str) -> Option<String> {
        self.values
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| value_text(v))
    }

    /// The point's overrides as `key=value` (TOML values), for `trainer run --set`.
    pub fn set_args(&self) -> Vec<String> {
        self.values
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_string().trim()))
            .collect()
    }
}

/// One training run of a sweep: a point with a seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepRun {
    /// Index into `Sweep::points`.
    pub point: usize,
    pub seed: u64,
    pub run_dir: PathBuf,
    /// Every override of this run as `key=value`: `sweep.set`, the point's values, `run.seed`
    /// and `run.out_dir`.
    pub set: Vec<String>,
}

/// Where a sweep run stands, from its run directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    /// `summary.json` is there.
    Finished,
    /// Started but not finished: resumed with `--resume auto`.
    Started,
    New,
}

impl SweepRun {
    /// The arguments of the `trainer` command line that runs this point (after the binary's
    /// name): `run BASE --set ... --resume auto`. `--resume auto` also starts a new run.
    pub fn trainer_args(&self, base: &Path) -> Vec<String> {
        let mut args = vec!["run".to_string(), base.display().to_string()];
        for s in &self.set {
            args.push("--set".into());
            args.push(s.clone());
        }
        args.extend(["--resume".to_string(), "auto".to_string()]);
        args
    }

    pub fn status(&self) -> RunStatus {
        if self.run_dir.join(SUMMARY_FILE).is_file() {
            RunStatus::Finished
        } else if crate::train::run_dir::holds_run(&self.run_dir) {
            RunStatus::Started
        } else {
            RunStatus::New
        }
    }
}

impl Sweep {
    /// Reads a sweep file and expands its points (without checking them against the recipe:
    /// see [`Sweep::validate`]).
    pub fn load(path: &Path) -> Result<Sweep> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Recipe(format!("{file}: cannot read sweep file: {e}")))?;
        let parsed: SweepFile = toml::from_str(&text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let before = &text[..s.start.min(text.len())];
                    format!(":{}", before.matches('\n').count() + 1)
                })
                .unwrap_or_default();
            Error::Recipe(format!("{file}{at}: {}", one_line(e.message())))
        })?;
        let s = parsed.sweep;
        let bad = |key: &str, msg: String| Error::Recipe(format!("{file}: {key}: {msg}"));
        let name = match s.name {
            Some(n) => n,
            None => path
                .file_stem()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_else(|| "sweep".into()),
        };
        if name.is_empty() || name.contains('/') {
            return Err(bad(
                "sweep.name",
                format!("expected a non-empty name without '/', got {name:?}"),
            ));
        }
        let out_dir = s
            .out_dir
            .unwrap_or_else(|| PathBuf::from("runs").join(&name));
        for (i, x) in s.seeds.iter().enumerate() {
            if s.seeds[..i].contains(x) {
                return Err(bad("sweep.seeds", format!("seed {x} is listed twice")));
            }
        }
        if s.metrics.is_empty() {
            return Err(bad(
                "sweep.metrics",
                "expected at least one summary.json key".into(),
            ));
        }
        for o in &s.set {
            let parsed = Override::parse(o).map_err(|e| bad("sweep.set", e.to_string()))?;
            check_key_is_free(&parsed.path.join("."))
                .map_err(|m| bad(&format!("sweep.set ({o})"), m))?;
        }

        // The grid: flattened to dotted keys, each a non-empty list.
        let mut grid: Vec<(String, Vec<toml::Value>)> = Vec::new();
        for (key, value) in flatten(&s.grid) {
            let at = format!("sweep.grid.\"{key}\"");
            let toml::Value::Array(values) = value else {
                return Err(bad(
                    &at,
                    format!("expected a list of values, e.g. [1e-3, 3e-3], got {value}"),
                ));
            };
            if values.is_empty() {
                return Err(bad(&at, "expected at least one value".into()));
            }
            check_key_is_free(&key).map_err(|m| bad(&at, m))?;
            grid.push((key, values));
        }
        let mut points: Vec<Vec<(String, toml::Value)>> = Vec::new();
        if !grid.is_empty() {
            points.push(Vec::new());
            for (key, values) in &grid {
                points = points
                    .into_iter()
                    .flat_map(|p| {
                        values.iter().map(move |v| {
                            let mut p = p.clone();
                            p.push((key.clone(), v.clone()));
                            p
                        })
                    })
                    .collect();
            }
        }
        for (i, table) in s.points.iter().enumerate() {
            let values = flatten(table);
            for (key, _) in &values {
                check_key_is_free(key)
                    .map_err(|m| bad(&format!("sweep.points[{i}].\"{key}\""), m))?;
            }
            points.push(values);
        }
        if points.is_empty() {
            points.push(Vec::new());
        }
        let mut keys: Vec<String> = Vec::new();
        for p in &points {
            for (k, _) in p {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
        let mut out: Vec<Point> = Vec::new();
        for values in points {
            let label = label_of(&values);
            if let Some(same) = out.iter().find(|p| p.label == label) {
                return Err(bad(
                    "sweep",
                    format!("two points run in the same directory {:?}", same.label),
                ));
            }
            out.push(Point { label, values });
        }
        Ok(Sweep {
            file: path.to_path_buf(),
            name,
            base: s.base,
            out_dir,
            seeds: s.seeds,
            metrics: s.metrics,
            set: s.set,
            keys,
            points: out,
        })
    }

    /// The seeds of the sweep: `sweep.seeds`, or the base recipe's `run.seed`.
    fn seeds_or_base(&self) -> Result<Vec<u64>> {
        if !self.seeds.is_empty() {
            return Ok(self.seeds.clone());
        }
        let overrides = parse_all(&self.set)?;
        Ok(vec![match config::load_any(&self.base, &overrides)? {
            config::AnyRecipe::Pretrain(r) => r.run.seed,
            config::AnyRecipe::Classify(r) => r.run.seed,
        }])
    }

    /// Every run of the sweep, point by point, seed by seed: the hook that a local runner and a
    /// Slurm job array share.
    pub fn runs(&self) -> Result<Vec<SweepRun>> {
        let seeds = self.seeds_or_base()?;
        let mut runs = Vec::new();
        for (i, p) in self.points.iter().enumerate() {
            for &seed in &seeds {
                let run_dir = self.out_dir.join(&p.label).join(format!("seed={seed}"));
                let mut set = self.set.clone();
                set.extend(p.set_args());
                set.push(format!("run.seed={seed}"));
                set.push(format!(
                    "run.out_dir={}",
                    toml::Value::String(run_dir.display().to_string())
                ));
                runs.push(SweepRun {
                    point: i,
                    seed,
                    run_dir,
                    set,
                });
            }
        }
        Ok(runs)
    }

    /// Checks every point against the base recipe (keys, types, ranges) before anything runs.
    /// An unknown field is reported by the sweep key that set it.
    pub fn validate(&self) -> Result<()> {
        let file = self.file.display();
        if !self.base.is_file() {
            return Err(Error::Recipe(format!(
                "{file}: sweep.base: no such recipe file {}",
                self.base.display()
            )));
        }
        let shared = parse_all(&self.set)?;
        config::load_any(&self.base, &shared)
            .map_err(|e| Error::Recipe(format!("{file}: sweep.set: {e}")))?;
        for run in self.runs()? {
            let overrides = parse_all(&run.set)?;
            let point = &self.points[run.point];
            config::load_any(&self.base, &overrides).map_err(|e| {
                let msg = strip_set(&e);
                match unknown_key(point, &msg) {
                    Some(key) => Error::Recipe(format!("{file}: sweep key \"{key}\": {msg}")),
                    None => Error::Recipe(format!("{file}: sweep point {}: {msg}", point.label)),
                }
            })?;
        }
        Ok(())
    }
}

/// The key of `point` that a recipe error about an unknown field is about: the first whose
/// dotted path has that field's name as a component (`optim.lrr` for "unknown field `lrr`").
fn unknown_key<'a>(point: &'a Point, msg: &str) -> Option<&'a str> {
    let field = msg.split("unknown field `").nth(1)?.split('`').next()?;
    point
        .values
        .iter()
        .map(|(k, _)| k.as_str())
        .find(|k| k.split('.').any(|part| part == field))
}

/// Keys the sweep itself sets for every run.
fn check_key_is_free(key: &str) -> std::result::Result<(), String> {
    match key {
        "run.seed" => Err("set by the sweep: list the seeds in sweep.seeds".into()),
        "run.out_dir" => {
            Err("set by the sweep: each run gets <sweep.out_dir>/<point>/seed=<s>".into())
        }
        _ => Ok(()),
    }
}

fn parse_all(set: &[String]) -> Result<Vec<Override>> {
    set.iter().map(|s| Override::parse(s)).collect()
}

/// A recipe error with its `--set key=value: ` prefix dropped (the sweep names the key itself).
fn strip_set(e: &Error) -> String {
    let msg = e.to_string();
    match msg.strip_prefix("--set ") {
        Some(rest) => rest
            .split_once(": ")
            .map(|(_, m)| m.to_string())
            .unwrap_or(msg.clone()),
        None => msg,
    }
}

/// A table's leaves under dotted keys; sub-tables are walked (so `optim.lr = [...]` and
/// `"optim.lr" = [...]` mean the same), anything else is a leaf.
fn flatten(table: &toml::Table) -> Vec<(String, toml::Value)> {
    let mut out = Vec::new();
    for (k, v) in table {
        match v {
            toml::Value::Table(t) => {
                for (sub, leaf) in flatten(t) {
                    out.push((format!("{k}.{sub}"), leaf));
                }
            }
            _ => out.push((k.clone(), v.clone())),
        }
    }
    out
}

/// A value as it appears in a directory name or a table: strings without quotes.
pub fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string().trim().to_string(),
    }
}

/// `key=value,...` with characters that do not belong in a file name replaced by `_`.
fn label_of(values: &[(String, toml::Value)]) -> String {
    if values.is_empty() {
        return "base".into();
    }
    let text = values
        .iter()
        .map(|(k, v)| format!("{k}={}", value_text(v)))
        .collect::<Vec<_>>()
        .join(",");
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._=,+-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("s.toml");
        std::fs::write(&p, text).expect("writing the sweep file");
        p
    }

    #[test]
    fn grid_and_points_expand_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = write(
            dir.path(),
            r#"
[sweep]
base = "x.toml"
seeds = [1, 2]
[sweep.grid]
"optim.lr" = [1e-3, 3e-3]
train.batch_size = [4, 8]
[[sweep.points]]
"optim.lr" = 0.1
run.device = "cpu"
"#,
        );
        let s = Sweep::load(&p).expect("a valid sweep");
        assert_eq!(s.name, "s");
        assert_eq!(s.out_dir, PathBuf::from("runs/s"));
        let labels: Vec<&str> = s.points.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "optim.lr=0.001,train.batch_size=4",
                "optim.lr=0.001,train.batch_size=8",
                "optim.lr=0.003,train.batch_size=4",
                "optim.lr=0.003,train.batch_size=8",
                "optim.lr=0.1,run.device=cpu",
            ]
        );
        assert_eq!(s.keys, ["optim.lr", "train.batch_size", "run.device"]);
        let runs = s.runs().expect("runs");
        assert_eq!(runs.len(), 10);
        assert_eq!(
            runs[1].run_dir,
            PathBuf::from("runs/s/optim.lr=0.001,train.batch_size=4/seed=2")
        );
        assert_eq!(
            runs[1].set,
            [
                "optim.lr=0.001",
                "train.batch_size=4",
                "run.seed=2",
                "run.out_dir=\"runs/s/optim.lr=0.001,train.batch_size=4/seed=2\""
            ]
        );
    }

    #[test]
    fn bad_sweep_files_are_one_line_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (text, needle) in [
            (
                "[sweep]\nbase = \"x.toml\"\n[sweep.grid]\n\"optim.lr\" = 1e-3\n",
                "sweep.grid.\"optim.lr\": expected a list",
            ),
            (
                "[sweep]\nbase = \"x.toml\"\n[sweep.grid]\n\"run.seed\" = [1]\n",
                "sweep.seeds",
            ),
            (
                "[sweep]\nbase = \"x.toml\"\nseeds = [1, 1]\n",
                "seed 1 is listed twice",
            ),
            (
                "[sweep]\nbase = \"x.toml\"\nseed = [1]\n",
                "unknown field `seed`",
            ),
        ] {
            let e = Sweep::load(&write(dir.path(), text))
                .expect_err("a bad sweep file")
                .to_string();
            assert!(e.contains(needle), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
