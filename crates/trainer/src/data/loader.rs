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

/// Inputs and next-token targets (-100: not a target), both `[b, t]` int64 on the CPU.
pub struct Batch {
    pub step: i64,
    pub micro: i64,
    pub inputs: Tensor,
    pub targets: Tensor,
    /// Packed samples (`sft.rs`): each position's sample in its row and its position in the
    /// sample, `[b, t]`; `None` for plain windows (one causal sequence per row).
    pub segments: Option<Tensor>,
    pub positions: Option<Tensor>,
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
pub fn train_batch(
    span: &Span,
    seq_len: usize,
    batch_size: usize,
    seed: u64,
    step: i64,
    micro: i64,
) -> Batch {
    window_batch(&vec![span; batch_size], seq_len, seed, step, micro)
}

/// One random window of `seq_len + 1` tokens in each of `rows` (a span per row of the batch),
/// the starts drawn from the (seed, step, micro) stream.
pub fn window_batch(rows: &[&Span], seq_len: usize, seed: u64, step: i64, micro: i64) -> Batch {
    let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(seed, step, micro, 0));
    let window = seq_len + 1;
    let mut tokens = Vec::with_capacity(rows.len() * window);
    let mut starts = Vec::with_capacity(rows.len());
    for span in rows {
        let last_start = span.len - window; // inclusive; check_fits guarantees len >= window
        let start = span.start + rng.gen_range(0..=last_start);
        span.data.extend_window(start, window, &mut tokens);
        starts.push(start);
    }
    let documents = documents_of_rows(rows, &starts, seq_len);
    to_batch(tokens, documents, rows.len(), window, step, micro)
}

/// With `data.document_mask` on any row: every row's documents and positions in them (a row of
/// a span without the mask is one document).
fn documents_of_rows(rows: &[&Span], starts: &[usize], seq_len: usize) -> Option<Documents> {
    if !rows.iter().any(|s| s.document_mask) {
        return None;
    }
    let (mut segments, mut positions) = (Vec::new(), Vec::new());
    for (span, &start) in rows.iter().zip(starts) {
        if span.document_mask {
            let (s, p) = span.documents_of_window(start, seq_len);
            segments.extend(s);
            positions.extend(p);
        } else {
            segments.extend(std::iter::repeat_n(0, seq_len));
            positions.extend(0..seq_len as i64);
        }
    }
    Some((segments, positions))
}

/// Each position's document and its position within the document (row after row, or of one
/// row).
pub type Documents = (Vec<i64>, Vec<i64>);

/// The `index`-th of `n_batches` validation batches: windows spread evenly over the span, the
/// same at every evaluation so that curves compare like with like.
pub fn valid_batch(
    span: &Span,
    seq_len: usize,
    batch_size: usize,
    n_batches: usize,
    index: usize,
) -> Batch {
    let window = seq_len + 1;
    let last_start = span.len - window;
    let total = (n_batches * batch_size).max(1);
    let mut tokens = Vec::with_capacity(batch_size * window);
    let mut starts = Vec::with_capacity(batch_size);
    for j in 0..batch_size {
        let k = index * batch_size + j;
        let start = if total == 1 {
            0
        } else {
            last_start * k / (total - 1)
        };
        span.data
            .extend_window(span.start + start, window, &mut tokens);
        starts.push(span.start + start);
    }
    let documents = documents_of_rows(&vec![span; batch_size], &starts, seq_len);
    to_batch(tokens, documents, batch_size, window, -1, index as i64)
}

fn to_batch(
    tokens: Vec<i64>,
    documents: Option<Documents>,
    batch_size: usize,
    window: usize,
    step: i64,
    micro: i64,
) -> Batch {
    let all = Tensor::from_slice(&tokens).view([batch_size as i64, window as i64]);
    let t = window as i64 - 1;
    let shape = [batch_size as i64, t];
    let (segments, positions) = match documents {
        Some((s, p)) => (
            Some(Tensor::from_slice(&s).view(shape)),
            Some(Tensor::from_slice(&p).view(shape)),
        ),
        None => (None, None),
    };
    Batch {
        step,
        micro,
        inputs: all.narrow(1, 0, t).contiguous(),
        targets: all.narrow(1, 1, t).to_kind(Kind::Int64).contiguous(),
        segments,
        positions,
    }
}

/// A batch assembled row by row (rows of samples, or windows among them): inputs, targets
/// (-100 where nothing is learned), each position's segment and position in it.
pub struct RowBuffers {
    seq_len: usize,
    rows: usize,
    inputs: Vec<i64>,
    targets: Vec<i64>,
    segments: Vec<i64>,
    positions: Vec<i64>,
}

impl RowBuffers {
    /// All padding: input 0, no target, segment 0, position 0.
    pub fn new(rows: usize, seq_len: usize) -> RowBuffers {
        let n = rows * seq_len;
        RowBuffers {
            seq_len,
            rows,
            inputs: vec![0; n],
            targets: vec![-100; n],
            segments: vec![0; n],
            positions: vec![0; n],
        }
    }

    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Position `at` of row `row`.
    pub fn put(
        &mut self,
        row: usize,
        at: usize,
        input: i64,
        target: i64,
        segment: i64,
        position: i64,
    ) {
        let p = row * self.seq_len + at;
        self.inputs[p] = input;
        self.targets[p] = target;
        self.segments[p] = segment;
        self.positions[p] = position;
    }

    /// Row `row` as a window of `seq_len + 1` tokens: inputs and next-token targets, with the
    /// window's documents (`Span::documents_of_window`).
    pub fn window_row(&mut self, row: usize, tokens: &[i64], documents: &Documents) {
        for at in 0..self.seq_len {
            let (segment, position) = (documents.0[at], documents.1[at]);
            self.put(row, at, tokens[at], tokens[at + 1], segment, position);
        }
    }

    /// The batch; `masks`: with the segments and positions (packed samples, documents).
    pub fn into_batch(self, step: i64, micro: i64, masks: bool) -> Batch {
        let shape = [self.rows as i64, self.seq_len as i64];
        let tensor = |v: &[i64]| Tensor::from_slice(v).view(shape);
        Batch {
            step,
            micro,
            inputs: tensor(&self.inputs),
            targets: tensor(&self.targets),
            segments: masks.then(|| tensor(&self.segments)),
            positions: masks.then(|| tensor(&self.positions)),
        }
    }
}

/// Prepares training batches for steps `first_step..=last_step` on a background thread, `depth`
/// batches ahead; `batch_of(step, micro)` makes each. Dropping it stops the thread.
pub struct Prefetcher {
    rx: Option<Receiver<Batch>>,
    handle: Option<JoinHandle<()>>,
}

impl Prefetcher {
    pub fn start(
        batch_of: impl Fn(i64, i64) -> Batch + Send + 'static,
        grad_accum: i64,
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
                        if tx.send(batch_of(step, micro)).is_err() {
                            return; // the trainer stopped
                        }
                    }
                }
            })
            .ok();
        Prefetcher {
            rx: Some(rx),
            handle,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::source::{open, Span, TokenData};
    use crate::data::SourceConfig;
    use std::sync::Arc;

    fn builtin() -> Span {
        Span::whole(open(&SourceConfig::Builtin {}, "data.train", 256).expect("builtin corpus"))
    }

    fn ids(t: &Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(t.reshape([-1])).expect("int64 ids")
    }

    #[test]
    fn training_windows_are_a_pure_function_of_seed_and_step() {
        let span = builtin();
        let a = train_batch(&span, 16, 4, 7, 12, 1);
        let b = train_batch(&span, 16, 4, 7, 12, 1);
        assert_eq!(ids(&a.inputs), ids(&b.inputs));
        assert_eq!(a.inputs.size(), vec![4, 16]);
        let other_step = train_batch(&span, 16, 4, 7, 13, 1);
        let other_seed = train_batch(&span, 16, 4, 8, 12, 1);
        let other_micro = train_batch(&span, 16, 4, 7, 12, 0);
        assert_ne!(ids(&a.inputs), ids(&other_step.inputs));
        assert_ne!(ids(&a.inputs), ids(&other_seed.inputs));
        assert_ne!(ids(&a.inputs), ids(&other_micro.inputs));
    }

    #[test]
    fn targets_are_inputs_shifted_by_one() {
        let span = builtin();
        let b = train_batch(&span, 8, 3, 1, 0, 0);
        let (x, y) = (ids(&b.inputs), ids(&b.targets));
        for row in 0..3 {
            assert_eq!(&x[row * 8 + 1..row * 8 + 8], &y[row * 8..row * 8 + 7]);
        }
    }

    #[test]
    fn held_out_split_is_disjoint_and_windows_stay_inside() {
        let data = open(&SourceConfig::Builtin {}, "data.train", 256).expect("corpus");
        let n = data.len();
        let (train, valid) = Span::split(data, 0.1);
        assert_eq!(train.len + valid.len, n);
        assert_eq!(valid.start, train.len);
        // The last validation window ends exactly at the end of the corpus.
        let last = valid_batch(&valid, 16, 2, 3, 2);
        let corpus = super::super::source::BUILTIN_CORPUS;
        let tail: Vec<i64> = corpus[n - 16..].iter().map(|&b| b as i64).collect();
        assert_eq!(&ids(&last.targets)[16..], &tail[..]);
        // Validation batches are the same at every evaluation.
        assert_eq!(
            ids(&valid_batch(&valid, 16, 2, 3, 1).inputs),
            ids(&valid_batch(&valid, 16, 2, 3, 1).inputs)
        );
    }

    #[test]
    fn document_masks_number_the_documents_of_each_window() {
        let ids: Vec<u8> = (0..20).collect();
        let mut data = super::super::source::TokenData::from_bytes(ids, "t");
        // Documents start at 0, 4, 9 (empty: 9 again) and 15; 20 tokens.
        Arc::get_mut(&mut data).expect("owned").documents = Some(vec![0, 4, 9, 9, 15, 20]);
        let span = Span::whole(data)
            .with_document_mask(true, "data.train")
            .expect("has an index");
        let (seg, pos) = span.documents_of_window(2, 10); // tokens 2..12
        assert_eq!(seg[..2], [0, 0]);
        assert_eq!(pos, vec![0, 1, 0, 1, 2, 3, 4, 0, 1, 2]);
        let boundaries: Vec<usize> = (1..10).filter(|&i| seg[i] != seg[i - 1]).collect();
        assert_eq!(boundaries, vec![2, 7], "documents begin at tokens 4 and 9");
        let b = valid_batch(&span, 8, 2, 1, 0);
        assert_eq!(b.segments.expect("masked").size(), vec![2, 8]);
        let plain = Span::whole(TokenData::from_bytes(vec![1; 20], "p"));
        let err = plain
            .with_document_mask(true, "data.valid")
            .err()
            .expect("no index");
        assert!(err.to_string().contains("has no document index"), "{err}");
    }

    #[test]
    fn prefetcher_yields_the_same_batches_as_direct_sampling() {
        let span = builtin();
        let rows = span.clone();
        let p = Prefetcher::start(
            move |step, micro| train_batch(&rows, 8, 2, 5, step, micro),
            2,
            3,
            4,
            2,
        );
        for step in 3..=4 {
            for micro in 0..2 {
                let got = p.next().expect("batch");
                assert_eq!((got.step, got.micro), (step, micro));
                assert_eq!(
                    ids(&got.inputs),
                    ids(&train_batch(&span, 8, 2, 5, step, micro).inputs)
                );
            }
        }
        assert!(p.next().is_none(), "stops after the last step");
    }
}
