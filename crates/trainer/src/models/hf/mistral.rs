//! Mistral in config.json: the Llama computation, plus a sliding window on every layer.
//!
//! Reads what Llama reads (`llama::decoder`) and `sliding_window` (absent: 4096, transformers'
//! default; null: full attention). Has no `attention_bias` or `mlp_bias` field: present, they
//! are refused.

use super::fields::{Fields, Res};
use super::llama::{decoder, decoder_json, Defaults};
use crate::models::config::{DecoderFamily, ModelConfig};
use crate::models::transformer::TransformerConfig;
use serde_json::{json, Map, Value};

pub fn read(f: &mut Fields) -> Res<ModelConfig> {
    let mut c = decoder(f, DecoderFamily::Mistral, Defaults::LLAMA)?;
    c.sliding_window = f.int_unless_null("sliding_window", Some(4096))?;
    Ok(ModelConfig::Llama(c))
}

pub fn write(c: &TransformerConfig) -> Res<Map<String, Value>> {
    super::refuse_switches(c, "mistral", &["sliding_window"])?;
    let mut m = decoder_json(c, "MistralForCausalLM");
    m.insert("sliding_window".into(), json!(c.variant.sliding_window));
    Ok(m)
}
