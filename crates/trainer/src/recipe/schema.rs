//! The TOML schema of a recipe: typed sections, closed registries tagged by `kind`, defaults,
//! and range checks whose messages name the key path.
//!
//! Deserialization rejects unknown keys and wrong types (`deny_unknown_fields`); `validate`
//! rejects values out of range. Both are turned into one-line errors with the file location by
//! `recipe::load`.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub run: RunConfig,
    /// Where the initial weights come from; absent: a fresh random initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitConfig>,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub optim: OptimConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    pub train: TrainConfig,
    /// Parameter-efficient fine-tuning (`peft/`): LoRA adapters on a frozen base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peft: Option<PeftConfig>,
    /// Magnitude pruning during training (`prune/`), one-shot or gradual.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<PruneConfig>,
    /// Knowledge distillation from a frozen teacher (`distill/`, `recipe/distill.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<super::DistillConfig<ModelConfig>>,
}

/// A recipe as written: `[model]` may be left out when `[init] from` names a checkpoint that
/// carries its own architecture (`hf:PATH`'s config.json, or a trainer run's config.toml).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeFile {
    pub run: RunConfig,
    #[serde(default)]
    pub init: Option<InitConfig>,
    #[serde(default)]
    pub model: Option<ModelConfig>,
    pub data: DataConfig,
    pub optim: OptimConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    pub train: TrainConfig,
    #[serde(default)]
    pub peft: Option<PeftConfig>,
    #[serde(default)]
    pub prune: Option<PruneConfig>,
    #[serde(default)]
    pub distill: Option<super::DistillConfig<ModelConfig>>,
}

impl RecipeFile {
    pub fn with_model(self, model: ModelConfig) -> Recipe {
        Recipe {
            run: self.run,
            init: self.init,
            model,
            data: self.data,
            optim: self.optim,
            schedule: self.schedule,
            train: self.train,
            peft: self.peft,
            prune: self.prune,
            distill: self.distill,
        }
    }
}

/// `[peft]`: low-rank adapters on a frozen base model (see `peft/lora.rs` for the method and the
/// rule by which `target` patterns select projections).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PeftConfig {
    pub kind: PeftKind,
    /// Rank r of the update B A.
    pub rank: i64,
    /// The update is scaled by alpha / r (alpha / sqrt(r) with `rslora`); absent: alpha = r.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Dropout on the adapter's input (training only).
    #[serde(default)]
    pub dropout: f64,
    /// Name patterns of the projections to adapt, e.g. ["q_proj", "v_proj", "mlp.*"].
    pub target: Vec<String>,
    /// Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023; PEFT's `use_rslora`).
    #[serde(default)]
    pub rslora: bool,
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to start the
    /// adapters from instead of their fresh initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<PathBuf>,
    /// ReLoRA only (see `peft/relora.rs`): merge the adapters into the base weights,
    /// re-initialise them and reset their optimizer state every `merge_every` steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge_every: Option<i64>,
    /// ReLoRA only: how the adapters' optimizer state is reset at a merge (default "zero").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimizer_reset: Option<OptimizerReset>,
    /// ReLoRA with `optimizer_reset = "magnitude"`: the fraction of each adapter moment kept
    /// (the largest by magnitude); the rest is zeroed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_fraction: Option<f64>,
    /// ReLoRA only: after each merge the LR ramps linearly from 0 back to the main schedule over
    /// this many steps (the jagged schedule; default 0: no re-warm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewarm_steps: Option<i64>,
    /// ReLoRA only: train every weight full-rank for the first N steps, then switch to ReLoRA
    /// (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_rank_warmup_steps: Option<i64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PeftKind {
    /// LoRA (Hu et al. 2021): A and B trained.
    Lora,
    /// LoRA-FA (Zhang et al. 2023): A frozen at its random initialisation, only B trained.
    LoraFa,
    /// ReLoRA (Lialin et al. 2023): LoRA whose factors are merged and restarted periodically.
    Relora,
}

/// ReLoRA's reset of the adapters' optimizer state at each merge.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerReset {
    /// Zero the moments entirely.
    Zero,
    /// Keep the `keep_fraction` largest moments by magnitude, zero the rest.
    Magnitude,
}

impl PeftConfig {
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64)
    }

    /// The factor of the low-rank update: alpha / r, or alpha / sqrt(r) with `rslora`.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha() / (self.rank as f64).sqrt()
        } else {
            self.alpha() / self.rank as f64
        }
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        positive(self.rank, "peft.rank")?;
        if let Some(a) = self.alpha {
            positive_finite(a, "peft.alpha")?;
        }
        check(
            (0.0..1.0).contains(&self.dropout),
            "peft.dropout",
            format!("expected a probability in [0, 1), got {}", self.dropout),
        )?;
        check(
            !self.target.is_empty(),
            "peft.target",
            "expected at least one name pattern, e.g. [\"q_proj\", \"v_proj\"]",
        )?;
        for (i, p) in self.target.iter().enumerate() {
            check(
                !p.trim().is_empty(),
                "peft.target",
                format!("expected a non-empty name pattern, got target[{i}] = {p:?}"),
            )?;
        }
        if let Some(from) = &self.from {
            check(
                !from.as_os_str().is_empty(),
                "peft.from",
                "expected a PEFT adapter directory",
            )?;
        }
        self.validate_relora()
    }

    fn validate_relora(&self) -> Result<(), Invalid> {
        if self.kind != PeftKind::Relora {
            let set = [
                ("peft.merge_every", self.merge_every.is_some()),
                ("peft.optimizer_reset", self.optimizer_reset.is_some()),
                ("peft.keep_fraction", self.keep_fraction.is_some()),
                ("peft.rewarm_steps", self.rewarm_steps.is_some()),
                (
                    "peft.full_rank_warmup_steps",
                    self.full_rank_warmup_steps.is_some(),
                ),
            ];
            for (key, present) in set {
                check(!present, key, "only applies to kind = \"relora\"")?;
            }
            return Ok(());
        }
        let merge_every = self.merge_every.unwrap_or(0);
        check(
            self.merge_every.is_some(),
            "peft.merge_every",
            "expected a positive number of steps between ReLoRA merges (required for kind = \"relora\")",
        )?;
        positive(merge_every, "peft.merge_every")?;
        let rewarm = self.rewarm_steps.unwrap_or(0);
        check(
            rewarm >= 0,
            "peft.rewarm_steps",
            format!("expected a non-negative integer, got {rewarm}"),
        )?;
        check(
            rewarm < merge_every,
            "peft.rewarm_steps",
            format!("expected fewer steps than peft.merge_every ({merge_every}), got {rewarm}"),
        )?;
        let warm = self.full_rank_warmup_steps.unwrap_or(0);
        check(
            warm >= 0,
            "peft.full_rank_warmup_steps",
            format!("expected a non-negative integer, got {warm}"),
        )?;
        match (self.optimizer_reset.unwrap_or(OptimizerReset::Zero), self.keep_fraction) {
            (OptimizerReset::Zero, Some(_)) => check(
                false,
                "peft.keep_fraction",
                "only applies to optimizer_reset = \"magnitude\" (\"zero\" resets fully)",
            ),
            (OptimizerReset::Magnitude, None) => check(
                false,
                "peft.keep_fraction",
                "expected a fraction in [0, 1) of the moments to keep (required for optimizer_reset = \"magnitude\")",
            ),
            (OptimizerReset::Magnitude, Some(k)) => check(
                (0.0..1.0).contains(&k),
                "peft.keep_fraction",
                format!("expected a fraction in [0, 1), got {k}"),
            ),
            (OptimizerReset::Zero, None) => Ok(()),
        }
    }
}

/// Initial weights: `from = "hf:PATH"` (a Hugging Face directory: config.json + safetensors) or
/// the path of a trainer checkpoint (`.../checkpoints/step-N`) or run directory (its newest
/// checkpoint). Only the model weights are taken: optimizer, schedule and step start fresh.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    pub from: String,
    /// Sparse upcycling (Komatsuzaki et al. 2023): turn the dense Llama checkpoint into an MoE,
    /// every expert a copy of the layer's MLP, routers freshly initialised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upcycle: Option<MoeRecipe>,
    /// `"model"` (default): only the weights; optimizer, schedule and step start fresh.
    /// `"full"`: continue a trainer checkpoint: weights, optimizer state and step.
    #[serde(default, skip_serializing_if = "InitLoad::is_model")]
    pub load: InitLoad,
}

/// What `[init] from` carries over.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum InitLoad {
    #[default]
    Model,
    Full,
}

impl InitLoad {
    pub fn is_model(&self) -> bool {
        *self == InitLoad::Model
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub name: String,
    /// What the recipe trains: `pretrain` (a language model, this schema) or `classify` (images,
    /// the schema of `recipe/classify.rs`).
    #[serde(default, skip_serializing_if = "Task::is_pretrain")]
    pub task: Task,
    #[serde(default)]
    pub seed: u64,
    /// Run directory; relative paths are relative to the working directory.
    pub out_dir: PathBuf,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    #[serde(default)]
    pub precision: Precision,
    /// Intra-op threads for libtorch on CPU; 0 keeps libtorch's default.
    #[serde(default)]
    pub threads: u32,
    /// Peak dense TFLOP/s of the device at the run's precision (e.g. 989 for an H100 SXM in
    /// bf16); when given, the summary reports model FLOPs utilisation.
    #[serde(default)]
    pub peak_tflops: Option<f64>,
    /// Require deterministic kernels (`torch.use_deterministic_algorithms(True)`, cuDNN
    /// deterministic and not benchmarking; `device::set_deterministic`). Costs speed on CUDA;
    /// an op without a deterministic kernel is an error. The CPU is deterministic without it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deterministic: bool,
    /// Multi-process runs (`trainer launch`, torchrun or Slurm variables): seconds a rank waits
    /// at a collective (and at the rendezvous) before failing, so that a rank that died or hangs
    /// ends the run on every rank with an error instead of a hang.
    #[serde(
        default = "default_collective_timeout_s",
        skip_serializing_if = "is_default_collective_timeout_s"
    )]
    pub collective_timeout_s: f64,
    /// Multi-process runs: gradients are averaged in flat buckets of about this many MiB
    /// (DistributedDataParallel's `bucket_cap_mb`); each bucket's all-reduce starts as soon as its
    /// gradients are complete in the backward pass.
    #[serde(
        default = "default_bucket_mb",
        skip_serializing_if = "is_default_bucket_mb"
    )]
    pub bucket_mb: f64,
}

fn default_collective_timeout_s() -> f64 {
    300.0
}

fn default_bucket_mb() -> f64 {
    25.0
}

fn is_default_bucket_mb(v: &f64) -> bool {
    *v == default_bucket_mb()
}

fn is_default_collective_timeout_s(v: &f64) -> bool {
    *v == default_collective_timeout_s()
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    #[default]
    Pretrain,
    Classify,
}

impl Task {
    pub fn is_pretrain(&self) -> bool {
        *self == Task::Pretrain
    }
}

fn default_device() -> String {
    "auto".to_string()
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub enum Precision {
    /// fp32 weights and compute.
    #[default]
    #[serde(rename = "fp32")]
    Fp32,
    /// fp32 master weights and optimizer state, bf16 compute through CUDA autocast.
    #[serde(rename = "bf16-mixed")]
    Bf16Mixed,
    /// bf16 weights, gradients, optimizer state and compute.
    #[serde(rename = "bf16")]
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16Mixed => "bf16-mixed",
            Precision::Bf16 => "bf16",
        }
    }
}

/// The model registry. Each `kind` is one family of `models/transformer.rs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelConfig {
    /// RMSNorm, RoPE, SwiGLU, grouped-query attention, optional tied embeddings.
    Llama {
        vocab_size: i64,
        d_model: i64,
        n_layers: i64,
        n_heads: i64,
        /// Key/value heads for grouped-query attention; defaults to n_heads.
        #[serde(default)]
        n_kv_heads: Option<i64>,
        /// Hidden width of the SwiGLU MLP (`intermediate_size`).
        d_ff: i64,
        /// Width of each attention head; absent: d_model / n_heads. Set when heads were pruned
        /// (`trainer prune --method structured --heads`), as Hugging Face's `head_dim`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        head_dim: Option<i64>,
        max_seq_len: i64,
        #[serde(default = "default_rope_theta")]
        rope_theta: f64,
        #[serde(default = "default_norm_eps")]
        norm_eps: f64,
        #[serde(default)]
        tie_embeddings: bool,
        /// Mixture-of-Experts feed-forward layers in place of the dense SwiGLU (Mixtral-style).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        moe: Option<MoeRecipe>,
    },
    /// LayerNorm, learned positions, GELU, biases, tied embeddings.
    Gpt2 {
        vocab_size: i64,
        d_model: i64,
        n_layers: i64,
        n_heads: i64,
        /// Hidden width of the MLP; defaults to 4 * d_model.
        #[serde(default)]
        d_ff: Option<i64>,
        max_seq_len: i64,
        #[serde(default = "default_gpt2_eps")]
        norm_eps: f64,
        #[serde(default)]
        dropout: f64,
    },
}

/// `[model.moe]`: every layer's MLP becomes `n_experts` SwiGLU experts of width `d_ff` with a
/// router choosing `top_k` per token (see `models/moe.rs`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MoeRecipe {
    pub n_experts: i64,
    pub top_k: i64,
    #[serde(default)]
    pub routing: RoutingKind,
    /// Per-expert capacity factor with token dropping in training; absent: no dropping.
    #[serde(default)]
    pub capacity_factor: Option<f64>,
    /// Weight of the Switch load-balancing loss added to the training loss.
    #[serde(default = "default_aux_loss_coef")]
    pub aux_loss_coef: f64,
    /// Weight of the router z-loss (ST-MoE) added to the training loss.
    #[serde(default)]
    pub z_loss_coef: f64,
    /// One always-on SwiGLU expert beside the routed ones.
    #[serde(default)]
    pub shared_expert: bool,
}

fn default_aux_loss_coef() -> f64 {
    0.01
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RoutingKind {
    /// Mixtral: softmax over all experts, top k, renormalised.
    #[default]
    SoftmaxTopK,
    /// Top k logits, softmax over those k.
    TopKSoftmax,
    /// Switch Transformer: top-1 weighted by its probability.
    Switch,
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_gpt2_eps() -> f64 {
    1e-5
}

impl ModelConfig {
    pub fn vocab_size(&self) -> i64 {
        match self {
            ModelConfig::Llama { vocab_size, .. } | ModelConfig::Gpt2 { vocab_size, .. } => {
                *vocab_size
            }
        }
    }
    pub fn max_seq_len(&self) -> i64 {
        match self {
            ModelConfig::Llama { max_seq_len, .. } | ModelConfig::Gpt2 { max_seq_len, .. } => {
                *max_seq_len
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    #[serde(default = "default_valid_fraction")]
    pub valid_fraction: f64,
    /// Named validation sets, each evaluated at every eval as its own curve (`split = name`).
    /// When given, they replace `data.valid` and the held-out parts: training sources are read
    /// whole.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub valid_sets: std::collections::BTreeMap<String, SourceConfig>,
}

/// `[data.mixture]`: `[[data.mixture.sources]]` tables, each `name`, `weight`, `source`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MixtureConfig {
    pub sources: Vec<MixtureSource>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MixtureSource {
    pub name: String,
    /// Relative weight (normalised over the sources): the expected share of training sequences.
    pub weight: f64,
    pub source: SourceConfig,
}

impl SourceConfig {
    fn path(&self) -> Option<&std::path::Path> {
        match self {
            SourceConfig::Builtin {} => None,
            SourceConfig::Text { path } | SourceConfig::Tokens { path, .. } => Some(path),
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SourceConfig {
    /// The corpus that ships inside the binary (Alice's Adventures in Wonderland), byte-level.
    Builtin {},
    /// A UTF-8 text file, tokenised to bytes (vocab 256).
    Text { path: PathBuf },
    /// A flat little-endian array of token ids (nanoGPT's `.bin`), memory-mapped.
    Tokens {
        path: PathBuf,
        #[serde(default)]
        dtype: TokenDtype,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
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

/// The optimizer registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimConfig {
    /// AdamW with decoupled weight decay (torch.optim.AdamW's update).
    Adamw {
        lr: f64,
        #[serde(default = "default_betas")]
        betas: [f64; 2],
        #[serde(default = "default_eps")]
        eps: f64,
        #[serde(default = "default_weight_decay")]
        weight_decay: f64,
        /// Decay embeddings too (norms and biases are never decayed).
        #[serde(default)]
        decay_embeddings: bool,
        /// Use libtorch's fused AdamW kernel (`at::_fused_adamw_`, CPU and CUDA; one pass per
        /// group); absent: yes. `false`: the per-parameter update, op for op torch's
        /// single-tensor AdamW.
        #[serde(default)]
        fused: Option<bool>,
        /// 32 (default) or 8: the moments block-wise quantised to 8 bits (`optim/moment.rs`).
        #[serde(default = "default_state_bits", skip_serializing_if = "is_32")]
        state_bits: u32,
        /// Layer-wise updates: each parameter is updated as soon as its gradient is complete
        /// during the backward pass and its gradient freed, so the whole model's gradients are
        /// never held at once (no gradient clipping, one process).
        #[serde(default, skip_serializing_if = "is_false")]
        layerwise: bool,
    },
    /// SGD with momentum and optional Nesterov (torch.optim.SGD's update).
    Sgd {
        lr: f64,
        #[serde(default)]
        momentum: f64,
        #[serde(default)]
        dampening: f64,
        #[serde(default)]
        nesterov: bool,
        #[serde(default)]
        weight_decay: f64,
    },
    /// GaLore-AdamW (Zhao et al. 2024): AdamW whose moments live in a rank-`rank` projection of
    /// each targeted 2-D weight's gradient (galore_torch.GaLoreAdamW's update); other parameters
    /// get that AdamW unprojected. Defaults are galore-torch's.
    GaloreAdamw {
        lr: f64,
        #[serde(default = "default_galore_betas")]
        betas: [f64; 2],
        #[serde(default = "default_galore_eps")]
        eps: f64,
        #[serde(default)]
        weight_decay: f64,
        rank: i64,
        /// Steps between SVD refreshes of the projectors.
        #[serde(default = "default_update_proj_gap")]
        update_proj_gap: i64,
        /// Multiplies the projected-back update.
        #[serde(default = "default_galore_scale")]
        scale: f64,
        /// Name patterns (substrings, `*` for any run) of the 2-D weights to project; empty:
        /// every 2-D weight except embeddings and lm_head.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        target: Vec<String>,
        /// 32 (default) or 8: the low-rank moments block-wise quantised to 8 bits (8-bit GaLore).
        #[serde(default = "default_state_bits", skip_serializing_if = "is_32")]
        state_bits: u32,
        /// Layer-wise updates, as for adamw (the GaLore paper's per-layer weight updates).
        #[serde(default, skip_serializing_if = "is_false")]
        layerwise: bool,
    },
    /// Global sparse momentum SGD (`optim/gsm.rs`): each step only the `density` most salient
    /// prunable weights (by |w * g|, ranked across all layers) get the objective's gradient; the
    /// others only decay towards zero. At `cut_step` (default: the end of the run) the smallest
    /// weights are cut to exact zeros and the mask is kept.
    Gsm {
        lr: f64,
        #[serde(default = "default_gsm_momentum")]
        momentum: f64,
        #[serde(default)]
        nesterov: bool,
        /// Drives the unselected weights to zero: must be positive.
        #[serde(default = "default_gsm_weight_decay")]
        weight_decay: f64,
        /// Fraction of the prunable weights that survive, in (0, 1).
        density: f64,
        /// Name patterns of the prunable weights; empty: linear and convolution weights.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        prunable: Vec<String>,
        /// Optimizer steps after which the cut happens; absent: the end of the run.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cut_step: Option<i64>,
    },
}

fn default_state_bits() -> u32 {
    32
}
fn is_false(b: &bool) -> bool {
    !*b
}
fn is_32(bits: &u32) -> bool {
    *bits == 32
}
fn default_gsm_momentum() -> f64 {
    0.9
}
fn default_gsm_weight_decay() -> f64 {
    1e-4
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.95]
}
fn default_galore_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_galore_eps() -> f64 {
    1e-6
}
fn default_update_proj_gap() -> i64 {
    200
}
fn default_galore_scale() -> f64 {
    1.0
}
fn default_eps() -> f64 {
    1e-8
}
fn default_weight_decay() -> f64 {
    0.1
}

impl OptimConfig {
    pub fn lr(&self) -> f64 {
        match self {
            OptimConfig::Adamw { lr, .. }
            | OptimConfig::Sgd { lr, .. }
            | OptimConfig::GaloreAdamw { lr, .. }
            | OptimConfig::Gsm { lr, .. } => *lr,
        }
    }

    /// The momentum the optimizer starts from: SGD's and GSM's `momentum`, AdamW's and
    /// GaLore-AdamW's `betas[0]`.
    pub fn momentum(&self) -> f64 {
        match self {
            OptimConfig::Adamw { betas, .. } | OptimConfig::GaloreAdamw { betas, .. } => betas[0],
            OptimConfig::Sgd { momentum, .. } | OptimConfig::Gsm { momentum, .. } => *momentum,
        }
    }

    /// `layerwise = true` (AdamW and GaLore-AdamW).
    pub fn layerwise(&self) -> bool {
        match self {
            OptimConfig::Adamw { layerwise, .. } | OptimConfig::GaloreAdamw { layerwise, .. } => {
                *layerwise
            }
            OptimConfig::Sgd { .. } | OptimConfig::Gsm { .. } => false,
        }
    }

    pub fn weight_decay(&self) -> f64 {
        match self {
            OptimConfig::Adamw { weight_decay, .. }
            | OptimConfig::Sgd { weight_decay, .. }
            | OptimConfig::GaloreAdamw { weight_decay, .. }
            | OptimConfig::Gsm { weight_decay, .. } => *weight_decay,
        }
    }
}

/// `[schedule]`: the learning-rate schedule registry, defined beside the schedules themselves.
pub use crate::schedule::{DecayShape, PhaseConfig, PhaseShape, ScheduleConfig};

/// `[prune]`: magnitude pruning during training, defined beside the pruning code.
pub use crate::prune::PruneConfig;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Sequences per micro-batch.
    pub batch_size: i64,
    /// Micro-batches per optimizer step.
    #[serde(default = "one")]
    pub grad_accum: i64,
    /// Length of the run in optimizer steps; give this or `max_tokens`.
    #[serde(default)]
    pub max_steps: Option<i64>,
    /// Length of the run in training tokens, rounded up to whole steps.
    #[serde(default)]
    pub max_tokens: Option<i64>,
    /// Clip the global gradient norm to this value; absent: no clipping.
    #[serde(default)]
    pub clip_grad_norm: Option<f64>,
    /// Evaluate every this many steps (and always at the end); absent: only at the end.
    #[serde(default)]
    pub eval_every: Option<i64>,
    #[serde(default = "default_eval_batches")]
    pub eval_batches: i64,
    #[serde(default = "default_log_every")]
    pub log_every: i64,
    /// Checkpoint every this many steps (and always at the end); absent: only at the end.
    #[serde(default)]
    pub checkpoint_every: Option<i64>,
    /// How many checkpoints to keep; older ones are deleted once a newer one is complete.
    #[serde(default = "default_keep")]
    pub keep_checkpoints: i64,
    /// `[train.reweight]`: loss-based sample reweighting (`data/reweight.rs`); absent: every
    /// sequence counts the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reweight: Option<crate::data::reweight::ReweightConfig>,
    /// How `optim.weight_decay` changes over the run; absent: `constant`.
    #[serde(default, skip_serializing_if = "WeightDecaySchedule::is_constant")]
    pub weight_decay_schedule: WeightDecaySchedule,
    /// How the optimizer's momentum (SGD's `momentum`, AdamW's and GaLore's `betas[0]`) changes
    /// over the run; absent: `constant`.
    #[serde(default, skip_serializing_if = "MomentumSchedule::is_constant")]
    pub momentum_schedule: MomentumSchedule,
    /// The momentum at the LR's peak with `momentum_schedule = "inverse_lr"` (required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum_min: Option<f64>,
}

/// `train.weight_decay_schedule`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WeightDecaySchedule {
    /// `optim.weight_decay` at every step.
    #[default]
    Constant,
    /// `optim.weight_decay * lr / optim.lr`: the coefficient follows the LR schedule's phases
    /// (warmup, decay, re-warm), at its full value where the LR is at its peak. With AdamW's
    /// decoupled decay `p *= 1 - lr * wd` the per-step shrink is then `lr^2 * wd / optim.lr`.
    FollowLr,
}

impl WeightDecaySchedule {
    fn is_constant(&self) -> bool {
        *self == WeightDecaySchedule::Constant
    }
}

/// `train.momentum_schedule`.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MomentumSchedule {
    /// The optimizer's own momentum at every step.
    #[default]
    Constant,
    /// `max - (max - train.momentum_min) * lr / optim.lr`, max the optimizer's own momentum:
    /// high momentum while the LR is low, `momentum_min` at its peak. The cyclical momentum of
    /// Smith's 1cycle policy (PyTorch's `OneCycleLR(cycle_momentum=True)`, which moves Adam's
    /// beta1), driven by whatever phases the LR schedule has.
    InverseLr,
}

impl MomentumSchedule {
    fn is_constant(&self) -> bool {
        *self == MomentumSchedule::Constant
    }

    /// The momentum for a step at learning rate `lr` (`peak_lr` = `optim.lr`), or None when the
    /// optimizer's own momentum stays. `max` is that momentum, `min` is `train.momentum_min`.
    pub fn momentum(&self, max: f64, min: Option<f64>, lr: f64, peak_lr: f64) -> Option<f64> {
        match (self, min) {
            (MomentumSchedule::InverseLr, Some(min)) => Some(max - (max - min) * (lr / peak_lr)),
            _ => None,
        }
    }
}

fn one() -> i64 {
    1
}
fn default_eval_batches() -> i64 {
    10
}
fn default_log_every() -> i64 {
    10
}
fn default_keep() -> i64 {
    3
}

/// A failed range check: the key path and what was expected.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub key: String,
    pub msg: String,
}

pub(crate) fn check(ok: bool, key: &str, msg: impl Into<String>) -> Result<(), Invalid> {
    if ok {
        Ok(())
    } else {
        Err(Invalid {
            key: key.to_string(),
            msg: msg.into(),
        })
    }
}

impl RunConfig {
    /// The `[run]` checks every recipe type shares.
    pub fn validate(&self) -> Result<(), Invalid> {
        let r = self;
        check(
            !r.name.trim().is_empty(),
            "run.name",
            "expected a non-empty name",
        )?;
        check(
            !r.out_dir.as_os_str().is_empty(),
            "run.out_dir",
            "expected a directory path",
        )?;
        check(
            crate::device::parse_device_spec(&r.device).is_some(),
            "run.device",
            format!("expected auto, cpu, cuda or cuda:N, got {:?}", r.device),
        )?;
        check(r.threads <= 1024, "run.threads", "expected at most 1024")?;
        if let Some(p) = r.peak_tflops {
            positive_finite(p, "run.peak_tflops")?;
        }
        positive_finite(r.collective_timeout_s, "run.collective_timeout_s")?;
        positive_finite(r.bucket_mb, "run.bucket_mb")?;
        Ok(())
    }
}

impl Recipe {
    /// Range checks that the types cannot express. The first failure is returned.
    pub fn validate(&self) -> Result<(), Invalid> {
        self.run.validate()?;
        if let Some(init) = &self.init {
            if let Some(up) = &init.upcycle {
                validate_moe(up, "init.upcycle")?;
            }
            if init.load == InitLoad::Full {
                check(
                    !init.from.trim().starts_with("hf:"),
                    "init.load",
                    "\"full\" continues a trainer checkpoint (weights, optimizer, step); an hf: model has \
                     only weights: use load = \"model\"",
                )?;
                check(init.upcycle.is_none(), "init.load", "\"full\" cannot be combined with init.upcycle (the optimizer state is for the dense model)")?;
                check(
                    self.peft.is_none(),
                    "init.load",
                    "\"full\" cannot be combined with [peft]; use load = \"model\"",
                )?;
            }
            check(
                !init.from.trim().is_empty() && init.from.trim() != "hf:",
                "init.from",
                "expected \"hf:PATH\" or the path of a trainer checkpoint or run directory",
            )?;
        }
        self.validate_model()?;
        self.validate_data()?;
        self.validate_optim()?;
        self.validate_train()?;
        self.validate_layerwise()?;
        if let Some(p) = &self.peft {
            p.validate()?;
        }
        if let Some(d) = &self.distill {
            d.validate()?;
        }
        Ok(())
    }

    fn validate_model(&self) -> Result<(), Invalid> {
        let seq_len = self.data.seq_len;
        match &self.model {
            ModelConfig::Llama {
                vocab_size,
                d_model,
                n_layers,
                n_heads,
                n_kv_heads,
                d_ff,
                max_seq_len,
                rope_theta,
                norm_eps,
                moe,
                head_dim,
                ..
            } => {
                match head_dim {
                    None => common_model_checks(
                        *vocab_size,
                        *d_model,
                        *n_layers,
                        *n_heads,
                        *max_seq_len,
                    )?,
                    Some(hd) => {
                        // The width check below needs no divisibility when the head width is given.
                        common_model_checks(
                            *vocab_size,
                            *d_model,
                            *n_layers,
                            *n_heads,
                            *max_seq_len,
                        )
                        .or_else(|e| {
                            if e.key == "model.d_model" {
                                Ok(())
                            } else {
                                Err(e)
                            }
                        })?;
                        check(
                            *hd > 0 && hd % 2 == 0,
                            "model.head_dim",
                            format!(
                                "expected a positive even integer (RoPE rotates pairs), got {hd}"
                            ),
                        )?;
                    }
                }
                check(
                    *d_ff > 0,
                    "model.d_ff",
                    format!("expected a positive integer, got {d_ff}"),
                )?;
                let kv = n_kv_heads.unwrap_or(*n_heads);
                check(
                    kv > 0,
                    "model.n_kv_heads",
                    format!("expected a positive integer, got {kv}"),
                )?;
                check(
                    n_heads % kv == 0,
                    "model.n_kv_heads",
                    format!("n_heads ({n_heads}) must be divisible by n_kv_heads ({kv})"),
                )?;
                check(
                    head_dim.is_some() || (d_model / n_heads) % 2 == 0,
                    "model.d_model",
                    format!(
                        "head size d_model/n_heads = {} must be even for RoPE",
                        d_model / n_heads
                    ),
                )?;
                check(
                    *rope_theta > 0.0,
                    "model.rope_theta",
                    "expected a positive number",
                )?;
                check(
                    *norm_eps > 0.0,
                    "model.norm_eps",
                    "expected a positive number",
                )?;
                if let Some(m) = moe {
                    validate_moe(m, "model.moe")?;
                }
            }
            ModelConfig::Gpt2 {
                vocab_size,
                d_model,
                n_layers,
                n_heads,
                d_ff,
                max_seq_len,
                norm_eps,
                dropout,
            } => {
                common_model_checks(*vocab_size, *d_model, *n_layers, *n_heads, *max_seq_len)?;
                if let Some(d_ff) = d_ff {
                    check(
                        *d_ff > 0,
                        "model.d_ff",
                        format!("expected a positive integer, got {d_ff}"),
                    )?;
                }
                check(
                    *norm_eps > 0.0,
                    "model.norm_eps",
                    "expected a positive number",
                )?;
                check(
                    (0.0..1.0).contains(dropout),
                    "model.dropout",
                    format!("expected a probability in [0, 1), got {dropout}"),
                )?;
            }
        }
        check(
            seq_len <= self.model.max_seq_len(),
            "data.seq_len",
            format!(
                "seq_len ({seq_len}) must not exceed model.max_seq_len ({})",
                self.model.max_seq_len()
            ),
        )
    }

    fn validate_data(&self) -> Result<(), Invalid> {
        let d = &self.data;
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
        let mut sources: Vec<(String, &SourceConfig)> = Vec::new();
        if let Some(t) = &d.train {
            sources.push(("data.train".into(), t));
        }
        if let Some(v) = &d.valid {
            sources.push(("data.valid".into(), v));
        }
        if let Some(m) = &d.mixture {
            check(
                !m.sources.is_empty(),
                "data.mixture.sources",
                "expected at least one [[data.mixture.sources]]",
            )?;
            let mut seen = std::collections::BTreeSet::new();
            for (i, s) in m.sources.iter().enumerate() {
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
                sources.push((format!("{key}.source"), &s.source));
            }
            check(
                m.sources.iter().map(|s| s.weight).sum::<f64>() > 0.0,
                "data.mixture.sources",
                "the weights are all zero; expected at least one positive weight",
            )?;
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
            sources.push((key, src));
        }
        for (key, src) in sources.iter().map(|(k, s)| (k.as_str(), Some(*s))) {
            if let Some(SourceConfig::Builtin {} | SourceConfig::Text { .. }) = src {
                check(
                    self.model.vocab_size() >= 256,
                    "model.vocab_size",
                    format!(
                        "{key} is byte-level (256 token ids) but model.vocab_size is {}",
                        self.model.vocab_size()
                    ),
                )?;
            }
        }
        Ok(())
    }

    fn validate_optim(&self) -> Result<(), Invalid> {
        validate_optim_schedule(&self.optim, &self.schedule)
    }

    /// `optim.layerwise`: each parameter is updated inside the backward pass, so nothing may
    /// need all the gradients at once or run several backward passes per micro-batch.
    fn validate_layerwise(&self) -> Result<(), Invalid> {
        if !self.optim.layerwise() {
            return Ok(());
        }
        let key = "optim.layerwise";
        check(
            self.train.clip_grad_norm.is_none(),
            key,
            "cannot clip the global gradient norm (each parameter is updated before the others' gradients exist): remove train.clip_grad_norm",
        )?;
        check(
            self.distill.is_none(),
            key,
            "cannot be combined with [distill] (its chunked backward passes complete a gradient more than once)",
        )?;
        check(
            !matches!(&self.peft, Some(p) if p.kind == PeftKind::Relora),
            key,
            "cannot be combined with ReLoRA (its merges and optimizer resets run between whole steps)",
        )
    }
}

/// `[optim]` and `[schedule]` range checks, shared by every recipe type (pretrain, classify).
pub(crate) fn validate_optim_schedule(
    optim: &OptimConfig,
    schedule: &ScheduleConfig,
) -> Result<(), Invalid> {
    OptimSections { optim, schedule }.validate()
}

/// The sections that the optimizer and schedule checks read.
struct OptimSections<'a> {
    optim: &'a OptimConfig,
    schedule: &'a ScheduleConfig,
}

/// `[prune]` and GSM's cut against the run's length; the two do not combine.
pub(crate) fn validate_pruning(
    prune: Option<&PruneConfig>,
    optim: &OptimConfig,
    total_steps: i64,
) -> Result<(), Invalid> {
    if let Some(p) = prune {
        check(
            !matches!(optim, OptimConfig::Gsm { .. }),
            "prune",
            "[prune] and optim.kind = \"gsm\" both prune; use one of them",
        )?;
        p.validate(total_steps)?;
    }
    if let OptimConfig::Gsm {
        cut_step: Some(c), ..
    } = optim
    {
        check(
            *c <= total_steps,
            "optim.cut_step",
            format!("expected a step in [0, {total_steps}] (the run's length), got {c}"),
        )?;
    }
    Ok(())
}

fn check_state_bits(bits: u32) -> Result<(), Invalid> {
    check(
        bits == 32 || bits == 8,
        "optim.state_bits",
        format!("expected 32 or 8, got {bits}"),
    )
}

/// The checks AdamW and GaLore-AdamW share.
fn validate_adam(lr: f64, betas: &[f64; 2], eps: f64, weight_decay: f64) -> Result<(), Invalid> {
    positive_finite(lr, "optim.lr")?;
    for (i, b) in betas.iter().enumerate() {
        check(
            (0.0..1.0).contains(b),
            "optim.betas",
            format!("expected betas in [0, 1), got betas[{i}] = {b}"),
        )?;
    }
    positive_finite(eps, "optim.eps")?;
    check(
        weight_decay >= 0.0,
        "optim.weight_decay",
        "expected a non-negative number",
    )
}

impl OptimSections<'_> {
    fn validate(&self) -> Result<(), Invalid> {
        match &self.optim {
            OptimConfig::Adamw {
                lr,
                betas,
                eps,
                weight_decay,
                fused,
                state_bits,
                ..
            } => {
                validate_adam(*lr, betas, *eps, *weight_decay)?;
                check_state_bits(*state_bits)?;
                check(
                    !(*state_bits == 8 && *fused == Some(true)),
                    "optim.fused",
                    "the fused AdamW kernel needs 32-bit states (state_bits = 32)",
                )?;
            }
            OptimConfig::Sgd {
                lr,
                momentum,
                dampening,
                nesterov,
                weight_decay,
            } => {
                positive_finite(*lr, "optim.lr")?;
                check(
                    *momentum >= 0.0,
                    "optim.momentum",
                    "expected a non-negative number",
                )?;
                check(
                    *dampening >= 0.0,
                    "optim.dampening",
                    "expected a non-negative number",
                )?;
                check(
                    *weight_decay >= 0.0,
                    "optim.weight_decay",
                    "expected a non-negative number",
                )?;
                check(
                    !*nesterov || (*momentum > 0.0 && *dampening == 0.0),
                    "optim.nesterov",
                    "Nesterov momentum needs momentum > 0 and dampening = 0",
                )?;
            }
            OptimConfig::GaloreAdamw {
                lr,
                betas,
                eps,
                weight_decay,
                rank,
                update_proj_gap,
                scale,
                target,
                state_bits,
                ..
            } => {
                validate_adam(*lr, betas, *eps, *weight_decay)?;
                check_state_bits(*state_bits)?;
                positive(*rank, "optim.rank")?;
                positive(*update_proj_gap, "optim.update_proj_gap")?;
                positive_finite(*scale, "optim.scale")?;
                for (i, p) in target.iter().enumerate() {
                    check(
                        !p.trim().is_empty(),
                        "optim.target",
                        format!("expected a non-empty name pattern, got target[{i}] = {p:?}"),
                    )?;
                }
            }
            OptimConfig::Gsm {
                lr,
                momentum,
                nesterov,
                weight_decay,
                density,
                prunable,
                cut_step,
            } => {
                positive_finite(*lr, "optim.lr")?;
                check(
                    (0.0..1.0).contains(momentum),
                    "optim.momentum",
                    format!("expected a momentum in [0, 1), got {momentum}"),
                )?;
                check(
                    !*nesterov || *momentum > 0.0,
                    "optim.nesterov",
                    "Nesterov momentum needs momentum > 0",
                )?;
                check(
                    *weight_decay > 0.0 && weight_decay.is_finite(),
                    "optim.weight_decay",
                    format!(
                        "GSM needs a positive weight decay (it is what drives the unselected weights to zero), got {weight_decay}"
                    ),
                )?;
                check(
                    *density > 0.0 && *density < 1.0,
                    "optim.density",
                    format!("expected the fraction of weights kept, in (0, 1), got {density}"),
                )?;
                for (i, p) in prunable.iter().enumerate() {
                    check(
                        !p.trim().is_empty(),
                        "optim.prunable",
                        format!("expected a non-empty name pattern, got prunable[{i}] = {p:?}"),
                    )?;
                }
                if let Some(c) = cut_step {
                    check(
                        *c >= 0,
                        "optim.cut_step",
                        format!("expected a step >= 0, got {c}"),
                    )?;
                }
            }
        }
        self.schedule.check_values(self.optim.lr())
    }
}

impl Recipe {
    fn validate_train(&self) -> Result<(), Invalid> {
        let t = &self.train;
        positive(t.batch_size, "train.batch_size")?;
        positive(t.grad_accum, "train.grad_accum")?;
        match (t.max_steps, t.max_tokens) {
            (Some(_), Some(_)) => {
                return Err(Invalid {
                    key: "train.max_steps".into(),
                    msg: "give max_steps or max_tokens, not both".into(),
                })
            }
            (None, None) => {
                return Err(Invalid {
                    key: "train.max_steps".into(),
                    msg: "expected max_steps or max_tokens".into(),
                })
            }
            (Some(s), None) => positive(s, "train.max_steps")?,
            (None, Some(n)) => positive(n, "train.max_tokens")?,
        }
        if let Some(c) = t.clip_grad_norm {
            positive_finite(c, "train.clip_grad_norm")?;
        }
        if let Some(e) = t.eval_every {
            positive(e, "train.eval_every")?;
        }
        positive(t.eval_batches, "train.eval_batches")?;
        positive(t.log_every, "train.log_every")?;
        if let Some(c) = t.checkpoint_every {
            positive(c, "train.checkpoint_every")?;
        }
        positive(t.keep_checkpoints, "train.keep_checkpoints")?;
        if let Some(r) = &t.reweight {
            r.validate(t.batch_size, "a micro-batch (train.batch_size)")?;
            check(
                self.distill.is_none(),
                "train.reweight",
                "cannot be combined with [distill] (the distillation loss is not reweighted)",
            )?;
        }
        check(
            t.weight_decay_schedule.is_constant() || !matches!(self.optim, OptimConfig::Gsm { .. }),
            "train.weight_decay_schedule",
            "GSM's weight decay is how it prunes: keep it constant with optim.kind = \"gsm\"",
        )?;
        self.validate_momentum_schedule()?;
        validate_pruning(self.prune.as_ref(), &self.optim, self.max_steps())?;
        self.schedule
            .check_lengths(self.optim.lr(), self.max_steps())
    }

    fn validate_momentum_schedule(&self) -> Result<(), Invalid> {
        let t = &self.train;
        let Some(min) = t.momentum_min else {
            return check(
                t.momentum_schedule.is_constant(),
                "train.momentum_min",
                "momentum_schedule = \"inverse_lr\" needs momentum_min (the momentum at the LR's peak)",
            );
        };
        check(
            !t.momentum_schedule.is_constant(),
            "train.momentum_min",
            "only used with momentum_schedule = \"inverse_lr\"",
        )?;
        check(
            !matches!(self.optim, OptimConfig::Gsm { .. }),
            "train.momentum_schedule",
            "GSM's momentum and decay set how fast unselected weights reach zero: keep it \
             constant with optim.kind = \"gsm\"",
        )?;
        let max = self.optim.momentum();
        check(
            max > 0.0,
            "train.momentum_schedule",
            "the optimizer has no momentum (optim.momentum = 0): nothing to schedule",
        )?;
        check(
            (0.0..max).contains(&min),
            "train.momentum_min",
            format!("expected 0 <= momentum_min < the optimizer's momentum ({max}), got {min}"),
        )
    }

    /// Tokens consumed by one optimizer step.
    pub fn tokens_per_step(&self) -> i64 {
        self.train.batch_size * self.train.grad_accum * self.data.seq_len
    }

    /// The run's length in optimizer steps (`max_tokens` rounded up to whole steps).
    pub fn max_steps(&self) -> i64 {
        match (self.train.max_steps, self.train.max_tokens) {
            (Some(s), _) => s,
            (None, Some(n)) => {
                let per = self.tokens_per_step().max(1);
                (n + per - 1) / per
            }
            (None, None) => 0,
        }
    }
}

fn common_model_checks(
    vocab_size: i64,
    d_model: i64,
    n_layers: i64,
    n_heads: i64,
    max_seq_len: i64,
) -> Result<(), Invalid> {
    positive(vocab_size, "model.vocab_size")?;
    positive(d_model, "model.d_model")?;
    positive(n_layers, "model.n_layers")?;
    positive(n_heads, "model.n_heads")?;
    positive(max_seq_len, "model.max_seq_len")?;
    check(
        d_model % n_heads == 0,
        "model.d_model",
        format!("d_model ({d_model}) must be divisible by n_heads ({n_heads})"),
    )
}

pub fn validate_moe(m: &MoeRecipe, key: &str) -> Result<(), Invalid> {
    positive(m.n_experts, &format!("{key}.n_experts"))?;
    positive(m.top_k, &format!("{key}.top_k"))?;
    check(
        m.top_k <= m.n_experts,
        &format!("{key}.top_k"),
        format!(
            "top_k ({}) must not exceed n_experts ({})",
            m.top_k, m.n_experts
        ),
    )?;
    check(
        m.routing != RoutingKind::Switch || m.top_k == 1,
        &format!("{key}.routing"),
        "switch routing is top-1: set top_k = 1",
    )?;
    if let Some(c) = m.capacity_factor {
        positive_finite(c, &format!("{key}.capacity_factor"))?;
    }
    check(
        m.aux_loss_coef >= 0.0,
        &format!("{key}.aux_loss_coef"),
        "expected a non-negative number",
    )?;
    check(
        m.z_loss_coef >= 0.0,
        &format!("{key}.z_loss_coef"),
        "expected a non-negative number",
    )
}

pub(crate) fn positive(v: i64, key: &str) -> Result<(), Invalid> {
    check(v > 0, key, format!("expected a positive integer, got {v}"))
}

pub(crate) fn positive_finite(v: f64, key: &str) -> Result<(), Invalid> {
    check(
        v > 0.0 && v.is_finite(),
        key,
        format!("expected a positive number, got {v}"),
    )
}
