//! `[optim]` in a recipe: the optimizer registry tagged by `kind`, and its range checks.
//!
//! ```toml
//! [optim]
//! kind = "adamw"           # or "sgd", "galore_adamw", "gsm"
//! lr = 3e-4
//! weight_decay = 0.1
//! ```

use crate::validate::{check, positive, positive_finite, Invalid};
use serde::{Deserialize, Serialize};

/// The optimizer registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimConfig {
    /// AdamW with decoupled weight decay (torch.optim.AdamW's update).
    Adamw {
        /// Peak learning rate (the schedule scales it).
        lr: f64,
        /// Decay rates of the running averages of the gradient and of its square (beta1, beta2).
        #[serde(default = "default_betas")]
        betas: [f64; 2],
        /// Added to the denominator's square root, for stability.
        #[serde(default = "default_eps")]
        eps: f64,
        /// Decoupled weight decay coefficient (each step `p *= 1 - lr * weight_decay`).
        #[serde(default = "default_weight_decay")]
        weight_decay: f64,
        /// Decay embeddings too (norms and biases are never decayed).
        #[serde(default)]
        decay_embeddings: bool,
        /// Use libtorch's fused AdamW kernel (`at::_fused_adamw_`, CPU and CUDA; one pass per
        /// group); absent: yes. `false`: the per-parameter update, op for op torch's
        /// single-tensor AdamW.
        #[serde(default)]
        fused: Option<bool>,
        /// 32 (default) or 8: the moments block-wise quantised to 8 bits (`optim/moment.rs`).
        #[serde(default = "default_state_bits", skip_serializing_if = "is_32")]
        #[schemars(!skip_serializing_if)]
        state_bits: u32,
        /// Layer-wise updates: each parameter is updated as soon as its gradient is complete
        /// during the backward pass and its gradient freed, so the whole model's gradients are
        /// never held at once (no gradient clipping, one process).
        #[serde(default, skip_serializing_if = "is_false")]
        #[schemars(!skip_serializing_if)]
        layerwise: bool,
        /// With `run.precision = "bf16"`: keep an fp32 master copy of each weight this rank
        /// updates (its own share with `run.shard`), and fp32 moments: the update is computed in
        /// fp32 from the bf16 gradient and rounded into the bf16 weight, so that updates smaller
        /// than bf16's resolution are not lost. The masters start from the weights before they
        /// are cast to bf16 and are saved with the optimizer state. Without it, bf16 keeps
        /// weights, gradients and moments in bf16.
        #[serde(default, skip_serializing_if = "is_false")]
        #[schemars(!skip_serializing_if)]
        master_weights: bool,
    },
    /// SGD with momentum and optional Nesterov (torch.optim.SGD's update).
    Sgd {
        /// Peak learning rate (the schedule scales it).
        lr: f64,
        /// Momentum factor; 0: plain SGD.
        #[serde(default)]
        momentum: f64,
        /// Dampening of the gradient added to the momentum buffer.
        #[serde(default)]
        dampening: f64,
        /// Nesterov momentum (needs momentum > 0 and dampening = 0).
        #[serde(default)]
        nesterov: bool,
        /// L2 penalty coefficient added to the gradient (torch's SGD `weight_decay`).
        #[serde(default)]
        weight_decay: f64,
    },
    /// GaLore-AdamW (Zhao et al. 2024): AdamW whose moments live in a rank-`rank` projection of
    /// each targeted 2-D weight's gradient (galore_torch.GaLoreAdamW's update); other parameters
    /// get that AdamW unprojected. Defaults are galore-torch's.
    GaloreAdamw {
        /// Peak learning rate (the schedule scales it).
        lr: f64,
        /// Decay rates of the running averages of the gradient and of its square (beta1, beta2).
        #[serde(default = "default_galore_betas")]
        betas: [f64; 2],
        /// Added to the denominator's square root, for stability.
        #[serde(default = "default_galore_eps")]
        eps: f64,
        /// Decoupled weight decay coefficient (each step `p *= 1 - lr * weight_decay`).
        #[serde(default)]
        weight_decay: f64,
        /// Rank of the gradient projection (the moments' inner dimension).
        rank: i64,
        /// Steps between SVD refreshes of the projectors.
        #[serde(default = "default_update_proj_gap")]
        update_proj_gap: i64,
        /// Multiplies the projected-back update.
        #[serde(default = "default_galore_scale")]
        scale: f64,
        /// Name patterns of the 2-D weights to project (a whole module path or a suffix after
        /// a `.`, `*` any run: the rule of `models/params.rs`); empty: every 2-D weight except
        /// embeddings and lm_head.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        #[schemars(!skip_serializing_if)]
        target: Vec<String>,
        /// 32 (default) or 8: the low-rank moments block-wise quantised to 8 bits (8-bit GaLore).
        #[serde(default = "default_state_bits", skip_serializing_if = "is_32")]
        #[schemars(!skip_serializing_if)]
        state_bits: u32,
        /// Layer-wise updates, as for adamw (the GaLore paper's per-layer weight updates).
        #[serde(default, skip_serializing_if = "is_false")]
        #[schemars(!skip_serializing_if)]
        layerwise: bool,
    },
    /// Global sparse momentum SGD (`optim/gsm.rs`): each step only the `density` most salient
    /// prunable weights (by |w * g|, ranked across all layers) get the objective's gradient; the
    /// others only decay towards zero. At `cut_step` (default: the end of the run) the smallest
    /// weights are cut to exact zeros and the mask is kept.
    Gsm {
        /// Peak learning rate (the schedule scales it).
        lr: f64,
        /// Momentum factor, in [0, 1).
        #[serde(default = "default_gsm_momentum")]
        momentum: f64,
        /// Nesterov momentum (needs momentum > 0).
        #[serde(default)]
        nesterov: bool,
        /// Drives the unselected weights to zero: must be positive.
        #[serde(default = "default_gsm_weight_decay")]
        weight_decay: f64,
        /// Fraction of the prunable weights that survive, in (0, 1).
        density: f64,
        /// Name patterns of the prunable weights (the rule of `models/params.rs`); empty:
        /// linear and convolution weights.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        #[schemars(!skip_serializing_if)]
        prunable: Vec<String>,
        /// Optimizer steps after which the cut happens; absent: the end of the run.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cut_step: Option<i64>,
    },
}

fn default_state_bits() -> u32 {
    32
}
fn is_false(b: &bool) -> bool {
    !*b
}
fn is_32(bits: &u32) -> bool {
    *bits == 32
}
fn default_gsm_momentum() -> f64 {
    0.9
}
fn default_gsm_weight_decay() -> f64 {
    1e-4
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.95]
}
fn default_galore_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_galore_eps() -> f64 {
    1e-6
}
fn default_update_proj_gap() -> i64 {
    200
}
fn default_galore_scale() -> f64 {
    1.0
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.1
}

impl OptimConfig {
    pub fn lr(&self) -> f64 {
        match self {
            OptimConfig::Adamw { lr, .. }
            | OptimConfig::Sgd { lr, .. }
            | OptimConfig::GaloreAdamw { lr, .. }
            | OptimConfig::Gsm { lr, .. } => *lr,
        }
    }

    /// The momentum the optimizer starts from: SGD's and GSM's `momentum`, AdamW's and
    /// GaLore-AdamW's `betas[0]`.
    pub fn momentum(&self) -> f64 {
        match self {
            OptimConfig::Adamw { betas, .. } | OptimConfig::GaloreAdamw { betas, .. } => betas[0],
            OptimConfig::Sgd { momentum, .. } | OptimConfig::Gsm { momentum, .. } => *momentum,
        }
    }

    /// The least optimizer state one trainable parameter of `weight_bytes` holds, in bytes (for
    /// the memory check before a run, `memory.rs`): AdamW's two moments in the weights' dtype,
    /// or one byte each with 8-bit states; SGD's and GSM's momentum buffer. GaLore's moments
    /// are rank-sized for the projected matrices, which are known only once the model is
    /// built: counted as none (a lower bound).
    pub fn state_bytes_per_param(&self, weight_bytes: u128) -> u128 {
        match self {
            // fp32 master copies: 4 bytes, and the moments in fp32 (or 8-bit).
            OptimConfig::Adamw {
                master_weights: true,
                state_bits,
                ..
            } => 4 + if *state_bits == 8 { 2 } else { 8 },
            OptimConfig::Adamw { state_bits: 8, .. } => 2,
            OptimConfig::Adamw { .. } => 2 * weight_bytes,
            OptimConfig::Sgd { momentum, .. } | OptimConfig::Gsm { momentum, .. } => {
                if *momentum > 0.0 {
                    weight_bytes
                } else {
                    0
                }
            }
            OptimConfig::GaloreAdamw { .. } => 0,
        }
    }

    /// `master_weights = true` (AdamW): fp32 master copies of bf16 weights.
    pub fn master_weights(&self) -> bool {
        matches!(
            self,
            OptimConfig::Adamw {
                master_weights: true,
                ..
            }
        )
    }

    /// `layerwise = true` (AdamW and GaLore-AdamW).
    pub fn layerwise(&self) -> bool {
        match self {
            OptimConfig::Adamw { layerwise, .. } | OptimConfig::GaloreAdamw { layerwise, .. } => {
                *layerwise
            }
            OptimConfig::Sgd { .. } | OptimConfig::Gsm { .. } => false,
        }
    }

    pub fn weight_decay(&self) -> f64 {
        match self {
            OptimConfig::Adamw { weight_decay, .. }
            | OptimConfig::Sgd { weight_decay, .. }
            | OptimConfig::GaloreAdamw { weight_decay, .. }
            | OptimConfig::Gsm { weight_decay, .. } => *weight_decay,
        }
    }
}

fn check_state_bits(bits: u32) -> Result<(), Invalid> {
    check(
        bits == 32 || bits == 8,
        "optim.state_bits",
        format!("expected 32 or 8, got {bits}"),
    )
}

/// The checks AdamW and GaLore-AdamW share.
fn validate_adam(lr: f64, betas: &[f64; 2], eps: f64, weight_decay: f64) -> Result<(), Invalid> {
    positive_finite(lr, "optim.lr")?;
    for (i, b) in betas.iter().enumerate() {
        check(
            (0.0..1.0).contains(b),
            "optim.betas",
            format!("expected betas in [0, 1), got betas[{i}] = {b}"),
        )?;
    }
    positive_finite(eps, "optim.eps")?;
    check(
        weight_decay >= 0.0,
        "optim.weight_decay",
        "expected a non-negative number",
    )
}

impl OptimConfig {
    /// Range checks that the types cannot express, with `optim.*` key paths.
    pub fn validate(&self) -> Result<(), Invalid> {
        match self {
            OptimConfig::Adamw {
                lr,
                betas,
                eps,
                weight_decay,
                fused,
                state_bits,
                ..
            } => {
                validate_adam(*lr, betas, *eps, *weight_decay)?;
                check_state_bits(*state_bits)?;
                check(
                    !(*state_bits == 8 && *fused == Some(true)),
                    "optim.fused",
                    "the fused AdamW kernel needs 32-bit states (state_bits = 32)",
                )?;
            }
            OptimConfig::Sgd {
                lr,
                momentum,
                dampening,
                nesterov,
                weight_decay,
            } => {
                positive_finite(*lr, "optim.lr")?;
                check(
                    *momentum >= 0.0,
                    "optim.momentum",
                    "expected a non-negative number",
                )?;
                check(
                    *dampening >= 0.0,
                    "optim.dampening",
                    "expected a non-negative number",
                )?;
                check(
                    *weight_decay >= 0.0,
                    "optim.weight_decay",
                    "expected a non-negative number",
                )?;
                check(
                    !*nesterov || (*momentum > 0.0 && *dampening == 0.0),
                    "optim.nesterov",
                    "Nesterov momentum needs momentum > 0 and dampening = 0",
                )?;
            }
            OptimConfig::GaloreAdamw {
                lr,
                betas,
                eps,
                weight_decay,
                rank,
                update_proj_gap,
                scale,
                target,
                state_bits,
                ..
            } => {
                validate_adam(*lr, betas, *eps, *weight_decay)?;
                check_state_bits(*state_bits)?;
                positive(*rank, "optim.rank")?;
                positive(*update_proj_gap, "optim.update_proj_gap")?;
                positive_finite(*scale, "optim.scale")?;
                for (i, p) in target.iter().enumerate() {
                    check(
                        !p.trim().is_empty(),
                        "optim.target",
                        format!("expected a non-empty name pattern, got target[{i}] = {p:?}"),
                    )?;
                }
            }
            OptimConfig::Gsm {
                lr,
                momentum,
                nesterov,
                weight_decay,
                density,
                prunable,
                cut_step,
            } => {
                positive_finite(*lr, "optim.lr")?;
                check(
                    (0.0..1.0).contains(momentum),
                    "optim.momentum",
                    format!("expected a momentum in [0, 1), got {momentum}"),
                )?;
                check(
                    !*nesterov || *momentum > 0.0,
                    "optim.nesterov",
                    "Nesterov momentum needs momentum > 0",
                )?;
                check(
                    *weight_decay > 0.0 && weight_decay.is_finite(),
                    "optim.weight_decay",
                    format!(
                        "GSM needs a positive weight decay (it is what drives the unselected weights to zero), got {weight_decay}"
                    ),
                )?;
                check(
                    *density > 0.0 && *density < 1.0,
                    "optim.density",
                    format!("expected the fraction of weights kept, in (0, 1), got {density}"),
                )?;
                for (i, p) in prunable.iter().enumerate() {
                    check(
                        !p.trim().is_empty(),
                        "optim.prunable",
                        format!("expected a non-empty name pattern, got prunable[{i}] = {p:?}"),
                    )?;
                }
                if let Some(c) = cut_step {
                    check(
                        *c >= 0,
                        "optim.cut_step",
                        format!("expected a step >= 0, got {c}"),
                    )?;
                }
            }
        }
        Ok(())
    }
}
