//! Wanda (Sun et al., 2024, "A Simple and Effective Pruning Approach for Large Language
//! Models"): one-shot pruning of a transformer's linear layers without retraining. A weight's
//! score is `|W_ij| * ||X_j||_2`, its magnitude times the L2 norm of its input feature over a few
//! calibration batches, and weights are compared within each output row (per-output groups):
//!
//! - unstructured: each row loses its `sparsity` fraction of lowest scores;
//! - N:M: in every run of M consecutive inputs of a row, only the N highest scores stay
//!   (2:4 is the pattern sparse tensor cores run).
//!
//! As in the reference implementation (locuslab/wanda, `prune_wanda`), blocks are pruned in
//! order and the calibration inputs of block `b` flow through the already pruned blocks before
//! it; all projections of one block are scored from the same pass. Here each block's pass is a
//! forward of the whole model on the calibration batches (simple; it costs one forward per block).
//! MoE experts are not pruned.

use crate::error::{Error, Result};
use crate::models::params::{select, Before, ParamStore};
use crate::models::transformer::{Linear, Transformer};
use std::collections::HashSet;
use tch::{Kind, Tensor};

/// What each output row keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sparsity {
    /// Fraction of each row pruned, in (0, 1).
    Unstructured(f64),
    /// Keep `n` of every `m` consecutive weights in a row.
    NM { n: i64, m: i64 },
}

impl Sparsity {
    /// Parses `N:M` (e.g. "2:4"); `key` names the flag in errors.
    pub fn parse_nm(text: &str, key: &str) -> Result<Sparsity> {
        let err = |msg: String| Error::Recipe(format!("{key}: {msg}"));
        let (n, m) = text
            .split_once(':')
            .ok_or_else(|| err(format!("expected N:M such as 2:4, got {text:?}")))?;
        let n: i64 = n
            .trim()
            .parse()
            .map_err(|_| err(format!("expected N:M such as 2:4, got {text:?}")))?;
        let m: i64 = m
            .trim()
            .parse()
            .map_err(|_| err(format!("expected N:M such as 2:4, got {text:?}")))?;
        if n < 1 || m < 2 || n >= m {
            return Err(err(format!(
                "expected 1 <= N < M (N weights kept of every M), got {n}:{m}"
            )));
        }
        Ok(Sparsity::NM { n, m })
    }

    /// The fraction of weights pruned.
    pub fn fraction(&self) -> f64 {
        match *self {
            Sparsity::Unstructured(s) => s,
            Sparsity::NM { n, m } => 1.0 - n as f64 / m as f64,
        }
    }
}

/// The pruned-weight mask (true = pruned) of a weight `[out, in]` from its scores `[out, in]`.
pub fn row_mask(scores: &Tensor, sparsity: Sparsity) -> Result<Tensor> {
    let torch = |e: tch::TchError| Error::Torch(format!("wanda: {e}"));
    let (rows, cols) = scores.size2().map_err(torch)?;
    match sparsity {
        Sparsity::Unstructured(s) => {
            let k = (cols as f64 * s) as i64; // as the reference: int(in * ratio)
            let (_, order) = scores.f_sort_stable(true, 1, false).map_err(torch)?;
            let mask = Tensor::zeros([rows, cols], (Kind::Bool, scores.device()));
            mask.f_scatter_value(1, &order.narrow(1, 0, k), 1)
                .map_err(torch)
        }
        Sparsity::NM { n, m } => {
            if cols % m != 0 {
                return Err(Error::Recipe(format!(
                    "--nm: {n}:{m} needs the input width to be a multiple of {m}, a weight has {cols}"
                )));
            }
            // Groups of m consecutive inputs: prune the m - n lowest of each.
            let groups = scores.f_reshape([rows, cols / m, m]).map_err(torch)?;
            let (_, order) = groups.f_sort_stable(true, 2, false).map_err(torch)?;
            let mask = Tensor::zeros([rows, cols / m, m], (Kind::Bool, scores.device()));
            let mask = mask
                .f_scatter_value(2, &order.narrow(2, 0, m - n), 1)
                .map_err(torch)?;
            mask.f_reshape([rows, cols]).map_err(torch)
        }
    }
}

/// Wanda scores `|W| * sqrt(sum_tokens x^2)` of a projection, laid out `[out, in]`.
pub fn scores(weight_out_in: &Tensor, input_sq: &Tensor) -> Tensor {
    weight_out_in.to_kind(Kind::Float).abs() * input_sq.sqrt().unsqueeze(0)
}

/// Every pattern must select a projection of the transformer blocks.
pub fn check_patterns(model: &Transformer, patterns: &[String]) -> Result<()> {
    selected_weights(model, patterns).map(|_| ())
}

/// The weight names (`{path}.weight`) of the projections that `patterns` select by the name rule
/// of `models::params` (all projections when empty). `--prunable` used to match substrings of
/// the module path: `select` refuses a pattern whose meaning changed.
pub fn selected_weights(model: &Transformer, patterns: &[String]) -> Result<HashSet<String>> {
    let weights: Vec<String> = model
        .projections()
        .iter()
        .map(|l| format!("{}.weight", l.path))
        .collect();
    if patterns.is_empty() {
        return Ok(weights.into_iter().collect());
    }
    let candidates: Vec<&str> = weights.iter().map(String::as_str).collect();
    let chosen = select(
        &candidates,
        patterns,
        "--prunable",
        "linear layer of the transformer blocks",
        Before::Substring,
    )?;
    Ok(chosen.into_iter().map(str::to_string).collect())
}

/// Prunes the projections of `model` whose paths match `patterns` (all when empty) with Wanda,
/// using `calibration` token batches (`[b, t]` ids on the model's device). Installs the masks in
/// `store`; returns the names of the pruned weights.
pub fn prune(
    model: &Transformer,
    store: &mut ParamStore,
    calibration: &[Tensor],
    sparsity: Sparsity,
    patterns: &[String],
) -> Result<Vec<String>> {
    if calibration.is_empty() {
        return Err(Error::Recipe("--calib: no calibration batch".into()));
    }
    let chosen = selected_weights(model, patterns)?;
    let selected = |l: &Linear| chosen.contains(&format!("{}.weight", l.path));
    let mut pruned = Vec::new();
    for block in model.block_projections() {
        let layers: Vec<&Linear> = block.into_iter().filter(|l| selected(l)).collect();
        if layers.is_empty() {
            continue;
        }
        for l in &layers {
            let (fan_in, _) = l.in_out();
            *l.input_sq.borrow_mut() =
                Some(Tensor::zeros([fan_in], (Kind::Float, l.weight.device())));
        }
        tch::no_grad(|| {
            for batch in calibration {
                let _ = model.forward(batch, false);
            }
        });
        let mut masks = Vec::new();
        for l in &layers {
            let input_sq = l.input_sq.borrow_mut().take().expect("set above");
            let w = if l.transposed {
                l.weight.tr()
            } else {
                l.weight.shallow_clone()
            };
            let mask = row_mask(&scores(&w, &input_sq), sparsity)?;
            let mask = if l.transposed {
                mask.tr().contiguous()
            } else {
                mask
            };
            masks.push((format!("{}.weight", l.path), mask));
        }
        // Pruned only now, so that every projection of the block saw the same inputs.
        for (name, mask) in masks {
            store.set_mask(&name, mask)?;
            pruned.push(name);
        }
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unstructured_prunes_the_lowest_scores_of_each_row() {
        let s = Tensor::from_slice(&[4.0f32, 1.0, 3.0, 2.0, 0.5, 0.7, 0.1, 0.9]).view([2, 4]);
        let m = row_mask(&s, Sparsity::Unstructured(0.5)).unwrap();
        let got = Vec::<bool>::try_from(m.flatten(0, -1)).unwrap();
        assert_eq!(
            got,
            vec![false, true, false, true, true, false, true, false]
        );
    }

    #[test]
    fn two_four_keeps_the_two_highest_of_every_four() {
        let s = Tensor::from_slice(&[4.0f32, 1.0, 3.0, 2.0, 0.5, 0.7, 0.1, 0.9]).view([1, 8]);
        let m = row_mask(&s, Sparsity::NM { n: 2, m: 4 }).unwrap();
        let got = Vec::<bool>::try_from(m.flatten(0, -1)).unwrap();
        assert_eq!(
            got,
            vec![false, true, false, true, true, false, true, false]
        );
        let m = row_mask(&s, Sparsity::NM { n: 1, m: 4 }).unwrap();
        let kept: i64 = m
            .logical_not()
            .to_kind(Kind::Int64)
            .sum(Kind::Int64)
            .int64_value(&[]);
        assert_eq!(kept, 2);
    }

    #[test]
    fn scores_weigh_magnitude_by_input_norm() {
        // The large weight on a silent input loses to a small weight on a loud one.
        let w = Tensor::from_slice(&[10.0f32, 1.0]).view([1, 2]);
        let x_sq = Tensor::from_slice(&[0.01f32, 400.0]);
        let m = row_mask(&scores(&w, &x_sq), Sparsity::Unstructured(0.5)).unwrap();
        assert_eq!(
            Vec::<bool>::try_from(m.flatten(0, -1)).unwrap(),
            vec![true, false]
        );
    }

    #[test]
    fn nm_errors_name_the_flag() {
        for bad in ["4:4", "5:4", "0:4", "2", "a:b"] {
            let e = Sparsity::parse_nm(bad, "--nm").unwrap_err().to_string();
            assert!(e.contains("--nm"), "{e}");
        }
        assert_eq!(
            Sparsity::parse_nm("2:4", "--nm").unwrap(),
            Sparsity::NM { n: 2, m: 4 }
        );
    }
}
