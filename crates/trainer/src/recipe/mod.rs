//! Recipes: reading a TOML file, applying `--set key=value` overrides, and turning every problem
//! into one line that names the file, line and column (or the override), the key path, and what
//! was expected.
//!
//! The pipeline: parse the text with `toml_edit` (syntax errors carry a span) -> apply overrides
//! to the document -> deserialize into the typed `Recipe` through `serde_path_to_error` (unknown
//! keys and wrong types carry the key path) -> `Recipe::validate` (ranges, with the key path).
//! Locations are found by walking the key path in the parsed original text.

mod schema;

pub use schema::*;

use crate::error::{Error, Result};
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
            return Err(Error::Recipe(format!("--set {text}: empty component in key path {key:?}")));
        }
        let value_text = value.trim();
        let value = match value_text.parse::<toml_edit::Value>() {
            Ok(v) => v,
            Err(_) => toml_edit::Value::from(value_text),
        };
        Ok(Override { path, raw: text.to_string(), value })
    }

    fn key(&self) -> String {
        self.path.join(".")
    }
}

/// Reads, overrides and validates a recipe file.
pub fn load(path: &Path, overrides: &[Override]) -> Result<Recipe> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Recipe(format!("{}: cannot read recipe: {e}", path.display()))
    })?;
    parse(&text, &path.display().to_string(), overrides)
}

/// Parses recipe `text` that came from `file` (used in messages only).
pub fn parse(text: &str, file: &str, overrides: &[Override]) -> Result<Recipe> {
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
    let locate_key = |key: &str| -> String {
        if let Some(o) = overrides.iter().find(|o| key == o.key() || key.starts_with(&format!("{}.", o.key())))
        {
            return format!("--set {}", o.raw);
        }
        match locate(&original, text, key) {
            Some((line, col)) => format!("{file}:{line}:{col}"),
            None => file.to_string(),
        }
    };

    let de = toml_edit::de::Deserializer::from(doc.clone());
    let file_recipe: RecipeFile = serde_path_to_error::deserialize(de).map_err(|e| {
        let mut key = e.path().to_string();
        let msg = one_line(e.inner().message());
        // An unknown key is reported at its parent; name the key itself.
        if let Some(unknown) = msg.strip_prefix("unknown field `").and_then(|s| s.split('`').next()) {
            if key == "." || key.is_empty() {
                key = unknown.to_string();
            } else if !key.ends_with(&format!(".{unknown}")) && key != unknown {
                key = format!("{key}.{unknown}");
            }
        } else if let Some(inner) = key_in_tagged_section(&doc, &key, &msg) {
            key = format!("{key}.{inner}");
        }
        if key == "." {
            key = "(top level)".to_string();
        }
        Error::Recipe(format!("{}: {key}: {msg}", locate_key(&key)))
    })?;
    let recipe = resolve_model(file_recipe, &locate_key)?;
    recipe
        .validate()
        .map_err(|inv| Error::Recipe(format!("{}: {}: {}", locate_key(&inv.key), inv.key, inv.msg)))?;
    Ok(recipe)
}

/// Fills in `[model]` from the `[init]` checkpoint when the recipe leaves it out, and checks that
/// the two agree when it gives both.
fn resolve_model(file: RecipeFile, locate_key: &dyn Fn(&str) -> String) -> Result<Recipe> {
    let from_init = match &file.init {
        Some(init) => {
            let dense = crate::models::load::ModelSource::parse(&init.from)
                .and_then(|src| src.model_config())
                .map_err(|e| Error::Recipe(format!("{}: init.from: {e}", locate_key("init.from"))))?;
            Some(match (&init.upcycle, dense) {
                (None, dense) => dense,
                (Some(up), ModelConfig::Llama { moe: None, vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff, max_seq_len, rope_theta, norm_eps, tie_embeddings }) => {
                    ModelConfig::Llama { moe: Some(up.clone()), vocab_size, d_model, n_layers, n_heads, n_kv_heads, d_ff, max_seq_len, rope_theta, norm_eps, tie_embeddings }
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
fn key_in_tagged_section(
    doc: &toml_edit::DocumentMut,
    section: &str,
    msg: &str,
) -> Option<String> {
    use serde::Deserialize;
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
    let keys: Vec<String> =
        table.iter().map(|(k, _)| k.to_string()).filter(|k| k != "kind").collect();
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
        match RecipeFile::deserialize(toml_edit::de::Deserializer::from(probe)) {
            Ok(_) => true,
            Err(e) => one_line(e.message()) != msg,
        }
    })
}

/// The resolved recipe as TOML, as written into the run directory and printed by `validate`.
pub fn to_toml(recipe: &Recipe) -> String {
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
    let mut item: &toml_edit::Item = doc.as_item();
    let mut best = None;
    for part in parts {
        let Some((k, next)) = item.as_table_like().and_then(|t| t.get_key_value(part)) else {
            break;
        };
        if let Some(span) = k.span() {
            best = Some(span.start);
        } else if let Some(span) = next.span() {
            best = Some(span.start);
        }
        item = next;
    }
    best.map(|offset| line_col(text, offset))
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|s| s.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests;
