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
//! `run.shard = "full"` (ZeRO stage 3 on whole tensors, `PieceShards`): as `"gradients"`, and the
//! weights of the token embedding, of each transformer block and of the head have memory only
//! on their holder (`Param::held_by`; LoRA's frozen base too), gathered onto every rank around
//! each use (the next one fetched while the current one computes); the model is built that way
//! (`pieces_dealt_as_added`), so no rank ever holds all of it. A sharded parameter is owned by
//! its holder (`Owners::deal_full`).
//!
//! Owners are contiguous runs of parameters in registration order, balanced by element count:
//! parameter `i` (starting at element `s`, of `n` elements, of `N` in all) belongs to rank
//! `floor((s + n/2) * world / N)`.

use crate::dist::{DataParallel, PendingBroadcast};
use crate::error::{Error, Result};
use crate::models::params::{Param, ParamStore, ShardRule};
use crate::models::transformer::Piece;
use std::cell::RefCell;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};

/// Which rank owns each trainable parameter.
pub struct Owners {
    rank: usize,
    /// The owning rank of each trainable parameter, in registration order.
    owner: Vec<usize>,
    /// The names of the parameters this rank owns.
    mine: std::collections::HashSet<String>,
    /// Every owner's parameters of one dtype, in registration order: what it broadcasts after
    /// each step (one flat buffer each). Not the sharded ones (`Param::sharded`, `"full"`),
    /// whose values live on their owner only and are gathered where they are used.
    groups: Vec<(usize, Vec<Tensor>)>,
}

impl Owners {
    /// Deals the trainable parameters of `store` out to `world` ranks. A rank left without any
    /// parameter is refused in one line (fewer parameter tensors than ranks).
    pub fn deal(store: &ParamStore, rank: usize, world: usize) -> Result<Owners> {
        let numel = |p: &Param| p.tensor.numel() as i64;
        let mut deal = Dealing::new(world, store.trainable().map(|p| numel(p) as i128).sum());
        let owned = store
            .trainable()
            .map(|p| (deal.next(numel(p)), p.name.as_str(), &p.tensor))
            .collect();
        Self::from_dealt(store, rank, world, owned)
    }

    /// `run.shard = "full"`, after the model was built under `pieces_dealt_as_added`: a sharded
    /// parameter is owned by the rank that holds it (`Param::held_by`); the others kept whole
    /// (the final norm, adapters) are dealt as `deal` deals, over their own elements.
    pub fn deal_full(store: &ParamStore, rank: usize, world: usize) -> Result<Owners> {
        let numel = |p: &Param| p.tensor.numel() as i64;
        let whole = store.trainable().filter(|p| !p.is_sharded());
        let mut deal = Dealing::new(world, whole.map(|p| numel(p) as i128).sum());
        let owned = store
            .trainable()
            .map(|p| (p.held_by.unwrap_or_else(|| deal.next(numel(p))), p))
            .map(|(o, p)| (o, p.name.as_str(), &p.tensor))
            .collect();
        Self::from_dealt(store, rank, world, owned)
    }

    /// The owners of the trainable parameters of `store` as dealt (owner, name, tensor), in
    /// registration order; a rank left without any is refused in one line.
    fn from_dealt(
        store: &ParamStore,
        rank: usize,
        world: usize,
        owned: Vec<(usize, &str, &Tensor)>,
    ) -> Result<Owners> {
        if let Some(r) = (0..world).find(|r| owned.iter().all(|(o, _, _)| o != r)) {
            return Err(Error::Recipe(format!(
                "run.shard: {} trainable tensors cannot give each of {world} ranks a share \
                 (rank {r} would own none); use fewer processes or run.shard = \"none\"",
                owned.len()
            )));
        }
        let whole = store
            .trainable()
            .zip(&owned)
            .filter(|(p, _)| !p.is_sharded());
        let groups = groups_of(whole.map(|(_, (o, _, t))| (*o, *t)), world);
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

/// Owners in registration order: the parameter starting at element `s` of `total`, with `n`
/// elements, goes to rank `floor((s + n/2) * world / total)` (the last rank at most).
struct Dealing {
    world: i128,
    total: i128,
    start: i128,
}

impl Dealing {
    fn new(world: usize, total: i128) -> Dealing {
        Dealing {
            world: world as i128,
            total: total.max(1),
            start: 0,
        }
    }

    fn next(&mut self, n: i64) -> usize {
        let mid = self.start + i128::from(n / 2);
        self.start += i128::from(n);
        ((mid * self.world) / self.total).min(self.world - 1) as usize
    }
}

/// `run.shard = "full"`, while the model is built (`ParamStore::shard_as_added`): the tensors of
/// each piece (`Piece::of`: the embedding, the blocks, the head) are dealt out in registration
/// order, balanced over the model's `total` elements as `Owners::deal` balances (the tensors
/// outside the pieces count, and stay whole); each is held by its rank only.
pub fn pieces_dealt_as_added(world: usize, total: i128) -> ShardRule {
    let mut deal = Dealing::new(world, total);
    Box::new(move |name, numel| {
        let holder = deal.next(numel);
        Piece::of(name).map(|_| holder)
    })
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

/// `run.shard = "full"` (ZeRO stage 3 / FSDP on whole tensors): the weights of each piece of the
/// model (the token embedding, each block, the head: `Piece`) live whole on their owners only;
/// the other ranks' copies have no memory (`torch_ext::release_storage`) until the piece runs,
/// when every rank gives them memory again and each owner broadcasts its tensors of the piece
/// (`gather`). The final norm and learned positions stay whole everywhere, as with
/// `"gradients"`.
pub struct PieceShards {
    dp: DataParallel,
    rank: usize,
    /// Per piece: (owner, that owner's tensors of one dtype) in registration order. A tied head
    /// has no entry: it is the embedding (`resolve`).
    pieces: BTreeMap<Piece, Vec<(usize, Vec<Tensor>)>>,
    /// The pieces whose weights this rank holds whole now (besides its own).
    live: RefCell<std::collections::BTreeSet<Piece>>,
    /// The piece being fetched while another computes, and its broadcasts (one per group).
    prefetch: RefCell<Option<(Piece, Vec<PendingBroadcast>)>>,
    /// `run.shard_prefetch`: whether the piece that runs next is fetched ahead.
    prefetch_on: bool,
    counts: std::cell::Cell<GatherCounts>,
    /// The first collective that failed inside the model's forward or backward pass.
    error: RefCell<Option<Error>>,
}

impl PieceShards {
    /// The pieces of `store` (`Piece::of` the names of its sharded tensors, trained or frozen):
    /// the embedding, `n_blocks` blocks and the head unless tied, each tensor held by its
    /// `Param::held_by`; `dp` a handle on the run's group; `prefetch_on`: fetch the piece that
    /// runs next ahead (`run.shard_prefetch`). Every other parameter is left whole. Releases
    /// nothing yet.
    pub fn new(
        dp: DataParallel,
        store: &ParamStore,
        n_blocks: usize,
        prefetch_on: bool,
    ) -> Result<PieceShards> {
        let world = dp.world.size;
        let mut members: BTreeMap<Piece, Vec<(usize, &Tensor)>> = BTreeMap::new();
        for p in store.iter() {
            let (Some(owner), Some(piece)) = (p.held_by, Piece::of(&p.name)) else {
                continue;
            };
            if matches!(piece, Piece::Block(i) if i >= n_blocks) {
                return Err(Error::Recipe(format!(
                    "run.shard = \"full\": {} names a block past the model's {n_blocks}",
                    p.name
                )));
            }
            members.entry(piece).or_default().push((owner, &p.tensor));
        }
        let expected = (0..n_blocks).map(Piece::Block).chain([Piece::Embedding]);
        if let Some(missing) = expected.into_iter().find(|p| !members.contains_key(p)) {
            return Err(Error::Recipe(format!(
                "run.shard = \"full\": {missing:?} has no parameters to shard"
            )));
        }
        let pieces = members
            .into_iter()
            .map(|(piece, m)| (piece, groups_of(m.into_iter(), world)))
            .collect();
        Ok(PieceShards {
            rank: dp.world.rank,
            dp,
            pieces,
            live: Default::default(),
            prefetch: Default::default(),
            prefetch_on,
            counts: Default::default(),
            error: Default::default(),
        })
    }

    /// Lets go of every piece this rank does not own (and of a fetch still in flight).
    pub fn release_all(&self) -> Result<()> {
        self.drop_prefetch()?;
        for piece in self.pieces.keys() {
            self.release_piece(*piece)?;
        }
        Ok(())
    }

    /// The tensors of `store` this rank writes into a checkpoint's model file
    /// (`checkpoint::model_parts`): the piece tensors it owns, and on rank 0 every tensor kept
    /// whole. Nothing is gathered: the pieces of other ranks are let go of first.
    pub fn model_part(&self, store: &ParamStore) -> Result<Vec<(String, Tensor)>> {
        self.release_all()?;
        let main = self.rank == 0;
        Ok(store
            .iter()
            .filter(|p| match p.held_by {
                Some(holder) => holder == self.rank,
                None => main,
            })
            .map(|p| (p.name.clone(), p.tensor.shallow_clone()))
            .collect())
    }

    /// How many times a piece was gathered, and how many of them had been fetched ahead.
    pub fn gather_counts(&self) -> GatherCounts {
        self.counts.get()
    }

    /// The first collective error met inside a forward or backward pass, if any.
    pub fn take_error(&self) -> Result<()> {
        match self.error.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The piece whose tensors `piece` uses: a tied head is the embedding.
    fn resolve(&self, piece: Piece) -> Piece {
        match piece {
            Piece::Head if !self.pieces.contains_key(&Piece::Head) => Piece::Embedding,
            _ => piece,
        }
    }

    /// The groups of `piece` (nothing for one this model does not have).
    fn groups(&self, piece: Piece) -> &[(usize, Vec<Tensor>)] {
        self.pieces.get(&piece).map_or(&[], Vec::as_slice)
    }

    /// Makes `piece` whole on this rank: from its fetch in flight if that is `piece`,
    /// otherwise by broadcasts from its owners (a fetch of another piece is waited for first
    /// and its values dropped: every rank waits for the collectives it started, in order).
    fn gather_piece(&self, piece: Piece) -> Result<()> {
        if self.live.borrow().contains(&piece) {
            return Ok(());
        }
        let fetched = match self.prefetch.borrow_mut().take() {
            Some((p, pending)) if p == piece => Some(pending),
            Some((_, pending)) => {
                self.wait_dropping(pending)?;
                None
            }
            None => None,
        };
        self.live.borrow_mut().insert(piece);
        let mut counts = self.counts.get();
        counts.total += 1;
        counts.prefetched += i64::from(fetched.is_some());
        self.counts.set(counts);
        for (owner, tensors) in self.groups(piece) {
            if *owner != self.rank {
                for t in tensors {
                    torch_ext::materialize_storage(t).map_err(Error::Torch)?;
                }
            }
            if fetched.is_none() {
                self.dp.broadcast_flat(tensors, *owner, GATHERING)?;
            }
        }
        if let Some(pending) = fetched {
            for p in pending {
                self.dp.finish_broadcast(p, GATHERING)?;
            }
        }
        Ok(())
    }

    /// Starts fetching `piece` (its owners' broadcasts into flat buffers), unless it is whole
    /// here already or a fetch is in flight.
    fn start_prefetch(&self, piece: Piece) -> Result<()> {
        let busy = self.live.borrow().contains(&piece) || self.prefetch.borrow().is_some();
        if busy || !self.prefetch_on {
            return Ok(());
        }
        let mut pending = Vec::new();
        for (owner, tensors) in self.groups(piece) {
            pending.push(self.dp.start_broadcast_flat(tensors, *owner, GATHERING)?);
        }
        *self.prefetch.borrow_mut() = Some((piece, pending));
        Ok(())
    }

    /// Waits for a fetch still in flight and drops what it brought.
    fn drop_prefetch(&self) -> Result<()> {
        match self.prefetch.borrow_mut().take() {
            Some((_, pending)) => self.wait_dropping(pending),
            None => Ok(()),
        }
    }

    fn wait_dropping(&self, pending: Vec<PendingBroadcast>) -> Result<()> {
        for p in pending {
            self.dp.wait_broadcast(p, GATHERING)?;
        }
        Ok(())
    }

    fn release_piece(&self, piece: Piece) -> Result<()> {
        self.live.borrow_mut().remove(&piece);
        for (owner, tensors) in self.groups(piece) {
            if *owner != self.rank {
                for t in tensors {
                    torch_ext::release_storage(t).map_err(Error::Torch)?;
                }
            }
        }
        Ok(())
    }

    /// Keeps the first error (later ones follow from it).
    fn keep(&self, r: Result<()>) {
        if let Err(e) = r {
            self.error.borrow_mut().get_or_insert(e);
        }
    }
}

/// `run.shard = "full"`: the gathers of pieces since the start, for summary.json.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct GatherCounts {
    /// Pieces made whole on this rank (forward, backward, evaluation, checkpoints).
    pub total: i64,
    /// Of those, the ones fetched while the piece before them computed (`run.shard_prefetch`).
    pub prefetched: i64,
}

const GATHERING: &str = "gathering sharded weights";

impl crate::models::transformer::PieceWeights for PieceShards {
    fn gather(&self, piece: Piece, next: Option<Piece>) {
        let piece = self.resolve(piece);
        let others: Vec<Piece> = self
            .live
            .borrow()
            .iter()
            .copied()
            .filter(|&p| p != piece)
            .collect();
        for p in others {
            self.keep(self.release_piece(p));
        }
        self.keep(self.gather_piece(piece));
        if let Some(n) = next.map(|n| self.resolve(n)).filter(|&n| n != piece) {
            self.keep(self.start_prefetch(n));
        }
    }

    fn release(&self, piece: Piece) {
        self.keep(self.release_piece(self.resolve(piece)));
    }
}

/// Each owner's tensors of one dtype, in registration order: what it broadcasts (one flat
/// buffer each).
fn groups_of<'a>(
    owned: impl Iterator<Item = (usize, &'a Tensor)>,
    world: usize,
) -> Vec<(usize, Vec<Tensor>)> {
    let owned: Vec<(usize, &Tensor)> = owned.collect();
    let mut groups = Vec::new();
    for r in 0..world {
        let theirs: Vec<&Tensor> = owned
            .iter()
            .filter(|(o, _)| *o == r)
            .map(|(_, t)| *t)
            .collect();
        for kind in kinds(&theirs) {
            let part = theirs.iter().filter(|t| t.kind() == kind);
            groups.push((r, part.map(|t| t.shallow_clone()).collect()));
        }
    }
    groups
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
    use crate::models::params::is_released;
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

    /// Built under `pieces_dealt_as_added`, every rank records the same holder for each piece
    /// tensor, keeps memory for exactly those it holds and owns them for the update; the pieces
    /// are spread over every rank; the tensors outside the pieces stay whole and are dealt among
    /// themselves. A frozen piece tensor (a LoRA base weight) keeps its holder, owned by none.
    #[test]
    fn pieces_dealt_as_added_are_held_and_owned_by_one_rank_each() {
        let mut sizes = vec![("model.embed_tokens.weight".to_string(), 40)];
        for l in 0..4 {
            for (m, n) in [("up_proj", 30), ("down_proj", 30), ("norm", 5)] {
                sizes.push((format!("model.layers.{l}.{m}.weight"), n));
            }
        }
        sizes.push(("lm_head.weight".to_string(), 40));
        let total: i128 = sizes.iter().map(|(_, n)| *n as i128).sum();
        let build = |rank: usize| {
            let mut store = ParamStore::new(Device::Cpu);
            store.shard_as_added(rank, pieces_dealt_as_added(3, total));
            for (name, n) in &sizes {
                let _ = store.zeros(name, &[*n]);
            }
            store.stop_sharding_as_added().expect("freed");
            store
        };
        let holders =
            |s: &ParamStore| -> Vec<Option<usize>> { s.iter().map(|p| p.held_by).collect() };
        let first = holders(&build(0));
        for rank in 0..3 {
            let mut store = build(rank);
            assert_eq!(holders(&store), first, "rank {rank}");
            store.freeze("model.embed_tokens.weight");
            let owners = Owners::deal_full(&store, rank, 3).expect("three ranks");
            for p in store.iter() {
                let piece = Piece::of(&p.name).is_some();
                assert_eq!(p.is_sharded(), piece, "{}", p.name);
                let here = p.held_by == Some(rank);
                assert_eq!(is_released(&p.tensor), piece && !here, "{}", p.name);
                if piece {
                    assert_eq!(owners.owns(&p.name), here && p.trainable, "{}", p.name);
                }
            }
            assert!(first.contains(&Some(rank)), "rank {rank} holds a piece");
            if rank == 0 {
                assert!(owners.owns("model.layers.0.norm.weight"));
            }
        }
    }
}
