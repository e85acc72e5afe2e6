//! ReLoRA (Lialin et al. 2023, "ReLoRA: High-Rank Training Through Low-Rank Updates";
//! reference: github.com/Guitaricet/relora, `peft_pretraining/relora.py` and
//! `torchrun_main.py`).
//!
//! LoRA adapters (`peft/lora.rs`) on a frozen base, restarted every `merge_every` steps: after the
//! optimizer step that completes a multiple of `merge_every`, each adapter is merged into its
//! base weight (`W += scale B A`, the reference's `merge_and_reinit`), A is re-drawn with PEFT's
//! init and B zeroed (so the function is unchanged), and the adapters' optimizer state is reset
//! (`optimizer_reset`: "zero" zeroes the moments; "magnitude" keeps the `keep_fraction` largest
//! by magnitude, the reference's `optimizer_magnitude_pruning` with prune ratio
//! `1 - keep_fraction`). A sum of rank-r updates can reach a rank far above r.
//!
//! The jagged schedule (the reference's `get_cyclical_schedule`): for the `rewarm_steps` steps
//! after a reset the main schedule's LR is multiplied by `t / rewarm_steps`, `t` counting steps
//! since the reset from 0, so the first step after a reset runs at LR 0 and only fills the fresh
//! moments, as in the reference.
//!
//! Full-rank warm start (`full_rank_warmup_steps = N`, the paper's warm start done in one run):
//! for the first N steps the base weights train too (the adapters, co-trained, are merged away at
//! step N); at step N the base is frozen, the adapters are merged and restarted and their state
//! reset, and the LR re-warms. The base weights' optimizer state is kept (unused) so that every
//! checkpoint has the same tensors. Merges then happen at the multiples of `merge_every` past N.
//!
//! Every counter is a pure function of the step, and the re-drawn A comes from torch's CPU
//! generator seeded from (seed, step): a run resumed from any checkpoint replays bitwise.

use super::config::{OptimizerReset, PeftConfig, PeftKind};
use super::lora::{a_name, adapter_of, add_delta, b_name, Lora};
use crate::error::Result;
use crate::models::transformer::Transformer;
use crate::optim::Optimizer;
use tch::{Device, Kind, Tensor};

/// The ReLoRA settings of a `[peft] kind = "relora"` section.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Relora {
    pub merge_every: i64,
    pub rewarm_steps: i64,
    pub full_rank_warmup_steps: i64,
    /// Fraction of each adapter moment kept at a reset (0 for "zero").
    pub keep_fraction: f64,
}

impl Relora {
    /// None unless `cfg.kind` is ReLoRA. The recipe was validated (merge_every > 0).
    pub fn from_config(cfg: &PeftConfig) -> Option<Relora> {
        (cfg.kind == PeftKind::Relora).then(|| Relora {
            merge_every: cfg.merge_every.unwrap_or(1).max(1),
            rewarm_steps: cfg.rewarm_steps.unwrap_or(0),
            full_rank_warmup_steps: cfg.full_rank_warmup_steps.unwrap_or(0),
            keep_fraction: match cfg.optimizer_reset.unwrap_or(OptimizerReset::Zero) {
                OptimizerReset::Zero => 0.0,
                OptimizerReset::Magnitude => cfg.keep_fraction.unwrap_or(0.0),
            },
        })
    }

    /// True while step `step` (0-based, the step about to run) trains full-rank.
    pub fn full_rank(&self, step: i64) -> bool {
        step < self.full_rank_warmup_steps
    }

    /// True when, after `completed` optimizer steps, the adapters are merged and restarted: at
    /// the end of the full-rank warm start, and at each multiple of `merge_every` past it.
    pub fn resets_after(&self, completed: i64) -> bool {
        let n = self.full_rank_warmup_steps;
        completed > 0
            && ((n > 0 && completed == n) || (completed > n && completed % self.merge_every == 0))
    }

    /// The number of completed steps at the last reset at or before `completed`, if any.
    pub fn last_reset(&self, completed: i64) -> Option<i64> {
        let n = self.full_rank_warmup_steps;
        let merge = (completed / self.merge_every) * self.merge_every;
        if merge > n && merge > 0 {
            Some(merge)
        } else if n > 0 && completed >= n {
            Some(n)
        } else {
            None
        }
    }

    /// Number of merges (restarts, the full-rank switch included) done after `completed` steps.
    pub fn resets_done(&self, completed: i64) -> i64 {
        let n = self.full_rank_warmup_steps;
        let switch = i64::from(n > 0 && completed >= n);
        let merges = completed / self.merge_every - n / self.merge_every;
        switch + merges.max(0)
    }

    /// The jagged schedule's factor on the main LR at step `step` (0-based, the step about to
    /// run): `t / rewarm_steps` for the `rewarm_steps` steps after a reset, else 1.
    pub fn lr_factor(&self, step: i64) -> f64 {
        match self.last_reset(step) {
            Some(r) if step - r < self.rewarm_steps => (step - r) as f64 / self.rewarm_steps as f64,
            _ => 1.0,
        }
    }
}

/// The parameter names of the adapters (A and B of every adapted projection).
pub fn adapter_names(lora: &Lora) -> Vec<String> {
    lora.modules
        .iter()
        .flat_map(|m| [a_name(m), b_name(m)])
        .collect()
}

/// The reference's `merge_and_reinit` on every adapter: `W += scale B A`, then A re-drawn as
/// PEFT's `kaiming_uniform_(a = sqrt(5))`, U(-1/sqrt(in), 1/sqrt(in)) on torch's CPU generator
/// (seed it first), and B zeroed. `scale B A` is then zero, so the model computes the same
/// function before and after (up to the rounding of the addition).
pub fn merge_and_reinit(model: &Transformer) -> Result<()> {
    for lin in model.projections() {
        let Some(ad) = adapter_of(lin) else { continue };
        if ad.is_merged() {
            continue;
        }
        add_delta(lin, ad, 1.0)?;
        tch::no_grad(|| -> Result<()> {
            let (r, fan_in) = (ad.a.size()[0], ad.a.size()[1]);
            let bound = 1.0 / (fan_in as f64).sqrt();
            let a_init =
                Tensor::rand([r, fan_in], (Kind::Float, Device::Cpu)) * (2.0 * bound) - bound; // [r, in]
            ad.a.shallow_clone().f_copy_(&a_init)?;
            let _ = ad.b.shallow_clone().f_zero_()?;
            Ok(())
        })?;
    }
    Ok(())
}

/// Resets the optimizer state of the adapters as configured; returns how many parameters.
pub fn reset_optimizer(relora: &Relora, lora: &Lora, optimizer: &mut Optimizer) -> Result<usize> {
    optimizer.reset_state(&adapter_names(lora), relora.keep_fraction)
}

#[cfg(test)]
mod tests;
