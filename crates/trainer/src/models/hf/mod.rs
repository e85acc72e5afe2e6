//! Hugging Face checkpoints in and out: `config.json` plus `model.safetensors` (or shards listed
//! in `model.safetensors.index.json`).
//!
//! One file per family says which config.json fields it honours, which must keep their default
//! and which it ignores (they do not change the computation); `fields.rs` refuses everything
//! else by name, so no field is silently dropped. Families: `llama.rs` (Llama 1-3.x, with the
//! RoPE scalings, and the fields every Llama-style family shares), `mistral.rs`, `qwen2.rs`
//! (Qwen2, Qwen2.5), `qwen3.rs`, `gemma.rs`, `gemma2.rs`, `gemma3.rs` (Gemma 3's text model),
//! `olmo2.rs`, `granite.rs`, `phi3.rs`, `mixtral.rs`, `gpt2.rs`, `gpt_neox.rs` (GPT-NeoX,
//! Pythia). The computation each switch selects
//! is in `transformer.rs` (`Variant`).
//!
//! Our parameter names are the Hugging Face state-dict keys (see `transformer.rs`), so loading is
//! a copy by name.

mod fields;
mod gemma;
mod gemma2;
mod gemma3;
mod gpt2;
mod gpt_neox;
mod granite;
mod llama;
mod mistral;
mod mixtral;
mod olmo2;
mod phi3;
mod qwen2;
mod qwen3;

use super::config::{DecoderFamily, ModelConfig};
use super::mapped::{self, Stored};
use super::moe::{fuse_checkpoint_experts, split_checkpoint_experts};
use super::params::{copy_named, safetensors_header, ParamStore};
use super::transformer::{Family, TransformerConfig};
use crate::error::{io_err, Error, Result};
use fields::Fields;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

fn hf_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Reads `dir/config.json` into a model config of the recipe's registry.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        hf_err(
            &path,
            format!("cannot read: {e} (expected a Hugging Face model directory)"),
        )
    })?;
    let cfg: Map<String, Value> =
        serde_json::from_str(&text).map_err(|e| hf_err(&path, format!("malformed JSON: {e}")))?;
    let model = model_config_from_json(&cfg).map_err(|msg| hf_err(&path, msg))?;
    check_against_weights(dir, &model)?;
    Ok(model)
}

/// Bounds an untrusted config.json by the weights beside it before anything is allocated: the
/// model it describes may not need more parameters than the safetensors hold, nor RoPE tables
/// larger than the weights (a `vocab_size` of 10^12 or a `max_position_embeddings` of 10^12 is
/// one line, not an allocation until the machine gives out), and the weights must be floating
/// point.
fn check_against_weights(dir: &Path, model: &ModelConfig) -> Result<()> {
    check_sizes(&weight_files(dir)?, &dir.join("config.json"), model)
}

/// `check_against_weights` for any weight files and the config file that described `model`
/// (a trainer run's config.toml too).
pub fn check_sizes(files: &[PathBuf], config_path: &Path, model: &ModelConfig) -> Result<()> {
    let config = TransformerConfig::from_recipe(model);
    let mut stored: i128 = 0;
    for file in files.iter().cloned() {
        for t in safetensors_header(&file)? {
            if skipped_key(&t.name, &config) {
                continue;
            }
            if !matches!(t.dtype.as_str(), "F64" | "F32" | "F16" | "BF16") {
                return Err(hf_err(
                    &file,
                    format!(
                        "tensor {} is stored as {}; weights must be floating point",
                        t.name, t.dtype
                    ),
                ));
            }
            stored += t.shape.iter().map(|&d| d as i128).product::<i128>();
        }
    }
    let config_path = config_path.to_path_buf();
    let wanted = config.param_count();
    if wanted > stored {
        return Err(hf_err(
            &config_path,
            format!(
                "describes a model of {wanted} parameters but the safetensors hold {stored} \
                 values: its sizes (vocab_size, hidden_size, num_hidden_layers, \
                 intermediate_size, ...) or tie_word_embeddings do not match the weights"
            ),
        ));
    }
    let rope = config.max_seq_len as i128 * config.rotary_dim() as i128;
    if config.family != Family::Gpt2 && rope > stored.max(1 << 20) {
        return Err(hf_err(
            &config_path,
            format!(
                "max_position_embeddings = {}: its RoPE tables ({rope} values) would be larger \
                 than the model's weights ({stored})",
                config.max_seq_len
            ),
        ));
    }
    Ok(())
}

fn model_config_from_json(cfg: &Map<String, Value>) -> std::result::Result<ModelConfig, String> {
    let model_type = match cfg.get("model_type") {
        None | Some(Value::Null) => return Err("config.json has no model_type".to_string()),
        Some(v) => v
            .as_str()
            .ok_or_else(|| format!("model_type = {v}: expected a string"))?,
    };
    let mut f = Fields::new(cfg, format!("model_type {model_type:?}"));
    let model = match model_type {
        "llama" => llama::read(&mut f)?,
        "mistral" => mistral::read(&mut f)?,
        "mixtral" => mixtral::read(&mut f)?,
        "qwen2" => qwen2::read(&mut f)?,
        "qwen3" => qwen3::read(&mut f)?,
        "gemma" => gemma::read(&mut f)?,
        "gemma2" => gemma2::read(&mut f)?,
        "gemma3_text" => gemma3::read(&mut f)?,
        "phi3" => phi3::read(&mut f)?,
        "olmo2" => olmo2::read(&mut f)?,
        "granite" => granite::read(&mut f)?,
        "gpt2" => gpt2::read(&mut f)?,
        "gpt_neox" => gpt_neox::read(&mut f)?,
        other => {
            return Err(format!(
                "unsupported model_type {other:?} (supported: {})",
                SUPPORTED.join(", ")
            ))
        }
    };
    f.finish()?;
    // The ranges a recipe's [model] must satisfy, named by their config.json field.
    model.validate().map_err(|e| {
        let key = e.key.trim_start_matches("model.");
        let field = json_name(&model, key).unwrap_or(key);
        format!("{field}: {}", e.msg)
    })?;
    Ok(model)
}

/// The config.json name of a `[model]` key.
fn json_name(model: &ModelConfig, key: &str) -> Option<&'static str> {
    let gpt2 = matches!(model, ModelConfig::Gpt2(_));
    let neox = matches!(model, ModelConfig::GptNeox(_));
    Some(match key {
        "vocab_size" => "vocab_size",
        "d_model" if gpt2 => "n_embd",
        "d_model" => "hidden_size",
        "n_layers" if gpt2 => "n_layer",
        "n_layers" => "num_hidden_layers",
        "n_heads" if gpt2 => "n_head",
        "n_heads" => "num_attention_heads",
        "n_kv_heads" => "num_key_value_heads",
        "d_ff" if gpt2 => "n_inner",
        "d_ff" => "intermediate_size",
        "max_seq_len" if gpt2 => "n_positions",
        "max_seq_len" => "max_position_embeddings",
        "norm_eps" if gpt2 => "layer_norm_epsilon",
        "norm_eps" if neox => "layer_norm_eps",
        "partial_rotary_factor" => "partial_rotary_factor",
        "norm_eps" => "rms_norm_eps",
        "head_dim" => "head_dim",
        "rope_theta" => "rope_theta",
        _ => return None,
    })
}

/// The `model_type`s this tool reads and writes.
pub const SUPPORTED: &[&str] = &[
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo2",
    "granite",
    "phi3",
    "gpt2",
    "gpt_neox",
];

/// Refuses a model with a switch that `family`'s config.json cannot express (`expressed`: the
/// switches, by their `[model]` key, that the family's writer does write), so that an export
/// never drops one.
fn refuse_switches(
    c: &TransformerConfig,
    family: &str,
    expressed: &[&str],
) -> std::result::Result<(), String> {
    let v = &c.variant;
    let switches = [
        ("attention_bias", v.attention_bias),
        ("mlp_bias", v.mlp_bias),
        ("sliding_window", v.sliding_window.is_some()),
        ("layer_types", v.sliding_layers.is_some()),
        ("attention_softcap", v.attention_softcap.is_some()),
        ("logits_softcap", v.logits_softcap.is_some()),
        ("query_pre_attn_scalar", v.query_pre_attn_scalar.is_some()),
        ("local_rope_theta", v.local_rope_theta.is_some()),
        ("partial_rotary_factor", v.partial_rotary_factor.is_some()),
    ];
    match switches
        .iter()
        .find(|(name, set)| *set && !expressed.contains(name))
    {
        Some((name, _)) => Err(format!(
            "model.{name} has no field in a {family} config.json; this model cannot be \
             exported as {family}"
        )),
        None => Ok(()),
    }
}

/// The safetensors files of a Hugging Face directory: `model.safetensors`, or the shards named
/// by `model.safetensors.index.json`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(hf_err(
            dir,
            "neither model.safetensors nor model.safetensors.index.json found",
        ));
    }
    let text =
        std::fs::read_to_string(&index).map_err(|e| hf_err(&index, format!("cannot read: {e}")))?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| hf_err(&index, format!("malformed JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| hf_err(&index, "missing weight_map"))?;
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Loads the weights of a Hugging Face directory into `params` (built from the same config),
/// copying each tensor straight from the mapped shards into its parameter (`mapped`).
/// Keys that carry no state we keep are skipped: a tied `lm_head.weight`, GPT-2's causal-mask
/// buffers (`attn.bias`, `attn.masked_bias`), rotary `inv_freq`. GPT-2 checkpoints saved from the
/// base model (`wte.weight`, `h.0....`) get the `transformer.` prefix.
pub fn load_weights(dir: &Path, config: &TransformerConfig, params: &ParamStore) -> Result<()> {
    let tensors = mapped_weights(dir, config)?;
    copy_named(
        &mut params.iter().map(|p| (p.name.as_str(), &p.tensor)),
        tensors,
        dir,
    )
}

/// The tensors of a Hugging Face directory under our names (see `load_weights`), mapped: their
/// data is read when they are copied.
pub fn mapped_weights(dir: &Path, config: &TransformerConfig) -> Result<Vec<(String, Stored)>> {
    let mut tensors: Vec<(String, Stored)> = Vec::new();
    for file in weight_files(dir)? {
        tensors.extend(mapped::open(&file)?);
    }
    let gpt2_base = config.family == Family::Gpt2 && tensors.iter().any(|(k, _)| k == "wte.weight");
    let tensors: Vec<(String, Stored)> = tensors
        .into_iter()
        .map(|(k, t)| {
            if gpt2_base && !k.starts_with("lm_head.") {
                (format!("transformer.{k}"), t)
            } else if config.family == Family::GptNeox && k == "embed_out.weight" {
                // The head's name before transformers 5.
                ("lm_head.weight".to_string(), t)
            } else {
                (k, t)
            }
        })
        .filter(|(k, _)| !skipped_key(k, config))
        .collect();
    let Some(moe) = &config.moe else {
        return Ok(tensors);
    };
    // Mixtral on disk: per-expert `block_sparse_moe.experts.{e}.w{1,2,3}`; ours: fused experts.
    let mut map: BTreeMap<String, Stored> = tensors.into_iter().collect();
    for i in 0..config.n_layers {
        let legacy = format!("model.layers.{i}.block_sparse_moe");
        if map.contains_key(&format!("{legacy}.gate.weight")) {
            fuse_checkpoint_experts(
                &mut map,
                &legacy,
                &format!("model.layers.{i}.mlp"),
                moe.n_experts,
                dir,
            )?;
        }
    }
    Ok(map.into_iter().collect())
}

/// Checkpoint keys that carry no state we keep: a tied `lm_head.weight`, the causal-mask buffers
/// of GPT-2 and of GPT-NeoX before transformers 5, rotary `inv_freq`.
fn skipped_key(k: &str, config: &TransformerConfig) -> bool {
    (k.ends_with(".attn.bias") && config.family == Family::Gpt2)
        || k.ends_with(".attn.masked_bias")
        || (config.family == Family::GptNeox
            && (k.ends_with(".attention.bias") || k.ends_with(".attention.masked_bias")))
        || k.ends_with("rotary_emb.inv_freq")
        || (config.tie_embeddings && (k == "lm_head.weight" || k == "embed_out.weight"))
}

/// The `config.json` that transformers' AutoConfig reads for this model.
pub fn config_json(cfg: &TransformerConfig) -> Result<Value, String> {
    let map = match (&cfg.moe, cfg.family) {
        (Some(m), _) => mixtral::write(cfg, m)?,
        (None, Family::Gpt2) => gpt2::write(cfg),
        (None, Family::GptNeox) => gpt_neox::write(cfg),
        (None, Family::Llama) => match cfg.variant.family {
            DecoderFamily::Llama => llama::write(cfg)?,
            DecoderFamily::Mistral => mistral::write(cfg)?,
            DecoderFamily::Qwen2 => qwen2::write(cfg)?,
            DecoderFamily::Qwen3 => qwen3::write(cfg)?,
            DecoderFamily::Gemma => gemma::write(cfg)?,
            DecoderFamily::Gemma2 => gemma2::write(cfg)?,
            DecoderFamily::Gemma3 => gemma3::write(cfg)?,
            DecoderFamily::Phi3 => phi3::write(cfg)?,
            DecoderFamily::Olmo2 => olmo2::write(cfg)?,
            DecoderFamily::Granite => granite::write(cfg)?,
        },
    };
    Ok(Value::Object(map))
}

/// Writes `out/config.json` and `out/model.safetensors` (fp32). `out` must not exist or be an
/// empty directory: nothing on disk is overwritten.
pub fn export(cfg: &TransformerConfig, params: &ParamStore, out: &Path) -> Result<()> {
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
    let config_value = config_json(cfg).map_err(|msg| hf_err(out, msg))?;
    // What methods add beside the model's weights (LoRA adapters: merge them first, or export
    // them with `--to peft`) is not part of the base model.
    let mut named: BTreeMap<String, Tensor> = params
        .iter()
        .filter(|p| !p.extra)
        .map(|p| {
            (
                p.name.clone(),
                p.tensor
                    .detach()
                    .to_device(tch::Device::Cpu)
                    .to_kind(tch::Kind::Float),
            )
        })
        .collect();
    if cfg.moe.is_some() {
        // The per-expert layout transformers' save_pretrained writes (from_pretrained reads both).
        for i in 0..cfg.n_layers {
            split_checkpoint_experts(
                &mut named,
                &format!("model.layers.{i}.mlp"),
                &format!("model.layers.{i}.block_sparse_moe"),
                out,
            )?;
        }
    }
    std::fs::create_dir_all(out).map_err(io_err(format!("creating {}", out.display())))?;
    let named: Vec<(String, Tensor)> = named.into_iter().collect();
    let weights = out.join("model.safetensors");
    Tensor::write_safetensors(&named, &weights)
        .map_err(|e| hf_err(&weights, crate::error::first_line(&e.to_string())))?;
    let config = serde_json::to_string_pretty(&config_value).unwrap_or_default();
    let path = out.join("config.json");
    std::fs::write(&path, config + "\n").map_err(io_err(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::rope::RopeScaling;
    use crate::models::LlamaConfig;
    use serde_json::json;

    fn llama_json() -> Map<String, Value> {
        serde_json::from_value(json!({
            "model_type": "llama", "vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "head_dim": 8,
            "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"},
            "tie_word_embeddings": true
        }))
        .expect("object")
    }

    #[test]
    fn llama_config_maps_every_field() {
        let m = model_config_from_json(&llama_json()).expect("supported");
        assert_eq!(
            m,
            ModelConfig::Llama(LlamaConfig {
                vocab_size: 256,
                d_model: 32,
                n_layers: 2,
                n_heads: 4,
                n_kv_heads: Some(2),
                head_dim: None,
                d_ff: 64,
                max_seq_len: 128,
                rope_theta: 500000.0,
                norm_eps: 1e-6,
                tie_embeddings: true,
                moe: None,
                family: Default::default(),
                attention_bias: false,
                mlp_bias: false,
                rope_scaling: None,
                sliding_window: None,
                layer_types: None,
                multipliers: None,
                attention_softcap: None,
                logits_softcap: None,
                query_pre_attn_scalar: None,
                local_rope_theta: None,
                partial_rotary_factor: None,
            })
        );
        // Our own export reads back to the same config.
        let t = TransformerConfig::from_recipe(&m);
        let back: Map<String, Value> =
            serde_json::from_value(config_json(&t).expect("exportable")).expect("object");
        assert_eq!(model_config_from_json(&back).expect("supported"), m);
    }

    /// Gemma 3's 4.x rotary fields map as transformers 5 converts them (checked with
    /// `Gemma3TextConfig(rope_theta=1e5, rope_local_base_freq=500.0, rope_scaling={"rope_type":
    /// "linear", "factor": 2.0}, sliding_window_pattern=2).rope_parameters`): the scaling goes
    /// to the full-attention layers, the local base to the sliding ones.
    #[test]
    fn gemma3_legacy_rope_fields_read_as_the_per_layer_type_dicts() {
        let sizes = json!({
            "model_type": "gemma3_text", "vocab_size": 256, "hidden_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 8, "intermediate_size": 64, "max_position_embeddings": 64,
            "sliding_window": 8
        });
        let with = |extra: Value| {
            let mut m: Map<String, Value> = serde_json::from_value(sizes.clone()).expect("object");
            m.extend(serde_json::from_value::<Map<String, Value>>(extra).expect("object"));
            model_config_from_json(&m)
        };
        let legacy = with(json!({
            "rope_theta": 1e5, "rope_local_base_freq": 500.0, "sliding_window_pattern": 2,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0}
        }))
        .expect("supported");
        let nested = with(json!({
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
                "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}
            }
        }))
        .expect("supported");
        assert_eq!(legacy, nested);
        let ModelConfig::Llama(c) = &legacy else {
            panic!("a llama-style config")
        };
        assert_eq!(c.rope_theta, 1e5);
        assert_eq!(c.local_rope_theta, Some(500.0));
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Linear { factor }) if factor == 2.0));
        // A scaled RoPE on the sliding layers is refused by name.
        let e = with(json!({"rope_parameters": {
            "sliding_attention": {"rope_type": "linear", "factor": 2.0}}}))
        .expect_err("refused");
        assert!(e.contains("sliding_attention"), "{e}");
        // So is the multimodal model_type.
        let e = with(json!({"model_type": "gemma3"})).expect_err("refused");
        assert!(e.contains("gemma3"), "{e}");
    }

    /// A switch a family's config.json has no field for makes the export fail by name instead
    /// of writing a model that computes something else.
    #[test]
    fn export_refuses_switches_the_family_cannot_write() {
        let ModelConfig::Llama(mut c) = model_config_from_json(&llama_json()).expect("supported")
        else {
            panic!("llama")
        };
        c.sliding_window = Some(8);
        let t = TransformerConfig::from_recipe(&ModelConfig::Llama(c.clone()));
        let e = config_json(&t).expect_err("refused");
        assert!(
            e.contains("model.sliding_window") && e.contains("llama"),
            "{e}"
        );
        c.sliding_window = None;
        c.family = DecoderFamily::Phi3;
        c.attention_softcap = Some(50.0);
        let t = TransformerConfig::from_recipe(&ModelConfig::Llama(c.clone()));
        let e = config_json(&t).expect_err("refused");
        assert!(
            e.contains("model.attention_softcap") && e.contains("phi3"),
            "{e}"
        );
        c.family = DecoderFamily::Gemma2;
        let t = TransformerConfig::from_recipe(&ModelConfig::Llama(c));
        config_json(&t).expect("gemma2 writes its soft-cap");
    }

    #[test]
    fn unsupported_fields_are_named() {
        let cases = [
            ("hidden_act", json!("gelu"), "hidden_act"),
            ("attention_dropout", json!(0.1), "attention_dropout"),
            (
                "quantization_config",
                json!({"bits": 4}),
                "quantization_config",
            ),
            (
                "rope_parameters",
                json!({"rope_type": "longrope", "rope_theta": 1.0}),
                "longrope",
            ),
            (
                "rope_scaling",
                json!({"type": "linear", "factor": 2.0, "finetuned": true}),
                "finetuned",
            ),
            (
                "rope_scaling",
                json!({"type": "llama3", "factor": 8.0}),
                "low_freq_factor",
            ),
            ("hidden_size", json!("wide"), "hidden_size"),
            (
                "num_attention_heads",
                json!(0),
                "num_attention_heads: expected a positive",
            ),
            ("model_type", json!("mamba"), "mamba"),
        ];
        for (k, v, expect) in cases {
            let mut cfg = llama_json();
            cfg.insert(k.to_string(), v);
            let e = model_config_from_json(&cfg).expect_err("refused");
            assert!(e.contains(expect), "{k}: {e}");
        }
        // A head width other than hidden_size / heads (a head-pruned model) is kept.
        let mut cfg = llama_json();
        cfg.insert("head_dim".to_string(), json!(16));
        let m = model_config_from_json(&cfg).expect("supported");
        assert!(
            matches!(
                m,
                ModelConfig::Llama(LlamaConfig {
                    head_dim: Some(16),
                    ..
                })
            ),
            "{m:?}"
        );
        let mut cfg = llama_json();
        cfg.remove("hidden_size");
        assert!(model_config_from_json(&cfg)
            .expect_err("refused")
            .contains("hidden_size"));
    }
}
