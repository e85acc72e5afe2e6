//! `[distill]` in a recipe: knowledge distillation from a frozen teacher (the losses and
//! the teacher are beside this file). One section for both tasks: `M` is the teacher's architecture type, a
//! `ModelConfig` in a pretraining recipe and a `ClassifierConfig` in a classification recipe.
//!
//! ```toml
//! [distill]
//! teacher = "runs/quickstart"   # a trainer checkpoint or run directory, or "hf:PATH"
//! loss = "forward_kl"           # forward_kl | reverse_kl | symmetric_kl | jsd
//! temperature = 2.0
//! alpha = 0.5                   # loss = alpha * kd + (1 - alpha) * cross-entropy
//! chunk_tokens = 1024
//! hidden = [{ student = 2, teacher = 4 }]
//! hidden_loss = "mse"           # mse | cosine
//! hidden_weight = 1.0
//! ```
//!
//! Validation checks ranges only; the teacher itself (its architecture, vocabulary or label set,
//! and the layers `hidden` names) is checked when the run opens it.

use crate::validate::{check, positive, positive_finite, Invalid};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(
    deny_unknown_fields,
    bound(serialize = "M: Serialize", deserialize = "M: Deserialize<'de>")
)]
pub struct DistillConfig<M> {
    /// The teacher's weights: `hf:PATH`, a trainer checkpoint (`run/checkpoints/step-N`) or run
    /// directory (its newest checkpoint); for a classifier also a safetensors file of
    /// torchvision-named tensors (with `teacher_model`).
    pub teacher: String,
    /// The teacher's architecture; absent: the one stored with its weights (the run's
    /// config.toml, or config.json for `hf:`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_model: Option<M>,
    /// `fp32` (default) or `bf16`: the dtype of the teacher's weights and forward pass.
    #[serde(default)]
    pub teacher_precision: TeacherPrecision,
    /// The divergence between the temperature-softened teacher and student distributions.
    #[serde(default)]
    pub loss: KdLoss,
    /// Softmax temperature T of both models' logits; the divergence is scaled by T^2.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Weight of the distillation loss: `alpha * kd + (1 - alpha) * ce` (hard labels).
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// Language models: positions whose logits (both models') are computed at a time.
    #[serde(default = "default_chunk_tokens")]
    pub chunk_tokens: i64,
    /// Language models: (student layer, teacher layer) pairs whose hidden states are matched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(!skip_serializing_if)]
    pub hidden: Vec<HiddenPair>,
    /// The loss between matched hidden states.
    #[serde(default)]
    pub hidden_loss: HiddenLoss,
    /// Weight of the summed hidden-state losses, added to the loss above.
    #[serde(default = "default_hidden_weight")]
    pub hidden_weight: f64,
}

/// A pair of layers whose hidden states are matched. Layer `i` is the residual stream after `i`
/// blocks (0: the embeddings), as transformers' `output_hidden_states` counts them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HiddenPair {
    /// The student's layer (0: the embeddings, i: after i blocks).
    pub student: i64,
    /// The teacher's layer (0: the embeddings, i: after i blocks).
    pub teacher: i64,
}

#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum KdLoss {
    /// KL(teacher || student) (Hinton et al. 2015).
    #[default]
    ForwardKl,
    /// KL(student || teacher): mode-seeking (MiniLLM, Gu et al. 2023).
    ReverseKl,
    /// KL(teacher || student) + KL(student || teacher) (Jeffreys' divergence).
    SymmetricKl,
    /// Generalised Jensen-Shannon with beta = 0.5 (GKD, Agarwal et al. 2024).
    Jsd,
}

#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum HiddenLoss {
    /// Mean squared error over every element (`F.mse_loss`).
    #[default]
    Mse,
    /// Mean over positions of 1 - cosine similarity (DistilBERT's cosine embedding loss).
    Cosine,
}

#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TeacherPrecision {
    #[default]
    Fp32,
    Bf16,
}

fn default_temperature() -> f64 {
    1.0
}
fn default_alpha() -> f64 {
    0.5
}
fn default_chunk_tokens() -> i64 {
    1024
}
fn default_hidden_weight() -> f64 {
    1.0
}

impl<M> DistillConfig<M> {
    /// The range checks both tasks share.
    pub fn validate(&self) -> Result<(), Invalid> {
        let t = self.teacher.trim();
        check(
            !t.is_empty() && t != "hf:",
            "distill.teacher",
            "expected \"hf:PATH\" or the path of a trainer checkpoint or run directory",
        )?;
        positive_finite(self.temperature, "distill.temperature")?;
        check(
            (0.0..=1.0).contains(&self.alpha),
            "distill.alpha",
            format!("expected a weight in [0, 1], got {}", self.alpha),
        )?;
        positive(self.chunk_tokens, "distill.chunk_tokens")?;
        check(
            self.hidden_weight >= 0.0 && self.hidden_weight.is_finite(),
            "distill.hidden_weight",
            format!("expected a non-negative number, got {}", self.hidden_weight),
        )?;
        for (i, p) in self.hidden.iter().enumerate() {
            check(
                p.student >= 0 && p.teacher >= 0,
                "distill.hidden",
                format!(
                    "expected layer indices >= 0, got hidden[{i}] = {{ student = {}, teacher = {} }}",
                    p.student, p.teacher
                ),
            )?;
        }
        Ok(())
    }

    /// The checks of a classification recipe: its teacher distils logits only, in fp32.
    pub fn validate_classifier(&self) -> Result<(), Invalid> {
        self.validate()?;
        check(
            self.hidden.is_empty(),
            "distill.hidden",
            "hidden-state matching is for language models; a classifier distils its logits",
        )?;
        check(
            self.teacher_precision == TeacherPrecision::Fp32,
            "distill.teacher_precision",
            "a classifier's teacher runs in fp32 (its BatchNorm statistics are fp32)",
        )
    }
}
