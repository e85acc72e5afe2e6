//! Gemma (1) in config.json: Llama with GeGLU MLPs (`hidden_act = "gelu_pytorch_tanh"`; the
//! legacy "gelu" means the same in transformers), RMSNorm scaling by `1 + w`, embeddings
//! multiplied by sqrt(hidden_size), `head_dim` (absent: 256) and tied embeddings by default.
//!
//! Reads what Llama reads (`llama::decoder`, with Gemma's defaults) and `attention_bias`.
//! Must keep their default: `hidden_activation` (older configs) "gelu_pytorch_tanh",
//! `use_bidirectional_attention` false. Has no `mlp_bias` field: present, it is refused.

use super::fields::{Fields, Res};
use super::llama::{decoder, decoder_json, Defaults};
use crate::models::config::{DecoderFamily, ModelConfig};
use crate::models::transformer::TransformerConfig;
use serde_json::{json, Map, Value};

pub const GEMMA: Defaults = Defaults {
    head_dim: Some(256),
    tie_word_embeddings: true,
    hidden_act: &["gelu_pytorch_tanh", "gelu"],
    ..Defaults::LLAMA
};

pub fn read(f: &mut Fields) -> Res<ModelConfig> {
    let mut c = decoder(f, DecoderFamily::Gemma, GEMMA)?;
    f.must_be(
        "hidden_activation",
        &[json!("gelu_pytorch_tanh")],
        "Gemma's MLP is GeGLU with the tanh GELU",
    )?;
    f.must_be(
        "use_bidirectional_attention",
        &[json!(false)],
        "causal attention only",
    )?;
    c.attention_bias = f.bool_or("attention_bias", false)?;
    Ok(ModelConfig::Llama(c))
}

pub fn write(c: &TransformerConfig) -> Res<Map<String, Value>> {
    super::refuse_switches(c, "gemma", &["attention_bias"])?;
    let mut m = decoder_json(c, "GemmaForCausalLM");
    m.insert("attention_bias".into(), json!(c.variant.attention_bias));
    Ok(m)
}
