//! Data mixtures: several named token sources, each training sequence drawn from one of them with
//! fixed weights (e.g. 95% new data and 5% replay of the old data, as in Ibrahim et al. 2024,
//! "Simple and Scalable Strategies to Continually Pre-train Large Language Models").
//!
//! Which source a row of a batch reads is a pure function of (seed, step, micro, row), drawn from
//! its own random stream so that the realised counts can be recomputed for any step range without
//! touching the data (a resumed run reports the same proportions as the uninterrupted one). A
//! small source is not exhausted: windows are random, so it is simply re-read, and its "epochs"
//! (tokens drawn over its size) are reported.

use super::loader::{stream_seed, window_batch, Batch};
use super::sft::SampleSet;
use super::source::Span;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;

/// Salt of the source-choice stream, so that it is independent of the window stream.
const CHOICE_SALT: u64 = 0x6D69_7874_7572_6521; // "mixture!"

/// Where a source's rows come from: windows of a token stream, or whole chat/instruction
/// samples (read through `rows::MixedRows`, which keeps each sample source's cursor).
#[derive(Clone)]
pub enum MixSource {
    Windows(Span),
    Samples(Arc<SampleSet>),
}

/// The training sources and their normalised cumulative weights.
#[derive(Clone)]
pub struct Mixture {
    pub names: Vec<String>,
    pub sources: Vec<MixSource>,
    /// Normalised weights, and their cumulative sums (the last is 1).
    weights: Vec<f64>,
    cumulative: Vec<f64>,
}

impl From<Span> for Mixture {
    fn from(span: Span) -> Mixture {
        Mixture {
            names: vec!["train".into()],
            sources: vec![MixSource::Windows(span)],
            weights: vec![1.0],
            cumulative: vec![1.0],
        }
    }
}

impl Mixture {
    /// `weights` must be non-negative with a positive sum (checked by recipe validation).
    pub fn new(names: Vec<String>, spans: Vec<Span>, weights: &[f64]) -> Mixture {
        let sources = spans.into_iter().map(MixSource::Windows).collect();
        Mixture::with_sources(names, sources, weights)
    }

    /// Sources of either kind.
    pub fn with_sources(names: Vec<String>, sources: Vec<MixSource>, weights: &[f64]) -> Mixture {
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let mut cumulative: Vec<f64> = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        if let Some(last) = cumulative.last_mut() {
            *last = 1.0;
        }
        let weights = weights.iter().map(|w| w / total).collect();
        Mixture {
            names,
            sources,
            weights,
            cumulative,
        }
    }

    pub fn len(&self) -> usize {
        self.sources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// The normalised weight of source `i`.
    pub fn weight(&self, i: usize) -> f64 {
        self.weights[i]
    }

    /// The source index of each of the `batch_size` rows of (step, micro).
    pub fn choices(&self, batch_size: usize, seed: u64, step: i64, micro: i64) -> Vec<usize> {
        if self.sources.len() == 1 {
            return vec![0; batch_size];
        }
        let mut rng = ChaCha8Rng::seed_from_u64(stream_seed(seed ^ CHOICE_SALT, step, micro, 0));
        (0..batch_size)
            .map(|_| {
                let u: f64 = rng.gen();
                // Zero-weight sources have an empty interval and are never chosen.
                self.cumulative
                    .iter()
                    .position(|&c| u < c)
                    .unwrap_or(self.sources.len() - 1)
            })
            .collect()
    }

    /// Rows drawn from each source over steps `[first, last)`, all micro-batches.
    pub fn counts(
        &self,
        batch_size: usize,
        grad_accum: i64,
        seed: u64,
        first: i64,
        last: i64,
    ) -> Vec<u64> {
        let mut counts = vec![0u64; self.sources.len()];
        for step in first..last {
            for micro in 0..grad_accum {
                for c in self.choices(batch_size, seed, step, micro) {
                    counts[c] += 1;
                }
            }
        }
        counts
    }

    /// The training batch of (step, micro): per row a source, then a random window in it. With
    /// one source this is exactly `loader::train_batch`.
    pub fn batch(
        &self,
        seq_len: usize,
        batch_size: usize,
        seed: u64,
        step: i64,
        micro: i64,
    ) -> Batch {
        let choices = self.choices(batch_size, seed, step, micro);
        let rows: Vec<&Span> = choices
            .iter()
            .map(|&c| match &self.sources[c] {
                MixSource::Windows(span) => span,
                MixSource::Samples(_) => {
                    unreachable!("a mixture with sample sources is read through rows::MixedRows")
                }
            })
            .collect();
        window_batch(&rows, seq_len, seed, step, micro)
    }
}

/// Realised proportions and epochs of a mixture so far, for metrics.jsonl and summary.json.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct MixtureReport {
    pub weight: f64,
    /// Share of the training sequences drawn from this source so far.
    pub fraction: f64,
    /// Tokens drawn from the source over its (training part's) size.
    pub epochs: f64,
    pub sequences: u64,
}

impl Mixture {
    /// Whether any source holds chat/instruction samples.
    pub fn has_samples(&self) -> bool {
        self.sources
            .iter()
            .any(|s| matches!(s, MixSource::Samples(_)))
    }

    /// Tokens of source `i` (its training part).
    fn source_tokens(&self, i: usize) -> usize {
        match &self.sources[i] {
            MixSource::Windows(span) => span.len,
            MixSource::Samples(set) => set.tokens(),
        }
    }

    pub fn report(&self, counts: &[u64], seq_len: usize) -> Vec<(String, MixtureReport)> {
        let total: u64 = counts.iter().sum();
        self.names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let n = counts[i];
                (
                    name.clone(),
                    MixtureReport {
                        weight: self.weight(i),
                        fraction: if total == 0 {
                            0.0
                        } else {
                            n as f64 / total as f64
                        },
                        epochs: (n as f64 * seq_len as f64) / self.source_tokens(i).max(1) as f64,
                        sequences: n,
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::loader::train_batch;
    use crate::data::source::{open, Span};
    use crate::data::SourceConfig;

    fn builtin() -> Span {
        Span::whole(open(&SourceConfig::Builtin {}, "data.train", 256).expect("builtin corpus"))
    }

    fn ids(t: &tch::Tensor) -> Vec<i64> {
        Vec::<i64>::try_from(t.reshape([-1])).expect("int64 ids")
    }

    fn two() -> Mixture {
        let (a, b) = Span::split(
            open(&SourceConfig::Builtin {}, "x", 256).expect("corpus"),
            0.3,
        );
        Mixture::new(
            vec!["new".into(), "replay".into()],
            vec![a, b],
            &[0.95, 0.05],
        )
    }

    #[test]
    fn realised_proportions_are_within_one_percent_of_the_weights() {
        let m = two();
        let counts = m.counts(8, 2, 1234, 0, 2000);
        let report = m.report(&counts, 16);
        assert!((report[0].1.fraction - 0.95).abs() < 0.01, "{report:?}");
        assert!((report[1].1.fraction - 0.05).abs() < 0.01, "{report:?}");
        // Unnormalised weights mean the same mixture.
        let scaled = Mixture::with_sources(m.names.clone(), m.sources.clone(), &[19.0, 1.0]);
        assert_eq!(
            scaled.counts(8, 2, 1234, 0, 50),
            m.counts(8, 2, 1234, 0, 50)
        );
        // A zero weight is never drawn.
        let zero = Mixture::with_sources(m.names.clone(), m.sources.clone(), &[1.0, 0.0]);
        assert_eq!(zero.counts(8, 1, 5, 0, 200)[1], 0);
    }

    #[test]
    fn batches_are_a_pure_function_of_seed_step_and_micro() {
        let m = two();
        assert_eq!(
            ids(&m.batch(16, 8, 3, 10, 1).inputs),
            ids(&m.batch(16, 8, 3, 10, 1).inputs)
        );
        assert_ne!(
            ids(&m.batch(16, 8, 3, 10, 1).inputs),
            ids(&m.batch(16, 8, 3, 11, 1).inputs)
        );
        // Counts over a range are the sum of counts over its parts (what a resumed run reports).
        let whole = m.counts(4, 2, 9, 0, 40);
        let (p, q) = (m.counts(4, 2, 9, 0, 17), m.counts(4, 2, 9, 17, 40));
        assert_eq!(
            whole,
            p.iter().zip(&q).map(|(a, b)| a + b).collect::<Vec<_>>()
        );
    }

    #[test]
    fn one_source_draws_the_same_windows_as_train_batch() {
        let span = builtin();
        let m = Mixture::from(span.clone());
        assert_eq!(
            ids(&m.batch(16, 4, 7, 12, 1).inputs),
            ids(&train_batch(&span, 16, 4, 7, 12, 1).inputs)
        );
    }

    #[test]
    fn rows_read_the_source_they_chose() {
        // Two sources with disjoint byte values: row r's tokens must come from choice r's source.
        let a = crate::data::source::TokenData::from_bytes(vec![b'a'; 100], "a");
        let b = crate::data::source::TokenData::from_bytes(vec![b'b'; 50], "b");
        let m = Mixture::new(
            vec!["a".into(), "b".into()],
            vec![Span::whole(a), Span::whole(b)],
            &[0.5, 0.5],
        );
        let batch = m.batch(8, 16, 1, 3, 0);
        let choices = m.choices(16, 1, 3, 0);
        let x = ids(&batch.inputs);
        for (r, c) in choices.iter().enumerate() {
            let want = if *c == 0 { b'a' } else { b'b' } as i64;
            assert!(x[r * 8..r * 8 + 8].iter().all(|&t| t == want));
        }
        let report = m.report(&m.counts(16, 1, 1, 0, 10), 8);
        let tokens_b = report[1].1.sequences as f64 * 8.0;
        assert!((report[1].1.epochs - tokens_b / 50.0).abs() < 1e-12);
    }
}
