//! `run.shard_layout = "flat"` with `run.shard = "optimizer"` or `"gradients"`: ZeRO stages 1
//! and 2 as Megatron's distributed optimizer lays them out (`param_and_grad_buffer.py`,
//! `distrib_optimizer.py`). The trainable parameters, in reverse registration order (the order
//! in which the backward pass completes their gradients), are grouped into the gradient buckets
//! of `run.bucket_mb`; each bucket, flattened and padded with zeros to a multiple of the world
//! size, is cut into equal slices, and rank r owns slice r of every bucket. Its slice of a
//! bucket covers pieces of one or more parameters (`Slice`: a parameter, an element offset and
//! a length), for which it alone keeps optimizer state and fp32 master weights.
//!
//! A step: each bucket's gradients are reduce-scattered into the owners' slices as the
//! backward pass completes them (`dist::OverlappedGrads` with `ScatterInto`; with `"optimizer"`
//! in place, in a whole buffer per bucket kept from step to step); the global norm
//! for clipping is formed from every rank's per-slice norms (`clip_grad_norm`); each rank
//! updates its slices in place (`optim::Slice`); then every bucket's updated slices are
//! all-gathered into every rank's parameters (`gather_updates`). The checkpoint holds each
//! rank's state as named slices (`optim::slices`), which resume under any world size, layout
//! and shard mode.

use crate::dist::{unpack, DataParallel, ScatterInto};
use crate::error::{Error, Result};
use crate::models::params::ParamStore;
use crate::optim::Slice;
use tch::{Kind, Tensor};

/// This rank's view of the flat layout: the buckets, and the slices every rank owns in them.
pub struct FlatShards {
    rank: usize,
    world: usize,
    /// The trainable parameters in reverse registration order, with their names.
    params: Vec<(String, Tensor)>,
    buckets: Vec<Bucket>,
    /// Every rank's slices, in (bucket, rank, parameter) order, the same list on every rank.
    pieces: Vec<Piece>,
}

/// One bucket of the layout.
struct Bucket {
    /// Indices into `FlatShards::params`, in the bucket's order.
    members: Vec<usize>,
    /// Elements of the members together (before padding).
    len: i64,
    /// Elements of each rank's slice: `len` rounded up to a multiple of the world size, divided
    /// by it.
    slice_len: i64,
    /// `run.shard = "optimizer"`: the whole padded bucket, kept from step to step; the
    /// gradients are packed into it and reduce-scattered in place.
    whole: Option<Tensor>,
    /// This rank's slice of the averaged gradient (a view into `whole` when there is one).
    grad: Tensor,
}

/// The part of one parameter that falls into one rank's slice of a bucket.
struct Piece {
    rank: usize,
    bucket: usize,
    member: usize,
    /// Element offset in the flattened parameter.
    offset: i64,
    len: i64,
    /// Element offset in the rank's slice of the bucket.
    at: i64,
}

impl FlatShards {
    /// The layout of the trainable parameters of `store` over `world` ranks, in buckets of about
    /// `bucket_bytes` (`run.bucket_mb`, as `dist::bucket_groups` forms them); `grad_kind`: the
    /// dtype the gradients will have (bf16 when the weights are cast after the optimizer took
    /// its fp32 masters); `whole_buckets`: `run.shard = "optimizer"`, whose gradients stay whole
    /// on every rank (each bucket in a buffer of its own, the slices views into it), where
    /// `"gradients"` keeps only the slices. A rank left without any element is refused in one
    /// line.
    pub fn new(
        store: &ParamStore,
        rank: usize,
        world: usize,
        bucket_bytes: i64,
        grad_kind: Kind,
        whole_buckets: bool,
    ) -> Result<FlatShards> {
        let mut params: Vec<(String, Tensor)> = store
            .trainable()
            .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
            .collect();
        params.reverse();
        let tensors: Vec<Tensor> = params.iter().map(|(_, t)| t.shallow_clone()).collect();
        let groups = crate::dist::bucket_groups(&tensors, bucket_bytes, None);
        let w = world as i64;
        let buckets: Vec<Bucket> = groups
            .into_iter()
            .map(|members| {
                let len: i64 = members.iter().map(|&i| tensors[i].numel() as i64).sum();
                let slice_len = (len + w - 1) / w;
                let options = (grad_kind, tensors[members[0]].device());
                let whole = whole_buckets.then(|| Tensor::zeros([slice_len * w], options));
                let grad = match &whole {
                    Some(t) => t.narrow(0, rank as i64 * slice_len, slice_len),
                    None => Tensor::zeros([slice_len], options),
                };
                Bucket {
                    members,
                    len,
                    slice_len,
                    whole,
                    grad,
                }
            })
            .collect();
        let pieces = pieces_of(&buckets, &tensors, world);
        if let Some(r) = (0..world).find(|r| pieces.iter().all(|p| p.rank != *r)) {
            let total: i64 = buckets.iter().map(|b| b.len).sum();
            return Err(Error::Recipe(format!(
                "run.shard_layout = \"flat\": the {total} trainable elements leave rank {r} of \
                 {world} no slice; use fewer processes"
            )));
        }
        Ok(FlatShards {
            rank,
            world,
            params,
            buckets,
            pieces,
        })
    }

    /// What `OverlappedGrads` reduce-scatters into.
    pub fn scatter_into(&self) -> ScatterInto {
        let whole = |b: &Bucket| b.whole.as_ref().map(Tensor::shallow_clone);
        ScatterInto {
            buckets: self.buckets.iter().map(|b| b.members.clone()).collect(),
            slices: self
                .buckets
                .iter()
                .map(|b| b.grad.shallow_clone())
                .collect(),
            whole: self.buckets.iter().map(whole).collect(),
        }
    }

    /// This rank's slices (parameter name, slice with its gradient), for the optimizer.
    pub fn slices(&self) -> Vec<(String, Slice)> {
        self.mine()
            .map(|p| {
                let grad = self.buckets[p.bucket].grad.narrow(0, p.at, p.len);
                let slice = Slice {
                    offset: p.offset,
                    len: p.len,
                    grad,
                };
                (self.params[p.member].0.clone(), slice)
            })
            .collect()
    }

    fn mine(&self) -> impl Iterator<Item = &Piece> {
        self.pieces.iter().filter(|p| p.rank == self.rank)
    }

    /// Bytes of this rank's gradient buffers, kept from step to step: its slices, or with whole
    /// buckets those.
    pub fn grad_bytes(&self) -> i64 {
        let bytes = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        let kept = |b: &Bucket| b.whole.as_ref().map_or_else(|| bytes(&b.grad), bytes);
        self.buckets.iter().map(kept).sum()
    }

    /// The global gradient norm (and with `max_norm`, this rank's slices clipped by it), formed
    /// as an unsharded run forms it, from each parameter's norm in the gradients' dtype. A
    /// parameter whose gradient lies whole in one slice has its norm from torch's kernel there,
    /// bitwise the unsharded run's (the square root of an f32's exact square is that f32). A
    /// parameter cut between slices has the float64 sum of its pieces' squared fp32 norms over
    /// the ranks, its root rounded to the gradients' dtype: it may differ in its last bit.
    pub fn clip_grad_norm(&self, dp: &DataParallel, max_norm: Option<f64>) -> Result<f64> {
        let mine: Vec<&Piece> = self.mine().collect();
        let grads: Vec<Tensor> = mine
            .iter()
            .map(|p| self.buckets[p.bucket].grad.narrow(0, p.at, p.len))
            .collect();
        let whole = |p: &Piece| p.len == self.params[p.member].1.numel() as i64;
        // A cut piece's norm in fp32 (a bf16 kernel would round each piece's norm).
        let measured: Vec<Tensor> = grads
            .iter()
            .zip(&mine)
            .map(|(g, p)| match whole(p) || g.kind() == Kind::Float {
                true => g.shallow_clone(),
                false => g.to_kind(Kind::Float),
            })
            .collect();
        let norms = torch_ext::grad_norms(&measured.iter().collect::<Vec<_>>());
        let mut squares = vec![0.0f64; self.params.len()];
        for (p, n) in mine.iter().zip(norms.map_err(Error::Torch)?) {
            squares[p.member] += f64::from(n) * f64::from(n);
        }
        dp.sum(&mut squares)?;
        let kind = self.buckets[0].grad.kind();
        let norms = Tensor::from_slice(&squares).sqrt().to_kind(Kind::Float);
        let norms = norms.to_kind(kind).to_kind(Kind::Float);
        let mut norms = Vec::<f32>::try_from(norms).map_err(|e| Error::Torch(e.to_string()))?;
        // In registration order, as the unsharded run lists them (the total's rounding).
        norms.reverse();
        let refs: Vec<&Tensor> = grads.iter().collect();
        tch::no_grad(|| torch_ext::clip_with_norms(&refs, &norms, max_norm))
            .map_err(|e| Error::Torch(format!("clip_grad_norm: {e}")))
    }

    /// After this rank updated its slices: every bucket's slices all-gathered into every
    /// rank's parameters (at most two buckets in flight, each a flat buffer of its size).
    pub fn gather_updates(&self, dp: &DataParallel) -> Result<()> {
        let mut in_flight = std::collections::VecDeque::new();
        for (b, bucket) in self.buckets.iter().enumerate() {
            if in_flight.len() == 2 {
                self.unpack_gathered(dp, in_flight.pop_front())?;
            }
            let kind = self.params[bucket.members[0]].1.kind();
            let device = bucket.grad.device();
            let mine = Tensor::zeros([bucket.slice_len], (kind, device));
            tch::no_grad(|| {
                for p in self.mine().filter(|p| p.bucket == b) {
                    let values = &self.params[p.member].1;
                    let values = values.detach().view([-1]).narrow(0, p.offset, p.len);
                    mine.narrow(0, p.at, p.len).copy_(&values);
                }
            });
            let all = Tensor::empty([bucket.slice_len * self.world as i64], (kind, device));
            let work = dp.start_all_gather(&all, &mine)?;
            in_flight.push_back((b, work, all, mine));
        }
        while !in_flight.is_empty() {
            self.unpack_gathered(dp, in_flight.pop_front())?;
        }
        Ok(())
    }

    /// Waits for a bucket's all-gather and copies the gathered values into its parameters.
    fn unpack_gathered(
        &self,
        dp: &DataParallel,
        gathered: Option<(usize, torch_ext::Work, Tensor, Tensor)>,
    ) -> Result<()> {
        let Some((b, work, all, _mine)) = gathered else {
            return Ok(());
        };
        dp.wait(work)?;
        let bucket = &self.buckets[b];
        let members: Vec<&Tensor> = bucket.members.iter().map(|&i| &self.params[i].1).collect();
        unpack(&all.narrow(0, 0, bucket.len), &members);
        Ok(())
    }
}

/// Every rank's pieces of the parameters in each bucket: rank r's slice of bucket b covers
/// elements `r * slice_len .. (r + 1) * slice_len` of the bucket's members laid end to end.
fn pieces_of(buckets: &[Bucket], tensors: &[Tensor], world: usize) -> Vec<Piece> {
    let mut pieces = Vec::new();
    for (b, bucket) in buckets.iter().enumerate() {
        for rank in 0..world {
            let (lo, hi) = (
                rank as i64 * bucket.slice_len,
                (rank as i64 + 1) * bucket.slice_len,
            );
            let mut start = 0;
            for &member in &bucket.members {
                let n = tensors[member].numel() as i64;
                let (a, z) = (start.max(lo), (start + n).min(hi));
                if a < z {
                    pieces.push(Piece {
                        rank,
                        bucket: b,
                        member,
                        offset: a - start,
                        len: z - a,
                        at: a - lo,
                    });
                }
                start += n;
            }
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn store(shapes: &[&[i64]]) -> ParamStore {
        let mut store = ParamStore::new(Device::Cpu);
        for (i, s) in shapes.iter().enumerate() {
            let numel: i64 = s.iter().product();
            let t =
                Tensor::arange(numel, (Kind::Float, Device::Cpu)).reshape(*s) + 100.0 * i as f64;
            let _ = store.add(&format!("w{i}"), t);
        }
        store
    }

    /// Every rank's slices together cover every element of every trainable parameter exactly
    /// once, each slice as long as its bucket's share, and every rank's state is 1/world of the
    /// elements up to the padding.
    #[test]
    fn slices_cover_every_element_once() {
        let store = store(&[&[3, 5], &[7], &[2, 2], &[11]]);
        for world in [1usize, 2, 3, 4] {
            // 64 bytes: the buckets hold 16 fp32 elements at most.
            let shards: Vec<FlatShards> = (0..world)
                .map(|r| FlatShards::new(&store, r, world, 64, Kind::Float, false).expect("layout"))
                .collect();
            let mut seen = std::collections::BTreeMap::<String, Vec<i64>>::new();
            for s in &shards {
                let per_rank: i64 = s.slices().iter().map(|(_, sl)| sl.len).sum();
                let slots: i64 = s.buckets.iter().map(|b| b.slice_len).sum();
                assert!(per_rank <= slots, "world {world}");
                for (name, sl) in s.slices() {
                    seen.entry(name)
                        .or_default()
                        .extend(sl.offset..sl.offset + sl.len);
                    assert_eq!(sl.grad.numel() as i64, sl.len);
                }
            }
            for p in store.trainable() {
                let mut got = seen.remove(&p.name).unwrap_or_default();
                got.sort();
                assert_eq!(
                    got,
                    (0..p.tensor.numel() as i64).collect::<Vec<_>>(),
                    "{}",
                    p.name
                );
            }
        }
    }

    /// A rank whose slice of every bucket is padding is refused.
    #[test]
    fn a_rank_without_elements_is_refused() {
        let store = store(&[&[2]]);
        let e = FlatShards::new(&store, 0, 4, 1 << 20, Kind::Float, false)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("leave rank 2 of 4 no slice"), "{e}");
    }

    /// The slices of a bucket laid end to end are the packed bucket (what the reduce-scatter
    /// delivers to each rank).
    #[test]
    fn slice_gradients_are_the_packed_buckets_slices() {
        let store = store(&[&[3, 5], &[7]]);
        let world = 3;
        let mut tensors: Vec<Tensor> = store
            .trainable()
            .map(|p| p.tensor.shallow_clone())
            .collect();
        tensors.reverse();
        let flat = Tensor::cat(
            &tensors.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(),
            0,
        );
        for r in 0..world {
            // Rank 1's slices as views into whole buckets, the others' of their own.
            let whole = r == 1;
            let s = FlatShards::new(&store, r, world, 1 << 20, Kind::Float, whole).expect("layout");
            let b = &s.buckets[0];
            // Stand-in for the reduce-scatter: this rank's slice of the padded bucket.
            let padded = Tensor::cat(
                &[
                    flat.shallow_clone(),
                    Tensor::zeros([b.slice_len * 3 - b.len], tch::kind::FLOAT_CPU),
                ],
                0,
            );
            b.grad
                .shallow_clone()
                .copy_(&padded.narrow(0, r as i64 * b.slice_len, b.slice_len));
            for (name, sl) in s.slices() {
                let p = store.get(&name).expect("param");
                assert!(sl.grad.equal(&sl.of(p)), "{name}@{}", sl.offset);
            }
        }
    }
}
