//! `run.shard = "optimizer"` (ZeRO stage 1 on whole tensors, Rajbhandari et al. 2020): each
//! trainable parameter's optimizer state lives on one rank, its owner. The gradients are
//! averaged whole as without sharding (`dist.rs`); each rank updates only the parameters it owns
//! and then every owner broadcasts its updated parameters, so that all ranks hold the same
//! weights again, bitwise those of an unsharded run (the owner computes the same update every
//! rank would). A checkpoint holds one optimizer file per rank and an index
//! (`checkpoint/optimizer_shards.rs`), from which it resumes at any world size and in any shard
//! mode.
//!
//! `run.shard = "gradients"` (ZeRO stage 2 on whole tensors) goes one step further: each
//! gradient is reduced onto its owner only (`dist.rs`, `OverlappedGrads` with owners) and the
//! other ranks drop theirs, so a rank holds about 1/world of the gradients after the backward
//! pass; the norm for clipping is formed from the owners' per-tensor norms
//! (`Owners::clip_grad_norm`).
//!
//! Owners are contiguous runs of parameters in registration order, balanced by element count:
//! parameter `i` (starting at element `s`, of `n` elements, of `N` in all) belongs to rank
//! `floor((s + n/2) * world / N)`.

use crate::dist::DataParallel;
use crate::error::{Error, Result};
use crate::models::params::ParamStore;
use tch::{Kind, Tensor};

/// Which rank owns each trainable parameter.
pub struct Owners {
    rank: usize,
    /// The owning rank of each trainable parameter, in registration order.
    owner: Vec<usize>,
    /// The names of the parameters this rank owns.
    mine: std::collections::HashSet<String>,
    /// Every owner's parameters of one dtype, in registration order: what it broadcasts after
    /// each step (one flat buffer each).
    groups: Vec<(usize, Vec<Tensor>)>,
}

impl Owners {
    /// Deals the trainable parameters of `store` out to `world` ranks. A rank left without any
    /// parameter is refused in one line (fewer parameter tensors than ranks).
    pub fn deal(store: &ParamStore, rank: usize, world: usize) -> Result<Owners> {
        let total: i64 = store
            .trainable()
            .map(|p| p.tensor.numel() as i64)
            .sum::<i64>()
            .max(1);
        let mut start = 0i64;
        let owned: Vec<(usize, &str, &Tensor)> = store
            .trainable()
            .map(|p| {
                let n = p.tensor.numel() as i64;
                let mid = (start + n / 2) as i128;
                start += n;
                let owner = ((mid * world as i128) / total as i128).min(world as i128 - 1);
                (owner as usize, p.name.as_str(), &p.tensor)
            })
            .collect();
        let mut groups: Vec<(usize, Vec<Tensor>)> = Vec::new();
        for r in 0..world {
            let theirs: Vec<&Tensor> = owned
                .iter()
                .filter(|(o, _, _)| *o == r)
                .map(|(_, _, t)| *t)
                .collect();
            if theirs.is_empty() {
                return Err(Error::Recipe(format!(
                    "run.shard: {} trainable tensors cannot give each of {world} ranks a share \
                     (rank {r} would own none); use fewer processes or run.shard = \"none\"",
                    owned.len()
                )));
            }
            for kind in kinds(&theirs) {
                let part = theirs.iter().filter(|t| t.kind() == kind);
                groups.push((r, part.map(|t| t.shallow_clone()).collect()));
            }
        }
        let mine = owned
            .iter()
            .filter(|(o, _, _)| *o == rank)
            .map(|(_, n, _)| n.to_string())
            .collect();
        let owner = owned.iter().map(|(o, _, _)| *o).collect();
        Ok(Owners {
            rank,
            owner,
            mine,
            groups,
        })
    }

    /// The owning rank of each trainable parameter, in registration order (for
    /// `OverlappedGrads`, which reduces each gradient onto its owner).
    pub fn owner_of_each(&self) -> Vec<usize> {
        self.owner.clone()
    }

    /// Whether this rank owns the parameter `name`.
    pub fn owns(&self, name: &str) -> bool {
        self.mine.contains(name)
    }

    /// After this rank updated its own parameters: each owner's updated parameters broadcast
    /// to all ranks, one flat buffer per owner and dtype.
    pub fn broadcast_updates(&self, dp: &DataParallel) -> Result<()> {
        for (root, tensors) in &self.groups {
            dp.broadcast_flat(tensors, *root, "broadcasting the updated parameters")?;
        }
        Ok(())
    }
}

/// `run.shard = "gradients"`, the gradients after their reduction onto the owners.
impl Owners {
    /// Drops the gradients of the parameters this rank does not own (those the overlapped
    /// reduction did not already drop: MoE, distillation and parameters left out of it).
    pub fn drop_others_grads(&self, store: &ParamStore) -> Result<()> {
        let theirs: Vec<&Tensor> = store
            .trainable()
            .zip(&self.owner)
            .filter(|(_, &o)| o != self.rank)
            .map(|(p, _)| &p.tensor)
            .collect();
        torch_ext::grads_to_none(&theirs).map_err(Error::Torch)
    }

    /// The global gradient norm (and with `max_norm`, this rank's gradients clipped by it) when
    /// each rank holds only its own parameters' gradients: the owners' per-tensor norms are
    /// summed into one list in registration order (each entry from one rank, the others adding
    /// zero: exact), from which every rank forms the norm as an unsharded run does, bitwise.
    pub fn clip_grad_norm(
        &self,
        dp: &DataParallel,
        store: &ParamStore,
        max_norm: Option<f64>,
    ) -> Result<f64> {
        let trainable: Vec<&Tensor> = store.trainable().map(|p| &p.tensor).collect();
        let mine: Vec<usize> = (0..trainable.len())
            .filter(|&i| self.owner[i] == self.rank && trainable[i].grad().defined())
            .collect();
        let grads: Vec<Tensor> = mine.iter().map(|&i| trainable[i].grad()).collect();
        let refs: Vec<&Tensor> = grads.iter().collect();
        let norms = torch_ext::grad_norms(&refs).map_err(Error::Torch)?;
        // Per parameter: whether it has a gradient, and its norm.
        let mut table = vec![0.0f64; 2 * trainable.len()];
        for (&i, &n) in mine.iter().zip(&norms) {
            table[2 * i] = 1.0;
            table[2 * i + 1] = f64::from(n);
        }
        dp.sum(&mut table)?;
        let all: Vec<f32> = table
            .chunks(2)
            .filter(|c| c[0] > 0.0)
            .map(|c| c[1] as f32)
            .collect();
        tch::no_grad(|| torch_ext::clip_with_norms(&refs, &all, max_norm))
            .map_err(|e| Error::Torch(format!("clip_grad_norm: {e}")))
    }
}

/// The distinct dtypes of `tensors`, in order of first appearance.
fn kinds(tensors: &[&Tensor]) -> Vec<Kind> {
    let mut out = Vec::new();
    for t in tensors {
        if !out.contains(&t.kind()) {
            out.push(t.kind());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn owners_are_contiguous_balanced_and_cover_every_rank() {
        let mut store = ParamStore::new(Device::Cpu);
        for (i, n) in [100, 10, 10, 80, 50, 50].iter().enumerate() {
            let _ = store.zeros(&format!("p{i}"), &[*n]);
        }
        let owner_of = |o: &Owners| -> Vec<usize> {
            let mut out = Vec::new();
            for (r, tensors) in &o.groups {
                out.extend(std::iter::repeat_n(*r, tensors.len()));
            }
            out
        };
        let o = Owners::deal(&store, 0, 2).expect("two ranks");
        assert_eq!(owner_of(&o), vec![0, 0, 0, 1, 1, 1]);
        assert!(o.owns("p2") && !o.owns("p3"));
        let o = Owners::deal(&store, 3, 4).expect("four ranks");
        let owner = owner_of(&o);
        assert_eq!(owner.len(), 6);
        assert!(owner.windows(2).all(|w| w[0] <= w[1]), "{owner:?}");
        assert!(o.owns("p5") && !o.owns("p0"));
        let e = Owners::deal(&store, 0, 7)
            .err()
            .expect("too many ranks")
            .to_string();
        assert!(e.contains("run.shard") && e.contains("7 ranks"), "{e}");
    }
}
