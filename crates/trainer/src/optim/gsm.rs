//! Global sparse momentum SGD (GSM; Ding et al., NeurIPS 2019), as the authors' reference code
//! (DingXiaoH/GSM-SGD, `gsm/gsm_train.py`) computes it:
//!
//! ```text
//! s     <- |w * g|  over all prunable weights together  (first-order Taylor saliency)
//! t     <- the Q-th largest s, Q = floor(density * n)
//! g     <- g * [s >= t]      (prunable weights only; others keep their whole gradient)
//! then momentum SGD with weight decay on every weight:
//! z     <- momentum * z + (g + wd * w)
//! w     <- w - lr * z
//! ```
//!
//! So the Q most salient prunable weights learn from the objective while all others only decay
//! towards zero; which layers end up sparse follows from the global ranking. The cut of the
//! smallest weights to exact zeros is a pruning event (`prune::Pruner::gsm_cut`).

use super::{grad_of, Sgd, StateTensors};
use crate::error::{Error, Result};
use tch::{Kind, Tensor};

pub struct Gsm {
    pub sgd: Sgd,
    /// Fraction of the prunable weights that receive the objective's gradient each step.
    pub density: f64,
    /// The prunable weights (handles sharing storage with the model's).
    prunable: Vec<(String, Tensor)>,
    /// How many prunable weights received their gradient in the last step (a scalar tensor,
    /// read only when logged, so that stepping does not wait for the device).
    last_selected: Option<Tensor>,
}

impl Gsm {
    /// `params` are all trainable parameters (name, tensor, decay) as for SGD; `prunable` names
    /// the ones ranked by saliency.
    pub fn new(
        params: Vec<(String, Tensor, bool)>,
        prunable: &[String],
        density: f64,
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    ) -> Gsm {
        let handles = params
            .iter()
            .filter(|(n, _, _)| prunable.contains(n))
            .map(|(n, t, _)| (n.clone(), t.shallow_clone()))
            .collect();
        Gsm {
            sgd: Sgd::new(params, momentum, 0.0, nesterov, weight_decay),
            density,
            prunable: handles,
            last_selected: None,
        }
    }

    pub fn prunable_names(&self) -> Vec<String> {
        self.prunable.iter().map(|(n, _)| n.clone()).collect()
    }

    pub fn step(&mut self, lr: f64) -> Result<()> {
        self.mask_gradients()?;
        self.sgd.step(lr)
    }

    /// Keeps the gradient of the `density` most salient prunable weights, zeroes the rest.
    fn mask_gradients(&mut self) -> Result<()> {
        let torch = |e: tch::TchError| Error::Torch(format!("GSM: {e}"));
        tch::no_grad(|| {
            let with_grads: Vec<(Tensor, Tensor)> = self
                .prunable
                .iter()
                .filter_map(|(_, w)| grad_of(w).map(|g| (w.shallow_clone(), g)))
                .collect();
            if with_grads.is_empty() {
                return Ok(());
            }
            let saliency: Vec<Tensor> = with_grads
                .iter()
                .map(|(w, g)| {
                    (w.to_kind(Kind::Float) * g.to_kind(Kind::Float))
                        .abs()
                        .flatten(0, -1)
                })
                .collect();
            let all = Tensor::f_cat(&saliency, 0).map_err(torch)?;
            let n = all.size()[0];
            let q = ((self.density * n as f64).floor() as i64).clamp(1, n);
            // The Q-th largest is the (n - Q + 1)-th smallest.
            let (threshold, _) = all.f_kthvalue(n - q + 1, 0, false).map_err(torch)?;
            let mut selected = Tensor::zeros([], (Kind::Int64, all.device()));
            for ((_, g), s) in with_grads.iter().zip(&saliency) {
                let keep = s.f_ge_tensor(&threshold).map_err(torch)?;
                selected += keep.sum(Kind::Int64);
                let keep = keep.view(g.size().as_slice()).to_kind(g.kind());
                let _ = g.shallow_clone().f_mul_(&keep).map_err(torch)?;
            }
            self.last_selected = Some(selected);
            Ok(())
        })
    }

    /// Fraction of the prunable weights that received their gradient in the last step (at least
    /// `density`; more only when saliencies tie at the threshold).
    pub fn selected_fraction(&self) -> Option<f64> {
        let n: i64 = self.prunable.iter().map(|(_, t)| t.numel() as i64).sum();
        self.last_selected
            .as_ref()
            .map(|s| s.int64_value(&[]) as f64 / n.max(1) as f64)
    }

    pub fn state_bytes(&self) -> i64 {
        self.sgd.state_bytes()
    }
}

impl StateTensors for Gsm {
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.sgd.state_tensors()
    }

    fn set_step(&mut self, step: i64) {
        self.sgd.set_step(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    /// The update rule written out element by element on plain numbers.
    struct Direct {
        w: Vec<Vec<f64>>,
        z: Vec<Vec<f64>>,
    }

    impl Direct {
        fn step(
            &mut self,
            grads: &[Vec<f64>],
            prunable: &[bool],
            density: f64,
            lr: f64,
            m: f64,
            wd: f64,
        ) {
            // Saliency over the prunable tensors, ranked globally.
            let mut sal: Vec<f64> = Vec::new();
            for (i, w) in self.w.iter().enumerate() {
                if prunable[i] {
                    sal.extend(w.iter().zip(&grads[i]).map(|(w, g)| (w * g).abs()));
                }
            }
            let q = ((density * sal.len() as f64).floor() as usize).max(1);
            let mut sorted = sal.clone();
            sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let t = sorted[q - 1];
            for (i, w) in self.w.iter_mut().enumerate() {
                for j in 0..w.len() {
                    let mut g = grads[i][j];
                    if prunable[i] && (w[j] * g).abs() < t {
                        g = 0.0;
                    }
                    // Norms and biases (1-D here) are not decayed, as in the trainer's SGD.
                    let decay = if prunable[i] { wd } else { 0.0 };
                    self.z[i][j] = m * self.z[i][j] + g + decay * w[j];
                    w[j] -= lr * self.z[i][j];
                }
            }
        }
    }

    #[test]
    fn update_rule_matches_a_direct_computation_step_by_step() {
        tch::manual_seed(3);
        let shapes: [&[i64]; 3] = [&[4, 5], &[3, 4], &[5]];
        let names = ["l1.weight", "l2.weight", "l1.bias"];
        let prunable = [true, true, false];
        let tensors: Vec<Tensor> = shapes
            .iter()
            .map(|s| Tensor::randn(*s, (Kind::Double, Device::Cpu)).set_requires_grad(true))
            .collect();
        let params: Vec<(String, Tensor, bool)> = names
            .iter()
            .zip(&tensors)
            .zip(prunable)
            .map(|((n, t), p)| (n.to_string(), t.shallow_clone(), p))
            .collect();
        let prunable_names = vec!["l1.weight".to_string(), "l2.weight".to_string()];
        let (density, lr, m, wd) = (0.3, 0.05, 0.9, 0.01);
        let mut gsm = Gsm::new(params, &prunable_names, density, m, false, wd);
        let to_vec = |t: &Tensor| Vec::<f64>::try_from(t.flatten(0, -1)).unwrap();
        let mut direct = Direct {
            w: tensors.iter().map(to_vec).collect(),
            z: tensors.iter().map(|t| vec![0.0; t.numel()]).collect(),
        };
        for step in 0..6 {
            // A loss whose gradient differs per weight and per step.
            let loss = tensors
                .iter()
                .enumerate()
                .map(|(i, t)| (t * (step as f64 + 1.0 + i as f64)).sin().sum(Kind::Double))
                .fold(Tensor::zeros([], (Kind::Double, Device::Cpu)), |a, b| a + b);
            loss.backward();
            let grads: Vec<Vec<f64>> = tensors.iter().map(|t| to_vec(&t.grad())).collect();
            direct.step(&grads, &prunable, density, lr, m, wd);
            gsm.step(lr).unwrap();
            for t in &tensors {
                let _ = t.grad().zero_();
            }
            for (t, d) in tensors.iter().zip(&direct.w) {
                for (a, b) in to_vec(t).iter().zip(d) {
                    assert!((a - b).abs() < 1e-12, "step {step}: {a} vs {b}");
                }
            }
            // 32 prunable weights at density 0.3: 9 get their gradient (no ties with randn).
            assert!((gsm.selected_fraction().unwrap() - 9.0 / 32.0).abs() < 1e-12);
        }
    }
}
