//! Decoder-only transformer, two families in one file:
//!
//! - Llama (Touvron et al. 2023; transformers' `modeling_llama.py`): RMSNorm, rotary position
//!   embeddings (rotate-half convention, `rope.rs`) with configurable theta, SwiGLU MLP,
//!   grouped-query attention, no biases, optionally tied input and output embeddings.
//! - GPT-2 (Radford et al. 2019; transformers' `modeling_gpt2.py`): LayerNorm, learned absolute
//!   positions, GELU (tanh approximation, `gelu_new`), biases everywhere, tied embeddings.
//!
//! The Llama-style families of Hugging Face differ from Llama by a few switches, gathered in
//! `Variant`; which family sets which is in `hf/` (one file per family, with its config.json):
//! q/k/v and output biases (Qwen2, `attention_bias`), MLP biases (`mlp_bias`), per-head RMSNorm of
//! q and k (Qwen3; OLMo 2 over the whole projections, with norms after attention and MLP instead
//! of before), RoPE scaling (Llama 3.x, YaRN; `rope.rs`), sliding-window attention on some
//! or all layers (Mistral, Qwen2 with `use_sliding_window`), GeGLU, `(1 + w)` norms and scaled
//! embeddings (Gemma), norms before and after attention and MLP, soft-capped attention scores
//! and logits, and a RoPE base of their own for the sliding layers (Gemma 2/3), q/k/v and
//! gate/up stored fused and RoPE on part of each head (Phi-3), scaled embeddings, residual
//! branches, attention and logits (Granite); and for GPT-2 its attention-scale flags and an
//! untied head.
//!
//! Parameter names and shapes equal the Hugging Face checkpoint keys, so checkpoints map one to
//! one: GPT-2's `Conv1D` weights are stored `[in, out]` as Hugging Face stores them.
//! Attention goes through libtorch's `scaled_dot_product_attention` (flash kernels on CUDA).

use super::config::{DecoderFamily, LayerType, LlamaConfig, ModelConfig, Multipliers};
use super::moe::{Moe, MoeConfig};
use super::params::ParamStore;
use super::rope::{apply_rope, rope_tables, RopeScaling};
use crate::error::Result;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Llama,
    Gpt2,
    GptNeox,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    pub family: Family,
    pub vocab_size: i64,
    pub d_model: i64,
    pub n_layers: i64,
    pub n_heads: i64,
    pub n_kv_heads: i64,
    /// Width of each attention head; None: d_model / n_heads.
    pub head_dim: Option<i64>,
    pub d_ff: i64,
    pub max_seq_len: i64,
    pub rope_theta: f64,
    pub norm_eps: f64,
    pub tie_embeddings: bool,
    pub dropout: f64,
    /// Llama only: Mixture-of-Experts MLPs in every layer (Mixtral-style).
    pub moe: Option<MoeConfig>,
    /// The switches of the Llama-style families and of GPT-2 (all off: plain Llama / GPT-2).
    pub variant: Variant,
}

/// What distinguishes a decoder family from plain Llama (or plain GPT-2) beyond its sizes.
/// `Default` is plain Llama / GPT-2.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Variant {
    /// The Hugging Face family of a Llama-style model, with its fixed differences
    /// (`DecoderFamily::qkv_bias`, `qk_norm`) and the config.json it exports to.
    pub family: DecoderFamily,
    /// Biases on q, k, v and the output projection (`attention_bias`).
    pub attention_bias: bool,
    /// Biases on the gate, up and down projections (`mlp_bias`).
    pub mlp_bias: bool,
    /// RoPE frequency scaling (`rope.rs`); None: plain RoPE.
    pub rope_scaling: Option<RopeScaling>,
    /// Sliding-window attention: each query sees the `w` most recent positions, itself
    /// included (transformers' `kv_idx > q_idx - sliding_window`).
    pub sliding_window: Option<i64>,
    /// Which layers use the window (transformers' `layer_types`); None: all of them.
    pub sliding_layers: Option<Vec<bool>>,
    /// Granite: embeddings, residual branches, attention scores and logits scaled.
    pub multipliers: Option<Multipliers>,
    /// GPT-2 `scale_attn_weights = false`: attention scores not divided by sqrt(head_dim).
    pub unscaled_attention: bool,
    /// GPT-2 `scale_attn_by_inverse_layer_idx`: layer i's scores divided by i + 1 as well.
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Gemma 2/3: attention scores soft-capped, `cap * tanh(s / cap)`, before the mask (an
    /// explicit attention computation: SDPA has no soft-capping).
    pub attention_softcap: Option<f64>,
    /// Gemma 2/3: logits soft-capped, `cap * tanh(z / cap)`.
    pub logits_softcap: Option<f64>,
    /// Gemma 2/3: attention scores scaled by `1 / sqrt(this)`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3: the RoPE base of the sliding-window layers.
    pub local_rope_theta: Option<f64>,
    /// The share of each head that RoPE rotates; None: all of it.
    pub partial_rotary_factor: Option<f64>,
    /// GPT-NeoX: attention and MLP both read the block's input, `x + attn(ln1(x)) +
    /// mlp(ln2(x))`.
    pub parallel_residual: bool,
}

impl Variant {
    /// The switches of a `[model] kind = "llama"` recipe section.
    fn of_llama(c: &LlamaConfig) -> Variant {
        Variant {
            family: c.family,
            attention_bias: c.attention_bias,
            mlp_bias: c.mlp_bias,
            rope_scaling: c.rope_scaling.clone(),
            sliding_window: c.sliding_window,
            multipliers: c.multipliers,
            attention_softcap: c.attention_softcap,
            logits_softcap: c.logits_softcap,
            query_pre_attn_scalar: c.query_pre_attn_scalar,
            local_rope_theta: c.local_rope_theta,
            partial_rotary_factor: c.partial_rotary_factor,
            sliding_layers: c.layer_types.as_ref().map(|types| {
                types
                    .iter()
                    .map(|t| *t == LayerType::SlidingAttention)
                    .collect()
            }),
            ..Variant::default()
        }
    }

    /// Biases on the q, k and v projections (Qwen2, or `attention_bias`).
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.family.qkv_bias()
    }

    /// RMSNorm over each head's q and k before RoPE (Qwen3: `self_attn.q_norm`, `k_norm`).
    pub fn qk_norm(&self) -> bool {
        self.family.qk_norm()
    }
}

impl TransformerConfig {
    pub fn from_recipe(cfg: &ModelConfig) -> TransformerConfig {
        match cfg {
            ModelConfig::Llama(c) => TransformerConfig {
                family: Family::Llama,
                vocab_size: c.vocab_size,
                d_model: c.d_model,
                n_layers: c.n_layers,
                n_heads: c.n_heads,
                n_kv_heads: c.n_kv_heads.unwrap_or(c.n_heads),
                head_dim: c.head_dim,
                d_ff: c.d_ff,
                max_seq_len: c.max_seq_len,
                rope_theta: c.rope_theta,
                norm_eps: c.norm_eps,
                tie_embeddings: c.tie_embeddings,
                dropout: 0.0,
                moe: c.moe.clone(),
                variant: Variant::of_llama(c),
            },
            ModelConfig::Gpt2(c) => TransformerConfig {
                family: Family::Gpt2,
                vocab_size: c.vocab_size,
                d_model: c.d_model,
                n_layers: c.n_layers,
                n_heads: c.n_heads,
                n_kv_heads: c.n_heads,
                head_dim: None,
                d_ff: c.d_ff.unwrap_or(4 * c.d_model),
                max_seq_len: c.max_seq_len,
                rope_theta: 0.0,
                norm_eps: c.norm_eps,
                tie_embeddings: c.tie_embeddings,
                dropout: c.dropout,
                moe: None,
                variant: Variant {
                    unscaled_attention: !c.scale_attn_weights,
                    scale_attn_by_inverse_layer_idx: c.scale_attn_by_inverse_layer_idx,
                    ..Variant::default()
                },
            },
            ModelConfig::GptNeox(c) => Self::from_neox(c),
        }
    }

    fn from_neox(c: &super::config::GptNeoxConfig) -> TransformerConfig {
        TransformerConfig {
            family: Family::GptNeox,
            vocab_size: c.vocab_size,
            d_model: c.d_model,
            n_layers: c.n_layers,
            n_heads: c.n_heads,
            n_kv_heads: c.n_heads,
            head_dim: None,
            d_ff: c.d_ff,
            max_seq_len: c.max_seq_len,
            rope_theta: c.rope_theta,
            norm_eps: c.norm_eps,
            tie_embeddings: c.tie_embeddings,
            dropout: 0.0,
            moe: None,
            variant: Variant {
                attention_bias: c.attention_bias,
                rope_scaling: c.rope_scaling.clone(),
                partial_rotary_factor: Some(c.partial_rotary_factor).filter(|&f| f != 1.0),
                parallel_residual: c.parallel_residual,
                ..Variant::default()
            },
        }
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.d_model / self.n_heads)
    }

    /// How many of each head's dimensions RoPE rotates (transformers truncates
    /// `head_dim * partial_rotary_factor`).
    pub fn rotary_dim(&self) -> i64 {
        match self.variant.partial_rotary_factor {
            Some(f) => (self.head_dim() as f64 * f) as i64,
            None => self.head_dim(),
        }
    }

    /// The number of parameters `Transformer::new` registers for this config, computed without
    /// allocating anything: an untrusted config.json is bounded by it before a model is built
    /// (`hf::read_config`). Tested equal to the built model's count for every family.
    pub fn param_count(&self) -> i128 {
        let int = |x: i64| x as i128;
        let (v, d, ff, l) = (
            int(self.vocab_size),
            int(self.d_model),
            int(self.d_ff),
            int(self.n_layers),
        );
        let head = if self.tie_embeddings { 0 } else { v * d };
        let bias = |on: bool, n: i128| if on { n } else { 0 };
        let var = &self.variant;
        let block = match self.family {
            // ln_1, ln_2 (weight and bias), c_attn, c_proj, c_fc, c_proj, all with biases.
            Family::Gpt2 => 4 * d + 3 * d * d + 3 * d + d * d + d + 2 * d * ff + ff + d,
            Family::GptNeox => {
                4 * d
                    + 3 * d * d
                    + bias(var.attention_bias, 3 * d)
                    + d * d
                    + bias(var.attention_bias, d)
                    + 2 * d * ff
                    + ff
                    + d
            }
            Family::Llama => {
                let (q, kv) = (
                    int(self.n_heads * self.head_dim()),
                    int(self.n_kv_heads * self.head_dim()),
                );
                let norms = norm_names(var.family).iter().flatten().count() as i128 * d;
                let attn = d * (q + 2 * kv)
                    + bias(
                        var.qkv_bias() && !var.family.fused_projections(),
                        q + 2 * kv,
                    )
                    + q * d
                    + bias(var.attention_bias, d);
                let qk_norm = if var.family.post_norm() {
                    q + kv
                } else {
                    bias(var.qk_norm(), 2 * int(self.head_dim()))
                };
                let mlp = match &self.moe {
                    Some(m) => {
                        let e = int(m.n_experts);
                        e * d + 3 * e * d * ff + bias(m.shared_expert, 3 * d * ff)
                    }
                    None => 3 * d * ff + bias(var.mlp_bias, 2 * ff + d),
                };
                norms + attn + qk_norm + mlp
            }
        };
        let positions = if self.family == Family::Gpt2 {
            int(self.max_seq_len) * d
        } else {
            0
        };
        v * d + positions + l * block + bias(self.family != Family::Llama, d) + d + head
    }

    /// Training FLOPs per token (6N plus attention), as in the PaLM paper's appendix B, used for
    /// model FLOPs utilisation. With MoE, N counts only the `top_k` experts a token passes
    /// through (the active parameters).
    pub fn train_flops_per_token(&self, n_params_no_embed: i64, seq_len: i64) -> f64 {
        let inactive = match &self.moe {
            Some(m) => (m.n_experts - m.top_k) * 3 * self.d_model * self.d_ff * self.n_layers,
            None => 0,
        };
        // A tied output projection is the embedding table, left out of `n_params_no_embed`, but
        // its matmul costs as much as an untied head's.
        let tied_head = if self.tie_embeddings {
            self.vocab_size * self.d_model
        } else {
            0
        };
        6.0 * (n_params_no_embed - inactive + tied_head) as f64
            + 12.0 * (self.n_layers * self.d_model * seq_len) as f64
    }
}

/// The hook through which a method adds to a projection's output without the model knowing
/// the method: `peft/lora.rs`'s LoRA adapters implement it. The model only calls `forward`;
/// the adapter's owner reaches its own type again through `as_any`.
pub trait LinearAdapter: Send {
    /// What the adapter adds to the projection's output `[.., out]` for its input `x`
    /// `[.., in]`, or None when it adds nothing (e.g. while merged into the weight).
    fn forward(&self, x: &Tensor, train: bool) -> Option<Tensor>;
    fn as_any(&self) -> &dyn std::any::Any;
}

/// A dense projection. `transposed` weights are stored `[in, out]` (GPT-2's Conv1D); the others
/// `[out, in]` (torch.nn.Linear). Every projection may carry an adapter (`LinearAdapter`, e.g.
/// LoRA), whose output is added to the projection's.
pub struct Linear {
    /// The module path, the Hugging Face module name (`model.layers.0.self_attn.q_proj`,
    /// `transformer.h.0.attn.c_attn`): the weight's key without `.weight`.
    pub path: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub transposed: bool,
    pub adapter: Option<Box<dyn LinearAdapter>>,
    /// Wanda's calibration (`prune/wanda.rs`): while Some, every forward adds the squared
    /// inputs, summed over tokens, per input feature `[in]` (fp32).
    pub input_sq: std::cell::RefCell<Option<Tensor>>,
}

impl Linear {
    fn new(path: &str, weight: Tensor, bias: Option<Tensor>, transposed: bool) -> Linear {
        Linear {
            path: path.to_string(),
            weight,
            bias,
            transposed,
            adapter: None,
            input_sq: std::cell::RefCell::new(None),
        }
    }

    /// `[in_features, out_features]`, whatever the storage layout.
    pub fn in_out(&self) -> (i64, i64) {
        let s = self.weight.size();
        if self.transposed {
            (s[0], s[1])
        } else {
            (s[1], s[0])
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        if let Some(acc) = self.input_sq.borrow_mut().as_mut() {
            let d = x.size().last().copied().unwrap_or(0);
            *acc += x
                .detach()
                .to_kind(Kind::Float)
                .reshape([-1, d])
                .square()
                .sum_dim_intlist(0, false, Kind::Float);
        }
        let y = if self.transposed {
            x.linear(&self.weight.tr(), self.bias.as_ref())
        } else {
            x.linear(&self.weight, self.bias.as_ref())
        };
        match self.adapter.as_ref().and_then(|a| a.forward(x, train)) {
            Some(delta) => y + delta,
            None => y,
        }
    }
}

enum Norm {
    Rms {
        weight: Tensor,
        eps: f64,
        style: RmsStyle,
    },
    Layer {
        weight: Tensor,
        bias: Tensor,
        eps: f64,
    },
}

impl Norm {
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            // transformers' LlamaRMSNorm: normalise in fp32, scale in the input dtype.
            Norm::Rms { weight, eps, style } => {
                let kind = x.kind();
                let xf = x.to_kind(Kind::Float);
                let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
                let normed = xf * (var + *eps).rsqrt();
                match style {
                    RmsStyle::Llama => weight * normed.to_kind(kind),
                    RmsStyle::ScaleInFp32 => (normed * weight.to_kind(Kind::Float)).to_kind(kind),
                    RmsStyle::PlusOne => {
                        (normed * (weight.to_kind(Kind::Float) + 1.0)).to_kind(kind)
                    }
                }
            }
            Norm::Layer { weight, bias, eps } => {
                let d = weight.size()[0];
                x.layer_norm([d], Some(weight), Some(bias), *eps, true)
            }
        }
    }
}

/// Where an RMSNorm's scale is applied: the same in fp32, different roundings in bf16.
#[derive(Clone, Copy, PartialEq)]
enum RmsStyle {
    /// transformers' LlamaRMSNorm: normalise in fp32, cast, then scale by `w`.
    Llama,
    /// OLMo 2: scale by `w` in fp32, then cast.
    ScaleInFp32,
    /// Gemma: scale by `1 + w` in fp32, then cast (`w` starts at zero).
    PlusOne,
}

enum Mlp {
    /// down(silu(gate(x)) * up(x)); Gemma: the tanh GELU in place of silu (GeGLU).
    SwiGlu {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    /// The same with gate and up as one projection, gate rows first (Phi-3's `gate_up_proj`).
    FusedGlu { gate_up: Linear, down: Linear },
    /// Routed SwiGLU experts (`moe.rs`).
    Moe(Moe),
    /// proj(gelu(fc(x))): GPT-2's tanh approximation (`exact` false), GPT-NeoX's erf GELU.
    Gelu {
        fc: Linear,
        proj: Linear,
        exact: bool,
    },
}

struct Attention {
    /// Llama: separate q, k, v projections. GPT-2 and Phi-3: one fused projection.
    qkv: Qkv,
    /// RMSNorm of q and of k before RoPE: Qwen3 per head, OLMo 2 over the whole projection.
    qk_norm: Option<QkNorm>,
    out: Linear,
}

enum QkNorm {
    /// Over each head's `head_dim` (Qwen3).
    PerHead(Norm, Norm),
    /// Over the whole q (`n_heads * head_dim`) and k (`n_kv_heads * head_dim`) projections
    /// (OLMo 2).
    Whole(Norm, Norm),
}

// One per layer: the size difference of the variants does not matter.
#[allow(clippy::large_enum_variant)]
enum Qkv {
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
    },
    /// Rows q, then k, then v (GPT-2's `c_attn`, Phi-3's `qkv_proj`).
    Fused(Linear),
    /// Head by head, each head's q, k and v rows (GPT-NeoX's `query_key_value`).
    FusedPerHead(Linear),
}

/// One transformer block. Which norms exist, and where, is the family's: Llama and GPT-2 norm
/// the inputs of attention and MLP; OLMo 2 their outputs; Gemma 2/3 both.
struct Block {
    pre_attn: Option<Norm>,
    attn: Attention,
    post_attn: Option<Norm>,
    pre_mlp: Option<Norm>,
    mlp: Mlp,
    post_mlp: Option<Norm>,
}

/// The Hugging Face names of a Llama-style block's norms, by position: before attention,
/// after attention, before the MLP, after the MLP (None: the family has no norm there).
fn norm_names(family: DecoderFamily) -> [Option<&'static str>; 4] {
    if family.sandwich_norms() {
        [
            Some("input_layernorm"),
            Some("post_attention_layernorm"),
            Some("pre_feedforward_layernorm"),
            Some("post_feedforward_layernorm"),
        ]
    } else if family.post_norm() {
        [
            None,
            Some("post_attention_layernorm"),
            None,
            Some("post_feedforward_layernorm"),
        ]
    } else {
        [
            Some("input_layernorm"),
            None,
            Some("post_attention_layernorm"),
            None,
        ]
    }
}

/// `norm(x)`, or `x` where the block has no norm at that position.
fn norm_or_pass(norm: &Option<Norm>, x: Tensor) -> Tensor {
    match norm {
        Some(n) => n.forward(&x),
        None => x,
    }
}

pub struct Transformer {
    pub config: TransformerConfig,
    embed: Tensor,
    positions: Option<Tensor>,
    blocks: Vec<Block>,
    final_norm: Norm,
    /// None when tied to `embed`.
    lm_head: Option<Tensor>,
    /// RoPE tables `[max_seq_len, rotary_dim]`, built once (Llama only).
    rope: Option<(Tensor, Tensor)>,
    /// Gemma 3: the tables of the sliding-window layers (`local_rope_theta`).
    rope_local: Option<(Tensor, Tensor)>,
    /// `train.recompute`: what training recomputes in the backward pass (`set_recompute`).
    recompute: Recompute,
    /// `run.shard = "full"`: the pieces' weights, gathered around each use (`set_piece_weights`).
    piece_weights: Option<std::rc::Rc<dyn PieceWeights>>,
}

/// `run.shard = "full"` (`shard.rs`): each piece's weights live whole on their owners only and
/// are gathered onto every rank just before the piece runs. `gather(p, next)` first lets go of
/// any other piece it holds, then makes piece `p` whole, and starts fetching piece `next` (the
/// one the pass runs after `p`: the following block going forward, the one before in the
/// backward pass) while `p` computes; `release(p)` lets go of piece `p` (after a pass that keeps
/// no graph needing its weights). Collective errors are kept by the implementation for the
/// training loop to report; the memory is always there, so the model never reads a freed one.
pub trait PieceWeights {
    fn gather(&self, piece: Piece, next: Option<Piece>);
    fn release(&self, piece: Piece);
}

/// The parts of the model whose weights `run.shard = "full"` gathers around each use: the
/// token embedding, each block, and the output head (the embedding again when tied). The final
/// norm and learned positions stay whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Piece {
    Embedding,
    Block(usize),
    Head,
}

impl Piece {
    /// The piece the parameter `name` belongs to (by its Hugging Face key): a block's
    /// (`model.layers.3.mlp.up_proj.weight`, `transformer.h.0.attn.c_attn.weight`), the token
    /// embedding's, the head's; `None` for the rest.
    pub fn of(name: &str) -> Option<Piece> {
        match name {
            "model.embed_tokens.weight" | "transformer.wte.weight" | "gpt_neox.embed_in.weight" => {
                Some(Piece::Embedding)
            }
            "lm_head.weight" => Some(Piece::Head),
            _ => {
                let parts: Vec<&str> = name.split('.').collect();
                parts
                    .windows(2)
                    .find(|w| matches!(w[0], "layers" | "h"))
                    .and_then(|w| w[1].parse().ok())
                    .map(Piece::Block)
            }
        }
    }
}

impl Transformer {
    /// Builds the model, registering every parameter in `store` under its Hugging Face key.
    /// Initialisation follows transformers' `_init_weights` (normal(0, 0.02); GPT-2 scales its
    /// residual projections by 1/sqrt(2 * n_layers)). Call `tch::manual_seed` first.
    pub fn new(config: &TransformerConfig, store: &mut ParamStore) -> Result<Transformer> {
        match config.family {
            Family::Llama => Self::new_llama(config, store),
            Family::Gpt2 => Ok(Self::new_gpt2(config, store)),
            Family::GptNeox => Ok(Self::new_neox(config, store)),
        }
    }

    fn new_llama(c: &TransformerConfig, s: &mut ParamStore) -> Result<Transformer> {
        let std = 0.02;
        let (d, hd) = (c.d_model, c.head_dim());
        let v = &c.variant;
        let embed = s.normal("model.embed_tokens.weight", &[c.vocab_size, d], std);
        let lin = |s: &mut ParamStore, name: String, out_f: i64, in_f: i64, bias: bool| {
            let weight = s.normal(&name, &[out_f, in_f], std);
            let path = name.trim_end_matches(".weight");
            let bias = bias.then(|| s.zeros(&format!("{path}.bias"), &[out_f]));
            Linear::new(path, weight, bias, false)
        };
        let style = match v.family {
            f if f.gemma() => RmsStyle::PlusOne,
            DecoderFamily::Olmo2 => RmsStyle::ScaleInFp32,
            _ => RmsStyle::Llama,
        };
        let rms = |s: &mut ParamStore, name: String, width: i64| Norm::Rms {
            // Gemma's norms scale by 1 + w: w starts at zero.
            weight: if style == RmsStyle::PlusOne {
                s.zeros(&name, &[width])
            } else {
                s.ones(&name, &[width])
            },
            eps: c.norm_eps,
            style,
        };
        let [pre_attn, post_attn, pre_mlp, post_mlp] = norm_names(v.family);
        let mut blocks = Vec::new();
        for i in 0..c.n_layers {
            let p = format!("model.layers.{i}");
            let norm = |s: &mut ParamStore, name: Option<&str>| {
                name.map(|n| rms(s, format!("{p}.{n}.weight"), d))
            };
            let (pre_attn, post_attn) = (norm(s, pre_attn), norm(s, post_attn));
            let (kv_width, a) = (c.n_kv_heads * hd, format!("{p}.self_attn"));
            let qkv = if v.family.fused_projections() {
                let width = c.n_heads * hd + 2 * kv_width;
                Qkv::Fused(lin(s, format!("{a}.qkv_proj.weight"), width, d, false))
            } else {
                let bias = v.qkv_bias();
                Qkv::Separate {
                    q: lin(s, format!("{a}.q_proj.weight"), c.n_heads * hd, d, bias),
                    k: lin(s, format!("{a}.k_proj.weight"), kv_width, d, bias),
                    v: lin(s, format!("{a}.v_proj.weight"), kv_width, d, bias),
                }
            };
            let o = lin(
                s,
                format!("{a}.o_proj.weight"),
                d,
                c.n_heads * hd,
                v.attention_bias,
            );
            let qk_norm = if v.family.post_norm() {
                Some(QkNorm::Whole(
                    rms(s, format!("{a}.q_norm.weight"), c.n_heads * hd),
                    rms(s, format!("{a}.k_norm.weight"), kv_width),
                ))
            } else {
                v.qk_norm().then(|| {
                    QkNorm::PerHead(
                        rms(s, format!("{a}.q_norm.weight"), hd),
                        rms(s, format!("{a}.k_norm.weight"), hd),
                    )
                })
            };
            let mlp = Self::llama_mlp(c, s, &p, &lin)?;
            let (pre_mlp, post_mlp) = (norm(s, pre_mlp), norm(s, post_mlp));
            blocks.push(Block {
                pre_attn,
                attn: Attention {
                    qkv,
                    qk_norm,
                    out: o,
                },
                post_attn,
                pre_mlp,
                mlp,
                post_mlp,
            });
        }
        let final_norm = rms(s, "model.norm.weight".to_string(), d);
        let lm_head =
            (!c.tie_embeddings).then(|| s.normal("lm_head.weight", &[c.vocab_size, d], std));
        let rope = Some(rope_tables(
            c.rotary_dim(),
            c.max_seq_len,
            c.rope_theta,
            v.rope_scaling.as_ref(),
            s.device(),
        ));
        let rope_local = v
            .local_rope_theta
            .map(|theta| rope_tables(c.rotary_dim(), c.max_seq_len, theta, None, s.device()));
        Ok(Transformer {
            config: c.clone(),
            embed,
            positions: None,
            blocks,
            final_norm,
            lm_head,
            rope,
            rope_local,
            recompute: Recompute::None,
            piece_weights: None,
        })
    }

    /// A Llama-style block's MLP: routed experts, the gated MLP, or (Phi-3) the gated MLP with
    /// gate and up fused.
    fn llama_mlp(
        c: &TransformerConfig,
        s: &mut ParamStore,
        p: &str,
        lin: &dyn Fn(&mut ParamStore, String, i64, i64, bool) -> Linear,
    ) -> Result<Mlp> {
        let (d, bias) = (c.d_model, c.variant.mlp_bias);
        Ok(match &c.moe {
            Some(m) => Mlp::Moe(Moe::new(m, d, c.d_ff, &format!("{p}.mlp"), s)?),
            None if c.variant.family.fused_projections() => Mlp::FusedGlu {
                gate_up: lin(
                    s,
                    format!("{p}.mlp.gate_up_proj.weight"),
                    2 * c.d_ff,
                    d,
                    bias,
                ),
                down: lin(s, format!("{p}.mlp.down_proj.weight"), d, c.d_ff, bias),
            },
            None => Mlp::SwiGlu {
                gate: lin(s, format!("{p}.mlp.gate_proj.weight"), c.d_ff, d, bias),
                up: lin(s, format!("{p}.mlp.up_proj.weight"), c.d_ff, d, bias),
                down: lin(s, format!("{p}.mlp.down_proj.weight"), d, c.d_ff, bias),
            },
        })
    }

    fn new_gpt2(c: &TransformerConfig, s: &mut ParamStore) -> Transformer {
        let std = 0.02;
        let proj_std = std / (2.0 * c.n_layers as f64).sqrt();
        let d = c.d_model;
        let embed = s.normal("transformer.wte.weight", &[c.vocab_size, d], std);
        let positions = s.normal("transformer.wpe.weight", &[c.max_seq_len, d], std);
        let conv1d = |s: &mut ParamStore, name: &str, in_f: i64, out_f: i64, std: f64| {
            let weight = s.normal(&format!("{name}.weight"), &[in_f, out_f], std);
            Linear::new(
                name,
                weight,
                Some(s.zeros(&format!("{name}.bias"), &[out_f])),
                true,
            )
        };
        let layer_norm = |s: &mut ParamStore, name: &str| Norm::Layer {
            weight: s.ones(&format!("{name}.weight"), &[d]),
            bias: s.zeros(&format!("{name}.bias"), &[d]),
            eps: c.norm_eps,
        };
        let mut blocks = Vec::new();
        for i in 0..c.n_layers {
            let p = format!("transformer.h.{i}");
            let norm1 = layer_norm(s, &format!("{p}.ln_1"));
            let c_attn = conv1d(s, &format!("{p}.attn.c_attn"), d, 3 * d, std);
            let c_proj = conv1d(s, &format!("{p}.attn.c_proj"), d, d, proj_std);
            let norm2 = layer_norm(s, &format!("{p}.ln_2"));
            let fc = conv1d(s, &format!("{p}.mlp.c_fc"), d, c.d_ff, std);
            let proj = conv1d(s, &format!("{p}.mlp.c_proj"), c.d_ff, d, proj_std);
            blocks.push(Block {
                pre_attn: Some(norm1),
                attn: Attention {
                    qkv: Qkv::Fused(c_attn),
                    qk_norm: None,
                    out: c_proj,
                },
                post_attn: None,
                pre_mlp: Some(norm2),
                mlp: Mlp::Gelu {
                    fc,
                    proj,
                    exact: false,
                },
                post_mlp: None,
            });
        }
        let final_norm = layer_norm(s, "transformer.ln_f");
        let lm_head =
            (!c.tie_embeddings).then(|| s.normal("lm_head.weight", &[c.vocab_size, d], std));
        Transformer {
            config: c.clone(),
            embed,
            positions: Some(positions),
            blocks,
            final_norm,
            lm_head,
            rope: None,
            rope_local: None,
            recompute: Recompute::None,
            piece_weights: None,
        }
    }

    fn new_neox(c: &TransformerConfig, s: &mut ParamStore) -> Transformer {
        let std = 0.02;
        let d = c.d_model;
        let embed = s.normal("gpt_neox.embed_in.weight", &[c.vocab_size, d], std);
        let lin = |s: &mut ParamStore, name: &str, out_f: i64, in_f: i64, bias: bool| {
            let weight = s.normal(&format!("{name}.weight"), &[out_f, in_f], std);
            let bias = bias.then(|| s.zeros(&format!("{name}.bias"), &[out_f]));
            Linear::new(name, weight, bias, false)
        };
        let layer_norm = |s: &mut ParamStore, name: &str| Norm::Layer {
            weight: s.ones(&format!("{name}.weight"), &[d]),
            bias: s.zeros(&format!("{name}.bias"), &[d]),
            eps: c.norm_eps,
        };
        let bias = c.variant.attention_bias;
        let mut blocks = Vec::new();
        for i in 0..c.n_layers {
            let p = format!("gpt_neox.layers.{i}");
            let pre_attn = layer_norm(s, &format!("{p}.input_layernorm"));
            let pre_mlp = layer_norm(s, &format!("{p}.post_attention_layernorm"));
            let qkv = lin(s, &format!("{p}.attention.query_key_value"), 3 * d, d, bias);
            let out = lin(s, &format!("{p}.attention.dense"), d, d, bias);
            let fc = lin(s, &format!("{p}.mlp.dense_h_to_4h"), c.d_ff, d, true);
            let proj = lin(s, &format!("{p}.mlp.dense_4h_to_h"), d, c.d_ff, true);
            blocks.push(Block {
                pre_attn: Some(pre_attn),
                attn: Attention {
                    qkv: Qkv::FusedPerHead(qkv),
                    qk_norm: None,
                    out,
                },
                post_attn: None,
                pre_mlp: Some(pre_mlp),
                mlp: Mlp::Gelu {
                    fc,
                    proj,
                    exact: true,
                },
                post_mlp: None,
            });
        }
        let final_norm = layer_norm(s, "gpt_neox.final_layer_norm");
        let lm_head =
            (!c.tie_embeddings).then(|| s.normal("lm_head.weight", &[c.vocab_size, d], std));
        let rope = Some(rope_tables(
            c.rotary_dim(),
            c.max_seq_len,
            c.rope_theta,
            c.variant.rope_scaling.as_ref(),
            s.device(),
        ));
        Transformer {
            config: c.clone(),
            embed,
            positions: None,
            blocks,
            final_norm,
            lm_head,
            rope,
            rope_local: None,
            recompute: Recompute::None,
            piece_weights: None,
        }
    }

    /// Logits `[b, t, vocab]` for token ids `[b, t]`.
    pub fn forward(&self, idx: &Tensor, train: bool) -> Tensor {
        self.forward_full(idx, train).logits
    }

    /// Logits and, for MoE models, the routers' losses and statistics of every layer.
    pub fn forward_full(&self, idx: &Tensor, train: bool) -> ModelOutput {
        self.forward_full_packed(idx, train, None)
    }

    /// `forward_full` with several samples packed in each row (see `Packing`).
    pub fn forward_full_packed(
        &self,
        idx: &Tensor,
        train: bool,
        packing: Option<&Packing>,
    ) -> ModelOutput {
        let out = self.forward_hidden_packed(idx, train, &[], packing);
        ModelOutput {
            logits: self.lm_head(&out.hidden),
            moe_layers: out.moe_layers,
        }
    }

    /// Logits `[.., vocab]` of final hidden states `[.., d]` (`forward_hidden`'s `hidden`):
    /// the output projection alone, so that a caller can run it on a few positions at a time
    /// (distillation's chunked losses).
    pub fn lm_head(&self, hidden: &Tensor) -> Tensor {
        let logits = self.with_head(false, |head| hidden.linear(head, None::<&Tensor>));
        let logits = match &self.config.variant.multipliers {
            Some(m) => logits / m.logits_scaling,
            None => logits,
        };
        match self.config.variant.logits_softcap {
            Some(cap) => (logits / cap).tanh() * cap,
            None => logits,
        }
    }

    /// Everything but the output projection: the final (normed) hidden states `[b, t, d]`, the
    /// residual stream after each block listed in `keep_layers` (`i`: after `i` blocks, 0: the
    /// embeddings; the order of `keep_layers`), and the MoE layers' statistics.
    pub fn forward_hidden(&self, idx: &Tensor, train: bool, keep_layers: &[i64]) -> HiddenOutput {
        self.forward_hidden_packed(idx, train, keep_layers, None)
    }

    /// `forward_hidden`; with `packing`, each position attends only to earlier positions of its
    /// own sample, and positions (RoPE, learned) restart at each sample.
    pub fn forward_hidden_packed(
        &self,
        idx: &Tensor,
        train: bool,
        keep_layers: &[i64],
        packing: Option<&Packing>,
    ) -> HiddenOutput {
        let c = &self.config;
        let mut kept: Vec<(i64, Tensor)> = Vec::new();
        let mut keep = |i: i64, x: &Tensor| {
            if keep_layers.contains(&i) {
                kept.push((i, x.shallow_clone()));
            }
        };
        let (b, t) = idx.size2().expect("token ids are [batch, time]");
        let p_drop = if train { c.dropout } else { 0.0 };
        // Sharded weights: the lookup's backward pass needs only the ids, so the table is let go
        // of at once.
        let w = self.piece_weights.as_ref();
        w.inspect(|w| w.gather(Piece::Embedding, Some(Piece::Block(0))));
        let mut x = Tensor::embedding(&self.embed, idx, -1, false, false); // [b, t, d]
        w.inspect(|w| w.release(Piece::Embedding));
        if let Some(m) = &c.variant.multipliers {
            x = x * m.embedding;
        }
        if c.variant.family.gemma() {
            // sqrt(d) rounded to the activations' dtype first, as transformers' Gemma does.
            let scale = Tensor::from((c.d_model as f64).sqrt())
                .to_kind(x.kind())
                .to_device(x.device());
            x = x * scale;
        }
        if let Some(pos) = &self.positions {
            x = match packing {
                // [b * t] -> [b, t, d]
                Some(p) => {
                    x + pos
                        .index_select(0, &p.positions.reshape([-1]))
                        .view([b, t, -1])
                }
                None => x + pos.narrow(0, 0, t), // learned positions [t, d]
            };
        }
        if p_drop > 0.0 {
            x = x.dropout(p_drop, train);
        }
        keep(0, &x);
        let mut moe_layers = Vec::new();
        // The sliding window's band mask, built once per forward for the layers that use it.
        let band = c.variant.sliding_window.filter(|&w| w < t).map(|w| {
            let pos = Tensor::arange(t, (Kind::Int64, idx.device()));
            let (qi, ki) = (pos.unsqueeze(1), pos.unsqueeze(0)); // [t, 1], [1, t]
            ki.le_tensor(&qi).logical_and(&ki.gt_tensor(&(qi - w)))
        });
        let masks = AttnMasks::new(band, packing, t, idx.device());
        for i in 0..self.blocks.len() {
            let recompute = self.recompute == Recompute::Block && train;
            let sharded = self.piece_weights.is_some() && torch_ext::grad_mode_enabled();
            x = if recompute || sharded {
                self.block_with_weights(i, &x, &masks, (b, t), p_drop, train, recompute)
            } else {
                // A forward pass without a graph (evaluation, generation), or weights whole.
                let w = self.piece_weights.as_ref();
                w.inspect(|w| w.gather(Piece::Block(i), self.piece_after(i, false)));
                let y = self.block_forward(i, x, &masks, (b, t), p_drop, train, &mut moe_layers);
                w.inspect(|w| w.release(Piece::Block(i)));
                y
            };
            keep(i as i64 + 1, &x);
        }
        let layers = keep_layers
            .iter()
            .filter_map(|i| kept.iter().find(|(k, _)| k == i))
            .map(|(_, t)| t.shallow_clone())
            .collect();
        HiddenOutput {
            hidden: self.final_norm.forward(&x), // [b, t, d]
            layers,
            moe_layers,
        }
    }

    /// Block `i` on the residual stream `x` `[b, t, d]`: x + f(norm(x)) (Llama), x + norm(f(x))
    /// (OLMo 2), x + norm(f(norm(x))) (Gemma 2/3), or GPT-NeoX's parallel residual.
    #[allow(clippy::too_many_arguments)]
    fn block_forward(
        &self,
        i: usize,
        x: Tensor,
        masks: &AttnMasks,
        (b, t): (i64, i64),
        p_drop: f64,
        train: bool,
        moe_layers: &mut Vec<MoeLayerStats>,
    ) -> Tensor {
        let block = &self.blocks[i];
        let xn = norm_or_pass(&block.pre_attn, x.shallow_clone());
        let h = self.attention(&block.attn, i, masks, &xn, (b, t), p_drop, train);
        let h = self.residual_branch(norm_or_pass(&block.post_attn, h));
        let drop = |m: Tensor| {
            if p_drop > 0.0 {
                m.dropout(p_drop, train)
            } else {
                m
            }
        };
        if self.config.variant.parallel_residual {
            // GPT-NeoX: the MLP reads the block's input too; summed in transformers' order.
            let xn = norm_or_pass(&block.pre_mlp, x.shallow_clone());
            let m = self.mlp(&block.mlp, &xn, train, moe_layers);
            drop(m) + h + x
        } else {
            let x = x + h;
            let xn = norm_or_pass(&block.pre_mlp, x.shallow_clone());
            let m = self.mlp(&block.mlp, &xn, train, moe_layers);
            let m = self.residual_branch(norm_or_pass(&block.post_mlp, m));
            x + drop(m)
        }
    }

    /// `block_forward` in training, either recomputed (`recompute`: only the block's input is
    /// kept and the backward pass runs the block again, `torch_ext::recompute`) or, with sharded
    /// block weights, with its graph kept (`torch_ext::with_backward_prelude`). Sharded weights
    /// are gathered for every run of the block and let go of after it, except the recomputation
    /// in the backward pass, whose graph needs them until the block's gradients are formed (let
    /// go when the next block is gathered); a kept graph's saved weights, let go of after the
    /// forward pass, are gathered again into the same storage when the backward pass reaches
    /// the block. The recipe checks refuse what a second run would not repeat (dropout's draws,
    /// MoE routers' statistics) and what would keep other copies of the weights alive in a kept
    /// graph (bf16-mixed's autocast copies).
    #[allow(clippy::too_many_arguments)]
    fn block_with_weights(
        &self,
        i: usize,
        x: &Tensor,
        masks: &AttnMasks,
        bt: (i64, i64),
        p_drop: f64,
        train: bool,
        recompute: bool,
    ) -> Tensor {
        let model: *const Transformer = self;
        let masks = masks.shallow_clone();
        let block = move |x: &Tensor| {
            // SAFETY: the model outlives the step: the closure runs during this forward pass
            // (and again, or the prelude runs, during the backward pass of its loss), always
            // while the caller holds the model (`Lm` owns it for the whole run), and it is not
            // moved in between.
            let model = unsafe { &*model };
            let weights = model.piece_weights.as_ref();
            let recomputing = recompute && torch_ext::grad_mode_enabled();
            weights.inspect(|w| w.gather(Piece::Block(i), model.piece_after(i, recomputing)));
            let mut moe = Vec::new();
            let y = model.block_forward(i, x.shallow_clone(), &masks, bt, p_drop, train, &mut moe);
            if !recomputing {
                weights.inspect(|w| w.release(Piece::Block(i)));
            }
            y
        };
        let result = if recompute {
            torch_ext::recompute(x, block)
        } else {
            let prelude = move || {
                // SAFETY: as above.
                let model = unsafe { &*model };
                let weights = model.piece_weights.as_ref();
                weights.inspect(|w| w.gather(Piece::Block(i), model.piece_after(i, true)));
            };
            torch_ext::with_backward_prelude(x, block, prelude)
        };
        result.unwrap_or_else(|e| panic!("block {i}, its weights for the backward pass: {e}"))
    }

    /// The piece a pass runs after block `i`: the next block going forward (the head after the
    /// last), the one before in the backward pass (whose recomputations, or gathers before a
    /// kept graph's gradients, run from the last block to the first; the embedding's gradient
    /// needs no weights).
    fn piece_after(&self, i: usize, backward: bool) -> Option<Piece> {
        match (backward, i + 1 < self.blocks.len()) {
            (true, _) => i.checked_sub(1).map(Piece::Block),
            (false, true) => Some(Piece::Block(i + 1)),
            (false, false) => Some(Piece::Head),
        }
    }

    /// Runs `f` on the output head's weight, gathered first with sharded weights; `f` keeps no
    /// graph needing the weight when `frees` (the chunked loss forms its gradients at once), or
    /// in a pass without a graph: the weight is let go of after `f`. Otherwise the backward
    /// pass needs it, and the backward pass's gather of the last block (for its recomputation,
    /// or before its kept graph's gradients) lets go of it.
    fn with_head<T>(&self, frees: bool, f: impl FnOnce(&Tensor) -> T) -> T {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let Some(w) = self.piece_weights.as_ref() else {
            return f(head);
        };
        let graph = torch_ext::grad_mode_enabled();
        let last = self.blocks.len().checked_sub(1).map(Piece::Block);
        w.gather(Piece::Head, last.filter(|_| graph));
        let out = f(head);
        if frees || !graph {
            w.release(Piece::Head);
        }
        out
    }

    /// `run.shard = "full"`: the pieces' weights are gathered around each use (`PieceWeights`).
    pub fn set_piece_weights(&mut self, weights: std::rc::Rc<dyn PieceWeights>) {
        self.piece_weights = Some(weights);
    }

    /// `train.recompute`: `Block` (`block_with_weights`), `Selective` (`attention_core` and
    /// `gated`), or `None`.
    pub fn set_recompute(&mut self, mode: Recompute) {
        self.recompute = mode;
    }

    /// Whether training recomputes the attention core and the gated activation.
    fn selective(&self, train: bool) -> bool {
        train && self.recompute == Recompute::Selective
    }

    /// Every dense projection, in registration order: what LoRA's `target` patterns select
    /// from (by `Linear::path`). MoE experts are not projections here.
    pub fn projections(&self) -> Vec<&Linear> {
        self.block_projections().into_iter().flatten().collect()
    }

    /// `projections`, grouped by block (Wanda prunes one block at a time).
    pub fn block_projections(&self) -> Vec<Vec<&Linear>> {
        self.blocks
            .iter()
            .map(|block| {
                let mut out = Vec::new();
                match &block.attn.qkv {
                    Qkv::Separate { q, k, v } => out.extend([q, k, v]),
                    Qkv::Fused(qkv) | Qkv::FusedPerHead(qkv) => out.push(qkv),
                }
                out.push(&block.attn.out);
                match &block.mlp {
                    Mlp::SwiGlu { gate, up, down } => out.extend([gate, up, down]),
                    Mlp::FusedGlu { gate_up, down } => out.extend([gate_up, down]),
                    Mlp::Gelu { fc, proj, .. } => out.extend([fc, proj]),
                    Mlp::Moe(_) => {}
                }
                out
            })
            .collect()
    }

    /// `projections`, mutably (to attach adapters).
    pub fn projections_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = Vec::new();
        for block in &mut self.blocks {
            match &mut block.attn.qkv {
                Qkv::Separate { q, k, v } => out.extend([q, k, v]),
                Qkv::Fused(qkv) | Qkv::FusedPerHead(qkv) => out.push(qkv),
            }
            out.push(&mut block.attn.out);
            match &mut block.mlp {
                Mlp::SwiGlu { gate, up, down } => out.extend([gate, up, down]),
                Mlp::FusedGlu { gate_up, down } => out.extend([gate_up, down]),
                Mlp::Gelu { fc, proj, .. } => out.extend([fc, proj]),
                Mlp::Moe(_) => {}
            }
        }
        out
    }

    /// The MoE layers, in order (empty for dense models).
    pub fn moe_layers(&self) -> Vec<&Moe> {
        self.blocks
            .iter()
            .filter_map(|b| match &b.mlp {
                Mlp::Moe(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        attn: &Attention,
        layer: usize,
        masks: &AttnMasks,
        x: &Tensor,
        (b, t): (i64, i64),
        p_drop: f64,
        train: bool,
    ) -> Tensor {
        let c = &self.config;
        let hd = c.head_dim();
        let (mut q, mut k, v) = match &attn.qkv {
            Qkv::Separate { q, k, v } => (
                q.forward(x, train),
                k.forward(x, train),
                v.forward(x, train),
            ),
            Qkv::Fused(qkv) => {
                let (q_width, kv_width) = (c.n_heads * hd, c.n_kv_heads * hd);
                let parts = qkv
                    .forward(x, train)
                    .split_with_sizes([q_width, kv_width, kv_width], -1);
                (
                    parts[0].shallow_clone(),
                    parts[1].shallow_clone(),
                    parts[2].shallow_clone(),
                )
            }
            Qkv::FusedPerHead(qkv) => {
                // [b, t, h, (q, k, v), hd] -> three [b, t, h * hd]
                let y = qkv.forward(x, train).view([b, t, c.n_heads, 3, hd]);
                let part = |i: i64| y.select(3, i).reshape([b, t, c.n_heads * hd]);
                (part(0), part(1), part(2))
            }
        };
        if let Some(QkNorm::Whole(q_norm, k_norm)) = &attn.qk_norm {
            (q, k) = (q_norm.forward(&q), k_norm.forward(&k));
        }
        // [b, t, h*hd] -> [b, h, t, hd]
        let q = q.view([b, t, c.n_heads, hd]).transpose(1, 2);
        let k = k.view([b, t, c.n_kv_heads, hd]).transpose(1, 2);
        let v = v.view([b, t, c.n_kv_heads, hd]).transpose(1, 2);
        let (q, k) = match &attn.qk_norm {
            Some(QkNorm::PerHead(q_norm, k_norm)) => (q_norm.forward(&q), k_norm.forward(&k)),
            _ => (q, k),
        };
        // Gemma 3's sliding-window layers have their own RoPE base.
        let tables = match &self.rope_local {
            Some(local) if self.is_windowed(layer) => Some(local),
            _ => self.rope.as_ref(),
        };
        let (q, k) = match tables {
            Some((cos, sin)) => {
                let (cos, sin) = match &masks.positions {
                    // Each position's own angle: [b * t, r] -> [b, 1, t, r]
                    Some(pos) => (
                        cos.index_select(0, pos).view([b, 1, t, -1]),
                        sin.index_select(0, pos).view([b, 1, t, -1]),
                    ),
                    None => (cos.narrow(0, 0, t), sin.narrow(0, 0, t)), // [t, r]
                };
                let (cos, sin) = (cos.to_kind(q.kind()), sin.to_kind(q.kind()));
                (apply_rope(&q, &cos, &sin), apply_rope(&k, &cos, &sin))
            }
            None => (q, k),
        };
        // A window shorter than the sequence, or packed samples, need an explicit mask;
        // otherwise the causal flag lets SDPA pick its fused kernels.
        let band = masks.for_layer(self.is_sliding(layer));
        let y = if self.selective(train) {
            let model: *const Transformer = self;
            let band = band.map(Tensor::shallow_clone);
            let core = move |xs: &[Tensor]| {
                // SAFETY: as in `block_with_weights`: the model outlives the step's backward pass.
                let model = unsafe { &*model };
                model.attention_core(&xs[0], &xs[1], &xs[2], band.as_ref(), layer, 0.0, true)
            };
            torch_ext::recompute_many(&[&q, &k, &v], core)
                .unwrap_or_else(|e| panic!("attention of layer {layer}, recomputed: {e}"))
        } else {
            self.attention_core(&q, &k, &v, band, layer, p_drop, train)
        }; // [b, h, t, hd]
        let y = y.transpose(1, 2).contiguous().view([b, t, c.n_heads * hd]);
        let y = attn.out.forward(&y, train);
        if p_drop > 0.0 {
            y.dropout(p_drop, true)
        } else {
            y
        }
    }

    /// Attention of q `[b, h, t, hd]` on k, v `[b, kv_h, t, hd]`: softmax(q k^T * scale + mask)
    /// v, through SDPA (its fused kernels when `band` is none) or the soft-capped path.
    #[allow(clippy::too_many_arguments)]
    fn attention_core(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        band: Option<&Tensor>,
        layer: usize,
        p_drop: f64,
        train: bool,
    ) -> Tensor {
        let c = &self.config;
        match c.variant.attention_softcap {
            Some(cap) => self.softcapped_attention(q, k, v, band, cap, layer, p_drop, train),
            None => Tensor::scaled_dot_product_attention(
                q,
                k,
                v,
                band,
                p_drop,
                band.is_none(),
                self.attention_scale(layer),
                c.n_kv_heads != c.n_heads,
            ),
        }
    }

    /// The gated MLP's product act(gate) * up; with selective recomputation, act(gate) is not
    /// kept but computed again in the backward pass.
    fn gated(&self, gate: Tensor, up: Tensor, train: bool) -> Tensor {
        if !self.selective(train) {
            return self.gate_activation(gate) * up;
        }
        let model: *const Transformer = self;
        let product = move |xs: &[Tensor]| {
            // SAFETY: as in `block_with_weights`: the model outlives the step's backward pass.
            let model = unsafe { &*model };
            model.gate_activation(xs[0].shallow_clone()) * &xs[1]
        };
        torch_ext::recompute_many(&[&gate, &up], product)
            .unwrap_or_else(|e| panic!("gated activation, recomputed: {e}"))
    }

    /// A block's MLP on its (normed) input; an MoE layer adds its statistics to `moe_layers`.
    fn mlp(
        &self,
        mlp: &Mlp,
        xn: &Tensor,
        train: bool,
        moe_layers: &mut Vec<MoeLayerStats>,
    ) -> Tensor {
        match mlp {
            Mlp::Moe(moe) => {
                let o = moe.forward(xn, train);
                moe_layers.push(MoeLayerStats {
                    loss: o.loss,
                    aux_loss: o.aux_loss,
                    z_loss: o.z_loss,
                    expert_load: o.expert_load,
                    dropped_fraction: o.dropped_fraction,
                });
                o.out
            }
            Mlp::SwiGlu { gate, up, down } => {
                let h = self.gated(gate.forward(xn, train), up.forward(xn, train), train);
                down.forward(&h, train)
            }
            Mlp::FusedGlu { gate_up, down } => {
                let parts = gate_up.forward(xn, train).chunk(2, -1);
                let h = self.gated(parts[0].shallow_clone(), parts[1].shallow_clone(), train);
                down.forward(&h, train)
            }
            Mlp::Gelu { fc, proj, exact } => {
                let h = fc.forward(xn, train);
                proj.forward(&h.gelu(if *exact { "none" } else { "tanh" }), train)
            }
        }
    }

    /// The gated MLP's activation of the gate: silu (SwiGLU), or Gemma's tanh GELU (GeGLU).
    fn gate_activation(&self, g: Tensor) -> Tensor {
        if self.config.variant.family.gemma() {
            g.gelu("tanh")
        } else {
            g.silu()
        }
    }

    /// A block's attention or MLP output before the residual add: Granite scales it.
    fn residual_branch(&self, h: Tensor) -> Tensor {
        match &self.config.variant.multipliers {
            Some(m) => h * m.residual,
            None => h,
        }
    }

    /// Attention written out for soft-capped scores (Gemma 2/3), as transformers' eager
    /// attention computes it: scores in the activations' dtype, scaled, capped
    /// `cap * tanh(s / cap)`, masked (causal, or the sliding window's `band`), softmax in fp32.
    #[allow(clippy::too_many_arguments)]
    fn softcapped_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        band: Option<&Tensor>,
        cap: f64,
        layer: usize,
        p_drop: f64,
        train: bool,
    ) -> Tensor {
        let c = &self.config;
        // Grouped-query attention: each key/value head serves n_heads / n_kv_heads query heads.
        let group = c.n_heads / c.n_kv_heads;
        let (k, v) = if group > 1 {
            (
                k.repeat_interleave_self_int(group, Some(1), None),
                v.repeat_interleave_self_int(group, Some(1), None),
            )
        } else {
            (k.shallow_clone(), v.shallow_clone())
        };
        let scale = self
            .attention_scale(layer)
            .unwrap_or(1.0 / (c.head_dim() as f64).sqrt());
        let scores = q.matmul(&k.transpose(-2, -1)) * scale; // [b, h, t, t]
        let scores = (scores / cap).tanh() * cap;
        let t = q.size()[2];
        let allowed = match band {
            Some(band) => band.shallow_clone(),
            None => Tensor::ones([t, t], (Kind::Bool, q.device())).tril(0),
        };
        let scores = scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
        let probs = scores.softmax(-1, Kind::Float).to_kind(q.kind());
        let probs = if p_drop > 0.0 {
            probs.dropout(p_drop, train)
        } else {
            probs
        };
        probs.matmul(&v)
    }

    /// Whether layer `layer` has a sliding window (`sliding_window` set, and the layer marked
    /// by `layer_types` when there are layer types).
    fn is_windowed(&self, layer: usize) -> bool {
        self.config.variant.sliding_window.is_some() && self.is_sliding(layer)
    }

    /// Whether layer `layer` attends through the sliding window (when one is set).
    fn is_sliding(&self, layer: usize) -> bool {
        self.config
            .variant
            .sliding_layers
            .as_ref()
            .is_none_or(|layers| layers.get(layer).copied().unwrap_or(false))
    }

    /// The factor of attention scores when it is not SDPA's default 1/sqrt(head_dim) (GPT-2's
    /// flags, Granite's attention multiplier, Gemma 2/3's `query_pre_attn_scalar`); None: the
    /// default.
    fn attention_scale(&self, layer: usize) -> Option<f64> {
        let v = &self.config.variant;
        if let Some(m) = &v.multipliers {
            return Some(m.attention);
        }
        if let Some(scalar) = v.query_pre_attn_scalar {
            return Some(1.0 / scalar.sqrt());
        }
        if !v.unscaled_attention && !v.scale_attn_by_inverse_layer_idx {
            return None;
        }
        let base = if v.unscaled_attention {
            1.0
        } else {
            1.0 / (self.config.head_dim() as f64).sqrt()
        };
        let by_layer = if v.scale_attn_by_inverse_layer_idx {
            1.0 / (layer as f64 + 1.0)
        } else {
            1.0
        };
        Some(base * by_layer)
    }

    /// Mean next-token cross-entropy in fp32 of the final hidden states `[b, t, d]`
    /// (`forward_hidden`'s `hidden`) against `targets` `[b, t]` (-100: left out), the output
    /// projection and the loss computed `chunk` positions at a time by one autograd function
    /// (`torch_ext::linear_cross_entropy`), so the `[b, t, vocab]` logits are never whole. Equal
    /// to `loss(lm_head(hidden))`; a model with logit soft-capping takes that composite path.
    pub fn chunked_loss(&self, hidden: &Tensor, targets: &Tensor, chunk: i64) -> Result<Tensor> {
        if self.config.variant.logits_softcap.is_some() {
            return Ok(Transformer::loss(&self.lm_head(hidden), targets));
        }
        let scale = self
            .config
            .variant
            .multipliers
            .as_ref()
            .map_or(1.0, |m| m.logits_scaling);
        let d = hidden.size()[hidden.dim() - 1];
        self.with_head(true, |head| {
            torch_ext::linear_cross_entropy(
                &hidden.reshape([-1, d]),
                head,
                &targets.reshape([-1]),
                scale,
                chunk,
                -100,
            )
        })
        .map_err(|e| crate::error::Error::Torch(format!("chunked loss: {e}")))
    }

    /// Mean next-token cross-entropy of `logits` against `targets` `[b, t]`, computed in fp32.
    pub fn loss(logits: &Tensor, targets: &Tensor) -> Tensor {
        Transformer::token_losses(logits, targets, tch::Reduction::Mean)
    }

    /// Next-token cross-entropy in fp32 of logits `[b, t, vocab]` against targets `[b, t]`
    /// (-100: left out), reduced by `reduction` (`None`: one loss per position, `[b * t]`).
    pub fn token_losses(logits: &Tensor, targets: &Tensor, reduction: tch::Reduction) -> Tensor {
        let v = logits.size()[2];
        logits
            .reshape([-1, v])
            .to_kind(Kind::Float)
            .cross_entropy_loss::<Tensor>(&targets.reshape([-1]), None, reduction, -100, 0.0)
    }

    /// Parameters that are not embeddings (for FLOPs accounting).
    pub fn num_params_no_embeddings(&self, store: &ParamStore) -> i64 {
        store
            .iter()
            .filter(|p| !is_embedding(&p.name))
            .map(|p| p.tensor.numel() as i64)
            .sum()
    }
}

/// What `forward_hidden` returns: the model up to, not including, the output projection.
pub struct HiddenOutput {
    /// Final hidden states after the last norm `[b, t, d]`: the input of `lm_head`.
    pub hidden: Tensor,
    /// The residual stream at each requested layer `[b, t, d]`, in the order requested.
    pub layers: Vec<Tensor>,
    pub moe_layers: Vec<MoeLayerStats>,
}

/// Several samples packed in each row of a batch (`data/sft.rs`): the sample each position
/// belongs to and its position within the sample, both `[b, t]` int64 on the model's device.
pub struct Packing {
    pub segments: Tensor,
    pub positions: Tensor,
}

/// The attention masks of one forward pass (`true`: may attend), built once for all layers.
struct AttnMasks {
    /// The sliding window's causal band `[t, t]`, when the window is shorter than the sequence.
    band: Option<Tensor>,
    /// With packing: causal and same-sample `[b, 1, t, t]`, and that within the band.
    packed: Option<(Tensor, Option<Tensor>)>,
    /// With packing: each position's position within its sample, `[b * t]`.
    positions: Option<Tensor>,
}

impl AttnMasks {
    fn new(
        band: Option<Tensor>,
        packing: Option<&Packing>,
        t: i64,
        device: tch::Device,
    ) -> AttnMasks {
        let Some(p) = packing else {
            return AttnMasks {
                band,
                packed: None,
                positions: None,
            };
        };
        let causal = Tensor::ones([t, t], (Kind::Bool, device)).tril(0);
        let same = p.segments.unsqueeze(2).eq_tensor(&p.segments.unsqueeze(1)); // [b, t, t]
        let full = same.logical_and(&causal).unsqueeze(1); // [b, 1, t, t]
        let banded = band.as_ref().map(|w| full.logical_and(w));
        AttnMasks {
            band,
            packed: Some((full, banded)),
            positions: Some(p.positions.reshape([-1])),
        }
    }

    /// The same masks, sharing their tensors (kept by a recomputed block until backward).
    fn shallow_clone(&self) -> AttnMasks {
        AttnMasks {
            band: self.band.as_ref().map(Tensor::shallow_clone),
            packed: self.packed.as_ref().map(|(full, banded)| {
                (
                    full.shallow_clone(),
                    banded.as_ref().map(Tensor::shallow_clone),
                )
            }),
            positions: self.positions.as_ref().map(Tensor::shallow_clone),
        }
    }

    /// The mask of a layer (`sliding`: one that uses the window); `None`: plain causal.
    fn for_layer(&self, sliding: bool) -> Option<&Tensor> {
        match &self.packed {
            Some((full, banded)) if sliding => Some(banded.as_ref().unwrap_or(full)),
            Some((full, _)) => Some(full),
            None => self.band.as_ref().filter(|_| sliding),
        }
    }
}

/// `train.recompute`: which activations the backward pass recomputes instead of keeping them.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    serde::Serialize,
    serde::Deserialize,
    PartialEq,
    schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Recompute {
    /// Every activation is kept.
    #[default]
    None,
    /// Each transformer block keeps only its input and runs again in the backward pass.
    Block,
    /// Only the attention core and the gated MLP's activation run again in the backward pass.
    Selective,
}

impl Recompute {
    pub fn is_none(&self) -> bool {
        *self == Recompute::None
    }
}

/// What one forward pass returns.
pub struct ModelOutput {
    pub logits: Tensor,
    /// One entry per MoE layer (empty for dense models).
    pub moe_layers: Vec<MoeLayerStats>,
}

impl ModelOutput {
    /// The sum over MoE layers of their weighted router losses, to add to the LM loss.
    pub fn router_loss(&self) -> Option<Tensor> {
        self.moe_layers
            .iter()
            .map(|l| l.loss.shallow_clone())
            .reduce(|a, b| a + b)
    }
}

pub struct MoeLayerStats {
    /// Weighted aux + z loss of the layer.
    pub loss: Tensor,
    pub aux_loss: Tensor,
    pub z_loss: Tensor,
    /// `[E]` share of routed assignments per expert.
    pub expert_load: Tensor,
    pub dropped_fraction: f64,
}

// The name rules of parameters live with the name patterns in `params.rs` (pruning's defaults
// use them too); re-exported here where callers have always found them.
pub use super::params::{is_embedding, is_norm_or_bias};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::config::{Gpt2Config, GptNeoxConfig, LlamaConfig, Multipliers};
    use crate::models::moe::{MoeConfig, Routing};

    fn llama(edit: impl FnOnce(&mut LlamaConfig)) -> ModelConfig {
        let mut c = LlamaConfig {
            vocab_size: 64,
            d_model: 16,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: Some(2),
            head_dim: None,
            d_ff: 24,
            max_seq_len: 16,
            rope_theta: 10000.0,
            norm_eps: 1e-6,
            tie_embeddings: false,
            moe: None,
            family: DecoderFamily::Llama,
            attention_bias: false,
            mlp_bias: false,
            rope_scaling: None,
            sliding_window: None,
            layer_types: None,
            multipliers: None,
            attention_softcap: None,
            logits_softcap: None,
            query_pre_attn_scalar: None,
            local_rope_theta: None,
            partial_rotary_factor: None,
        };
        edit(&mut c);
        ModelConfig::Llama(c)
    }

    /// `param_count`, which bounds untrusted configs before anything is allocated, counts what
    /// the built model registers, family by family.
    #[test]
    fn param_count_is_what_the_model_registers() {
        let moe = MoeConfig {
            n_experts: 4,
            top_k: 2,
            routing: Routing::SoftmaxThenTopK,
            capacity_factor: None,
            aux_loss_coef: 0.01,
            router_z_loss_coef: 0.0,
            shared_expert: true,
        };
        let cases = vec![
            llama(|_| {}),
            llama(|c| {
                c.tie_embeddings = true;
                c.attention_bias = true;
                c.mlp_bias = true;
            }),
            llama(|c| c.family = DecoderFamily::Qwen2),
            llama(|c| {
                c.family = DecoderFamily::Qwen3;
                c.head_dim = Some(8);
            }),
            llama(|c| c.family = DecoderFamily::Gemma3),
            llama(|c| c.family = DecoderFamily::Olmo2),
            llama(|c| c.family = DecoderFamily::Phi3),
            llama(|c| c.moe = Some(moe.clone())),
            ModelConfig::Gpt2(Gpt2Config {
                vocab_size: 64,
                d_model: 16,
                n_layers: 2,
                n_heads: 4,
                d_ff: Some(24),
                max_seq_len: 16,
                norm_eps: 1e-5,
                dropout: 0.0,
                scale_attn_weights: true,
                scale_attn_by_inverse_layer_idx: false,
                tie_embeddings: false,
            }),
            ModelConfig::GptNeox(GptNeoxConfig {
                vocab_size: 64,
                d_model: 16,
                n_layers: 2,
                n_heads: 4,
                d_ff: 24,
                max_seq_len: 16,
                rope_theta: 10000.0,
                rope_scaling: None,
                partial_rotary_factor: 0.5,
                norm_eps: 1e-5,
                parallel_residual: true,
                attention_bias: false,
                tie_embeddings: true,
            }),
        ];
        for model in cases {
            let config = TransformerConfig::from_recipe(&model);
            let mut store = ParamStore::new(tch::Device::Cpu);
            Transformer::new(&config, &mut store).expect("builds");
            let built: i128 = store.iter().map(|p| p.tensor.numel() as i128).sum();
            assert_eq!(config.param_count(), built, "{model:?}");
            assert_pieces(&config, &store);
        }
    }

    /// `run.shard = "full"` finds every piece of every family by name: one embedding, the head
    /// unless tied, every block; only the final norm and learned positions are left whole.
    fn assert_pieces(config: &TransformerConfig, store: &ParamStore) {
        let pieces: Vec<(String, Option<Piece>)> = store
            .trainable()
            .map(|p| (p.name.clone(), Piece::of(&p.name)))
            .collect();
        let count = |want: Piece| pieces.iter().filter(|(_, p)| *p == Some(want)).count();
        assert_eq!(count(Piece::Embedding), 1, "{pieces:?}");
        assert_eq!(
            count(Piece::Head),
            usize::from(!config.tie_embeddings),
            "{pieces:?}"
        );
        for i in 0..config.n_layers as usize {
            assert!(count(Piece::Block(i)) > 0, "block {i}: {pieces:?}");
        }
        for (name, _) in pieces.iter().filter(|(_, p)| p.is_none()) {
            let whole = [
                "norm.weight",
                "norm.bias",
                "ln_f.",
                "wpe.",
                "final_layer_norm.",
            ];
            assert!(whole.iter().any(|w| name.contains(w)), "{name} left whole");
        }
    }

    /// `chunked_loss` equals the composite loss of `lm_head`'s logits with an untied and a tied
    /// head, Granite's logits scaling, and (the composite path) Gemma 2's soft-capping.
    #[test]
    fn the_chunked_loss_is_the_loss_of_the_output_projection() {
        let multipliers = Multipliers {
            embedding: 1.0,
            residual: 1.0,
            attention: 0.25,
            logits_scaling: 3.0,
        };
        let cases = vec![
            llama(|_| {}),
            llama(|c| c.tie_embeddings = true),
            llama(|c| c.multipliers = Some(multipliers)),
            llama(|c| c.logits_softcap = Some(5.0)),
        ];
        for model in cases {
            tch::manual_seed(5);
            let config = TransformerConfig::from_recipe(&model);
            let mut store = ParamStore::new(tch::Device::Cpu);
            let m = Transformer::new(&config, &mut store).expect("builds");
            let idx = Tensor::randint(64, [3, 16], (Kind::Int64, tch::Device::Cpu));
            let targets = idx.roll([-1], [1]);
            let hidden = m.forward_hidden(&idx, false, &[]).hidden;
            let whole = Transformer::loss(&m.lm_head(&hidden), &targets).double_value(&[]);
            let chunked = m.chunked_loss(&hidden, &targets, 7).expect("loss");
            let chunked = chunked.double_value(&[]);
            assert!(
                ((chunked - whole) / whole).abs() < 1e-6,
                "{model:?}: {chunked} vs {whole}"
            );
        }
    }

    /// Packed samples (`Packing`): each sample's logits are those of the sample run alone, for
    /// every kind of position encoding and mask (RoPE, partial RoPE, learned positions, sliding
    /// windows, soft-capped attention): nothing leaks across samples.
    #[test]
    fn packed_samples_give_the_logits_of_each_sample_alone() {
        let gpt2 = ModelConfig::Gpt2(Gpt2Config {
            vocab_size: 64,
            d_model: 16,
            n_layers: 2,
            n_heads: 4,
            d_ff: Some(24),
            max_seq_len: 16,
            norm_eps: 1e-5,
            dropout: 0.0,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            tie_embeddings: false,
        });
        let neox = ModelConfig::GptNeox(GptNeoxConfig {
            vocab_size: 64,
            d_model: 16,
            n_layers: 2,
            n_heads: 4,
            d_ff: 24,
            max_seq_len: 16,
            rope_theta: 10000.0,
            rope_scaling: None,
            partial_rotary_factor: 0.5,
            norm_eps: 1e-5,
            parallel_residual: true,
            attention_bias: false,
            tie_embeddings: true,
        });
        let cases = vec![
            llama(|_| {}),
            llama(|c| {
                c.sliding_window = Some(3);
                c.layer_types = Some(vec![LayerType::SlidingAttention, LayerType::FullAttention]);
            }),
            llama(|c| {
                c.family = DecoderFamily::Gemma2;
                c.attention_softcap = Some(50.0);
                c.sliding_window = Some(4);
            }),
            gpt2,
            neox,
        ];
        let lens = [5i64, 3, 6];
        for model in cases {
            tch::manual_seed(3);
            let config = TransformerConfig::from_recipe(&model);
            let mut store = ParamStore::new(tch::Device::Cpu);
            let m = Transformer::new(&config, &mut store).expect("builds");
            let t = 16i64;
            let ids = Tensor::randint(64, [1, t], (Kind::Int64, tch::Device::Cpu));
            let (mut segments, mut positions) = (vec![3i64; t as usize], vec![0i64; t as usize]);
            let mut at = 0usize;
            for (k, &len) in lens.iter().enumerate() {
                for j in 0..len as usize {
                    segments[at + j] = k as i64;
                    positions[at + j] = j as i64;
                }
                at += len as usize;
            }
            for (j, p) in (at..t as usize).enumerate() {
                positions[p] = j as i64;
            }
            let packing = Packing {
                segments: Tensor::from_slice(&segments).view([1, t]),
                positions: Tensor::from_slice(&positions).view([1, t]),
            };
            let packed = m.forward_full_packed(&ids, false, Some(&packing)).logits;
            let mut start = 0i64;
            for &len in &lens {
                let alone = m.forward(&ids.narrow(1, start, len), false);
                let diff = (packed.narrow(1, start, len) - &alone)
                    .abs()
                    .max()
                    .double_value(&[]);
                assert!(
                    diff < 1e-5,
                    "{model:?}: sample at {start} differs by {diff}"
                );
                start += len;
            }
        }
    }
}
