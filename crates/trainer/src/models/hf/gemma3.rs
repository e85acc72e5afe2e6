//! Gemma 3's text model in config.json (`model_type` "gemma3_text", Gemma3ForCausalLM): Gemma 2
//! with a `(1 + w)` RMSNorm over each head of q and of k before RoPE, no soft-capping unless
//! set (`attn_logit_softcapping`, `final_logit_softcapping` null by default), five sliding
//! layers per full one (`layer_types`, or `sliding_window_pattern` when absent), and a RoPE of
//! its own for the sliding layers.
//!
//! RoPE: `rope_parameters` as transformers 5 writes it (`full_attention` and
//! `sliding_attention` entries), or the 4.x fields `rope_theta` (full layers, default 1e6),
//! `rope_scaling` (full layers) and `rope_local_base_freq` (sliding layers, default 1e4). The
//! sliding layers' RoPE must be plain (no scaling). Everything else as `gemma2.rs`. The
//! multimodal Gemma 3 (`model_type` "gemma3") is refused by its model_type.

use super::fields::{Fields, Res};
use super::gemma::GEMMA;
use super::gemma2::{gemma2_json, layer_types, read_gemma2_fields};
use super::llama::{decoder_json, decoder_with_rope, rope_dict, Rope};
use crate::models::config::{DecoderFamily, ModelConfig};
use crate::models::transformer::TransformerConfig;
use serde_json::{json, Map, Value};

pub fn read(f: &mut Fields) -> Res<ModelConfig> {
    let (full, local_theta) = rope(f)?;
    let mut c = decoder_with_rope(f, DecoderFamily::Gemma3, GEMMA, full)?;
    c.local_rope_theta = Some(local_theta);
    read_gemma2_fields(f, &mut c, (None, None))?;
    let pattern = match f.opt_int("sliding_window_pattern")? {
        Some(p) => Some(p),
        None => f.opt_int("_sliding_window_pattern")?,
    };
    let pattern = pattern.unwrap_or(6);
    if pattern < 1 {
        return Err(format!(
            "sliding_window_pattern = {pattern}: expected a positive integer"
        ));
    }
    c.layer_types = Some(layer_types(f, c.n_layers, pattern)?);
    Ok(ModelConfig::Llama(c))
}

/// The full-attention layers' RoPE and the sliding layers' base, from either layout.
fn rope(f: &mut Fields) -> Res<(Rope, f64)> {
    let max_pos = f.int("max_position_embeddings")?;
    let top_theta = f.float_or("rope_theta", 1e6)?;
    let local_theta = f.float_or("rope_local_base_freq", 1e4)?;
    let params = f.value("rope_parameters").cloned();
    let scaling = f.value("rope_scaling").cloned();
    let mut by_type = match &params {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(v) => return Err(format!("rope_parameters = {v}: expected an object")),
    };
    if let Some(k) = by_type
        .keys()
        .find(|k| *k != "full_attention" && *k != "sliding_attention")
    {
        return Err(format!(
            "rope_parameters.{k}: expected only \"full_attention\" and \"sliding_attention\" \
             entries (Gemma 3 has one RoPE per layer type)"
        ));
    }
    // transformers updates the full layers' entry with a legacy `rope_scaling`.
    let mut full = by_type
        .remove("full_attention")
        .unwrap_or_else(|| json!({"rope_type": "default"}));
    if let (Some(Value::Object(s)), Value::Object(full)) = (&scaling, &mut full) {
        full.extend(s.clone());
    } else if let Some(s) = &scaling {
        return Err(format!("rope_scaling = {s}: expected an object"));
    }
    let full = rope_dict(
        "rope_parameters.full_attention",
        &full,
        top_theta,
        1.0,
        max_pos,
    )?;
    let local = by_type
        .remove("sliding_attention")
        .unwrap_or_else(|| json!({"rope_type": "default"}));
    let local = rope_dict(
        "rope_parameters.sliding_attention",
        &local,
        local_theta,
        1.0,
        max_pos,
    )?;
    if local.scaling.is_some() {
        return Err(
            "unsupported rope_parameters.sliding_attention.rope_type: the sliding layers' RoPE \
             must be \"default\" (unscaled)"
                .to_string(),
        );
    }
    for (which, r) in [("full_attention", &full), ("sliding_attention", &local)] {
        if r.partial_rotary_factor.is_some() {
            return Err(format!(
                "unsupported rope_parameters.{which}.partial_rotary_factor: Gemma 3 rotates \
                 whole heads"
            ));
        }
    }
    Ok((full, local.theta))
}

pub fn write(c: &TransformerConfig) -> Res<Map<String, Value>> {
    let mut m = decoder_json(c, "Gemma3ForCausalLM");
    gemma2_json(c, "gemma3_text", &mut m)?;
    // One RoPE per layer type, as transformers 5 writes it.
    let full = m.remove("rope_parameters").unwrap_or_else(|| json!({}));
    m.remove("rope_scaling");
    m.remove("rope_theta");
    let local_theta = c.variant.local_rope_theta.unwrap_or(c.rope_theta);
    m.insert(
        "rope_parameters".into(),
        json!({
            "full_attention": full,
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        }),
    );
    Ok(m)
}
