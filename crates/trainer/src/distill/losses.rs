//! Distillation losses on logits and hidden states, as `torch.nn.functional` computes them.
//!
//! With `p_t = softmax(teacher / T)` and `p_s = softmax(student / T)` per row (a token of a
//! language model, an example of a classifier), each divergence is summed over the classes and
//! multiplied by T^2, so that its gradients keep their scale as T changes (Hinton et al. 2015,
//! "Distilling the Knowledge in a Neural Network", section 2):
//!
//! - `forward_kl`:   KL(p_t || p_s) = `F.kl_div(log p_s, log p_t, log_target=True)`
//! - `reverse_kl`:   KL(p_s || p_t)
//! - `symmetric_kl`: KL(p_t || p_s) + KL(p_s || p_t)
//! - `jsd`:          0.5 KL(p_t || m) + 0.5 KL(p_s || m), m = 0.5 p_t + 0.5 p_s (the generalised
//!   JSD of GKD, Agarwal et al. 2024, at beta = 0.5)
//!
//! Reduction: the mean over rows, `reduction="batchmean"` of `F.kl_div`. For a language model the
//! rows are the positions whose target is not the ignore index (-100), the positions the
//! cross-entropy averages over, so the two parts of `alpha * kd + (1 - alpha) * ce` are both per
//! token; for a classifier they are the examples of the batch. Everything is computed in fp32.

use super::config::{HiddenLoss, KdLoss};
use tch::{Kind, Reduction, Tensor};

/// The target id that the cross-entropy (`Transformer::loss`) and these losses skip.
pub const IGNORE_INDEX: i64 = -100;

/// The divergence of each row `[n]` between student and teacher logits `[n, classes]`, softened
/// by `temperature` and scaled by its square.
pub fn divergence_rows(
    kind: KdLoss,
    student: &Tensor,
    teacher: &Tensor,
    temperature: f64,
) -> Tensor {
    let ls = (student.to_kind(Kind::Float) / temperature).log_softmax(-1, Kind::Float);
    let lt = (teacher.to_kind(Kind::Float) / temperature).log_softmax(-1, Kind::Float);
    let d = match kind {
        KdLoss::ForwardKl => kl_rows(&lt, &ls),
        KdLoss::ReverseKl => kl_rows(&ls, &lt),
        KdLoss::SymmetricKl => kl_rows(&lt, &ls) + kl_rows(&ls, &lt),
        KdLoss::Jsd => {
            // log m = log(0.5 p_t + 0.5 p_s), computed stably from the log-probabilities.
            let lm = Tensor::stack(&[&lt, &ls], 0).logsumexp(0, false) + 0.5f64.ln();
            (kl_rows(&lt, &lm) + kl_rows(&ls, &lm)) * 0.5
        }
    };
    d * (temperature * temperature)
}

/// KL(p || q) of each row from log-probabilities `[n, classes]`: sum p (log p - log q), what
/// `F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)` computes.
fn kl_rows(log_p: &Tensor, log_q: &Tensor) -> Tensor {
    (log_p.exp() * (log_p - log_q)).sum_dim_intlist(-1, false, Kind::Float)
}

/// A classifier's distillation loss: the mean divergence over the batch (`batchmean`).
pub fn kd_loss(kind: KdLoss, student: &Tensor, teacher: &Tensor, temperature: f64) -> Tensor {
    divergence_rows(kind, student, teacher, temperature).mean(Kind::Float)
}

/// Sums over one chunk of positions of a language model: the divergence and the cross-entropy
/// of the positions whose target is not `IGNORE_INDEX`. `student` and `teacher` are logits
/// `[n, vocab]`, `targets` `[n]`. Divide both by the number of counted positions of the whole
/// batch for per-token means.
pub fn chunk_sums(
    kind: KdLoss,
    student: &Tensor,
    teacher: &Tensor,
    targets: &Tensor,
    temperature: f64,
) -> (Tensor, Tensor) {
    let counted = targets.ne(IGNORE_INDEX).to_kind(Kind::Float); // [n]
    let kd = (divergence_rows(kind, student, teacher, temperature) * counted).sum(Kind::Float);
    let ce = student.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
        targets,
        None,
        Reduction::Sum,
        IGNORE_INDEX,
        0.0,
    );
    (kd, ce)
}

/// The distance between (projected) student and teacher hidden states `[.., d]`: `mse` is
/// `F.mse_loss` (the mean over every element), `cosine` the mean over positions of
/// `1 - F.cosine_similarity(s, t, dim=-1)` (eps 1e-8).
pub fn hidden_loss(kind: HiddenLoss, student: &Tensor, teacher: &Tensor) -> Tensor {
    let s = student.to_kind(Kind::Float);
    let t = teacher.to_kind(Kind::Float);
    match kind {
        HiddenLoss::Mse => s.mse_loss(&t, Reduction::Mean),
        HiddenLoss::Cosine => {
            let cos = Tensor::cosine_similarity(&s, &t, -1, 1e-8); // [..]
            (cos.neg() + 1.0).mean(Kind::Float)
        }
    }
}
