//! Schedules that follow the learning rate's: `train.weight_decay_schedule` and
//! `train.momentum_schedule`, driven by whatever phases `[schedule]` has.

use serde::{Deserialize, Serialize};

/// `train.weight_decay_schedule`.
#[derive(
    Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum WeightDecaySchedule {
    /// `optim.weight_decay` at every step.
    #[default]
    Constant,
    /// `optim.weight_decay * lr / optim.lr`: the coefficient follows the LR schedule's phases
    /// (warmup, decay, re-warm), at its full value where the LR is at its peak. With AdamW's
    /// decoupled decay `p *= 1 - lr * wd` the per-step shrink is then `lr^2 * wd / optim.lr`.
    FollowLr,
}

impl WeightDecaySchedule {
    pub fn is_constant(&self) -> bool {
        *self == WeightDecaySchedule::Constant
    }
}

/// `train.momentum_schedule`.
#[derive(
    Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum MomentumSchedule {
    /// The optimizer's own momentum at every step.
    #[default]
    Constant,
    /// `max - (max - train.momentum_min) * lr / optim.lr`, max the optimizer's own momentum:
    /// high momentum while the LR is low, `momentum_min` at its peak. The cyclical momentum of
    /// Smith's 1cycle policy (PyTorch's `OneCycleLR(cycle_momentum=True)`, which moves Adam's
    /// beta1), driven by whatever phases the LR schedule has.
    InverseLr,
}

impl MomentumSchedule {
    pub fn is_constant(&self) -> bool {
        *self == MomentumSchedule::Constant
    }

    /// The momentum for a step at learning rate `lr` (`peak_lr` = `optim.lr`), or None when the
    /// optimizer's own momentum stays. `max` is that momentum, `min` is `train.momentum_min`.
    pub fn momentum(&self, max: f64, min: Option<f64>, lr: f64, peak_lr: f64) -> Option<f64> {
        match (self, min) {
            (MomentumSchedule::InverseLr, Some(min)) => Some(max - (max - min) * (lr / peak_lr)),
            _ => None,
        }
    }
}
