//! Granite (IBM Granite 3.x dense) in config.json: Llama with four scalings, kept as
//! `[model.multipliers]`: `embedding_multiplier` (token embeddings), `residual_multiplier` (each
//! attention and MLP output before its residual add), `attention_multiplier` (the attention
//! scores' factor, in place of 1/sqrt(head_dim); its default is 1.0), `logits_scaling` (logits
//! divided by it).
//!
//! Reads what Llama reads (`llama::decoder`), `attention_bias`, `mlp_bias` and the four scalings
//! (absent: 1.0, transformers' defaults).

use super::fields::{Fields, Res};
use super::llama::{decoder, decoder_json, Defaults};
use crate::models::config::{DecoderFamily, ModelConfig, Multipliers};
use crate::models::transformer::TransformerConfig;
use serde_json::{json, Map, Value};

pub fn read(f: &mut Fields) -> Res<ModelConfig> {
    let mut c = decoder(f, DecoderFamily::Granite, Defaults::LLAMA)?;
    c.attention_bias = f.bool_or("attention_bias", false)?;
    c.mlp_bias = f.bool_or("mlp_bias", false)?;
    c.multipliers = Some(Multipliers {
        embedding: f.float_or("embedding_multiplier", 1.0)?,
        residual: f.float_or("residual_multiplier", 1.0)?,
        attention: f.float_or("attention_multiplier", 1.0)?,
        logits_scaling: f.float_or("logits_scaling", 1.0)?,
    });
    Ok(ModelConfig::Llama(c))
}

pub fn write(c: &TransformerConfig) -> Res<Map<String, Value>> {
    super::refuse_switches(c, "granite", &["attention_bias", "mlp_bias"])?;
    let Some(mult) = c.variant.multipliers else {
        return Err("a granite model needs [model.multipliers]".to_string());
    };
    let mut m = decoder_json(c, "GraniteForCausalLM");
    for (k, v) in [
        ("attention_bias", json!(c.variant.attention_bias)),
        ("mlp_bias", json!(c.variant.mlp_bias)),
        ("embedding_multiplier", json!(mult.embedding)),
        ("residual_multiplier", json!(mult.residual)),
        ("attention_multiplier", json!(mult.attention)),
        ("logits_scaling", json!(mult.logits_scaling)),
    ] {
        m.insert(k.into(), v);
    }
    Ok(m)
}
