//! Gemma 2 in config.json: Gemma (GeGLU, `(1 + w)` RMSNorm, embeddings scaled by
//! sqrt(hidden_size), `head_dim` 256 when absent) with norms before and after both attention and
//! MLP, attention scores scaled by `query_pre_attn_scalar ** -0.5` and soft-capped
//! (`attn_logit_softcapping`), logits soft-capped (`final_logit_softcapping`), and a sliding
//! window on alternating layers (`layer_types`; absent: layers 0, 2, 4, ... slide).
//!
//! Reads what Llama reads (`llama::decoder`, with Gemma's defaults), `attention_bias`, those
//! four, and `sliding_window`. The soft-caps and the window are on when absent (50, 30, 4096, as
//! transformers' Gemma2Config) and off when null. Must keep their default: `hidden_activation`
//! "gelu_pytorch_tanh", `use_bidirectional_attention` false or null. Has no `mlp_bias` field:
//! present, it is refused.

use super::fields::{Fields, Res};
use super::gemma::GEMMA;
use super::llama::{decoder, decoder_json};
use crate::models::config::{DecoderFamily, LayerType, LlamaConfig, ModelConfig};
use crate::models::transformer::TransformerConfig;
use serde_json::{json, Map, Value};

pub fn read(f: &mut Fields) -> Res<ModelConfig> {
    let mut c = decoder(f, DecoderFamily::Gemma2, GEMMA)?;
    read_gemma2_fields(f, &mut c, (Some(50.0), Some(30.0)))?;
    c.layer_types = Some(layer_types(f, c.n_layers, 2)?);
    Ok(ModelConfig::Llama(c))
}

pub fn write(c: &TransformerConfig) -> Res<Map<String, Value>> {
    let mut m = decoder_json(c, "Gemma2ForCausalLM");
    gemma2_json(c, "gemma2", &mut m)?;
    Ok(m)
}

/// The fields Gemma 2 and 3 share: activation, causality, attention bias, attention scale,
/// the two soft-caps (`softcaps`: their defaults when absent) and the window.
pub fn read_gemma2_fields(
    f: &mut Fields,
    c: &mut LlamaConfig,
    softcaps: (Option<f64>, Option<f64>),
) -> Res<()> {
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
    c.query_pre_attn_scalar = Some(f.float_or("query_pre_attn_scalar", 256.0)?);
    c.attention_softcap = f.float_unless_null("attn_logit_softcapping", softcaps.0)?;
    c.logits_softcap = f.float_unless_null("final_logit_softcapping", softcaps.1)?;
    c.sliding_window = f.int_unless_null("sliding_window", Some(4096))?;
    Ok(())
}

/// `layer_types`, or when absent transformers' default: every `pattern`-th layer (counting
/// from 1) has full attention, the others slide.
pub fn layer_types(f: &mut Fields, n_layers: i64, pattern: i64) -> Res<Vec<LayerType>> {
    match f.value("layer_types") {
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
            format!(
                "layer_types = {v}: expected a list of \"full_attention\" / \"sliding_attention\""
            )
        }),
        None => Ok((0..n_layers)
            .map(|i| {
                if (i + 1) % pattern == 0 {
                    LayerType::FullAttention
                } else {
                    LayerType::SlidingAttention
                }
            })
            .collect()),
    }
}

/// What `read_gemma2_fields` and `layer_types` read, written back; refuses the switches a
/// `family` config.json has no field for.
pub fn gemma2_json(c: &TransformerConfig, family: &str, m: &mut Map<String, Value>) -> Res<()> {
    let v = &c.variant;
    let mut expressed = vec![
        "attention_bias",
        "sliding_window",
        "layer_types",
        "attention_softcap",
        "logits_softcap",
        "query_pre_attn_scalar",
    ];
    if family == "gemma3_text" {
        expressed.push("local_rope_theta");
    }
    super::refuse_switches(c, family, &expressed)?;
    let types: Vec<LayerType> = (0..c.n_layers as usize)
        .map(|i| match &v.sliding_layers {
            Some(layers) if !layers.get(i).copied().unwrap_or(false) => LayerType::FullAttention,
            _ if v.sliding_window.is_none() => LayerType::FullAttention,
            _ => LayerType::SlidingAttention,
        })
        .collect();
    // transformers types it as an integer: written as one when it is whole.
    let scalar = v.query_pre_attn_scalar.unwrap_or(c.head_dim() as f64);
    let number = |x: f64| {
        if x.fract() == 0.0 && x.abs() < 1e15 {
            json!(x as i64)
        } else {
            json!(x)
        }
    };
    m.remove("hidden_act");
    for (k, value) in [
        ("hidden_activation", json!("gelu_pytorch_tanh")),
        ("attention_bias", json!(v.attention_bias)),
        ("query_pre_attn_scalar", number(scalar)),
        ("attn_logit_softcapping", json!(v.attention_softcap)),
        ("final_logit_softcapping", json!(v.logits_softcap)),
        ("sliding_window", json!(v.sliding_window)),
        ("layer_types", json!(types)),
        ("use_bidirectional_attention", json!(false)),
    ] {
        m.insert(k.into(), value);
    }
    Ok(())
}
