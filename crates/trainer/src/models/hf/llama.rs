//! Llama (1, 2, 3.x) in config.json, and the fields every Llama-style family shares.
//!
//! Llama reads: the sizes (`vocab_size`, `hidden_size`, `num_hidden_layers`,
//! `num_attention_heads`, `num_key_value_heads`, `head_dim`, `intermediate_size`,
//! `max_position_embeddings`), `rms_norm_eps`, `tie_word_embeddings`, the rotary settings
//! (`rope_parameters` as transformers 5 writes them, or `rope_theta` and `rope_scaling` as 4.x
//! did: default, linear, dynamic, llama3, yarn), `attention_bias`, `mlp_bias`.
//! Must keep their default: `hidden_act = "silu"`, `attention_dropout = 0`.
//! Ignored: `pretraining_tp` (4.x split the matmuls into slices: the same product) and the
//! fields of `fields::NO_EFFECT`.

use super::fields::{Fields, Res};
use crate::models::config::{DecoderFamily, LlamaConfig, ModelConfig};
use crate::models::rope::RopeScaling;
use crate::models::transformer::TransformerConfig;
use serde_json::{json, Map, Value};

pub fn read(f: &mut Fields) -> Res<ModelConfig> {
    let mut c = decoder(f, DecoderFamily::Llama, Defaults::LLAMA)?;
    c.attention_bias = f.bool_or("attention_bias", false)?;
    c.mlp_bias = f.bool_or("mlp_bias", false)?;
    f.ignore(&["pretraining_tp"]);
    Ok(ModelConfig::Llama(c))
}

pub fn write(c: &TransformerConfig) -> Res<Map<String, Value>> {
    super::refuse_switches(c, "llama", &["attention_bias", "mlp_bias"])?;
    let mut m = decoder_json(c, "LlamaForCausalLM");
    m.insert("attention_bias".into(), json!(c.variant.attention_bias));
    m.insert("mlp_bias".into(), json!(c.variant.mlp_bias));
    m.insert("pretraining_tp".into(), json!(1));
    Ok(m)
}

/// The values transformers' config class takes for absent fields.
pub struct Defaults {
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// None: hidden_size / num_attention_heads.
    pub head_dim: Option<i64>,
    pub tie_word_embeddings: bool,
    /// The `hidden_act` values that name the family's MLP activation (the first is the default).
    pub hidden_act: &'static [&'static str],
    /// Whether the family's attention rotates part of each head (`partial_rotary_factor`).
    pub partial_rotary: bool,
}

impl Defaults {
    pub const LLAMA: Defaults = Defaults {
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        head_dim: None,
        tie_word_embeddings: false,
        hidden_act: &["silu"],
        partial_rotary: false,
    };
}

/// The sizes, norm, embeddings and rotary settings every Llama-style family shares; the
/// family's own switches are left at their defaults for its reader to set.
pub fn decoder(f: &mut Fields, family: DecoderFamily, defaults: Defaults) -> Res<LlamaConfig> {
    let rope = rope(f, defaults.rope_theta, defaults.partial_rotary)?;
    decoder_with_rope(f, family, defaults, rope)
}

/// `decoder` for a family that reads its rotary settings itself (Gemma 3).
pub fn decoder_with_rope(
    f: &mut Fields,
    family: DecoderFamily,
    defaults: Defaults,
    rope: Rope,
) -> Res<LlamaConfig> {
    f.decoder_only()?;
    let acts: Vec<Value> = defaults.hidden_act.iter().map(|a| json!(a)).collect();
    f.must_be(
        "hidden_act",
        &acts,
        &format!(
            "the {} MLP computes {}",
            family.model_type(),
            if family.gemma() {
                "GeGLU (tanh GELU)"
            } else {
                "SwiGLU (\"silu\")"
            }
        ),
    )?;
    f.must_be(
        "attention_dropout",
        &[json!(0), json!(0.0)],
        "attention dropout is not implemented",
    )?;
    let (d, heads) = (f.int("hidden_size")?, f.int("num_attention_heads")?);
    let head_dim = f.opt_int("head_dim")?.or(defaults.head_dim);
    Ok(LlamaConfig {
        vocab_size: f.int("vocab_size")?,
        d_model: d,
        n_layers: f.int("num_hidden_layers")?,
        n_heads: heads,
        n_kv_heads: Some(f.opt_int("num_key_value_heads")?.unwrap_or(heads)),
        // Kept only when it is not hidden_size / heads (Qwen3, head-pruned models).
        head_dim: head_dim.filter(|hd| heads == 0 || hd * heads != d),
        d_ff: f.int("intermediate_size")?,
        max_seq_len: f.int("max_position_embeddings")?,
        rope_theta: rope.theta,
        norm_eps: f.float_or("rms_norm_eps", defaults.rms_norm_eps)?,
        tie_embeddings: f.bool_or("tie_word_embeddings", defaults.tie_word_embeddings)?,
        moe: None,
        family,
        attention_bias: false,
        mlp_bias: false,
        rope_scaling: rope.scaling,
        sliding_window: None,
        layer_types: None,
        multipliers: None,
        attention_softcap: None,
        logits_softcap: None,
        query_pre_attn_scalar: None,
        local_rope_theta: None,
        partial_rotary_factor: rope.partial_rotary_factor,
    })
}

/// One rotary setting: its base, its frequency scaling, and the share of each head rotated.
pub struct Rope {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
    /// None: the whole head.
    pub partial_rotary_factor: Option<f64>,
}

/// The rotary base and scaling, from `rope_parameters` (transformers 5) or `rope_theta` and
/// `rope_scaling` (4.x). Every key of the scaling is read or refused; a partial rotary factor
/// other than 1 only where `partial` (families whose attention rotates part of each head).
fn rope(f: &mut Fields, default_theta: f64, partial: bool) -> Res<Rope> {
    let top_theta = f.float_or("rope_theta", default_theta)?;
    // Phi-3 and GPT-NeoX take a top-level factor when the rope dict has none.
    let top_partial = if partial {
        f.float_or("partial_rotary_factor", 1.0)?
    } else {
        1.0
    };
    let scaling = f.value("rope_scaling");
    let params = f.value("rope_parameters");
    // transformers 5 gives `rope_scaling` priority over `rope_parameters` when both are set.
    let (key, dict) = match (scaling, params) {
        (Some(s), _) => ("rope_scaling", s),
        (None, Some(p)) => ("rope_parameters", p),
        (None, None) => {
            return Ok(Rope {
                theta: top_theta,
                scaling: None,
                partial_rotary_factor: Some(top_partial).filter(|&p| p != 1.0),
            })
        }
    };
    let max_pos = f.int("max_position_embeddings")?;
    let rope = rope_dict(key, dict, top_theta, top_partial, max_pos)?;
    if !partial && rope.partial_rotary_factor.is_some() {
        return Err(format!(
            "unsupported {key}.partial_rotary_factor = {}: this family rotates whole heads",
            rope.partial_rotary_factor.unwrap_or(1.0)
        ));
    }
    Ok(rope)
}

/// One rope dict (`rope_parameters`, `rope_scaling`, or a per-layer-type entry of Gemma 3's),
/// named `key` in errors; `theta` and `partial` are the values it falls back to.
pub fn rope_dict(key: &str, dict: &Value, theta: f64, partial: f64, max_pos: i64) -> Res<Rope> {
    let map = dict
        .as_object()
        .ok_or_else(|| format!("{key} = {dict}: expected an object"))?;
    let kind = match map.get("rope_type").or(map.get("type")) {
        None | Some(Value::Null) => "default".to_string(),
        Some(v) => v
            .as_str()
            .ok_or_else(|| format!("{key}.rope_type = {v}: expected a string"))?
            .to_string(),
    };
    let mut r = Fields::new(map, format!("{key} (rope_type {kind:?})"));
    r.ignore(&["rope_type", "type"]);
    let in_key = |e: String| format!("{key}.{e}");
    let theta = r.float_or("rope_theta", theta).map_err(in_key)?;
    let partial = r
        .float_or("partial_rotary_factor", partial)
        .map_err(in_key)?;
    let scaling = read_scaling(&mut r, &kind, max_pos).map_err(|e| format!("{key}: {e}"))?;
    r.finish()?;
    Ok(Rope {
        theta,
        scaling,
        partial_rotary_factor: Some(partial).filter(|&p| p != 1.0),
    })
}

fn read_scaling(r: &mut Fields, kind: &str, max_pos: i64) -> Res<Option<RopeScaling>> {
    // transformers fills a missing original length with max_position_embeddings.
    let original = |r: &mut Fields| -> Res<i64> {
        Ok(r.opt_int("original_max_position_embeddings")?
            .unwrap_or(max_pos))
    };
    Ok(match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: r.float("factor")?,
        }),
        "dynamic" => Some(RopeScaling::Dynamic {
            factor: r.float("factor")?,
        }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: r.float("factor")?,
            low_freq_factor: r.float("low_freq_factor")?,
            high_freq_factor: r.float("high_freq_factor")?,
            original_max_position_embeddings: original(r)?,
        }),
        "yarn" => Some(RopeScaling::Yarn {
            factor: r.float("factor")?,
            original_max_position_embeddings: original(r)?,
            attention_factor: r.opt_float("attention_factor")?,
            beta_fast: r.opt_float("beta_fast")?,
            beta_slow: r.opt_float("beta_slow")?,
            mscale: r.opt_float("mscale")?,
            mscale_all_dim: r.opt_float("mscale_all_dim")?,
            truncate: match r.value("truncate") {
                None => None,
                Some(v) => Some(
                    v.as_bool()
                        .ok_or_else(|| format!("truncate = {v}: expected true or false"))?,
                ),
            },
        }),
        other => {
            return Err(format!(
                "unsupported rope_type {other:?} (supported: default, linear, dynamic, llama3, \
                 yarn)"
            ))
        }
    })
}

/// `rope_theta` and `rope_parameters` as transformers 5 writes them, plus `rope_scaling` for
/// transformers 4.x readers when the frequencies are scaled.
fn rope_json(c: &TransformerConfig, m: &mut Map<String, Value>) {
    let mut params = scaling_json(c);
    if c.variant.rope_scaling.is_some() {
        m.insert("rope_scaling".into(), Value::Object(params.clone()));
    }
    params.insert("rope_theta".into(), json!(c.rope_theta));
    m.insert("rope_theta".into(), json!(c.rope_theta));
    m.insert("rope_parameters".into(), Value::Object(params));
}

/// The rope dict without its base: `rope_type` (and the scaling's fields as transformers names
/// them), and `partial_rotary_factor` when part of each head rotates.
pub fn scaling_json(c: &TransformerConfig) -> Map<String, Value> {
    let mut params = match &c.variant.rope_scaling {
        None => Map::new(),
        Some(s) => match serde_json::to_value(s) {
            Ok(Value::Object(mut o)) => {
                if let Some(t) = o.remove("type") {
                    o.insert("rope_type".into(), t);
                }
                o
            }
            _ => Map::new(),
        },
    };
    params
        .entry("rope_type")
        .or_insert_with(|| json!("default"));
    if let Some(p) = c.variant.partial_rotary_factor {
        params.insert("partial_rotary_factor".into(), json!(p));
    }
    params
}

/// The config.json fields every Llama-style family shares.
pub fn decoder_json(c: &TransformerConfig, architecture: &str) -> Map<String, Value> {
    let mut m = json!({
        "architectures": [architecture],
        "model_type": c.variant.family.model_type(),
        "vocab_size": c.vocab_size,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim(),
        "intermediate_size": c.d_ff,
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tie_embeddings,
        "hidden_act": if c.variant.family.gemma() { "gelu_pytorch_tanh" } else { "silu" },
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "dtype": "float32",
    });
    let map = m.as_object_mut().expect("an object literal");
    rope_json(c, map);
    std::mem::take(map)
}
