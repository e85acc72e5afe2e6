//! Multi-stage recipes: `[[stages]]` run in order as one run, in one run directory, with one
//! step counter.
//!
//! ```toml
//! [[stages]]
//! name = "pretrain"
//! steps = 400                       # this stage's optimizer steps
//!
//! [[stages]]
//! name = "continue"
//! steps = 200
//! set = { "optim.lr" = 1e-3 }       # any recipe key, as with --set
//! data = { mixture = { sources = [  # keys of [data] replaced for this stage
//!   { name = "new", weight = 0.95, source = { kind = "text", path = "new.txt" } },
//!   { name = "old", weight = 0.05, source = { kind = "builtin" } } ] } }
//! schedule = { kind = "rewarm", start_lr = 3e-4, warmup_steps = 20, min_lr = 1e-4 }
//! ```
//!
//! Every stage is the recipe outside `[[stages]]` with the stage's changes applied, in this
//! order: `schedule` replaces `[schedule]` whole; `data`'s keys replace the same keys of `[data]`
//! (`train` and `mixture` exclude each other, so giving one drops the other); the command line's
//! `--set`; the stage's `set` (a stage's own setting wins over `--set`). Stages cover the steps
//! back to back: stage k runs from the end of stage k-1 (its first step, `start`) for `steps`
//! steps; `train.max_steps`, when given, must equal their sum.
//!
//! How a stage runs: it is an ordinary pretraining run of `train.max_steps = start + steps` whose
//! schedule is the stage's own, counted from the stage's first step (a stage's warmup starts at
//! its start), and whose mixture fractions are counted over the stage alone. A stage after the
//! first continues from the checkpoint that the previous stage wrote at its last step (weights,
//! optimizer state, step), exactly as `--resume auto` does. So a run interrupted anywhere
//! continues with `--resume auto`: the newest checkpoint's step says which stage it is in, and
//! the losses are bitwise those of the uninterrupted run (on the CPU), as for one-stage runs.
//! The run directory's `config.toml` is the current stage's resolved recipe; each earlier
//! stage's is kept as `config.before-step-N.toml` (N: the step at which the next stage began).
//! Every row of `metrics.jsonl` (training and evaluation) carries the name of its stage as
//! `stage`, and summary.json lists the stages with the steps of their rows.

use super::harness::Resume;
use super::pretrain::{self, Outcome};
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::recipe::{self, InitLoad, Override, Recipe, SourceConfig};
use crate::signals::StopFlag;
use std::path::Path;

/// One stage, resolved: its steps are `start..start + steps` of the run.
#[derive(Debug, Clone)]
pub struct Stage {
    pub name: String,
    pub start: i64,
    pub steps: i64,
    /// The stage's recipe, with `train.max_steps = start + steps`.
    pub recipe: Recipe,
}

impl Stage {
    pub fn end(&self) -> i64 {
        self.start + self.steps
    }
}

/// Reads a recipe file; `None` when it has no `[[stages]]` (an ordinary recipe).
pub fn load(path: &Path, overrides: &[Override]) -> Result<Option<Vec<Stage>>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Recipe(format!("{}: cannot read recipe: {e}", path.display())))?;
    parse(&text, &path.display().to_string(), overrides)
}

const STAGE_KEYS: &str = "name, steps, set, schedule or data";

/// Parses recipe `text` (from `file`, for messages); `None` when it has no `stages` key. Syntax
/// errors are left to `recipe::parse`, which reports them with their location.
pub fn parse(text: &str, file: &str, overrides: &[Override]) -> Result<Option<Vec<Stage>>> {
    let Ok(mut base) = text.parse::<toml_edit::DocumentMut>() else {
        return Ok(None);
    };
    let Some(item) = base.remove("stages") else {
        return Ok(None);
    };
    let bad = |key: &str, msg: &str| Error::Recipe(format!("{file}: {key}: {msg}"));
    let tables: Vec<toml_edit::Table> = match item {
        toml_edit::Item::ArrayOfTables(a) => a.into_iter().collect(),
        toml_edit::Item::Value(toml_edit::Value::Array(a)) => {
            let mut out = Vec::new();
            for v in a.iter() {
                match v.as_inline_table() {
                    Some(t) => out.push(t.clone().into_table()),
                    None => return Err(bad("stages", "expected [[stages]] tables")),
                }
            }
            out
        }
        _ => return Err(bad("stages", "expected [[stages]] tables")),
    };
    if tables.is_empty() {
        return Err(bad(
            "stages",
            "expected at least one [[stages]] table (or leave the key out)",
        ));
    }
    // The length of the run: the stages' sum; train.max_steps (as written or --set) must agree.
    let given_steps = overrides
        .iter()
        .rev()
        .find(|o| o.path == ["train", "max_steps"])
        .map(|o| {
            o.raw
                .split_once('=')
                .map_or("", |(_, v)| v)
                .trim()
                .parse::<i64>()
                .ok()
        })
        .unwrap_or_else(|| {
            base.get("train")
                .and_then(|t| t.get("max_steps"))
                .and_then(|v| v.as_integer())
        });
    let has_max_tokens = base
        .get("train")
        .and_then(|t| t.get("max_tokens"))
        .is_some()
        || overrides.iter().any(|o| o.path == ["train", "max_tokens"]);
    if has_max_tokens {
        return Err(bad(
            "train.max_tokens",
            "a recipe with [[stages]] is as long as its stages: leave out train.max_tokens",
        ));
    }

    let mut stages: Vec<Stage> = Vec::new();
    let mut start = 0i64;
    for (i, table) in tables.iter().enumerate() {
        let at = format!("stages[{i}]");
        for (key, _) in table.iter() {
            if !["name", "steps", "set", "schedule", "data"].contains(&key) {
                return Err(bad(
                    &format!("{at}.{key}"),
                    &format!("unknown key; a stage takes {STAGE_KEYS}"),
                ));
            }
        }
        let name = match table.get("name").map(|v| v.as_str()) {
            Some(Some(n))
                if !n.is_empty()
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                n.to_string()
            }
            Some(_) => {
                return Err(bad(
                    &format!("{at}.name"),
                    "expected a name of letters, digits, '_' or '-'",
                ))
            }
            None => {
                return Err(bad(
                    &format!("{at}.name"),
                    "missing; every stage has a name",
                ))
            }
        };
        if stages.iter().any(|s| s.name == name) {
            return Err(bad(
                &format!("{at}.name"),
                &format!("{name:?} names an earlier stage too; stage names are unique"),
            ));
        }
        let steps = match table.get("steps").map(|v| v.as_integer()) {
            Some(Some(n)) if n > 0 => n,
            Some(_) => {
                return Err(bad(
                    &format!("{at}.steps"),
                    "expected a positive number of steps",
                ))
            }
            None => {
                return Err(bad(
                    &format!("{at}.steps"),
                    "missing; every stage has a length",
                ))
            }
        };

        // The stage's document: the base with its whole-section replacements.
        let mut doc = base.clone();
        if let Some(schedule) = table.get("schedule") {
            let Some(t) = as_table(schedule) else {
                return Err(bad(
                    &format!("{at}.schedule"),
                    "expected a table (a [schedule])",
                ));
            };
            doc.insert("schedule", toml_edit::Item::Table(t));
        }
        if let Some(data) = table.get("data") {
            let Some(t) = as_table(data) else {
                return Err(bad(
                    &format!("{at}.data"),
                    "expected a table of [data] keys",
                ));
            };
            let Some(target) = doc.get_mut("data").and_then(|d| d.as_table_like_mut()) else {
                return Err(bad("data", "missing section [data]"));
            };
            for (key, value) in t.iter() {
                match key {
                    "train" => {
                        target.remove("mixture");
                    }
                    "mixture" => {
                        target.remove("train");
                    }
                    _ => {}
                }
                target.insert(key, value.clone());
            }
        }
        // Then --set, then the stage's own `set`, then the stage's length.
        let mut all: Vec<Override> = overrides.to_vec();
        if let Some(set) = table.get("set") {
            let Some(t) = as_table(set) else {
                return Err(bad(
                    &format!("{at}.set"),
                    "expected a table of key = value, e.g. set = { \"optim.lr\" = 1e-4 }",
                ));
            };
            let mut leaves = Vec::new();
            flatten(&t, "", &mut leaves);
            for (key, value) in leaves {
                let mut o = Override::parse(&format!("{key}={value}"))
                    .map_err(|_| bad(&format!("{at}.set.{key}"), "expected key.path = value"))?;
                o.raw = format!("{at}.set {key} = {value}");
                all.push(o);
            }
        }
        let end = start + steps;
        all.push(Override::parse(&format!("train.max_steps={end}"))?);
        let label = format!("{file} (stage {name:?})");
        let recipe = recipe::parse(&doc.to_string(), &label, &all)?;
        // The schedule runs over the stage, not the whole run.
        recipe
            .schedule
            .check_lengths(recipe.optim.lr(), steps)
            .map_err(|inv| {
                bad(
                    &format!("{at}: {}", inv.key),
                    &format!("{} (the stage has {steps} steps)", inv.msg),
                )
            })?;
        // Every stage's files are checked now, not when training reaches the stage.
        check_files(&recipe).map_err(|(key, path)| {
            bad(
                &format!("{at} ({name}): {key}.path"),
                &format!("no such file: {}", path.display()),
            )
        })?;
        if recipe
            .init
            .as_ref()
            .is_some_and(|i| i.load == InitLoad::Full)
        {
            return Err(bad(
                "init.load",
                "\"full\" cannot be combined with [[stages]] (the stages count steps from 0); use load = \"model\"",
            ));
        }
        if let Some(first) = stages.first() {
            if recipe.run.out_dir != first.recipe.run.out_dir {
                return Err(bad(
                    &format!("{at}.set.run.out_dir"),
                    "every stage writes the same run directory; set run.out_dir outside [[stages]]",
                ));
            }
        }
        stages.push(Stage {
            name,
            start,
            steps,
            recipe,
        });
        start = end;
    }
    if let Some(n) = given_steps {
        if n != start {
            return Err(bad(
                "train.max_steps",
                &format!(
                    "is {n} but the [[stages]] add up to {start} steps; leave it out or make them agree"
                ),
            ));
        }
    }
    Ok(Some(stages))
}

/// The first file-backed data source of `recipe` whose file is missing: (key, path).
fn check_files(recipe: &Recipe) -> std::result::Result<(), (String, std::path::PathBuf)> {
    let d = &recipe.data;
    let mut sources: Vec<(String, &SourceConfig)> = Vec::new();
    sources.extend(d.train.iter().map(|s| ("data.train".to_string(), s)));
    sources.extend(d.valid.iter().map(|s| ("data.valid".to_string(), s)));
    if let Some(m) = &d.mixture {
        for (i, s) in m.sources.iter().enumerate() {
            sources.push((format!("data.mixture.sources[{i}].source"), &s.source));
        }
    }
    for (name, s) in &d.valid_sets {
        sources.push((format!("data.valid_sets.{name}"), s));
    }
    for (key, src) in sources {
        if let SourceConfig::Text { path } | SourceConfig::Tokens { path, .. } = src {
            if !path.is_file() {
                return Err((key, path.clone()));
            }
        }
    }
    Ok(())
}

/// A table value as a table (`[stages.x]` or `x = { ... }`).
fn as_table(item: &toml_edit::Item) -> Option<toml_edit::Table> {
    match item {
        toml_edit::Item::Table(t) => Some(t.clone()),
        toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => Some(t.clone().into_table()),
        _ => None,
    }
}

/// The (dotted key, value) pairs of a `set` table: `"optim.lr" = 1e-4` and `optim.lr = 1e-4`
/// both set `optim.lr`; any other table value (e.g. `"data.train" = { kind = ... }`) is set whole.
fn flatten(table: &toml_edit::Table, prefix: &str, out: &mut Vec<(String, String)>) {
    for (key, item) in table.iter() {
        let path = if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        };
        match item {
            toml_edit::Item::Table(t) if t.is_dotted() => flatten(t, &path, out),
            toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) if t.is_dotted() => {
                flatten(&t.clone().into_table(), &path, out)
            }
            toml_edit::Item::Value(v) => {
                let mut v = v.clone();
                v.decor_mut().clear();
                out.push((path, v.to_string()));
            }
            other => out.push((path, other.to_string().trim().to_string())),
        }
    }
}

/// Runs the stages in order from where the run stands: a fresh run from stage 0; a resumed one
/// from the stage that holds the checkpoint's step.
pub fn run(stages: &[Stage], resume: Resume, stop: &StopFlag) -> Result<Outcome> {
    let run_dir = &stages[0].recipe.run.out_dir;
    let at_step = match &resume {
        Resume::No => 0,
        Resume::Auto => checkpoint::list_complete(run_dir)
            .pop()
            .map_or(0, |(step, _)| step),
        Resume::From(dir) => checkpoint::read_state(dir)?.step,
    };
    let all: Vec<pretrain::StageSteps> = stages
        .iter()
        .map(|s| pretrain::StageSteps {
            name: s.name.clone(),
            steps: s.steps,
            first_step: s.start + 1,
            last_step: s.end(),
        })
        .collect();
    let mut resume = Some(resume);
    let mut outcome = None;
    for (k, stage) in stages.iter().enumerate() {
        if stage.end() <= at_step {
            continue;
        }
        tracing::info!(
            "stage {}/{} {:?}: steps {}..{}",
            k + 1,
            stages.len(),
            stage.name,
            stage.start,
            stage.end()
        );
        // The first stage run takes the caller's resume mode; later ones continue from the
        // checkpoint the previous stage wrote at its end.
        let mode = resume.take().unwrap_or(Resume::Auto);
        let at = pretrain::InStage {
            name: &stage.name,
            start: stage.start,
            all: &all,
        };
        match pretrain::run_from(&stage.recipe, mode, stop, Some(&at))? {
            Outcome::Finished(summary) => outcome = Some(Outcome::Finished(summary)),
            Outcome::AlreadyDone { step } => outcome = Some(Outcome::AlreadyDone { step }),
            interrupted @ Outcome::Interrupted { .. } => return Ok(interrupted),
        }
    }
    Ok(outcome.unwrap_or(Outcome::AlreadyDone { step: at_step }))
}

/// The LR of the whole run as one schedule (for `trainer schedule`): every stage's phases, moved
/// to the stage's first step. `lr(step)` equals what the stage holding `step` trains with.
pub fn schedule(stages: &[Stage]) -> crate::schedule::Schedule {
    let mut phases = Vec::new();
    let mut end_lr = 0.0;
    for stage in stages {
        let s = crate::schedule::Schedule::new(
            &stage.recipe.schedule,
            stage.recipe.optim.lr(),
            stage.steps,
        );
        phases.extend(s.phases.iter().map(|ph| crate::schedule::Phase {
            start: ph.start + stage.start,
            ..*ph
        }));
        end_lr = s.end_lr;
    }
    crate::schedule::Schedule {
        kind: "stages",
        phases,
        end_lr,
        total_steps: stages.last().map_or(0, Stage::end),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[run]
name = "t"
out_dir = "run"
[model]
kind = "llama"
vocab_size = 256
d_model = 32
n_layers = 1
n_heads = 4
n_kv_heads = 2
d_ff = 64
max_seq_len = 16
[data]
seq_len = 16
[[data.mixture.sources]]
name = "x"
weight = 1.0
source = { kind = "builtin" }
[optim]
kind = "adamw"
lr = 3e-3
[schedule]
kind = "cosine"
warmup_steps = 2
min_lr = 3e-4
[train]
batch_size = 2
"#;

    fn stages(extra: &str) -> Vec<Stage> {
        parse(&format!("{BASE}{extra}"), "t.toml", &[])
            .expect("valid")
            .expect("has stages")
    }

    #[test]
    fn a_recipe_without_stages_is_not_staged() {
        assert!(parse(BASE, "t.toml", &[]).expect("parses").is_none());
    }

    #[test]
    fn stages_follow_each_other_and_apply_their_changes() {
        let s = stages(
            r#"
[[stages]]
name = "one"
steps = 5
[[stages]]
name = "two"
steps = 7
set = { optim.lr = 1e-3, "train.batch_size" = 4 }
data = { train = { kind = "builtin" } }
schedule = { kind = "constant" }
"#,
        );
        assert_eq!(
            (s[0].start, s[0].end(), s[1].start, s[1].end()),
            (0, 5, 5, 12)
        );
        assert_eq!(s[0].recipe.train.max_steps, Some(5));
        assert_eq!(s[1].recipe.train.max_steps, Some(12));
        assert_eq!(s[0].recipe.optim.lr(), 3e-3);
        assert_eq!(s[1].recipe.optim.lr(), 1e-3);
        assert_eq!(s[1].recipe.train.batch_size, 4);
        // `data.train` replaces the base's mixture (the two exclude each other).
        assert!(s[0].recipe.data.mixture.is_some() && s[0].recipe.data.train.is_none());
        assert!(s[1].recipe.data.mixture.is_none() && s[1].recipe.data.train.is_some());
        assert_eq!(s[1].recipe.schedule.kind(), "constant");
        // The joined schedule: stage two's constant LR from its first step on.
        let lr = schedule(&s);
        assert_eq!(lr.total_steps, 12);
        assert_eq!(lr.lr(0), 3e-3 / 2.0);
        // Stage one's last step: the cosine two thirds of the way down (it reaches min_lr at
        // the milestone, where stage two begins).
        let cos = 3e-4 + (3e-3 - 3e-4) * 0.5 * (1.0 + (std::f64::consts::PI * 2.0 / 3.0).cos());
        assert!((lr.lr(4) - cos).abs() < 1e-15);
        assert_eq!(lr.lr(5), 1e-3);
        assert_eq!(lr.lr(11), 1e-3);
    }

    #[test]
    fn command_line_overrides_apply_to_every_stage_and_the_stage_wins() {
        let o = [
            Override::parse("optim.lr=2e-3").unwrap(),
            Override::parse("train.batch_size=8").unwrap(),
        ];
        let text = format!(
            "{BASE}\n[[stages]]\nname = \"a\"\nsteps = 3\n[[stages]]\nname = \"b\"\nsteps = 3\nset = {{ \"optim.lr\" = 1e-3 }}\n"
        );
        let s = parse(&text, "t.toml", &o).unwrap().unwrap();
        assert_eq!(s[0].recipe.optim.lr(), 2e-3);
        assert_eq!(s[1].recipe.optim.lr(), 1e-3);
        assert!(s.iter().all(|s| s.recipe.train.batch_size == 8));
    }
}
