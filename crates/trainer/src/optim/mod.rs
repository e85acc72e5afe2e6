//! Optimizers written in Rust that own their state tensors, so that state saves, loads and
//! resets (tch's built-in optimizers hide theirs). A closed registry: one variant per `kind`
//! (`config.rs` holds `[optim]`, `OptimConfig`).
//!
//! Imports: `models/` (the parameter store, parameter names), `validate`, `error`.

pub mod adamw;
pub mod config;
pub mod galore;
pub mod gsm;
pub mod moment;
pub mod sgd;
pub mod slices;

use crate::error::{Error, Result};
use crate::models::params::{copy_named, read_safetensors, select_prunable, ParamStore};
use crate::models::transformer::{is_embedding, is_norm_or_bias};
use std::path::Path;
use tch::Tensor;

pub use adamw::AdamW;
pub use config::OptimConfig;
pub use galore::GaloreAdamW;
pub use gsm::Gsm;
pub use sgd::Sgd;
pub use slices::Slice;

/// Named state tensors of an optimizer; `step` is a scalar int64 tensor.
pub trait StateTensors {
    fn state_tensors(&self) -> Vec<(String, Tensor)>;
    fn set_step(&mut self, step: i64);
}

pub enum Optimizer {
    AdamW(AdamW),
    Sgd(Sgd),
    GaloreAdamW(GaloreAdamW),
    Gsm(Gsm),
}

/// The gradient of `p`, or None when it has none (unused in this step).
pub(crate) fn grad_of(p: &Tensor) -> Option<Tensor> {
    let g = p.grad();
    g.defined().then_some(g)
}

impl Optimizer {
    /// Builds the optimizer over the trainable parameters of `store`. Norm weights and biases are
    /// never decayed; embeddings only when `decay_embeddings`. Fails on settings that do not fit
    /// the model (GaLore's rank or target patterns).
    pub fn build(cfg: &OptimConfig, store: &ParamStore) -> Result<Optimizer> {
        Optimizer::build_owned(cfg, store, &|_| true)
    }

    /// `build` over the trainable parameters that `owns` (a rank's share with
    /// `run.shard = "optimizer"`): the others get no state and are not updated here.
    pub fn build_owned(
        cfg: &OptimConfig,
        store: &ParamStore,
        owns: &dyn Fn(&str) -> bool,
    ) -> Result<Optimizer> {
        let groups_of = |decay_embeddings: bool, owns: &dyn Fn(&str) -> bool| {
            store
                .trainable()
                .filter(|p| owns(&p.name))
                .map(|p| {
                    let decay = decays(&p.name, decay_embeddings);
                    (p.name.clone(), p.tensor.shallow_clone(), decay)
                })
                .collect::<Vec<(String, Tensor, bool)>>()
        };
        Ok(match cfg {
            OptimConfig::Adamw { .. } | OptimConfig::Sgd { .. } => {
                let groups = groups_of(decays_embeddings(cfg), owns).into_iter();
                let whole = groups.map(|(n, p, d)| (n, p, d, None)).collect();
                return Optimizer::elementwise(cfg, whole);
            }
            OptimConfig::GaloreAdamw {
                betas,
                eps,
                weight_decay,
                rank,
                update_proj_gap,
                scale,
                target,
                state_bits,
                ..
            } => Optimizer::GaloreAdamW({
                // `target` selects among all the weights; this rank keeps state for its own.
                let o = GaloreAdamW::new_owned(
                    groups_of(decays_embeddings(cfg), &|_| true),
                    owns,
                    target,
                    galore::Projection {
                        rank: *rank,
                        update_proj_gap: *update_proj_gap,
                        scale: *scale,
                    },
                    *betas,
                    *eps,
                    *weight_decay,
                )?;
                if *state_bits == 8 {
                    o.with_8bit_states()
                } else {
                    o
                }
            }),
            OptimConfig::Gsm {
                momentum,
                nesterov,
                weight_decay,
                density,
                prunable,
                ..
            } => {
                let names = select_prunable(store, prunable, "optim.prunable")?;
                Optimizer::Gsm(Gsm::new(
                    groups_of(decays_embeddings(cfg), owns),
                    &names,
                    *density,
                    *momentum,
                    *nesterov,
                    *weight_decay,
                ))
            }
        })
    }

    /// `run.shard_layout = "flat"`: AdamW (32-bit states) or SGD over this rank's `slices` of
    /// the trainable parameters of `store` (parameter name, slice), in that order. The
    /// optimizers whose update needs more than the elements of a slice are refused.
    pub fn build_sliced(
        cfg: &OptimConfig,
        store: &ParamStore,
        slices: Vec<(String, Slice)>,
    ) -> Result<Optimizer> {
        if !updates_elementwise(cfg) {
            return Err(Error::Recipe(SLICED_OPTIMIZERS.into()));
        }
        let sliced = slices
            .into_iter()
            .map(|(name, slice)| {
                let param = store.get(&name).map(Tensor::shallow_clone).ok_or_else(|| {
                    Error::Torch(format!("a slice of {name}, which is not a parameter"))
                })?;
                let decay = decays(&name, decays_embeddings(cfg));
                Ok((name, param, decay, Some(slice)))
            })
            .collect::<Result<_>>()?;
        Optimizer::elementwise(cfg, sliced)
    }

    /// AdamW or SGD, whose update of an element needs only that element, over `targets`:
    /// (name, parameter, decayed?, the slice it updates or None for all of it).
    fn elementwise(
        cfg: &OptimConfig,
        targets: Vec<(String, Tensor, bool, Option<Slice>)>,
    ) -> Result<Optimizer> {
        Ok(match cfg {
            OptimConfig::Adamw {
                betas,
                eps,
                weight_decay,
                fused,
                state_bits,
                master_weights,
                ..
            } => {
                let mut o = AdamW::over_slices(targets, *betas, *eps, *weight_decay);
                o.fused = fused.unwrap_or(true);
                if *master_weights {
                    o = o.with_fp32_masters();
                }
                if *state_bits == 8 {
                    o = o.with_8bit_states();
                }
                Optimizer::AdamW(o)
            }
            OptimConfig::Sgd {
                momentum,
                dampening,
                nesterov,
                weight_decay,
                ..
            } => Optimizer::Sgd(Sgd::over_slices(
                targets,
                *momentum,
                *dampening,
                *nesterov,
                *weight_decay,
            )),
            _ => return Err(Error::Recipe(SLICED_OPTIMIZERS.into())),
        })
    }

    pub fn step(&mut self, lr: f64) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.step(lr),
            Optimizer::Sgd(o) => o.step(lr),
            Optimizer::GaloreAdamW(o) => o.step(lr),
            Optimizer::Gsm(o) => o.step(lr),
        }
    }

    /// The parameters that layer-wise updates step one by one (`step_param`'s index), for the
    /// optimizers that support them (AdamW, GaLore-AdamW).
    pub fn layerwise_params(&self) -> Result<Vec<Tensor>> {
        match self {
            Optimizer::AdamW(o) => Ok(o.params()),
            Optimizer::GaloreAdamW(o) => Ok(o.params()),
            Optimizer::Sgd(_) | Optimizer::Gsm(_) => Err(Error::Recipe(
                "optim.layerwise: only adamw and galore_adamw update layer by layer".into(),
            )),
        }
    }

    /// Layer-wise updates: parameter `i` (of `layerwise_params`) from its gradient, during the
    /// backward pass; `finish_step` ends the step.
    pub fn step_param(&mut self, i: usize, lr: f64) -> Result<()> {
        match self {
            Optimizer::AdamW(o) => o.step_param(i, lr),
            Optimizer::GaloreAdamW(o) => o.step_param(i, lr),
            Optimizer::Sgd(_) | Optimizer::Gsm(_) => Err(Error::Recipe(
                "optim.layerwise: only adamw and galore_adamw update layer by layer".into(),
            )),
        }
    }

    /// Ends a step taken with `step_param`.
    pub fn finish_step(&mut self) {
        match self {
            Optimizer::AdamW(o) => o.finish_step(),
            Optimizer::GaloreAdamW(o) => o.finish_step(),
            Optimizer::Sgd(_) | Optimizer::Gsm(_) => {}
        }
    }

    /// Sets the weight decay coefficient of the decayed parameters, for the steps that follow
    /// (`train.weight_decay_schedule`). GSM's decay, its pruning mechanism, is left alone.
    pub fn set_weight_decay(&mut self, weight_decay: f64) {
        match self {
            Optimizer::AdamW(o) => o.weight_decay = weight_decay,
            Optimizer::Sgd(o) => o.weight_decay = weight_decay,
            Optimizer::GaloreAdamW(o) => o.weight_decay = weight_decay,
            Optimizer::Gsm(_) => {}
        }
    }

    /// Sets the momentum for the steps that follow (`train.momentum_schedule`): SGD's momentum,
    /// AdamW's and GaLore-AdamW's beta1. Each step reads it afresh (the fused AdamW kernel takes
    /// the betas per call), and Adam's bias correction `1 - beta1^t` then uses the current beta1,
    /// as torch.optim.Adam(W) does when a scheduler changes `betas`. GSM is refused by the recipe
    /// check and left alone.
    pub fn set_momentum(&mut self, momentum: f64) {
        match self {
            Optimizer::AdamW(o) => o.betas[0] = momentum,
            Optimizer::Sgd(o) => o.momentum = momentum,
            Optimizer::GaloreAdamW(o) => o.betas[0] = momentum,
            Optimizer::Gsm(_) => {}
        }
    }

    pub fn state_bytes(&self) -> i64 {
        match self {
            Optimizer::AdamW(o) => o.state_bytes(),
            Optimizer::Sgd(o) => o.state_bytes(),
            Optimizer::GaloreAdamW(o) => o.state_bytes(),
            Optimizer::Gsm(o) => o.state_bytes(),
        }
    }

    /// Resets the per-parameter state (moments, momentum buffers) of the parameters `names`, as
    /// ReLoRA does at each merge: keeps the `keep_fraction` largest entries of each state tensor
    /// by magnitude and zeroes the rest (0: zeroes it). Other parameters' state and the step
    /// counter are left alone; GaLore's projectors are never touched. Returns the number of
    /// parameters whose state was reset.
    pub fn reset_state(&mut self, names: &[String], keep_fraction: f64) -> Result<usize> {
        if let Optimizer::AdamW(o) = self {
            return o.reset_state(names, keep_fraction);
        }
        let mut reset = std::collections::BTreeSet::new();
        for (name, t) in self.state().state_tensors() {
            let Some((slot, param)) = name.split_once('.') else {
                continue;
            };
            if ["exp_avg", "exp_avg_sq", "momentum_buffer"].contains(&slot)
                && names.iter().any(|n| n == param)
            {
                prune_by_magnitude(&t, keep_fraction)?;
                reset.insert(param.to_string());
            }
        }
        Ok(reset.len())
    }

    /// The named state tensors (sharing storage with the optimizer's own).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.state().state_tensors()
    }

    fn state(&self) -> &dyn StateTensors {
        match self {
            Optimizer::AdamW(o) => o,
            Optimizer::Sgd(o) => o,
            Optimizer::GaloreAdamW(o) => o,
            Optimizer::Gsm(o) => o,
        }
    }

    fn state_mut(&mut self) -> &mut dyn StateTensors {
        match self {
            Optimizer::AdamW(o) => o,
            Optimizer::Sgd(o) => o,
            Optimizer::GaloreAdamW(o) => o,
            Optimizer::Gsm(o) => o,
        }
    }

    /// Writes the state (`write_state`): the checkpoint's optimizer file.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_state(self.state_tensors(), path)
    }

    /// Loads state saved by `save`; names and shapes must match exactly.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        self.load_named(read_safetensors(path)?, path)
    }

    /// The names of the tensors whose saved state this optimizer needs (the step counter's
    /// too; a slice's tensor by its whole name, `slices::split_name`): what a rank of a sharded
    /// run takes from a checkpoint (`run.shard`).
    pub fn state_names(&self) -> std::collections::BTreeSet<String> {
        self.state()
            .state_tensors()
            .into_iter()
            .map(|(n, _)| slices::split_name(&n).0.to_string())
            .collect()
    }

    /// Loads named state read from `path` (for errors): every tensor of this optimizer must be
    /// there, with its shape, and nothing else; state saved whole or in slices is cut or pieced
    /// together into this optimizer's (`slices::assemble`).
    pub fn load_named(&mut self, loaded: Vec<(String, Tensor)>, path: &Path) -> Result<()> {
        let step = loaded
            .iter()
            .find(|(n, _)| n == "step")
            .map(|(_, t)| t.int64_value(&[]))
            .ok_or_else(|| Error::Checkpoint {
                path: path.to_path_buf(),
                msg: "missing tensor step".into(),
            })?;
        let targets = self.state().state_tensors();
        let loaded: Vec<(String, Tensor)> =
            loaded.into_iter().filter(|(n, _)| n != "step").collect();
        let loaded = slices::assemble(loaded, &targets, path)?;
        copy_named(
            &mut targets
                .iter()
                .filter(|(n, _)| n != "step")
                .map(|(n, t)| (n.as_str(), t)),
            loaded,
            path,
        )?;
        self.state_mut().set_step(step);
        Ok(())
    }
}

/// Whether parameter `name` is weight-decayed: never norm weights and biases, embeddings only
/// with `decay_embeddings`.
fn decays(name: &str, decay_embeddings: bool) -> bool {
    !is_norm_or_bias(name) && (decay_embeddings || !is_embedding(name))
}

/// Whether the optimizer of `cfg` decays the embeddings: AdamW's `decay_embeddings`; SGD and
/// GSM decay every weight; GaLore-AdamW never the embeddings.
fn decays_embeddings(cfg: &OptimConfig) -> bool {
    match cfg {
        OptimConfig::Adamw {
            decay_embeddings, ..
        } => *decay_embeddings,
        OptimConfig::GaloreAdamw { .. } => false,
        OptimConfig::Sgd { .. } | OptimConfig::Gsm { .. } => true,
    }
}

/// Whether the optimizer of `cfg` updates each element from that element alone (AdamW with
/// 32-bit states, SGD): what `run.shard_layout = "flat"` can cut into slices.
pub fn updates_elementwise(cfg: &OptimConfig) -> bool {
    match cfg {
        OptimConfig::Adamw { state_bits, .. } => *state_bits == 32,
        OptimConfig::Sgd { .. } => true,
        OptimConfig::GaloreAdamw { .. } | OptimConfig::Gsm { .. } => false,
    }
}

/// Why `run.shard_layout = "flat"` refuses an optimizer.
pub const SLICED_OPTIMIZERS: &str = "run.shard_layout = \"flat\" works with AdamW (32-bit \
     states) and SGD, whose update of an element needs only that element: GaLore projects whole \
     matrices, 8-bit states are quantised in blocks that would straddle slices, GSM ranks every \
     parameter at once; use run.shard_layout = \"tensors\"";

/// Writes named optimizer state (`Optimizer::state_tensors`, or one rank's share) as
/// safetensors: the checkpoint's optimizer file, which `Optimizer::load` reads.
pub fn write_state(named: Vec<(String, Tensor)>, path: &Path) -> Result<()> {
    let named: Vec<(String, Tensor)> = named.into_iter().map(|(n, t)| (n, t.detach())).collect();
    crate::models::params::write_safetensors(&named, path)
}

/// Zeroes all but the `keep_fraction` largest entries of `t` by magnitude, in place: the
/// reference's `magnitude_pruning_` (relora/peft_pretraining/training_utils.py): threshold at the
/// `1 - keep_fraction` quantile of |t|, keep entries strictly above it.
pub(crate) fn prune_by_magnitude(t: &Tensor, keep_fraction: f64) -> Result<()> {
    let torch = |e: tch::TchError| Error::Torch(format!("optimizer state reset: {e}"));
    tch::no_grad(|| {
        let mut t = t.shallow_clone();
        if keep_fraction <= 0.0 || t.numel() == 0 {
            let _ = t.f_zero_().map_err(torch)?;
            return Ok(());
        }
        let mag = t.f_abs().map_err(torch)?;
        let threshold = mag
            .f_flatten(0, -1)
            .and_then(|m| m.f_to_kind(tch::Kind::Float))
            .and_then(|m| m.f_quantile_scalar(1.0 - keep_fraction, None, false, "linear"))
            .and_then(|q| q.f_to_kind(t.kind()))
            .map_err(torch)?;
        let mask = mag
            .f_gt_tensor(&threshold)
            .and_then(|m| m.f_to_kind(t.kind()))
            .map_err(torch)?;
        let _ = t.f_mul_(&mask).map_err(torch)?;
        Ok(())
    })
}

/// Clips the global L2 norm of all gradients to `max_norm` (torch.nn.utils.clip_grad_norm_, with
/// libtorch's foreach kernels) and returns the norm before clipping.
pub fn clip_grad_norm(store: &ParamStore, max_norm: Option<f64>) -> Result<f64> {
    tch::no_grad(|| {
        let grads: Vec<Tensor> = store
            .trainable()
            .filter_map(|p| grad_of(&p.tensor))
            .collect();
        let refs: Vec<&Tensor> = grads.iter().collect();
        torch_ext::clip_grad_norm(&refs, max_norm)
            .map_err(|e| Error::Torch(format!("clip_grad_norm: {e}")))
    })
}
