//! Pretraining a decoder transformer on next-token prediction, top to bottom: set-up, loop,
//! checkpoints, summary.
//!
//! Reproducibility: torch is reseeded at every step from (seed, step) and the data windows are a
//! pure function of (seed, step, micro-batch), so a run resumed from the checkpoint of step k
//! computes bitwise the same losses as the uninterrupted run (on the CPU, same thread count).

pub use super::run_dir::holds_run;
use super::run_dir::{peak_memory, prepare_run_dir, resume_checkpoint, save_checkpoint};
use crate::checkpoint::{self, TrainState};
use crate::data::loader::{stream_seed, valid_batch, Prefetcher};
use crate::data::mixture::{Mixture, MixtureReport};
use crate::data::reweight;
use crate::data::source::{self, Span};
use crate::device;
use crate::error::{io_err, Error, Result};
use crate::metrics::progress::{format_duration, Progress};
use crate::metrics::{row, MetricsLog};
use crate::load::ModelSource;
use crate::models::params::ParamStore;
use crate::models::transformer::{ModelOutput, MoeLayerStats, Transformer, TransformerConfig};
use crate::optim::{clip_grad_norm, Optimizer};
use crate::prune::Pruner;
use crate::config::{self, InitLoad, Precision, Recipe, WeightDecaySchedule};
use crate::schedule::Schedule;
use crate::signals::StopFlag;
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Where a run starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum Resume {
    /// A fresh run; refused if the run directory already holds one.
    No,
    /// The newest complete checkpoint of the run directory, or a fresh start if it has none.
    Auto,
    /// A given checkpoint directory.
    From(PathBuf),
}

#[derive(Debug)]
pub enum Outcome {
    Finished(Summary),
    /// Stopped by a signal after writing the checkpoint of `step`.
    Interrupted {
        step: i64,
        checkpoint: PathBuf,
    },
    /// Resumed from a checkpoint at or past the end of the run (a finished run started again
    /// with `--resume auto`, as a requeued job does): nothing was trained or written.
    AlreadyDone {
        step: i64,
    },
}

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
    pub params: i64,
    pub trainable_params: i64,
    pub param_bytes: i64,
    pub grad_bytes: i64,
    pub optimizer_state_bytes: i64,
    /// With `[prune]` or GSM: zeros per prunable layer and over all of them, at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pruning: Option<crate::prune::SparsityReport>,
    pub device: String,
    pub precision: String,
    /// Peak allocated accelerator memory (CUDA), or the process's peak resident set (CPU).
    pub peak_memory_bytes: Option<i64>,
    pub peak_memory_kind: String,
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

pub fn run(recipe: &Recipe, resume: Resume, stop: &StopFlag) -> Result<Outcome> {
    run_from(recipe, resume, stop, None)
}

/// `run`, for one stage of a `[[stages]]` recipe (`train/stages.rs`), or an ordinary run
/// (`None`, which writes no `stage` fields). The stage's schedule and its mixture's realised
/// fractions are counted from its first step.
pub fn run_from(
    recipe: &Recipe,
    resume: Resume,
    stop: &StopFlag,
    stage: Option<&InStage>,
) -> Result<Outcome> {
    let stage_start = stage.map_or(0, |s| s.start);
    // ---- set-up -------------------------------------------------------------------------
    let run_dir = recipe.run.out_dir.clone();
    let resume_dir = resume_checkpoint(&run_dir, &resume)?;
    if recipe.run.threads > 0 {
        tch::set_num_threads(recipe.run.threads as i32);
    }
    device::set_deterministic(recipe.run.deterministic)?;
    // Data parallelism (`trainer launch`, torchrun, Slurm): this process's rank, its GPU
    // (LOCAL_RANK) and its rows of every global batch, checked before anyone waits on anyone.
    let world = crate::dist::World::from_env()?;
    let device = world.device(device::resolve(&recipe.run.device)?)?;
    let (shard_start, shard_rows) =
        world.shard(recipe.train.batch_size as usize, "train.batch_size")?;
    let main = world.is_main();
    let precision = recipe.run.precision;
    if let (Some(rw), true) = (&recipe.train.reweight, world.is_distributed()) {
        // The rule applies to each rank's rows of a micro-batch.
        let what = format!(
            "a rank's micro-batch (train.batch_size / {} ranks)",
            world.size
        );
        rw.validate(shard_rows as i64, &what)
            .map_err(|inv| Error::Recipe(format!("{}: {}", inv.key, inv.msg)))?;
    }

    let seq_len = recipe.data.seq_len as usize;
    let vocab = recipe.model.vocab_size();
    let (train_data, valid_sets) = open_data(recipe, vocab, seq_len + 1)?;

    tch::manual_seed(recipe.run.seed as i64);
    let model_cfg = TransformerConfig::from_recipe(&recipe.model);
    let mut params = ParamStore::new(device);
    let mut model = Transformer::new(&model_cfg, &mut params)?;
    // `[init] load = "full"`: the trainer checkpoint whose weights, optimizer state and step
    // this run continues, and that step (mixture counts start there).
    let full_init = match &recipe.init {
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
    let init_from = match (&recipe.init, &resume_dir) {
        // A resumed run takes its weights from its own checkpoint instead.
        (Some(init), None) if full_init.is_some() => {
            Some(ModelSource::parse(&init.from)?.describe())
        }
        (Some(init), None) => {
            let source = ModelSource::parse(&init.from)?;
            if init.upcycle.is_some() {
                let dense = TransformerConfig {
                    moe: None,
                    ..model_cfg.clone()
                };
                source.load_upcycled(&dense, &params, &model)?;
                tracing::info!(
                    "upcycled the dense model {} into {} experts per layer",
                    source.describe(),
                    model_cfg.moe.as_ref().map_or(0, |m| m.n_experts)
                );
            } else {
                source.load_weights(&model_cfg, &mut params)?;
                tracing::info!("initialised the model from {}", source.describe());
            }
            Some(source.describe())
        }
        _ => None,
    };
    // LoRA / LoRA-FA / ReLoRA: adapters on the (loaded) base, which is frozen from here on
    // (after ReLoRA's full-rank warm start, if any).
    let base_params: Vec<String> = params.trainable().map(|p| p.name.clone()).collect();
    let mut relora = None;
    if let Some(peft) = &recipe.peft {
        let lora = crate::peft::lora::apply(&mut model, &mut params, peft)?;
        // A resumed run takes its adapters from its own checkpoint instead.
        if let (Some(from), None) = (&peft.from, &resume_dir) {
            crate::peft::lora::load_peft(&model, &lora, from)?;
            tracing::info!("adapters initialised from {}", from.display());
        }
        tracing::info!("{}", lora.describe());
        if let Some(r) = crate::peft::relora::Relora::from_config(peft) {
            tracing::info!(
                "ReLoRA: merge every {} steps, re-warm over {}, keep {} of the adapter moments, full-rank for the first {}",
                r.merge_every, r.rewarm_steps, r.keep_fraction, r.full_rank_warmup_steps
            );
            if r.full_rank_warmup_steps > 0 {
                // The base trains too until the switch, so the optimizer holds its state.
                for name in &base_params {
                    params.unfreeze(name);
                }
            }
            relora = Some((r, lora));
        }
    }
    // `[distill]`: the frozen teacher; hidden-state projections join the student's parameters.
    let distiller = match &recipe.distill {
        Some(d) => Some(crate::distill::LmDistiller::new(
            d,
            &model_cfg,
            recipe.data.seq_len,
            &mut params,
            device,
        )?),
        None => None,
    };
    if precision == Precision::Bf16 {
        params.set_kind(Kind::BFloat16);
    }
    let mut optimizer = Optimizer::build(&recipe.optim, &params)?;
    // `optim.layerwise`: each parameter is updated from a hook as soon as its gradient is
    // complete in the last backward pass of a step, and its gradient dropped at once.
    let layerwise = if recipe.optim.layerwise() {
        if world.is_distributed() {
            return Err(Error::Recipe(
                "optim.layerwise: one process only (the gradients must be averaged over the ranks before any update)".into(),
            ));
        }
        let params = optimizer.layerwise_params()?;
        let hooks =
            torch_ext::GradReadyHooks::install(params.iter().map(Tensor::shallow_clone).collect())
                .map_err(Error::Torch)?;
        Some((hooks, params))
    } else {
        None
    };
    let total_steps = recipe.max_steps();
    let schedule = Schedule::new(
        &recipe.schedule,
        recipe.optim.lr(),
        total_steps - stage_start,
    );

    let mut state = TrainState {
        format: 1,
        step: 0,
        tokens: 0,
        seed: recipe.run.seed,
        train_seconds: 0.0,
        last_valid_loss: None,
    };
    if let (Some((dir, step)), None) = (&full_init, &resume_dir) {
        state = checkpoint::load(dir, &mut params, &mut optimizer)?;
        state.seed = recipe.run.seed;
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
    }
    if let Some(dir) = &resume_dir {
        state = checkpoint::load(dir, &mut params, &mut optimizer)?;
        if state.seed != recipe.run.seed {
            tracing::warn!(
                "run.seed is {} but the checkpoint was trained with seed {}; data order changes",
                recipe.run.seed,
                state.seed
            );
            state.seed = recipe.run.seed;
        }
        tracing::info!("resuming from {} (step {})", dir.display(), state.step);
        if let Some((r, _)) = &relora {
            if r.full_rank_warmup_steps > 0 && !r.full_rank(state.step) {
                for name in &base_params {
                    params.freeze(name);
                }
            }
        }
        if state.step >= total_steps {
            // Leave a finished run's files (summary.json, tb/, metrics) exactly as they are.
            return Ok(Outcome::AlreadyDone { step: state.step });
        }
    }
    // Magnitude pruning or GSM's cut; an event at the step the run (re)starts at fires now.
    let pruner = Pruner::for_run(recipe.prune.as_ref(), &recipe.optim, &params, total_steps)?;
    if let Some(p) = &pruner {
        p.on_step(state.step, &mut params)?;
    }
    // Every rank starts from rank 0's weights, and must have resumed from the same step.
    let dp = crate::dist::DataParallel::start(
        &world,
        device,
        &recipe.run.collectives(),
        &params,
        state.step,
        &run_dir,
    )?;
    // Only rank 0 writes the run directory (logs, TensorBoard, checkpoints, summary).
    let mut metrics = if main {
        prepare_run_dir(&run_dir, &config::to_toml(recipe), state.step)?;
        Some(MetricsLog::open(&run_dir, Some(state.step))?)
    } else {
        None
    };

    let tokens_per_step = recipe.tokens_per_step();
    let no_embed = model.num_params_no_embeddings(&params);
    let flops_per_token = model_cfg.train_flops_per_token(no_embed, recipe.data.seq_len);
    tracing::info!(
        "{}: {} parameters ({} trainable), {} ({}), {} tokens/step, {} steps",
        recipe.run.name,
        human(params.num_params() as f64),
        human(params.num_trainable() as f64),
        device::describe(device),
        precision.as_str(),
        tokens_per_step,
        total_steps
    );
    let mib = |b: i64| b as f64 / (1u64 << 20) as f64;
    tracing::info!(
        "memory: parameters {:.1} MiB, gradients {:.1} MiB, optimizer state {:.1} MiB",
        mib(params.bytes()),
        mib(params
            .trainable()
            .map(|p| crate::models::params::bytes_of(&p.tensor))
            .sum()),
        mib(optimizer.state_bytes())
    );
    if let Device::Cuda(i) = device {
        let _ = torch_ext::accelerator_reset_peak(i);
    }

    // ---- loop ---------------------------------------------------------------------------
    let mixed = recipe.data.mixture.is_some();
    let (bs, accum, seed) = (
        recipe.train.batch_size as usize,
        recipe.train.grad_accum,
        recipe.run.seed,
    );
    let first_step = full_init.as_ref().map_or(stage_start, |(_, s)| *s);
    // Rows drawn per source so far: a pure function of the steps, recomputed on resume.
    let mut mix_counts = if mixed {
        train_data.counts(bs, accum, seed, first_step, state.step)
    } else {
        Vec::new()
    };
    let prefetch = Prefetcher::start(
        train_data.clone(),
        seq_len,
        recipe.train.batch_size as usize,
        recipe.train.grad_accum,
        recipe.run.seed,
        state.step,
        total_steps - 1,
        2 * recipe.train.grad_accum as usize,
    );
    let progress = if main {
        let p = Progress::new(total_steps, state.step);
        match stage {
            Some(s) => p.in_stage(s.name),
            None => p,
        }
    } else {
        Progress::silent()
    };
    // Several processes: the gradients are averaged while the backward pass goes on, unless ranks
    // may use different parameters (MoE routing) or the backward pass runs in pieces (distill).
    let overlap = if world.is_distributed() && distiller.is_none() && model.moe_layers().is_empty()
    {
        Some(crate::dist::OverlappedGrads::new(&dp, &params)?)
    } else {
        None
    };
    // Every validation set; with several processes each evaluates its share of the batches and
    // the partial sums are added over the ranks (one all-reduce).
    let eval = |model: &Transformer| -> Result<Vec<(String, f64)>> {
        let mut sums = valid_sets
            .iter()
            .map(|(_, span)| {
                evaluate_part(
                    model, span, recipe, device, precision, world.rank, world.size,
                )
            })
            .collect::<Result<Vec<f64>>>()?;
        dp.sum(&mut sums)?;
        let batches = recipe.train.eval_batches as f64;
        Ok(valid_sets
            .iter()
            .zip(sums)
            .map(|((name, _), sum)| (name.clone(), sum / batches))
            .collect())
    };
    let mut final_valid_losses = std::collections::BTreeMap::new();
    let mut last_train_loss = None;
    let mut window_start = Instant::now();
    let mut window_tokens = 0i64;
    let session_start = Instant::now();
    let seconds_before = state.train_seconds;
    let tokens_before = state.tokens;
    let (mut step_seconds, mut step_tokens) = (0.0f64, 0i64);
    let mut last_checkpoint = None;

    while state.step < total_steps {
        let step = state.step;
        let step_start = Instant::now();
        // Dropout and any other torch randomness: a pure function of (seed, step, rank).
        tch::manual_seed((stream_seed(recipe.run.seed, step, -1, world.rank as i64) >> 1) as i64);
        // This step's hyperparameters, before the backward pass (layer-wise updates use them
        // inside it). ReLoRA's jagged schedule re-warms the LR after each merge.
        let lr = schedule.lr(step - stage_start)
            * relora.as_ref().map_or(1.0, |(r, _)| r.lr_factor(step));
        // `train.weight_decay_schedule = "follow_lr"`: the decay coefficient scales with the LR.
        let weight_decay = match recipe.train.weight_decay_schedule {
            WeightDecaySchedule::Constant => None,
            WeightDecaySchedule::FollowLr => {
                let wd = recipe.optim.weight_decay() * (lr / recipe.optim.lr());
                optimizer.set_weight_decay(wd);
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
            optimizer.set_momentum(m);
        }
        let mut layerwise_norm_sq = Tensor::zeros([], (Kind::Float, device));
        let mut loss_sum = Tensor::zeros([], (Kind::Float, device));
        let mut moe_stats = Vec::new();
        let mut distill_sums = crate::distill::StepSums::new(device);
        let mut reweight_sums = reweight::ReweightSums::new(device);
        for micro in 0..recipe.train.grad_accum {
            let batch = prefetch
                .next()
                .ok_or_else(|| Error::Torch("data prefetch thread stopped".into()))?;
            // This rank's rows of the global batch.
            let rows = |t: &Tensor| t.narrow(0, shard_start as i64, shard_rows as i64);
            let inputs = rows(&batch.inputs).to_device(device);
            let targets = rows(&batch.targets).to_device(device);
            if let Some(d) = &distiller {
                // Forward and backward of both models, the logits chunk by chunk.
                let scale = 1.0 / recipe.train.grad_accum as f64;
                let l = d.backward(&model, &inputs, &targets, scale, device, precision)?;
                loss_sum += &l.loss;
                distill_sums.add(&l);
                moe_stats = l.moe_layers;
                continue;
            }
            let (loss, out) = match &recipe.train.reweight {
                None => forward_loss(&model, &inputs, &targets, true, device, precision)?,
                // `[train.reweight]`: each sequence's loss times a weight computed from the
                // detached losses (`data/reweight.rs`).
                Some(rw) => {
                    let (seq, out) = forward_with(&model, &inputs, true, device, precision, |l| {
                        reweight::sequence_losses(l, &targets)
                    })?;
                    let weights = rw.weights(&seq);
                    reweight_sums.add(&seq, &weights);
                    ((&seq * &weights).mean(Kind::Float), out)
                }
            };
            // MoE models also minimise their routers' load-balancing and z losses.
            let total = match out.router_loss() {
                Some(router) => &loss + router,
                None => loss.shallow_clone(),
            };
            let scaled = &total / recipe.train.grad_accum as f64;
            match &layerwise {
                // The step's last backward pass updates each parameter as its gradient
                // completes (the earlier micro-batches only accumulate).
                Some((hooks, lw_params)) if micro + 1 == recipe.train.grad_accum => {
                    let mut failed = None;
                    hooks.backward(
                        &mut |i| {
                            if failed.is_some() {
                                return;
                            }
                            let p = &lw_params[i];
                            let g = p.grad();
                            if g.defined() {
                                layerwise_norm_sq += g.square().sum(Kind::Float);
                            }
                            let stepped = optimizer.step_param(i, lr).and_then(|()| {
                                torch_ext::grads_to_none(&[p]).map_err(Error::Torch)
                            });
                            failed = stepped.err();
                        },
                        || scaled.f_backward(),
                    )?;
                    if let Some(e) = failed {
                        return Err(e);
                    }
                }
                _ => match &overlap {
                    Some(o) if micro + 1 == recipe.train.grad_accum => {
                        o.backward(&dp, || scaled.f_backward())?
                    }
                    _ => scaled.f_backward()?,
                },
            }
            loss_sum += loss.detach().to_kind(Kind::Float);
            moe_stats = out.moe_layers;
        }
        // Several ranks: average the gradients, sum the loss and agree on stopping (a signal to
        // any rank stops all of them after this step, with one checkpoint).
        let mut global_loss_sum = None;
        let mut global_unweighted_sum = None;
        let mut stop_all = false;
        if world.is_distributed() {
            let mut sums = [
                loss_sum.double_value(&[]),
                f64::from(u8::from(stop.requested())),
                reweight_sums.unweighted.double_value(&[]),
            ];
            match &overlap {
                Some(o) => o.finish(&dp, &mut sums)?,
                None => {
                    let trainable: Vec<&Tensor> = params.trainable().map(|p| &p.tensor).collect();
                    dp.reduce_step(&trainable, &mut sums)?
                }
            }
            global_loss_sum = Some(sums[0] / world.size as f64);
            stop_all = sums[1] > 0.0;
            global_unweighted_sum = Some(sums[2] / world.size as f64);
        }
        let grad_norm = match &layerwise {
            // Already stepped, parameter by parameter, during the backward pass.
            Some(_) => {
                optimizer.finish_step();
                layerwise_norm_sq.double_value(&[]).sqrt()
            }
            None => clip_grad_norm(&params, recipe.train.clip_grad_norm)?,
        };
        if !grad_norm.is_finite() {
            // Stepping would write NaN/inf into the weights (and into the next checkpoint).
            return Err(Error::Torch(format!(
                "gradient norm is {grad_norm} at step {}: training diverged (lower optim.lr or \
                 set train.clip_grad_norm); the last checkpoint is intact",
                step + 1
            )));
        }
        if layerwise.is_none() {
            optimizer.step(lr)?;
        }
        params.apply_masks();
        params.zero_grad();
        if mixed {
            for (c, n) in
                mix_counts
                    .iter_mut()
                    .zip(train_data.counts(bs, accum, seed, step, step + 1))
            {
                *c += n;
            }
        }
        state.step += 1;
        state.tokens += tokens_per_step;
        window_tokens += tokens_per_step;
        if state.tokens - tokens_before > tokens_per_step {
            step_seconds += step_start.elapsed().as_secs_f64();
            step_tokens += tokens_per_step;
        }
        if let Some((r, lora)) = relora.as_ref().filter(|(r, _)| r.resets_after(state.step)) {
            if state.step == r.full_rank_warmup_steps {
                for name in &base_params {
                    params.freeze(name);
                }
            }
            // The re-drawn A factors: a pure function of (seed, step).
            tch::manual_seed((stream_seed(recipe.run.seed, state.step, -2, 0) >> 1) as i64);
            crate::peft::relora::merge_and_reinit(&model)?;
            crate::peft::relora::reset_optimizer(r, lora, &mut optimizer)?;
            tracing::debug!(
                "ReLoRA: merged and restarted the adapters after step {}",
                state.step
            );
        }
        if let Some(p) = &pruner {
            p.on_step(state.step, &mut params)?;
        }
        let done = state.step == total_steps;

        if state.step % recipe.train.log_every == 0 || done {
            let loss = global_loss_sum.unwrap_or_else(|| loss_sum.double_value(&[]))
                / recipe.train.grad_accum as f64;
            if !loss.is_finite() {
                return Err(Error::Torch(format!(
                    "loss is {loss} at step {}: training diverged (lower optim.lr or set train.clip_grad_norm)",
                    state.step
                )));
            }
            let elapsed = window_start.elapsed().as_secs_f64().max(1e-9);
            let tokens_per_s = window_tokens as f64 / elapsed;
            let eta = (total_steps - state.step) as f64 * tokens_per_step as f64 / tokens_per_s;
            let mut r = row(&[
                ("step", json!(state.step)),
                ("loss", json!(loss)),
                ("lr", json!(lr)),
                ("grad_norm", json!(grad_norm)),
                ("tokens", json!(state.tokens)),
                ("tokens_per_s", json!(tokens_per_s)),
            ]);
            r.extend(moe_metrics(&moe_stats));
            r.extend(pruning_metrics(pruner.as_ref(), &optimizer, &params));
            r.extend(distill_sums.metrics());
            r.extend(
                reweight_sums
                    .metrics(global_unweighted_sum.map(|s| s / recipe.train.grad_accum as f64)),
            );
            if mixed {
                for (name, m) in train_data.report(&mix_counts, seq_len) {
                    r.insert(format!("mix_{name}_fraction"), json!(m.fraction));
                    r.insert(format!("mix_{name}_epochs"), json!(m.epochs));
                }
            }
            if let Some(wd) = weight_decay {
                r.insert("weight_decay".into(), json!(wd));
            }
            if let Some(m) = momentum {
                r.insert("momentum".into(), json!(m));
            }
            if let Some(s) = stage {
                r.insert("stage".into(), json!(s.name));
            }
            if let Some(m) = metrics.as_mut() {
                m.log(r)?;
            }
            progress.update(state.step, loss, lr, tokens_per_s, eta);
            last_train_loss = Some(loss);
            window_start = Instant::now();
            window_tokens = 0;
        }
        if recipe.train.eval_every.is_some_and(|e| state.step % e == 0) || done {
            let losses = eval(&model)?;
            state.last_valid_loss = losses.first().map(|(_, l)| *l);
            for (name, valid_loss) in &losses {
                if let Some(m) = metrics.as_mut() {
                    let mut r = row(&[
                        ("step", json!(state.step)),
                        ("split", json!(name)),
                        ("loss", json!(valid_loss)),
                        ("perplexity", json!(valid_loss.exp())),
                    ]);
                    if let Some(s) = stage {
                        r.insert("stage".into(), json!(s.name));
                    }
                    m.log(r)?;
                }
                progress.println(&format!(
                    "step {}: {name} loss {valid_loss:.4}, perplexity {:.2}",
                    state.step,
                    valid_loss.exp()
                ));
                final_valid_losses.insert(name.clone(), *valid_loss);
            }
            window_start = Instant::now();
            window_tokens = 0;
        }
        let stopping = if world.is_distributed() {
            stop_all
        } else {
            stop.requested()
        };
        if recipe
            .train
            .checkpoint_every
            .is_some_and(|c| state.step % c == 0)
            || done
            || stopping
        {
            state.train_seconds = seconds_before + session_start.elapsed().as_secs_f64();
            let dir = save_checkpoint(
                &dp,
                &run_dir,
                &state,
                &params,
                &optimizer,
                recipe.train.keep_checkpoints,
                done || stopping,
            )?;
            progress.println(&format!(
                "step {}: checkpoint {}",
                state.step,
                dir.display()
            ));
            last_checkpoint = Some(dir);
            window_start = Instant::now();
            window_tokens = 0;
        }
        if stopping && !done {
            progress.finish();
            let checkpoint = last_checkpoint.unwrap_or_default();
            tracing::warn!(
                "stopped by signal after step {}; checkpoint {}; continue with --resume auto",
                state.step,
                checkpoint.display()
            );
            return Ok(Outcome::Interrupted {
                step: state.step,
                checkpoint,
            });
        }
    }
    progress.finish();
    drop(prefetch);

    // ---- summary ------------------------------------------------------------------------
    let session_seconds = session_start.elapsed().as_secs_f64();
    let train_seconds = seconds_before + session_seconds;
    let tokens_per_s_wall = (state.tokens - tokens_before) as f64 / session_seconds.max(1e-9);
    let tokens_per_s = if step_tokens > 0 {
        step_tokens as f64 / step_seconds.max(1e-9)
    } else {
        tokens_per_s_wall
    };
    let (peak, peak_kind) = peak_memory(device);
    let tflops = flops_per_token * tokens_per_s / 1e12;
    let valid_loss = state.last_valid_loss;
    let summary = Summary {
        name: recipe.run.name.clone(),
        steps: state.step,
        tokens: state.tokens,
        final_train_loss: last_train_loss,
        final_valid_loss: valid_loss,
        final_valid_perplexity: valid_loss.map(f64::exp),
        train_seconds,
        tokens_per_s,
        tokens_per_s_wall,
        params: params.num_params(),
        trainable_params: params.num_trainable(),
        param_bytes: params.bytes(),
        grad_bytes: params
            .trainable()
            .map(|p| crate::models::params::bytes_of(&p.tensor))
            .sum(),
        optimizer_state_bytes: optimizer.state_bytes(),
        pruning: pruner.as_ref().map(|p| p.report(&params)),
        device: device::describe(device),
        precision: precision.as_str().to_string(),
        peak_memory_bytes: peak,
        peak_memory_kind: peak_kind,
        model_tflops_per_s: tflops,
        mfu: recipe.run.peak_tflops.map(|p| tflops / p),
        resumed_from: resume_dir,
        init_load: recipe.init.as_ref().map(|i| {
            if i.load == InitLoad::Full {
                "full"
            } else {
                "model"
            }
            .to_string()
        }),
        init_from,
        final_valid_losses,
        mixture: mixed.then(|| {
            train_data
                .report(&mix_counts, seq_len)
                .into_iter()
                .collect()
        }),
        stages: stage.map(|s| s.all.to_vec()),
    };
    if main {
        let path = run_dir.join("summary.json");
        let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
        std::fs::write(&path, text + "\n")
            .map_err(io_err(format!("writing {}", path.display())))?;
    }
    Ok(Outcome::Finished(summary))
}

/// The training data (one source, or a mixture) and the named validation sets, each checked to
/// hold at least one `window`. Without `[data.valid_sets]`, the validation set is `data.valid` or
/// the held-out tail of the training source (`valid`); with a mixture, each source's held-out
/// tail under the source's name.
pub(crate) fn open_data(
    recipe: &Recipe,
    vocab: i64,
    window: usize,
) -> Result<(Mixture, Vec<(String, Span)>)> {
    let d = &recipe.data;
    let held_out = d.valid.is_none() && d.valid_sets.is_empty();
    let mut valid = Vec::new();
    for (name, src) in &d.valid_sets {
        let key = format!("data.valid_sets.{name}");
        let span = Span::whole(source::open(src, &key, vocab)?);
        span.check_fits(window, &key)?;
        valid.push((name.clone(), span));
    }
    let train = match (&d.mixture, &d.train) {
        (Some(m), _) => {
            let (mut names, mut spans, mut weights) = (Vec::new(), Vec::new(), Vec::new());
            for (i, s) in m.sources.iter().enumerate() {
                let key = format!("data.mixture.sources[{i}] ({})", s.name);
                let data = source::open(&s.source, &key, vocab)?;
                let train = if held_out {
                    let (train, v) = Span::split(data, d.valid_fraction);
                    v.check_fits(
                        window,
                        &format!("{key} held-out part (data.valid_fraction)"),
                    )?;
                    valid.push((s.name.clone(), v));
                    train
                } else {
                    Span::whole(data)
                };
                train.check_fits(window, &key)?;
                names.push(s.name.clone());
                spans.push(train);
                weights.push(s.weight);
            }
            Mixture::new(names, spans, &weights)
        }
        (None, Some(t)) => {
            let data = source::open(t, "data.train", vocab)?;
            let train = if held_out {
                let (train, v) = Span::split(data, d.valid_fraction);
                v.check_fits(window, "data.valid_fraction (held-out part of data.train)")?;
                valid.push(("valid".to_string(), v));
                train
            } else {
                Span::whole(data)
            };
            train.check_fits(window, "data.train")?;
            Mixture::from(train)
        }
        (None, None) => {
            return Err(Error::Recipe(
                "data.train: missing: expected data.train or [data.mixture]".into(),
            ))
        }
    };
    if let Some(v) = &d.valid {
        let span = Span::whole(source::open(v, "data.valid", vocab)?);
        span.check_fits(window, "data.valid")?;
        valid.push(("valid".to_string(), span));
    }
    Ok((train, valid))
}

/// The language-model loss of one batch, and the MoE layers' router losses and statistics.
/// The logits are dropped here, before the backward pass: autograd keeps what it needs, and
/// holding the `[b, t, vocab]` tensor through backward would cost its whole size in peak memory
/// (1.6 GiB at GPT-2-small shapes in bf16).
fn forward_loss(
    model: &Transformer,
    inputs: &Tensor,
    targets: &Tensor,
    train: bool,
    device: Device,
    precision: Precision,
) -> Result<(Tensor, ModelOutput)> {
    forward_with(model, inputs, train, device, precision, |logits| {
        Transformer::loss(logits, targets)
    })
}

/// The forward pass of `forward_loss` with another loss of the logits `[b, t, vocab]` (with
/// `[train.reweight]`: the per-sequence losses).
fn forward_with<L>(
    model: &Transformer,
    inputs: &Tensor,
    train: bool,
    device: Device,
    precision: Precision,
    loss: impl FnOnce(&Tensor) -> L,
) -> Result<(L, ModelOutput)> {
    let run = || {
        let mut out = model.forward_full(inputs, train);
        let loss = loss(&out.logits);
        out.logits = Tensor::new();
        (loss, out)
    };
    match precision {
        Precision::Bf16Mixed => {
            torch_ext::with_autocast_bf16(device.is_cuda(), run).map_err(Error::Torch)
        }
        Precision::Fp32 | Precision::Bf16 => Ok(run()),
    }
}

/// The pruning columns of a log row: sparsity so far, and GSM's selection and would-be cut.
pub(crate) fn pruning_metrics(
    pruner: Option<&Pruner>,
    optimizer: &Optimizer,
    params: &ParamStore,
) -> Vec<(String, serde_json::Value)> {
    let mut out = pruner.map_or_else(Vec::new, |p| p.metrics(params));
    if let Optimizer::Gsm(g) = optimizer {
        if let Some(f) = g.selected_fraction() {
            out.push(("gsm/selected_fraction".into(), json!(f)));
        }
    }
    out
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
    span: &Span,
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
/// processes evaluates 1/N of the batches.
fn evaluate_part(
    model: &Transformer,
    span: &Span,
    recipe: &Recipe,
    device: Device,
    precision: Precision,
    rank: usize,
    world: usize,
) -> Result<f64> {
    let n = recipe.train.eval_batches as usize;
    let bs = recipe.train.batch_size as usize;
    tch::no_grad(|| {
        let mut total = 0.0;
        for i in (rank..n).step_by(world) {
            let b = valid_batch(span, recipe.data.seq_len as usize, bs, n, i);
            let (loss, _) = forward_loss(
                model,
                &b.inputs.to_device(device),
                &b.targets.to_device(device),
                false,
                device,
                precision,
            )?;
            total += loss.double_value(&[]);
        }
        Ok(total)
    })
}

pub fn human(n: f64) -> String {
    if n >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

pub fn print_summary(s: &Summary) {
    let gib = |b: i64| b as f64 / (1u64 << 30) as f64;
    eprintln!("\n  run               {}", s.name);
    eprintln!("  steps             {}", s.steps);
    eprintln!("  tokens            {}", s.tokens);
    if let Some(l) = s.final_train_loss {
        eprintln!("  train loss        {l:.4}");
    }
    if let (Some(l), Some(p)) = (s.final_valid_loss, s.final_valid_perplexity) {
        eprintln!("  valid loss        {l:.4} (perplexity {p:.2})");
    }
    eprintln!("  wall time         {}", format_duration(s.train_seconds));
    eprintln!(
        "  tokens/s          {:.0} in steps ({:.0} over the wall time)",
        s.tokens_per_s, s.tokens_per_s_wall
    );
    eprintln!(
        "  model TFLOP/s     {:.3}{}",
        s.model_tflops_per_s,
        s.mfu
            .map(|m| format!(" (MFU {:.1}%)", 100.0 * m))
            .unwrap_or_default()
    );
    if let Some(p) = s.peak_memory_bytes {
        eprintln!(
            "  peak memory       {:.2} GiB ({})",
            gib(p),
            s.peak_memory_kind
        );
    }
    eprintln!(
        "  memory            params {:.3} GiB, grads {:.3} GiB, optimizer {:.3} GiB",
        gib(s.param_bytes),
        gib(s.grad_bytes),
        gib(s.optimizer_state_bytes)
    );
    if let Some(p) = &s.pruning {
        eprintln!(
            "  sparsity          {:.2}% of {} prunable weights are zero",
            100.0 * p.global_sparsity,
            p.prunable_params
        );
    }
}
