//! Magnitude pruning: zero the weights of smallest |w|, ranked over all prunable weights
//! together (global) or within each tensor (per layer). Exactly `round(sparsity * n)` weights are
//! pruned: ties at the threshold are broken by position (a stable sort), so counts are exact
//! even when many weights are already zero.

use super::PruneScope;
use crate::error::{Error, Result};
use crate::models::params::ParamStore;
use tch::{Kind, Tensor};

fn torch_err(e: tch::TchError) -> Error {
    Error::Torch(format!("magnitude pruning: {e}"))
}

/// A bool mask of `scores`' shape, true for the `k` smallest scores (ties by position).
pub fn smallest_k(scores: &Tensor, k: i64) -> Result<Tensor> {
    let flat = scores.f_flatten(0, -1).map_err(torch_err)?;
    let n = flat.size()[0];
    let k = k.clamp(0, n);
    let (_, order) = flat.f_sort_stable(true, 0, false).map_err(torch_err)?;
    let mask = Tensor::zeros([n], (Kind::Bool, flat.device()));
    let mask = mask
        .f_index_fill(0, &order.narrow(0, 0, k), 1)
        .map_err(torch_err)?;
    mask.f_view(scores.size().as_slice()).map_err(torch_err)
}

/// Pruned-weight masks (true = pruned) for the tensors `names` at `sparsity`, ranked by |w|.
pub fn masks(
    store: &ParamStore,
    names: &[String],
    sparsity: f64,
    scope: PruneScope,
) -> Result<Vec<(String, Tensor)>> {
    tch::no_grad(|| {
        let weights: Vec<(String, Tensor)> = names
            .iter()
            .map(|n| {
                store
                    .get(n)
                    .map(|t| (n.clone(), t.abs().to_kind(Kind::Float)))
                    .ok_or_else(|| {
                        Error::Recipe(format!("prune: {n:?} is not a tensor of this model"))
                    })
            })
            .collect::<Result<_>>()?;
        match scope {
            PruneScope::Layer => weights
                .into_iter()
                .map(|(n, w)| {
                    let k = (sparsity * w.numel() as f64).round() as i64;
                    Ok((n, smallest_k(&w, k)?))
                })
                .collect(),
            PruneScope::Global => {
                let flat: Vec<Tensor> = weights.iter().map(|(_, w)| w.flatten(0, -1)).collect();
                let all = Tensor::cat(&flat, 0);
                let k = (sparsity * all.numel() as f64).round() as i64;
                let mask = smallest_k(&all, k)?;
                let mut offset = 0;
                Ok(weights
                    .into_iter()
                    .map(|(n, w)| {
                        let len = w.numel() as i64;
                        let m = mask.narrow(0, offset, len).view(w.size().as_slice());
                        offset += len;
                        (n, m)
                    })
                    .collect())
            }
        }
    })
}

/// Prunes `names` of `store` to `sparsity` by magnitude and installs the masks.
pub fn prune(
    store: &mut ParamStore,
    names: &[String],
    sparsity: f64,
    scope: PruneScope,
) -> Result<()> {
    for (name, mask) in masks(store, names, sparsity, scope)? {
        store.set_mask(&name, mask)?;
    }
    Ok(())
}

/// For GSM's log: per tensor, a bool mask of the weights a global magnitude cut keeping
/// `density` of them would keep.
pub fn survivors(
    store: &ParamStore,
    names: &[String],
    density: f64,
) -> Result<Vec<(String, Tensor)>> {
    Ok(masks(store, names, 1.0 - density, PruneScope::Global)?
        .into_iter()
        .map(|(n, m)| (n, m.logical_not()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn store() -> ParamStore {
        let mut s = ParamStore::new(Device::Cpu);
        // Layer a holds the small weights, layer b the large ones.
        let _ = s.add(
            "a.weight",
            Tensor::from_slice(&[0.1f32, -0.2, 0.3, -0.4]).view([2, 2]),
        );
        let _ = s.add(
            "b.weight",
            Tensor::from_slice(&[1.0f32, -2.0, 3.0, -4.0, 0.05, 5.0]).view([2, 3]),
        );
        s
    }

    fn values(s: &ParamStore, n: &str) -> Vec<f32> {
        Vec::<f32>::try_from(s.get(n).unwrap().flatten(0, -1)).unwrap()
    }

    #[test]
    fn global_ranking_sets_per_layer_sparsity() {
        let mut s = store();
        let names = vec!["a.weight".to_string(), "b.weight".to_string()];
        // 10 weights, 50%: the five smallest |w| are 0.05, 0.1, 0.2, 0.3, 0.4.
        prune(&mut s, &names, 0.5, PruneScope::Global).unwrap();
        assert_eq!(values(&s, "a.weight"), vec![0.0; 4]);
        assert_eq!(values(&s, "b.weight"), vec![1.0, -2.0, 3.0, -4.0, 0.0, 5.0]);
    }

    #[test]
    fn per_layer_prunes_each_tensor_alike() {
        let mut s = store();
        let names = vec!["a.weight".to_string(), "b.weight".to_string()];
        prune(&mut s, &names, 0.5, PruneScope::Layer).unwrap();
        assert_eq!(values(&s, "a.weight"), vec![0.0, 0.0, 0.3, -0.4]);
        assert_eq!(values(&s, "b.weight"), vec![0.0, -0.0, 3.0, -4.0, 0.0, 5.0]);
    }

    #[test]
    fn masks_keep_pruned_weights_at_zero_after_updates() {
        let mut s = store();
        let names = vec!["a.weight".to_string(), "b.weight".to_string()];
        prune(&mut s, &names, 0.5, PruneScope::Global).unwrap();
        // An update touches every weight; applying the masks restores the zeros.
        tch::no_grad(|| {
            let _ = s
                .get("b.weight")
                .unwrap()
                .shallow_clone()
                .g_add_scalar_(1.0);
        });
        s.apply_masks();
        assert_eq!(values(&s, "b.weight"), vec![2.0, -1.0, 4.0, -3.0, 0.0, 6.0]);
    }

    #[test]
    fn exact_counts_with_ties() {
        let t = Tensor::zeros([10], (Kind::Float, Device::Cpu));
        let m = smallest_k(&t, 3).unwrap();
        assert_eq!(m.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]), 3);
    }
}
