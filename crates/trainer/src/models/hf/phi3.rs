//! Phi-3 in config.json: Llama with q, k and v stored as one projection
//! (`self_attn.qkv_proj`, q rows then k then v) and gate and up as one (`mlp.gate_up_proj`,
//! gate rows first), RoPE on a share of each head (`partial_rotary_factor`), and an optional
//! sliding window on every layer.
//!
//! Reads what Llama reads (`llama::decoder`, with Phi-3's default eps 1e-5; the rotary
//! settings with `partial_rotary_factor`), and `sliding_window` (null: none). Must keep their
//! default: `resid_pdrop` and `embd_pdrop` 0 (training dropout is not implemented for this
//! family). Ignored: `original_max_position_embeddings` (read only by "longrope", which the
//! rotary reader refuses). Has no `attention_bias` or `mlp_bias`: present, they are refused.

use super::fields::{Fields, Res};
use super::llama::{decoder, decoder_json, Defaults};
use crate::models::config::{DecoderFamily, ModelConfig};
use crate::models::transformer::TransformerConfig;
use serde_json::{json, Map, Value};

const PHI3: Defaults = Defaults {
    rms_norm_eps: 1e-5,
    partial_rotary: true,
    ..Defaults::LLAMA
};

pub fn read(f: &mut Fields) -> Res<ModelConfig> {
    let mut c = decoder(f, DecoderFamily::Phi3, PHI3)?;
    for k in ["resid_pdrop", "embd_pdrop"] {
        f.must_be(
            k,
            &[json!(0), json!(0.0)],
            "dropout is not implemented for Phi-3",
        )?;
    }
    f.ignore(&["original_max_position_embeddings"]);
    c.sliding_window = f.opt_int("sliding_window")?;
    Ok(ModelConfig::Llama(c))
}

pub fn write(c: &TransformerConfig) -> Res<Map<String, Value>> {
    super::refuse_switches(c, "phi3", &["sliding_window", "partial_rotary_factor"])?;
    let mut m = decoder_json(c, "Phi3ForCausalLM");
    for (k, v) in [
        ("sliding_window", json!(c.variant.sliding_window)),
        ("resid_pdrop", json!(0.0)),
        ("embd_pdrop", json!(0.0)),
        ("original_max_position_embeddings", json!(c.max_seq_len)),
        // transformers' default (32000) is an embedding row only at Phi-3's own vocabulary
        // size; the model's padding row is the tokenizer's business, not the computation's.
        ("pad_token_id", Value::Null),
    ] {
        m.insert(k.into(), v);
    }
    Ok(m)
}
