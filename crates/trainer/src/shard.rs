//! `run.shard = "optimizer"` (ZeRO stage 1 on whole tensors, Rajbhandari et al. 2020): each
//! trainable parameter's optimizer state lives on one rank, its owner. The gradients are
//! averaged whole as without sharding (`dist.rs`); each rank updates only the parameters it owns
//! and then every owner broadcasts its updated parameters, so that all ranks hold the same
//! weights again, bitwise those of an unsharded run (the owner computes the same update every
//! rank would). A checkpoint gathers every rank's state on rank 0 and is written whole, as an
//! unsharded run writes it, so that it resumes at any world size and in any shard mode.
//!
//! Owners are contiguous runs of parameters in registration order, balanced by element count:
//! parameter `i` (starting at element `s`, of `n` elements, of `N` in all) belongs to rank
//! `floor((s + n/2) * world / N)`.

use crate::dist::DataParallel;
use crate::error::{Error, Result};
use crate::models::params::ParamStore;
use tch::{Device, Kind, Tensor};

/// Which rank owns each trainable parameter, by name, in the store's order.
pub struct Owners {
    pub rank: usize,
    /// (name, owner) of every trainable parameter, in registration order.
    owners: Vec<(String, usize)>,
}

impl Owners {
    /// Deals the trainable parameters of `store` out to `world` ranks. A rank left without any
    /// parameter is refused in one line (fewer parameter tensors than ranks).
    pub fn deal(store: &ParamStore, rank: usize, world: usize) -> Result<Owners> {
        let sizes: Vec<(String, i64)> = store
            .trainable()
            .map(|p| (p.name.clone(), p.tensor.numel() as i64))
            .collect();
        let total: i64 = sizes.iter().map(|(_, n)| n).sum::<i64>().max(1);
        let mut start = 0i64;
        let owners: Vec<(String, usize)> = sizes
            .into_iter()
            .map(|(name, n)| {
                let mid = (start + n / 2) as i128;
                start += n;
                let owner = ((mid * world as i128) / total as i128).min(world as i128 - 1);
                (name, owner as usize)
            })
            .collect();
        for r in 0..world {
            if !owners.iter().any(|(_, o)| *o == r) {
                return Err(Error::Recipe(format!(
                    "run.shard: {} trainable tensors cannot give each of {world} ranks a share \
                     (rank {r} would own none); use fewer processes or run.shard = \"none\"",
                    owners.len()
                )));
            }
        }
        Ok(Owners { rank, owners })
    }

    /// Whether this rank owns the parameter `name`.
    pub fn owns(&self, name: &str) -> bool {
        self.owners
            .iter()
            .any(|(n, o)| n == name && *o == self.rank)
    }

    /// After this rank updated its own parameters: each owner's updated parameters broadcast
    /// to all ranks, one flat buffer per owner and dtype.
    pub fn broadcast_updates(&self, dp: &DataParallel, store: &ParamStore) -> Result<()> {
        let world = self.owners.iter().map(|(_, o)| o + 1).max().unwrap_or(1);
        for root in 0..world {
            let mine: Vec<Tensor> = self
                .owners
                .iter()
                .filter(|(_, o)| *o == root)
                .filter_map(|(n, _)| store.get(n).map(Tensor::shallow_clone))
                .collect();
            for kind in kinds(&mine) {
                let part: Vec<&Tensor> = mine.iter().filter(|t| t.kind() == kind).collect();
                tch::no_grad(|| -> Result<()> {
                    let flat =
                        Tensor::cat(&part.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0);
                    dp.broadcast_from(&[&flat], root, "broadcasting the updated parameters")?;
                    let mut at = 0;
                    for t in &part {
                        let n = t.numel() as i64;
                        t.shallow_clone().copy_(&flat.narrow(0, at, n).view_as(t));
                        at += n;
                    }
                    Ok(())
                })?;
            }
        }
        Ok(())
    }
}

/// The distinct dtypes of `tensors`, in order of first appearance.
fn kinds(tensors: &[Tensor]) -> Vec<Kind> {
    let mut out = Vec::new();
    for t in tensors {
        if !out.contains(&t.kind()) {
            out.push(t.kind());
        }
    }
    out
}

/// Every rank's named optimizer state on rank 0 (in rank order; a name several ranks hold, the
/// step counter, taken once), for a checkpoint written whole; `None` on the other ranks. Each
/// rank in turn broadcasts the names, dtypes and shapes of its tensors, then the tensors.
pub fn gather_to_main(
    dp: &DataParallel,
    own: Vec<(String, Tensor)>,
) -> Result<Option<Vec<(String, Tensor)>>> {
    let device = dp.device();
    let mut all: Vec<(String, Tensor)> = Vec::new();
    for root in 0..dp.world.size {
        let meta = if root == dp.world.rank {
            let list: Vec<(String, String, Vec<i64>)> = own
                .iter()
                .map(|(n, t)| (n.clone(), format!("{:?}", t.kind()), t.size()))
                .collect();
            serde_json::to_vec(&list).unwrap_or_default()
        } else {
            Vec::new()
        };
        let len = Tensor::from_slice(&[meta.len() as i64]).to_device(device);
        dp.broadcast_from(&[&len], root, "gathering the optimizer state")?;
        let len = len.int64_value(&[0]);
        let bytes = if root == dp.world.rank {
            Tensor::from_slice(&meta).to_device(device)
        } else {
            Tensor::zeros([len], (Kind::Uint8, device))
        };
        dp.broadcast_from(&[&bytes], root, "gathering the optimizer state")?;
        let bytes = Vec::<u8>::try_from(bytes.to_device(Device::Cpu))
            .map_err(|e| Error::Torch(e.to_string()))?;
        let list: Vec<(String, String, Vec<i64>)> = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Torch(format!("gathering the optimizer state: {e}")))?;
        let tensors: Vec<Tensor> = if root == dp.world.rank {
            own.iter().map(|(_, t)| t.shallow_clone()).collect()
        } else {
            list.iter()
                .map(|(_, kind, shape)| {
                    Ok(Tensor::zeros(shape.as_slice(), (kind_of(kind)?, device)))
                })
                .collect::<Result<_>>()?
        };
        let refs: Vec<&Tensor> = tensors.iter().collect();
        if !refs.is_empty() {
            dp.broadcast_from(&refs, root, "gathering the optimizer state")?;
        }
        if dp.world.is_main() {
            for ((name, _, _), t) in list.into_iter().zip(tensors) {
                if !all.iter().any(|(n, _)| *n == name) {
                    all.push((name, t.to_device(Device::Cpu)));
                }
            }
        }
    }
    Ok(dp.world.is_main().then_some(all))
}

/// A dtype from its `{:?}` name (those optimizer state is kept in).
fn kind_of(name: &str) -> Result<Kind> {
    Ok(match name {
        "Float" => Kind::Float,
        "Double" => Kind::Double,
        "Half" => Kind::Half,
        "BFloat16" => Kind::BFloat16,
        "Int64" => Kind::Int64,
        "Int" => Kind::Int,
        "Int16" => Kind::Int16,
        "Int8" => Kind::Int8,
        "Uint8" => Kind::Uint8,
        "Bool" => Kind::Bool,
        other => {
            return Err(Error::Torch(format!(
                "gathering the optimizer state: unexpected dtype {other}"
            )))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_contiguous_balanced_and_cover_every_rank() {
        let mut store = ParamStore::new(Device::Cpu);
        for (i, n) in [100, 10, 10, 80, 50, 50].iter().enumerate() {
            let _ = store.zeros(&format!("p{i}"), &[*n]);
        }
        let o = Owners::deal(&store, 0, 2).expect("two ranks");
        let owner: Vec<usize> = o.owners.iter().map(|(_, r)| *r).collect();
        assert_eq!(owner, vec![0, 0, 0, 1, 1, 1]);
        assert!(o.owns("p2") && !o.owns("p3"));
        let o = Owners::deal(&store, 3, 4).expect("four ranks");
        let owner: Vec<usize> = o.owners.iter().map(|(_, r)| *r).collect();
        assert!(owner.windows(2).all(|w| w[0] <= w[1]), "{owner:?}");
        let e = Owners::deal(&store, 0, 7)
            .err()
            .expect("too many ranks")
            .to_string();
        assert!(e.contains("run.shard") && e.contains("7 ranks"), "{e}");
    }
}
