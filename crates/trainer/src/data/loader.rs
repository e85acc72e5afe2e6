//! Batches: random windows for training, fixed windows for validation, and a background thread
//! that prepares the next batches while the current step runs.
//!
//! Data order is a pure function of (seed, step, micro-batch, rank): a resumed run at step k draws
//! exactly the windows the uninterrupted run drew at step k, without saving any RNG state.

use super::source::Span;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::JoinHandle;
use tch::{Kind, Tensor};

/// Inputs and next-token targets, both `[b, t]` int64 on the CPU.
pub struct Batch {
    pub step: i64,
    pub micro: i64,
    pub inputs: Tensor,
    pub targets: Tensor,
}

/// Mixes (seed, step, micro, rank) into one 64-bit RNG seed (SplitMix64 finaliser on each part),
/// so nearby steps get unrelated streams.
pub fn stream_seed(seed: u64, step: i64, micro: i64, rank: i64) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let mut h = mix(seed);
    for part in [step as u64, micro as u64, rank as u64] {
        h = mix(h ^ part);
    }
    h
}

/// Draws `batch_size` random windows of `seq_len + 1` tokens for (step, micro).
pub fn train_batch(span: &Span, seq_len: usize, batch_size: usize, seed: u64, step: i64, micro: i64) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, step, micro, 0));
    let window = seq_len + 1;
    let last_start = span.len - window; // inclusive; check_fits guarantees len >= window
    let mut tokens = Vec::with_capacity(batch_size * window);
    for _ in 0..batch_size {
        let start = span.start + rng.gen_range(0..=last_start);
        span.data.extend_window(start, window, &mut tokens);
    }
    to_batch(tokens, batch_size, window, step, micro)
}

/// The `index`-th of `n_batches` validation batches: windows spread evenly over the span, the
/// same at every evaluation so that curves compare like with like.
pub fn valid_batch(span: &Span, seq_len: usize, batch_size: usize, n_batches: usize, index: usize) -> Batch {
    let window = seq_len + 1;
    let last_start = span.len - window;
    let total = (n_batches * batch_size).max(1);
    let mut tokens = Vec::with_capacity(batch_size * window);
    for j in 0..batch_size {
        let k = index * batch_size + j;
        let start = if total == 1 { 0 } else { last_start * k / (total - 1) };
        span.data.extend_window(span.start + start, window, &mut tokens);
    }
    to_batch(tokens, batch_size, window, -1, index as i64)
}

fn to_batch(tokens: Vec<i64>, batch_size: usize, window: usize, step: i64, micro: i64) -> Batch {
    let all = Tensor::from_slice(&tokens).view([batch_size as i64, window as i64]);
    let t = window as i64 - 1;
    Batch {
        step,
        micro,
        inputs: all.narrow(1, 0, t).contiguous(),
        targets: all.narrow(1, 1, t).to_kind(Kind::Int64).contiguous(),
    }
}

/// Prepares training batches for steps `first_step..` on a background thread, `depth` batches
/// ahead. Dropping it stops the thread.
pub struct Prefetcher {
    rx: Option<Receiver<Batch>>,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    pub fn start(
        span: Span,
        seq_len: usize,
        batch_size: usize,
        grad_accum: i64,
        seed: u64,
        first_step: i64,
        last_step: i64,
        depth: usize,
    ) -> Prefetcher {
        let (tx, rx) = sync_channel(depth.max(1));
        let handle = std::thread::Builder::new()
            .name("data-prefetch".into())
            .spawn(move || {
                for step in first_step..=last_step {
                    for micro in 0..grad_accum {
                        let batch = train_batch(&span, seq_len, batch_size, seed, step, micro);
                        if tx.send(batch).is_err() {
                            return; // the trainer stopped
                        }
                    }
                }
            })
            .ok();
        Prefetcher { rx: Some(rx), handle }
    }

    /// The next batch, or None when the thread could not be started or has finished.
    pub fn next(&self) -> Option<Batch> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        drop(self.rx.take()); // unblocks a send in progress
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
