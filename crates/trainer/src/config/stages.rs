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

use super::{InitLoad, Override, Recipe};
use crate::error::{Error, Result};
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

/// A problem with one stage: the key path (`stages[i].steps`, ...) and what was expected.
type StageError = (String, String);

const STAGE_KEYS: &str = "name, steps, set, schedule or data";

/// Parses recipe `text` (from `file`, for messages); `None` when it has no `stages` key. Syntax
/// errors are left to `config::parse`, which reports them with their location.
pub fn parse(text: &str, file: &str, overrides: &[Override]) -> Result<Option<Vec<Stage>>> {
    let Ok(mut base) = text.parse::<toml_edit::DocumentMut>() else {
        return Ok(None);
    };
    let Some(item) = base.remove("stages") else {
        return Ok(None);
    };
    let bad = |key: &str, msg: &str| Error::Recipe(format!("{file}: {key}: {msg}"));
    let tables = stage_tables(item).map_err(|msg| bad("stages", msg))?;
    let given_steps = run_length(&base, overrides).map_err(|(k, m)| bad(k, m))?;
    let mut stages: Vec<Stage> = Vec::new();
    let mut start = 0i64;
    for (i, table) in tables.iter().enumerate() {
        let at = format!("stages[{i}]");
        let at_stage = |(key, msg): StageError| bad(&key, &msg);
        let (name, steps) = name_and_steps(table, &stages, &at).map_err(at_stage)?;
        let doc = stage_document(&base, table, &at).map_err(at_stage)?;
        let end = start + steps;
        let all = stage_overrides(table, overrides, &at, end).map_err(at_stage)?;
        let label = format!("{file} (stage {name:?})");
        let recipe = super::parse(&doc.to_string(), &label, &all)?;
        check_stage(&recipe, &stages, steps, &at, &name).map_err(at_stage)?;
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

/// The `[[stages]]` tables (or an inline array of tables), at least one.
fn stage_tables(item: toml_edit::Item) -> std::result::Result<Vec<toml_edit::Table>, &'static str> {
    let tables: Vec<toml_edit::Table> = match item {
        toml_edit::Item::ArrayOfTables(a) => a.into_iter().collect(),
        toml_edit::Item::Value(toml_edit::Value::Array(a)) => {
            let mut out = Vec::new();
            for v in a.iter() {
                match v.as_inline_table() {
                    Some(t) => out.push(t.clone().into_table()),
                    None => return Err("expected [[stages]] tables"),
                }
            }
            out
        }
        _ => return Err("expected [[stages]] tables"),
    };
    if tables.is_empty() {
        return Err("expected at least one [[stages]] table (or leave the key out)");
    }
    Ok(tables)
}

/// The length of the run as the recipe gives it, if it does: train.max_steps (as written or
/// --set) must agree with the stages' sum, and train.max_tokens is refused.
fn run_length(
    base: &toml_edit::DocumentMut,
    overrides: &[Override],
) -> std::result::Result<Option<i64>, (&'static str, &'static str)> {
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
        return Err((
            "train.max_tokens",
            "a recipe with [[stages]] is as long as its stages: leave out train.max_tokens",
        ));
    }
    Ok(given_steps)
}

/// A stage's `name` (unique among the `earlier` stages) and `steps`, after checking that it has
/// only the keys a stage takes. Errors: (key suffix after `stages[i]`, message).
fn name_and_steps(
    table: &toml_edit::Table,
    earlier: &[Stage],
    at: &str,
) -> std::result::Result<(String, i64), StageError> {
    for (key, _) in table.iter() {
        if !["name", "steps", "set", "schedule", "data"].contains(&key) {
            return Err((
                format!("{at}.{key}"),
                format!("unknown key; a stage takes {STAGE_KEYS}"),
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
            return Err((
                format!("{at}.name"),
                "expected a name of letters, digits, '_' or '-'".into(),
            ))
        }
        None => {
            return Err((
                format!("{at}.name"),
                "missing; every stage has a name".into(),
            ))
        }
    };
    if earlier.iter().any(|s| s.name == name) {
        return Err((
            format!("{at}.name"),
            format!("{name:?} names an earlier stage too; stage names are unique"),
        ));
    }
    let steps = match table.get("steps").map(|v| v.as_integer()) {
        Some(Some(n)) if n > 0 => n,
        Some(_) => {
            return Err((
                format!("{at}.steps"),
                "expected a positive number of steps".into(),
            ))
        }
        None => {
            return Err((
                format!("{at}.steps"),
                "missing; every stage has a length".into(),
            ))
        }
    };
    Ok((name, steps))
}

/// The stage's document: the base recipe with the stage's whole-section replacements
/// (`schedule` replaces `[schedule]`; `data`'s keys replace those of `[data]`).
fn stage_document(
    base: &toml_edit::DocumentMut,
    table: &toml_edit::Table,
    at: &str,
) -> std::result::Result<toml_edit::DocumentMut, StageError> {
    let mut doc = base.clone();
    if let Some(schedule) = table.get("schedule") {
        let Some(t) = as_table(schedule) else {
            return Err((
                format!("{at}.schedule"),
                "expected a table (a [schedule])".into(),
            ));
        };
        doc.insert("schedule", toml_edit::Item::Table(t));
    }
    if let Some(data) = table.get("data") {
        let Some(t) = as_table(data) else {
            return Err((
                format!("{at}.data"),
                "expected a table of [data] keys".into(),
            ));
        };
        let Some(target) = doc.get_mut("data").and_then(|d| d.as_table_like_mut()) else {
            return Err(("data".into(), "missing section [data]".into()));
        };
        for (key, value) in t.iter() {
            // `train` and `mixture` exclude each other: giving one drops the other.
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
    Ok(doc)
}

/// The overrides of a stage, in the order they apply: the command line's `--set`, then the
/// stage's own `set`, then its length (`train.max_steps = end`).
fn stage_overrides(
    table: &toml_edit::Table,
    overrides: &[Override],
    at: &str,
    end: i64,
) -> std::result::Result<Vec<Override>, StageError> {
    let mut all: Vec<Override> = overrides.to_vec();
    if let Some(set) = table.get("set") {
        let Some(t) = as_table(set) else {
            return Err((
                format!("{at}.set"),
                "expected a table of key = value, e.g. set = { \"optim.lr\" = 1e-4 }".into(),
            ));
        };
        let mut leaves = Vec::new();
        flatten(&t, "", &mut leaves);
        for (key, value) in leaves {
            let mut o = Override::parse(&format!("{key}={value}")).map_err(|_| {
                (
                    format!("{at}.set.{key}"),
                    "expected key.path = value".into(),
                )
            })?;
            o.raw = format!("{at}.set {key} = {value}");
            all.push(o);
        }
    }
    let length = Override::parse(&format!("train.max_steps={end}")).map_err(|_| {
        (
            "train.max_steps".to_string(),
            "expected an integer".to_string(),
        )
    })?;
    all.push(length);
    Ok(all)
}

/// What a resolved stage must satisfy beyond its own recipe's checks: its schedule fits the
/// stage, its files exist now (not when training reaches it), no `load = "full"`, and the same
/// run directory as the first stage.
fn check_stage(
    recipe: &Recipe,
    earlier: &[Stage],
    steps: i64,
    at: &str,
    name: &str,
) -> std::result::Result<(), StageError> {
    recipe
        .schedule
        .check_lengths(recipe.optim.lr(), steps)
        .map_err(|inv| {
            (
                format!("{at}: {}", inv.key),
                format!("{} (the stage has {steps} steps)", inv.msg),
            )
        })?;
    check_files(recipe).map_err(|(key, path)| {
        (
            format!("{at} ({name}): {key}.path"),
            format!("no such file: {}", path.display()),
        )
    })?;
    if recipe
        .init
        .as_ref()
        .is_some_and(|i| i.load == InitLoad::Full)
    {
        return Err((
            "init.load".into(),
            "\"full\" cannot be combined with [[stages]] (the stages count steps from 0); use load = \"model\"".into(),
        ));
    }
    match earlier.first() {
        Some(first) if recipe.run.out_dir != first.recipe.run.out_dir => Err((
            format!("{at}.set.run.out_dir"),
            "every stage writes the same run directory; set run.out_dir outside [[stages]]".into(),
        )),
        _ => Ok(()),
    }
}

/// The first file-backed data source of `recipe` whose file is missing: (key, path).
fn check_files(recipe: &Recipe) -> std::result::Result<(), (String, std::path::PathBuf)> {
    for (key, src) in recipe.data.sources() {
        if let Some(path) = src.path() {
            if !path.is_file() {
                return Err((key, path.to_path_buf()));
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
