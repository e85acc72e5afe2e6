//! Supervised fine-tuning data: chat or instruction records (JSONL) rendered through the
//! model's chat template, tokenized, and labelled so that the loss trains on the assistant turns
//! only (or on everything with `train_on_prompt`).
//!
//! Rows of a batch hold whole samples, never windows cut at random:
//!
//! - `packing = true`: several samples per row (next-fit, in a shuffled order); each sample's
//!   tokens attend only to the sample's own earlier tokens and their positions restart at 0
//!   (the batch carries `segments` and `positions` for the model), and no target crosses from
//!   one sample into the next. The loss of a packed row is the loss of its samples taken one by
//!   one.
//! - `packing = false`: one sample per row, padded at the end (pads are never targets and, being
//!   last, are never attended to by real tokens under the causal mask).
//!
//! A sample longer than `seq_len + 1` tokens is truncated (counted in the summary); one left
//! without any target token is dropped (counted). Which rows a step reads is a pure function of
//! (seed, step, micro-batch): each epoch is a permutation drawn from the seed, packed the same
//! way on every run, so a resumed run reads exactly what the uninterrupted one read.

use super::chat::{tokenizer_dir, ChatTemplate, Message};
use super::corpus::{json_kind, RecordReader};
use super::loader::{stream_seed, Batch, RowBuffers};
use super::tokenizer::Tokenizer;
use crate::error::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Salt of the epoch permutations, independent of the other streams.
const EPOCH_SALT: u64 = 0x7366_745f_726f_7773; // "sft_rows"

/// The roles a message may have.
const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

/// How records become conversations.
#[derive(Debug, Clone)]
pub enum RecordFormat {
    /// `{"messages": [{"role", "content"}, ...]}` (the field name given).
    Chat { messages_field: String },
    /// `{"prompt": ..., "response": ...}` (field names given): a user turn and an assistant turn.
    Instruction {
        prompt_field: String,
        response_field: String,
    },
}

/// What reading a set did (in the start-up log and summary.json's `samples`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SftSummary {
    pub records: u64,
    pub samples: u64,
    /// Samples cut to `seq_len + 1` tokens.
    pub truncated: u64,
    /// Samples left without a target token (after truncation, or with no assistant turn).
    pub dropped: u64,
    /// Tokens kept, and how many of them are targets.
    pub tokens: u64,
    pub target_tokens: u64,
}

/// Tokenized samples: ids, which ids are targets, and each sample's range.
pub struct SampleSet {
    /// Shared with a held-out part split off it (`split`), never copied.
    ids: Arc<Vec<u32>>,
    target: Arc<Vec<bool>>,
    samples: Vec<std::ops::Range<usize>>,
    pub name: String,
    pub summary: SftSummary,
}

pub struct SampleOptions<'a> {
    pub format: RecordFormat,
    /// A tokenizer.json or a directory holding one (its tokenizer_config.json gives the template
    /// and special tokens).
    pub tokenizer: &'a Path,
    /// A .jinja file instead of the tokenizer's own template.
    pub template: Option<&'a Path>,
    /// Extra template variables (`apply_chat_template`'s keyword arguments).
    pub template_vars: serde_json::Map<String, serde_json::Value>,
    pub train_on_prompt: bool,
    pub seq_len: usize,
    pub vocab_size: i64,
}

impl SampleSet {
    /// The samples of a `chat` or `instruction` source.
    pub fn open_source(
        cfg: &super::config::SourceConfig,
        key: &str,
        seq_len: usize,
        vocab_size: i64,
    ) -> Result<SampleSet> {
        use super::config::SourceConfig;
        let (path, tokenizer, template, vars, train_on_prompt, format) = match cfg {
            SourceConfig::Chat {
                path,
                tokenizer,
                template,
                template_vars,
                messages_field,
                train_on_prompt,
            } => (
                path,
                tokenizer,
                template,
                template_vars,
                *train_on_prompt,
                RecordFormat::Chat {
                    messages_field: messages_field.clone(),
                },
            ),
            SourceConfig::Instruction {
                path,
                tokenizer,
                template,
                template_vars,
                prompt_field,
                response_field,
                train_on_prompt,
            } => (
                path,
                tokenizer,
                template,
                template_vars,
                *train_on_prompt,
                RecordFormat::Instruction {
                    prompt_field: prompt_field.clone(),
                    response_field: response_field.clone(),
                },
            ),
            _ => {
                return Err(Error::Data {
                    path: key.to_string(),
                    msg: "is not a chat or instruction source".into(),
                })
            }
        };
        let opts = SampleOptions {
            format,
            tokenizer,
            template: template.as_deref(),
            template_vars: vars.iter().map(|(k, v)| (k.clone(), v.to_json())).collect(),
            train_on_prompt,
            seq_len,
            vocab_size,
        };
        SampleSet::open(path, &opts, key)
    }

    /// (the first samples, the last `fraction` of them): a held-out validation part.
    pub fn split(self, fraction: f64) -> (SampleSet, SampleSet) {
        let n = self.samples.len();
        let n_valid = ((n as f64) * fraction).round() as usize;
        let mut train = self;
        let tail = train.samples.split_off(n - n_valid);
        let valid = SampleSet {
            ids: Arc::clone(&train.ids),
            target: Arc::clone(&train.target),
            samples: tail,
            name: format!("{} (held out)", train.name),
            summary: train.summary,
        };
        (train, valid)
    }

    /// Reads, renders and tokenizes every record of a JSONL or Parquet file. Errors name the
    /// file and line (or row).
    pub fn open(path: &Path, opts: &SampleOptions, key: &str) -> Result<SampleSet> {
        let tokenizer = Tokenizer::from_arg(&opts.tokenizer.display().to_string())?;
        let dir = tokenizer_dir(opts.tokenizer);
        let template = match opts.template {
            Some(t) => ChatTemplate::from_file(t, Some(&dir.join("tokenizer_config.json")))?,
            None => ChatTemplate::from_tokenizer_dir(&dir)?,
        }
        .with_variables(opts.template_vars.clone());
        if template.reads_the_date() {
            tracing::warn!(
                "{key}: the chat template ({}) writes today's date into every conversation \
                 (strftime_now): the same data renders differently on another day; pin it with \
                 template_vars = {{ date_string = \"...\" }}",
                template.origin
            );
        }
        let mut records = RecordReader::open(path).map_err(|e| Error::Data {
            path: key.to_string(),
            msg: e.to_string(),
        })?;
        let mut set = SampleSet {
            ids: Arc::new(Vec::new()),
            target: Arc::new(Vec::new()),
            samples: Vec::new(),
            name: path.display().to_string(),
            summary: SftSummary::default(),
        };
        while let Some((at, record)) = records.next_record()? {
            let err = |msg: String| Error::Data {
                path: at.clone(),
                msg,
            };
            let messages = record
                .and_then(|r| conversation(r, &opts.format))
                .map_err(err)?;
            set.summary.records += 1;
            set.add(&messages, &template, &tokenizer, opts)
                .map_err(|e| err(strip_origin(&e, &template.origin)))?;
        }
        if set.samples.is_empty() {
            return Err(Error::Data {
                path: format!("{key} = {}", path.display()),
                msg: format!(
                    "holds no sample with a target token ({} records, {} dropped)",
                    set.summary.records, set.summary.dropped
                ),
            });
        }
        Ok(set)
    }

    /// Renders one conversation, tokenizes it and appends it as a sample (or counts it dropped).
    fn add(
        &mut self,
        messages: &[Message],
        template: &ChatTemplate,
        tokenizer: &Tokenizer,
        opts: &SampleOptions,
    ) -> Result<()> {
        let (text, spans) = template.render_with_assistant_spans(messages)?;
        let (ids, offsets) = tokenizer.encode_with_offsets(&text)?;
        let mut target: Vec<bool> = offsets
            .iter()
            .map(|&(start, _)| opts.train_on_prompt || spans.iter().any(|s| s.contains(&start)))
            .collect();
        let mut ids = ids;
        let max_len = opts.seq_len + 1;
        if ids.len() > max_len {
            ids.truncate(max_len);
            target.truncate(max_len);
            self.summary.truncated += 1;
        }
        // The first token is never a target (nothing precedes it).
        if ids.len() < 2 || !target[1..].iter().any(|&t| t) {
            self.summary.dropped += 1;
            return Ok(());
        }
        if let Some(&bad) = ids.iter().find(|&&id| i64::from(id) >= opts.vocab_size) {
            return Err(Error::Data {
                path: String::new(),
                msg: format!(
                    "tokenizes to id {bad} but model.vocab_size is {}",
                    opts.vocab_size
                ),
            });
        }
        let start = self.ids.len();
        self.summary.samples += 1;
        self.summary.tokens += ids.len() as u64;
        self.summary.target_tokens += target[1..].iter().filter(|&&t| t).count() as u64;
        Arc::make_mut(&mut self.ids).extend(ids);
        Arc::make_mut(&mut self.target).extend(target);
        self.samples.push(start..self.ids.len());
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Tokens in the samples (for a mixture's epochs: tokens drawn over tokens held).
    pub fn tokens(&self) -> usize {
        self.samples.iter().map(|s| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Tokens of sample `i`, minus one: the positions it takes in a row.
    fn cost(&self, i: usize) -> usize {
        self.samples[i].len() - 1
    }
}

/// An error from the template or tokenizer, without the template's path (the record's
/// `file:line` leads the message instead).
fn strip_origin(e: &Error, origin: &str) -> String {
    let text = e.to_string();
    text.strip_prefix(&format!("{origin}: "))
        .or_else(|| text.strip_prefix(": "))
        .unwrap_or(&text)
        .to_string()
}

/// The conversation of one record, or what is wrong with it.
fn conversation(
    value: serde_json::Value,
    format: &RecordFormat,
) -> std::result::Result<Vec<Message>, String> {
    let field = |name: &str| value.get(name).ok_or_else(|| format!("no field {name:?}"));
    let string = |name: &str| -> std::result::Result<String, String> {
        match field(name)? {
            serde_json::Value::String(s) => Ok(s.clone()),
            other => Err(format!(
                "field {name:?} is {}, not a string",
                json_kind(other)
            )),
        }
    };
    match format {
        RecordFormat::Instruction {
            prompt_field,
            response_field,
        } => Ok(vec![
            serde_json::json!({"role": "user", "content": string(prompt_field)?}),
            serde_json::json!({"role": "assistant", "content": string(response_field)?}),
        ]),
        RecordFormat::Chat { messages_field } => {
            let serde_json::Value::Array(messages) = field(messages_field)? else {
                return Err(format!(
                    "field {messages_field:?} is not a list of messages"
                ));
            };
            for (i, m) in messages.iter().enumerate() {
                let role = m
                    .get("role")
                    .and_then(|r| r.as_str())
                    .ok_or_else(|| format!("{messages_field}[{i}] has no \"role\" string"))?;
                if !ROLES.contains(&role) {
                    return Err(format!(
                        "{messages_field}[{i}] has role {role:?}; expected one of {}",
                        ROLES.join(", ")
                    ));
                }
                if !m.get("content").is_some_and(|c| c.is_string()) {
                    return Err(format!("{messages_field}[{i}] has no \"content\" string"));
                }
            }
            if messages.is_empty() {
                return Err(format!("field {messages_field:?} is an empty list"));
            }
            Ok(messages.clone())
        }
    }
}

/// Rows of samples for training batches: each epoch a permutation of the samples drawn from the
/// seed, packed (or one per row).
pub struct SampleRows {
    pub set: Arc<SampleSet>,
    pub packing: bool,
    seq_len: usize,
    /// Rows per micro-batch and micro-batches per step: a row's global number is a pure function
    /// of (step, micro, row).
    batch_size: usize,
    grad_accum: i64,
    seed: u64,
    /// The rows of the epochs computed so far (rows per epoch, and the latest epoch's rows).
    epochs: Mutex<EpochCache>,
}

#[derive(Default)]
struct EpochCache {
    /// Row counts of epochs 0..n.
    counts: Vec<u64>,
    current: Option<(u64, Arc<Vec<Vec<usize>>>)>,
}

impl SampleRows {
    pub fn new(
        set: Arc<SampleSet>,
        packing: bool,
        seq_len: usize,
        batch_size: usize,
        grad_accum: i64,
        seed: u64,
    ) -> SampleRows {
        SampleRows {
            set,
            packing,
            seq_len,
            batch_size,
            grad_accum,
            seed,
            epochs: Mutex::new(EpochCache::default()),
        }
    }

    /// The rows of epoch `e`: the samples in the epoch's order, next-fit packed.
    fn epoch_rows(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut order: Vec<usize> = (0..self.set.len()).collect();
        let mut rng =
            ChaCha8Rng::seed_from_u64(stream_seed(self.seed ^ EPOCH_SALT, epoch as i64, 0, 0));
        order.shuffle(&mut rng);
        pack(&self.set, &order, self.seq_len, self.packing)
    }

    /// The samples of global row `g` (rows numbered across epochs).
    pub fn row(&self, mut g: u64) -> Vec<usize> {
        let mut cache = self
            .epochs
            .lock()
            .expect("the epoch cache is never poisoned");
        let mut epoch = 0u64;
        loop {
            if epoch as usize == cache.counts.len() {
                let rows = self.epoch_rows(epoch);
                cache.counts.push(rows.len() as u64);
                cache.current = Some((epoch, Arc::new(rows)));
            }
            let n = cache.counts[epoch as usize];
            if g < n {
                break;
            }
            g -= n;
            epoch += 1;
        }
        let rows = match &cache.current {
            Some((e, rows)) if *e == epoch => rows.clone(),
            _ => {
                let rows = Arc::new(self.epoch_rows(epoch));
                cache.current = Some((epoch, rows.clone()));
                rows
            }
        };
        rows[g as usize].clone()
    }

    /// The training batch of (step, micro).
    pub fn batch(&self, step: i64, micro: i64) -> Batch {
        let first = ((step * self.grad_accum + micro) as u64) * self.batch_size as u64;
        let rows: Vec<Vec<usize>> = (0..self.batch_size as u64)
            .map(|r| self.row(first + r))
            .collect();
        rows_batch(&self.set, &rows, self.seq_len, self.packing, step, micro)
    }
}

/// Next-fit: samples in `order` fill a row while their positions fit in `seq_len`.
fn pack(set: &SampleSet, order: &[usize], seq_len: usize, packing: bool) -> Vec<Vec<usize>> {
    if !packing {
        return order.iter().map(|&i| vec![i]).collect();
    }
    let mut rows = Vec::new();
    let (mut row, mut used) = (Vec::new(), 0usize);
    for &i in order {
        let cost = set.cost(i);
        if used + cost > seq_len && !row.is_empty() {
            rows.push(std::mem::take(&mut row));
            used = 0;
        }
        row.push(i);
        used += cost;
    }
    if !row.is_empty() {
        rows.push(row);
    }
    rows
}

/// Validation batch `index`: rows of `plan` (`valid_rows`), wrapping around when the set has
/// fewer rows than the evaluation reads.
pub fn valid_rows_batch(
    set: &SampleSet,
    plan: &[Vec<usize>],
    seq_len: usize,
    packing: bool,
    batch_size: usize,
    index: usize,
) -> Batch {
    let rows: Vec<Vec<usize>> = (0..batch_size)
        .map(|r| plan[(index * batch_size + r) % plan.len()].clone())
        .collect();
    rows_batch(set, &rows, seq_len, packing, -1, index as i64)
}

/// The validation rows of a set: its samples in file order, packed (or one per row); computed
/// once per set, the same at every evaluation.
pub fn valid_rows(set: &SampleSet, seq_len: usize, packing: bool) -> Vec<Vec<usize>> {
    let order: Vec<usize> = (0..set.len()).collect();
    pack(set, &order, seq_len, packing)
}

/// Inputs, targets (-100 where nothing is learned), and with packing each position's sample
/// (`segments`) and its position within the sample.
fn rows_batch(
    set: &SampleSet,
    rows: &[Vec<usize>],
    seq_len: usize,
    packing: bool,
    step: i64,
    micro: i64,
) -> Batch {
    let mut buf = RowBuffers::new(rows.len(), seq_len);
    for (r, row) in rows.iter().enumerate() {
        fill_row(set, row, &mut buf, r);
    }
    buf.into_batch(step, micro, packing)
}

/// Writes the samples `row` into row `r` of `buf`: each sample's tokens as inputs, the next
/// token as target where it is one, the sample's number in the row as its segment and positions
/// from 0; the rest is padding with a segment of its own (no real token attends to it).
pub fn fill_row(set: &SampleSet, row: &[usize], buf: &mut RowBuffers, r: usize) {
    let mut at = 0usize;
    for (k, &i) in row.iter().enumerate() {
        let range = set.samples[i].clone();
        for j in 0..range.len() - 1 {
            let next = range.start + j + 1;
            let target = if set.target[next] {
                i64::from(set.ids[next])
            } else {
                -100
            };
            let input = i64::from(set.ids[range.start + j]);
            buf.put(r, at + j, input, target, k as i64, j as i64);
        }
        at += range.len() - 1;
    }
    for (j, p) in (at..buf.seq_len()).enumerate() {
        buf.put(r, p, 0, -100, row.len() as i64, j as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::config::{DecoderFamily, LlamaConfig, ModelConfig};
    use crate::models::params::ParamStore;
    use crate::models::transformer::{Packing, Transformer, TransformerConfig};
    use tch::Reduction;

    /// Three samples of lengths 5, 3 and 6; the first token of each is not a target, and the
    /// second sample's middle token is not either.
    fn three_samples() -> SampleSet {
        let ids: Vec<u32> = (0..14u32).map(|i| (i * 7 + 3) % 64).collect();
        let mut target = vec![true; 14];
        target[0] = false;
        target[5] = false;
        target[6] = false;
        target[8] = false;
        SampleSet {
            ids: Arc::new(ids),
            target: Arc::new(target),
            samples: vec![0..5, 5..8, 8..14],
            name: "test".into(),
            summary: SftSummary::default(),
        }
    }

    fn tiny_llama() -> Transformer {
        tch::manual_seed(5);
        let model = ModelConfig::Llama(LlamaConfig {
            vocab_size: 64,
            d_model: 16,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: Some(2),
            head_dim: None,
            d_ff: 24,
            max_seq_len: 16,
            rope_theta: 10000.0,
            norm_eps: 1e-6,
            tie_embeddings: false,
            moe: None,
            family: DecoderFamily::Llama,
            attention_bias: false,
            mlp_bias: false,
            rope_scaling: None,
            sliding_window: None,
            layer_types: None,
            multipliers: None,
            attention_softcap: None,
            logits_softcap: None,
            query_pre_attn_scalar: None,
            local_rope_theta: None,
            partial_rotary_factor: None,
        });
        let mut store = ParamStore::new(tch::Device::Cpu);
        Transformer::new(&TransformerConfig::from_recipe(&model), &mut store).expect("builds")
    }

    fn loss_sum(model: &Transformer, b: &Batch) -> f64 {
        let packing = b.segments.as_ref().map(|s| Packing {
            segments: s.shallow_clone(),
            positions: b.positions.as_ref().expect("with segments").shallow_clone(),
        });
        let logits = model
            .forward_full_packed(&b.inputs, false, packing.as_ref())
            .logits;
        Transformer::token_losses(&logits, &b.targets, Reduction::Sum).double_value(&[])
    }

    #[test]
    fn a_packed_row_costs_the_sum_of_its_samples_losses() {
        let set = three_samples();
        let model = tiny_llama();
        let packed = rows_batch(&set, &[vec![0, 1, 2]], 16, true, 0, 0);
        // 4 + 2 + 5 positions (4 + 1 + 5 targets), then padding that is never a target.
        let targets = Vec::<i64>::try_from(packed.targets.reshape([-1])).expect("ids");
        assert_eq!(targets.iter().filter(|&&t| t != -100).count(), 4 + 1 + 5);
        assert!(targets[11..].iter().all(|&t| t == -100));
        let alone: f64 = (0..3)
            .map(|i| loss_sum(&model, &rows_batch(&set, &[vec![i]], 16, false, 0, 0)))
            .sum();
        let together = loss_sum(&model, &packed);
        assert!(
            (together - alone).abs() < 1e-5 * alone.abs().max(1.0),
            "packed {together} vs one by one {alone}"
        );
        // Without the packing masks the samples would see each other: the loss changes.
        let mut leaky = rows_batch(&set, &[vec![0, 1, 2]], 16, true, 0, 0);
        leaky.segments = None;
        leaky.positions = None;
        assert!((loss_sum(&model, &leaky) - alone).abs() > 1e-4);
    }

    #[test]
    fn rows_are_a_pure_function_of_seed_and_step_and_cover_each_epoch() {
        let set = Arc::new(three_samples());
        let rows = |seed| SampleRows::new(set.clone(), false, 8, 1, 1, seed);
        let (a, b, c) = (rows(1), rows(1), rows(2));
        let ids = |r: &SampleRows, step| {
            Vec::<i64>::try_from(r.batch(step, 0).inputs.reshape([-1])).expect("ids")
        };
        let firsts = |r: &SampleRows, steps: std::ops::Range<i64>| -> Vec<i64> {
            steps.map(|s| ids(r, s)[0]).collect()
        };
        // Backwards and forwards: the same rows.
        assert_eq!(ids(&a, 4), ids(&b, 4));
        assert_eq!(
            firsts(&a, 0..9),
            firsts(&b, 0..9).into_iter().collect::<Vec<_>>()
        );
        let mut epoch0 = firsts(&a, 0..3);
        epoch0.sort();
        assert_eq!(epoch0, vec![3, 38, 59], "each sample once per epoch");
        assert_ne!(
            firsts(&a, 0..9),
            firsts(&c, 0..9),
            "another seed, another order"
        );
    }

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn records_become_masked_samples_and_bad_records_name_their_line() {
        let dir = tempfile::tempdir().expect("tempdir");
        let template = write(
            dir.path(),
            "t.jinja",
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}|{% endfor %}\
             {% if add_generation_prompt %}<assistant>{% endif %}",
        );
        let data = write(
            dir.path(),
            "chat.jsonl",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, \
             {\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
        );
        let opts = SampleOptions {
            format: RecordFormat::Chat {
                messages_field: "messages".into(),
            },
            tokenizer: Path::new("bytes"),
            template: Some(&template),
            template_vars: Default::default(),
            train_on_prompt: false,
            seq_len: 64,
            vocab_size: 256,
        };
        let set = SampleSet::open(&data, &opts, "data.train").expect("reads");
        let text: String = set.ids.iter().map(|&b| b as u8 as char).collect();
        assert_eq!(text, "<user>hi|<assistant>yo|");
        let learned: String = text
            .chars()
            .zip(set.target.iter())
            .filter(|(_, &t)| t)
            .map(|(c, _)| c)
            .collect();
        assert_eq!(learned, "yo|");
        let cases = [
            (
                "{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}",
                "has role \"robot\"",
            ),
            ("{\"messages\": [", "not JSON"),
            ("{\"other\": 1}", "no field \"messages\""),
            (
                "{\"messages\": [{\"role\": \"user\"}]}",
                "no \"content\" string",
            ),
        ];
        for (line, needle) in cases {
            let bad = write(dir.path(), "bad.jsonl", &format!("\n{line}\n"));
            let err = SampleSet::open(&bad, &opts, "data.train")
                .err()
                .expect("refused")
                .to_string();
            assert!(
                err.contains("bad.jsonl:2: ") && err.contains(needle),
                "{err}"
            );
        }
        // Template variables reach the template (apply_chat_template's keyword arguments).
        let tagged = write(
            dir.path(),
            "v.jinja",
            "{{ tag }}{% for m in messages %}{{ m.content }}{% endfor %}",
        );
        let with_vars = SampleOptions {
            template: Some(&tagged),
            template_vars: serde_json::json!({"tag": "T:"})
                .as_object()
                .expect("object")
                .clone(),
            train_on_prompt: true,
            ..opts
        };
        let set = SampleSet::open(&data, &with_vars, "data.train").expect("reads");
        let text: String = set.ids.iter().map(|&b| b as u8 as char).collect();
        assert_eq!(text, "T:hiyo");
        let opts = SampleOptions {
            template: Some(&template),
            template_vars: Default::default(),
            train_on_prompt: false,
            ..with_vars
        };
        let failing = write(
            dir.path(),
            "f.jinja",
            "{{ raise_exception('no system role') }}",
        );
        let opts = SampleOptions {
            template: Some(&failing),
            ..opts
        };
        let err = SampleSet::open(&data, &opts, "data.train")
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("chat.jsonl:1: the chat template failed: no system role"),
            "{err}"
        );
    }
}
