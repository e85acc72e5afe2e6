//! `[data]` in a language-model recipe: the training source (or a weighted mixture), validation
//! sets, and the source registry tagged by `kind`.
//!
//! ```toml
//! [data]
//! seq_len = 128
//! train = { kind = "builtin" }      # or { kind = "text", path }, { kind = "tokens", path, dtype }
//! valid_fraction = 0.1              # held out from the end of train when no data.valid is given
//! ```

use crate::validate::{check, positive, Invalid};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Tokens per training sequence; windows of seq_len + 1 tokens are read.
    pub seq_len: i64,
    /// The one training source; or, instead, `[data.mixture]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<SourceConfig>,
    /// Several named training sources drawn with weights (e.g. new data plus replay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mixture: Option<MixtureConfig>,
    /// A separate validation source; without one, the last `valid_fraction` of `train` is held out.
    #[serde(default)]
    pub valid: Option<SourceConfig>,
    /// Without `data.valid` or `valid_sets`: the fraction of `train` held out at its end for
    /// validation, in (0, 1).
    #[serde(default = "default_valid_fraction")]
    pub valid_fraction: f64,
    /// Named validation sets, each evaluated at every eval as its own curve (`split = name`).
    /// When given, they replace `data.valid` and the held-out parts: training sources are read
    /// whole.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schemars(!skip_serializing_if)]
    pub valid_sets: std::collections::BTreeMap<String, SourceConfig>,
    /// Chat and instruction sources: several samples per row, each attending only to itself
    /// with positions restarting at 0 (true), or one sample per row padded to seq_len (false).
    /// Default: true. Refused for other sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packing: Option<bool>,
    /// Token sources with a document index (`trainer tokenize` output, jsonl and parquet
    /// sources): each token attends only to earlier tokens of its own document, and positions
    /// restart at each document (Llama 3's pretraining mask). Every token source must have an
    /// index.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[schemars(!skip_serializing_if)]
    pub document_mask: bool,
}

/// `[data.mixture]`: `[[data.mixture.sources]]` tables, each `name`, `weight`, `source`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MixtureConfig {
    /// The sources, one `[[data.mixture.sources]]` table each.
    pub sources: Vec<MixtureSource>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MixtureSource {
    /// The source's name in metrics (letters, digits, `_`, `-`), unique in the mixture.
    pub name: String,
    /// Relative weight (normalised over the sources): the expected share of training sequences.
    pub weight: f64,
    /// Where the source's tokens come from.
    pub source: SourceConfig,
}

impl SourceConfig {
    pub fn path(&self) -> Option<&std::path::Path> {
        match self {
            SourceConfig::Builtin {} => None,
            SourceConfig::Text { path, .. }
            | SourceConfig::Tokens { path, .. }
            | SourceConfig::Jsonl { path, .. }
            | SourceConfig::Parquet { path, .. }
            | SourceConfig::Chat { path, .. }
            | SourceConfig::Instruction { path, .. } => Some(path),
        }
    }
}

/// A name used in metric keys and TensorBoard tags.
fn check_name(name: &str, key: &str) -> Result<(), Invalid> {
    check(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
        key,
        format!("expected a name of letters, digits, '_' or '-', got {name:?}"),
    )
}

/// A file-backed source must exist (checked at validation, so `trainer validate` catches it).
fn check_exists(src: &SourceConfig, key: &str) -> Result<(), Invalid> {
    match src.path() {
        Some(p) => check(
            p.is_file(),
            &format!("{key}.path"),
            format!("no such file: {}", p.display()),
        ),
        None => Ok(()),
    }
}

fn default_valid_fraction() -> f64 {
    0.1
}

/// The data source registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// The corpus that ships inside the binary (Alice's Adventures in Wonderland), byte-level.
    Builtin {},
    /// A UTF-8 text file: one token per byte (vocab 256), or its ids under `tokenizer`.
    Text {
        /// The text file.
        path: PathBuf,
        /// A tokenizer.json (or a directory holding one) that turns the text into ids (the
        /// whole file one document, no special tokens); absent: bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tokenizer: Option<PathBuf>,
    },
    /// A flat little-endian array of token ids (nanoGPT's `.bin`, or `trainer tokenize`'s
    /// output), memory-mapped.
    Tokens {
        /// The token file.
        path: PathBuf,
        /// Width of each token id in the file. Absent: the dtype in the `NAME.json` summary that
        /// `trainer tokenize` writes beside `NAME.bin`, else uint16.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        dtype: Option<TokenDtype>,
        /// The document index (`trainer tokenize`'s `NAME.idx`: little-endian u64 document
        /// starts, then the total). Absent: the one its summary names, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        index: Option<PathBuf>,
    },
    /// A JSONL file tokenized when the run starts (small sets; `trainer tokenize` for large
    /// ones): one document per record, the EOS of the tokenizer's tokenizer_config.json after
    /// each.
    Jsonl {
        /// The JSONL file.
        path: PathBuf,
        /// The field that holds each record's text.
        #[serde(default = "default_text_field")]
        field: String,
        /// A tokenizer.json (or a directory holding one); absent: bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tokenizer: Option<PathBuf>,
    },
    /// A Parquet file tokenized when the run starts (as `jsonl`): one document per row.
    Parquet {
        /// The Parquet file.
        path: PathBuf,
        /// The string column that holds each row's text.
        #[serde(default = "default_text_field")]
        column: String,
        /// A tokenizer.json (or a directory holding one); absent: bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tokenizer: Option<PathBuf>,
    },
    /// Chat fine-tuning data: JSONL (or Parquet, by the .parquet extension) records with a list of `{role, content}` messages (roles
    /// system, user, assistant, tool), rendered through the chat template; the loss trains on
    /// the assistant turns. Rows hold whole samples (`data.packing`).
    Chat {
        /// The JSONL file.
        path: PathBuf,
        /// A tokenizer.json or a directory holding one (a Hugging Face checkpoint); its
        /// tokenizer_config.json (or chat_template.jinja) gives the template and special tokens.
        tokenizer: PathBuf,
        /// A Jinja chat template file instead of the tokenizer's own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        template: Option<PathBuf>,
        /// Extra template variables, as extra keyword arguments of transformers'
        /// `apply_chat_template`: e.g. Llama 3's `date_string = "26 Jul 2024"` (which also keeps
        /// the rendered text the same on every day), Qwen3's `enable_thinking = false`.
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        #[schemars(!skip_serializing_if)]
        template_vars: std::collections::BTreeMap<String, TemplateValue>,
        /// The field that holds each record's messages.
        #[serde(default = "default_messages_field")]
        messages_field: String,
        /// Train on every token (system and user turns too), not only the assistant turns.
        #[serde(default)]
        train_on_prompt: bool,
    },
    /// Instruction data: JSONL (or Parquet) records with a prompt and a response, rendered through the chat
    /// template as a user turn and an assistant turn; the loss trains on the response.
    Instruction {
        /// The JSONL file.
        path: PathBuf,
        /// A tokenizer.json or a directory holding one (see `chat`).
        tokenizer: PathBuf,
        /// A Jinja chat template file instead of the tokenizer's own.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        template: Option<PathBuf>,
        /// Extra template variables, as extra keyword arguments of transformers'
        /// `apply_chat_template`: e.g. Llama 3's `date_string = "26 Jul 2024"` (which also keeps
        /// the rendered text the same on every day), Qwen3's `enable_thinking = false`.
        #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
        #[schemars(!skip_serializing_if)]
        template_vars: std::collections::BTreeMap<String, TemplateValue>,
        /// The field that holds the prompt.
        #[serde(default = "default_prompt_field")]
        prompt_field: String,
        /// The field that holds the response.
        #[serde(default = "default_response_field")]
        response_field: String,
        /// Train on the prompt's tokens too.
        #[serde(default)]
        train_on_prompt: bool,
    },
}

/// A chat template variable: a boolean, a number or a string.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum TemplateValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl TemplateValue {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            TemplateValue::Bool(b) => (*b).into(),
            TemplateValue::Int(i) => (*i).into(),
            TemplateValue::Float(f) => (*f).into(),
            TemplateValue::Text(t) => t.clone().into(),
        }
    }
}

fn default_messages_field() -> String {
    "messages".into()
}
fn default_prompt_field() -> String {
    "prompt".into()
}
fn default_response_field() -> String {
    "response".into()
}

fn default_text_field() -> String {
    "text".into()
}

impl SourceConfig {
    /// Ids one per byte: the built-in corpus, and text or JSONL without a tokenizer.
    pub fn is_bytes(&self) -> bool {
        match self {
            SourceConfig::Builtin {} => true,
            SourceConfig::Text { tokenizer, .. }
            | SourceConfig::Jsonl { tokenizer, .. }
            | SourceConfig::Parquet { tokenizer, .. } => tokenizer.is_none(),
            SourceConfig::Tokens { .. }
            | SourceConfig::Chat { .. }
            | SourceConfig::Instruction { .. } => false,
        }
    }

    /// Whole samples (chat, instruction) rather than a stream of tokens.
    pub fn is_samples(&self) -> bool {
        matches!(
            self,
            SourceConfig::Chat { .. } | SourceConfig::Instruction { .. }
        )
    }
}

#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TokenDtype {
    #[default]
    Uint16,
    Uint32,
}

impl TokenDtype {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenDtype::Uint16 => "uint16",
            TokenDtype::Uint32 => "uint32",
        }
    }

    pub fn width(self) -> usize {
        match self {
            TokenDtype::Uint16 => 2,
            TokenDtype::Uint32 => 4,
        }
    }
}

impl DataConfig {
    /// Range checks that the types cannot express, with `data.*` key paths; file-backed sources
    /// must exist. `vocab_size` is the model's: byte-level sources need 256 ids.
    pub fn validate(&self, vocab_size: i64) -> Result<(), Invalid> {
        let d = self;
        check(
            d.seq_len > 0,
            "data.seq_len",
            format!("expected a positive integer, got {}", d.seq_len),
        )?;
        check(
            d.valid_fraction > 0.0 && d.valid_fraction < 1.0,
            "data.valid_fraction",
            format!("expected a fraction in (0, 1), got {}", d.valid_fraction),
        )?;
        let sources = self.named_sources()?;
        self.check_samples(&sources)?;
        for (key, src) in sources {
            if src.is_bytes() {
                check(
                    vocab_size >= 256,
                    "model.vocab_size",
                    format!(
                        "{key} is byte-level (256 token ids) but model.vocab_size is {vocab_size}"
                    ),
                )?;
            }
        }
        Ok(())
    }

    /// `packing` only with chat or instruction sources somewhere; `document_mask` needs token
    /// sources with an index (and is not for samples alone, which `packing` keeps apart).
    fn check_samples(&self, sources: &[(String, &SourceConfig)]) -> Result<(), Invalid> {
        let train_samples = self.train.as_ref().is_some_and(|t| t.is_samples());
        check(
            !(self.document_mask && train_samples),
            "data.document_mask",
            "chat and instruction samples are kept apart by data.packing already",
        )?;
        if self.document_mask {
            if let Some((key, _)) = sources
                .iter()
                .find(|(_, s)| matches!(s, SourceConfig::Builtin {} | SourceConfig::Text { .. }))
            {
                return Err(Invalid {
                    key: "data.document_mask".into(),
                    msg: format!(
                        "{key} has no document index (tokenize it with trainer tokenize, or give \
                         it as jsonl or parquet)"
                    ),
                });
            }
        }
        check(
            self.packing.is_none() || sources.iter().any(|(_, s)| s.is_samples()),
            "data.packing",
            "applies to chat and instruction sources only",
        )
    }

    /// Whether the model runs with per-row masks and positions: packed samples, or windows
    /// kept within their documents.
    pub fn masks_rows(&self) -> bool {
        (self.has_samples() && self.packing()) || self.document_mask
    }

    /// Whether any training source (data.train, or a mixture's) is chat or instruction samples:
    /// the loss is then the mean over the step's target tokens.
    pub fn has_samples(&self) -> bool {
        self.is_samples()
            || self
                .mixture
                .as_ref()
                .is_some_and(|m| m.sources.iter().any(|s| s.source.is_samples()))
    }

    /// Chat and instruction sources: several samples per row (the default) or one.
    pub fn packing(&self) -> bool {
        self.packing.unwrap_or(true)
    }

    /// Whether the training data is chat or instruction samples.
    pub fn is_samples(&self) -> bool {
        self.train.as_ref().is_some_and(|t| t.is_samples())
    }

    /// Every source with its key path, checked: one of train or mixture, names valid and unique,
    /// weights non-negative with a positive sum, files present.
    fn named_sources(&self) -> Result<Vec<(String, &SourceConfig)>, Invalid> {
        let d = self;
        match (&d.train, &d.mixture) {
            (Some(_), Some(_)) => {
                return Err(Invalid {
                    key: "data.mixture".into(),
                    msg: "give either data.train or [data.mixture], not both".into(),
                })
            }
            (None, None) => {
                return Err(Invalid {
                    key: "data.train".into(),
                    msg: "missing: expected data.train = { kind = ... } or a [data.mixture]".into(),
                })
            }
            _ => {}
        }
        if let Some(m) = &d.mixture {
            m.validate()?;
        }
        if !d.valid_sets.is_empty() {
            check(
                d.valid.is_none(),
                "data.valid",
                "give either data.valid or [data.valid_sets], not both",
            )?;
        }
        for (name, src) in &d.valid_sets {
            let key = format!("data.valid_sets.{name}");
            check_name(name, &key)?;
            check_exists(src, &key)?;
        }
        Ok(self.sources())
    }

    /// Every source with its key path: `data.train`, `data.valid`, each mixture source, each
    /// named validation set.
    pub fn sources(&self) -> Vec<(String, &SourceConfig)> {
        let mut sources: Vec<(String, &SourceConfig)> = Vec::new();
        sources.extend(self.train.iter().map(|s| ("data.train".to_string(), s)));
        sources.extend(self.valid.iter().map(|s| ("data.valid".to_string(), s)));
        if let Some(m) = &self.mixture {
            for (i, s) in m.sources.iter().enumerate() {
                sources.push((format!("data.mixture.sources[{i}].source"), &s.source));
            }
        }
        for (name, s) in &self.valid_sets {
            sources.push((format!("data.valid_sets.{name}"), s));
        }
        sources
    }
}

impl MixtureConfig {
    fn validate(&self) -> Result<(), Invalid> {
        check(
            !self.sources.is_empty(),
            "data.mixture.sources",
            "expected at least one [[data.mixture.sources]]",
        )?;
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            let key = format!("data.mixture.sources[{i}]");
            check_name(&s.name, &format!("{key}.name"))?;
            check(
                seen.insert(s.name.as_str()),
                &format!("{key}.name"),
                format!("duplicate source name {:?}", s.name),
            )?;
            check(
                s.weight.is_finite() && s.weight >= 0.0,
                &format!("{key}.weight"),
                format!("expected a non-negative weight, got {}", s.weight),
            )?;
            check_exists(&s.source, &format!("{key}.source"))?;
        }
        check(
            self.sources.iter().map(|s| s.weight).sum::<f64>() > 0.0,
            "data.mixture.sources",
            "the weights are all zero; expected at least one positive weight",
        )
    }
}

// ---- `[data]` of an image-classification recipe (`task = "classify"`) ---------------------

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageDataConfig {
    /// The training images.
    pub train: ImageSourceConfig,
    /// Top-1/top-5 accuracy and loss are measured on this set.
    pub valid: ImageSourceConfig,
    /// Side of the square images the model sees. CIFAR and the built-in set are 32x32; folder
    /// images are resized (shorter side to `resize`) and center-cropped to it.
    #[serde(default = "default_image_size")]
    pub image_size: i64,
    /// Folder sources: the shorter side before the center crop; absent: `image_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<i64>,
    /// Training augmentation: pad by this many pixels (black) and crop back at a random offset;
    /// 0: no random crop.
    #[serde(default = "default_crop_padding")]
    pub crop_padding: i64,
    /// Training augmentation: flip half of the images left to right.
    #[serde(default = "default_true")]
    pub hflip: bool,
    /// Per-channel (R, G, B) normalisation of pixels scaled to [0, 1]: (x - mean) / std.
    /// Defaults: CIFAR-10's training-set statistics.
    #[serde(default = "default_mean")]
    pub mean: [f64; 3],
    /// Per-channel (R, G, B) standard deviation of the normalisation, pixels in [0, 1].
    #[serde(default = "default_std")]
    pub std: [f64; 3],
}

fn default_image_size() -> i64 {
    32
}
fn default_crop_padding() -> i64 {
    4
}
fn default_true() -> bool {
    true
}
/// CIFAR-10 training set, per channel, pixels in [0, 1].
pub const CIFAR10_MEAN: [f64; 3] = [0.4914, 0.4822, 0.4465];
pub const CIFAR10_STD: [f64; 3] = [0.2470, 0.2435, 0.2616];
fn default_mean() -> [f64; 3] {
    CIFAR10_MEAN
}
fn default_std() -> [f64; 3] {
    CIFAR10_STD
}

/// The image source registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageSourceConfig {
    /// The CIFAR-10 binary version (`cifar-10-batches-bin`): `path` is its directory; `train`
    /// reads `data_batch_*.bin`, `test` reads `test_batch.bin`.
    Cifar10 {
        /// The `cifar-10-batches-bin` directory.
        path: PathBuf,
        /// Which files are read: the training or the test set.
        split: Split,
    },
    /// The CIFAR-100 binary version (`cifar-100-binary`): `train.bin` or `test.bin`.
    Cifar100 {
        /// The `cifar-100-binary` directory.
        path: PathBuf,
        /// Which file is read: the training or the test set.
        split: Split,
        /// The 100 fine classes or the 20 coarse superclasses.
        #[serde(default)]
        labels: Cifar100Labels,
    },
    /// One sub-directory per class under `path`; class ids follow the sorted directory names.
    /// PNG and JPEG files.
    Folder {
        /// The directory holding one sub-directory per class.
        path: PathBuf,
    },
    /// A generated set of 10 classes of coloured shapes and stripes (32x32, with noise), the
    /// same on every machine: 5000 training or 1000 test images unless `images` says otherwise.
    BuiltinShapes {
        /// Which set is generated: the training or the test set.
        split: Split,
        /// How many images to generate; absent: 5000 (train) or 1000 (test).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        images: Option<i64>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Test,
}

#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Cifar100Labels {
    #[default]
    Fine,
    Coarse,
}

impl ImageSourceConfig {
    /// The number of classes, where the kind fixes it (folders: found when read).
    pub fn fixed_classes(&self) -> Option<i64> {
        match self {
            ImageSourceConfig::Cifar10 { .. } | ImageSourceConfig::BuiltinShapes { .. } => Some(10),
            ImageSourceConfig::Cifar100 {
                labels: Cifar100Labels::Fine,
                ..
            } => Some(100),
            ImageSourceConfig::Cifar100 {
                labels: Cifar100Labels::Coarse,
                ..
            } => Some(20),
            ImageSourceConfig::Folder { .. } => None,
        }
    }

    /// The side of the images, where the kind fixes it.
    pub fn fixed_size(&self) -> Option<i64> {
        match self {
            ImageSourceConfig::Folder { .. } => None,
            _ => Some(32),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ImageSourceConfig::Cifar10 { .. } => "cifar10",
            ImageSourceConfig::Cifar100 { .. } => "cifar100",
            ImageSourceConfig::Folder { .. } => "folder",
            ImageSourceConfig::BuiltinShapes { .. } => "builtin_shapes",
        }
    }
}

impl ImageDataConfig {
    /// Range checks that the types cannot express, with `data.*` key paths, against the model's
    /// `num_classes`. Validation never opens the data: how many images a folder holds is
    /// checked when the run opens it.
    pub fn validate(&self, num_classes: i64) -> Result<(), Invalid> {
        let d = self;
        positive(d.image_size, "data.image_size")?;
        if let Some(r) = d.resize {
            check(
                r >= d.image_size,
                "data.resize",
                format!(
                    "the shorter side ({r}) must be at least data.image_size ({})",
                    d.image_size
                ),
            )?;
        }
        check(
            d.crop_padding >= 0 && d.crop_padding < d.image_size,
            "data.crop_padding",
            format!(
                "expected 0 <= crop_padding < image_size ({}), got {}",
                d.image_size, d.crop_padding
            ),
        )?;
        for (i, s) in d.std.iter().enumerate() {
            check(
                *s > 0.0 && s.is_finite(),
                "data.std",
                format!("expected positive numbers, got std[{i}] = {s}"),
            )?;
        }
        for (i, m) in d.mean.iter().enumerate() {
            check(
                m.is_finite(),
                "data.mean",
                format!("expected finite numbers, got mean[{i}] = {m}"),
            )?;
        }
        for (key, src) in [("data.train", &d.train), ("data.valid", &d.valid)] {
            src.validate(key, d.image_size, num_classes)?;
        }
        Ok(())
    }
}

impl ImageSourceConfig {
    fn validate(&self, key: &str, image_size: i64, classes: i64) -> Result<(), Invalid> {
        if let Some(size) = self.fixed_size() {
            check(
                image_size == size,
                "data.image_size",
                format!(
                    "{key} ({}) has {size}x{size} images; set image_size = {size}",
                    self.kind()
                ),
            )?;
        }
        if let Some(n) = self.fixed_classes() {
            check(
                n == classes,
                "model.num_classes",
                format!(
                    "{key} ({}) has {n} classes but model.num_classes is {classes}",
                    self.kind()
                ),
            )?;
        }
        match self {
            ImageSourceConfig::BuiltinShapes {
                images: Some(n), ..
            } => positive(*n, &format!("{key}.images")),
            ImageSourceConfig::Cifar10 { path, .. }
            | ImageSourceConfig::Cifar100 { path, .. }
            | ImageSourceConfig::Folder { path } => check(
                !path.as_os_str().is_empty(),
                &format!("{key}.path"),
                "expected a path",
            ),
            ImageSourceConfig::BuiltinShapes { images: None, .. } => Ok(()),
        }
    }
}
