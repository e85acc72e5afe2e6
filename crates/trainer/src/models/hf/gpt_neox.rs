//! GPT-NeoX and Pythia in config.json (`model_type` "gpt_neox"): LayerNorms with biases, RoPE on
//! a share of each head, q/k/v in one projection laid out head by head, an exact-GELU MLP with
//! biases, and a parallel residual by default.
//!
//! Reads the sizes (`vocab_size`, `hidden_size`, `num_hidden_layers`, `num_attention_heads`,
//! `intermediate_size`, `max_position_embeddings`), `layer_norm_eps`, `tie_word_embeddings`,
//! `use_parallel_residual`, `attention_bias`, and the rotary settings: `rope_parameters` (or a
//! legacy `rope_scaling`) with `rope_theta` and `partial_rotary_factor`, falling back to the 4.x
//! names `rotary_emb_base` (10000) and `rotary_pct` (0.25). Must keep their default:
//! `hidden_act` "gelu", `attention_dropout` and `hidden_dropout` 0. Ignored:
//! `classifier_dropout` (the sequence-classification head's) and `fields::NO_EFFECT`.

use super::fields::{Fields, Res};
use super::llama::{rope_dict, scaling_json};
use crate::models::config::{GptNeoxConfig, ModelConfig};
use crate::models::transformer::TransformerConfig;
use serde_json::{json, Map, Value};

pub fn read(f: &mut Fields) -> Res<ModelConfig> {
    f.decoder_only()?;
    f.must_be(
        "hidden_act",
        &[json!("gelu")],
        "the GPT-NeoX MLP computes the exact (erf) GELU",
    )?;
    for k in ["attention_dropout", "hidden_dropout"] {
        f.must_be(
            k,
            &[json!(0), json!(0.0)],
            "dropout is not implemented for GPT-NeoX",
        )?;
    }
    f.ignore(&["classifier_dropout"]);
    let theta = f.float_or("rotary_emb_base", 10000.0)?;
    let partial = f.float_or("rotary_pct", 0.25)?;
    let max_pos = f.int("max_position_embeddings")?;
    // transformers 5: `rope_scaling` (legacy) takes the place of `rope_parameters`.
    let dict = match (f.value("rope_scaling"), f.value("rope_parameters")) {
        (Some(s), _) => ("rope_scaling", s.clone()),
        (None, Some(p)) => ("rope_parameters", p.clone()),
        (None, None) => ("rope_parameters", json!({"rope_type": "default"})),
    };
    let rope = rope_dict(dict.0, &dict.1, theta, partial, max_pos)?;
    Ok(ModelConfig::GptNeox(GptNeoxConfig {
        vocab_size: f.int("vocab_size")?,
        d_model: f.int("hidden_size")?,
        n_layers: f.int("num_hidden_layers")?,
        n_heads: f.int("num_attention_heads")?,
        d_ff: f.int("intermediate_size")?,
        max_seq_len: max_pos,
        rope_theta: rope.theta,
        rope_scaling: rope.scaling,
        partial_rotary_factor: rope.partial_rotary_factor.unwrap_or(1.0),
        norm_eps: f.float_or("layer_norm_eps", 1e-5)?,
        parallel_residual: f.bool_or("use_parallel_residual", true)?,
        attention_bias: f.bool_or("attention_bias", true)?,
        tie_embeddings: f.bool_or("tie_word_embeddings", false)?,
    }))
}

pub fn write(c: &TransformerConfig) -> Map<String, Value> {
    let v = &c.variant;
    let mut rope = scaling_json(c);
    rope.insert("rope_theta".into(), json!(c.rope_theta));
    // GPT-NeoX's default share is 0.25: written even when it is 1.
    rope.insert(
        "partial_rotary_factor".into(),
        json!(v.partial_rotary_factor.unwrap_or(1.0)),
    );
    let m = json!({
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "intermediate_size": c.d_ff,
        "max_position_embeddings": c.max_seq_len,
        "layer_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "use_parallel_residual": v.parallel_residual,
        "attention_bias": v.attention_bias,
        "hidden_act": "gelu",
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "rope_parameters": rope,
        "initializer_range": 0.02,
        "dtype": "float32",
    });
    match m {
        Value::Object(map) => map,
        _ => Map::new(),
    }
}
