//! Mixtral in config.json: Llama-style attention with Mixture-of-Experts MLPs (softmax over all
//! experts, then top-k, renormalised), optionally a sliding window.
//!
//! Reads what Llama reads (`llama::decoder`, with Mixtral's defaults: eps 1e-5, theta 1e6),
//! `num_local_experts`, `num_experts_per_tok`, `router_aux_loss_coef`, `sliding_window`.
//! Must keep their default: `router_jitter_noise = 0`. Ignored: `output_router_logits`
//! (whether transformers returns the router logits; this tool always adds the weighted
//! auxiliary loss in training).

use super::fields::{Fields, Res};
use super::llama::{decoder, decoder_json, Defaults};
use crate::models::config::{DecoderFamily, ModelConfig};
use crate::models::moe::{MoeConfig, Routing};
use crate::models::transformer::TransformerConfig;
use serde_json::{json, Map, Value};

const MIXTRAL: Defaults = Defaults {
    rms_norm_eps: 1e-5,
    rope_theta: 1e6,
    ..Defaults::LLAMA
};

pub fn read(f: &mut Fields) -> Res<ModelConfig> {
    let mut c = decoder(f, DecoderFamily::Llama, MIXTRAL)?;
    f.must_be(
        "router_jitter_noise",
        &[json!(0), json!(0.0)],
        "no router jitter",
    )?;
    f.ignore(&["output_router_logits"]);
    c.sliding_window = f.opt_int("sliding_window")?;
    c.moe = Some(MoeConfig {
        n_experts: f.int("num_local_experts")?,
        top_k: f.int("num_experts_per_tok")?,
        routing: Routing::SoftmaxThenTopK,
        capacity_factor: None,
        aux_loss_coef: f.float_or("router_aux_loss_coef", 0.001)?,
        router_z_loss_coef: 0.0,
        shared_expert: false,
    });
    Ok(ModelConfig::Llama(c))
}

pub fn write(c: &TransformerConfig, m: &MoeConfig) -> Res<Map<String, Value>> {
    if m.routing != Routing::SoftmaxThenTopK || m.capacity_factor.is_some() || m.shared_expert {
        return Err(
            "only Mixtral-style MoE exports to Hugging Face (routing = softmax_top_k, no \
             capacity_factor, no shared_expert)"
                .to_string(),
        );
    }
    if c.variant.family != DecoderFamily::Llama {
        return Err(format!(
            "model.family = {:?} with [model.moe] has no Hugging Face architecture; only \
             Llama-style attention with experts exports (as Mixtral)",
            c.variant.family.model_type()
        ));
    }
    super::refuse_switches(c, "mixtral", &["sliding_window"])?;
    let mut out = decoder_json(c, "MixtralForCausalLM");
    out.insert("model_type".into(), json!("mixtral"));
    for (k, v) in [
        ("num_local_experts", json!(m.n_experts)),
        ("num_experts_per_tok", json!(m.top_k)),
        ("router_aux_loss_coef", json!(m.aux_loss_coef)),
        ("router_jitter_noise", json!(0.0)),
        ("output_router_logits", json!(false)),
        ("sliding_window", json!(c.variant.sliding_window)),
    ] {
        out.insert(k.into(), v);
    }
    Ok(out)
}
