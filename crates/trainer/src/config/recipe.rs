//! A language-model recipe: the sections it composes (each defined beside the code it
//! configures), the training loop's own sections (`[run]`, `[init]`, `[train]`, defined here
//! because the loops in `train/` sit above this module), and the checks that span sections.
//!
//! Deserialization rejects unknown keys and wrong types (`deny_unknown_fields`); `validate`
//! rejects values out of range. Both are turned into one-line errors with the file location by
//! `config::load`.

use crate::data::DataConfig;
use crate::device::Precision;
use crate::distill::DistillConfig;
use crate::models::config::{is_true, validate_moe, yes};
pub use crate::models::transformer::Recompute;
use crate::models::{ModelConfig, MoeConfig};
use crate::optim::OptimConfig;
use crate::peft::{PeftConfig, PeftKind};
use crate::prune::PruneConfig;
use crate::schedule::{MomentumSchedule, ScheduleConfig, WeightDecaySchedule};
use crate::validate::{check, positive, positive_finite, Invalid};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// The run's identity, output directory and machine settings.
    pub run: RunConfig,
    /// Where the initial weights come from; absent: a fresh random initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<InitConfig>,
    /// The architecture (`kind` and sizes); may be left out when `[init] from` names a checkpoint
    /// that carries its own.
    pub model: ModelConfig,
    /// The training token source (or a mixture), the sequence length and the validation data.
    pub data: DataConfig,
    /// The optimizer (`kind`) and its hyperparameters; `lr` is the peak learning rate.
    pub optim: OptimConfig,
    /// How the learning rate moves from `optim.lr` over the run; absent: constant, no warmup.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Batch size, run length, evaluation, logging and checkpoint cadence.
    pub train: TrainConfig,
    /// Parameter-efficient fine-tuning (`peft/`): LoRA adapters on a frozen base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peft: Option<PeftConfig>,
    /// Magnitude pruning during training (`prune/`), one-shot or gradual.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<PruneConfig>,
    /// Knowledge distillation from a frozen teacher (`distill/`, `recipe/distill.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig<ModelConfig>>,
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
    pub distill: Option<DistillConfig<ModelConfig>>,
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

/// Initial weights: `from = "hf:PATH"` (a Hugging Face directory: config.json + safetensors) or
/// the path of a trainer checkpoint (`.../checkpoints/step-N`) or run directory (its newest
/// checkpoint). Only the model weights are taken: optimizer, schedule and step start fresh.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InitConfig {
    /// `hf:PATH` (config.json + safetensors), or a trainer checkpoint or run directory.
    pub from: String,
    /// Sparse upcycling (Komatsuzaki et al. 2023): turn the dense Llama checkpoint into an MoE,
    /// every expert a copy of the layer's MLP, routers freshly initialised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upcycle: Option<MoeConfig>,
    /// `"model"` (default): only the weights; optimizer, schedule and step start fresh.
    /// `"full"`: continue a trainer checkpoint: weights, optimizer state and step.
    #[serde(default, skip_serializing_if = "InitLoad::is_model")]
    #[schemars(!skip_serializing_if)]
    pub load: InitLoad,
}

/// What `[init] from` carries over.
#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema,
)]
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The run's name, shown in logs and the summary.
    pub name: String,
    /// What the recipe trains: `pretrain` (a language model, this schema) or `classify` (images,
    /// the schema of `config/classify.rs`).
    #[serde(default, skip_serializing_if = "Task::is_pretrain")]
    #[schemars(!skip_serializing_if)]
    pub task: Task,
    /// Seed of every random draw: initialisation, data order, dropout (a function of seed,
    /// step and rank).
    #[serde(default)]
    pub seed: u64,
    /// Run directory; relative paths are relative to the working directory.
    pub out_dir: PathBuf,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// Dtypes of the weights and the compute.
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
    #[schemars(!skip_serializing_if)]
    pub deterministic: bool,
    /// Multi-process runs (`trainer launch`, torchrun or Slurm variables): seconds a rank waits
    /// at a collective (and at the rendezvous) before failing, so that a rank that died or hangs
    /// ends the run on every rank with an error instead of a hang.
    #[serde(
        default = "default_collective_timeout_s",
        skip_serializing_if = "is_default_collective_timeout_s"
    )]
    #[schemars(!skip_serializing_if)]
    pub collective_timeout_s: f64,
    /// Multi-process runs: gradients are averaged in flat buckets of about this many MiB
    /// (DistributedDataParallel's `bucket_cap_mb`); each bucket's all-reduce starts as soon as its
    /// gradients are complete in the backward pass.
    #[serde(
        default = "default_bucket_mb",
        skip_serializing_if = "is_default_bucket_mb"
    )]
    #[schemars(!skip_serializing_if)]
    pub bucket_mb: f64,
    /// Multi-process runs: what each rank keeps of the whole. `"none"`: every rank holds the
    /// whole optimizer state. `"optimizer"` (ZeRO stage 1, on whole tensors): each parameter's
    /// optimizer state lives on one rank (parameters dealt out in order, balanced by size),
    /// which updates it and broadcasts the new values; the gradients are still averaged whole.
    /// `"gradients"` (ZeRO stage 2, on whole tensors): as `"optimizer"`, and each parameter's
    /// gradient is reduced onto its owner only (while the backward pass goes on) and dropped by
    /// the other ranks; the gradient norm for clipping is gathered from the owners. `"full"`
    /// (ZeRO stage 3 / FSDP, on whole tensors): as `"gradients"`, and the weights of the token
    /// embedding, of each transformer block and of the head live on their owners only,
    /// broadcast to every rank just before they are used and freed after (in the backward pass,
    /// once their gradients are formed; without block recomputation the backward pass gathers
    /// them again into the storage the kept graph saved); bf16-mixed needs
    /// `train.recompute = "block"`; LoRA's frozen base is sharded too; the final norm and
    /// learned positions stay whole everywhere.
    /// AdamW and GaLore-AdamW (32- or 8-bit states) and SGD; each rank writes its share of the
    /// optimizer state to a checkpoint file of its own (with an index), which resumes at any
    /// world size and in any shard mode. One process: no effect.
    #[serde(default, skip_serializing_if = "Shard::is_none")]
    #[schemars(!skip_serializing_if)]
    pub shard: Shard,
    /// With `shard = "full"`: fetch the weights of the piece that runs next (the following block
    /// in the forward pass, the head after the last, the block before in the backward pass)
    /// while the current one computes, so that communication overlaps computation, at the cost
    /// of one more piece's weights in memory. `false`: each piece is gathered only when it runs.
    /// Same values either way.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    #[schemars(!skip_serializing_if)]
    pub shard_prefetch: bool,
    /// With `shard = "gradients"` or `"full"` and `train.grad_accum` > 1: reduce every
    /// micro-batch's gradients onto their owners as its backward pass goes on (as DeepSpeed's
    /// ZeRO stage 2 and FSDP do), so that no rank holds the gradients of parameters it does not
    /// own between micro-batches; costs one reduction per micro-batch instead of one per step,
    /// and sums in another order than an unsharded run (over the ranks first, then the
    /// micro-batches), which bf16-mixed training shows as a 1e-5 drift of the loss after ten
    /// steps. `false`: the earlier micro-batches accumulate whole gradients on every rank and
    /// only the last one's backward pass reduces.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[schemars(!skip_serializing_if)]
    pub reduce_every_micro_batch: bool,
    /// With `shard = "optimizer"` or `"gradients"`: how the training state is divided.
    /// `"tensors"`: whole tensors, each owned by one rank (see `shard`). `"flat"` (Megatron's
    /// distributed optimizer): the trainable parameters are laid out in the gradient buckets
    /// (`bucket_mb`), each padded to a multiple of the world size and cut into equal slices;
    /// rank r holds the optimizer state (and fp32 master weights) of slice r of every bucket,
    /// each bucket's gradients are reduce-scattered into those slices while the backward pass
    /// goes on, and the updated slices are all-gathered after the step. Balanced to the element
    /// (a rank holds 1/world of the state, however large the embedding); sums in another order
    /// than an unsharded run (equal to rounding). `"gradients"` keeps only the slices (each
    /// bucket packed into a buffer of the step and its gradients dropped as it is sent);
    /// `"optimizer"` keeps every bucket whole in a buffer of its own, reduce-scattered in
    /// place, the slices views into it (the gradients whole on every rank, as ZeRO stage 1).
    /// AdamW
    /// (32-bit states) and SGD only; every trainable parameter must get a gradient at every
    /// step (no MoE, no `[distill]`, no `[prune]`).
    #[serde(default, skip_serializing_if = "ShardLayout::is_tensors")]
    #[schemars(!skip_serializing_if)]
    pub shard_layout: ShardLayout,
}

/// `run.shard_layout`: whole tensors per rank, or equal slices of flat buckets.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ShardLayout {
    /// Each trainable tensor owned whole by one rank.
    #[default]
    Tensors,
    /// Equal slices of the flat gradient buckets (ZeRO stages 1 and 2 as Megatron lays them out).
    Flat,
}

impl ShardLayout {
    fn is_tensors(&self) -> bool {
        *self == ShardLayout::Tensors
    }
}

/// `run.shard`: what of the training state is divided among the ranks.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Shard {
    /// Every rank holds everything.
    #[default]
    None,
    /// Each parameter's optimizer state lives on one rank (ZeRO stage 1, whole tensors).
    Optimizer,
    /// Its gradient too, reduced onto that rank only (ZeRO stage 2, whole tensors).
    Gradients,
    /// And each block's weights, held whole by their owner only and gathered around each use
    /// (ZeRO stage 3 / FSDP, whole tensors; bf16-mixed needs `train.recompute = "block"`).
    Full,
}

impl Shard {
    fn is_none(&self) -> bool {
        *self == Shard::None
    }

    /// The name a recipe writes.
    pub fn as_str(&self) -> &'static str {
        match self {
            Shard::None => "none",
            Shard::Optimizer => "optimizer",
            Shard::Gradients => "gradients",
            Shard::Full => "full",
        }
    }
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

#[derive(
    Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, schemars::JsonSchema,
)]
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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
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
    /// Validation batches (of `batch_size` sequences) averaged per evaluation.
    #[serde(default = "default_eval_batches")]
    pub eval_batches: i64,
    /// Log a metrics row every this many optimizer steps.
    #[serde(default = "default_log_every")]
    pub log_every: i64,
    /// Checkpoint every this many steps (and always at the end); absent: only at the end.
    #[serde(default)]
    pub checkpoint_every: Option<i64>,
    /// How many checkpoints to keep; older ones are deleted once a newer one is complete.
    #[serde(default = "default_keep")]
    pub keep_checkpoints: i64,
    /// Write the periodic checkpoints (`checkpoint_every`) on a background thread from host
    /// copies of the weights and optimizer state, while training goes on (costs host memory
    /// for one checkpoint). At most one is in flight: the next checkpoint, a stop and the end
    /// wait for it; the last checkpoint and one written on a signal are written at once. The
    /// files are the same as without it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    #[schemars(!skip_serializing_if)]
    pub async_checkpoints: bool,
    /// Positions whose logits exist at once in the language-model loss: the output projection
    /// and the cross-entropy run this many positions at a time, as one autograd function that
    /// forms their gradients as it goes, so a micro-batch's whole `[positions, vocab]` logits
    /// are never held (training and evaluation). 0: the whole micro-batch at once (the
    /// composite ops). The losses are the same either way (fp32: within 1e-6). Models with
    /// logit soft-capping and `[train.reweight]` always take the composite path.
    #[serde(
        default = "default_loss_chunk_tokens",
        skip_serializing_if = "is_default_loss_chunk_tokens"
    )]
    #[schemars(!skip_serializing_if)]
    pub loss_chunk_tokens: i64,
    /// Activation recomputation: `"none"` keeps every activation for the backward pass;
    /// `"block"` keeps only each transformer block's input and runs the block again in the
    /// backward pass (about one more forward pass of compute for a fraction of the activation
    /// memory); `"selective"` recomputes only the attention core (scores, softmax, weighted
    /// sum) and the gated MLP's activation, keeping the projections' outputs. The losses and
    /// gradients are those of `"none"`. Not with the model's dropout; `"block"` not with LoRA's
    /// dropout (`peft.dropout`) or MoE layers.
    #[serde(default, skip_serializing_if = "Recompute::is_none")]
    #[schemars(!skip_serializing_if)]
    pub recompute: Recompute,
    /// `[train.reweight]`: loss-based sample reweighting (`data/reweight.rs`); absent: every
    /// sequence counts the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reweight: Option<crate::data::reweight::ReweightConfig>,
    /// How `optim.weight_decay` changes over the run; absent: `constant`.
    #[serde(default, skip_serializing_if = "WeightDecaySchedule::is_constant")]
    #[schemars(!skip_serializing_if)]
    pub weight_decay_schedule: WeightDecaySchedule,
    /// How the optimizer's momentum (SGD's `momentum`, AdamW's and GaLore's `betas[0]`) changes
    /// over the run; absent: `constant`.
    #[serde(default, skip_serializing_if = "MomentumSchedule::is_constant")]
    #[schemars(!skip_serializing_if)]
    pub momentum_schedule: MomentumSchedule,
    /// The momentum at the LR's peak with `momentum_schedule = "inverse_lr"` (required there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum_min: Option<f64>,
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
fn default_loss_chunk_tokens() -> i64 {
    4096
}
fn is_default_loss_chunk_tokens(n: &i64) -> bool {
    *n == default_loss_chunk_tokens()
}
impl RunConfig {
    /// What the data-parallel collectives take from `[run]`.
    pub fn collectives(&self) -> crate::dist::Collectives {
        crate::dist::Collectives {
            timeout_s: self.collective_timeout_s,
            bucket_mb: self.bucket_mb,
        }
    }

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
        self.validate_shard()?;
        self.validate_master_weights()?;
        if let Some(p) = &self.peft {
            p.validate()?;
        }
        if let Some(d) = &self.distill {
            d.validate()?;
        }
        Ok(())
    }

    fn validate_model(&self) -> Result<(), Invalid> {
        self.model.validate()?;
        let seq_len = self.data.seq_len;
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
        self.data.validate(self.model.vocab_size())?;
        if self.data.masks_rows() {
            // These paths run the model without per-row attention masks.
            let key = if self.data.document_mask {
                "data.document_mask"
            } else {
                "data.packing"
            };
            check(
                self.distill.is_none(),
                key,
                "rows masked by sample or document cannot be distilled yet; turn it off",
            )?;
            check(
                self.train.reweight.is_none(),
                key,
                "train.reweight weighs rows, and a masked row holds several samples or documents; turn it off",
            )?;
        }
        Ok(())
    }

    fn validate_optim(&self) -> Result<(), Invalid> {
        validate_optim_schedule(&self.optim, &self.schedule)
    }

    /// `run.shard = "optimizer"` or `"gradients"`: an optimizer whose update of a parameter
    /// needs only that parameter and its own state, and nothing that touches every parameter's
    /// state.
    fn validate_shard(&self) -> Result<(), Invalid> {
        check(
            !self.run.reduce_every_micro_batch
                || matches!(self.run.shard, Shard::Gradients | Shard::Full),
            "run.reduce_every_micro_batch",
            "reduces gradients onto their owners: it needs run.shard = \"gradients\" or \"full\"",
        )?;
        check(
            !self.run.reduce_every_micro_batch || self.train.grad_accum > 1,
            "run.reduce_every_micro_batch",
            "with train.grad_accum = 1 a step has one micro-batch, which is reduced as it goes \
             without it; leave it out",
        )?;
        check(
            self.run.shard_prefetch || self.run.shard == Shard::Full,
            "run.shard_prefetch",
            "fetches the weights of run.shard = \"full\" ahead; without it there is nothing to \
             fetch: leave it out",
        )?;
        self.validate_shard_layout()?;
        if self.run.shard == Shard::None {
            return Ok(());
        }
        let mode = self.run.shard.as_str();
        let why = match &self.optim {
            OptimConfig::Gsm { .. } => Some("GSM (it ranks every parameter's saliency at once)"),
            _ if self.optim.layerwise() => {
                Some("optim.layerwise (updates inside the backward pass)")
            }
            _ => None,
        };
        if let Some(why) = why {
            return Err(Invalid {
                key: "run.shard".to_string(),
                msg: format!("\"{mode}\" works with AdamW, GaLore-AdamW and SGD, not with {why}"),
            });
        }
        check(
            !self.peft.as_ref().is_some_and(|p| p.kind == PeftKind::Relora),
            "run.shard",
            format!(
                "\"{mode}\" cannot be combined with ReLoRA (its merges reset every parameter's state)"
            ),
        )?;
        if self.run.shard != Shard::Full {
            return Ok(());
        }
        check(
            self.train.recompute == Recompute::Block || self.run.precision != Precision::Bf16Mixed,
            "run.shard",
            "\"full\" with run.precision = \"bf16-mixed\" needs train.recompute = \"block\": \
             without it autocast's bf16 copies of every block's weights stay alive until the \
             backward pass",
        )?;

        let unsupported = [
            (
                self.prune.is_some(),
                "[prune] (its masks touch every weight)",
            ),
            (self.distill.is_some(), "[distill]"),
        ];
        match unsupported.iter().find(|(on, _)| *on) {
            Some((_, what)) => Err(Invalid {
                key: "run.shard".to_string(),
                msg: format!("\"full\" cannot be combined with {what} yet"),
            }),
            None => Ok(()),
        }
    }

    /// `run.shard_layout = "flat"`: with `"optimizer"` or `"gradients"`, an optimizer that
    /// updates element by element, every parameter trained at every step.
    fn validate_shard_layout(&self) -> Result<(), Invalid> {
        if self.run.shard_layout == ShardLayout::Tensors {
            return Ok(());
        }
        let key = "run.shard_layout";
        check(
            matches!(self.run.shard, Shard::Optimizer | Shard::Gradients),
            key,
            format!(
                "\"flat\" divides the state of run.shard = \"optimizer\" or \"gradients\", not \
                 \"{}\"",
                self.run.shard.as_str()
            ),
        )?;
        check(
            crate::optim::updates_elementwise(&self.optim),
            key,
            crate::optim::SLICED_OPTIMIZERS,
        )?;
        let unsupported = [
            (
                self.run.reduce_every_micro_batch,
                "run.reduce_every_micro_batch",
            ),
            (self.distill.is_some(), "[distill]"),
            (self.prune.is_some(), "[prune]"),
        ];
        match unsupported.iter().find(|(on, _)| *on) {
            Some((_, what)) => Err(Invalid {
                key: key.to_string(),
                msg: format!("\"flat\" cannot be combined with {what} yet"),
            }),
            None => Ok(()),
        }
    }

    /// `optim.master_weights`: fp32 copies of bf16 weights, which nothing else may change
    /// behind the optimizer's back.
    fn validate_master_weights(&self) -> Result<(), Invalid> {
        if !self.optim.master_weights() {
            return Ok(());
        }
        let key = "optim.master_weights";
        check(
            self.run.precision == Precision::Bf16,
            key,
            format!(
                "keeps fp32 copies of bf16 weights; with run.precision = \"{}\" the weights are \
                 fp32 already (set run.precision = \"bf16\")",
                self.run.precision.as_str()
            ),
        )?;
        check(
            !self
                .peft
                .as_ref()
                .is_some_and(|p| p.kind == PeftKind::Relora),
            key,
            "cannot be combined with ReLoRA (its merges and restarts change the weights, not the \
             masters)",
        )?;
        check(
            self.prune.is_none(),
            key,
            "cannot be combined with [prune] (its masks zero the weights, not the masters)",
        )
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
    optim.validate()?;
    schedule.check_values(optim.lr())
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
        check(
            t.loss_chunk_tokens >= 0,
            "train.loss_chunk_tokens",
            "expected 0 (the whole micro-batch at once) or a positive number of positions",
        )?;
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
