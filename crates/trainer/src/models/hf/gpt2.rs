//! GPT-2 in config.json.
//!
//! Reads: `vocab_size`, `n_embd`, `n_layer`, `n_head`, `n_inner`, `n_positions`,
//! `layer_norm_epsilon`, `resid_pdrop` / `embd_pdrop` / `attn_pdrop` (one dropout here: they
//! must be equal), `scale_attn_weights`, `scale_attn_by_inverse_layer_idx`,
//! `tie_word_embeddings`. Must keep their default: `activation_function` ("gelu_new" or
//! "gelu_pytorch_tanh", the same function), `reorder_and_upcast_attn = false`, no cross-attention.
//! Ignored: the `summary_*` fields (GPT2DoubleHeadsModel's classification head, not loaded),
//! `n_ctx` (old configs; transformers does not use it), and `fields::NO_EFFECT`.

use super::fields::{Fields, Res};
use crate::models::config::{Gpt2Config, ModelConfig};
use crate::models::transformer::TransformerConfig;
use serde_json::{json, Map, Value};

pub fn read(f: &mut Fields) -> Res<ModelConfig> {
    f.decoder_only()?;
    f.must_be(
        "activation_function",
        &[json!("gelu_new"), json!("gelu_pytorch_tanh")],
        "only the tanh GELU (\"gelu_new\")",
    )?;
    f.must_be(
        "reorder_and_upcast_attn",
        &[json!(false)],
        "the upcast eager attention is not implemented",
    )?;
    f.ignore(&[
        "summary_type",
        "summary_use_proj",
        "summary_activation",
        "summary_proj_to_labels",
        "summary_first_dropout",
        "n_ctx",
    ]);
    let dropout = f.float_or("resid_pdrop", 0.1)?;
    for k in ["embd_pdrop", "attn_pdrop"] {
        let p = f.float_or(k, 0.1)?;
        if p != dropout {
            return Err(format!(
                "unsupported {k} = {p} != resid_pdrop = {dropout}: one dropout probability here"
            ));
        }
    }
    Ok(ModelConfig::Gpt2(Gpt2Config {
        vocab_size: f.int("vocab_size")?,
        d_model: f.int("n_embd")?,
        n_layers: f.int("n_layer")?,
        n_heads: f.int("n_head")?,
        d_ff: f.opt_int("n_inner")?,
        max_seq_len: f.int("n_positions")?,
        norm_eps: f.float_or("layer_norm_epsilon", 1e-5)?,
        dropout: dropout.max(0.0),
        scale_attn_weights: f.bool_or("scale_attn_weights", true)?,
        scale_attn_by_inverse_layer_idx: f.bool_or("scale_attn_by_inverse_layer_idx", false)?,
        tie_embeddings: f.bool_or("tie_word_embeddings", true)?,
    }))
}

pub fn write(c: &TransformerConfig) -> Map<String, Value> {
    let v = &c.variant;
    let m = json!({
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_embd": c.d_model,
        "n_layer": c.n_layers,
        "n_head": c.n_heads,
        "n_inner": c.d_ff,
        "n_positions": c.max_seq_len,
        "layer_norm_epsilon": c.norm_eps,
        "activation_function": "gelu_new",
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "scale_attn_weights": !v.unscaled_attention,
        "scale_attn_by_inverse_layer_idx": v.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": false,
        "tie_word_embeddings": c.tie_embeddings,
        "initializer_range": 0.02,
        "dtype": "float32",
    });
    match m {
        Value::Object(o) => o,
        _ => Map::new(),
    }
}
