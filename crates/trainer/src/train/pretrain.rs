//! Pretraining a decoder transformer on next-token prediction. `run_from` reads top to bottom:
//! set-up (`harness::Setup`), the model and its optimizer (`Lm::build`), the state to start from,
//! the shared run (`harness::Run`: ranks, run directory, log), then the loop: one `Lm::step`
//! (micro-batches, backward, all-reduce, clipping, the optimizer step), its log row, evaluation,
//! and `harness`'s checkpoint-or-stop; last, the summary.
//!
//! Reproducibility: torch is reseeded at every step from (seed, step) and the data windows are a
//! pure function of (seed, step, micro-batch), so a run resumed from the checkpoint of step k
//! computes bitwise the same losses as the uninterrupted run (on the CPU, same thread count).

use super::harness::{self, Run, RunSummary, Sections, Setup};
use crate::checkpoint::{self, TrainState};
use crate::config::{
    self, InitLoad, Precision, Recipe, Recompute, Shard, ShardLayout, WeightDecaySchedule,
};
use crate::data::loader::{stream_seed, Batch, Prefetcher};
use crate::data::mixture::MixSource;
use crate::data::mixture::{Mixture, MixtureReport};
use crate::data::reweight::{self, ReweightSums};
use crate::data::rows::{MixedRows, MixedRowsSettings, TrainInput, TrainRows, ValidData};
use crate::data::sft::{SampleRows, SampleSet, SftSummary};
use crate::data::source::{self, Span};
use crate::data::SourceConfig;
use crate::device;
use crate::dist::OverlappedGrads;
use crate::distill::{LmDistiller, StepSums};
use crate::error::{Error, Result};
use crate::flat_shard::FlatShards;
use crate::load::ModelSource;
use crate::memory::MemoryNeed;
use crate::metrics::progress::format_duration;
use crate::metrics::row;
use crate::models::params::ParamStore;
use crate::models::transformer::{
    ModelOutput, MoeLayerStats, Packing, Transformer, TransformerConfig,
};
use crate::optim::{clip_grad_norm, Optimizer};
use crate::peft::lora::Lora;
use crate::peft::relora::Relora;
use crate::prune::Pruner;
use crate::schedule::Schedule;
use crate::shard::{GatherCounts, Owners, PieceShards};
use crate::signals::StopFlag;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

pub type Outcome = harness::Outcome<Summary>;

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: String,
    pub steps: i64,
    pub tokens: i64,
    pub final_train_loss: Option<f64>,
    pub final_valid_loss: Option<f64>,
    pub final_valid_perplexity: Option<f64>,
    /// Wall-clock seconds of the whole run (summed over resumes), evaluation and checkpoints
    /// included.
    pub train_seconds: f64,
    /// Training throughput: tokens over the time spent in optimizer steps, leaving out the first
    /// step of each start (allocator and kernel warm-up), evaluations and checkpoints.
    pub tokens_per_s: f64,
    /// Tokens over the whole wall time of this start (everything included).
    pub tokens_per_s_wall: f64,
    #[serde(flatten)]
    pub sizes: harness::Sizes,
    pub grad_bytes: i64,
    /// The bytes of gradients this rank held when it took its last optimizer step, measured
    /// (with `run.shard = "gradients"`, about 1/world of `grad_bytes`; with layer-wise updates,
    /// none); 0 when this start took no step.
    pub held_grad_bytes: i64,
    /// The most bytes of gradients this rank held between two micro-batches of a step or at an
    /// update, measured (with `run.shard = "gradients"` and gradient accumulation, whole
    /// gradients unless `run.reduce_every_micro_batch`).
    pub peak_held_grad_bytes: i64,
    /// The bytes of weights this rank held when it took its last optimizer step, measured from
    /// the tensors' storage (with `run.shard = "full"`, its own pieces' weights and those kept
    /// whole; else all of them); 0 when this start took no step.
    pub held_param_bytes: i64,
    /// `run.shard = "full"`: the pieces this rank gathered in this start, and how many of them
    /// were fetched ahead while the piece before computed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub piece_gathers: Option<GatherCounts>,
    #[serde(flatten)]
    pub footprint: harness::Footprint,
    pub model_tflops_per_s: f64,
    pub mfu: Option<f64>,
    pub resumed_from: Option<PathBuf>,
    pub init_from: Option<String>,
    /// `[init] load`: "model" or "full" (continued from the checkpoint's step), when init_from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_load: Option<String>,
    /// The last loss of every validation set, by name (`valid` when there is just the default one).
    pub final_valid_losses: std::collections::BTreeMap<String, f64>,
    /// With `[data.mixture]`: per source its weight, realised fraction and epochs over the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mixture: Option<std::collections::BTreeMap<String, MixtureReport>>,
    /// With `[[stages]]`: every stage's name and the steps of its metrics rows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stages: Option<Vec<StageSteps>>,
    /// Chat/instruction sources (`train`, or the mixture's names): records read, samples kept,
    /// truncated and dropped, tokens and target tokens.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub samples: BTreeMap<String, SftSummary>,
}

/// One stage of a `[[stages]]` run in summary.json: its metrics rows are those whose `step` lies
/// in `first_step..=last_step` (a row's step counts the optimizer steps done, so the stage that
/// starts after `start` steps logs from `start + 1`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageSteps {
    pub name: String,
    pub steps: i64,
    pub first_step: i64,
    pub last_step: i64,
}

/// The stage `run_from` trains (`train/stages.rs`): its name (every metrics row carries it as
/// `stage`), its first step (its schedule and mixture counts start there), and all the stages.
pub struct InStage<'a> {
    pub name: &'a str,
    pub start: i64,
    pub all: &'a [StageSteps],
}

/// Trains `recipe`, waiting up to `wait_for_lock` for another run holding its run directory.
pub fn run(
    recipe: &Recipe,
    resume: harness::Resume,
    wait_for_lock: Duration,
    stop: &StopFlag,
) -> Result<Outcome> {
    let _lock = harness::lock_run_dir(&recipe.run.out_dir, wait_for_lock)?;
    run_from(recipe, resume, stop, None)
}

/// `run`, for one stage of a `[[stages]]` recipe (`train/stages.rs`), or an ordinary run
/// (`None`, which writes no `stage` fields). The stage's schedule and its mixture's realised
/// fractions are counted from its first step. The caller holds the run directory's lock.
pub fn run_from(
    recipe: &Recipe,
    resume: harness::Resume,
    stop: &StopFlag,
    stage: Option<&InStage>,
) -> Result<Outcome> {
    // ---- set-up -------------------------------------------------------------------------
    let setup = Setup::new(&recipe.run, recipe.train.batch_size, &resume)?;
    check_reweight_rows(recipe, &setup)?;
    let seq_len = recipe.data.seq_len as usize;
    let (train_data, valid_sets) = open_data(recipe, recipe.model.vocab_size(), seq_len + 1)?;
    let (mut lm, init) = Lm::build(recipe, &setup)?;
    let total_steps = recipe.max_steps();
    let stage_start = stage.map_or(0, |s| s.start);
    let schedule = Schedule::new(
        &recipe.schedule,
        recipe.optim.lr(),
        total_steps - stage_start,
    );
    let mut state = lm.start_state(recipe, &init, &setup, total_steps)?;
    if let Some(done) = harness::already_done(&setup, &state, total_steps) {
        return Ok(done);
    }
    let sections = sections(recipe);
    lm.pruner = harness::start_pruner(&sections, &mut lm.params, total_steps, state.step)?;
    let mut run = Run::start(setup, &sections, &lm.params, &state, stop)?;
    if run.world.is_main() {
        keep_tokenizer_files(recipe, &run.run_dir)?;
    }
    lm.shard_pieces(recipe, &mut run)?;
    lm.log_start(recipe, &run, total_steps);
    run.reset_peak_memory();

    // ---- loop ---------------------------------------------------------------------------
    let first_step = init.full.as_ref().map_or(stage_start, |(_, s)| *s);
    let mut data = TrainData::start(recipe, train_data, first_step, state.step, total_steps);
    // Several processes: the gradients are averaged while the backward pass goes on, unless ranks
    // may use different parameters (MoE routing) or the backward pass runs in pieces (distill).
    let overlap =
        if run.world.is_distributed() && lm.distiller.is_none() && lm.model.moe_layers().is_empty()
        {
            Some(OverlappedGrads::new(
                &run.dp,
                &lm.params,
                lm.gradient_owners(recipe),
                lm.flat.as_ref().map(FlatShards::scatter_into),
            )?)
        } else {
            None
        };
    let mut evals = Evals::new(valid_sets);
    run.start_loop(
        total_steps,
        recipe.tokens_per_step(),
        &state,
        stage.map(|s| s.name),
    );
    while state.step < total_steps {
        let step = state.step;
        let step_start = Instant::now();
        // Dropout and any other torch randomness: a pure function of (seed, step, rank).
        tch::manual_seed(
            (stream_seed(recipe.run.seed, step, -1, run.world.rank as i64) >> 1) as i64,
        );
        let hyper = lm.hyperparameters(recipe, &schedule, step - stage_start, step);
        let out = lm.step(recipe, &run, &data.prefetch, overlap.as_ref(), hyper, step)?;
        data.count_step(recipe, step);
        run.step_done(&mut state, step_start);
        lm.after_step(recipe, state.step)?;
        let done = state.step == total_steps;
        if state.step % recipe.train.log_every == 0 || done {
            log_step(recipe, &lm, &data, &mut run, &state, out.log, stage)?;
        }
        if recipe.train.eval_every.is_some_and(|e| state.step % e == 0) || done {
            evals.run(&lm.model, recipe, &mut run, &mut state, stage)?;
        }
        let (params, optimizer) = (&lm.params, &lm.optimizer);
        if let Some(outcome) =
            run.checkpoint_or_stop(&mut state, params, optimizer, done, out.stop_all)?
        {
            return Ok(outcome);
        }
    }
    run.progress.finish();
    let mixture = data.report();
    let samples = std::mem::take(&mut data.samples);
    drop(data);

    // ---- summary ------------------------------------------------------------------------
    let summary = lm.summary(
        recipe, &run, &state, init, evals.last, mixture, samples, stage,
    );
    run.write_summary(&summary)?;
    Ok(Outcome::Finished(summary))
}

/// The sections of the recipe that the harness reads.
fn sections(recipe: &Recipe) -> Sections<'_> {
    Sections {
        run: &recipe.run,
        optim: &recipe.optim,
        prune: recipe.prune.as_ref(),
        checkpoint_every: recipe.train.checkpoint_every,
        async_checkpoints: recipe.train.async_checkpoints,
        keep_checkpoints: recipe.train.keep_checkpoints,
        resolved: config::to_toml(recipe),
    }
}

/// With `[train.reweight]` on several ranks, the rule applies to each rank's rows of a
/// micro-batch: checked against them.
fn check_reweight_rows(recipe: &Recipe, setup: &Setup) -> Result<()> {
    let (Some(rw), true) = (&recipe.train.reweight, setup.world.is_distributed()) else {
        return Ok(());
    };
    let what = format!(
        "a rank's micro-batch (train.batch_size / {} ranks)",
        setup.world.size
    );
    rw.validate(setup.shard_rows as i64, &what)
        .map_err(|inv| Error::Recipe(format!("{}: {}", inv.key, inv.msg)))
}

/// Where the weights come from, decided by `[init]`.
struct Init {
    /// `[init] from`, described for the summary (not when resuming: the run's own checkpoint
    /// gives the weights).
    from: Option<String>,
    /// `[init] load = "full"`: the trainer checkpoint whose weights, optimizer state and step
    /// this run continues, and that step (mixture counts start there).
    full: Option<(PathBuf, i64)>,
}

/// The language model being trained and everything that updates it.
struct Lm {
    cfg: TransformerConfig,
    model: Transformer,
    params: ParamStore,
    optimizer: Optimizer,
    /// The parameters of the model before any adapter: frozen under LoRA (after ReLoRA's
    /// full-rank warm start, if any).
    base_params: Vec<String>,
    relora: Option<(Relora, Lora)>,
    /// `[distill]`: the frozen teacher.
    distiller: Option<LmDistiller>,
    /// `optim.layerwise`: each parameter is updated from a hook as soon as its gradient is
    /// complete in the last backward pass of a step, and its gradient dropped at once.
    layerwise: Option<(torch_ext::GradReadyHooks, Vec<Tensor>)>,
    /// Magnitude pruning or GSM's cut (set once the start state is known).
    pruner: Option<Pruner>,
    /// `run.shard = "optimizer"` or `"gradients"` over several ranks: the parameters whose
    /// optimizer state (and gradient) this rank holds and updates (`shard.rs`).
    owners: Option<Owners>,
    /// `run.shard_layout = "flat"` over several ranks: this rank's slices of the flat buckets,
    /// whose state it holds and updates (`flat_shard.rs`; `owners` is None then).
    flat: Option<FlatShards>,
    /// The bytes of gradients held at the last optimizer step (the summary's `held_grad_bytes`).
    held_grad_bytes: i64,
    /// The most held between micro-batches or at an update (`peak_held_grad_bytes`).
    peak_held_grad_bytes: i64,
    /// `run.shard = "full"`: the pieces' weights, gathered around each use (`shard.rs`).
    piece_shards: Option<std::rc::Rc<PieceShards>>,
    /// The bytes of weights held at the last optimizer step (`held_param_bytes`).
    held_param_bytes: i64,
}

/// One step's hyperparameters, set before the backward pass (layer-wise updates use them inside
/// it); the schedules' values are logged when they move.
#[derive(Clone, Copy)]
struct Hyper {
    lr: f64,
    weight_decay: Option<f64>,
    momentum: Option<f64>,
}

/// What a step leaves for its log row.
struct StepLog {
    hyper: Hyper,
    /// The micro-batches' summed loss on this rank; on several ranks, averaged over them.
    loss_sum: Tensor,
    global_loss_sum: Option<f64>,
    /// `[train.reweight]`: the unweighted loss sum averaged over the ranks.
    global_unweighted_sum: Option<f64>,
    grad_norm: f64,
    /// The MoE layers' statistics of the last micro-batch.
    moe_stats: Vec<MoeLayerStats>,
    distill_sums: StepSums,
    reweight_sums: ReweightSums,
}

/// A step's result: its log, and whether any rank was asked to stop (several ranks).
struct StepOut {
    log: StepLog,
    stop_all: bool,
}

/// `run.shard = "full"` gathers each block's weights inside the block's own pass, which does not
/// carry MoE layers' routing statistics and router losses out (and block recomputation, which
/// would, refuses MoE layers already).
fn check_full_shard(recipe: &Recipe, cfg: &TransformerConfig) -> Result<()> {
    if recipe.run.shard == Shard::Full && cfg.moe.is_some() {
        return Err(Error::Recipe(
            "run.shard = \"full\" cannot be used with MoE layers yet (their router losses and \
             statistics would be lost in the sharded blocks' passes); use \"gradients\""
                .into(),
        ));
    }
    Ok(())
}

/// `run.reduce_every_micro_batch` reduces in the backward pass onto the owners
/// (`OverlappedGrads`), which MoE models and distillation do not use: their gradients are
/// averaged after the backward pass.
fn check_reduce_every_micro_batch(recipe: &Recipe, cfg: &TransformerConfig) -> Result<()> {
    let other = match (&recipe.distill, &cfg.moe) {
        _ if !recipe.run.reduce_every_micro_batch => None,
        (Some(_), _) => Some("[distill]"),
        (_, Some(_)) => Some("MoE layers"),
        _ => None,
    };
    match other {
        Some(what) => Err(Error::Recipe(format!(
            "run.reduce_every_micro_batch: with {what} the gradients are averaged after the \
             backward pass, not reduced onto their owners during it; set it to false"
        ))),
        None => Ok(()),
    }
}

/// `run.shard = "full"` over several ranks, before the model is built: its pieces are dealt
/// out as they are registered and this rank keeps only its own (`shard::pieces_dealt_as_added`),
/// balanced over the model's parameter count from its config; whether it did.
fn deal_pieces_as_built(
    recipe: &Recipe,
    setup: &Setup,
    cfg: &TransformerConfig,
    params: &mut ParamStore,
) -> bool {
    if recipe.run.shard != Shard::Full || !setup.world.is_distributed() {
        return false;
    }
    let (rank, world, total) = (setup.world.rank, setup.world.size, cfg.param_count());
    params.shard_as_added(rank, crate::shard::pieces_dealt_as_added(world, total));
    true
}

/// `run.shard = "optimizer"` or `"gradients"` over several ranks: which rank owns which
/// parameter's optimizer state (and gradient); `"full"` (`pieces_dealt`: the model was built
/// with its pieces dealt out): the holder of each sharded parameter owns it. One process:
/// nothing to divide (a warning).
fn shard_owners(
    recipe: &Recipe,
    setup: &Setup,
    params: &ParamStore,
    pieces_dealt: bool,
) -> Result<Option<Owners>> {
    if recipe.run.shard == Shard::None {
        return Ok(None);
    }
    if !setup.world.is_distributed() {
        tracing::warn!(
            "run.shard = \"{}\" has no effect in a single process",
            recipe.run.shard.as_str()
        );
        return Ok(None);
    }
    let (rank, world) = (setup.world.rank, setup.world.size);
    if pieces_dealt {
        return Owners::deal_full(params, rank, world).map(Some);
    }
    Owners::deal(params, rank, world).map(Some)
}

/// `run.shard_layout = "flat"` over several ranks: the flat buckets' slices, of gradients in
/// the dtype the weights will train in. MoE layers are refused (ranks' routers leave different
/// experts without gradients; in one process too, as the recipe would fail on more). One
/// process: nothing to divide (`shard_owners` says so).
fn flat_layout(
    recipe: &Recipe,
    setup: &Setup,
    params: &ParamStore,
    model: &Transformer,
) -> Result<Option<FlatShards>> {
    if recipe.run.shard_layout != ShardLayout::Flat {
        return Ok(None);
    }
    if !model.moe_layers().is_empty() {
        return Err(Error::Recipe(
            "run.shard_layout = \"flat\" cannot be used with MoE layers (ranks' routers leave \
             different experts without gradients); use run.shard_layout = \"tensors\""
                .into(),
        ));
    }
    if !setup.world.is_distributed() {
        return Ok(None);
    }
    let grad_kind = match recipe.run.precision {
        Precision::Bf16 => Kind::BFloat16,
        _ => Kind::Float,
    };
    let (rank, world) = (setup.world.rank, setup.world.size);
    let bucket_bytes = recipe.run.collectives().bucket_bytes();
    let whole_buckets = recipe.run.shard == Shard::Optimizer;
    FlatShards::new(params, rank, world, bucket_bytes, grad_kind, whole_buckets).map(Some)
}

/// `train.recompute`, refused for models whose recomputed parts would not repeat themselves
/// when run again in the backward pass.
fn recompute_mode(recipe: &Recipe, cfg: &TransformerConfig) -> Result<Recompute> {
    let mode = recipe.train.recompute;
    let name = match mode {
        Recompute::None => return Ok(mode),
        Recompute::Block => "block",
        Recompute::Selective => "selective",
    };
    let lora_dropout = recipe.peft.as_ref().map_or(0.0, |p| p.dropout);
    let why = if cfg.dropout > 0.0 {
        Some(format!(
            "dropout ({}) would draw other masks when it runs again in the backward pass; set \
             the model's dropout to 0",
            cfg.dropout
        ))
    } else if mode == Recompute::Block && lora_dropout > 0.0 {
        // Selective recomputation runs no projection again; a block does, adapters included.
        Some(format!(
            "LoRA's dropout (peft.dropout = {lora_dropout}) would draw other masks when a block \
             runs again in the backward pass; set peft.dropout = 0 or train.recompute = \
             \"selective\""
        ))
    } else if cfg.moe.is_some() && mode == Recompute::Block {
        Some(
            "MoE layers' routing statistics and router losses come from the first run of a \
             block only (\"selective\" works with MoE layers)"
                .to_string(),
        )
    } else {
        None
    };
    match why {
        Some(why) => Err(Error::Recipe(format!(
            "train.recompute = \"{name}\" cannot be used here: {why}"
        ))),
        None => Ok(mode),
    }
}

/// The least memory this rank holds to train `recipe` (`memory.rs`), from the recipe alone:
/// the weights; with every base weight trained (no `[peft]`), their gradients (none with
/// layer-wise updates, which free each as it is used) and optimizer state; and the logits of
/// one micro-batch, or of one chunk of it (`train.loss_chunk_tokens`). Activations, adapters
/// and a teacher come on top.
fn training_need(recipe: &Recipe, cfg: &TransformerConfig, setup: &Setup) -> MemoryNeed {
    let params = cfg.param_count().max(0) as u128;
    let weight_bytes = if recipe.run.precision == Precision::Bf16 {
        2
    } else {
        4
    };
    let trained = if recipe.peft.is_some() { 0 } else { params };
    // run.shard: a rank holds about 1/world of the optimizer state ("optimizer", "gradients")
    // and of the gradients ("gradients") after the backward pass.
    let world = setup.world.size.max(1) as u128;
    let (grad_share, state_share) = match recipe.run.shard {
        Shard::None => (1, 1),
        Shard::Optimizer => (1, world),
        Shard::Gradients | Shard::Full => (world, world),
    };
    let gradients = if recipe.optim.layerwise() {
        0
    } else {
        trained * weight_bytes / grad_share
    };
    let compute_bytes = if recipe.run.precision == Precision::Fp32 {
        4
    } else {
        2
    };
    let positions = setup.shard_rows as u128 * recipe.data.seq_len.max(0) as u128;
    let positions = match recipe.train.loss_chunk_tokens {
        0 => positions,
        chunk => positions.min(chunk as u128),
    };
    let logits = positions * cfg.vocab_size.max(0) as u128 * compute_bytes;
    // Processes of one machine share its memory; each GPU has its own.
    let processes = match setup.device {
        Device::Cpu => std::env::var("LOCAL_WORLD_SIZE")
            .ok()
            .and_then(|v| v.parse::<u128>().ok())
            .unwrap_or(1),
        _ => 1,
    };
    // "full": each rank keeps its share of the weights (plus a few pieces gathered at a time).
    let weight_share = match recipe.run.shard {
        Shard::Full => world,
        _ => 1,
    };
    MemoryNeed {
        weights: params * weight_bytes / weight_share,
        gradients,
        optimizer_state: trained * recipe.optim.state_bytes_per_param(weight_bytes) / state_share,
        logits,
        processes,
    }
}

impl Lm {
    /// The model on the run's device, its weights from `[init]` (unless resuming), LoRA / ReLoRA
    /// adapters, the distillation teacher, the precision and the optimizer, in the order that
    /// draws the seeded initial values.
    fn build(recipe: &Recipe, setup: &Setup) -> Result<(Lm, Init)> {
        tch::manual_seed(recipe.run.seed as i64);
        let cfg = TransformerConfig::from_recipe(&recipe.model);
        crate::memory::check(
            &training_need(recipe, &cfg, setup),
            setup.device,
            "training",
        )?;
        let mut params = ParamStore::new(setup.device);
        let pieces_dealt = deal_pieces_as_built(recipe, setup, &cfg, &mut params);
        let mut model = Transformer::new(&cfg, &mut params)?;
        params.stop_sharding_as_added()?;
        model.set_recompute(recompute_mode(recipe, &cfg)?);
        check_reduce_every_micro_batch(recipe, &cfg)?;
        check_full_shard(recipe, &cfg)?;
        let init = init_weights(recipe, &cfg, setup, &mut params, &model)?;
        let base_params: Vec<String> = params.trainable().map(|p| p.name.clone()).collect();
        let relora = apply_peft(recipe, setup, &base_params, &mut model, &mut params)?;
        // `[distill]`: the frozen teacher; hidden-state projections join the student's parameters.
        let distiller = match &recipe.distill {
            Some(d) => Some(LmDistiller::new(
                d,
                &cfg,
                recipe.data.seq_len,
                &mut params,
                setup.device,
            )?),
            None => None,
        };
        // bf16 weights: cast now, or with fp32 master copies once the optimizer took them from
        // the fp32 values (`optim.master_weights`).
        let bf16 = recipe.run.precision == Precision::Bf16;
        let masters = recipe.optim.master_weights();
        if bf16 && !masters {
            params.set_kind(Kind::BFloat16);
        }
        let flat = flat_layout(recipe, setup, &params, &model)?;
        let owners = match flat {
            Some(_) => None,
            None => shard_owners(recipe, setup, &params, pieces_dealt)?,
        };
        let optimizer = match (&flat, &owners) {
            (Some(f), _) => Optimizer::build_sliced(&recipe.optim, &params, f.slices())?,
            (None, Some(o)) => Optimizer::build_owned(&recipe.optim, &params, &|n| o.owns(n))?,
            (None, None) => Optimizer::build(&recipe.optim, &params)?,
        };
        if bf16 && masters {
            params.set_kind(Kind::BFloat16);
        }
        let layerwise = layerwise_hooks(recipe, setup, &optimizer)?;
        let lm = Lm {
            cfg,
            model,
            params,
            optimizer,
            base_params,
            relora,
            distiller,
            layerwise,
            pruner: None,
            owners,
            flat,
            held_grad_bytes: 0,
            peak_held_grad_bytes: 0,
            piece_shards: None,
            held_param_bytes: 0,
        };
        Ok((lm, init))
    }

    /// The state this start trains from, weights and optimizer state loaded: the resumed
    /// checkpoint's, the `load = "full"` checkpoint's, or a fresh run's.
    fn start_state(
        &mut self,
        recipe: &Recipe,
        init: &Init,
        setup: &Setup,
        total_steps: i64,
    ) -> Result<TrainState> {
        let seed = recipe.run.seed;
        if let Some(dir) = &setup.resume_dir {
            let part = self.owners.is_some() || self.flat.is_some();
            let state =
                harness::load_resume(dir, seed, &mut self.params, &mut self.optimizer, part)?;
            if let Some((r, _)) = &self.relora {
                if r.full_rank_warmup_steps > 0 && !r.full_rank(state.step) {
                    self.freeze_base();
                }
            }
            return Ok(state);
        }
        let Some((dir, step)) = &init.full else {
            return Ok(harness::fresh_state(seed));
        };
        let part = self.owners.is_some() || self.flat.is_some();
        let mut state = checkpoint::load(dir, &mut self.params, &mut self.optimizer, part)?;
        state.seed = seed;
        state.train_seconds = 0.0;
        if *step >= total_steps {
            return Err(Error::Recipe(format!(
                "init.from: the checkpoint is at step {step} and load = \"full\" continues from there, \
                 but the run has {total_steps} steps: raise train.max_steps"
            )));
        }
        tracing::info!(
            "continuing {} (weights, optimizer state, step {step})",
            dir.display()
        );
        Ok(state)
    }

    /// `run.shard = "gradients"` or `"full"` over several ranks: who owns which gradient.
    fn sharded_gradients(&self, recipe: &Recipe) -> Option<&Owners> {
        self.owners
            .as_ref()
            .filter(|_| matches!(recipe.run.shard, Shard::Gradients | Shard::Full))
    }

    /// `run.shard = "full"` over several ranks, once the group is joined: the model gathers its
    /// pieces' weights (freed on the ranks that do not hold them as it was built) around each
    /// use, and every rank writes those it holds into the checkpoints' model file.
    fn shard_pieces(&mut self, recipe: &Recipe, run: &mut Run) -> Result<()> {
        if self.owners.is_none() || recipe.run.shard != Shard::Full {
            return Ok(());
        }
        let blocks = self.cfg.n_layers.max(0) as usize;
        let prefetch = recipe.run.shard_prefetch;
        let shards = PieceShards::new(run.dp.view(), &self.params, blocks, prefetch)?;
        let shards = std::rc::Rc::new(shards);
        self.model.set_piece_weights(shards.clone());
        let source = shards.clone();
        run.set_model_part(Box::new(move |store| source.model_part(store)));
        self.piece_shards = Some(shards);
        Ok(())
    }

    /// The owning rank of each trainable parameter when gradients are reduced onto their
    /// owners only (`OverlappedGrads`).
    fn gradient_owners(&self, recipe: &Recipe) -> Option<Vec<usize>> {
        self.sharded_gradients(recipe).map(Owners::owner_of_each)
    }

    fn freeze_base(&mut self) {
        for name in &self.base_params {
            self.params.freeze(name);
        }
    }

    /// The start-up lines: sizes, device, tokens per step and the memory of the weights,
    /// gradients and optimizer state.
    fn log_start(&self, recipe: &Recipe, run: &Run, total_steps: i64) {
        let params = &self.params;
        tracing::info!(
            "{}: {} parameters ({} trainable), {} ({}), {} tokens/step, {} steps",
            recipe.run.name,
            harness::human(params.num_params() as f64),
            harness::human(params.num_trainable() as f64),
            device::describe(run.device),
            recipe.run.precision.as_str(),
            recipe.tokens_per_step(),
            total_steps
        );
        let mib = |b: i64| b as f64 / (1u64 << 20) as f64;
        tracing::info!(
            "memory: parameters {:.1} MiB, gradients {:.1} MiB, optimizer state {:.1} MiB",
            mib(params.bytes()),
            mib(grad_bytes(params)),
            mib(self.optimizer.state_bytes())
        );
    }

    /// This step's LR (`at` counts from the stage's first step) and the hyperparameters that
    /// follow it, set on the optimizer. ReLoRA's jagged schedule re-warms the LR after each merge.
    fn hyperparameters(
        &mut self,
        recipe: &Recipe,
        schedule: &Schedule,
        at: i64,
        step: i64,
    ) -> Hyper {
        let lr = schedule.lr(at) * self.relora.as_ref().map_or(1.0, |(r, _)| r.lr_factor(step));
        // `train.weight_decay_schedule = "follow_lr"`: the decay coefficient scales with the LR.
        let weight_decay = match recipe.train.weight_decay_schedule {
            WeightDecaySchedule::Constant => None,
            WeightDecaySchedule::FollowLr => {
                let wd = recipe.optim.weight_decay() * (lr / recipe.optim.lr());
                self.optimizer.set_weight_decay(wd);
                Some(wd)
            }
        };
        // `train.momentum_schedule = "inverse_lr"`: low momentum at the LR's peak, high around it.
        let momentum = recipe.train.momentum_schedule.momentum(
            recipe.optim.momentum(),
            recipe.train.momentum_min,
            lr,
            recipe.optim.lr(),
        );
        if let Some(m) = momentum {
            self.optimizer.set_momentum(m);
        }
        Hyper {
            lr,
            weight_decay,
            momentum,
        }
    }

    /// One optimizer step: forward and backward over the micro-batches, the gradients averaged
    /// over the ranks and clipped, then the update (already done inside the backward pass with
    /// `optim.layerwise`).
    fn step(
        &mut self,
        recipe: &Recipe,
        run: &Run,
        batches: &Prefetcher,
        overlap: Option<&OverlappedGrads>,
        hyper: Hyper,
        step: i64,
    ) -> Result<StepOut> {
        let sums = self.backward(recipe, run, batches, overlap, hyper.lr)?;
        if let Some(b) = &self.piece_shards {
            // A gather that failed inside the passes, and the block the backward pass ended on.
            b.take_error()?;
            b.release_all()?;
        }
        // Several ranks: average the gradients, sum the loss and agree on stopping (a signal to
        // any rank stops all of them after this step, with one checkpoint).
        let (mut global_loss_sum, mut global_unweighted_sum, mut stop_all) = (None, None, false);
        if run.world.is_distributed() {
            let mut scalars = [
                sums.loss.double_value(&[]),
                run.stop_vote(),
                sums.reweight.unweighted.double_value(&[]),
            ];
            run.reduce_step(overlap, &self.params, &mut scalars)?;
            if let Some(owners) = self.sharded_gradients(recipe) {
                owners.drop_others_grads(&self.params)?;
            }
            global_loss_sum = Some(scalars[0] / run.world.size as f64);
            stop_all = scalars[1] > 0.0;
            global_unweighted_sum = Some(scalars[2] / run.world.size as f64);
        }
        let grad_norm = match &self.layerwise {
            // Already stepped, parameter by parameter, during the backward pass.
            Some(_) => {
                self.optimizer.finish_step();
                sums.layerwise_norm_sq.double_value(&[]).sqrt()
            }
            None => match (&self.flat, self.sharded_gradients(recipe)) {
                (Some(f), _) => f.clip_grad_norm(&run.dp, recipe.train.clip_grad_norm)?,
                (None, Some(o)) => {
                    o.clip_grad_norm(&run.dp, &self.params, recipe.train.clip_grad_norm)?
                }
                (None, None) => clip_grad_norm(&self.params, recipe.train.clip_grad_norm)?,
            },
        };
        harness::check_grad_norm(
            grad_norm,
            step + 1,
            "lower optim.lr or set train.clip_grad_norm",
        )?;
        self.held_grad_bytes =
            held_grad_bytes(&self.params) + self.flat.as_ref().map_or(0, FlatShards::grad_bytes);
        self.peak_held_grad_bytes = self.peak_held_grad_bytes.max(self.held_grad_bytes);
        self.held_param_bytes = self
            .params
            .iter()
            .map(|p| torch_ext::storage_bytes(&p.tensor))
            .sum();
        if self.layerwise.is_none() {
            self.optimizer.step(hyper.lr)?;
        }
        if let Some(owners) = &self.owners {
            owners.broadcast_updates(&run.dp)?;
        }
        if let Some(flat) = &self.flat {
            flat.gather_updates(&run.dp)?;
        }
        self.params.apply_masks();
        self.params.zero_grad();
        let log = StepLog {
            hyper,
            loss_sum: sums.loss,
            global_loss_sum,
            global_unweighted_sum,
            grad_norm,
            moe_stats: sums.moe_stats,
            distill_sums: sums.distill,
            reweight_sums: sums.reweight,
        };
        Ok(StepOut { log, stop_all })
    }

    /// Forward and backward over the step's micro-batches, the gradients accumulating. The
    /// last backward pass overlaps the all-reduce (`overlap`, several ranks) or updates each
    /// parameter as its gradient completes (`optim.layerwise`).
    fn backward(
        &mut self,
        recipe: &Recipe,
        run: &Run,
        batches: &Prefetcher,
        overlap: Option<&OverlappedGrads>,
        lr: f64,
    ) -> Result<MicroSums> {
        let device = run.device;
        let accum = recipe.train.grad_accum;
        let mut sums = MicroSums::new(device);
        let step_batches = (0..accum)
            .map(|_| batches.next())
            .collect::<Option<Vec<Batch>>>()
            .ok_or_else(|| Error::Torch("data prefetch thread stopped".into()))?;
        // This rank's rows of the global batch.
        let rows = |t: &Tensor| t.narrow(0, run.shard_start as i64, run.shard_rows as i64);
        let per_target = match recipe.data.has_samples() {
            true => Some(per_target_weights(run, &step_batches, &rows)?),
            false => None,
        };
        for (micro, batch) in (0..accum).zip(step_batches) {
            let inputs = rows(&batch.inputs).to_device(device);
            let targets = rows(&batch.targets).to_device(device);
            let packing = packing_of(&batch, &rows, device);
            if let Some(d) = &self.distiller {
                // Forward and backward of both models, the logits chunk by chunk.
                let scale = 1.0 / accum as f64;
                let l = d.backward(
                    &self.model,
                    &inputs,
                    &targets,
                    scale,
                    device,
                    recipe.run.precision,
                )?;
                sums.loss += &l.loss;
                sums.distill.add(&l);
                sums.moe_stats = l.moe_layers;
                continue;
            }
            let (loss, out) = self.forward(
                recipe,
                &inputs,
                packing.as_ref(),
                &targets,
                device,
                &mut sums.reweight,
            )?;
            // MoE models also minimise their routers' load-balancing and z losses.
            let total = match out.router_loss() {
                Some(router) => &loss + router,
                None => loss.shallow_clone(),
            };
            // Chat/instruction samples: the step's loss is the mean over all its target tokens
            // (every micro-batch and rank), not a mean of per-micro-batch means.
            let (scaled, logged) = match &per_target {
                Some(weights) => {
                    let sum = &loss * weights[micro as usize];
                    let router = &total - &loss;
                    (&sum + router / accum as f64, sum.detach() * accum as f64)
                }
                None => (&total / accum as f64, loss.detach()),
            };
            let last = micro + 1 == accum;
            match (&self.layerwise, overlap) {
                // The step's last backward pass updates each parameter as its gradient
                // completes (the earlier micro-batches only accumulate).
                (Some((hooks, lw_params)), _) if last => layerwise_backward(
                    hooks,
                    lw_params,
                    &mut self.optimizer,
                    &scaled,
                    lr,
                    &mut sums.layerwise_norm_sq,
                )?,
                (None, Some(o)) if last => o.backward(&run.dp, || scaled.f_backward())?,
                // run.reduce_every_micro_batch: every micro-batch's gradients are reduced onto
                // their owners (`check_reduce_every_micro_batch`).
                (None, Some(o)) if recipe.run.reduce_every_micro_batch => {
                    o.backward_accumulating(&run.dp, || scaled.f_backward())?;
                    o.settle(&run.dp)?;
                }
                _ => scaled.f_backward()?,
            }
            sums.loss += logged.to_kind(Kind::Float);
            sums.moe_stats = out.moe_layers;
            if !last {
                let held = held_grad_bytes(&self.params);
                self.peak_held_grad_bytes = self.peak_held_grad_bytes.max(held);
            }
        }
        Ok(sums)
    }

    /// The training loss of one micro-batch: the mean over tokens, or with `[train.reweight]`
    /// each sequence's loss times a weight computed from the detached losses
    /// (`data/reweight.rs`).
    fn forward(
        &self,
        recipe: &Recipe,
        inputs: &Tensor,
        packing: Option<&Packing>,
        targets: &Tensor,
        device: Device,
        reweight_sums: &mut ReweightSums,
    ) -> Result<(Tensor, ModelOutput)> {
        let precision = recipe.run.precision;
        let Some(rw) = &recipe.train.reweight else {
            return forward_loss(
                &self.model,
                inputs,
                packing,
                targets,
                true,
                device,
                precision,
                recipe.train.loss_chunk_tokens,
            );
        };
        let (seq, out) =
            forward_with(&self.model, inputs, packing, true, device, precision, |l| {
                reweight::sequence_losses(l, targets)
            })?;
        let weights = rw.weights(&seq);
        reweight_sums.add(&seq, &weights);
        Ok(((&seq * &weights).mean(Kind::Float), out))
    }

    /// After step `step` (counted done): ReLoRA's merge and restart, and pruning events.
    fn after_step(&mut self, recipe: &Recipe, step: i64) -> Result<()> {
        if let Some((r, lora)) = self.relora.as_ref().filter(|(r, _)| r.resets_after(step)) {
            if step == r.full_rank_warmup_steps {
                for name in &self.base_params {
                    self.params.freeze(name);
                }
            }
            // The re-drawn A factors: a pure function of (seed, step).
            tch::manual_seed((stream_seed(recipe.run.seed, step, -2, 0) >> 1) as i64);
            crate::peft::relora::merge_and_reinit(&self.model)?;
            crate::peft::relora::reset_optimizer(r, lora, &mut self.optimizer)?;
            tracing::debug!("ReLoRA: merged and restarted the adapters after step {step}");
        }
        if let Some(p) = &self.pruner {
            p.on_step(step, &mut self.params)?;
        }
        Ok(())
    }

    /// summary.json's numbers at the end of the run.
    #[allow(clippy::too_many_arguments)]
    fn summary(
        &self,
        recipe: &Recipe,
        run: &Run,
        state: &TrainState,
        init: Init,
        final_valid_losses: BTreeMap<String, f64>,
        mixture: Option<BTreeMap<String, MixtureReport>>,
        samples: BTreeMap<String, SftSummary>,
        stage: Option<&InStage>,
    ) -> Summary {
        let time = run.clock.throughput(state.tokens);
        let footprint = run.footprint(
            &self.params,
            &self.optimizer,
            self.pruner.as_ref(),
            recipe.run.precision,
        );
        let no_embed = self.model.num_params_no_embeddings(&self.params);
        let flops_per_token = self
            .cfg
            .train_flops_per_token(no_embed, recipe.data.seq_len);
        let tflops = flops_per_token * time.per_s / 1e12;
        let valid_loss = state.last_valid_loss;
        let init_load = recipe.init.as_ref().map(|i| {
            if i.load == InitLoad::Full {
                "full"
            } else {
                "model"
            }
            .to_string()
        });
        Summary {
            name: recipe.run.name.clone(),
            steps: state.step,
            tokens: state.tokens,
            final_train_loss: run.last_train_loss,
            final_valid_loss: valid_loss,
            final_valid_perplexity: valid_loss.map(f64::exp),
            train_seconds: time.train_seconds,
            tokens_per_s: time.per_s,
            tokens_per_s_wall: time.per_s_wall,
            sizes: harness::Sizes::of(&self.params),
            grad_bytes: grad_bytes(&self.params),
            held_grad_bytes: self.held_grad_bytes,
            peak_held_grad_bytes: self.peak_held_grad_bytes,
            held_param_bytes: self.held_param_bytes,
            piece_gathers: self.piece_shards.as_ref().map(|b| b.gather_counts()),
            footprint,
            model_tflops_per_s: tflops,
            mfu: recipe.run.peak_tflops.map(|p| tflops / p),
            resumed_from: run.resume_dir.clone(),
            init_from: init.from,
            init_load,
            final_valid_losses,
            mixture,
            stages: stage.map(|s| s.all.to_vec()),
            samples,
        }
    }
}

/// The bytes of the trainable parameters' gradients (as many as the parameters themselves).
fn grad_bytes(params: &ParamStore) -> i64 {
    params
        .trainable()
        .map(|p| crate::models::params::bytes_of(&p.tensor))
        .sum()
}

/// The bytes of the gradients the trainable parameters hold now.
fn held_grad_bytes(params: &ParamStore) -> i64 {
    params
        .trainable()
        .map(|p| p.tensor.grad())
        .filter(Tensor::defined)
        .map(|g| crate::models::params::bytes_of(&g))
        .sum()
}

/// What the micro-batches of one step add up.
struct MicroSums {
    loss: Tensor,
    /// `optim.layerwise`: the squared gradient norm, summed as the hooks see the gradients.
    layerwise_norm_sq: Tensor,
    moe_stats: Vec<MoeLayerStats>,
    distill: StepSums,
    reweight: ReweightSums,
}

impl MicroSums {
    fn new(device: Device) -> MicroSums {
        MicroSums {
            layerwise_norm_sq: Tensor::zeros([], (Kind::Float, device)),
            loss: Tensor::zeros([], (Kind::Float, device)),
            moe_stats: Vec::new(),
            distill: StepSums::new(device),
            reweight: ReweightSums::new(device),
        }
    }
}

/// The step's last backward pass with `optim.layerwise`: each parameter is updated as soon as
/// its gradient is complete and its gradient dropped at once; the squared gradient norms are
/// added to `norm_sq`.
fn layerwise_backward(
    hooks: &torch_ext::GradReadyHooks,
    params: &[Tensor],
    optimizer: &mut Optimizer,
    loss: &Tensor,
    lr: f64,
    norm_sq: &mut Tensor,
) -> Result<()> {
    let mut failed = None;
    hooks.backward(
        &mut |i| {
            if failed.is_some() {
                return;
            }
            let p = &params[i];
            let g = p.grad();
            if g.defined() {
                *norm_sq += g.square().sum(Kind::Float);
            }
            let stepped = optimizer
                .step_param(i, lr)
                .and_then(|()| torch_ext::grads_to_none(&[p]).map_err(Error::Torch));
            failed = stepped.err();
        },
        || loss.f_backward(),
    )?;
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `[init]`: the weights this run starts from, loaded into `params` unless the run resumes
/// (its own checkpoint gives them then); with `load = "full"`, the checkpoint to continue.
fn init_weights(
    recipe: &Recipe,
    cfg: &TransformerConfig,
    setup: &Setup,
    params: &mut ParamStore,
    model: &Transformer,
) -> Result<Init> {
    let full = match &recipe.init {
        Some(init) if init.load == InitLoad::Full => match ModelSource::parse(&init.from)? {
            ModelSource::Checkpoint { dir, .. } => {
                let step = checkpoint::read_state(&dir)?.step;
                Some((dir, step))
            }
            ModelSource::Hf(_) => {
                return Err(Error::Recipe(format!(
                    "init.load: \"full\" needs a trainer checkpoint in init.from, got {}",
                    init.from
                )))
            }
        },
        _ => None,
    };
    let (Some(init), None) = (&recipe.init, &setup.resume_dir) else {
        return Ok(Init { from: None, full });
    };
    let source = ModelSource::parse(&init.from)?;
    // With load = "full", the weights come with the optimizer state (`Lm::start_state`).
    if full.is_none() {
        load_init_weights(init, &source, cfg, params, model)?;
    }
    Ok(Init {
        from: Some(source.describe()),
        full,
    })
}

/// A run started from a model keeps that model's tokenizer files (`TOKENIZER_FILES`) in its
/// run directory, so that its checkpoints and exports carry the tokenizer they were trained with.
fn keep_tokenizer_files(recipe: &Recipe, run_dir: &std::path::Path) -> Result<()> {
    let Some(init) = &recipe.init else {
        return Ok(());
    };
    let source = ModelSource::parse(&init.from)?;
    let copied = crate::data::tokenizer::copy_tokenizer_files(source.files_dir(), run_dir)?;
    if !copied.is_empty() {
        tracing::info!(
            "kept the model's {} in {}",
            copied.join(", "),
            run_dir.display()
        );
    }
    Ok(())
}

/// `[init] from` into `params`: the weights as they are, or a dense model upcycled into the
/// experts of an MoE one (`[init.upcycle]`).
fn load_init_weights(
    init: &crate::config::InitConfig,
    source: &ModelSource,
    cfg: &TransformerConfig,
    params: &mut ParamStore,
    model: &Transformer,
) -> Result<()> {
    if init.upcycle.is_some() {
        let dense = TransformerConfig {
            moe: None,
            variant: Default::default(),
            ..cfg.clone()
        };
        source.load_upcycled(&dense, params, model)?;
        tracing::info!(
            "upcycled the dense model {} into {} experts per layer",
            source.describe(),
            cfg.moe.as_ref().map_or(0, |m| m.n_experts)
        );
    } else {
        source.load_weights(cfg, params)?;
        tracing::info!("initialised the model from {}", source.describe());
    }
    Ok(())
}

/// `[peft]`: LoRA / LoRA-FA / ReLoRA adapters on the (loaded) base, which is frozen from here on
/// (after ReLoRA's full-rank warm start, if any); ReLoRA's settings and adapters.
fn apply_peft(
    recipe: &Recipe,
    setup: &Setup,
    base_params: &[String],
    model: &mut Transformer,
    params: &mut ParamStore,
) -> Result<Option<(Relora, Lora)>> {
    let Some(peft) = &recipe.peft else {
        return Ok(None);
    };
    let lora = crate::peft::lora::apply(model, params, peft)?;
    // A resumed run takes its adapters from its own checkpoint instead.
    if let (Some(from), None) = (&peft.from, &setup.resume_dir) {
        crate::peft::lora::load_peft(model, &lora, from)?;
        tracing::info!("adapters initialised from {}", from.display());
    }
    tracing::info!("{}", lora.describe());
    let Some(r) = Relora::from_config(peft) else {
        return Ok(None);
    };
    tracing::info!(
        "ReLoRA: merge every {} steps, re-warm over {}, keep {} of the adapter moments, full-rank for the first {}",
        r.merge_every, r.rewarm_steps, r.keep_fraction, r.full_rank_warmup_steps
    );
    if r.full_rank_warmup_steps > 0 {
        // The base trains too until the switch, so the optimizer holds its state.
        for name in base_params {
            params.unfreeze(name);
        }
    }
    Ok(Some((r, lora)))
}

/// `optim.layerwise`: hooks on the parameters the optimizer updates during the backward pass.
/// One process only.
fn layerwise_hooks(
    recipe: &Recipe,
    setup: &Setup,
    optimizer: &Optimizer,
) -> Result<Option<(torch_ext::GradReadyHooks, Vec<Tensor>)>> {
    if !recipe.optim.layerwise() {
        return Ok(None);
    }
    if setup.world.is_distributed() {
        return Err(Error::Recipe(
            "optim.layerwise: one process only (the gradients must be averaged over the ranks before any update)".into(),
        ));
    }
    let params = optimizer.layerwise_params()?;
    let hooks =
        torch_ext::GradReadyHooks::install(params.iter().map(Tensor::shallow_clone).collect())
            .map_err(Error::Torch)?;
    Ok(Some((hooks, params)))
}

/// The training batches, prefetched, and with `[data.mixture]` the rows drawn per source so far.
struct TrainData {
    /// Windows of one source or a mixture (`None`: chat/instruction samples).
    mixture: Option<Mixture>,
    prefetch: Prefetcher,
    /// With a mixture: rows drawn per source so far, a pure function of the steps (recomputed on
    /// resume from the run's, or the stage's, first step).
    counts: Option<Vec<u64>>,
    seq_len: usize,
    /// What reading each chat/instruction source did, by name.
    samples: BTreeMap<String, SftSummary>,
}

impl TrainData {
    fn start(
        recipe: &Recipe,
        input: TrainInput,
        first_step: i64,
        step: i64,
        total_steps: i64,
    ) -> TrainData {
        let (bs, accum, seed) = (
            recipe.train.batch_size as usize,
            recipe.train.grad_accum,
            recipe.run.seed,
        );
        let seq_len = recipe.data.seq_len as usize;
        let samples = samples_read(&input);
        let (rows, mixture) = match input {
            TrainInput::Windows(mixture) if mixture.has_samples() => (
                TrainRows::Mixed(MixedRows::new(
                    mixture.clone(),
                    MixedRowsSettings {
                        packing: recipe.data.packing(),
                        document_mask: recipe.data.document_mask,
                        seq_len,
                        batch_size: bs,
                        grad_accum: accum,
                        seed,
                        base_step: first_step,
                    },
                )),
                Some(mixture),
            ),
            TrainInput::Windows(mixture) => (
                TrainRows::Windows {
                    mixture: mixture.clone(),
                    seq_len,
                    batch_size: bs,
                    seed,
                },
                Some(mixture),
            ),
            TrainInput::Samples(set) => (
                TrainRows::Samples(SampleRows::new(
                    set,
                    recipe.data.packing(),
                    seq_len,
                    bs,
                    accum,
                    seed,
                )),
                None,
            ),
        };
        let counts = mixture
            .as_ref()
            .filter(|_| recipe.data.mixture.is_some())
            .map(|m| m.counts(bs, accum, seed, first_step, step));
        let prefetch = Prefetcher::start(
            move |step, micro| rows.batch(step, micro),
            accum,
            step,
            total_steps - 1,
            2 * accum as usize,
        );
        TrainData {
            mixture,
            prefetch,
            counts,
            seq_len,
            samples,
        }
    }

    /// Counts the rows step `step` drew.
    fn count_step(&mut self, recipe: &Recipe, step: i64) {
        let Some(counts) = self.counts.as_mut() else {
            return;
        };
        let (bs, accum) = (recipe.train.batch_size as usize, recipe.train.grad_accum);
        let Some(mixture) = &self.mixture else {
            return;
        };
        let drawn = mixture.counts(bs, accum, recipe.run.seed, step, step + 1);
        for (c, n) in counts.iter_mut().zip(drawn) {
            *c += n;
        }
    }

    /// Per source: its weight, realised fraction and epochs so far.
    fn report(&self) -> Option<BTreeMap<String, MixtureReport>> {
        let counts = self.counts.as_ref()?;
        Some(
            self.mixture
                .as_ref()?
                .report(counts, self.seq_len)
                .into_iter()
                .collect(),
        )
    }
}

/// What reading the chat/instruction sources of the training data did, by source name.
fn samples_read(input: &TrainInput) -> BTreeMap<String, SftSummary> {
    match input {
        TrainInput::Samples(set) => BTreeMap::from([("train".to_string(), set.summary)]),
        TrainInput::Windows(m) => m
            .names
            .iter()
            .zip(&m.sources)
            .filter_map(|(name, s)| match s {
                MixSource::Samples(set) => Some((name.clone(), set.summary)),
                MixSource::Windows(_) => None,
            })
            .collect(),
    }
}

/// A logged training step's row: the loss, LR, gradient norm and throughput, then what the
/// recipe's methods add (MoE, pruning, distillation, reweighting, mixture, schedules, stage).
fn log_step(
    recipe: &Recipe,
    lm: &Lm,
    data: &TrainData,
    run: &mut Run,
    state: &TrainState,
    out: StepLog,
    stage: Option<&InStage>,
) -> Result<()> {
    let accum = recipe.train.grad_accum as f64;
    let loss = out
        .global_loss_sum
        .unwrap_or_else(|| out.loss_sum.double_value(&[]))
        / accum;
    harness::check_loss(
        loss,
        state.step,
        "lower optim.lr or set train.clip_grad_norm",
    )?;
    let tokens_per_s = run.clock.window_rate();
    let lr = out.hyper.lr;
    let mut r = row(&[
        ("step", json!(state.step)),
        ("loss", json!(loss)),
        ("lr", json!(lr)),
        ("grad_norm", json!(out.grad_norm)),
        ("tokens", json!(state.tokens)),
        ("tokens_per_s", json!(tokens_per_s)),
    ]);
    r.extend(moe_metrics(&out.moe_stats));
    r.extend(harness::pruning_metrics(
        lm.pruner.as_ref(),
        &lm.optimizer,
        &lm.params,
    ));
    r.extend(out.distill_sums.metrics());
    r.extend(
        out.reweight_sums
            .metrics(out.global_unweighted_sum.map(|s| s / accum)),
    );
    if let Some(report) = data.report() {
        for (name, m) in report {
            r.insert(format!("mix_{name}_fraction"), json!(m.fraction));
            r.insert(format!("mix_{name}_epochs"), json!(m.epochs));
        }
    }
    if let Some(wd) = out.hyper.weight_decay {
        r.insert("weight_decay".into(), json!(wd));
    }
    if let Some(m) = out.hyper.momentum {
        r.insert("momentum".into(), json!(m));
    }
    if let Some(s) = stage {
        r.insert("stage".into(), json!(s.name));
    }
    run.log_train(r, state.step, loss, lr, tokens_per_s)
}

/// The validation sets and the last loss of each.
struct Evals {
    sets: Vec<(String, ValidData)>,
    last: BTreeMap<String, f64>,
}

impl Evals {
    fn new(sets: Vec<(String, ValidData)>) -> Evals {
        Evals {
            sets,
            last: BTreeMap::new(),
        }
    }

    /// Evaluates every validation set, logs a row and a line for each, and keeps the first
    /// set's loss in the state (checkpointed). With several processes each evaluates its share
    /// of the batches and the partial sums are added over the ranks (one all-reduce).
    fn run(
        &mut self,
        model: &Transformer,
        recipe: &Recipe,
        run: &mut Run,
        state: &mut TrainState,
        stage: Option<&InStage>,
    ) -> Result<()> {
        let (precision, world) = (recipe.run.precision, &run.world);
        let mut sums = self
            .sets
            .iter()
            .map(|(_, span)| {
                evaluate_part(
                    model, span, recipe, run.device, precision, world.rank, world.size,
                )
            })
            .collect::<Result<Vec<f64>>>()?;
        run.dp.sum(&mut sums)?;
        let batches = recipe.train.eval_batches as f64;
        let losses: Vec<f64> = sums.iter().map(|sum| sum / batches).collect();
        state.last_valid_loss = losses.first().copied();
        for ((name, _), valid_loss) in self.sets.iter().zip(losses) {
            let mut r = row(&[
                ("step", json!(state.step)),
                ("split", json!(name)),
                ("loss", json!(valid_loss)),
                ("perplexity", json!(valid_loss.exp())),
            ]);
            if let Some(s) = stage {
                r.insert("stage".into(), json!(s.name));
            }
            run.log(r)?;
            run.progress.println(&format!(
                "step {}: {name} loss {valid_loss:.4}, perplexity {:.2}",
                state.step,
                valid_loss.exp()
            ));
            self.last.insert(name.clone(), valid_loss);
        }
        run.clock.restart_window();
        Ok(())
    }
}

impl RunSummary for Summary {
    fn report(&self) -> Vec<(&'static str, String)> {
        let gib = harness::gib;
        let mut lines = vec![
            ("run", self.name.clone()),
            ("steps", self.steps.to_string()),
            ("tokens", self.tokens.to_string()),
        ];
        if let Some(l) = self.final_train_loss {
            lines.push(("train loss", format!("{l:.4}")));
        }
        if let (Some(l), Some(p)) = (self.final_valid_loss, self.final_valid_perplexity) {
            lines.push(("valid loss", format!("{l:.4} (perplexity {p:.2})")));
        }
        lines.push(("wall time", format_duration(self.train_seconds)));
        let rates = format!(
            "{:.0} in steps ({:.0} over the wall time)",
            self.tokens_per_s, self.tokens_per_s_wall
        );
        lines.push(("tokens/s", rates));
        let mfu = self.mfu.map(|m| format!(" (MFU {:.1}%)", 100.0 * m));
        let tflops = format!("{:.3}{}", self.model_tflops_per_s, mfu.unwrap_or_default());
        lines.push(("model TFLOP/s", tflops));
        lines.extend(harness::report_peak_memory(
            self.footprint.peak_memory_bytes,
            &self.footprint.peak_memory_kind,
        ));
        let memory = format!(
            "params {:.3} GiB, grads {:.3} GiB, optimizer {:.3} GiB",
            gib(self.sizes.param_bytes),
            gib(self.grad_bytes),
            gib(self.footprint.optimizer_state_bytes)
        );
        lines.push(("memory", memory));
        lines.extend(harness::report_sparsity(self.footprint.pruning.as_ref()));
        lines
    }
}

/// The training data (one source, or a mixture, or chat/instruction samples) and the named
/// validation sets, each checked to hold at least one `window`. Without `[data.valid_sets]`, the
/// validation set is `data.valid` or the held-out tail of the training source (`valid`); with a
/// mixture, each source's held-out tail under the source's name.
pub(crate) fn open_data(
    recipe: &Recipe,
    vocab: i64,
    window: usize,
) -> Result<(TrainInput, Vec<(String, ValidData)>)> {
    let d = &recipe.data;
    let held_out = d.valid.is_none() && d.valid_sets.is_empty();
    let open_valid = |src: &SourceConfig, key: &str| -> Result<ValidData> {
        let v = if src.is_samples() {
            let set = SampleSet::open_source(src, key, window - 1, vocab)?;
            ValidData::samples(Arc::new(set), window - 1, d.packing())
        } else {
            let span = Span::whole(source::open(src, key, vocab)?);
            ValidData::Windows(span.with_document_mask(d.document_mask, key)?)
        };
        v.check_fits(window, key)?;
        Ok(v)
    };
    let mut valid = Vec::new();
    for (name, src) in &d.valid_sets {
        valid.push((
            name.clone(),
            open_valid(src, &format!("data.valid_sets.{name}"))?,
        ));
    }
    let train = match (&d.mixture, &d.train) {
        (Some(m), _) => {
            TrainInput::Windows(open_mixture(m, held_out, d, vocab, window, &mut valid)?)
        }
        (None, Some(t)) if t.is_samples() => {
            let held = held_out.then_some("valid");
            TrainInput::Samples(open_samples(
                t,
                "data.train",
                held,
                d,
                vocab,
                window,
                &mut valid,
            )?)
        }
        (None, Some(t)) => {
            let data = source::open(t, "data.train", vocab)?;
            let train = if held_out {
                let (train, v) = Span::split(data, d.valid_fraction);
                v.check_fits(window, "data.valid_fraction (held-out part of data.train)")?;
                let v = v.with_document_mask(d.document_mask, "data.train")?;
                valid.push(("valid".to_string(), ValidData::Windows(v)));
                train
            } else {
                Span::whole(data)
            };
            let train = train.with_document_mask(d.document_mask, "data.train")?;
            train.check_fits(window, "data.train")?;
            TrainInput::Windows(Mixture::from(train))
        }
        (None, None) => {
            return Err(Error::Recipe(
                "data.train: missing: expected data.train or [data.mixture]".into(),
            ))
        }
    };
    if let Some(v) = &d.valid {
        valid.push(("valid".to_string(), open_valid(v, "data.valid")?));
    }
    Ok((train, valid))
}

/// The sources of `[data.mixture]` (token sources and chat/instruction samples), each with its
/// held-out tail pushed to `valid` when `held_out`.
fn open_mixture(
    m: &crate::data::MixtureConfig,
    held_out: bool,
    d: &crate::data::DataConfig,
    vocab: i64,
    window: usize,
    valid: &mut Vec<(String, ValidData)>,
) -> Result<Mixture> {
    let (mut names, mut sources, mut weights) = (Vec::new(), Vec::new(), Vec::new());
    for (i, s) in m.sources.iter().enumerate() {
        let key = format!("data.mixture.sources[{i}] ({})", s.name);
        let source = if s.source.is_samples() {
            let held = held_out.then_some(s.name.as_str());
            MixSource::Samples(open_samples(
                &s.source, &key, held, d, vocab, window, valid,
            )?)
        } else {
            MixSource::Windows(open_mixture_span(
                s, &key, held_out, d, vocab, window, valid,
            )?)
        };
        names.push(s.name.clone());
        sources.push(source);
        weights.push(s.weight);
    }
    Ok(Mixture::with_sources(names, sources, &weights))
}

/// A chat/instruction source's training samples; with `held_out` (the validation set's name),
/// its last `data.valid_fraction` pushed to `valid`.
fn open_samples(
    src: &SourceConfig,
    key: &str,
    held_out: Option<&str>,
    d: &crate::data::DataConfig,
    vocab: i64,
    window: usize,
    valid: &mut Vec<(String, ValidData)>,
) -> Result<Arc<SampleSet>> {
    let set = SampleSet::open_source(src, key, window - 1, vocab)?;
    log_samples(key, &set);
    let train = match held_out {
        Some(name) => {
            let (train, v) = set.split(d.valid_fraction);
            let v = ValidData::samples(Arc::new(v), window - 1, d.packing());
            v.check_fits(
                window,
                &format!("{key} held-out part (data.valid_fraction)"),
            )?;
            valid.push((name.to_string(), v));
            train
        }
        None => set,
    };
    if train.is_empty() {
        return Err(Error::Data {
            path: key.to_string(),
            msg: "holds no training sample after the held-out part".into(),
        });
    }
    Ok(Arc::new(train))
}

/// A token source of a mixture: its training span, and its held-out tail pushed to `valid`.
fn open_mixture_span(
    s: &crate::data::MixtureSource,
    key: &str,
    held_out: bool,
    d: &crate::data::DataConfig,
    vocab: i64,
    window: usize,
    valid: &mut Vec<(String, ValidData)>,
) -> Result<Span> {
    let data = source::open(&s.source, key, vocab)?;
    let train = if held_out {
        let (train, v) = Span::split(data, d.valid_fraction);
        v.check_fits(
            window,
            &format!("{key} held-out part (data.valid_fraction)"),
        )?;
        let v = v.with_document_mask(d.document_mask, key)?;
        valid.push((s.name.clone(), ValidData::Windows(v)));
        train
    } else {
        Span::whole(data)
    };
    train.check_fits(window, key)?;
    train.with_document_mask(d.document_mask, key)
}

/// What reading the chat/instruction samples did: records, truncations, drops.
fn log_samples(key: &str, set: &SampleSet) {
    let s = &set.summary;
    tracing::info!(
        "{key}: {} records -> {} samples, {} tokens ({} targets); {} truncated to seq_len + 1, {} dropped without a target token",
        s.records,
        s.samples,
        s.tokens,
        s.target_tokens,
        s.truncated,
        s.dropped
    );
}

/// Per micro-batch, `n * world / T`: n its target tokens on this rank, T the step's over all
/// micro-batches and ranks. A micro-batch's mean token loss times it, accumulated and averaged
/// over the ranks as the gradients are, gives the mean over the step's target tokens. The
/// targets are counted once, on the CPU where the batches are.
fn per_target_weights(
    run: &Run,
    batches: &[Batch],
    rows: &dyn Fn(&Tensor) -> Tensor,
) -> Result<Vec<f64>> {
    let counts: Vec<f64> = batches
        .iter()
        .map(|b| rows(&b.targets).ne(-100).sum(Kind::Int64).int64_value(&[]) as f64)
        .collect();
    let mut total = [counts.iter().sum::<f64>()];
    run.dp.sum(&mut total)?;
    let k = run.world.size as f64 / total[0].max(1.0);
    Ok(counts.into_iter().map(|n| n * k).collect())
}

/// The packed samples' segments and positions of a batch (`data/sft.rs`), this rank's rows
/// (`rows`), on `device`.
fn packing_of(batch: &Batch, rows: &dyn Fn(&Tensor) -> Tensor, device: Device) -> Option<Packing> {
    Some(Packing {
        segments: rows(batch.segments.as_ref()?).to_device(device),
        positions: rows(batch.positions.as_ref()?).to_device(device),
    })
}

/// The language-model loss of one batch, and the MoE layers' router losses and statistics.
/// With `chunk > 0` (`train.loss_chunk_tokens`) the output projection and the loss run `chunk`
/// positions at a time (`Transformer::chunked_loss`) and the whole logits never exist;
/// otherwise they are dropped here, before the backward pass: autograd keeps what it needs, and
/// holding the `[b, t, vocab]` tensor through backward would cost its whole size in peak memory
/// (1.6 GiB at GPT-2-small shapes in bf16).
#[allow(clippy::too_many_arguments)]
fn forward_loss(
    model: &Transformer,
    inputs: &Tensor,
    packing: Option<&Packing>,
    targets: &Tensor,
    train: bool,
    device: Device,
    precision: Precision,
    chunk: i64,
) -> Result<(Tensor, ModelOutput)> {
    if chunk == 0 {
        return forward_with(model, inputs, packing, train, device, precision, |logits| {
            Transformer::loss(logits, targets)
        });
    }
    let run = || -> Result<(Tensor, ModelOutput)> {
        let out = model.forward_hidden_packed(inputs, train, &[], packing);
        let loss = model.chunked_loss(&out.hidden, targets, chunk)?;
        let out = ModelOutput {
            logits: Tensor::new(),
            moe_layers: out.moe_layers,
        };
        Ok((loss, out))
    };
    device::autocast(precision, device, run)?
}

/// The forward pass of `forward_loss` with another loss of the logits `[b, t, vocab]` (with
/// `[train.reweight]`: the per-sequence losses).
#[allow(clippy::too_many_arguments)]
fn forward_with<L>(
    model: &Transformer,
    inputs: &Tensor,
    packing: Option<&Packing>,
    train: bool,
    device: Device,
    precision: Precision,
    loss: impl FnOnce(&Tensor) -> L,
) -> Result<(L, ModelOutput)> {
    let run = || {
        let mut out = model.forward_full_packed(inputs, train, packing);
        let loss = loss(&out.logits);
        out.logits = Tensor::new();
        (loss, out)
    };
    device::autocast(precision, device, run)
}

/// Metrics of the MoE layers of the last micro-batch: the mean aux and z losses over layers, the
/// share of dropped assignments, and per layer the load of the busiest expert relative to a
/// uniform load (1 = balanced) plus every expert's share (as arrays, in metrics.jsonl only).
fn moe_metrics(layers: &[MoeLayerStats]) -> Vec<(String, serde_json::Value)> {
    if layers.is_empty() {
        return Vec::new();
    }
    let n = layers.len() as f64;
    let mean = |f: &dyn Fn(&MoeLayerStats) -> f64| layers.iter().map(f).sum::<f64>() / n;
    let mut out = vec![
        (
            "moe_aux_loss".to_string(),
            json!(mean(&|l| l.aux_loss.double_value(&[]))),
        ),
        (
            "moe_z_loss".to_string(),
            json!(mean(&|l| l.z_loss.double_value(&[]))),
        ),
        (
            "moe_dropped_fraction".to_string(),
            json!(mean(&|l| l.dropped_fraction)),
        ),
    ];
    let mut loads = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let load: Vec<f64> =
            Vec::<f64>::try_from(l.expert_load.to_kind(Kind::Double).to_device(Device::Cpu))
                .unwrap_or_default();
        let max = load.iter().cloned().fold(0.0, f64::max);
        out.push((format!("moe_max_load_l{i}"), json!(max * load.len() as f64)));
        loads.push(load);
    }
    out.push(("moe_expert_load".to_string(), json!(loads)));
    out
}

/// Mean validation loss over `train.eval_batches` fixed batches.
pub(crate) fn evaluate(
    model: &Transformer,
    span: &ValidData,
    recipe: &Recipe,
    device: Device,
    precision: Precision,
) -> Result<f64> {
    let sum = evaluate_part(model, span, recipe, device, precision, 0, 1)?;
    Ok(sum / recipe.train.eval_batches as f64)
}

/// The sum of the mean losses of this rank's validation batches: batch `i` of the
/// `recipe.train.eval_batches` fixed batches of `span` when `i % world == rank`. Summed over the
/// ranks and divided by the number of batches, it is the validation loss, and each of N
/// processes evaluates 1/N of the batches. With sharded block weights (`run.shard = "full"`,
/// whose forward pass gathers them from every rank) every rank runs the same number of forward
/// passes: a rank left without a batch in the last round runs one again, uncounted.
fn evaluate_part(
    model: &Transformer,
    span: &ValidData,
    recipe: &Recipe,
    device: Device,
    precision: Precision,
    rank: usize,
    world: usize,
) -> Result<f64> {
    let n = recipe.train.eval_batches as usize;
    let bs = recipe.train.batch_size as usize;
    let rounds = match recipe.run.shard == Shard::Full && world > 1 {
        true => n.div_ceil(world),
        false => (n + world - 1 - rank.min(n)) / world, // batches rank, rank + world, ... < n
    };
    tch::no_grad(|| {
        let mut total = 0.0;
        for round in 0..rounds {
            let i = round * world + rank;
            let counted = i < n;
            let b = span.batch(
                recipe.data.seq_len as usize,
                bs,
                n,
                if counted { i } else { 0 },
            );
            let packing = packing_of(&b, &|t: &Tensor| t.shallow_clone(), device);
            let (loss, _) = forward_loss(
                model,
                &b.inputs.to_device(device),
                packing.as_ref(),
                &b.targets.to_device(device),
                false,
                device,
                precision,
                recipe.train.loss_chunk_tokens,
            )?;
            if counted {
                total += loss.double_value(&[]);
            }
        }
        Ok(total)
    })
}
