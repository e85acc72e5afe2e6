//! Pruning: which weights may be pruned, masks that keep pruned weights at zero, magnitude
//! pruning (one-shot or gradual, global or per layer) during training, Wanda (`wanda.rs`) for
//! one-shot pruning of transformers, and the sparsity table every pruned run reports.
//!
//! A mask lives in the `ParamStore` (`set_mask`): the trainer zeroes the masked weights after
//! every optimizer step and checkpoints carry the masks, so the zeros stay zeros through later
//! training, resumes and fine-tuning from a pruned checkpoint. Global sparse momentum (GSM) is an
//! optimizer (`optim/gsm.rs`); its final cut to exact zeros is a pruning event here. `trainer
//! prune` (one-shot pruning of a saved model) is a task in `train/prune.rs`.
//!
//! Imports: `models/`, `validate`, `error`.

pub mod config;
pub mod magnitude;
pub mod structured;
pub mod wanda;

pub use config::{PruneConfig, PruneScope};

use crate::error::{Error, Result};
use crate::models::params::{select_prunable, ParamStore};
use serde::Serialize;
use tch::Kind;

/// Zeros per layer among the prunable weights, and over all of them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SparsityReport {
    /// Zeros over all prunable weights / their number.
    pub global_sparsity: f64,
    pub prunable_params: i64,
    pub zeros: i64,
    pub layers: Vec<LayerSparsity>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerSparsity {
    pub name: String,
    pub params: i64,
    pub zeros: i64,
    pub sparsity: f64,
}

impl SparsityReport {
    /// Counts exact zeros in the tensors `names` of `store`.
    pub fn measure(store: &ParamStore, names: &[String]) -> SparsityReport {
        let layers: Vec<LayerSparsity> = names
            .iter()
            .filter_map(|name| {
                let t = store.get(name)?;
                let params = t.numel() as i64;
                let zeros = params - t.count_nonzero(None::<i64>).int64_value(&[]);
                Some(LayerSparsity {
                    name: name.clone(),
                    params,
                    zeros,
                    sparsity: zeros as f64 / params.max(1) as f64,
                })
            })
            .collect();
        let prunable_params: i64 = layers.iter().map(|l| l.params).sum();
        let zeros: i64 = layers.iter().map(|l| l.zeros).sum();
        SparsityReport {
            global_sparsity: zeros as f64 / prunable_params.max(1) as f64,
            prunable_params,
            zeros,
            layers,
        }
    }

    /// The table as text, one line per layer and a total.
    pub fn table(&self) -> String {
        let width = self
            .layers
            .iter()
            .map(|l| l.name.len())
            .max()
            .unwrap_or(5)
            .max(5);
        let mut out = format!(
            "{:<width$} {:>12} {:>12} {:>9}\n",
            "layer", "params", "zeros", "sparsity"
        );
        for l in &self.layers {
            out += &format!(
                "{:<width$} {:>12} {:>12} {:>8.2}%\n",
                l.name,
                l.params,
                l.zeros,
                100.0 * l.sparsity
            );
        }
        out += &format!(
            "{:<width$} {:>12} {:>12} {:>8.2}%",
            "total",
            self.prunable_params,
            self.zeros,
            100.0 * self.global_sparsity
        );
        out
    }
}

/// Pruning during training: the magnitude schedule of `[prune]`, or the final cut of a GSM run.
/// `on_step` is called with the number of completed optimizer steps, once before the first step
/// of a (re)start and after every step; it prunes when an event falls on that step. Events are
/// idempotent, so repeating the event of the step a run resumes at changes nothing.
pub struct Pruner {
    /// The prunable weights.
    pub names: Vec<String>,
    plan: Plan,
}

enum Plan {
    Magnitude(PruneConfig),
    /// GSM: cut the smallest weights to exact zeros at `cut_step`, keeping `density` of them.
    GsmCut {
        density: f64,
        cut_step: i64,
    },
}

impl Pruner {
    pub fn magnitude(cfg: &PruneConfig, store: &ParamStore) -> Result<Pruner> {
        Ok(Pruner {
            names: select_prunable(store, &cfg.prunable, "prune.prunable")?,
            plan: Plan::Magnitude(cfg.clone()),
        })
    }

    pub fn gsm_cut(names: Vec<String>, density: f64, cut_step: i64) -> Pruner {
        Pruner {
            names,
            plan: Plan::GsmCut { density, cut_step },
        }
    }

    /// The pruning of a run: `[prune]`'s magnitude schedule, or GSM's cut (at `optim.cut_step`,
    /// default the last step); None when the run prunes nothing.
    pub fn for_run(
        prune: Option<&PruneConfig>,
        optim: &crate::optim::OptimConfig,
        store: &ParamStore,
        total_steps: i64,
    ) -> Result<Option<Pruner>> {
        use crate::optim::OptimConfig;
        match (prune, optim) {
            (Some(_), OptimConfig::Gsm { .. }) => Err(Error::Recipe(
                "prune: [prune] and optim.kind = \"gsm\" both prune; use one of them".into(),
            )),
            (Some(cfg), _) => {
                cfg.validate(total_steps)
                    .map_err(|e| Error::Recipe(format!("{}: {}", e.key, e.msg)))?;
                Ok(Some(Pruner::magnitude(cfg, store)?))
            }
            (
                None,
                OptimConfig::Gsm {
                    density,
                    prunable,
                    cut_step,
                    ..
                },
            ) => {
                let cut = cut_step.unwrap_or(total_steps);
                if cut > total_steps {
                    return Err(Error::Recipe(format!(
                        "optim.cut_step: expected a step in [0, {total_steps}] (the run's length), got {cut}"
                    )));
                }
                let names = select_prunable(store, prunable, "optim.prunable")?;
                Ok(Some(Pruner::gsm_cut(names, *density, cut)))
            }
            (None, _) => Ok(None),
        }
    }

    /// The sparsity the plan reaches after `step` completed steps, if it prunes then.
    pub fn target_at(&self, step: i64) -> Option<f64> {
        match &self.plan {
            Plan::Magnitude(cfg) => cfg.sparsity_at(step),
            Plan::GsmCut { density, cut_step } => (step == *cut_step).then_some(1.0 - density),
        }
    }

    /// Prunes if an event falls on `step`; returns the sparsity reached.
    pub fn on_step(&self, step: i64, store: &mut ParamStore) -> Result<Option<f64>> {
        let Some(sparsity) = self.target_at(step) else {
            return Ok(None);
        };
        let scope = match &self.plan {
            Plan::Magnitude(cfg) => cfg.scope,
            Plan::GsmCut { .. } => PruneScope::Global,
        };
        magnitude::prune(store, &self.names, sparsity, scope)?;
        tracing::info!(
            "pruned to {:.2}% sparsity by magnitude ({}) at step {step}",
            100.0 * sparsity,
            match scope {
                PruneScope::Global => "global",
                PruneScope::Layer => "per layer",
            }
        );
        Ok(Some(sparsity))
    }

    /// Metrics for the log: the measured sparsity of the prunable weights, and for GSM the
    /// global and per-layer density of the weights that a cut now would keep, with the fraction
    /// of the weights' L2 norm that such a cut would remove.
    pub fn metrics(&self, store: &ParamStore) -> Vec<(String, serde_json::Value)> {
        let report = SparsityReport::measure(store, &self.names);
        let mut out = vec![("prune/sparsity".to_string(), report.global_sparsity.into())];
        if let Plan::GsmCut { density, .. } = &self.plan {
            if let Ok(survive) = magnitude::survivors(store, &self.names, *density) {
                let mut kept_sq = 0.0;
                let mut total_sq = 0.0;
                let mut kept = 0i64;
                let mut all = 0i64;
                for (name, keep) in &survive {
                    let Some(w) = store.get(name) else { continue };
                    let w = w.to_kind(Kind::Float);
                    let sq = (&w * &w).sum(Kind::Double).double_value(&[]);
                    let k = (&w * &w * keep.to_kind(Kind::Float))
                        .sum(Kind::Double)
                        .double_value(&[]);
                    let n = keep.numel() as i64;
                    let nk = keep.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]);
                    out.push((
                        format!("gsm/density/{name}"),
                        (nk as f64 / n.max(1) as f64).into(),
                    ));
                    kept_sq += k;
                    total_sq += sq;
                    kept += nk;
                    all += n;
                }
                out.push((
                    "gsm/density".into(),
                    (kept as f64 / all.max(1) as f64).into(),
                ));
                let cut = if total_sq > 0.0 {
                    ((total_sq - kept_sq) / total_sq).sqrt()
                } else {
                    0.0
                };
                out.push(("gsm/cut_norm_fraction".into(), cut.into()));
            }
        }
        out
    }

    pub fn report(&self, store: &ParamStore) -> SparsityReport {
        SparsityReport::measure(store, &self.names)
    }
}
