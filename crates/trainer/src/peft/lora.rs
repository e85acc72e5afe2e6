//! LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") and LoRA-FA
//! (Zhang et al. 2023, "LoRA-FA: Memory-efficient Low-rank Adaptation"), laid out as Hugging Face
//! `peft` lays them out (reference: peft/tuners/lora/layer.py), so adapters move between the two.
//!
//! A targeted projection `y = W x (+ bias)` becomes `y = W x + scale * B A dropout(x)` with
//! `A: [r, in]`, `B: [out, r]`, `scale = alpha / r` (or `alpha / sqrt(r)` with rsLoRA). A starts
//! as PEFT's `kaiming_uniform_(a = sqrt(5))`, i.e. U(-1/sqrt(in), 1/sqrt(in)), and B at zero, so
//! training starts from the base model exactly. Every base parameter is frozen (bias "none" in
//! PEFT's terms); only the adapters get gradients and optimizer state. LoRA-FA also freezes A at
//! its random initialisation: only B trains, and the backward pass needs `A x` (r wide) instead
//! of the full-width input for A's gradient.
//!
//! Adapter parameters are registered as `{module}.lora_A.weight` and `{module}.lora_B.weight`,
//! where `{module}` is the Hugging Face module path of the projection; PEFT's
//! `adapter_model.safetensors` stores the same tensors under `base_model.model.{module}...`.
//! GPT-2's Conv1D weights are stored `[in, out]`: the adapter shapes are the same as for a Linear
//! (`A: [r, in]`, `B: [out, r]`), and merging adds the transposed update (PEFT's
//! `fan_in_fan_out = true`).
//!
//! ## Target patterns
//!
//! `target` patterns select projections by module path (`model.layers.3.self_attn.q_proj`,
//! `transformer.h.0.mlp.c_fc`) or weight name (`...q_proj.weight`), by the one name rule of
//! `models::params` (PEFT's rule for list-form `target_modules`: the whole path or a suffix that
//! starts after a `.`, `*` any run; `q_proj` matches `model.layers.0.self_attn.q_proj`,
//! `self_attn.q_proj` too, `proj` nothing; `mlp.*` every MLP projection, `layers.1.*` every
//! projection of layer 1). Only dense projections are candidates: embeddings, the output head,
//! norms and MoE experts never are. A pattern that selects nothing is an error naming it.

use super::config::{PeftConfig, PeftKind};
use crate::error::{io_err, Error, Result};
use crate::models::params::{name_matches, read_safetensors, select, Before, ParamStore};
use crate::models::transformer::{Family, Linear, LinearAdapter, Transformer};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Kind, Tensor};

/// File names of a PEFT adapter directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before module paths in `adapter_model.safetensors`.
const PEFT_PREFIX: &str = "base_model.model.";

/// The low-rank update attached to one projection.
pub struct LoraAdapter {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
    /// True while `scale * B A` is added into the base weight (the forward then skips the
    /// adapter).
    merged: AtomicBool,
}

impl LinearAdapter for LoraAdapter {
    /// `scale * B A dropout(x)` for x `[.., in]`, or None while merged.
    fn forward(&self, x: &Tensor, train: bool) -> Option<Tensor> {
        if self.is_merged() {
            return None;
        }
        let x = if train && self.dropout > 0.0 {
            x.dropout(self.dropout, true)
        } else {
            x.shallow_clone()
        };
        let h = x.linear(&self.a, None::<&Tensor>); // [.., r]
        Some(h.linear(&self.b, None::<&Tensor>) * self.scale) // [.., out]
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The LoRA adapter on a projection, if it carries one.
pub fn adapter_of(lin: &Linear) -> Option<&LoraAdapter> {
    lin.adapter
        .as_ref()
        .and_then(|a| a.as_any().downcast_ref::<LoraAdapter>())
}

impl LoraAdapter {
    /// `scale * B A`, `[out, in]`.
    pub fn delta(&self) -> Tensor {
        self.b.matmul(&self.a) * self.scale
    }

    pub fn is_merged(&self) -> bool {
        self.merged.load(Ordering::Relaxed)
    }
}

/// The names of a projection's adapter parameters.
pub fn a_name(module: &str) -> String {
    format!("{module}.lora_A.weight")
}
pub fn b_name(module: &str) -> String {
    format!("{module}.lora_B.weight")
}

/// True for the parameter names of LoRA adapters (left out of a base-model export).
pub fn is_adapter_param(name: &str) -> bool {
    name.ends_with(".lora_A.weight") || name.ends_with(".lora_B.weight")
}

/// What `apply` did: the recipe's settings and the adapted module paths, in model order.
#[derive(Debug, Clone)]
pub struct Lora {
    pub config: PeftConfig,
    pub modules: Vec<String>,
}

impl Lora {
    /// One line for the start-up log: method, rank, scale and the adapted module names.
    pub fn describe(&self) -> String {
        let c = &self.config;
        let kind = match c.kind {
            PeftKind::Lora => "LoRA",
            PeftKind::LoraFa => "LoRA-FA (A frozen)",
            PeftKind::Relora => "ReLoRA",
        };
        let leaves: BTreeSet<&str> = self
            .modules
            .iter()
            .filter_map(|m| m.rsplit('.').next())
            .collect();
        format!(
            "{kind}: rank {}, alpha {}, scale {}{}, on {} projections ({})",
            c.rank,
            c.alpha(),
            c.scale(),
            if c.rslora { " (rsLoRA)" } else { "" },
            self.modules.len(),
            leaves.into_iter().collect::<Vec<_>>().join(", ")
        )
    }
}

fn peft_err(key: &str, msg: impl Into<String>) -> Error {
    Error::Recipe(format!("{key}: {}", msg.into()))
}

/// Attaches adapters to the projections that `cfg.target` selects and freezes every other
/// parameter of `store` (and A too for LoRA-FA). Call after the base weights are loaded and
/// before the optimizer is built. Draws A from torch's CPU generator (seed it first).
pub fn apply(model: &mut Transformer, store: &mut ParamStore, cfg: &PeftConfig) -> Result<Lora> {
    let mut selected = Vec::new();
    let projections = model.projections_mut();
    // Candidates by weight name, so that a pattern means here what it means for GaLore's target
    // and for pruning (`q_proj` and `q_proj.weight` alike select the projection).
    let weights: Vec<String> = projections
        .iter()
        .map(|l| format!("{}.weight", l.path))
        .collect();
    let leaves: BTreeSet<&str> = projections
        .iter()
        .filter_map(|l| l.path.rsplit('.').next())
        .collect();
    let what = format!(
        "projection of the model (its projections: {})",
        leaves.into_iter().collect::<Vec<_>>().join(", ")
    );
    let candidates: Vec<&str> = weights.iter().map(String::as_str).collect();
    // LoRA's target always followed this rule: nothing to compare with.
    let chosen: BTreeSet<&str> = select(
        &candidates,
        &cfg.target,
        "peft.target",
        &what,
        Before::SameRule,
    )?
    .into_iter()
    .collect();
    for lin in projections {
        if chosen.contains(format!("{}.weight", lin.path).as_str()) {
            let (fan_in, fan_out) = lin.in_out();
            let r = cfg.rank_for(&lin.path);
            cfg.patterns_unambiguous_at(&lin.path)
                .map_err(|e| peft_err(&e.key, e.msg))?;
            if r > fan_in.min(fan_out) {
                return Err(peft_err(
                    "peft.rank",
                    format!(
                        "rank {r} exceeds the smaller dimension ({}) of {}.weight {:?}",
                        fan_in.min(fan_out),
                        lin.path,
                        lin.weight.size()
                    ),
                ));
            }
            selected.push(lin);
        }
    }
    // Freeze the base first: everything registered so far.
    let base: Vec<String> = store.iter().map(|p| p.name.clone()).collect();
    for name in &base {
        store.freeze(name);
    }
    let mut modules = Vec::new();
    for lin in selected {
        let (fan_in, fan_out) = lin.in_out();
        let r = cfg.rank_for(&lin.path);
        let bound = 1.0 / (fan_in as f64).sqrt();
        let a_init = Tensor::rand([r, fan_in], (Kind::Float, Device::Cpu)) * (2.0 * bound) - bound;
        let a = store.add_extra(&a_name(&lin.path), a_init);
        let b = store.add_extra(
            &b_name(&lin.path),
            Tensor::zeros([fan_out, r], (Kind::Float, Device::Cpu)),
        );
        if cfg.kind == PeftKind::LoraFa {
            store.freeze(&a_name(&lin.path));
        }
        lin.adapter = Some(Box::new(LoraAdapter {
            a,
            b,
            scale: cfg.scale_for(&lin.path),
            dropout: cfg.dropout,
            merged: AtomicBool::new(false),
        }));
        modules.push(lin.path.clone());
    }
    Ok(Lora {
        config: cfg.clone(),
        modules,
    })
}

/// Adds `scale * B A` into every adapted weight (in the weight's own layout) and switches the
/// adapters off: the model computes the same function with plain projections. Idempotent.
pub fn merge(model: &Transformer) -> Result<()> {
    for lin in model.projections() {
        if let Some(ad) = adapter_of(lin) {
            if !ad.is_merged() {
                add_delta(lin, ad, 1.0)?;
                ad.merged.store(true, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

/// Undoes `merge`: subtracts `scale * B A` again and switches the adapters back on.
pub fn unmerge(model: &Transformer) -> Result<()> {
    for lin in model.projections() {
        if let Some(ad) = adapter_of(lin) {
            if ad.is_merged() {
                add_delta(lin, ad, -1.0)?;
                ad.merged.store(false, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

pub(crate) fn add_delta(lin: &Linear, ad: &LoraAdapter, sign: f64) -> Result<()> {
    tch::no_grad(|| -> Result<()> {
        let delta = ad.delta().to_kind(Kind::Float) * sign; // [out, in]
        let delta = if lin.transposed { delta.tr() } else { delta };
        let mut w = lin.weight.shallow_clone();
        let updated = (w.to_kind(Kind::Float) + delta).to_kind(w.kind());
        w.f_copy_(&updated)?;
        Ok(())
    })
}

/// PEFT's `target_modules` for the adapted set: the distinct last path components when PEFT's
/// suffix rule with those selects exactly the adapted projections, else a regex (PEFT full-matches
/// a string `target_modules` against module paths) listing them.
fn peft_target_modules(model: &Transformer, lora: &Lora) -> Value {
    let adapted: BTreeSet<&str> = lora.modules.iter().map(String::as_str).collect();
    let leaves: BTreeSet<&str> = adapted
        .iter()
        .filter_map(|p| p.rsplit('.').next())
        .collect();
    let same = model.projections().iter().all(|l| {
        leaves.iter().any(|leaf| name_matches(leaf, &l.path)) == adapted.contains(l.path.as_str())
    });
    if same {
        json!(leaves.into_iter().collect::<Vec<_>>())
    } else {
        let alts: Vec<String> = lora.modules.iter().map(|m| m.replace('.', "\\.")).collect();
        json!(format!("^(?:{})$", alts.join("|")))
    }
}

/// Writes `out/adapter_config.json` and `out/adapter_model.safetensors` as Hugging Face peft's
/// `save_pretrained` does, so that `PeftModel.from_pretrained(base, out)` loads them onto the
/// base model exported with `trainer export --to hf`. `out` must not exist or be empty.
pub fn export_peft(model: &Transformer, lora: &Lora, base: Option<&str>, out: &Path) -> Result<()> {
    check_empty(out)?;
    let cfg = &lora.config;
    let alpha = cfg.alpha();
    let alpha_value = if alpha.fract() == 0.0 && alpha.abs() < 1e15 {
        json!(alpha as i64)
    } else {
        json!(alpha)
    };
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.rank,
        "lora_alpha": alpha_value,
        "lora_dropout": cfg.dropout,
        "target_modules": peft_target_modules(model, lora),
        "fan_in_fan_out": model.config.family == Family::Gpt2,
        "use_rslora": cfg.rslora,
        "bias": "none",
        "use_dora": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": cfg.rank_pattern,
        "alpha_pattern": cfg.alpha_pattern,
        "base_model_name_or_path": base,
        "revision": null,
    });
    // LoRA-FA adapters have LoRA's shapes and function (only which factor trained differs), so
    // they export as peft_type LORA.
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for lin in model.projections() {
        if let Some(ad) = adapter_of(lin) {
            let cpu = |t: &Tensor| t.detach().to_device(Device::Cpu).to_kind(Kind::Float);
            named.push((
                format!("{PEFT_PREFIX}{}.lora_A.weight", lin.path),
                cpu(&ad.a),
            ));
            named.push((
                format!("{PEFT_PREFIX}{}.lora_B.weight", lin.path),
                cpu(&ad.b),
            ));
        }
    }
    std::fs::create_dir_all(out).map_err(io_err(format!("creating {}", out.display())))?;
    let weights = out.join(ADAPTER_WEIGHTS);
    Tensor::write_safetensors(&named, &weights).map_err(|e| Error::Checkpoint {
        path: weights.clone(),
        msg: crate::error::first_line(&e.to_string()),
    })?;
    let path = out.join(ADAPTER_CONFIG);
    let text = serde_json::to_string_pretty(&config).unwrap_or_default();
    std::fs::write(&path, text + "\n").map_err(io_err(format!("writing {}", path.display())))
}

fn check_empty(out: &Path) -> Result<()> {
    if out.exists() {
        let empty = std::fs::read_dir(out)
            .map(|mut d| d.next().is_none())
            .unwrap_or(false);
        if !empty {
            return Err(Error::RunDir {
                path: out.to_path_buf(),
                msg: "already exists and is not empty; choose a new output directory".into(),
            });
        }
    }
    Ok(())
}

/// Copies the adapters of a PEFT adapter directory (`[peft] from`) into the model's adapters.
/// The adapter must have the recipe's rank and exactly one `lora_A`/`lora_B` pair per adapted
/// projection, of the same shapes: anything else (an adapter for another base, other targets) is
/// one error naming the key.
pub fn load_peft(model: &Transformer, lora: &Lora, dir: &Path) -> Result<()> {
    let err = |path: &Path, msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
        err(
            &cfg_path,
            format!("cannot read: {e} (expected a PEFT adapter directory)"),
        )
    })?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| err(&cfg_path, format!("malformed JSON: {e}")))?;
    check_adapter_config(&v, &lora.config, model.config.family == Family::Gpt2)
        .map_err(|msg| err(&cfg_path, msg))?;
    let weights = dir.join(ADAPTER_WEIGHTS);
    let mut loaded: std::collections::BTreeMap<String, Tensor> = read_safetensors(&weights)?
        .into_iter()
        .map(|(k, t)| {
            (
                k.strip_prefix(PEFT_PREFIX)
                    .unwrap_or(&k)
                    .replace(".default.weight", ".weight"),
                t,
            )
        })
        .collect();
    let mut pairs = Vec::new();
    for lin in model.projections() {
        let Some(ad) = adapter_of(lin) else { continue };
        for (name, target) in [(a_name(&lin.path), &ad.a), (b_name(&lin.path), &ad.b)] {
            let src = loaded
                .remove(&name)
                .ok_or_else(|| err(&weights, format!("missing tensor {PEFT_PREFIX}{name} (an adapter for another model or other target modules?)")))?;
            if !src.is_floating_point() {
                return Err(err(
                    &weights,
                    format!("tensor {PEFT_PREFIX}{name} is stored as {:?}; adapter weights must be floating point", src.kind()),
                ));
            }
            if src.size() != target.size() {
                return Err(err(
                    &weights,
                    format!("tensor {PEFT_PREFIX}{name} has shape {:?} but the model's adapter is {:?} (an adapter for another base?)", src.size(), target.size()),
                ));
            }
            pairs.push((target.shallow_clone(), src));
        }
    }
    if let Some(extra) = loaded.keys().next() {
        return Err(err(&weights, format!("unexpected tensor {PEFT_PREFIX}{extra} (no such adapter in the model; check peft.target)")));
    }
    tch::no_grad(|| -> Result<()> {
        for (mut t, src) in pairs {
            t.f_copy_(&src)?;
        }
        Ok(())
    })
}

/// peft's LoRA settings in `adapter_config.json` (peft 0.21) whose value, when it is this one,
/// changes nothing this tool computes: bookkeeping, initialisation (the weights are loaded), and
/// the switches of variants left off. Any other value of these is refused by name.
const PEFT_DEFAULTS: &[(&str, &str)] = &[
    ("exclude_modules", "null"),
    ("layers_to_transform", "null"),
    ("layers_pattern", "null"),
    ("modules_to_save", "null"),
    ("megatron_config", "null"),
    ("megatron_core", "\"megatron.core\""),
    ("trainable_token_indices", "null"),
    ("loftq_config", "{}"),
    ("eva_config", "null"),
    ("corda_config", "null"),
    ("lora_ga_config", "null"),
    ("velora_config", "null"),
    ("alora_invocation_tokens", "null"),
    ("use_qalora", "false"),
    ("qalora_group_size", "16"),
    ("monteclora_config", "null"),
    ("layer_replication", "null"),
    ("lora_bias", "false"),
    ("target_parameters", "null"),
    // peft writes an empty list for models with expert parameters (Mixtral): nothing targeted.
    ("target_parameters", "[]"),
    ("use_bdlora", "null"),
    ("arrow_config", "null"),
    ("kasa_config", "null"),
    ("ensure_weight_tying", "false"),
];

/// Fields that never change the adapted model: what peft records about where the adapter came
/// from and how it was initialised (the weights are loaded over the initialisation).
const PEFT_NO_EFFECT: &[&str] = &[
    "peft_type",
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "init_lora_weights",
    "target_modules",
];

/// `adapter_config.json` is the truth about the adapter: the recipe's `[peft]` must state the
/// same rank, alpha, rsLoRA switch, patterns and dropout (a difference is an error naming both),
/// and every other field must hold a value with no effect here (`PEFT_DEFAULTS`); DoRA, LoRA
/// biases and the other variants are refused by name. `target_modules` is checked against the
/// adapted modules through the tensors.
fn check_adapter_config(
    v: &Value,
    cfg: &PeftConfig,
    gpt2: bool,
) -> std::result::Result<(), String> {
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(format!(
            "peft_type is {peft_type:?}; only LORA adapters load"
        ));
    }
    let Some(map) = v.as_object() else {
        return Err("expected a JSON object".to_string());
    };
    if map.get("use_dora") == Some(&Value::Bool(true)) {
        return Err(
            "use_dora = true: DoRA adapters (a magnitude vector and a weight-normalised \
                    update) are not implemented"
                .to_string(),
        );
    }
    if let Some(b) = map.get("bias").filter(|b| b.as_str() != Some("none")) {
        return Err(format!(
            "bias = {b}: adapters that train the base model's biases are not implemented \
             (only \"none\")"
        ));
    }
    let r = map.get("r").and_then(Value::as_i64);
    let alpha = map.get("lora_alpha").and_then(Value::as_f64);
    let mismatch = |field: &str, theirs: String, key: &str, ours: String| {
        Err(format!(
            "{field} = {theirs} but the recipe's {key} = {ours}; the adapter's value is the \
             truth: set {key} = {theirs}"
        ))
    };
    if r != Some(cfg.rank) {
        return mismatch("r", format!("{r:?}"), "peft.rank", cfg.rank.to_string());
    }
    if alpha != Some(cfg.alpha()) {
        let theirs = alpha.map_or("absent".to_string(), |a| a.to_string());
        return mismatch("lora_alpha", theirs, "peft.alpha", cfg.alpha().to_string());
    }
    let rslora = map
        .get("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if rslora != cfg.rslora {
        return mismatch(
            "use_rslora",
            rslora.to_string(),
            "peft.rslora",
            cfg.rslora.to_string(),
        );
    }
    let dropout = map
        .get("lora_dropout")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    if dropout != cfg.dropout {
        return mismatch(
            "lora_dropout",
            dropout.to_string(),
            "peft.dropout",
            cfg.dropout.to_string(),
        );
    }
    let fan_in_fan_out = map
        .get("fan_in_fan_out")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if fan_in_fan_out != gpt2 {
        return Err(format!(
            "fan_in_fan_out = {fan_in_fan_out}, but this model's projections {} (peft sets it \
             for GPT-2's Conv1D only)",
            if gpt2 { "are Conv1D" } else { "are Linear" }
        ));
    }
    let patterns_equal = |field: &str, ours: Value| -> std::result::Result<(), String> {
        let theirs = map.get(field).cloned().unwrap_or(json!({}));
        let theirs = if theirs.is_null() { json!({}) } else { theirs };
        let same = match (theirs.as_object(), ours.as_object()) {
            (Some(t), Some(o)) => {
                t.len() == o.len()
                    && t.iter().all(|(k, tv)| {
                        o.get(k).and_then(Value::as_f64).is_some() && o[k].as_f64() == tv.as_f64()
                    })
            }
            _ => false,
        };
        if same {
            Ok(())
        } else {
            Err(format!(
                "{field} = {theirs} but the recipe's peft.{field} = {ours}; the adapter's value \
                 is the truth: set peft.{field} to it"
            ))
        }
    };
    patterns_equal("rank_pattern", json!(cfg.rank_pattern))?;
    patterns_equal("alpha_pattern", json!(cfg.alpha_pattern))?;
    let read = [
        "use_dora",
        "bias",
        "r",
        "lora_alpha",
        "use_rslora",
        "lora_dropout",
        "fan_in_fan_out",
        "rank_pattern",
        "alpha_pattern",
    ];
    for (k, val) in map {
        if read.contains(&k.as_str()) || PEFT_NO_EFFECT.contains(&k.as_str()) {
            continue;
        }
        // A field may have several values that mean "off" (`target_parameters`: null or []).
        let is_default = PEFT_DEFAULTS
            .iter()
            .filter(|(name, _)| name == k)
            .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
            .any(|d| d == *val);
        if !is_default {
            return Err(format!(
                "unsupported {k} = {val}: this tool does not implement it, and the adapter read \
                 without it would compute something else"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
