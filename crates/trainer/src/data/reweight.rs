//! Loss-based sample reweighting (`[train.reweight]`): within each micro-batch, the sequences
//! count in the training loss by a weight that depends on their own loss.
//!
//! ```toml
//! [train.reweight]
//! rule = "drop_highest"   # "drop_lowest", or "softmax"
//! fraction = 0.1          # drop rules: the share of each micro-batch's sequences left out
//! # temperature = -2.0    # softmax only (instead of fraction): w_i ∝ exp(loss_i / temperature)
//! ```
//!
//! With `l_i` the mean token loss of sequence `i` of a micro-batch of `n`, the training loss is
//! `mean_i w_i l_i`, with weights computed from the detached `l_i` (no gradient flows through a
//! weight) and averaging 1, so that the loss keeps the scale of the unweighted mean:
//! - `drop_highest`: the `k = floor(fraction * n)` sequences of highest loss get weight 0, the
//!   others `n / (n - k)`: the loss is the mean loss of the kept sequences. This is loss
//!   truncation (Kang & Hashimoto 2020, "Improved Natural Language Generation via Loss
//!   Truncation"): the highest-loss sequences are the likeliest to be noise.
//! - `drop_lowest`: the same for the `k` lowest: training spends itself on the harder sequences,
//!   as online hard example mining does (Shrivastava et al. 2016; Loshchilov & Hutter 2015,
//!   "Online Batch Selection").
//! - `softmax`: `w = n * softmax(l / temperature)`. A positive temperature weights high-loss
//!   sequences up (the closed-form weights of KL-regularised distributionally robust
//!   optimisation); a negative one weights them down; as |temperature| grows the weights tend
//!   to 1 (no reweighting). A temperature of the order of the spread of the sequence losses
//!   (a fraction of a nat) gives clearly uneven weights.
//!
//! Ties are broken by position in the batch (a stable sort), so the weights are a pure function
//! of the losses. The rule applies to each micro-batch as one forward pass sees it: with
//! gradient accumulation to each micro-batch alone, with data parallelism to each rank's rows
//! alone (no communication before the backward pass).

use crate::validate::{check, Invalid};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReweightConfig {
    /// How the sequences of a micro-batch are weighted by their loss.
    pub rule: ReweightRule,
    /// `drop_highest`, `drop_lowest`: the share of each micro-batch's sequences given weight 0,
    /// in [0, 1), rounded down to whole sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    /// `softmax`: w_i ∝ exp(loss_i / temperature); > 0 favours high-loss sequences, < 0 low-loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReweightRule {
    DropHighest,
    DropLowest,
    Softmax,
}

impl ReweightRule {
    fn as_str(self) -> &'static str {
        match self {
            ReweightRule::DropHighest => "drop_highest",
            ReweightRule::DropLowest => "drop_lowest",
            ReweightRule::Softmax => "softmax",
        }
    }
}

impl ReweightConfig {
    /// Range checks, for micro-batches of `rows` sequences (`what` says whose rows, for the
    /// message): a drop rule must drop at least one sequence of them when its fraction is > 0.
    pub fn validate(&self, rows: i64, what: &str) -> Result<(), Invalid> {
        let rule = self.rule.as_str();
        match self.rule {
            ReweightRule::DropHighest | ReweightRule::DropLowest => {
                check(
                    self.temperature.is_none(),
                    "train.reweight.temperature",
                    format!("only rule = \"softmax\" takes a temperature (rule is {rule:?})"),
                )?;
                let Some(f) = self.fraction else {
                    return Err(Invalid {
                        key: "train.reweight.fraction".into(),
                        msg: format!(
                            "missing: rule = {rule:?} needs the fraction of sequences to drop"
                        ),
                    });
                };
                check(
                    (0.0..1.0).contains(&f),
                    "train.reweight.fraction",
                    format!("expected a fraction in [0, 1), got {f}"),
                )?;
                check(
                    f == 0.0 || dropped(f, rows) > 0,
                    "train.reweight.fraction",
                    format!(
                        "{f} of the {rows} sequences of {what} drops none (it is rounded down); \
                         raise the fraction or the batch size"
                    ),
                )
            }
            ReweightRule::Softmax => {
                check(
                    self.fraction.is_none(),
                    "train.reweight.fraction",
                    "rule = \"softmax\" takes a temperature, not a fraction",
                )?;
                let Some(t) = self.temperature else {
                    return Err(Invalid {
                        key: "train.reweight.temperature".into(),
                        msg: "missing: rule = \"softmax\" needs a temperature (> 0 favours high-loss sequences, < 0 low-loss ones)".into(),
                    });
                };
                check(
                    t != 0.0 && t.is_finite(),
                    "train.reweight.temperature",
                    format!("expected a non-zero number (> 0 favours high-loss sequences, < 0 low-loss ones), got {t}"),
                )
            }
        }
    }

    /// The weights `[n]` of the sequences whose detached losses are `losses` `[n]`: zero or
    /// more, averaging 1.
    pub fn weights(&self, losses: &Tensor) -> Tensor {
        let losses = losses.detach().to_kind(Kind::Float);
        let n = losses.size()[0];
        match self.rule {
            ReweightRule::DropHighest | ReweightRule::DropLowest => {
                let k = dropped(self.fraction.unwrap_or(0.0), n);
                let kept = Tensor::full(
                    [n],
                    n as f64 / (n - k) as f64,
                    (Kind::Float, losses.device()),
                );
                if k == 0 {
                    return kept;
                }
                let highest_first = self.rule == ReweightRule::DropHighest;
                let order = losses.argsort_stable(true, 0, highest_first);
                kept.index_fill(0, &order.narrow(0, 0, k), 0.0)
            }
            ReweightRule::Softmax => {
                let t = self.temperature.unwrap_or(1.0);
                (losses / t).softmax(0, Kind::Float) * n as f64
            }
        }
    }
}

/// Sequences dropped of `n` for `fraction` (rounded down; the small margin keeps 0.3 * 10 at 3).
fn dropped(fraction: f64, n: i64) -> i64 {
    ((fraction * n as f64 + 1e-9).floor() as i64).clamp(0, (n - 1).max(0))
}

/// The mean token loss of every sequence: logits `[b, t, v]`, targets `[b, t]` -> `[b]` (float).
/// Positions whose target is -100 are left out, as in the unweighted loss.
pub fn sequence_losses(logits: &Tensor, targets: &Tensor) -> Tensor {
    let b = logits.size()[0];
    let per_token = crate::models::transformer::Transformer::token_losses(
        logits,
        targets,
        tch::Reduction::None,
    )
    .reshape([b, -1]); // [b, t]
    let counted = targets
        .ne(-100)
        .to_kind(Kind::Float)
        .sum_dim_intlist(1, false, Kind::Float);
    per_token.sum_dim_intlist(1, false, Kind::Float) / counted.clamp_min(1.0)
}

/// The reweighting statistics of the micro-batches of one optimizer step, summed on the device
/// (read once, when the step is logged).
pub struct ReweightSums {
    /// Sum over micro-batches of the unweighted mean sequence loss.
    pub unweighted: Tensor,
    min_weight: Tensor,
    max_weight: Tensor,
    ess: Tensor,
    micro_batches: i64,
}

impl ReweightSums {
    pub fn new(device: Device) -> ReweightSums {
        let zero = || Tensor::zeros([], (Kind::Float, device));
        ReweightSums {
            unweighted: zero(),
            min_weight: zero(),
            max_weight: zero(),
            ess: zero(),
            micro_batches: 0,
        }
    }

    /// One micro-batch: its sequence losses and their weights, both `[n]`.
    pub fn add(&mut self, losses: &Tensor, weights: &Tensor) {
        let n = weights.size()[0] as f64;
        self.unweighted += losses.detach().mean(Kind::Float);
        self.min_weight += weights.min();
        self.max_weight += weights.max();
        // Kish's effective sample size over n: 1 for equal weights, (n - k) / n when k drop out.
        self.ess += weights.sum(Kind::Float).square() / (weights.square().sum(Kind::Float) * n);
        self.micro_batches += 1;
    }

    /// `reweight/unweighted_loss` (the loss without reweighting; `unweighted_loss` when it was
    /// averaged over the ranks), `reweight/min_weight`, `reweight/max_weight` and `reweight/ess`
    /// (the effective sample size as a share of the micro-batch): means over the step's
    /// micro-batches.
    pub fn metrics(&self, unweighted_loss: Option<f64>) -> Vec<(String, Value)> {
        if self.micro_batches == 0 {
            return Vec::new();
        }
        let n = self.micro_batches as f64;
        let mean = |t: &Tensor| t.double_value(&[]) / n;
        vec![
            (
                "reweight/unweighted_loss".into(),
                json!(unweighted_loss.unwrap_or_else(|| mean(&self.unweighted))),
            ),
            ("reweight/min_weight".into(), json!(mean(&self.min_weight))),
            ("reweight/max_weight".into(), json!(mean(&self.max_weight))),
            ("reweight/ess".into(), json!(mean(&self.ess))),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(
        rule: ReweightRule,
        fraction: Option<f64>,
        temperature: Option<f64>,
    ) -> ReweightConfig {
        ReweightConfig {
            rule,
            fraction,
            temperature,
        }
    }

    fn weights(c: &ReweightConfig, losses: &[f32]) -> Vec<f64> {
        Vec::<f64>::try_from(c.weights(&Tensor::from_slice(losses)).to_kind(Kind::Double))
            .expect("weights")
    }

    fn assert_close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} != {want:?}");
        }
    }

    const LOSSES: [f32; 8] = [2.0, 5.0, 1.0, 3.0, 5.0, 0.5, 4.0, 2.5];

    #[test]
    fn drop_rules_zero_the_extreme_sequences_and_renormalise_the_rest() {
        // 0.25 of 8 = 2 sequences; the rest weigh 8 / 6. Highest: 5.0 at 1 and 4 (a tie,
        // both out); lowest: 0.5 at 5 and 1.0 at 2.
        let r = 8.0 / 6.0;
        let high = config(ReweightRule::DropHighest, Some(0.25), None);
        assert_close(&weights(&high, &LOSSES), &[r, 0.0, r, r, 0.0, r, r, r]);
        let low = config(ReweightRule::DropLowest, Some(0.25), None);
        assert_close(&weights(&low, &LOSSES), &[r, r, 0.0, r, r, 0.0, r, r]);
        // The loss is then the mean of the kept sequences.
        let kept: f64 = [2.0, 1.0, 3.0, 0.5, 4.0, 2.5].iter().sum::<f64>() / 6.0;
        let w = weights(&high, &LOSSES);
        let loss: f64 = LOSSES
            .iter()
            .zip(&w)
            .map(|(l, w)| *l as f64 * w)
            .sum::<f64>()
            / 8.0;
        assert!((loss - kept).abs() < 1e-6, "{loss} vs {kept}");
        // A three-way tie at the cut: the first ones in the batch go (stable order).
        let tie = config(ReweightRule::DropHighest, Some(0.5), None);
        assert_close(&weights(&tie, &[1.0, 3.0, 3.0, 3.0]), &[2.0, 0.0, 0.0, 2.0]);
        // A fraction that rounds to no sequence leaves every weight at 1.
        let none = config(ReweightRule::DropHighest, Some(0.0), None);
        assert_close(&weights(&none, &LOSSES), &[1.0; 8]);
        assert_eq!(
            (dropped(0.3, 10), dropped(0.29, 100), dropped(0.1, 4)),
            (3, 29, 0)
        );
    }

    #[test]
    fn softmax_weights_follow_the_explicit_formula() {
        for t in [0.7, -0.7, 2.0, -50.0] {
            let c = config(ReweightRule::Softmax, None, Some(t));
            let e: Vec<f64> = LOSSES.iter().map(|l| (*l as f64 / t).exp()).collect();
            let z: f64 = e.iter().sum();
            let want: Vec<f64> = e.iter().map(|x| 8.0 * x / z).collect();
            let got = weights(&c, &LOSSES);
            assert_close(&got, &want);
            assert!((got.iter().sum::<f64>() - 8.0).abs() < 1e-5);
            // t > 0 puts the most weight on the highest loss, t < 0 on the lowest.
            let argmax = (0..8).max_by(|&a, &b| got[a].total_cmp(&got[b])).unwrap();
            assert_eq!(LOSSES[argmax], if t > 0.0 { 5.0 } else { 0.5 }, "t = {t}");
        }
    }

    #[test]
    fn sequence_losses_are_the_per_row_cross_entropy() {
        tch::manual_seed(0);
        let logits = Tensor::randn([3, 5, 7], (Kind::Float, Device::Cpu));
        let targets =
            Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 0, -100]).view([3, 5]);
        let got =
            Vec::<f64>::try_from(sequence_losses(&logits, &targets).to_kind(Kind::Double)).unwrap();
        for (i, got) in got.iter().enumerate() {
            // Row i alone through the mean cross-entropy (which leaves out -100 too).
            let want = logits
                .get(i as i64)
                .cross_entropy_loss::<Tensor>(
                    &targets.get(i as i64),
                    None,
                    tch::Reduction::Mean,
                    -100,
                    0.0,
                )
                .double_value(&[]);
            assert!((got - want).abs() < 1e-6, "row {i}: {got} vs {want}");
        }
        // Their mean is the batch's mean loss when every row counts all its positions.
        let full = targets.narrow(0, 0, 2);
        let mean = sequence_losses(&logits.narrow(0, 0, 2), &full).mean(Kind::Float);
        let batch = logits
            .narrow(0, 0, 2)
            .reshape([-1, 7])
            .cross_entropy_loss::<Tensor>(
                &full.reshape([-1]),
                None,
                tch::Reduction::Mean,
                -100,
                0.0,
            );
        assert!((mean.double_value(&[]) - batch.double_value(&[])).abs() < 1e-6);
    }

    #[test]
    fn bad_settings_name_the_key() {
        let err = |c: ReweightConfig| c.validate(8, "a micro-batch").unwrap_err();
        let e = err(config(ReweightRule::DropHighest, Some(1.0), None));
        assert_eq!(e.key, "train.reweight.fraction");
        assert!(e.msg.contains("[0, 1)"), "{}", e.msg);
        assert_eq!(
            err(config(ReweightRule::DropLowest, Some(-0.1), None)).key,
            "train.reweight.fraction"
        );
        assert_eq!(
            err(config(ReweightRule::DropLowest, None, None)).key,
            "train.reweight.fraction"
        );
        let e = err(config(ReweightRule::DropHighest, Some(0.1), None));
        assert!(e.msg.contains("drops none"), "{}", e.msg);
        let e = err(config(ReweightRule::Softmax, None, Some(0.0)));
        assert_eq!(e.key, "train.reweight.temperature");
        assert!(e.msg.contains("non-zero"), "{}", e.msg);
        assert_eq!(
            err(config(ReweightRule::Softmax, None, None)).key,
            "train.reweight.temperature"
        );
        assert_eq!(
            err(config(ReweightRule::Softmax, Some(0.1), Some(1.0))).key,
            "train.reweight.fraction"
        );
        assert_eq!(
            err(config(ReweightRule::DropHighest, Some(0.5), Some(1.0))).key,
            "train.reweight.temperature"
        );
        assert!(config(ReweightRule::DropHighest, Some(0.25), None)
            .validate(8, "x")
            .is_ok());
        assert!(config(ReweightRule::Softmax, None, Some(-0.5))
            .validate(8, "x")
            .is_ok());
    }
}
