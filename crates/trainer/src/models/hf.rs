//! Hugging Face checkpoints in and out: `config.json` plus `model.safetensors` (or shards listed
//! in `model.safetensors.index.json`), for the Llama and GPT-2 families.
//!
//! Our parameter names are the Hugging Face state-dict keys (see `transformer.rs`), so loading is
//! a copy by name. What we cannot represent is refused with an error naming the field, never
//! silently mis-loaded: rope scaling, attention or MLP biases in Llama, other activations,
//! a `head_dim` that is not `hidden_size / num_attention_heads`, cross-attention in GPT-2.

use super::config::{Gpt2Config, LlamaConfig, ModelConfig};
use super::moe::{fuse_checkpoint_experts, split_checkpoint_experts, MoeConfig, Routing};
use super::params::{copy_named, read_safetensors, ParamStore};
use super::transformer::{Family, TransformerConfig};
use crate::error::{io_err, Error, Result};
use serde_json::{json, Map, Value};
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
    model_config_from_json(&cfg).map_err(|msg| hf_err(&path, msg))
}

fn model_config_from_json(cfg: &Map<String, Value>) -> std::result::Result<ModelConfig, String> {
    let int = |k: &str| -> std::result::Result<i64, String> {
        cfg.get(k)
            .and_then(Value::as_i64)
            .ok_or_else(|| format!("missing integer field {k:?}"))
    };
    let float_or = |k: &str, default: f64| cfg.get(k).and_then(Value::as_f64).unwrap_or(default);
    let str_or = |k: &str, default: &'static str| -> String {
        cfg.get(k)
            .and_then(Value::as_str)
            .unwrap_or(default)
            .to_string()
    };
    let bool_or = |k: &str, default: bool| cfg.get(k).and_then(Value::as_bool).unwrap_or(default);
    let model_type = cfg.get("model_type").and_then(Value::as_str).unwrap_or("");
    match model_type {
        "llama" | "mixtral" => {
            let unsupported = |field: &str, why: &str| Err(format!("unsupported {field}: {why}"));
            if bool_or("attention_bias", false) {
                return unsupported(
                    "attention_bias = true",
                    "Llama attention without biases only",
                );
            }
            if bool_or("mlp_bias", false) {
                return unsupported("mlp_bias = true", "Llama MLP without biases only");
            }
            let act = str_or("hidden_act", "silu");
            if act != "silu" {
                return unsupported(&format!("hidden_act = {act:?}"), "only \"silu\" (SwiGLU)");
            }
            // transformers 5 keeps rope settings in `rope_parameters`; 4.x in `rope_theta` and
            // `rope_scaling`.
            let rope = cfg.get("rope_parameters").and_then(Value::as_object);
            let rope_type = rope
                .and_then(|r| r.get("rope_type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if rope_type != "default" {
                return unsupported(
                    &format!("rope_parameters.rope_type = {rope_type:?}"),
                    "only default RoPE",
                );
            }
            if cfg.get("rope_scaling").is_some_and(|v| !v.is_null()) {
                return unsupported("rope_scaling", "only default RoPE (no scaling)");
            }
            let rope_theta = rope
                .and_then(|r| r.get("rope_theta"))
                .and_then(Value::as_f64)
                .unwrap_or_else(|| float_or("rope_theta", 10000.0));
            let (d, heads) = (int("hidden_size")?, int("num_attention_heads")?);
            // A head width other than hidden_size / heads (e.g. after head pruning) is kept.
            let head_dim = cfg
                .get("head_dim")
                .and_then(Value::as_i64)
                .filter(|hd| heads == 0 || hd * heads != d);
            let moe = if model_type == "mixtral" {
                if float_or("router_jitter_noise", 0.0) != 0.0 {
                    return unsupported("router_jitter_noise != 0", "no router jitter");
                }
                if let Some(w) = cfg.get("sliding_window").and_then(Value::as_i64) {
                    if w < int("max_position_embeddings")? {
                        return unsupported(
                            &format!("sliding_window = {w}"),
                            "full causal attention only",
                        );
                    }
                }
                Some(MoeConfig {
                    n_experts: int("num_local_experts")?,
                    top_k: int("num_experts_per_tok")?,
                    routing: Routing::SoftmaxThenTopK,
                    capacity_factor: None,
                    aux_loss_coef: float_or("router_aux_loss_coef", 0.001),
                    router_z_loss_coef: 0.0,
                    shared_expert: false,
                })
            } else {
                None
            };
            Ok(ModelConfig::Llama(LlamaConfig {
                vocab_size: int("vocab_size")?,
                d_model: d,
                n_layers: int("num_hidden_layers")?,
                n_heads: heads,
                n_kv_heads: Some(
                    cfg.get("num_key_value_heads")
                        .and_then(Value::as_i64)
                        .unwrap_or(heads),
                ),
                head_dim,
                d_ff: int("intermediate_size")?,
                max_seq_len: int("max_position_embeddings")?,
                rope_theta,
                norm_eps: float_or("rms_norm_eps", 1e-6),
                tie_embeddings: bool_or("tie_word_embeddings", false),
                moe,
            }))
        }
        "gpt2" => {
            let act = str_or("activation_function", "gelu_new");
            if act != "gelu_new" && act != "gelu_pytorch_tanh" {
                return Err(format!(
                    "unsupported activation_function = {act:?}: only \"gelu_new\" (tanh GELU)"
                ));
            }
            if bool_or("add_cross_attention", false) {
                return Err("unsupported add_cross_attention = true".to_string());
            }
            if bool_or("scale_attn_by_inverse_layer_idx", false)
                || bool_or("reorder_and_upcast_attn", false)
            {
                return Err(
                    "unsupported scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn"
                        .to_string(),
                );
            }
            if !bool_or("tie_word_embeddings", true) {
                return Err("unsupported tie_word_embeddings = false for GPT-2".to_string());
            }
            Ok(ModelConfig::Gpt2(Gpt2Config {
                vocab_size: int("vocab_size")?,
                d_model: int("n_embd")?,
                n_layers: int("n_layer")?,
                n_heads: int("n_head")?,
                d_ff: cfg.get("n_inner").and_then(Value::as_i64),
                max_seq_len: int("n_positions")?,
                norm_eps: float_or("layer_norm_epsilon", 1e-5),
                dropout: float_or("resid_pdrop", 0.0).max(0.0),
            }))
        }
        "" => Err("config.json has no model_type".to_string()),
        other => Err(format!(
            "unsupported model_type {other:?} (supported: llama, mixtral, gpt2)"
        )),
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

/// Loads the weights of a Hugging Face directory into `params` (built from the same config).
/// Keys that carry no state we keep are skipped: a tied `lm_head.weight`, GPT-2's causal-mask
/// buffers (`attn.bias`, `attn.masked_bias`), rotary `inv_freq`. GPT-2 checkpoints saved from the
/// base model (`wte.weight`, `h.0....`) get the `transformer.` prefix.
pub fn load_weights(dir: &Path, config: &TransformerConfig, params: &ParamStore) -> Result<()> {
    let tensors = read_weights(dir, config)?;
    copy_named(
        &mut params.iter().map(|p| (p.name.as_str(), &p.tensor)),
        tensors,
        dir,
    )
}

/// The tensors of a Hugging Face directory under our names (see `load_weights`).
pub fn read_weights(dir: &Path, config: &TransformerConfig) -> Result<Vec<(String, Tensor)>> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for file in weight_files(dir)? {
        tensors.extend(read_safetensors(&file)?);
    }
    let gpt2_base = config.family == Family::Gpt2 && tensors.iter().any(|(k, _)| k == "wte.weight");
    let tensors: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(k, t)| {
            if gpt2_base && !k.starts_with("lm_head.") {
                (format!("transformer.{k}"), t)
            } else {
                (k, t)
            }
        })
        .filter(|(k, _)| {
            !(k.ends_with(".attn.bias") && config.family == Family::Gpt2)
                && !k.ends_with(".attn.masked_bias")
                && !k.ends_with("rotary_emb.inv_freq")
                && !(config.tie_embeddings && k == "lm_head.weight")
        })
        .collect();
    let Some(moe) = &config.moe else {
        return Ok(tensors);
    };
    // Mixtral on disk: per-expert `block_sparse_moe.experts.{e}.w{1,2,3}`; ours: fused experts.
    let mut map: BTreeMap<String, Tensor> = tensors.into_iter().collect();
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

/// The `config.json` that transformers' AutoConfig reads for this model.
pub fn config_json(cfg: &TransformerConfig) -> Result<Value, String> {
    if let Some(m) = &cfg.moe {
        if m.routing != Routing::SoftmaxThenTopK || m.capacity_factor.is_some() || m.shared_expert {
            return Err(
                "only Mixtral-style MoE exports to Hugging Face (routing = softmax_top_k, no \
                 capacity_factor, no shared_expert)"
                    .to_string(),
            );
        }
        return Ok(json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim(),
            "intermediate_size": cfg.d_ff,
            "max_position_embeddings": cfg.max_seq_len,
            "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
            "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "hidden_act": "silu",
            "num_local_experts": m.n_experts,
            "num_experts_per_tok": m.top_k,
            "router_aux_loss_coef": m.aux_loss_coef,
            "router_jitter_noise": 0.0,
            "output_router_logits": false,
            "sliding_window": null,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "dtype": "float32",
        }));
    }
    Ok(match cfg.family {
        Family::Llama => json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim(),
            "intermediate_size": cfg.d_ff,
            "max_position_embeddings": cfg.max_seq_len,
            "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
            "rms_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "dtype": "float32",
        }),
        Family::Gpt2 => json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": cfg.vocab_size,
            "n_embd": cfg.d_model,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_inner": cfg.d_ff,
            "n_positions": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps,
            "activation_function": "gelu_new",
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "tie_word_embeddings": true,
            "initializer_range": 0.02,
            "dtype": "float32",
        }),
    })
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
            })
        );
        // Our own export reads back to the same config.
        let t = TransformerConfig::from_recipe(&m);
        let back: Map<String, Value> =
            serde_json::from_value(config_json(&t).expect("exportable")).expect("object");
        assert_eq!(model_config_from_json(&back).expect("supported"), m);
    }

    #[test]
    fn unsupported_fields_are_named() {
        let cases = [
            ("attention_bias", json!(true), "attention_bias"),
            ("hidden_act", json!("gelu"), "hidden_act"),
            (
                "rope_parameters",
                json!({"rope_type": "llama3", "rope_theta": 1.0}),
                "rope_type",
            ),
            (
                "rope_scaling",
                json!({"type": "linear", "factor": 2.0}),
                "rope_scaling",
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
