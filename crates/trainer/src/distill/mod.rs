//! Knowledge distillation: a student trained on `alpha * kd + (1 - alpha) * ce` (plus, for
//! language models, `hidden_weight` times hidden-state losses), where `kd` is a divergence
//! between the temperature-softened output distributions of a frozen teacher and the student
//! (`losses.rs`) and `ce` the cross-entropy against the hard labels. The teacher (`teacher.rs`)
//! comes from `[distill] teacher` and must share the vocabulary or the label set.
//!
//! Language models: the logits of both models are computed `chunk_tokens` positions at a time
//! from their final hidden states, and each chunk's loss is backpropagated into the student's
//! hidden states and output projection before the next chunk is computed; the trunk is
//! backpropagated once at the end with the gradient gathered for its output. So neither model's
//! full `[tokens, vocab]` logits exist at once (the idea of Liger Kernel's fused linear
//! cross-entropy). This is why `LmDistiller::backward` runs the backward pass itself.
//!
//! Hidden states: for each `[[distill.hidden]]` pair, the student's residual stream after
//! `student` blocks is compared with the teacher's after `teacher` blocks (TinyBERT, Jiao et al.
//! 2020). When the widths differ a learned projection `[d_teacher, d_student]` (no bias) maps the
//! student's into the teacher's space; it is registered in the student's parameter store as
//! `distill.hidden.{i}.proj.weight`, so it is trained by the optimizer and saved (and resumed)
//! with the checkpoint. Loading that checkpoint as a model leaves it out (`load.rs`).
//!
//! `config.rs` holds `[distill]`. Imports: `load.rs` and `checkpoint/` (the teacher), `models/`,
//! `device` (the precision), `validate`, `error`.

pub mod config;
pub mod losses;
pub mod teacher;

use crate::device::Precision;
use crate::error::{Error, Result};
use crate::models::params::ParamStore;
use crate::models::transformer::{MoeLayerStats, Transformer, TransformerConfig};
use crate::models::{ClassifierConfig, ModelConfig};
pub use config::{DistillConfig, HiddenLoss, HiddenPair, KdLoss, TeacherPrecision};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};
pub use teacher::{ClassifierTeacher, LmTeacher};

/// The prefix of the parameters distillation adds to the student's store (defined with the
/// checkpoint layout, which leaves them out when a checkpoint is loaded as a model).
pub use crate::checkpoint::DISTILL_PARAM_PREFIX as PARAM_PREFIX;

use crate::device::autocast;

/// One hidden-state pair and its projection (None when the widths agree).
struct HiddenMatch {
    student: i64,
    teacher: i64,
    proj: Option<Tensor>, // [d_teacher, d_student]
}

/// Distillation of a language model.
pub struct LmDistiller {
    pub teacher: LmTeacher,
    loss: KdLoss,
    temperature: f64,
    alpha: f64,
    chunk_tokens: i64,
    hidden: Vec<HiddenMatch>,
    hidden_loss: HiddenLoss,
    hidden_weight: f64,
}

/// The parts of one micro-batch's loss (detached scalars, fp32), each a per-token mean.
pub struct LmLosses {
    /// alpha * kd + (1 - alpha) * ce + hidden_weight * hidden: what is minimised (besides MoE
    /// router losses).
    pub loss: Tensor,
    pub kd: Tensor,
    pub ce: Tensor,
    /// The summed hidden-state losses (unweighted), when `hidden` pairs are configured.
    pub hidden: Option<Tensor>,
    pub moe_layers: Vec<MoeLayerStats>,
}

impl LmDistiller {
    /// Loads the teacher of `cfg` and adds the hidden-state projections to `student_params`
    /// (before the optimizer is built, so that it trains them).
    pub fn new(
        cfg: &DistillConfig<ModelConfig>,
        student: &TransformerConfig,
        seq_len: i64,
        student_params: &mut ParamStore,
        device: Device,
    ) -> Result<LmDistiller> {
        let teacher = LmTeacher::load(cfg, student, seq_len, device)?;
        tracing::info!(
            "distilling from {} ({:?} loss, T = {}, alpha = {})",
            teacher.source,
            cfg.loss,
            cfg.temperature,
            cfg.alpha
        );
        LmDistiller::with_teacher(cfg, teacher, student, student_params)
    }

    /// As `new`, with a teacher already loaded.
    pub fn with_teacher(
        cfg: &DistillConfig<ModelConfig>,
        teacher: LmTeacher,
        student: &TransformerConfig,
        student_params: &mut ParamStore,
    ) -> Result<LmDistiller> {
        teacher::check_vocab(
            &teacher.source,
            teacher.config.vocab_size,
            student.vocab_size,
        )?;
        let (ds, dt) = (student.d_model, teacher.config.d_model);
        let mut hidden = Vec::new();
        for (i, p) in cfg.hidden.iter().enumerate() {
            for (which, layer, n) in [
                ("student", p.student, student.n_layers),
                ("teacher", p.teacher, teacher.config.n_layers),
            ] {
                if layer > n {
                    return Err(Error::Recipe(format!(
                        "distill.hidden: hidden[{i}].{which} = {layer} but the {which} has {n} \
                         layers (expected 0..={n}; 0 is the embeddings)"
                    )));
                }
            }
            // nn.Linear's default initialisation: U(-1/sqrt(in), 1/sqrt(in)).
            let proj = (ds != dt).then(|| {
                let bound = 1.0 / (ds as f64).sqrt();
                let init =
                    Tensor::rand([dt, ds], (Kind::Float, Device::Cpu)) * (2.0 * bound) - bound;
                student_params.add_extra(&format!("{PARAM_PREFIX}hidden.{i}.proj.weight"), init)
            });
            hidden.push(HiddenMatch {
                student: p.student,
                teacher: p.teacher,
                proj,
            });
        }
        Ok(LmDistiller {
            teacher,
            loss: cfg.loss,
            temperature: cfg.temperature,
            alpha: cfg.alpha,
            chunk_tokens: cfg.chunk_tokens,
            hidden,
            hidden_loss: cfg.hidden_loss,
            hidden_weight: cfg.hidden_weight,
        })
    }

    /// Forward and backward of one micro-batch `inputs`, `targets` `[b, t]`: the gradients of
    /// `scale` times the loss (and the MoE router losses) are added to the student's parameters.
    pub fn backward(
        &self,
        student: &Transformer,
        inputs: &Tensor,
        targets: &Tensor,
        scale: f64,
        device: Device,
        precision: Precision,
    ) -> Result<LmLosses> {
        let keep_s: Vec<i64> = self.hidden.iter().map(|h| h.student).collect();
        let keep_t: Vec<i64> = self.hidden.iter().map(|h| h.teacher).collect();
        let teacher = &self.teacher.model;
        // The teacher: eval mode, no autograd graph at all.
        let t_out = tch::no_grad(|| {
            autocast(precision, device, || {
                teacher.forward_hidden(inputs, false, &keep_t)
            })
        })?;
        let s_out = autocast(precision, device, || {
            student.forward_hidden(inputs, true, &keep_s)
        })?;
        let hs = s_out.hidden.reshape([-1, student.config.d_model]); // [n, d_s]
        let ht = t_out.hidden.reshape([-1, self.teacher.config.d_model]); // [n, d_t]
        let y = targets.reshape([-1]); // [n]
        let n = hs.size()[0];
        let counted = y
            .ne(losses::IGNORE_INDEX)
            .sum(Kind::Int64)
            .int64_value(&[])
            .max(1) as f64;

        // Logit losses, chunk by chunk: each chunk's graph (the student's logits) is freed by
        // its own backward pass, which leaves d(loss)/d(hidden) in `leaf.grad`.
        let leaf = hs.detach().set_requires_grad(true);
        let zero = || Tensor::zeros([], (Kind::Float, device));
        let (mut kd_sum, mut ce_sum) = (zero(), zero());
        let mut start = 0;
        while start < n {
            let len = self.chunk_tokens.min(n - start);
            let t_logits = tch::no_grad(|| {
                autocast(precision, device, || {
                    teacher.lm_head(&ht.narrow(0, start, len))
                })
            })?; // [len, vocab]
            let s_logits = autocast(precision, device, || {
                student.lm_head(&leaf.narrow(0, start, len))
            })?;
            let (kd, ce) = losses::chunk_sums(
                self.loss,
                &s_logits,
                &t_logits,
                &y.narrow(0, start, len),
                self.temperature,
            );
            let part = (&kd * self.alpha + &ce * (1.0 - self.alpha)) * (scale / counted);
            part.f_backward()?;
            kd_sum += kd.detach();
            ce_sum += ce.detach();
            start += len;
        }

        // Hidden-state losses, on the student's graph.
        let mut hidden_sum: Option<Tensor> = None;
        for (k, h) in self.hidden.iter().enumerate() {
            let s = match &h.proj {
                Some(w) => {
                    let w = w.to_kind(s_out.layers[k].kind());
                    s_out.layers[k].linear(&w, None::<&Tensor>)
                }
                None => s_out.layers[k].shallow_clone(),
            };
            let l = losses::hidden_loss(self.hidden_loss, &s, &t_out.layers[k]);
            hidden_sum = Some(match hidden_sum {
                Some(acc) => acc + l,
                None => l,
            });
        }

        // The trunk: sum(hidden * grad) has gradient `grad` with respect to the hidden states.
        let grad = leaf.grad();
        let mut trunk = (&hs * grad.to_kind(hs.kind())).sum(Kind::Float);
        if let Some(h) = &hidden_sum {
            trunk += h * (self.hidden_weight * scale);
        }
        let router = s_out
            .moe_layers
            .iter()
            .map(|l| l.loss.shallow_clone())
            .reduce(|a, b| a + b);
        if let Some(r) = router {
            trunk += r * scale;
        }
        trunk.f_backward()?;

        let kd = kd_sum / counted;
        let ce = ce_sum / counted;
        let hidden = hidden_sum.map(|h| h.detach());
        let mut loss = &kd * self.alpha + &ce * (1.0 - self.alpha);
        if let Some(h) = &hidden {
            loss += h * self.hidden_weight;
        }
        Ok(LmLosses {
            loss,
            kd,
            ce,
            hidden,
            moe_layers: s_out.moe_layers,
        })
    }
}

/// The parts of the loss summed over the micro-batches of one optimizer step, for metrics.
pub struct StepSums {
    kd: Tensor,
    ce: Tensor,
    hidden: Option<Tensor>,
    micro_batches: i64,
}

impl StepSums {
    pub fn new(device: Device) -> StepSums {
        StepSums {
            kd: Tensor::zeros([], (Kind::Float, device)),
            ce: Tensor::zeros([], (Kind::Float, device)),
            hidden: None,
            micro_batches: 0,
        }
    }

    pub fn add(&mut self, l: &LmLosses) {
        self.kd += &l.kd;
        self.ce += &l.ce;
        if let Some(h) = &l.hidden {
            self.hidden = Some(match self.hidden.take() {
                Some(acc) => acc + h,
                None => h.shallow_clone(),
            });
        }
        self.micro_batches += 1;
    }

    /// `kd_loss`, `ce_loss` and `hidden_loss`: the means over the step's micro-batches.
    pub fn metrics(&self) -> Vec<(String, Value)> {
        if self.micro_batches == 0 {
            return Vec::new();
        }
        let n = self.micro_batches as f64;
        let mut out = vec![
            ("kd_loss".to_string(), json!(self.kd.double_value(&[]) / n)),
            ("ce_loss".to_string(), json!(self.ce.double_value(&[]) / n)),
        ];
        if let Some(h) = &self.hidden {
            out.push(("hidden_loss".to_string(), json!(h.double_value(&[]) / n)));
        }
        out
    }
}

/// Distillation of a classifier.
pub struct ClassifierDistiller {
    pub teacher: ClassifierTeacher,
    loss: KdLoss,
    temperature: f64,
    alpha: f64,
}

/// A classifier's loss and its parts.
pub struct ClassifierLosses {
    /// alpha * kd + (1 - alpha) * ce, with the student's graph.
    pub total: Tensor,
    pub kd: f64,
    pub ce: f64,
}

impl ClassifierDistiller {
    pub fn new(
        cfg: &DistillConfig<ClassifierConfig>,
        student: &ClassifierConfig,
        device: Device,
    ) -> Result<ClassifierDistiller> {
        let teacher = ClassifierTeacher::load(cfg, student.num_classes(), device)?;
        tracing::info!(
            "distilling from {} ({:?} loss, T = {}, alpha = {})",
            teacher.source,
            cfg.loss,
            cfg.temperature,
            cfg.alpha
        );
        Ok(ClassifierDistiller {
            teacher,
            loss: cfg.loss,
            temperature: cfg.temperature,
            alpha: cfg.alpha,
        })
    }

    /// Mixes the student's cross-entropy `ce` with the divergence between its `logits`
    /// `[b, classes]` and the teacher's on the same `images`.
    pub fn loss(
        &self,
        images: &Tensor,
        logits: &Tensor,
        ce: &Tensor,
        device: Device,
        precision: Precision,
    ) -> Result<ClassifierLosses> {
        let t_logits = tch::no_grad(|| {
            autocast(precision, device, || {
                self.teacher
                    .model
                    .forward(images, false)
                    .to_kind(Kind::Float)
            })
        })?;
        let kd = losses::kd_loss(self.loss, logits, &t_logits, self.temperature);
        let total = &kd * self.alpha + ce * (1.0 - self.alpha);
        Ok(ClassifierLosses {
            total,
            kd: kd.double_value(&[]),
            ce: ce.double_value(&[]),
        })
    }
}
