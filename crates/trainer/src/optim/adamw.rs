//! AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization"), written to give
//! torch.optim.AdamW's single-tensor update (torch/optim/adamw.py, `_single_tensor_adam` with
//! decoupled decay):
//!
//! ```text
//! p   <- p * (1 - lr * wd)                       (decay group only)
//! m   <- lerp(m, g, 1 - b1)
//! v   <- b2 * v + (1 - b2) * g^2
//! p   <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//!
//! The moments are owned here as named tensors so that they save, load and reset. With fp32
//! master weights (`with_fp32_masters`, for bf16 weights) the update runs on the master copy
//! with the gradient in fp32, and the weight takes the rounded result.

use super::moment::Moment;
use super::slices::{Slice, Weights};
use super::StateTensors;
use tch::{Kind, Tensor};

pub struct AdamW {
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
    /// Completed steps; the bias corrections use step + 1 during a step.
    pub step: i64,
    /// Step through libtorch's fused kernel (`at::_fused_adamw_`, torch's `fused=True`): one
    /// kernel launch per group instead of several per parameter. Same update up to rounding.
    pub fused: bool,
    slots: Vec<Slot>,
}

struct Slot {
    name: String,
    /// The parameter, or with `run.shard_layout = "flat"` the slice of it, that this slot updates.
    weights: Weights,
    /// The fp32 copy the update runs on (`with_fp32_masters`); the param is its rounding.
    master: Option<Tensor>,
    decay: bool,
    exp_avg: Moment,
    exp_avg_sq: Moment,
}

/// With fp32 masters, the most elements one fused call converts the gradients of (64 MiB of
/// fp32 copies); a larger tensor is a call of its own. (Small in the unit tests, which step
/// several runs of slots.)
#[cfg(not(test))]
const MASTER_CHUNK: usize = 1 << 24;
#[cfg(test)]
const MASTER_CHUNK: usize = 40;

impl Slot {
    /// What the update changes: the master copy, or the weights themselves.
    fn target(&self) -> Tensor {
        match &self.master {
            Some(m) => m.shallow_clone(),
            None => self.weights.values(),
        }
    }

    /// The gradient in the target's dtype, when there is one.
    fn grad(&self) -> Option<Tensor> {
        let g = self.weights.grad()?;
        Some(match &self.master {
            Some(m) if m.kind() != g.kind() => g.to_kind(m.kind()),
            _ => g,
        })
    }

    /// After an update of the master copy: the weight takes its rounded value.
    fn round_into_param(&self) {
        if let Some(m) = &self.master {
            tch::no_grad(|| self.weights.values().copy_(m));
        }
    }
}

impl AdamW {
    /// `params`: (name, tensor, decay?) for every trainable parameter, in a fixed order.
    pub fn new(
        params: Vec<(String, Tensor, bool)>,
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
    ) -> AdamW {
        let params = params.into_iter().map(|(n, p, d)| (n, p, d, None));
        AdamW::over_slices(params.collect(), betas, eps, weight_decay)
    }

    /// `new` over (name, tensor, decay?, slice) (`run.shard_layout = "flat"`): a slot with a
    /// slice updates only that slice of its parameter, from the slice's gradient, with state
    /// of the slice's length.
    pub fn over_slices(
        params: Vec<(String, Tensor, bool, Option<Slice>)>,
        betas: [f64; 2],
        eps: f64,
        weight_decay: f64,
    ) -> AdamW {
        let slots = params
            .into_iter()
            .map(|(name, param, decay, slice)| {
                let mut slot = Slot {
                    name,
                    weights: Weights { param, slice },
                    master: None,
                    decay,
                    exp_avg: Moment::Full(Tensor::new()),
                    exp_avg_sq: Moment::Full(Tensor::new()),
                };
                let values = tch::no_grad(|| slot.weights.values().detach());
                slot.exp_avg = Moment::Full(values.zeros_like());
                slot.exp_avg_sq = Moment::Full(values.zeros_like());
                slot
            })
            .collect();
        AdamW {
            betas,
            eps,
            weight_decay,
            step: 0,
            fused: false,
            slots,
        }
    }

    /// Keeps an fp32 master copy of every parameter (taken now: call it while the weights are
    /// still fp32, before they are cast to bf16) and fp32 moments; the parameters' own dtype is
    /// then only what the model computes with. Call before `with_8bit_states`.
    pub fn with_fp32_masters(mut self) -> AdamW {
        for s in &mut self.slots {
            let master = tch::no_grad(|| s.weights.values().detach().to_kind(Kind::Float).copy());
            s.exp_avg = Moment::Full(master.zeros_like());
            s.exp_avg_sq = Moment::Full(master.zeros_like());
            s.master = Some(master);
        }
        self
    }

    /// Keeps the moments 8-bit block-wise quantised (`moment.rs`); they are dequantised, updated
    /// and quantised again at every step (not with the fused kernel).
    pub fn with_8bit_states(mut self) -> AdamW {
        for s in &mut self.slots {
            let target = s.target();
            let (shape, kind, device) = (target.size(), target.kind(), target.device());
            s.exp_avg = Moment::zeros(&shape, kind, device, true, true);
            s.exp_avg_sq = Moment::zeros(&shape, kind, device, true, false);
        }
        self.fused = false;
        self
    }

    pub fn step(&mut self, lr: f64) -> crate::Result<()> {
        if self.fused {
            return self.step_fused(lr);
        }
        for i in 0..self.slots.len() {
            self.update(i, lr);
        }
        self.step += 1;
        Ok(())
    }

    /// The parameters in slot order (the index `step_param` takes).
    pub fn params(&self) -> Vec<Tensor> {
        let params = self.slots.iter().map(|s| s.weights.param.shallow_clone());
        params.collect()
    }

    /// Updates parameter `i` alone from its gradient, as `step` would (layer-wise updates, during
    /// the backward pass); `finish_step` counts the step once every parameter had its turn.
    pub fn step_param(&mut self, i: usize, lr: f64) -> crate::Result<()> {
        if !self.fused {
            self.update(i, lr);
            return Ok(());
        }
        let s = &self.slots[i];
        self.fused_update(std::iter::once(s), s.decay, lr)
    }

    /// Ends a step taken with `step_param`.
    pub fn finish_step(&mut self) {
        self.step += 1;
    }

    /// The unfused update of slot `i` at step `self.step + 1`.
    fn update(&mut self, i: usize, lr: f64) {
        let t = (self.step + 1) as i32;
        let [b1, b2] = self.betas;
        let bias_correction1 = 1.0 - b1.powi(t);
        let bias_correction2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let step_size = lr / bias_correction1;
        let weight_decay = self.weight_decay;
        let eps = self.eps;
        let s = &mut self.slots[i];
        let Some(g) = s.grad() else { return };
        tch::no_grad(|| {
            let mut p = s.target().shallow_clone();
            if s.decay && weight_decay != 0.0 {
                let _ = p.g_mul_scalar_(1.0 - lr * weight_decay);
            }
            let (mut m, mut v) = (s.exp_avg.load(), s.exp_avg_sq.load());
            let _ = m.lerp_(&g, 1.0 - b1);
            let _ = v.g_mul_scalar_(b2);
            let _ = v.addcmul_(&g, &(&g * (1.0 - b2)));
            let denom = (v.sqrt() / bias_correction2_sqrt) + eps;
            let _ = p.g_sub_(&(&m / denom * step_size));
            s.exp_avg.store(&m);
            s.exp_avg_sq.store(&v);
        });
        s.round_into_param();
    }

    fn step_fused(&mut self, lr: f64) -> crate::Result<()> {
        for decay in [true, false] {
            let group = self.slots.iter().filter(|s| s.decay == decay);
            self.fused_update(group, decay, lr)?;
        }
        self.step += 1;
        Ok(())
    }

    /// `at::_fused_adamw_` at step `self.step + 1` over the `slots` that have a gradient, all
    /// decayed (`decay`) or none: one call, or with fp32 masters one call per run of slots of
    /// at most `MASTER_CHUNK` elements, so that the fp32 copies of their bf16 gradients never
    /// exist for the whole group at once.
    fn fused_update<'a>(
        &self,
        slots: impl Iterator<Item = &'a Slot>,
        decay: bool,
        lr: f64,
    ) -> crate::Result<()> {
        let live: Vec<&Slot> = slots.filter(|s| s.weights.grad().is_some()).collect();
        let limit = match live.iter().any(|s| s.master.is_some()) {
            true => MASTER_CHUNK,
            false => usize::MAX,
        };
        let mut start = 0;
        while start < live.len() {
            let (mut end, mut elements) = (start + 1, live[start].weights.numel());
            while end < live.len() && elements + live[end].weights.numel() <= limit {
                elements += live[end].weights.numel();
                end += 1;
            }
            self.fused_call(&live[start..end], decay, lr)?;
            start = end;
        }
        Ok(())
    }

    /// One `at::_fused_adamw_` call over `live` (slots with a gradient), then the weights of
    /// those with masters take their rounding.
    fn fused_call(&self, live: &[&Slot], decay: bool, lr: f64) -> crate::Result<()> {
        let step = Tensor::full(
            [],
            (self.step + 1) as f64,
            (tch::Kind::Float, live[0].weights.param.device()),
        );
        let grads: Vec<Tensor> = live.iter().filter_map(|s| s.grad()).collect();
        let grads: Vec<&Tensor> = grads.iter().collect();
        let targets: Vec<Tensor> = live.iter().map(|s| s.target()).collect();
        let params: Vec<&Tensor> = targets.iter().collect();
        let m: Vec<&Tensor> = live
            .iter()
            .map(|s| full(&s.exp_avg))
            .collect::<crate::Result<_>>()?;
        let v: Vec<&Tensor> = live
            .iter()
            .map(|s| full(&s.exp_avg_sq))
            .collect::<crate::Result<_>>()?;
        let wd = if decay { self.weight_decay } else { 0.0 };
        tch::no_grad(|| {
            torch_ext::fused_adamw(&params, &grads, &m, &v, &step, lr, self.betas, wd, self.eps)
        })
        .map_err(|e| crate::Error::Torch(format!("fused AdamW: {e}")))?;
        for s in live {
            s.round_into_param();
        }
        Ok(())
    }

    /// Resets the moments of the parameters named in `names` (ReLoRA's optimizer reset): keeps
    /// the `keep_fraction` largest entries of each moment by magnitude and zeroes the rest
    /// (`keep_fraction = 0`: zeroes them). The step counter is global and stays, as in the
    /// reference. The fused path steps these same tensors. Returns the number of parameters reset.
    pub fn reset_state(&mut self, names: &[String], keep_fraction: f64) -> crate::Result<usize> {
        let mut n = 0;
        for s in self.slots.iter_mut().filter(|s| names.contains(&s.name)) {
            s.exp_avg.prune(keep_fraction)?;
            s.exp_avg_sq.prune(keep_fraction)?;
            n += 1;
        }
        Ok(n)
    }

    /// Number of bytes of optimizer state (fp32 master copies included).
    pub fn state_bytes(&self) -> i64 {
        self.slots
            .iter()
            .map(|s| {
                let master = s.master.as_ref().map_or(0, crate::models::params::bytes_of);
                s.exp_avg.bytes() + s.exp_avg_sq.bytes() + master
            })
            .sum()
    }
}

/// The tensor of a 32-bit moment (the fused kernel's input).
fn full(m: &Moment) -> crate::Result<&Tensor> {
    match m {
        Moment::Full(t) => Ok(t),
        Moment::Int8(_) => Err(crate::Error::Recipe(
            "optim.fused: the fused AdamW kernel needs 32-bit states".into(),
        )),
    }
}

impl StateTensors for AdamW {
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("step".to_string(), Tensor::from(self.step))];
        for s in &self.slots {
            let name = s.weights.state_name(&s.name);
            out.extend(s.exp_avg.named("exp_avg", &name));
            out.extend(s.exp_avg_sq.named("exp_avg_sq", &name));
            if let Some(m) = &s.master {
                out.push((format!("master.{name}"), m.shallow_clone()));
            }
        }
        out
    }

    /// Called after the state tensors were loaded: the weights take their masters' rounding
    /// (they are that already in a checkpoint written after a step).
    fn set_step(&mut self, step: i64) {
        self.step = step;
        for s in &self.slots {
            s.round_into_param();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// Gives `p` the gradient `g` (exactly representable in `p`'s dtype).
    fn set_grad(p: &Tensor, g: &Tensor) {
        torch_ext::grads_to_none(&[p]).expect("grad dropped");
        (p.to_kind(Kind::Float) * g).sum(Kind::Float).backward();
    }

    /// With fp32 masters, a bf16 weight's update is fp32 AdamW's on the master (bitwise, fused
    /// or not) and the weight is the master rounded to bf16; the masters are saved as state.
    #[test]
    fn fp32_masters_update_as_fp32_adamw_and_round_into_bf16_weights() {
        // Three weights: with the unit tests' MASTER_CHUNK of 40 elements the fused path steps
        // them in three calls.
        let shapes: [&[i64]; 3] = [&[4, 8], &[3, 8], &[5]];
        for fused in [false, true] {
            tch::manual_seed(3);
            let inits: Vec<Tensor> = shapes
                .iter()
                .map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)))
                .collect();
            let leaves = |inits: &[Tensor]| -> Vec<Tensor> {
                inits
                    .iter()
                    .map(|t| t.copy().set_requires_grad(true))
                    .collect()
            };
            let (w32, w16) = (leaves(&inits), leaves(&inits));
            let named = |ws: &[Tensor]| -> Vec<(String, Tensor, bool)> {
                let n = ws.iter().enumerate();
                n.map(|(i, w)| (format!("w{i}"), w.shallow_clone(), i != 2))
                    .collect()
            };
            let mut reference = AdamW::new(named(&w32), [0.9, 0.95], 1e-8, 0.1);
            let mut mastered = AdamW::new(named(&w16), [0.9, 0.95], 1e-8, 0.1).with_fp32_masters();
            (reference.fused, mastered.fused) = (fused, fused);
            // The model's weights become bf16 after the masters were taken (`ParamStore::set_kind`).
            tch::no_grad(|| {
                for w in &w16 {
                    let mut w = w.shallow_clone();
                    w.set_data(&w.to_kind(Kind::BFloat16));
                }
            });
            for _ in 0..5 {
                for (a, b) in w32.iter().zip(&w16) {
                    let g = Tensor::randn(a.size(), (Kind::Float, Device::Cpu))
                        .to_kind(Kind::BFloat16)
                        .to_kind(Kind::Float);
                    set_grad(a, &g);
                    set_grad(b, &g);
                }
                reference.step(1e-2).expect("step");
                mastered.step(1e-2).expect("step");
            }
            let state = mastered.state_tensors();
            for (i, (a, b)) in w32.iter().zip(&w16).enumerate() {
                let name = format!("master.w{i}");
                let master = &state.iter().find(|(n, _)| *n == name).expect("saved").1;
                assert!(
                    master.equal(a),
                    "fused {fused}: {name} is fp32 AdamW's weight"
                );
                assert_eq!(b.kind(), Kind::BFloat16);
                assert!(
                    b.equal(&a.to_kind(Kind::BFloat16)),
                    "fused {fused}: w{i} rounded"
                );
            }
            assert_eq!(mastered.state_bytes(), 3 * 4 * (32 + 24 + 5));
        }
    }

    /// Slices of a weight (`over_slices`, as `run.shard_layout = "flat"` cuts them, at offsets
    /// that do not fall on vector boundaries) update their part of it as whole-tensor AdamW
    /// does, from the matching slices of the gradient: fused or not, with fp32 masters or not.
    #[test]
    fn slices_update_as_the_whole_tensor_does() {
        for (fused, masters) in [(false, false), (true, false), (false, true), (true, true)] {
            tch::manual_seed(5);
            let init = Tensor::randn([6, 7], (Kind::Float, Device::Cpu));
            let whole = init.copy().set_requires_grad(true);
            let sliced = init.copy().set_requires_grad(true);
            let grads = Tensor::zeros([42], (Kind::Float, Device::Cpu));
            let cuts: Vec<(String, Tensor, bool, Option<Slice>)> = [(0, 10), (10, 25), (35, 7)]
                .iter()
                .map(|&(offset, len)| {
                    let grad = grads.narrow(0, offset, len);
                    let slice = Slice { offset, len, grad };
                    ("w".to_string(), sliced.shallow_clone(), true, Some(slice))
                })
                .collect();
            let mut a = AdamW::new(
                vec![("w".into(), whole.shallow_clone(), true)],
                [0.9, 0.95],
                1e-8,
                0.1,
            );
            let mut b = AdamW::over_slices(cuts, [0.9, 0.95], 1e-8, 0.1);
            if masters {
                (a, b) = (a.with_fp32_masters(), b.with_fp32_masters());
            }
            (a.fused, b.fused) = (fused, fused);
            for _ in 0..4 {
                let g = Tensor::randn([6, 7], (Kind::Float, Device::Cpu));
                set_grad(&whole, &g);
                tch::no_grad(|| grads.shallow_clone().copy_(&g.reshape([-1])));
                a.step(1e-2).expect("step");
                b.step(1e-2).expect("step");
            }
            assert!(whole.equal(&sliced), "fused {fused}, masters {masters}");
            let names: Vec<String> = b.state_tensors().into_iter().map(|(n, _)| n).collect();
            assert!(names.contains(&"exp_avg.w@10+25".to_string()), "{names:?}");
        }
    }
}
