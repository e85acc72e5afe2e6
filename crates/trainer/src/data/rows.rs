//! What a language-model run reads: training rows (random windows of a token source or mixture,
//! or whole chat/instruction samples) and validation sets (fixed windows, or fixed rows of
//! samples), behind one interface for the training loop.
//!
//! Imports `loader` (windows, batches), `mixture` and `sft` (samples); nothing imports it back
//! from within `data/`.

use super::loader::{stream_seed, valid_batch, Batch, RowBuffers};
use super::mixture::{MixSource, Mixture};
use super::sft::{fill_row, valid_rows, valid_rows_batch, SampleRows, SampleSet};
use super::source::Span;
use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::{Arc, Mutex};

/// The training data.
pub enum TrainInput {
    /// Windows of `seq_len + 1` tokens at random positions of one source or a mixture (whose
    /// sources may also be chat/instruction samples).
    Windows(Mixture),
    /// Whole samples, packed or padded (`data.packing`).
    Samples(Arc<SampleSet>),
}

/// The training batches of a run: given (step, micro), the batch, a pure function of the seed.
pub enum TrainRows {
    Windows {
        mixture: Mixture,
        seq_len: usize,
        batch_size: usize,
        seed: u64,
    },
    Samples(SampleRows),
    /// A mixture with sample sources among its token sources.
    Mixed(MixedRows),
}

impl TrainRows {
    pub fn batch(&self, step: i64, micro: i64) -> Batch {
        match self {
            TrainRows::Windows {
                mixture,
                seq_len,
                batch_size,
                seed,
            } => mixture.batch(*seq_len, *batch_size, *seed, step, micro),
            TrainRows::Samples(rows) => rows.batch(step, micro),
            TrainRows::Mixed(rows) => rows.batch(step, micro),
        }
    }
}

/// A mixture whose sources include chat/instruction samples: each row picks its source as any
/// mixture row does; a token source gives a random window, a sample source its next row of
/// samples. A sample source's cursor is the number of rows that chose it since the run's first
/// step: a pure function of (seed, step), kept as the batches go and recomputed when asked for
/// another step (a resumed run).
pub struct MixedRows {
    mixture: Mixture,
    /// Per source: the row plan of a sample source.
    plans: Vec<Option<SampleRows>>,
    seq_len: usize,
    batch_size: usize,
    grad_accum: i64,
    seed: u64,
    /// The step the cursors count from (the run's or the stage's first).
    base_step: i64,
    /// Batches carry segments and positions (packed samples; windows' documents).
    masks: bool,
    cursor: Mutex<Cursor>,
}

/// Rows drawn per source before `at` (step, micro).
struct Cursor {
    at: Option<(i64, i64)>,
    counts: Vec<u64>,
}

/// What a `MixedRows` needs beyond its mixture.
pub struct MixedRowsSettings {
    pub packing: bool,
    pub document_mask: bool,
    pub seq_len: usize,
    pub batch_size: usize,
    pub grad_accum: i64,
    pub seed: u64,
    pub base_step: i64,
}

impl MixedRows {
    pub fn new(mixture: Mixture, s: MixedRowsSettings) -> MixedRows {
        let plans = mixture
            .sources
            .iter()
            .enumerate()
            .map(|(i, source)| match source {
                MixSource::Samples(set) => Some(SampleRows::new(
                    set.clone(),
                    s.packing,
                    s.seq_len,
                    s.batch_size,
                    s.grad_accum,
                    // Each sample source its own epoch permutations.
                    stream_seed(s.seed, i as i64, -7, 0),
                )),
                MixSource::Windows(_) => None,
            })
            .collect();
        let n = mixture.len();
        MixedRows {
            mixture,
            plans,
            seq_len: s.seq_len,
            batch_size: s.batch_size,
            grad_accum: s.grad_accum,
            seed: s.seed,
            base_step: s.base_step,
            masks: s.packing || s.document_mask,
            cursor: Mutex::new(Cursor {
                at: None,
                counts: vec![0; n],
            }),
        }
    }

    /// Rows drawn per source from the base step up to (step, micro), exclusive.
    fn counts_before(&self, step: i64, micro: i64) -> Vec<u64> {
        let (bs, seed) = (self.batch_size, self.seed);
        let mut counts = self
            .mixture
            .counts(bs, self.grad_accum, seed, self.base_step, step);
        for m in 0..micro {
            for c in self.mixture.choices(bs, seed, step, m) {
                counts[c] += 1;
            }
        }
        counts
    }

    /// The rows of (step, micro): each source's rows numbered on from its cursor.
    pub fn batch(&self, step: i64, micro: i64) -> Batch {
        let (bs, seq_len) = (self.batch_size, self.seq_len);
        let choices = self.mixture.choices(bs, self.seed, step, micro);
        let mut next = {
            let mut cursor = self.cursor.lock().expect("the cursor is never poisoned");
            if cursor.at != Some((step, micro)) {
                cursor.counts = self.counts_before(step, micro);
            }
            let before = cursor.counts.clone();
            for &c in &choices {
                cursor.counts[c] += 1;
            }
            cursor.at = Some(if micro + 1 == self.grad_accum {
                (step + 1, 0)
            } else {
                (step, micro + 1)
            });
            before
        };
        // The window starts come from the same stream as a plain mixture's.
        let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(self.seed, step, micro, 0));
        let mut buf = RowBuffers::new(bs, seq_len);
        for (r, &c) in choices.iter().enumerate() {
            match &self.mixture.sources[c] {
                MixSource::Windows(span) => {
                    let window = seq_len + 1;
                    let start = span.start + rng.gen_range(0..=span.len - window);
                    let mut tokens = Vec::with_capacity(window);
                    span.data.extend_window(start, window, &mut tokens);
                    let documents = if span.document_mask {
                        span.documents_of_window(start, seq_len)
                    } else {
                        (vec![0; seq_len], (0..seq_len as i64).collect())
                    };
                    buf.window_row(r, &tokens, &documents);
                }
                MixSource::Samples(set) => {
                    let plan = self.plans[c].as_ref().expect("a plan per sample source");
                    fill_row(set, &plan.row(next[c]), &mut buf, r);
                    next[c] += 1;
                }
            }
        }
        buf.into_batch(step, micro, self.masks)
    }
}

/// A validation set.
#[derive(Clone)]
pub enum ValidData {
    Windows(Span),
    Samples {
        set: Arc<SampleSet>,
        packing: bool,
        /// The rows every evaluation reads, in order.
        plan: Arc<Vec<Vec<usize>>>,
    },
}

impl ValidData {
    /// A set of samples, its rows planned once (`sft::valid_rows`).
    pub fn samples(set: Arc<SampleSet>, seq_len: usize, packing: bool) -> ValidData {
        let plan = Arc::new(valid_rows(&set, seq_len, packing));
        ValidData::Samples { set, packing, plan }
    }

    /// Batch `index` of `n_batches` fixed batches (the same at every evaluation).
    pub fn batch(
        &self,
        seq_len: usize,
        batch_size: usize,
        n_batches: usize,
        index: usize,
    ) -> Batch {
        match self {
            ValidData::Windows(span) => valid_batch(span, seq_len, batch_size, n_batches, index),
            ValidData::Samples { set, packing, plan } => {
                valid_rows_batch(set, plan, seq_len, *packing, batch_size, index)
            }
        }
    }

    /// At least one window (or sample) is there to evaluate.
    pub fn check_fits(&self, window: usize, key: &str) -> Result<()> {
        match self {
            ValidData::Windows(span) => span.check_fits(window, key),
            ValidData::Samples { set, .. } if set.is_empty() => Err(Error::Data {
                path: key.to_string(),
                msg: "holds no sample".into(),
            }),
            ValidData::Samples { .. } => Ok(()),
        }
    }
}
