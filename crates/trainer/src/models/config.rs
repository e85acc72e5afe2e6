//! `[model]` in a language-model recipe: the decoder families of `transformer.rs`, each its own
//! config type, in a closed registry tagged by `kind`; and `[model]` in an image-classification
//! recipe (`ClassifierConfig`, the families of `resnet.rs`).
//!
//! ```toml
//! [model]
//! kind = "llama"
//! vocab_size = 256
//! d_model = 128
//! n_layers = 4
//! n_heads = 4
//! d_ff = 344
//! max_seq_len = 256
//! ```
//!
//! Deserialization rejects unknown keys and wrong types; `validate` rejects values out of range
//! with the key path (`model.d_model`), which `config/` locates in the recipe file.

use super::moe::{MoeConfig, Routing};
use super::resnet::ResNetConfig;
use super::rope::RopeScaling;
use crate::validate::{check, positive, positive_finite, Invalid};
use serde::{Deserialize, Serialize};

/// The language-model registry. Each `kind` is one family of `models/transformer.rs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelConfig {
    /// RMSNorm, RoPE, SwiGLU, grouped-query attention, optional tied embeddings.
    Llama(LlamaConfig),
    /// LayerNorm, learned positions, GELU, biases, tied embeddings.
    Gpt2(Gpt2Config),
    /// GPT-NeoX and Pythia: LayerNorm, partial RoPE, parallel residual, GELU, biases.
    GptNeox(GptNeoxConfig),
}

/// `kind = "gpt_neox"`: GPT-NeoX and Pythia (transformers' `GPTNeoXConfig`). Each block
/// computes `x + attn(ln1(x)) + mlp(ln2(x))` (parallel residual; sequential when
/// `parallel_residual = false`), RoPE on the first `partial_rotary_factor` of each head, q, k
/// and v in one projection laid out head by head (`query_key_value`: per head its q, k, v
/// rows), an exact-GELU MLP, LayerNorms with biases, an untied head by default.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GptNeoxConfig {
    /// Number of token ids (embedding rows).
    pub vocab_size: i64,
    /// Width of the residual stream (`hidden_size`).
    pub d_model: i64,
    /// Number of transformer blocks.
    pub n_layers: i64,
    /// Number of attention heads.
    pub n_heads: i64,
    /// Hidden width of the MLP (`intermediate_size`).
    pub d_ff: i64,
    /// Longest sequence in tokens (RoPE tables are built for it).
    pub max_seq_len: i64,
    /// The base of the rotary embedding's frequencies.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Scaled rotary frequencies (linear, dynamic, llama3, yarn); absent: plain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// The share of each head's dimensions that RoPE rotates (`rotary_pct`).
    #[serde(default = "default_neox_rotary")]
    pub partial_rotary_factor: f64,
    /// LayerNorm's epsilon.
    #[serde(default = "default_gpt2_eps")]
    pub norm_eps: f64,
    /// Attention and MLP both read the block's input (`use_parallel_residual`).
    #[serde(default = "yes")]
    pub parallel_residual: bool,
    /// Biases on `query_key_value` and `attention.dense` (`attention_bias`).
    #[serde(default = "yes")]
    pub attention_bias: bool,
    /// The output projection is the token embedding table (`tie_word_embeddings`).
    #[serde(default)]
    pub tie_embeddings: bool,
}

fn default_neox_rotary() -> f64 {
    0.25
}

/// `kind = "llama"`: Llama (transformers' `LlamaConfig`), and Mixtral with `[model.moe]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    /// Number of token ids (embedding rows).
    pub vocab_size: i64,
    /// Width of the residual stream (`hidden_size`).
    pub d_model: i64,
    /// Number of transformer blocks.
    pub n_layers: i64,
    /// Number of attention (query) heads.
    pub n_heads: i64,
    /// Key/value heads for grouped-query attention; defaults to n_heads.
    #[serde(default)]
    pub n_kv_heads: Option<i64>,
    /// Hidden width of the SwiGLU MLP (`intermediate_size`).
    pub d_ff: i64,
    /// Width of each attention head; absent: d_model / n_heads. Set when heads were pruned
    /// (`trainer prune --method structured --heads`), as Hugging Face's `head_dim`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<i64>,
    /// Longest sequence in tokens (RoPE tables are built for it); `data.seq_len` must fit.
    pub max_seq_len: i64,
    /// The base of the rotary embedding's frequencies.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RMSNorm's epsilon.
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// The output projection is the input embedding table (`tie_word_embeddings`).
    #[serde(default)]
    pub tie_embeddings: bool,
    /// Mixture-of-Experts feed-forward layers in place of the dense SwiGLU (Mixtral-style).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub moe: Option<MoeConfig>,
    /// The Hugging Face architecture: its fixed differences from Llama and the config.json that
    /// `trainer export` writes ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3",
    /// "olmo2", "granite", "phi3"; Mixtral is llama + moe).
    #[serde(default, skip_serializing_if = "is_default")]
    #[schemars(!skip_serializing_if)]
    pub family: DecoderFamily,
    /// Biases on q, k, v and the output projection (transformers' `attention_bias`).
    #[serde(default, skip_serializing_if = "is_default")]
    #[schemars(!skip_serializing_if)]
    pub attention_bias: bool,
    /// Biases on the MLP's gate, up and down projections (`mlp_bias`).
    #[serde(default, skip_serializing_if = "is_default")]
    #[schemars(!skip_serializing_if)]
    pub mlp_bias: bool,
    /// Scaled rotary frequencies of long-context checkpoints (Llama 3.x, YaRN); absent: plain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Sliding-window attention: each position attends to this many most recent positions
    /// (itself included), on the layers `layer_types` marks (all, when it is absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<i64>,
    /// Per layer, "full_attention" or "sliding_attention" (transformers' `layer_types`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<LayerType>>,
    /// Granite's scalings (`family = "granite"` only, and required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multipliers: Option<Multipliers>,
    /// Gemma 2/3: attention scores soft-capped as `cap * tanh(s / cap)` before the mask
    /// (`attn_logit_softcapping`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_softcap: Option<f64>,
    /// Gemma 2/3: logits soft-capped as `cap * tanh(z / cap)` (`final_logit_softcapping`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logits_softcap: Option<f64>,
    /// Gemma 2/3: attention scores scaled by `1 / sqrt(this)` in place of
    /// `1 / sqrt(head_dim)` (`query_pre_attn_scalar`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3: the RoPE base of the sliding-window layers (plain RoPE, no scaling); the
    /// full-attention layers use `rope_theta` and `rope_scaling`. Absent: every layer alike.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_rope_theta: Option<f64>,
    /// The share of each head's dimensions that RoPE rotates (the first ones; Phi-3's and
    /// transformers' `partial_rotary_factor`). Absent: 1, the whole head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
}

/// `[model.multipliers]`: Granite's four scalings, as its config.json names them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Multipliers {
    /// Token embeddings are multiplied by this (`embedding_multiplier`).
    pub embedding: f64,
    /// Each block's attention and MLP outputs are multiplied by this before the residual add
    /// (`residual_multiplier`).
    pub residual: f64,
    /// The attention scores' factor, in place of 1/sqrt(head_dim) (`attention_multiplier`).
    pub attention: f64,
    /// Logits are divided by this (`logits_scaling`).
    pub logits_scaling: f64,
}

/// The Llama-style architectures of Hugging Face. What each changes, fixed by the family (the
/// switches a config.json may set on top are `LlamaConfig`'s fields):
/// - `llama`: nothing (Llama 1, 2, 3.x; Mixtral with `[model.moe]`).
/// - `mistral`: nothing but its config.json (its sliding window is `sliding_window`).
/// - `qwen2`: biases on q, k and v (not on the output projection). Qwen2 and Qwen2.5.
/// - `qwen3`: RMSNorm over each head of q and of k before RoPE (`q_norm`, `k_norm`).
/// - `gemma`: GeGLU (tanh GELU on the gate) in place of SwiGLU, RMSNorm scaling by `1 + w`
///   (in fp32, then cast), token embeddings multiplied by sqrt(d_model) (rounded to the
///   activations' dtype, as transformers does).
/// - `granite`: Llama with four scalings, `[model.multipliers]` (embeddings, residual branches,
///   attention scores in place of 1/sqrt(head_dim), logits).
/// - `olmo2`: norms after attention and after the MLP (`post_attention_layernorm`,
///   `post_feedforward_layernorm`) instead of before, RMSNorm of the whole q and k projections
///   before RoPE, norms scaling in fp32 before the cast.
/// - `gemma2`: Gemma with norms both before and after attention and MLP
///   (`input_layernorm`, `post_attention_layernorm`, `pre_feedforward_layernorm`,
///   `post_feedforward_layernorm`); its soft-capping, attention scale and alternating
///   local/global layers are the switches `attention_softcap`, `logits_softcap`,
///   `query_pre_attn_scalar`, `sliding_window` with `layer_types`.
/// - `gemma3`: Gemma 2 with a `(1 + w)` RMSNorm over each head of q and of k, and
///   `local_rope_theta` for its sliding-window layers (transformers' `gemma3_text`).
/// - `phi3`: Llama with q, k, v stored as one projection (`self_attn.qkv_proj`, rows q then k
///   then v) and gate, up as one (`mlp.gate_up_proj`, gate rows first): the same computation,
///   the checkpoint's and peft's module names.
#[derive(
    Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DecoderFamily {
    #[default]
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma,
    Gemma2,
    Gemma3,
    Olmo2,
    Granite,
    Phi3,
}

/// One layer's attention in `layer_types`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    FullAttention,
    SlidingAttention,
}

impl DecoderFamily {
    /// Biases on q, k and v whatever `attention_bias` says.
    pub fn qkv_bias(self) -> bool {
        self == DecoderFamily::Qwen2
    }

    /// RMSNorm over each head of q and of k.
    pub fn qk_norm(self) -> bool {
        matches!(self, DecoderFamily::Qwen3 | DecoderFamily::Gemma3)
    }

    /// Gemma's differences (all three): GeGLU, `(1 + w)` norms, embeddings scaled by
    /// sqrt(d_model).
    pub fn gemma(self) -> bool {
        matches!(
            self,
            DecoderFamily::Gemma | DecoderFamily::Gemma2 | DecoderFamily::Gemma3
        )
    }

    /// Gemma 2 and 3: norms before and after both attention and MLP ("sandwich" norms).
    pub fn sandwich_norms(self) -> bool {
        matches!(self, DecoderFamily::Gemma2 | DecoderFamily::Gemma3)
    }

    /// Phi-3: q, k and v in one projection (`qkv_proj`), gate and up in one (`gate_up_proj`).
    pub fn fused_projections(self) -> bool {
        self == DecoderFamily::Phi3
    }

    /// OLMo 2's norms after attention and MLP, and its q/k norms over whole projections.
    pub fn post_norm(self) -> bool {
        self == DecoderFamily::Olmo2
    }

    /// transformers' `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            DecoderFamily::Llama => "llama",
            DecoderFamily::Mistral => "mistral",
            DecoderFamily::Qwen2 => "qwen2",
            DecoderFamily::Qwen3 => "qwen3",
            DecoderFamily::Gemma => "gemma",
            DecoderFamily::Gemma2 => "gemma2",
            DecoderFamily::Gemma3 => "gemma3_text",
            DecoderFamily::Olmo2 => "olmo2",
            DecoderFamily::Granite => "granite",
            DecoderFamily::Phi3 => "phi3",
        }
    }
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

/// `kind = "gpt2"`: GPT-2 (transformers' `GPT2Config`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Gpt2Config {
    /// Number of token ids (embedding rows).
    pub vocab_size: i64,
    /// Width of the residual stream (`n_embd`).
    pub d_model: i64,
    /// Number of transformer blocks.
    pub n_layers: i64,
    /// Number of attention heads.
    pub n_heads: i64,
    /// Hidden width of the MLP; defaults to 4 * d_model.
    #[serde(default)]
    pub d_ff: Option<i64>,
    /// Longest sequence in tokens (rows of the learned position table).
    pub max_seq_len: i64,
    /// LayerNorm's epsilon.
    #[serde(default = "default_gpt2_eps")]
    pub norm_eps: f64,
    /// Dropout on embeddings, attention and residual branches (training only).
    #[serde(default)]
    pub dropout: f64,
    /// Attention scores divided by sqrt(head width) (`scale_attn_weights`).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    #[schemars(!skip_serializing_if)]
    pub scale_attn_weights: bool,
    /// Layer i's attention scores further divided by i + 1 (`scale_attn_by_inverse_layer_idx`).
    #[serde(default, skip_serializing_if = "is_default")]
    #[schemars(!skip_serializing_if)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// The output projection is the token embedding table (`tie_word_embeddings`).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    #[schemars(!skip_serializing_if)]
    pub tie_embeddings: bool,
}

/// serde's default for a switch that is on unless a recipe turns it off.
pub(crate) fn yes() -> bool {
    true
}
pub(crate) fn is_true(v: &bool) -> bool {
    *v
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_gpt2_eps() -> f64 {
    1e-5
}

impl ModelConfig {
    pub fn vocab_size(&self) -> i64 {
        match self {
            ModelConfig::Llama(c) => c.vocab_size,
            ModelConfig::Gpt2(c) => c.vocab_size,
            ModelConfig::GptNeox(c) => c.vocab_size,
        }
    }

    pub fn max_seq_len(&self) -> i64 {
        match self {
            ModelConfig::Llama(c) => c.max_seq_len,
            ModelConfig::Gpt2(c) => c.max_seq_len,
            ModelConfig::GptNeox(c) => c.max_seq_len,
        }
    }

    /// Range checks that the types cannot express, with `model.*` key paths.
    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            ModelConfig::Llama(c) => c.validate(),
            ModelConfig::Gpt2(c) => c.validate(),
            ModelConfig::GptNeox(c) => c.validate(),
        }
    }
}

impl LlamaConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        let c = self;
        if let Some(r) = &c.rope_scaling {
            r.validate()?;
        }
        if let Some(w) = c.sliding_window {
            positive(w, "model.sliding_window")?;
        }
        check(
            c.multipliers.is_some() == (c.family == DecoderFamily::Granite),
            "model.multipliers",
            "[model.multipliers] goes with family = \"granite\", and granite needs it",
        )?;
        if let Some(m) = &c.multipliers {
            for (k, v) in [
                ("embedding", m.embedding),
                ("residual", m.residual),
                ("attention", m.attention),
                ("logits_scaling", m.logits_scaling),
            ] {
                positive_finite(v, &format!("model.multipliers.{k}"))?;
            }
        }
        for (key, v) in [
            ("attention_softcap", c.attention_softcap),
            ("logits_softcap", c.logits_softcap),
            ("query_pre_attn_scalar", c.query_pre_attn_scalar),
            ("local_rope_theta", c.local_rope_theta),
        ] {
            if let Some(v) = v {
                positive_finite(v, &format!("model.{key}"))?;
            }
        }
        if let Some(types) = &c.layer_types {
            check(
                types.len() as i64 == c.n_layers,
                "model.layer_types",
                format!(
                    "expected one entry per layer ({}), got {}",
                    c.n_layers,
                    types.len()
                ),
            )?;
            check(
                c.sliding_window.is_some() || !types.contains(&LayerType::SlidingAttention),
                "model.layer_types",
                "\"sliding_attention\" layers need model.sliding_window",
            )?;
        }
        common_model_checks(
            c.vocab_size,
            c.d_model,
            c.n_layers,
            c.n_heads,
            c.max_seq_len,
        )?;
        match c.head_dim {
            None => heads_divide(c.d_model, c.n_heads)?,
            // The width needs no divisibility when the head width is given.
            Some(hd) => {
                check(
                    hd > 0 && hd % 2 == 0,
                    "model.head_dim",
                    format!("expected a positive even integer (RoPE rotates pairs), got {hd}"),
                )?;
            }
        }
        check(
            c.d_ff > 0,
            "model.d_ff",
            format!("expected a positive integer, got {}", c.d_ff),
        )?;
        let kv = c.n_kv_heads.unwrap_or(c.n_heads);
        check(
            kv > 0,
            "model.n_kv_heads",
            format!("expected a positive integer, got {kv}"),
        )?;
        check(
            c.n_heads % kv == 0,
            "model.n_kv_heads",
            format!(
                "n_heads ({}) must be divisible by n_kv_heads ({kv})",
                c.n_heads
            ),
        )?;
        check(
            c.head_dim.is_some() || (c.d_model / c.n_heads) % 2 == 0,
            "model.d_model",
            format!(
                "head size d_model/n_heads = {} must be even for RoPE",
                c.d_model / c.n_heads
            ),
        )?;
        if let Some(f) = c.partial_rotary_factor {
            check_rotary_share(f, c.head_dim.unwrap_or(c.d_model / c.n_heads))?;
        }
        check(
            c.rope_theta > 0.0,
            "model.rope_theta",
            "expected a positive number",
        )?;
        check(
            c.norm_eps > 0.0,
            "model.norm_eps",
            "expected a positive number",
        )?;
        match &c.moe {
            Some(m) => {
                // The experts are SwiGLU MLPs without biases (`moe.rs`): a family whose MLP is
                // something else would be silently replaced, e.g. by upcycling.
                check(
                    !c.family.gemma() && !c.family.fused_projections() && !c.mlp_bias,
                    "model.moe",
                    format!(
                        "experts are SwiGLU MLPs without biases; family = \"{}\"{} has another \
                         MLP",
                        c.family.model_type(),
                        if c.mlp_bias { " with mlp_bias" } else { "" }
                    ),
                )?;
                validate_moe(m, "model.moe")
            }
            None => Ok(()),
        }
    }
}

impl Gpt2Config {
    pub fn validate(&self) -> Result<(), Invalid> {
        let c = self;
        common_model_checks(
            c.vocab_size,
            c.d_model,
            c.n_layers,
            c.n_heads,
            c.max_seq_len,
        )?;
        heads_divide(c.d_model, c.n_heads)?;
        if let Some(d_ff) = c.d_ff {
            check(
                d_ff > 0,
                "model.d_ff",
                format!("expected a positive integer, got {d_ff}"),
            )?;
        }
        check(
            c.norm_eps > 0.0,
            "model.norm_eps",
            "expected a positive number",
        )?;
        check(
            (0.0..1.0).contains(&c.dropout),
            "model.dropout",
            format!("expected a probability in [0, 1), got {}", c.dropout),
        )
    }
}

impl GptNeoxConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        let c = self;
        common_model_checks(
            c.vocab_size,
            c.d_model,
            c.n_layers,
            c.n_heads,
            c.max_seq_len,
        )?;
        heads_divide(c.d_model, c.n_heads)?;
        if let Some(r) = &c.rope_scaling {
            r.validate()?;
        }
        check(
            c.d_ff > 0,
            "model.d_ff",
            format!("expected a positive integer, got {}", c.d_ff),
        )?;
        positive_finite(c.rope_theta, "model.rope_theta")?;
        positive_finite(c.norm_eps, "model.norm_eps")?;
        check_rotary_share(c.partial_rotary_factor, c.d_model / c.n_heads)
    }
}

/// transformers rotates `int(head_dim * factor)` dimensions rounded up to a whole pair (its
/// frequencies are `arange(0, dim, 2) / dim`): at least one, and within the head.
fn check_rotary_share(f: f64, head_dim: i64) -> Result<(), Invalid> {
    let rotated = (head_dim as f64 * f) as i64;
    let pairs = (rotated + 1) / 2;
    check(
        f > 0.0 && f <= 1.0 && rotated >= 1 && 2 * pairs <= head_dim,
        "model.partial_rotary_factor",
        format!(
            "expected a share in (0, 1] that rotates at least one whole pair within the \
             {head_dim}-wide head, got {f} ({rotated} dimensions)"
        ),
    )
}

fn common_model_checks(
    vocab_size: i64,
    d_model: i64,
    n_layers: i64,
    n_heads: i64,
    max_seq_len: i64,
) -> Result<(), Invalid> {
    positive(vocab_size, "model.vocab_size")?;
    positive(d_model, "model.d_model")?;
    positive(n_layers, "model.n_layers")?;
    positive(n_heads, "model.n_heads")?;
    positive(max_seq_len, "model.max_seq_len")
}

/// Heads of width d_model / n_heads (no explicit head_dim) need whole heads.
fn heads_divide(d_model: i64, n_heads: i64) -> Result<(), Invalid> {
    check(
        d_model % n_heads == 0,
        "model.d_model",
        format!("d_model ({d_model}) must be divisible by n_heads ({n_heads})"),
    )
}

pub fn validate_moe(m: &MoeConfig, key: &str) -> Result<(), Invalid> {
    positive(m.n_experts, &format!("{key}.n_experts"))?;
    positive(m.top_k, &format!("{key}.top_k"))?;
    check(
        m.top_k <= m.n_experts,
        &format!("{key}.top_k"),
        format!(
            "top_k ({}) must not exceed n_experts ({})",
            m.top_k, m.n_experts
        ),
    )?;
    check(
        m.routing != Routing::Switch || m.top_k == 1,
        &format!("{key}.routing"),
        "switch routing is top-1: set top_k = 1",
    )?;
    if let Some(c) = m.capacity_factor {
        positive_finite(c, &format!("{key}.capacity_factor"))?;
    }
    check(
        m.aux_loss_coef >= 0.0,
        &format!("{key}.aux_loss_coef"),
        "expected a non-negative number",
    )?;
    check(
        m.router_z_loss_coef >= 0.0,
        &format!("{key}.z_loss_coef"),
        "expected a non-negative number",
    )
}
/// The classifier registry: the three families of `models/resnet.rs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClassifierConfig {
    /// torchvision's ImageNet ResNet: depth 18, 34, 50, 101 or 152.
    Resnet {
        /// Total depth (number of layers): 18, 34, 50, 101 or 152.
        depth: i64,
        /// Number of output classes (rows of the final linear layer).
        num_classes: i64,
    },
    /// He et al.'s CIFAR ResNet (option A shortcuts): depth 6n+2 (20, 32, 44, 56, 110).
    CifarResnet {
        /// Total depth (number of layers), 6n+2.
        depth: i64,
        /// Number of output classes (rows of the final linear layer).
        num_classes: i64,
    },
    /// Wide ResNet WRN-depth-width: depth 6n+4 (10, 16, 22, 28, 40), widen factor `width` (k).
    Wrn {
        /// Total depth (number of layers), 6n+4.
        depth: i64,
        /// Widen factor k of every block's channels.
        width: i64,
        /// Number of output classes (rows of the final linear layer).
        num_classes: i64,
        /// Dropout between the two convs of each block (the paper uses 0.3 on CIFAR).
        #[serde(default)]
        dropout: f64,
    },
}

impl ClassifierConfig {
    pub fn num_classes(&self) -> i64 {
        match self {
            ClassifierConfig::Resnet { num_classes, .. }
            | ClassifierConfig::CifarResnet { num_classes, .. }
            | ClassifierConfig::Wrn { num_classes, .. } => *num_classes,
        }
    }

    /// The model's architecture; fails (naming the field) on a depth or width the family lacks.
    pub fn build(&self) -> crate::Result<ResNetConfig> {
        match self {
            ClassifierConfig::Resnet { depth, num_classes } => {
                ResNetConfig::resnet(*depth, *num_classes)
            }
            ClassifierConfig::CifarResnet { depth, num_classes } => {
                ResNetConfig::cifar_resnet(*depth, *num_classes)
            }
            ClassifierConfig::Wrn {
                depth,
                width,
                num_classes,
                dropout,
            } => Ok(ResNetConfig {
                dropout: *dropout,
                ..ResNetConfig::wrn(*depth, *width, *num_classes)?
            }),
        }
    }
}

impl ClassifierConfig {
    /// Range checks that the types cannot express, with `model.*` key paths.
    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            ClassifierConfig::Resnet { depth, .. } => check(
                [18, 34, 50, 101, 152].contains(depth),
                "model.depth",
                format!("resnet depth must be one of 18, 34, 50, 101, 152, got {depth}"),
            )?,
            ClassifierConfig::CifarResnet { depth, .. } => check(
                *depth >= 8 && (depth - 2) % 6 == 0,
                "model.depth",
                format!("cifar_resnet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}"),
            )?,
            ClassifierConfig::Wrn {
                depth,
                width,
                dropout,
                ..
            } => {
                check(
                    *depth >= 10 && (depth - 4) % 6 == 0,
                    "model.depth",
                    format!("wrn depth must be 6n+4 (10, 16, 22, 28, 40), got {depth}"),
                )?;
                positive(*width, "model.width")?;
                check(
                    (0.0..1.0).contains(dropout),
                    "model.dropout",
                    format!("expected a probability in [0, 1), got {dropout}"),
                )?;
            }
        }
        positive(self.num_classes(), "model.num_classes")
    }
}
