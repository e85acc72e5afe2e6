//! Qwen2 and Qwen2.5 in config.json: Llama with biases on q, k and v (not on o_proj), and
//! optional sliding-window attention on the upper layers.
//!
//! Reads what Llama reads (`llama::decoder`), and `use_sliding_window`, `sliding_window`,
//! `max_window_layers`, `layer_types` (`sliding`). Has no `attention_bias` or `mlp_bias`
//! field: present, they are refused.

use super::fields::{Fields, Res};
use super::llama::{decoder, decoder_json, Defaults};
use crate::models::config::{DecoderFamily, LayerType, ModelConfig};
use crate::models::transformer::TransformerConfig;
use serde_json::{json, Map, Value};

pub fn read(f: &mut Fields) -> Res<ModelConfig> {
    let mut c = decoder(f, DecoderFamily::Qwen2, Defaults::LLAMA)?;
    (c.sliding_window, c.layer_types) = sliding(f, c.n_layers)?;
    Ok(ModelConfig::Llama(c))
}

pub fn write(c: &TransformerConfig) -> Res<Map<String, Value>> {
    super::refuse_switches(c, "qwen2", &["sliding_window", "layer_types"])?;
    let mut m = decoder_json(c, "Qwen2ForCausalLM");
    sliding_json(c, &mut m);
    Ok(m)
}

/// Qwen's window settings: the window applies only with `use_sliding_window`, to the layers
/// `layer_types` marks, or when it is absent to layers from `max_window_layers` on.
pub fn sliding(f: &mut Fields, n_layers: i64) -> Res<(Option<i64>, Option<Vec<LayerType>>)> {
    let enabled = f.bool_or("use_sliding_window", false)?;
    let window = f.opt_int("sliding_window")?.filter(|_| enabled);
    let from_layer = f.opt_int("max_window_layers")?.unwrap_or(28);
    let types: Vec<LayerType> = match f.value("layer_types") {
        Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
            format!(
                "layer_types = {v}: expected a list of \"full_attention\" / \"sliding_attention\""
            )
        })?,
        None => (0..n_layers)
            .map(|i| {
                if window.is_some() && i >= from_layer {
                    LayerType::SlidingAttention
                } else {
                    LayerType::FullAttention
                }
            })
            .collect(),
    };
    let any_sliding = types.contains(&LayerType::SlidingAttention);
    if any_sliding && window.is_none() {
        return Err(
            "layer_types marks sliding_attention layers but use_sliding_window is false or \
             sliding_window is null"
                .to_string(),
        );
    }
    Ok((window, any_sliding.then_some(types)))
}

pub fn sliding_json(c: &TransformerConfig, m: &mut Map<String, Value>) {
    let v = &c.variant;
    let types: Vec<LayerType> = (0..c.n_layers as usize)
        .map(|i| {
            let sliding = v.sliding_window.is_some()
                && v.sliding_layers
                    .as_ref()
                    .is_none_or(|l| l.get(i).copied().unwrap_or(false));
            if sliding {
                LayerType::SlidingAttention
            } else {
                LayerType::FullAttention
            }
        })
        .collect();
    m.insert(
        "use_sliding_window".into(),
        json!(v.sliding_window.is_some()),
    );
    m.insert("sliding_window".into(), json!(v.sliding_window));
    m.insert("max_window_layers".into(), json!(c.n_layers));
    m.insert("layer_types".into(), json!(types));
}
