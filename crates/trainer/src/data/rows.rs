//! What a language-model run reads: training rows (random windows of a token source or mixture,
//! or whole chat/instruction samples) and validation sets (fixed windows, or fixed rows of
//! samples), behind one interface for the training loop.
//!
//! Imports `loader` (windows, batches), `mixture` and `sft` (samples); nothing imports it back
//! from within `data/`.

use super::loader::{valid_batch, Batch};
use super::mixture::Mixture;
use super::sft::{valid_rows_batch, SampleRows, SampleSet};
use super::source::Span;
use crate::error::{Error, Result};
use std::sync::Arc;

/// The training data.
pub enum TrainInput {
    /// Windows of `seq_len + 1` tokens at random positions of one source or a mixture.
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
        }
    }
}

/// A validation set.
#[derive(Clone)]
pub enum ValidData {
    Windows(Span),
    Samples { set: Arc<SampleSet>, packing: bool },
}

impl ValidData {
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
            ValidData::Samples { set, packing } => {
                valid_rows_batch(set, seq_len, *packing, batch_size, index)
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
