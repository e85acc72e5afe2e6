//! SGD with momentum, dampening, Nesterov and L2 weight decay, written to give torch.optim.SGD's
//! update (torch/optim/sgd.py, `_single_tensor_sgd`):
//!
//! ```text
//! d   <- g + wd * p
//! buf <- d                                   (first step)
//! buf <- momentum * buf + (1 - dampening) * d (later steps)
//! d   <- d + momentum * buf   (Nesterov)   or   d <- buf
//! p   <- p - lr * d
//! ```

use super::slices::{Slice, Weights};
use super::StateTensors;
use tch::Tensor;

pub struct Sgd {
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub step: i64,
    slots: Vec<Slot>,
}

struct Slot {
    name: String,
    /// The parameter, or with `run.shard_layout = "flat"` the slice of it, that this slot updates.
    weights: Weights,
    decay: bool,
    momentum_buffer: Tensor,
}

impl Sgd {
    pub fn new(
        params: Vec<(String, Tensor, bool)>,
        momentum: f64,
        dampening: f64,
        nesterov: bool,
        weight_decay: f64,
    ) -> Sgd {
        let params = params.into_iter().map(|(n, p, d)| (n, p, d, None));
        Sgd::over_slices(
            params.collect(),
            momentum,
            dampening,
            nesterov,
            weight_decay,
        )
    }

    /// `new` over (name, tensor, decay?, slice) (`run.shard_layout = "flat"`): a slot with a
    /// slice updates only that slice of its parameter, from the slice's gradient.
    pub fn over_slices(
        params: Vec<(String, Tensor, bool, Option<Slice>)>,
        momentum: f64,
        dampening: f64,
        nesterov: bool,
        weight_decay: f64,
    ) -> Sgd {
        let slots = params
            .into_iter()
            .map(|(name, param, decay, slice)| {
                let weights = Weights { param, slice };
                let momentum_buffer = tch::no_grad(|| weights.values().detach().zeros_like());
                Slot {
                    name,
                    weights,
                    decay,
                    momentum_buffer,
                }
            })
            .collect();
        Sgd {
            momentum,
            dampening,
            nesterov,
            weight_decay,
            step: 0,
            slots,
        }
    }

    pub fn step(&mut self, lr: f64) -> crate::Result<()> {
        let first = self.step == 0;
        self.step += 1;
        tch::no_grad(|| {
            for s in &mut self.slots {
                let Some(g) = s.weights.grad() else { continue };
                let mut p = s.weights.values();
                let mut d = if s.decay && self.weight_decay != 0.0 {
                    &g + &p * self.weight_decay
                } else {
                    g
                };
                if self.momentum != 0.0 {
                    if first {
                        s.momentum_buffer.copy_(&d);
                    } else {
                        let _ = s.momentum_buffer.g_mul_scalar_(self.momentum);
                        let _ = s.momentum_buffer.g_add_(&(&d * (1.0 - self.dampening)));
                    }
                    d = if self.nesterov {
                        d + &s.momentum_buffer * self.momentum
                    } else {
                        s.momentum_buffer.shallow_clone()
                    };
                }
                let _ = p.g_sub_(&(d * lr));
            }
        });
        Ok(())
    }

    pub fn state_bytes(&self) -> i64 {
        if self.momentum == 0.0 {
            return 0;
        }
        self.slots
            .iter()
            .map(|s| crate::models::params::bytes_of(&s.momentum_buffer))
            .sum()
    }
}

impl StateTensors for Sgd {
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("step".to_string(), Tensor::from(self.step))];
        for s in &self.slots {
            let name = s.weights.state_name(&s.name);
            out.push((
                format!("momentum_buffer.{name}"),
                s.momentum_buffer.shallow_clone(),
            ));
        }
        out
    }

    fn set_step(&mut self, step: i64) {
        self.step = step;
    }
}
