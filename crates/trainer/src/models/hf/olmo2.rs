//! OLMo 2 in config.json: Llama with the norms moved after attention and after the MLP
//! (`post_attention_layernorm`, `post_feedforward_layernorm`; no `input_layernorm`), RMSNorm of
//! the whole q and k projections (`q_norm` `[n_heads * head_dim]`, `k_norm`
//! `[n_kv_heads * head_dim]`) before RoPE, and norms that scale in fp32 before the cast.
//!
//! Reads what Llama reads (`llama::decoder`, with OLMo 2's default eps 1e-5) and
//! `attention_bias`. Has no `mlp_bias` or `head_dim` field in transformers' Olmo2Config;
//! `head_dim` is read as in Llama (hidden_size / heads when absent).

use super::fields::{Fields, Res};
use super::llama::{decoder, decoder_json, Defaults};
use crate::models::config::{DecoderFamily, ModelConfig};
use crate::models::transformer::TransformerConfig;
use serde_json::{json, Map, Value};

const OLMO2: Defaults = Defaults {
    rms_norm_eps: 1e-5,
    ..Defaults::LLAMA
};

pub fn read(f: &mut Fields) -> Res<ModelConfig> {
    let mut c = decoder(f, DecoderFamily::Olmo2, OLMO2)?;
    c.attention_bias = f.bool_or("attention_bias", false)?;
    Ok(ModelConfig::Llama(c))
}

pub fn write(c: &TransformerConfig) -> Res<Map<String, Value>> {
    super::refuse_switches(c, "olmo2", &["attention_bias"])?;
    let mut m = decoder_json(c, "Olmo2ForCausalLM");
    m.insert("attention_bias".into(), json!(c.variant.attention_bias));
    Ok(m)
}
