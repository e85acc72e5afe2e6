//! `[prune]` in a recipe: magnitude pruning during training, one-shot or gradual.
//!
//! ```toml
//! [prune]
//! method = "magnitude"
//! sparsity = 0.8          # final fraction of the prunable weights that are zero
//! scope = "global"        # rank all prunable weights together; "layer": each tensor alone
//! start_step = 0          # first pruning event (after this many optimizer steps)
//! end_step = 400          # absent: one-shot at start_step; else gradual until end_step
//! every = 50              # steps between gradual events (fine-tuning in between)
//! prunable = []           # name patterns (`models/params.rs`); empty: linear and conv weights
//! ```
//!
//! Gradual pruning follows Zhu & Gupta (2017): the sparsity after `t` steps is
//! `S * (1 - (1 - (t - start) / (end - start))^3)` at the events `start, start + every, ...,
//! end`, so that most weights go early, while the network can still recover.

use crate::validate::{check, Invalid};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneConfig {
    /// How weights are ranked for pruning.
    pub method: PruneMethod,
    /// Final fraction of the prunable weights set to zero, in (0, 1).
    pub sparsity: f64,
    /// Whether weights are ranked across all prunable tensors or within each.
    #[serde(default)]
    pub scope: PruneScope,
    /// The first pruning event, after this many optimizer steps.
    #[serde(default)]
    pub start_step: i64,
    /// The last pruning event (gradual pruning); absent: one-shot at `start_step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_step: Option<i64>,
    /// Optimizer steps between gradual pruning events.
    #[serde(default = "default_every")]
    pub every: i64,
    /// Name patterns of the prunable weights; empty: linear and convolution weights.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(!skip_serializing_if)]
    pub prunable: Vec<String>,
}

fn default_every() -> i64 {
    100
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PruneMethod {
    /// Smallest |w| first.
    Magnitude,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PruneScope {
    /// One threshold over all prunable weights: per-layer sparsity follows from the ranking.
    #[default]
    Global,
    /// The same sparsity in every prunable tensor.
    Layer,
}

impl PruneConfig {
    /// Range checks; `total_steps` is the run's length.
    pub fn validate(&self, total_steps: i64) -> Result<(), Invalid> {
        check(
            self.sparsity > 0.0 && self.sparsity < 1.0,
            "prune.sparsity",
            format!("expected a fraction in (0, 1), got {}", self.sparsity),
        )?;
        check(
            self.start_step >= 0 && self.start_step <= total_steps,
            "prune.start_step",
            format!(
                "expected a step in [0, {total_steps}] (the run's length), got {}",
                self.start_step
            ),
        )?;
        if let Some(end) = self.end_step {
            check(
                end >= self.start_step && end <= total_steps,
                "prune.end_step",
                format!(
                    "expected a step in [start_step = {}, {total_steps}] (the run's length), got {end}",
                    self.start_step
                ),
            )?;
        }
        check(
            self.every > 0,
            "prune.every",
            format!("expected a positive number of steps, got {}", self.every),
        )
    }

    /// The sparsity to prune to after `step` completed steps, when an event falls there.
    pub fn sparsity_at(&self, step: i64) -> Option<f64> {
        let start = self.start_step;
        let end = self.end_step.unwrap_or(start);
        if step < start || step > end {
            return None;
        }
        if end == start {
            return (step == start).then_some(self.sparsity);
        }
        let on_grid = (step - start) % self.every == 0 || step == end;
        if !on_grid {
            return None;
        }
        let progress = (step - start) as f64 / (end - start) as f64;
        let s = self.sparsity * (1.0 - (1.0 - progress).powi(3));
        (s > 0.0).then_some(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(start: i64, end: Option<i64>, every: i64) -> PruneConfig {
        PruneConfig {
            method: PruneMethod::Magnitude,
            sparsity: 0.8,
            scope: PruneScope::Global,
            start_step: start,
            end_step: end,
            every,
            prunable: vec![],
        }
    }

    #[test]
    fn one_shot_prunes_once_at_start() {
        let c = cfg(5, None, 10);
        let events: Vec<(i64, f64)> = (0..20)
            .filter_map(|s| c.sparsity_at(s).map(|x| (s, x)))
            .collect();
        assert_eq!(events, vec![(5, 0.8)]);
    }

    #[test]
    fn gradual_follows_the_cubic_schedule_on_its_grid() {
        let c = cfg(10, Some(40), 10);
        let events: Vec<(i64, f64)> = (0..60)
            .filter_map(|s| c.sparsity_at(s).map(|x| (s, x)))
            .collect();
        let steps: Vec<i64> = events.iter().map(|e| e.0).collect();
        // Step 10 would be sparsity 0: no event there.
        assert_eq!(steps, vec![20, 30, 40]);
        for (s, x) in events {
            let p = (s - 10) as f64 / 30.0;
            assert!((x - 0.8 * (1.0 - (1.0 - p).powi(3))).abs() < 1e-12);
        }
        // The end is always an event, even off the grid.
        let c = cfg(0, Some(25), 10);
        assert_eq!(c.sparsity_at(25), Some(0.8));
    }

    #[test]
    fn bad_ranges_name_the_key() {
        let mut c = cfg(0, None, 10);
        c.sparsity = 1.0;
        assert_eq!(c.validate(100).unwrap_err().key, "prune.sparsity");
        let c = cfg(50, Some(20), 10);
        assert_eq!(c.validate(100).unwrap_err().key, "prune.end_step");
        let c = cfg(0, Some(200), 10);
        assert_eq!(c.validate(100).unwrap_err().key, "prune.end_step");
        let c = cfg(0, None, 0);
        assert_eq!(c.validate(100).unwrap_err().key, "prune.every");
    }
}
