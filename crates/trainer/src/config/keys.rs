//! The recipe key reference (`trainer keys`): every key a recipe may hold, with its type, default
//! and meaning, generated from the config types themselves, so that it cannot fall behind them.
//!
//! Every config type a recipe reaches derives `schemars::JsonSchema`; schemars reads the same
//! serde attributes that deserialization obeys (`tag = "kind"`, `rename_all`, `default`,
//! `default = "fn"`, `deny_unknown_fields`) and takes each doc comment as the description. This
//! module walks the JSON schema of `Recipe` (task `pretrain`) or `ClassifyRecipe` (task
//! `classify`) into a flat list of keys: tagged registries (`[optim] kind = "adamw"`) list each
//! variant's keys under a condition, arrays of tables use `[]` (`schedule.phases[].shape`), maps
//! of named tables `<name>` (`data.valid_sets.<name>.kind`).
//!
//! One trap: schemars leaves out a default that the field's `skip_serializing_if` would skip
//! (the resolved recipe omits defaults). A field that is not an `Option` and has a
//! `skip_serializing_if` therefore carries `#[schemars(!skip_serializing_if)]`, so that its
//! default shows; the test `keys_every_optional_key_has_a_default` fails where one is missing.

use super::{ClassifyRecipe, Recipe, Task};
use serde_json::{Map, Value};
use std::fmt::Write as _;

/// One key of a recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    /// Dotted path: `optim.lr`, `data.mixture.sources[].weight`, `data.valid_sets.<name>.kind`.
    pub path: String,
    /// The variants of tagged registries the key belongs to, outermost first (empty: always).
    pub when: Vec<Condition>,
    /// `integer`, `number`, `string`, `bool`, `table`, `array of ...`, `one of "a" | "b"`.
    pub ty: String,
    /// Must be given whenever its table is.
    pub required: bool,
    /// The default, as TOML; None: required, or absent when not given.
    pub default: Option<String>,
    /// The field's doc comment (or its type's), on one line.
    pub meaning: String,
    /// For a key that is one of several strings: each value with its doc comment.
    pub choices: Vec<(String, String)>,
}

/// `tag = "value"`: the key belongs to this variant of a tagged registry.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// The tag's key path, e.g. `optim.kind`.
    pub tag: String,
    pub value: String,
    /// The variant's doc comment, on one line.
    pub meaning: String,
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} = \"{}\"", self.tag, self.value)
    }
}

/// Every key of one task's recipe, grouped by section (`run`, `model`, ...) in reading order.
#[derive(Debug, Clone)]
pub struct Reference {
    pub task: Task,
    pub keys: Vec<Key>,
}

/// The reference of one task's recipe.
pub fn reference(task: Task) -> Reference {
    let schema = match task {
        Task::Pretrain => schemars::schema_for!(Recipe),
        Task::Classify => schemars::schema_for!(ClassifyRecipe),
    };
    Reference::from_schema(task, schema.as_value())
}

/// The order sections are printed in; a section not named here follows, alphabetically.
const SECTION_ORDER: &[&str] = &[
    "run", "init", "model", "data", "optim", "schedule", "train", "peft", "prune", "distill",
];

impl Reference {
    /// Walks a recipe's JSON schema (as schemars writes it: `$ref`s into `$defs`).
    pub fn from_schema(task: Task, root: &Value) -> Reference {
        let mut w = Walker {
            root,
            keys: Vec::new(),
        };
        w.properties(root, "", &[], None, None);
        let rank = |k: &Key| {
            let section = k.path.split(['.', '[']).next().unwrap_or("");
            SECTION_ORDER
                .iter()
                .position(|s| *s == section)
                .unwrap_or(SECTION_ORDER.len())
        };
        // A stable sort: the walk's order within a section stays.
        let mut keys = w.keys;
        keys.sort_by(|a, b| {
            rank(a)
                .cmp(&rank(b))
                .then_with(|| section_of(a).cmp(section_of(b)))
        });
        Reference { task, keys }
    }

    /// The key at `path` in the variant `when` (conditions written as `optim.kind = "adamw"`);
    /// with no conditions, the first key at `path`.
    pub fn find(&self, path: &str, when: &[&str]) -> Option<&Key> {
        self.keys.iter().find(|k| {
            k.path == path
                && when
                    .iter()
                    .all(|c| k.when.iter().any(|w| w.to_string() == *c))
        })
    }
}

fn section_of(k: &Key) -> &str {
    k.path.split(['.', '[']).next().unwrap_or("")
}

struct Walker<'a> {
    root: &'a Value,
    keys: Vec<Key>,
}

impl<'a> Walker<'a> {
    /// Follows `$ref: "#/$defs/Name"`.
    fn resolve(&self, s: &'a Value) -> &'a Value {
        let target = s
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix("#/$defs/"))
            .and_then(|name| self.root.get("$defs")?.get(name));
        match target {
            Some(t) => self.resolve(t),
            None => s,
        }
    }

    /// An `Option<T>` field's schema is `anyOf: [T, null]`: T, resolved.
    fn inner(&self, s: &'a Value) -> &'a Value {
        if let Some(any) = s.get("anyOf").and_then(Value::as_array) {
            let non_null: Vec<&Value> = any.iter().filter(|v| !is_null_type(v)).collect();
            if let [one] = non_null[..] {
                return self.resolve(one);
            }
        }
        self.resolve(s)
    }

    /// The keys of a table (struct or one variant): required ones in declaration order, then
    /// the optional ones alphabetically. `skip` is the variant's tag, already listed.
    fn properties(
        &mut self,
        obj: &'a Value,
        prefix: &str,
        when: &[Condition],
        default: Option<&'a Value>,
        skip: Option<&str>,
    ) {
        let Some(props) = obj.get("properties").and_then(Value::as_object) else {
            return;
        };
        let required: Vec<&str> = obj
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut names: Vec<&str> = required
            .iter()
            .copied()
            .filter(|n| props.contains_key(*n))
            .collect();
        // `Map` without serde_json's preserve_order is sorted.
        names.extend(
            props
                .keys()
                .map(String::as_str)
                .filter(|n| !required.contains(n)),
        );
        for name in names {
            if Some(name) == skip {
                continue;
            }
            let Some(p) = props.get(name) else { continue };
            let path = join(prefix, name);
            let child_default = default.and_then(|d| d.get(name));
            self.field(p, path, when, required.contains(&name), child_default);
        }
    }

    fn field(
        &mut self,
        s: &'a Value,
        path: String,
        when: &[Condition],
        required: bool,
        inherited: Option<&'a Value>,
    ) {
        let inner = self.inner(s);
        let default = s.get("default").or(inherited).filter(|d| !d.is_null());
        let meaning = description(s)
            .or_else(|| description(inner))
            .unwrap_or_default();
        let key = |ty: String, choices: Vec<(String, String)>| Key {
            path: path.clone(),
            when: when.to_vec(),
            ty,
            required: required && default.is_none(),
            default: default.map(toml_value),
            meaning: meaning.clone(),
            choices,
        };
        if let Some(variants) = self.tagged_variants(inner) {
            self.keys.push(key("table".into(), Vec::new()));
            self.registry(&path, &variants, when, default);
        } else if is_struct(inner) {
            self.keys.push(key("table".into(), Vec::new()));
            self.properties(inner, &path, when, default, None);
        } else if let Some(items) = self.table_items(inner) {
            self.keys.push(key("array of tables".into(), Vec::new()));
            self.table_body(items, &format!("{path}[]"), when);
        } else if let Some(values) = self.map_values(inner) {
            self.keys
                .push(key("table of named tables".into(), Vec::new()));
            self.table_body(values, &format!("{path}.<name>"), when);
        } else {
            let choices = self.choices(inner);
            let ty = self.type_name(inner);
            self.keys.push(key(ty, choices));
        }
    }

    /// The keys of a table that is an array element or a map value (no defaults of its own).
    fn table_body(&mut self, s: &'a Value, path: &str, when: &[Condition]) {
        match self.tagged_variants(s) {
            Some(variants) => self.registry(path, &variants, when, None),
            None => self.properties(s, path, when, None, None),
        }
    }

    /// A registry tagged by `kind`: the tag, then each variant's keys under its condition.
    fn registry(
        &mut self,
        path: &str,
        variants: &[(String, &'a Value)],
        when: &[Condition],
        default: Option<&'a Value>,
    ) {
        let tag_path = join(path, TAG);
        let tag_default = default.and_then(|d| d.get(TAG));
        self.keys.push(Key {
            path: tag_path.clone(),
            when: when.to_vec(),
            ty: one_of(variants.iter().map(|(v, _)| v.as_str())),
            required: tag_default.is_none(),
            default: tag_default.map(toml_value),
            meaning: "Selects the kind; each kind's own keys follow under `when ... kind = ...`."
                .into(),
            choices: variants
                .iter()
                .map(|(v, s)| (v.clone(), description(s).unwrap_or_default()))
                .collect(),
        });
        for (value, schema) in variants {
            let mut inner_when = when.to_vec();
            inner_when.push(Condition {
                tag: tag_path.clone(),
                value: value.clone(),
                meaning: description(schema).unwrap_or_default(),
            });
            let variant_default =
                default.filter(|d| d.get(TAG).and_then(Value::as_str) == Some(value.as_str()));
            self.properties(schema, path, &inner_when, variant_default, Some(TAG));
        }
    }

    /// `oneOf` tables that each fix `kind` to a constant: (kind, table) per variant.
    fn tagged_variants(&self, s: &'a Value) -> Option<Vec<(String, &'a Value)>> {
        let one_of = s.get("oneOf")?.as_array()?;
        one_of
            .iter()
            .map(|v| {
                let v = self.resolve(v);
                let tag = v.get("properties")?.get(TAG)?.get("const")?.as_str()?;
                Some((tag.to_string(), v))
            })
            .collect()
    }

    /// An array whose items are tables: the item schema.
    fn table_items(&self, s: &'a Value) -> Option<&'a Value> {
        if type_of(s) != Some("array") {
            return None;
        }
        let items = self.resolve(s.get("items")?);
        (is_struct(items) || self.tagged_variants(items).is_some()).then_some(items)
    }

    /// A table of named tables (`BTreeMap<String, T>`): the value schema.
    fn map_values(&self, s: &'a Value) -> Option<&'a Value> {
        if type_of(s) != Some("object") || s.get("properties").is_some() {
            return None;
        }
        let values = self.resolve(s.get("additionalProperties")?);
        values.is_object().then_some(values)
    }

    /// A string enum's values with their doc comments.
    fn choices(&self, s: &'a Value) -> Vec<(String, String)> {
        match s.get("oneOf").and_then(Value::as_array) {
            Some(variants) => variants
                .iter()
                .filter_map(|v| {
                    let v = self.resolve(v);
                    let c = v.get("const")?.as_str()?;
                    Some((c.to_string(), description(v).unwrap_or_default()))
                })
                .collect(),
            None => Vec::new(),
        }
    }

    fn type_name(&self, s: &'a Value) -> String {
        let s = self.inner(s);
        if let Some(values) = enum_values(self, s) {
            return one_of(values.iter().map(String::as_str));
        }
        match type_of(s) {
            Some("integer") => "integer".into(),
            Some("number") => "number".into(),
            Some("string") => "string".into(),
            Some("boolean") => "bool".into(),
            Some("array") => {
                let items = s
                    .get("items")
                    .map(|i| self.type_name(i))
                    .unwrap_or_else(|| "value".into());
                let plural = if items.starts_with("one of") {
                    format!("({items})")
                } else {
                    format!("{items}s")
                };
                let min = s.get("minItems").and_then(Value::as_u64);
                let max = s.get("maxItems").and_then(Value::as_u64);
                match (min, max) {
                    (Some(a), Some(b)) if a == b => format!("array of {a} {plural}"),
                    _ => format!("array of {plural}"),
                }
            }
            Some("object") => "table".into(),
            _ => "value".into(),
        }
    }
}

const TAG: &str = "kind";

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn is_null_type(v: &Value) -> bool {
    v.get("type").and_then(Value::as_str) == Some("null")
}

/// The schema's type, ignoring `null` (`type: ["integer", "null"]` is an `Option<i64>`).
fn type_of(s: &Value) -> Option<&str> {
    match s.get("type")? {
        Value::String(t) => Some(t),
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).find(|t| *t != "null"),
        _ => None,
    }
}

fn is_struct(s: &Value) -> bool {
    type_of(s) == Some("object") && s.get("properties").is_some()
}

/// The values of a string enum: `enum: [...]`, or `oneOf` of `const`s (when variants have docs).
fn enum_values(w: &Walker<'_>, s: &Value) -> Option<Vec<String>> {
    if let Some(values) = s.get("enum").and_then(Value::as_array) {
        return values
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect();
    }
    s.get("oneOf")?
        .as_array()?
        .iter()
        .map(|v| w.resolve(v).get("const")?.as_str().map(str::to_string))
        .collect()
}

fn one_of<'s>(values: impl Iterator<Item = &'s str>) -> String {
    let quoted: Vec<String> = values.map(|v| format!("\"{v}\"")).collect();
    format!("one of {}", quoted.join(" | "))
}

/// A doc comment on one line (schemars keeps the comment's line breaks).
fn description(s: &Value) -> Option<String> {
    let d = s.get("description")?.as_str()?;
    let one_line = d.split_whitespace().collect::<Vec<_>>().join(" ");
    (!one_line.is_empty()).then_some(one_line)
}

/// A default value written as TOML.
fn toml_value(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) if !n.is_f64() => i.to_string(),
            (_, Some(u), _) if !n.is_f64() => u.to_string(),
            (_, _, Some(f)) => toml_float(f),
            _ => n.to_string(),
        },
        Value::String(s) => Value::String(s.clone()).to_string(),
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(toml_value).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(map) => toml_table(map),
    }
}

fn toml_table(map: &Map<String, Value>) -> String {
    if map.is_empty() {
        return "{}".into();
    }
    // The tag first, as recipes write it.
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_by_key(|(k, _)| k.as_str() != TAG);
    let entries: Vec<String> = entries
        .iter()
        .map(|(k, v)| format!("{k} = {}", toml_value(v)))
        .collect();
    format!("{{ {} }}", entries.join(", "))
}

/// A float as TOML writes one: always with a `.` or an exponent.
fn toml_float(f: f64) -> String {
    if f.is_nan() {
        "nan".into()
    } else if f.is_infinite() {
        if f > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        }
    } else if f == 0.0 || (f.abs() >= 1e-3 && f.abs() < 1e15) {
        let s = format!("{f}");
        if s.contains('.') {
            s
        } else {
            format!("{s}.0")
        }
    } else {
        format!("{f:e}")
    }
}

// ---- rendering ------------------------------------------------------------------------------

/// What a key's default column says.
fn default_text(k: &Key) -> String {
    match (&k.default, k.required) {
        (Some(d), _) => d.clone(),
        (None, true) => "required".into(),
        (None, false) => "optional".into(),
    }
}

/// The meaning with the choices of a string enum appended.
fn full_meaning(k: &Key) -> String {
    let mut m = k.meaning.clone();
    let documented: Vec<String> = k
        .choices
        .iter()
        .filter(|(_, d)| !d.is_empty())
        .map(|(v, d)| {
            let stop = if d.ends_with('.') { "" } else { "." };
            format!("`\"{v}\"`: {d}{stop}")
        })
        .collect();
    if !documented.is_empty() {
        if !m.is_empty() {
            m.push(' ');
        }
        m.push_str(&documented.join(" "));
    }
    m
}

fn task_name(task: Task) -> &'static str {
    match task {
        Task::Pretrain => "pretrain",
        Task::Classify => "classify",
    }
}

const PREAMBLE: &str = "Generated from the config types (`trainer keys`). \"required\": must be \
given whenever its table is; \"optional\": may be left out (absent); otherwise the default is shown. \
Keys under a `kind = \"...\"` line belong to that kind only.";

/// Plain text for a terminal: one block per section, each key on a line with its type and
/// default, its meaning indented below.
pub fn render_text(refs: &[Reference]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{PREAMBLE}");
    for r in refs {
        let _ = writeln!(
            out,
            "\n==== task = \"{}\" ({}) ====",
            task_name(r.task),
            recipe_kind(r.task)
        );
        let mut section = "";
        let mut when: &[Condition] = &[];
        for k in &r.keys {
            if section_of(k) != section {
                section = section_of(k);
                when = &[];
                let _ = writeln!(out, "\n[{section}]");
            }
            if k.when != when {
                let common = common_prefix(when, &k.when);
                for (depth, c) in k.when.iter().enumerate().skip(common) {
                    let pad = "  ".repeat(depth + 1);
                    let _ = writeln!(out, "{pad}when {c}:");
                }
                when = &k.when;
            }
            let pad = "  ".repeat(k.when.len() + 1);
            let _ = writeln!(out, "{pad}{}  ({}; {})", k.path, k.ty, default_text(k));
            let meaning = full_meaning(k);
            if !meaning.is_empty() {
                let _ = writeln!(out, "{pad}    {meaning}");
            }
        }
    }
    out
}

/// Markdown (docs/recipe-keys.md): a heading per task and section, a table per variant.
pub fn render_markdown(refs: &[Reference]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# Recipe keys\n\n<!-- Generated by `trainer keys --format markdown > docs/recipe-keys.md`; do not edit. -->\n\n{PREAMBLE}");
    for r in refs {
        let _ = writeln!(
            out,
            "\n## task = \"{}\" ({})",
            task_name(r.task),
            recipe_kind(r.task)
        );
        let mut section = "";
        let mut when: Option<&[Condition]> = None;
        for k in &r.keys {
            if section_of(k) != section {
                section = section_of(k);
                when = None;
                let _ = writeln!(out, "\n### [{section}]");
            }
            if when != Some(&k.when[..]) {
                let common = when.map_or(0, |w| common_prefix(w, &k.when));
                out.push('\n');
                for c in k.when.iter().skip(common) {
                    let _ = writeln!(out, "**When `{c}`:**\n");
                }
                let _ = writeln!(out, "| Key | Type | Default | Meaning |\n|---|---|---|---|");
                when = Some(&k.when);
            }
            let _ = writeln!(
                out,
                "| `{}` | {} | {} | {} |",
                k.path,
                md_cell(&k.ty),
                md_code(&default_text(k), k.default.is_some()),
                md_cell(&full_meaning(k))
            );
        }
    }
    out
}

fn recipe_kind(task: Task) -> &'static str {
    match task {
        Task::Pretrain => "language-model recipes",
        Task::Classify => "image-classification recipes",
    }
}

fn common_prefix(a: &[Condition], b: &[Condition]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|")
}

fn md_code(s: &str, code: bool) -> String {
    if code {
        format!("`{}`", s.replace('|', "\\|"))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both() -> Vec<Reference> {
        vec![reference(Task::Pretrain), reference(Task::Classify)]
    }

    #[test]
    fn keys_every_key_has_a_meaning() {
        let mut missing = Vec::new();
        for r in both() {
            for k in &r.keys {
                // A string enum whose every value is documented says what it means.
                let choices_say =
                    !k.choices.is_empty() && k.choices.iter().all(|(_, d)| !d.is_empty());
                if k.meaning.is_empty() && !choices_say {
                    missing.push(format!("{} {}", task_name(r.task), k.path));
                }
                for c in &k.when {
                    if c.meaning.is_empty() {
                        missing.push(format!("{} variant {c}", task_name(r.task)));
                    }
                }
            }
        }
        missing.dedup();
        assert!(
            missing.is_empty(),
            "add a doc comment (one line: what it means, in what unit) to:\n{}",
            missing.join("\n")
        );
    }

    #[test]
    fn keys_every_optional_key_has_a_default() {
        // Not required and no default must mean an `Option` (absent), never a default hidden by
        // `skip_serializing_if` (see the module doc).
        let mut hidden = Vec::new();
        for r in both() {
            let schema = match r.task {
                Task::Pretrain => schemars::schema_for!(Recipe),
                Task::Classify => schemars::schema_for!(ClassifyRecipe),
            };
            hidden.extend(
                optional_without_null(&schema)
                    .into_iter()
                    .map(|p| format!("{} {p}", task_name(r.task))),
            );
        }
        assert!(
            hidden.is_empty(),
            "these fields have a default that schemars drops (skip_serializing_if): add \
             #[schemars(!skip_serializing_if)] to them:\n{}",
            hidden.join("\n")
        );
    }

    /// Properties, anywhere in the schema, that are not required, have no default and do not
    /// admit null.
    fn optional_without_null(schema: &schemars::Schema) -> Vec<String> {
        fn visit(v: &Value, at: &str, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::Object(props)) = m.get("properties") {
                        let required: Vec<&str> = m
                            .get("required")
                            .and_then(Value::as_array)
                            .map(|r| r.iter().filter_map(Value::as_str).collect())
                            .unwrap_or_default();
                        for (name, p) in props {
                            let nullable = p.get("anyOf").is_some()
                                || p.get("type")
                                    .and_then(Value::as_array)
                                    .is_some_and(|t| t.iter().any(|x| x.as_str() == Some("null")));
                            if !required.contains(&name.as_str())
                                && p.get("default").is_none()
                                && !nullable
                            {
                                out.push(format!("{at}.{name}"));
                            }
                        }
                    }
                    for (k, child) in m {
                        visit(child, &format!("{at}/{k}"), out);
                    }
                }
                Value::Array(items) => {
                    for (i, child) in items.iter().enumerate() {
                        visit(child, &format!("{at}/{i}"), out);
                    }
                }
                _ => {}
            }
        }
        let mut out = Vec::new();
        visit(schema.as_value(), "", &mut out);
        out
    }

    fn default_of(r: &Reference, path: &str, when: &[&str]) -> Option<String> {
        r.find(path, when)
            .unwrap_or_else(|| panic!("no key {path} {when:?}"))
            .default
            .clone()
    }

    #[test]
    fn keys_known_defaults() {
        let p = reference(Task::Pretrain);
        let adamw = ["optim.kind = \"adamw\""];
        assert_eq!(
            default_of(&p, "optim.betas", &adamw).as_deref(),
            Some("[0.9, 0.95]")
        );
        assert_eq!(default_of(&p, "optim.eps", &adamw).as_deref(), Some("1e-8"));
        assert_eq!(
            default_of(&p, "optim.weight_decay", &adamw).as_deref(),
            Some("0.1")
        );
        assert_eq!(
            default_of(&p, "optim.state_bits", &adamw).as_deref(),
            Some("32")
        );
        assert_eq!(
            default_of(&p, "optim.layerwise", &adamw).as_deref(),
            Some("false")
        );
        let galore = ["optim.kind = \"galore_adamw\""];
        assert_eq!(
            default_of(&p, "optim.betas", &galore).as_deref(),
            Some("[0.9, 0.999]")
        );
        assert_eq!(
            default_of(&p, "optim.target", &galore).as_deref(),
            Some("[]")
        );
        assert!(p
            .find("optim.lr", &adamw)
            .is_some_and(|k| k.required && k.ty == "number"));
        assert_eq!(
            default_of(&p, "run.device", &[]).as_deref(),
            Some("\"auto\"")
        );
        assert_eq!(
            default_of(&p, "run.bucket_mb", &[]).as_deref(),
            Some("25.0")
        );
        assert_eq!(
            default_of(&p, "run.collective_timeout_s", &[]).as_deref(),
            Some("300.0")
        );
        assert_eq!(
            default_of(&p, "run.precision", &[]).as_deref(),
            Some("\"fp32\"")
        );
        assert_eq!(
            default_of(&p, "run.task", &[]).as_deref(),
            Some("\"pretrain\"")
        );
        assert_eq!(
            default_of(&p, "data.valid_fraction", &[]).as_deref(),
            Some("0.1")
        );
        assert_eq!(
            default_of(&p, "train.grad_accum", &[]).as_deref(),
            Some("1")
        );
        assert_eq!(
            default_of(&p, "train.weight_decay_schedule", &[]).as_deref(),
            Some("\"constant\"")
        );
        // `[schedule]` may be left out: its kind and keys default to the constant schedule's.
        assert_eq!(
            default_of(&p, "schedule.kind", &[]).as_deref(),
            Some("\"constant\"")
        );
        let constant = ["schedule.kind = \"constant\""];
        assert_eq!(
            default_of(&p, "schedule.warmup_steps", &constant).as_deref(),
            Some("0")
        );
        let wsd = ["schedule.kind = \"wsd\""];
        assert_eq!(
            default_of(&p, "schedule.decay_fraction", &wsd).as_deref(),
            Some("0.2")
        );
        assert_eq!(
            default_of(&p, "schedule.decay_shape", &wsd).as_deref(),
            Some("\"sqrt\"")
        );
        let phases = ["schedule.kind = \"phases\""];
        let shape = p
            .find("schedule.phases[].shape", &phases)
            .expect("phase shape");
        assert!(
            shape.required && shape.ty.starts_with("one of \"warmup\""),
            "{shape:?}"
        );
        let llama = ["model.kind = \"llama\""];
        assert_eq!(
            default_of(&p, "model.rope_theta", &llama).as_deref(),
            Some("10000.0")
        );
        assert_eq!(
            default_of(&p, "model.norm_eps", &llama).as_deref(),
            Some("1e-5")
        );
        let w = p
            .find("data.mixture.sources[].weight", &[])
            .expect("mixture weight");
        assert!(w.required && w.ty == "number");
        // The token file's dtype has no fixed default: its summary's, else uint16 (said in
        // the doc).
        let tokens = ["data.train.kind = \"tokens\""];
        let dtype = p.find("data.train.dtype", &tokens).expect("dtype");
        assert!(
            !dtype.required && dtype.meaning.contains("else uint16"),
            "{dtype:?}"
        );
        assert!(p
            .find(
                "data.valid_sets.<name>.path",
                &["data.valid_sets.<name>.kind = \"text\""]
            )
            .is_some());
        assert_eq!(default_of(&p, "distill.alpha", &[]).as_deref(), Some("0.5"));
        assert!(p.find("peft.rank", &[]).is_some_and(|k| k.required));

        let c = reference(Task::Classify);
        assert_eq!(
            default_of(&c, "data.mean", &[]).as_deref(),
            Some("[0.4914, 0.4822, 0.4465]")
        );
        assert_eq!(default_of(&c, "data.hflip", &[]).as_deref(), Some("true"));
        assert!(c.find("model.width", &["model.kind = \"wrn\""]).is_some());
        assert!(c.find("train.epochs", &[]).is_some());

        let text = render_text(&[p]);
        assert!(
            text.contains("optim.betas  (array of 2 numbers; [0.9, 0.95])"),
            "{text}"
        );
        assert!(text.contains("when optim.kind = \"adamw\":\n"));
        assert!(text.contains("run.device  (string; \"auto\")"));
    }

    /// docs/recipe-keys.md is `trainer keys --format markdown` of both tasks.
    #[test]
    fn keys_doc_is_up_to_date() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/recipe-keys.md");
        let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
        let generated = render_markdown(&both());
        assert!(
            on_disk == generated,
            "docs/recipe-keys.md is out of date with the config types; regenerate it with\n    \
             trainer keys --format markdown > docs/recipe-keys.md"
        );
    }
}
