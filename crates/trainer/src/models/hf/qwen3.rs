//! Qwen3 in config.json: Llama with RMSNorm over each head of q and k (`q_norm`, `k_norm`)
//! before RoPE, an explicit `head_dim` (absent: 128, transformers' default), and optional
//! biases on the attention projections.
//!
//! Reads what Llama reads (`llama::decoder`), `attention_bias`, and Qwen's window settings
//! (`qwen2::sliding`). Has no `mlp_bias` field: present, it is refused.

use super::fields::{Fields, Res};
use super::llama::{decoder, decoder_json, Defaults};
use super::qwen2::{sliding, sliding_json};
use crate::models::config::{DecoderFamily, ModelConfig};
use crate::models::transformer::TransformerConfig;
use serde_json::{json, Map, Value};

const QWEN3: Defaults = Defaults {
    head_dim: Some(128),
    ..Defaults::LLAMA
};

pub fn read(f: &mut Fields) -> Res<ModelConfig> {
    let mut c = decoder(f, DecoderFamily::Qwen3, QWEN3)?;
    c.attention_bias = f.bool_or("attention_bias", false)?;
    (c.sliding_window, c.layer_types) = sliding(f, c.n_layers)?;
    Ok(ModelConfig::Llama(c))
}

pub fn write(c: &TransformerConfig) -> Res<Map<String, Value>> {
    super::refuse_switches(
        c,
        "qwen3",
        &["attention_bias", "sliding_window", "layer_types"],
    )?;
    let mut m = decoder_json(c, "Qwen3ForCausalLM");
    m.insert("attention_bias".into(), json!(c.variant.attention_bias));
    sliding_json(c, &mut m);
    Ok(m)
}
