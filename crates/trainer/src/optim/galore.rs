//! GaLore-AdamW (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
//! Projection", arXiv:2403.03507), written to give the official implementation's update:
//! `galore_torch.GaLoreAdamW` (galore-torch 1.0 on PyPI, `galore_torch/adamw.py`) with its
//! `GaLoreProjector` of `proj_type = "std"` (`galore_torch/galore_projector.py`).
//!
//! For a projected weight `W [m, n]` with gradient `G`, `t` the step about to be taken (1-based)
//! and `P` the projector of rank `r`:
//!
//! ```text
//! P   <- svd(G) every update_proj_gap steps (at t - 1 = 0, gap, 2 gap, ...), in float32:
//!          m >= n: P = Vh[:r, :]  [r, n],  R = G P^T  [m, r]   ("right")
//!          m <  n: P = U[:, :r]   [m, r],  R = P^T G  [r, n]   ("left")
//! m   <- b1 m + (1 - b1) R                       (moments live in the low-rank space of R)
//! v   <- b2 v + (1 - b2) R^2
//! N   <- m / (sqrt(v) + eps)
//! W   <- W - lr sqrt(1 - b2^t) / (1 - b1^t) * scale * back(N)   back(N) = N P or P N
//! W   <- W - lr wd W                             (decay group, after the update)
//! ```
//!
//! Parameters that are not projected take the same update with `R = G` and no scale: the
//! reference puts them in a plain group of the same optimizer, which is the transformers-style
//! AdamW (eps outside the bias correction, decay after the update), not torch.optim.AdamW's.
//! The moments are not rotated or reset when the projector is refreshed: the reference keeps
//! them as they are, in the old basis's coordinates, and so do we.
//!
//! Differences from the reference, none of which changes the numbers of a training run:
//! - The step count is the optimizer's (as in our AdamW), not per parameter: the reference counts
//!   a parameter's steps only when it has a gradient. They agree whenever every parameter gets a
//!   gradient every step, as in all our recipes. A parameter's first projector is computed at the
//!   first step it has a gradient, as the reference does.
//! - All state is allocated when the optimizer is built, so its size is known before the first
//!   step (the reference allocates lazily). The projector is a contiguous copy of `r` singular
//!   vectors; the reference keeps a view that holds all of `U` or `Vh` alive.
//! - A rank above a weight's smaller dimension is an error (the reference silently uses fewer).

use super::moment::Moment;
use super::{grad_of, StateTensors};
use crate::error::{Error, Result};
use crate::models::params::{bytes_of, is_embedding, select, Before};
use std::collections::HashSet;
use tch::{Kind, Tensor};

/// The projection hyperparameters (the reference's `rank`, `update_proj_gap`, `scale`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Projection {
    pub rank: i64,
    /// Steps between SVD refreshes of each projector.
    pub update_proj_gap: i64,
    /// Multiplies the projected-back update (the paper's alpha).
    pub scale: f64,
}

pub struct GaloreAdamW {
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    pub projection: Projection,
    /// Completed steps; the projector refresh and bias corrections use it.
    pub step: i64,
    slots: Vec<Slot>,
}

struct Slot {
    name: String,
    param: Tensor,
    decay: bool,
    /// For projected weights; None: plain AdamW on the full gradient.
    projector: Option<Projector>,
    /// `[m, r]` or `[r, n]` for projected weights, else the parameter's shape.
    exp_avg: Moment,
    exp_avg_sq: Moment,
}

/// Which side the projector multiplies, chosen by shape as the reference's "std" type does.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    /// rows >= cols: `R = G P^T`, `P = Vh[:r, :]` `[r, n]`.
    Right,
    /// rows < cols: `R = P^T G`, `P = U[:, :r]` `[m, r]`.
    Left,
}

struct Projector {
    side: Side,
    /// `[r, n]` (Right) or `[m, r]` (Left), in the parameter's dtype.
    ortho: Tensor,
    /// Whether `ortho` holds singular vectors yet (zeros until the first refresh).
    ready: bool,
}

impl Projector {
    fn new(param: &Tensor, rank: i64) -> Projector {
        let (m, n) = (param.size()[0], param.size()[1]);
        let (side, shape) = if m >= n {
            (Side::Right, [rank, n])
        } else {
            (Side::Left, [m, rank])
        };
        let ortho = Tensor::zeros(shape, (param.kind(), param.device()));
        Projector {
            side,
            ortho,
            ready: false,
        }
    }

    /// The new projector from the SVD of `grad` (float32, reduced), in the parameter's dtype.
    fn orthogonal(&self, grad: &Tensor, rank: i64) -> std::result::Result<Tensor, tch::TchError> {
        // torch.svd is torch.linalg.svd(full_matrices=False) with V = Vh^T; tch's linalg_svd
        // always passes a `driver`, which the CPU rejects.
        let (u, _s, v) = grad.f_to_kind(Kind::Float)?.f_svd(true, true)?;
        let ortho = match self.side {
            Side::Right => v.f_narrow(1, 0, rank)?.f_transpose(0, 1)?, // Vh[:r, :]  [r, n]
            Side::Left => u.f_narrow(1, 0, rank)?,                     // U[:, :r]  [m, r]
        };
        ortho.f_to_kind(self.ortho.kind())
    }

    /// `[m, n]` -> `[m, r]` or `[r, n]`.
    fn project(&self, grad: &Tensor) -> Tensor {
        match self.side {
            Side::Right => grad.matmul(&self.ortho.tr()),
            Side::Left => self.ortho.tr().matmul(grad),
        }
    }

    /// `[m, r]` or `[r, n]` -> `[m, n]`.
    fn project_back(&self, low_rank: &Tensor) -> Tensor {
        match self.side {
            Side::Right => low_rank.matmul(&self.ortho),
            Side::Left => self.ortho.matmul(low_rank),
        }
    }
}

/// The weights projected by default: every 2-D one except embeddings and the output head, as
/// the reference's training script projects the Linear layers of attention and MLP blocks only.
fn default_target(name: &str) -> bool {
    !is_embedding(name) && !name.starts_with("lm_head.") && !name.contains(".lm_head.")
}

impl GaloreAdamW {
    /// `params`: (name, tensor, decay?) for every trainable parameter, in a fixed order. The 2-D
    /// ones that a pattern of `target` selects (the name rule of `models::params`; every 2-D one
    /// but embeddings and lm_head when `target` is empty) are projected; the rest get plain
    /// AdamW.
    pub fn new(
        params: Vec<(String, Tensor, bool)>,
        target: &[String],
        projection: Projection,
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
    ) -> Result<GaloreAdamW> {
        Self::new_owned(
            params,
            &|_| true,
            target,
            projection,
            betas,
            eps,
            weight_decay,
        )
    }

    /// `new` for a rank's share (`run.shard`): `target` selects among all of `params` and every
    /// projected weight is checked, as in one process, but only those `owns` names get state
    /// here (a weight's projection needs only that weight: whole-tensor shares keep it exact).
    pub fn new_owned(
        params: Vec<(String, Tensor, bool)>,
        owns: &dyn Fn(&str) -> bool,
        target: &[String],
        projection: Projection,
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
    ) -> Result<GaloreAdamW> {
        let recipe_err = |key: &str, msg: String| Error::Recipe(format!("optim.{key}: {msg}"));
        let Projection {
            rank,
            update_proj_gap,
            scale,
        } = projection;
        if rank <= 0 {
            return Err(recipe_err(
                "rank",
                format!("expected a positive integer, got {rank}"),
            ));
        }
        if update_proj_gap <= 0 {
            return Err(recipe_err(
                "update_proj_gap",
                format!("expected a positive integer, got {update_proj_gap}"),
            ));
        }
        if !(scale > 0.0 && scale.is_finite()) {
            return Err(recipe_err(
                "scale",
                format!("expected a positive number, got {scale}"),
            ));
        }
        let two_d: Vec<&str> = params
            .iter()
            .filter(|(_, t, _)| t.dim() == 2)
            .map(|(n, _, _)| n.as_str())
            .collect();
        // `target` used to match substrings: `select` refuses a pattern whose meaning changed.
        let projected: HashSet<String> = if target.is_empty() {
            two_d
                .into_iter()
                .filter(|n| default_target(n))
                .map(str::to_string)
                .collect()
        } else {
            select(
                &two_d,
                target,
                "optim.target",
                "2-D trainable weight",
                Before::Substring,
            )?
            .into_iter()
            .map(str::to_string)
            .collect()
        };
        for (name, param, _) in params.iter().filter(|(n, _, _)| projected.contains(n)) {
            let size = param.size();
            let smaller = size[0].min(size[1]);
            if rank > smaller {
                return Err(recipe_err(
                    "rank",
                    format!(
                        "{rank} exceeds the smaller dimension of {name} {size:?} \
                         (expected rank <= {smaller})"
                    ),
                ));
            }
        }
        if projected.is_empty() {
            return Err(Error::Recipe(
                "optim.target: no 2-D trainable weight to project with galore_adamw (embeddings \
                 and lm_head are left out unless optim.target names them)"
                    .into(),
            ));
        }
        let mut slots = Vec::with_capacity(params.len());
        for (name, param, decay) in params.into_iter().filter(|(n, _, _)| owns(n)) {
            let projector = if projected.contains(&name) {
                Some(Projector::new(&param, rank))
            } else {
                None
            };
            // [m, r] or [r, n] for projected weights, as the low-rank gradient.
            let moment = || match &projector {
                Some(p) => {
                    let shape = match p.side {
                        Side::Right => [param.size()[0], rank],
                        Side::Left => [rank, param.size()[1]],
                    };
                    Tensor::zeros(shape, (param.kind(), param.device()))
                }
                None => param.zeros_like().detach(),
            };
            let (exp_avg, exp_avg_sq) = (Moment::Full(moment()), Moment::Full(moment()));
            slots.push(Slot {
                name,
                param,
                decay,
                projector,
                exp_avg,
                exp_avg_sq,
            });
        }
        Ok(GaloreAdamW {
            betas,
            eps,
            weight_decay,
            projection,
            step: 0,
            slots,
        })
    }

    /// Keeps the (low-rank) moments 8-bit block-wise quantised (`moment.rs`): 8-bit GaLore.
    pub fn with_8bit_states(mut self) -> GaloreAdamW {
        for s in &mut self.slots {
            let (shape, kind, device) = match &s.exp_avg {
                Moment::Full(t) => (t.size(), t.kind(), t.device()),
                Moment::Int8(q) => (q.shape.clone(), Kind::Float, q.codes.device()),
            };
            s.exp_avg = Moment::zeros(&shape, kind, device, true, true);
            s.exp_avg_sq = Moment::zeros(&shape, kind, device, true, false);
        }
        self
    }

    pub fn step(&mut self, lr: f64) -> Result<()> {
        // Every SVD first (the only step that can fail, e.g. on a NaN gradient), so that a failed
        // step changes nothing.
        let fresh = (0..self.slots.len())
            .map(|i| self.fresh_projector(i))
            .collect::<Result<Vec<_>>>()?;
        for (i, ortho) in fresh.into_iter().enumerate() {
            self.update(i, lr, ortho);
        }
        self.step += 1;
        Ok(())
    }

    /// The parameters in slot order (the index `step_param` takes).
    pub fn params(&self) -> Vec<Tensor> {
        self.slots.iter().map(|s| s.param.shallow_clone()).collect()
    }

    /// Updates parameter `i` alone from its gradient, as `step` would (layer-wise updates, during
    /// the backward pass: the GaLore paper's per-layer weight updates); `finish_step` counts the
    /// step once every parameter had its turn.
    pub fn step_param(&mut self, i: usize, lr: f64) -> Result<()> {
        let ortho = self.fresh_projector(i)?;
        self.update(i, lr, ortho);
        Ok(())
    }

    /// Ends a step taken with `step_param`.
    pub fn finish_step(&mut self) {
        self.step += 1;
    }

    /// A new projector for slot `i` when this step refreshes it (the reference refreshes when
    /// its step count before this step is a multiple of the gap) or it has none yet.
    fn fresh_projector(&self, i: usize) -> Result<Option<Tensor>> {
        let refresh = self.step % self.projection.update_proj_gap == 0;
        let s = &self.slots[i];
        match (&s.projector, grad_of(&s.param)) {
            (Some(p), Some(g)) if refresh || !p.ready => tch::no_grad(|| {
                p.orthogonal(&g, self.projection.rank)
                    .map(Some)
                    .map_err(|e| {
                        Error::Torch(format!(
                            "GaLore SVD of the gradient of {}: {}",
                            s.name,
                            crate::error::first_line(&e.to_string())
                        ))
                    })
            }),
            _ => Ok(None),
        }
    }

    /// The update of slot `i` at step `self.step + 1`, with its fresh projector if any.
    fn update(&mut self, i: usize, lr: f64, ortho: Option<Tensor>) {
        let scale = self.projection.scale;
        // As Python's `beta ** step` (libm pow).
        let t = (self.step + 1) as f64;
        let [b1, b2] = self.betas;
        let step_size = lr * (1.0 - b2.powf(t)).sqrt() / (1.0 - b1.powf(t));
        let (eps, weight_decay) = (self.eps, self.weight_decay);
        let s = &mut self.slots[i];
        let Some(g) = grad_of(&s.param) else { return };
        tch::no_grad(|| {
            if let (Some(p), Some(ortho)) = (&mut s.projector, ortho) {
                p.ortho.copy_(&ortho);
                p.ready = true;
            }
            let g = match &s.projector {
                Some(p) => p.project(&g),
                None => g,
            };
            let (mut m, mut v) = (s.exp_avg.load(), s.exp_avg_sq.load());
            let _ = m.g_mul_scalar_(b1);
            let _ = m.g_add_(&(&g * (1.0 - b1)));
            let _ = v.g_mul_scalar_(b2);
            let _ = v.addcmul_(&g, &(&g * (1.0 - b2)));
            let denom = v.sqrt() + eps;
            let mut update = &m / denom;
            s.exp_avg.store(&m);
            s.exp_avg_sq.store(&v);
            if let Some(p) = &s.projector {
                update = p.project_back(&update) * scale;
            }
            let mut w = s.param.shallow_clone();
            let _ = w.g_add_(&(update * -step_size));
            if s.decay && weight_decay > 0.0 {
                let decay = &w * (-lr * weight_decay);
                let _ = w.g_add_(&decay);
            }
        });
    }

    /// Bytes of optimizer state: the (low-rank) moments and the projectors.
    pub fn state_bytes(&self) -> i64 {
        self.slots
            .iter()
            .map(|s| {
                s.exp_avg.bytes()
                    + s.exp_avg_sq.bytes()
                    + s.projector.as_ref().map_or(0, |p| bytes_of(&p.ortho))
            })
            .sum()
    }

    /// Names of the projected weights, in order.
    pub fn projected(&self) -> Vec<&str> {
        self.slots
            .iter()
            .filter(|s| s.projector.is_some())
            .map(|s| s.name.as_str())
            .collect()
    }
}

impl StateTensors for GaloreAdamW {
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("step".to_string(), Tensor::from(self.step))];
        for s in &self.slots {
            out.extend(s.exp_avg.named("exp_avg", &s.name));
            out.extend(s.exp_avg_sq.named("exp_avg_sq", &s.name));
            if let Some(p) = &s.projector {
                out.push((format!("ortho.{}", s.name), p.ortho.shallow_clone()));
            }
        }
        out
    }

    /// Called after the state tensors were loaded: a projector is ready when it was loaded with
    /// singular vectors (never all zeros), so a weight that had no gradient yet still gets its
    /// first projector at its first gradient.
    fn set_step(&mut self, step: i64) {
        self.step = step;
        for p in self.slots.iter_mut().filter_map(|s| s.projector.as_mut()) {
            p.ready = p.ortho.abs().max().double_value(&[]) > 0.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamW;
    use tch::Device;

    fn weight(shape: &[i64]) -> Tensor {
        Tensor::zeros(shape, (Kind::Float, Device::Cpu)).set_requires_grad(true)
    }

    fn projection(rank: i64) -> Projection {
        Projection {
            rank,
            update_proj_gap: 200,
            scale: 0.25,
        }
    }

    #[test]
    fn low_rank_state_of_a_64_by_32_weight_is_much_smaller_than_adamw() {
        let params = || vec![("w".to_string(), weight(&[64, 32]), true)];
        let galore = GaloreAdamW::new(params(), &[], projection(4), [0.9, 0.999], 1e-6, 0.0)
            .expect("galore");
        let adamw = AdamW::new(params(), [0.9, 0.999], 1e-8, 0.0);
        // AdamW: two [64, 32] moments. GaLore (64 >= 32: right side): two [64, 4] moments and a
        // [4, 32] projector.
        assert_eq!(adamw.state_bytes(), 2 * 64 * 32 * 4);
        assert_eq!(galore.state_bytes(), (2 * 64 * 4 + 4 * 32) * 4);
        assert!(galore.state_bytes() * 6 < adamw.state_bytes());
    }

    #[test]
    fn side_and_shapes_follow_the_reference() {
        let params = vec![
            ("tall".to_string(), weight(&[6, 4]), true),
            ("square".to_string(), weight(&[4, 4]), true),
            ("wide".to_string(), weight(&[3, 5]), true),
            ("bias".to_string(), weight(&[5]), false),
        ];
        let o =
            GaloreAdamW::new(params, &[], projection(2), [0.9, 0.999], 1e-6, 0.0).expect("galore");
        let shapes: Vec<(String, Vec<i64>)> = o
            .state_tensors()
            .into_iter()
            .map(|(n, t)| (n, t.size()))
            .collect();
        let expect = |n: &str, s: &[i64]| (n.to_string(), s.to_vec());
        assert_eq!(
            shapes,
            vec![
                expect("step", &[]),
                expect("exp_avg.tall", &[6, 2]),
                expect("exp_avg_sq.tall", &[6, 2]),
                expect("ortho.tall", &[2, 4]),
                expect("exp_avg.square", &[4, 2]),
                expect("exp_avg_sq.square", &[4, 2]),
                expect("ortho.square", &[2, 4]),
                expect("exp_avg.wide", &[2, 5]),
                expect("exp_avg_sq.wide", &[2, 5]),
                expect("ortho.wide", &[3, 2]),
                expect("exp_avg.bias", &[5]),
                expect("exp_avg_sq.bias", &[5]),
            ]
        );
    }

    #[test]
    fn default_target_leaves_out_embeddings_and_the_head() {
        let params = vec![
            (
                "model.embed_tokens.weight".to_string(),
                weight(&[16, 8]),
                false,
            ),
            (
                "model.layers.0.self_attn.q_proj.weight".to_string(),
                weight(&[8, 8]),
                true,
            ),
            ("model.norm.weight".to_string(), weight(&[8]), false),
            ("lm_head.weight".to_string(), weight(&[16, 8]), true),
        ];
        let o =
            GaloreAdamW::new(params, &[], projection(2), [0.9, 0.999], 1e-6, 0.0).expect("galore");
        assert_eq!(
            o.projected(),
            vec!["model.layers.0.self_attn.q_proj.weight"]
        );
    }

    fn build_err(params: Vec<(String, Tensor, bool)>, target: &[&str], rank: i64) -> String {
        let target: Vec<String> = target.iter().map(|s| s.to_string()).collect();
        match GaloreAdamW::new(params, &target, projection(rank), [0.9, 0.999], 1e-6, 0.0) {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_targets_and_ranks_are_one_line_errors() {
        let params = || {
            vec![
                (
                    "model.layers.0.mlp.up_proj.weight".to_string(),
                    weight(&[16, 8]),
                    true,
                ),
                (
                    "model.layers.0.input_layernorm.weight".to_string(),
                    weight(&[8]),
                    false,
                ),
            ]
        };
        assert_eq!(
            build_err(params(), &[], 9),
            "optim.rank: 9 exceeds the smaller dimension of model.layers.0.mlp.up_proj.weight \
             [16, 8] (expected rank <= 8)"
        );
        assert_eq!(
            build_err(params(), &["mlp.*", "self_attn"], 2),
            "optim.target: pattern \"self_attn\" matches no 2-D trainable weight"
        );
        // A pattern that only matches 1-D weights selects nothing GaLore can project.
        assert_eq!(
            build_err(params(), &["layernorm"], 2),
            "optim.target: pattern \"layernorm\" matches no 2-D trainable weight"
        );
        let only_embeddings = vec![(
            "model.embed_tokens.weight".to_string(),
            weight(&[16, 8]),
            false,
        )];
        assert_eq!(
            build_err(only_embeddings, &[], 2),
            "optim.target: no 2-D trainable weight to project with galore_adamw (embeddings and \
             lm_head are left out unless optim.target names them)"
        );
        assert_eq!(
            build_err(params(), &[], 0),
            "optim.rank: expected a positive integer, got 0"
        );
    }
}
