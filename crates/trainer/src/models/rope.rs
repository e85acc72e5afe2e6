//! Rotary position embeddings (Su et al. 2021) in the rotate-half convention of transformers'
//! `LlamaRotaryEmbedding`, and the frequency scalings of long-context checkpoints, as
//! transformers' `modeling_rope_utils.py` computes them:
//!
//! - `linear` (position interpolation, Chen et al. 2023): every frequency divided by `factor`;
//! - `dynamic` (NTK-aware, /u/bloc97 and /u/emozilla): transformers recomputes the base only for
//!   sequences longer than `max_position_embeddings`; this tool never runs a sequence longer than
//!   `model.max_seq_len` (= `max_position_embeddings`), so the tables are the default ones;
//! - `llama3` (Llama 3.1): low frequencies divided by `factor`, high ones kept, a smooth ramp
//!   between, with wavelength bounds from `original_max_position_embeddings`;
//! - `yarn` (Peng et al. 2023): a ramp between interpolated and extrapolated frequencies over the
//!   dimensions, and cos/sin scaled by the attention factor.
//!
//! ```toml
//! [model.rope_scaling]
//! type = "llama3"
//! factor = 8.0
//! low_freq_factor = 1.0
//! high_freq_factor = 4.0
//! original_max_position_embeddings = 8192
//! ```

use crate::validate::{check, positive, positive_finite, Invalid};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// `[model.rope_scaling]`: how the rotary frequencies are scaled; absent: plain RoPE.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RopeScaling {
    /// Every frequency divided by `factor`.
    Linear {
        /// The divisor of every frequency (>= 1).
        factor: f64,
    },
    /// NTK-aware scaling for sequences beyond `max_seq_len`; within it (always, here) plain RoPE.
    Dynamic {
        /// The context-extension factor (>= 1).
        factor: f64,
    },
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        /// The divisor of the low frequencies (8 in Llama 3.1).
        factor: f64,
        /// Wavelengths above original_max_position_embeddings / low_freq_factor are divided.
        low_freq_factor: f64,
        /// Wavelengths below original_max_position_embeddings / high_freq_factor are kept.
        high_freq_factor: f64,
        /// The pretraining context length (8192 in Llama 3.1).
        original_max_position_embeddings: i64,
    },
    /// YaRN: ramped interpolation and an attention factor on cos/sin.
    Yarn {
        /// The context-extension factor.
        factor: f64,
        /// The pretraining context length.
        original_max_position_embeddings: i64,
        /// cos/sin multiplier; absent: from factor (and mscale / mscale_all_dim when both set).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attention_factor: Option<f64>,
        /// Rotations bounding the extrapolated dimensions (default 32).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta_fast: Option<f64>,
        /// Rotations bounding the interpolated dimensions (default 1).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        beta_slow: Option<f64>,
        /// Numerator scale of the inferred attention factor.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mscale: Option<f64>,
        /// Denominator scale of the inferred attention factor.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mscale_all_dim: Option<f64>,
        /// Round the ramp's bounds to whole dimensions (default true).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        truncate: Option<bool>,
    },
}

impl RopeScaling {
    /// Range checks, with `model.rope_scaling.*` key paths.
    pub fn validate(&self) -> Result<(), Invalid> {
        let key = "model.rope_scaling";
        let factor = |f: f64| {
            check(
                f.is_finite() && f >= 1.0,
                &format!("{key}.factor"),
                format!("expected a number >= 1, got {f}"),
            )
        };
        match self {
            RopeScaling::Linear { factor: f } | RopeScaling::Dynamic { factor: f } => factor(*f),
            RopeScaling::Llama3 {
                factor: f,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                factor(*f)?;
                positive_finite(*low_freq_factor, &format!("{key}.low_freq_factor"))?;
                check(
                    high_freq_factor.is_finite() && high_freq_factor > low_freq_factor,
                    &format!("{key}.high_freq_factor"),
                    "must exceed low_freq_factor",
                )?;
                positive(
                    *original_max_position_embeddings,
                    &format!("{key}.original_max_position_embeddings"),
                )
            }
            RopeScaling::Yarn {
                factor: f,
                original_max_position_embeddings,
                attention_factor,
                ..
            } => {
                factor(*f)?;
                if let Some(a) = attention_factor {
                    positive_finite(*a, &format!("{key}.attention_factor"))?;
                }
                positive(
                    *original_max_position_embeddings,
                    &format!("{key}.original_max_position_embeddings"),
                )
            }
        }
    }
}

/// The inverse frequencies `[dim / 2]` (fp32) and the cos/sin multiplier.
fn inv_freq(dim: i64, theta: f64, scaling: Option<&RopeScaling>) -> (Tensor, f64) {
    let cpu = (Kind::Int64, tch::Device::Cpu);
    let exponents = Tensor::arange_start_step(0, dim, 2, cpu).to_kind(Kind::Float) / dim as f64;
    let plain = Tensor::pow_scalar(theta, &exponents).reciprocal();
    match scaling {
        None | Some(RopeScaling::Dynamic { .. }) => (plain, 1.0),
        Some(RopeScaling::Linear { factor }) => (plain / *factor, 1.0),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = *original_max_position_embeddings as f64;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let wavelen = plain.full_like(2.0 * std::f64::consts::PI) / &plain;
            let low = wavelen.gt(low_wavelen);
            let scaled = plain.where_self(&low.logical_not(), &(&plain / *factor));
            let smooth = (wavelen.full_like(old) / &wavelen - *low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            let smoothed = (smooth.ones_like() - &smooth) * &scaled / *factor + &smooth * &scaled;
            let medium = wavelen.ge(high_wavelen).logical_and(&low.logical_not());
            (smoothed.where_self(&medium, &scaled), 1.0)
        }
        Some(RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            attention_factor,
            beta_fast,
            beta_slow,
            mscale,
            mscale_all_dim,
            truncate,
        }) => {
            let get_mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            let attention = attention_factor.unwrap_or(match (mscale, mscale_all_dim) {
                (Some(m), Some(a)) if *m != 0.0 && *a != 0.0 => {
                    get_mscale(*factor, *m) / get_mscale(*factor, *a)
                }
                _ => get_mscale(*factor, 1.0),
            });
            let (fast, slow) = (beta_fast.unwrap_or(32.0), beta_slow.unwrap_or(1.0));
            let orig = *original_max_position_embeddings as f64;
            let correction_dim = |rotations: f64| {
                (dim as f64 * (orig / (rotations * 2.0 * std::f64::consts::PI)).ln())
                    / (2.0 * theta.ln())
            };
            let (mut low, mut high) = (correction_dim(fast), correction_dim(slow));
            if truncate.unwrap_or(true) {
                (low, high) = (low.floor(), high.ceil());
            }
            let (low, mut high) = (low.max(0.0), high.min((dim - 1) as f64));
            if low == high {
                high += 0.001;
            }
            let ramp = ((Tensor::arange(dim / 2, (Kind::Float, tch::Device::Cpu)) - low)
                / (high - low))
                .clamp(0.0, 1.0);
            let extrapolation = ramp.ones_like() - ramp;
            let interpolation = &plain / *factor;
            let inv = &interpolation * (extrapolation.ones_like() - &extrapolation)
                + &plain * &extrapolation;
            (inv, attention)
        }
    }
}

/// cos and sin tables `[max_seq_len, head_dim]` of rotary embeddings, with the frequencies
/// repeated over both halves as transformers' `LlamaRotaryEmbedding` does.
pub fn rope_tables(
    head_dim: i64,
    max_seq_len: i64,
    theta: f64,
    scaling: Option<&RopeScaling>,
    device: tch::Device,
) -> (Tensor, Tensor) {
    let (inv_freq, attention_factor) = inv_freq(head_dim, theta, scaling);
    let pos = Tensor::arange(max_seq_len, (Kind::Int64, tch::Device::Cpu)).to_kind(Kind::Float);
    let freqs = pos.unsqueeze(1) * inv_freq.unsqueeze(0); // [t, hd/2]
    let emb = Tensor::cat(&[&freqs, &freqs], -1); // [t, hd]
    let (cos, sin) = (emb.cos(), emb.sin());
    let (cos, sin) = if attention_factor != 1.0 {
        (cos * attention_factor, sin * attention_factor)
    } else {
        (cos, sin)
    };
    (cos.to_device(device), sin.to_device(device))
}

/// x * cos + rotate_half(x) * sin, for x `[b, h, t, hd]`. Tables narrower than the head
/// (`[t, r]`, r < hd: partial rotary) rotate the first r dimensions and pass the rest through,
/// as transformers' `apply_rotary_pos_emb` does.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let (hd, r) = (x.size()[3], *cos.size().last().expect("a table of angles"));
    if r < hd {
        let rotated = apply_rope(&x.narrow(3, 0, r), cos, sin);
        return Tensor::cat(&[rotated, x.narrow(3, r, hd - r)], 3);
    }
    let half = hd / 2;
    let x1 = x.narrow(3, 0, half);
    let x2 = x.narrow(3, half, half);
    let rotated = Tensor::cat(&[&(-x2), &x1], 3);
    x * cos + rotated * sin
}
