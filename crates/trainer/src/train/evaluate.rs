//! Evaluation and generation with a loaded model: `trainer eval` and `trainer generate`.

use crate::data::source::Span;
use crate::error::{Error, Result};
use crate::models::transformer::Transformer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub perplexity: f64,
    /// Predicted tokens the loss averages over.
    pub tokens: i64,
    pub windows: i64,
}

/// Mean next-token loss over consecutive, non-overlapping windows of `seq_len + 1` tokens from
/// the start of `span` (at most `max_batches` batches of `batch_size`; None: the whole span).
pub fn eval_span(
    model: &Transformer,
    span: &Span,
    seq_len: usize,
    batch_size: usize,
    max_batches: Option<usize>,
    device: Device,
) -> Result<EvalResult> {
    let window = seq_len + 1;
    // Windows share their boundary token: window i covers [i*seq_len, i*seq_len + seq_len + 1).
    let n_windows = (span.len - 1) / seq_len;
    let n_windows = match max_batches {
        Some(b) => n_windows.min(b * batch_size),
        None => n_windows,
    };
    if n_windows == 0 {
        return Err(Error::Data {
            path: span.data.name.clone(),
            msg: format!(
                "has {} tokens; one evaluation window needs seq_len + 1 = {window}",
                span.len
            ),
        });
    }
    let mut total = 0.0f64;
    let mut count = 0i64;
    tch::no_grad(|| -> Result<()> {
        let mut start = 0;
        while start < n_windows {
            let b = batch_size.min(n_windows - start);
            let mut tokens = Vec::with_capacity(b * window);
            for i in start..start + b {
                span.data
                    .extend_window(span.start + i * seq_len, window, &mut tokens);
            }
            let all = Tensor::from_slice(&tokens)
                .view([b as i64, window as i64])
                .to_device(device);
            let inputs = all.narrow(1, 0, seq_len as i64);
            let targets = all.narrow(1, 1, seq_len as i64);
            let logits = model.forward(&inputs, false);
            let loss = Transformer::loss(&logits, &targets).f_double_value(&[])?;
            let n = (b * seq_len) as i64;
            total += loss * n as f64;
            count += n;
            start += b;
        }
        Ok(())
    })?;
    let loss = total / count as f64;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens: count,
        windows: n_windows as i64,
    })
}

/// Sampling settings for `generate`.
#[derive(Debug, Clone)]
pub struct Sampling {
    pub max_new_tokens: usize,
    /// 0: greedy.
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub seed: u64,
}

/// Continues `prompt` (token ids) by sampling from the model, one token at a time, over the last
/// `max_seq_len` tokens (no key/value cache: meant for a quick look at small models).
pub fn generate(
    model: &Transformer,
    prompt: &[i64],
    s: &Sampling,
    device: Device,
) -> Result<Vec<i64>> {
    let max_len = model.config.max_seq_len as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(s.seed);
    let mut ids = prompt.to_vec();
    tch::no_grad(|| -> Result<()> {
        for _ in 0..s.max_new_tokens {
            let ctx = &ids[ids.len().saturating_sub(max_len)..];
            let input = Tensor::from_slice(ctx)
                .view([1, ctx.len() as i64])
                .to_device(device);
            let logits = model
                .forward(&input, false)
                .select(1, ctx.len() as i64 - 1)
                .squeeze_dim(0); // [vocab]
            let logits = logits.to_kind(Kind::Float).to_device(Device::Cpu);
            let next = if s.temperature <= 0.0 {
                logits.argmax(0, false).f_int64_value(&[])?
            } else {
                let mut scaled = logits / s.temperature;
                if let Some(k) = s.top_k {
                    let k = k.min(scaled.size()[0]);
                    let (top, _) = scaled.topk(k, 0, true, true);
                    let threshold = top.double_value(&[k - 1]);
                    scaled = scaled.masked_fill(&scaled.lt(threshold), f64::NEG_INFINITY);
                }
                let probs: Vec<f64> = Vec::<f64>::try_from(scaled.softmax(0, Kind::Double))
                    .map_err(|e| Error::Torch(e.to_string()))?;
                // Inverse-CDF sampling with our own seeded RNG: reproducible for a seed.
                let u: f64 = rng.gen();
                let mut acc = 0.0;
                let mut pick = probs.len() - 1;
                for (i, p) in probs.iter().enumerate() {
                    acc += p;
                    if u < acc {
                        pick = i;
                        break;
                    }
                }
                pick as i64
            };
            ids.push(next);
        }
        Ok(())
    })?;
    Ok(ids[prompt.len()..].to_vec())
}
