//! Reading a `config.json` so that every field is either honoured or refused by name.
//!
//! Each family's reader takes the fields it honours (`int`, `float_or`, ...), declares the ones
//! that must keep their default value (`must_be`) and the ones that do not change the
//! computation (`ignore`); `finish` then refuses whatever is left, so a field this tool does not
//! know (a quantization config, a new switch in a later transformers) is an error naming it,
//! never a silently different model.

use serde_json::{Map, Value};
use std::collections::BTreeSet;

/// Fields of transformers' `PretrainedConfig` and generation settings saved in config.json
/// that do not change a forward pass: bookkeeping, token ids (used by generation and
/// tokenizers, not by the model), initialisation, output switches, and generation defaults.
const NO_EFFECT: &[&str] = &[
    "model_type",
    "architectures",
    "transformers_version",
    "_name_or_path",
    "dtype",
    "torch_dtype",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "initializer_range",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "torchscript",
    "use_bfloat16",
    "tf_legacy_loss",
    "id2label",
    "label2id",
    "problem_type",
    "finetuning_task",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "chunk_size_feed_forward",
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_k",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
];

/// A config.json being read by one family: what was taken, what is left.
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    /// What the fields belong to, for errors: `model_type "qwen2"`, `rope_scaling (yarn)`.
    label: String,
    taken: BTreeSet<String>,
}

pub type Res<T> = std::result::Result<T, String>;

impl<'a> Fields<'a> {
    pub fn new(map: &'a Map<String, Value>, label: String) -> Fields<'a> {
        let mut f = Fields {
            map,
            label,
            taken: BTreeSet::new(),
        };
        f.ignore(NO_EFFECT);
        f
    }

    /// The structural switches of `PretrainedConfig` that a decoder-only model must leave off.
    pub fn decoder_only(&mut self) -> Res<()> {
        let off = [Value::Bool(false)];
        self.must_be("is_encoder_decoder", &off, "decoder-only models only")?;
        self.must_be("add_cross_attention", &off, "no cross-attention")?;
        self.must_be("tie_encoder_decoder", &off, "decoder-only models only")?;
        self.ignore(&["is_decoder"]);
        self.must_be(
            "pruned_heads",
            &[Value::Object(Map::new())],
            "heads pruned by transformers' prune_heads are not read; \
             use `trainer prune --method structured`",
        )
    }

    /// Whether config.json has `k` at all (null included).
    pub fn has(&self, k: &str) -> bool {
        self.map.contains_key(k)
    }

    /// The raw value of `k` (null counts as absent), marked as read.
    pub fn value(&mut self, k: &str) -> Option<&'a Value> {
        self.taken.insert(k.to_string());
        self.map.get(k).filter(|v| !v.is_null())
    }

    pub fn int(&mut self, k: &str) -> Res<i64> {
        self.opt_int(k)?
            .ok_or_else(|| format!("missing integer field {k:?}"))
    }

    pub fn opt_int(&mut self, k: &str) -> Res<Option<i64>> {
        match self.value(k) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| format!("{k} = {v}: expected an integer")),
        }
    }

    pub fn float(&mut self, k: &str) -> Res<f64> {
        self.opt_float(k)?
            .ok_or_else(|| format!("missing number field {k:?}"))
    }

    pub fn opt_float(&mut self, k: &str) -> Res<Option<f64>> {
        match self.value(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| format!("{k} = {v}: expected a number")),
        }
    }

    /// `k` where null means "off": absent gives `default` (the config class's default), null
    /// gives None (e.g. Gemma 2's `attn_logit_softcapping`, 50 when absent).
    pub fn float_unless_null(&mut self, k: &str, default: Option<f64>) -> Res<Option<f64>> {
        if self.has(k) {
            self.opt_float(k)
        } else {
            self.taken.insert(k.to_string());
            Ok(default)
        }
    }

    /// `float_unless_null` for integers (e.g. `sliding_window`).
    pub fn int_unless_null(&mut self, k: &str, default: Option<i64>) -> Res<Option<i64>> {
        if self.has(k) {
            self.opt_int(k)
        } else {
            self.taken.insert(k.to_string());
            Ok(default)
        }
    }

    pub fn float_or(&mut self, k: &str, default: f64) -> Res<f64> {
        match self.value(k) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| format!("{k} = {v}: expected a number")),
        }
    }

    pub fn bool_or(&mut self, k: &str, default: bool) -> Res<bool> {
        match self.value(k) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| format!("{k} = {v}: expected true or false")),
        }
    }

    /// Fields that do not change the computation of this family.
    pub fn ignore(&mut self, keys: &[&str]) {
        self.taken.extend(keys.iter().map(|k| k.to_string()));
    }

    /// `k` must be absent, null, or one of `allowed` (its value when it is not implemented).
    pub fn must_be(&mut self, k: &str, allowed: &[Value], why: &str) -> Res<()> {
        match self.value(k) {
            Some(v) if !allowed.contains(v) => Err(format!("unsupported {k} = {v}: {why}")),
            _ => Ok(()),
        }
    }

    /// Refuses the first field nothing took.
    pub fn finish(self) -> Res<()> {
        match self.map.keys().find(|k| !self.taken.contains(*k)) {
            None => Ok(()),
            Some(k) => Err(format!(
                "unsupported field {k:?} (= {}) in {}: this tool does not implement it, and a \
                 model read without it would compute something else",
                self.map[k], self.label
            )),
        }
    }
}
