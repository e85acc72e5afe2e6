//! Recipes: reading a TOML file (`configs/*.toml`), applying `--set key=value` overrides, and
//! turning every problem into one line that names the file, line and column (or the override),
//! the key path, and what was expected; then composing the sections into a recipe.
//!
//! This module owns no component's fields: `[model]` is `models::config`, `[data]`
//! `data::config`, `[optim]` `optim::config`, `[schedule]` `schedule`, `[peft]` `peft::config`,
//! `[prune]` `prune::config`, `[distill]` `distill::config`. It owns the training loop's own
//! sections (`[run]`, `[init]`, `[train]`, in `recipe.rs` and `classify.rs`), the checks that
//! span sections, and the `[[stages]]` file format (`stages.rs`). It imports the components and
//! `load.rs` (a recipe may take `[model]` from its `[init]` checkpoint); only `train/`, `sweep/`
//! and the CLI import it.
//!
//! The pipeline: parse the text with `toml_edit` (syntax errors carry a span) -> apply overrides
//! to the document -> deserialize into the typed `Recipe` through `serde_path_to_error` (unknown
//! keys and wrong types carry the key path) -> `Recipe::validate` (ranges, with the key path).
//! Locations are found by walking the key path in the parsed original text.

mod classify;
pub mod keys;
mod recipe;
pub mod stages;

pub use classify::*;
pub use recipe::*;
pub use stages::Stage;

// The sections a recipe composes, re-exported so that a training loop names one module for a
// recipe's parts. Each is defined beside the code it configures.
pub use crate::data::{
    Cifar100Labels, DataConfig, ImageDataConfig, ImageSourceConfig, MixtureConfig, MixtureSource,
    SourceConfig, Split, TokenDtype, CIFAR10_MEAN, CIFAR10_STD,
};
pub use crate::device::Precision;
pub use crate::distill::{DistillConfig, HiddenLoss, HiddenPair, KdLoss, TeacherPrecision};
pub use crate::models::{
    ClassifierConfig, Gpt2Config, LlamaConfig, ModelConfig, MoeConfig, Routing,
};
pub use crate::optim::OptimConfig;
pub use crate::peft::{OptimizerReset, PeftConfig, PeftKind};
pub use crate::prune::PruneConfig;
pub use crate::schedule::{
    DecayShape, MomentumSchedule, PhaseConfig, PhaseShape, ScheduleConfig, WeightDecaySchedule,
};
pub use crate::validate::{check, Invalid};

use crate::error::{one_line, Error, Result};
use std::path::Path;

/// One `--set key.path=value` override. The value is read as a TOML value when it parses as one
/// (`100`, `3e-4`, `true`, `"x"`, `[0.9, 0.95]`) and as a bare string otherwise (`cuda:0`).
#[derive(Debug, Clone)]
pub struct Override {
    pub path: Vec<String>,
    pub raw: String,
    value: toml_edit::Value,
}

impl Override {
    pub fn parse(text: &str) -> Result<Override> {
        let Some((key, value)) = text.split_once('=') else {
            return Err(Error::Recipe(format!(
                "--set {text}: expected key.path=value, e.g. train.max_steps=100"
            )));
        };
        let key = key.trim();
        let path: Vec<String> = key.split('.').map(|s| s.trim().to_string()).collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(Error::Recipe(format!(
                "--set {text}: empty component in key path {key:?}"
            )));
        }
        let value_text = value.trim();
        let value = match value_text.parse::<toml_edit::Value>() {
            Ok(v) => v,
            Err(_) => toml_edit::Value::from(value_text),
        };
        Ok(Override {
            path,
            raw: text.to_string(),
            value,
        })
    }

    fn key(&self) -> String {
        self.path.join(".")
    }
}

/// A recipe of either task, as its `[run] task` says.
#[derive(Debug, Clone)]
pub enum AnyRecipe {
    Pretrain(Recipe),
    Classify(ClassifyRecipe),
}

/// Reads, overrides and validates a pretraining recipe file.
pub fn load(path: &Path, overrides: &[Override]) -> Result<Recipe> {
    parse(&read(path)?, &path.display().to_string(), overrides)
}

/// Reads, overrides and validates a recipe file of any task (`[run] task`).
pub fn load_any(path: &Path, overrides: &[Override]) -> Result<AnyRecipe> {
    parse_any(&read(path)?, &path.display().to_string(), overrides)
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::Recipe(format!("{}: cannot read recipe: {e}", path.display())))
}

/// Parses pretraining recipe `text` that came from `file` (used in messages only).
pub fn parse(text: &str, file: &str, overrides: &[Override]) -> Result<Recipe> {
    Source::new(text, file, overrides)?.pretrain()
}

/// Parses recipe `text` of either task; `run.task` (after overrides) picks the schema.
pub fn parse_any(text: &str, file: &str, overrides: &[Override]) -> Result<AnyRecipe> {
    let src = Source::new(text, file, overrides)?;
    match src.task().as_deref() {
        Some("classify") => Ok(AnyRecipe::Classify(src.classify()?)),
        // Absent, "pretrain", or a misspelling that the pretraining schema reports.
        _ => Ok(AnyRecipe::Pretrain(src.pretrain()?)),
    }
}

/// A recipe's text parsed, with the overrides applied: what every recipe type is read from, so
/// that all of them report errors the same way (file:line:col or `--set`, key path, message).
struct Source<'a> {
    text: &'a str,
    file: &'a str,
    overrides: &'a [Override],
    original: toml_edit::ImDocument<String>,
    doc: toml_edit::DocumentMut,
}

impl<'a> Source<'a> {
    fn new(text: &'a str, file: &'a str, overrides: &'a [Override]) -> Result<Source<'a>> {
        let original: toml_edit::ImDocument<String> =
            toml_edit::ImDocument::parse(text.to_string()).map_err(|e| {
                let at = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
                Error::Recipe(format!(
                    "{file}:{}:{}: malformed TOML: {}",
                    at.0,
                    at.1,
                    one_line(e.message())
                ))
            })?;
        let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| {
            Error::Recipe(format!("{file}: malformed TOML: {}", one_line(e.message())))
        })?;
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        Ok(Source {
            text,
            file,
            overrides,
            original,
            doc,
        })
    }

    /// Where `key` (a dotted path) was set: the override, or file:line:col.
    fn locate_key(&self, key: &str) -> String {
        if let Some(o) = self
            .overrides
            .iter()
            .find(|o| key == o.key() || key.starts_with(&format!("{}.", o.key())))
        {
            return format!("--set {}", o.raw);
        }
        match locate(&self.original, self.text, key) {
            Some((line, col)) => format!("{}:{line}:{col}", self.file),
            None => self.file.to_string(),
        }
    }

    /// `run.task` as written (after overrides), when it is a string.
    fn task(&self) -> Option<String> {
        self.doc
            .get("run")?
            .get("task")?
            .as_str()
            .map(str::to_string)
    }

    /// Deserializes the document into `T`; unknown keys and wrong types name their key path.
    fn deserialize<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        let de = toml_edit::de::Deserializer::from(self.doc.clone());
        serde_path_to_error::deserialize(de).map_err(|e| {
            let mut key = e.path().to_string();
            let msg = one_line(e.inner().message());
            // An unknown key is reported at its parent; name the key itself.
            if let Some(unknown) = msg
                .strip_prefix("unknown field `")
                .and_then(|s| s.split('`').next())
            {
                if key == "." || key.is_empty() {
                    key = unknown.to_string();
                } else if !key.ends_with(&format!(".{unknown}")) && key != unknown {
                    key = format!("{key}.{unknown}");
                }
            } else if let Some(inner) = key_in_tagged_section::<T>(&self.doc, &key, &msg) {
                key = format!("{key}.{inner}");
            }
            if key == "." {
                key = "(top level)".to_string();
            }
            Error::Recipe(format!("{}: {key}: {msg}", self.locate_key(&key)))
        })
    }

    fn invalid(&self, inv: Invalid) -> Error {
        Error::Recipe(format!(
            "{}: {}: {}",
            self.locate_key(&inv.key),
            inv.key,
            inv.msg
        ))
    }

    fn pretrain(&self) -> Result<Recipe> {
        if self.task().as_deref() == Some("classify") {
            return Err(self.invalid(Invalid {
                key: "run.task".into(),
                msg: "expected a pretraining recipe (task = \"pretrain\"), got task = \"classify\""
                    .into(),
            }));
        }
        let file_recipe: RecipeFile = self.deserialize()?;
        let recipe = resolve_model(file_recipe, &|k: &str| self.locate_key(k))?;
        recipe.validate().map_err(|inv| self.invalid(inv))?;
        bytes_only_for_byte_models(&recipe).map_err(|inv| self.invalid(inv))?;
        Ok(recipe)
    }

    fn classify(&self) -> Result<ClassifyRecipe> {
        let recipe: ClassifyRecipe = self.deserialize()?;
        recipe.validate().map_err(|inv| self.invalid(inv))?;
        Ok(recipe)
    }
}

/// Byte-level data (`builtin`, `text`) trains a model whose token ids are bytes. A model from
/// `[init] from` that has a tokenizer of its own (a `tokenizer.json` beside it, or a Hugging
/// Face vocabulary other than 256) would be trained on ids that mean something else to it,
/// without a word: refused, naming the source.
fn bytes_only_for_byte_models(recipe: &Recipe) -> std::result::Result<(), Invalid> {
    let Some(init) = &recipe.init else {
        return Ok(());
    };
    let Ok(source) = crate::load::ModelSource::parse(&init.from) else {
        return Ok(()); // resolve_model has already reported it
    };
    let tokenizer = ["tokenizer.json", "tokenizer.model"]
        .iter()
        .map(|f| source.files_dir().join(f))
        .find(|p| p.is_file());
    let vocab = recipe.model.vocab_size();
    let why = if let Some(tokenizer) = tokenizer {
        format!("has its own tokenizer ({})", tokenizer.display())
    } else if matches!(source, crate::load::ModelSource::Hf(_)) && vocab != 256 {
        format!("has a vocabulary of {vocab} ids, not bytes")
    } else {
        return Ok(());
    };
    match recipe
        .data
        .sources()
        .into_iter()
        .find(|(_, src)| src.is_bytes())
    {
        Some((key, _)) => Err(Invalid {
            key,
            msg: format!(
                "byte-level data (one token per byte), but the model in init.from {why}: \
                 training it on bytes would be meaningless; name the tokenizer (tokenizer = ...) \
                 or give the data as its ids ({{ kind = \"tokens\", path = ... }}, made by \
                 trainer tokenize)"
            ),
        }),
        None => Ok(()),
    }
}

/// Fills in `[model]` from the `[init]` checkpoint when the recipe leaves it out, and checks that
/// the two agree when it gives both.
fn resolve_model(file: RecipeFile, locate_key: &dyn Fn(&str) -> String) -> Result<Recipe> {
    let from_init = match &file.init {
        Some(init) => {
            let dense = crate::load::ModelSource::parse(&init.from)
                .and_then(|src| src.model_config())
                .map_err(|e| {
                    Error::Recipe(format!("{}: init.from: {e}", locate_key("init.from")))
                })?;
            Some(match (&init.upcycle, dense) {
                (None, dense) => dense,
                (Some(up), ModelConfig::Llama(dense)) if dense.moe.is_none() => {
                    ModelConfig::Llama(LlamaConfig {
                        moe: Some(up.clone()),
                        ..dense
                    })
                }
                (Some(_), _) => {
                    return Err(Error::Recipe(format!(
                        "{}: init.upcycle: needs a dense Llama checkpoint in init.from",
                        locate_key("init.upcycle")
                    )))
                }
            })
        }
        None => None,
    };
    match (file.model.clone(), from_init) {
        (Some(model), Some(init_model)) if model != init_model => Err(Error::Recipe(format!(
            "{}: model: differs from the architecture of init.from ({init_model:?}); \
             leave [model] out to take the checkpoint's",
            locate_key("model")
        ))),
        (Some(model), _) | (None, Some(model)) => Ok(file.with_model(model)),
        (None, None) => Err(Error::Recipe(format!(
            "{}: model: missing section [model] (or an [init] from = checkpoint that carries one)",
            locate_key("model")
        ))),
    }
}

/// serde buffers a `kind`-tagged section (`[model]`, `[optim]`, `data.train`) before it picks
/// the variant, so the path serde_path_to_error reports for a bad value inside one stops at the
/// section. Finds the key the error is about: the one whose removal changes the error (values
/// are checked in order, before any missing key is reported).
fn key_in_tagged_section<T: serde::de::DeserializeOwned>(
    doc: &toml_edit::DocumentMut,
    section: &str,
    msg: &str,
) -> Option<String> {
    if !msg.starts_with("invalid ") {
        return None;
    }
    let parts: Vec<&str> = section.split('.').filter(|p| !p.is_empty()).collect();
    let mut item = doc.as_item();
    for p in &parts {
        item = item.get(p)?;
    }
    let table = item.as_table_like()?;
    table.get("kind")?;
    let keys: Vec<String> = table
        .iter()
        .map(|(k, _)| k.to_string())
        .filter(|k| k != "kind")
        .collect();
    keys.into_iter().find(|k| {
        let mut probe = doc.clone();
        let mut item = probe.as_item_mut();
        for p in &parts {
            item = match item.get_mut(p) {
                Some(i) => i,
                None => return false,
            };
        }
        if let Some(t) = item.as_table_like_mut() {
            t.remove(k);
        }
        match T::deserialize(toml_edit::de::Deserializer::from(probe)) {
            Ok(_) => true,
            Err(e) => one_line(e.message()) != msg,
        }
    })
}

/// The resolved recipe as TOML, as written into the run directory and printed by `validate`.
pub fn to_toml<T: serde::Serialize>(recipe: &T) -> String {
    let mut text =
        toml::to_string_pretty(recipe).unwrap_or_else(|e| format!("# cannot render recipe: {e}\n"));
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text
}

fn apply_override(doc: &mut toml_edit::DocumentMut, o: &Override) -> Result<()> {
    let mut table: &mut dyn toml_edit::TableLike = doc.as_table_mut();
    let (last, parents) = o.path.split_last().expect("override paths are non-empty");
    for part in parents {
        if table.get(part).is_none() {
            table.insert(part, toml_edit::Item::Table(toml_edit::Table::new()));
        }
        let item = table.get_mut(part).expect("just inserted");
        table = match item {
            toml_edit::Item::Table(t) => t,
            toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => t,
            _ => {
                return Err(Error::Recipe(format!(
                    "--set {}: {part} is not a table, cannot set {}",
                    o.raw,
                    o.key()
                )))
            }
        };
    }
    table.insert(last, toml_edit::Item::Value(o.value.clone()));
    Ok(())
}

/// Line and column (1-based) of the key at `key` (dotted path) in the original document.
fn locate(doc: &toml_edit::ImDocument<String>, text: &str, key: &str) -> Option<(usize, usize)> {
    let parts: Vec<&str> = key.split('.').filter(|p| !p.is_empty()).collect();
    let mut table: &dyn toml_edit::TableLike = doc.as_table();
    let mut best = None;
    for part in parts {
        // `phases[2]`: the third `[[...phases]]` table.
        let (name, index) = match part.strip_suffix(']').and_then(|p| p.split_once('[')) {
            Some((name, i)) => (name, i.parse::<usize>().ok()),
            None => (part, None),
        };
        let Some((k, next)) = table.get_key_value(name) else {
            break;
        };
        if let Some(span) = k.span() {
            best = Some(span.start);
        } else if let Some(span) = next.span() {
            best = Some(span.start);
        }
        let inner = match index {
            None => next.as_table_like(),
            Some(i) => next.as_array_of_tables().and_then(|a| a.get(i)).map(|t| {
                if let Some(span) = t.span() {
                    best = Some(span.start);
                }
                t as &dyn toml_edit::TableLike
            }),
        };
        let Some(inner) = inner else {
            break;
        };
        table = inner;
    }
    best.map(|offset| line_col(text, offset))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|s| s.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

#[cfg(test)]
mod schedule_tests;
#[cfg(test)]
mod tests;
