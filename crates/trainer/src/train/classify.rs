//! Image classification with a ResNet, top to bottom: set-up, loop, evaluation, checkpoints,
//! summary. The shape of `pretrain.rs`, copied rather than shared.
//!
//! The loss is cross-entropy with optional label smoothing (Szegedy et al. 2016, "Rethinking the
//! Inception Architecture", section 7: the target is (1 - s) one-hot + s uniform, as
//! `torch.nn.functional.cross_entropy(label_smoothing=s)` computes it). BatchNorm runs on batch
//! statistics while training and on its running statistics when evaluating; those statistics
//! are buffers of the `ParamStore`, so they are checkpointed with the weights. Validation reports
//! the plain (unsmoothed) cross-entropy and top-1 / top-5 accuracy over data.valid.
//!
//! Reproducibility: torch is reseeded at every step from (seed, step) (dropout), and the images
//! of a step and their augmentation are a pure function of (seed, step) (`data/images.rs`), so a
//! run resumed from the checkpoint of step k computes bitwise the same losses as the
//! uninterrupted run (on the CPU, same thread count).

use super::pretrain::{human, Resume};
use super::run_dir::{peak_memory, prepare_run_dir, resume_checkpoint, save_checkpoint};
use crate::checkpoint::{self, TrainState};
use crate::data::images::{self, eval_batch, Augment, ImagePrefetcher, ImageSet};
use crate::data::loader::stream_seed;
use crate::device;
use crate::error::{io_err, Error, Result};
use crate::metrics::progress::{format_duration, Progress};
use crate::metrics::{row, MetricsLog};
use crate::models::params::ParamStore;
use crate::models::resnet::ResNet;
use crate::optim::{clip_grad_norm, Optimizer};
use crate::prune::Pruner;
use crate::config::{self, ClassifyRecipe, Precision};
use crate::schedule::Schedule;
use crate::signals::StopFlag;
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;
use tch::{Device, Kind, Reduction, Tensor};

#[derive(Debug)]
pub enum Outcome {
    Finished(Summary),
    /// Stopped by a signal after writing the checkpoint of `step`.
    Interrupted {
        step: i64,
        checkpoint: PathBuf,
    },
    /// Resumed from a checkpoint at or past the end of the run: nothing was trained or written.
    AlreadyDone {
        step: i64,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub name: String,
    pub steps: i64,
    /// Training images consumed (augmented views, counted once per step and image).
    pub images: i64,
    pub epochs: f64,
    pub final_train_loss: Option<f64>,
    pub final_valid_loss: Option<f64>,
    pub final_valid_top1: Option<f64>,
    pub final_valid_top5: Option<f64>,
    pub num_classes: i64,
    pub train_images: usize,
    pub valid_images: usize,
    /// Wall-clock seconds of the whole run (summed over resumes).
    pub train_seconds: f64,
    /// Images over the time spent in optimizer steps, leaving out the first step of each start,
    /// evaluations and checkpoints.
    pub images_per_s: f64,
    /// Images over the whole wall time of this start.
    pub images_per_s_wall: f64,
    pub params: i64,
    pub trainable_params: i64,
    pub param_bytes: i64,
    pub optimizer_state_bytes: i64,
    /// With `[prune]` or GSM: zeros per prunable layer and over all of them, at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pruning: Option<crate::prune::SparsityReport>,
    pub device: String,
    pub precision: String,
    pub peak_memory_bytes: Option<i64>,
    pub peak_memory_kind: String,
    pub resumed_from: Option<PathBuf>,
}

/// Validation results over data.valid (or its first `train.eval_images`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    pub loss: f64,
    pub top1: f64,
    pub top5: f64,
    pub images: usize,
}

/// Copies `[init] from` into the model: every tensor by name and shape, but those in `reinit`.
fn load_init(init: &crate::config::ClassifierInit, params: &ParamStore) -> Result<()> {
    let file = if init.from.is_dir() {
        init.from.join(checkpoint::MODEL_FILE)
    } else {
        init.from.clone()
    };
    for name in &init.reinit {
        if params.get(name).is_none() {
            return Err(Error::Recipe(format!(
                "init.reinit: {name:?} is not a tensor of this model"
            )));
        }
    }
    let loaded: Vec<(String, tch::Tensor)> = crate::models::params::read_safetensors(&file)?
        .into_iter()
        .filter(|(k, _)| !init.reinit.contains(k))
        .collect();
    crate::models::params::copy_named(
        &mut params
            .iter()
            .filter(|p| !init.reinit.contains(&p.name))
            .map(|p| (p.name.as_str(), &p.tensor)),
        loaded,
        &file,
    )?;
    tracing::info!("initialised the model from {}", file.display());
    Ok(())
}

pub fn run(recipe: &ClassifyRecipe, resume: Resume, stop: &StopFlag) -> Result<Outcome> {
    // ---- set-up -------------------------------------------------------------------------
    let run_dir = recipe.run.out_dir.clone();
    let resume_dir = resume_checkpoint(&run_dir, &resume)?;
    if recipe.run.threads > 0 {
        tch::set_num_threads(recipe.run.threads as i32);
    }
    device::set_deterministic(recipe.run.deterministic)?;
    // Data parallelism (`trainer launch`, torchrun, Slurm): as in pretrain.rs. BatchNorm
    // normalises each rank's rows with their own statistics, and its running statistics are
    // rank 0's, broadcast after every step (DistributedDataParallel's broadcast_buffers).
    let world = crate::dist::World::from_env()?;
    let device = world.device(device::resolve(&recipe.run.device)?)?;
    let (shard_start, shard_rows) =
        world.shard(recipe.train.batch_size as usize, "train.batch_size")?;
    let main = world.is_main();
    let precision = recipe.run.precision;

    let (train, valid) = open_data(recipe)?;
    let batch_size = recipe.train.batch_size as usize;
    let total_steps = recipe.max_steps(train.len());
    recipe.check_warmup(total_steps).map_err(|inv| {
        Error::Recipe(format!(
            "{}: {} (a run of {total_steps} steps)",
            inv.key, inv.msg
        ))
    })?;

    tch::manual_seed(recipe.run.seed as i64);
    let model_cfg = recipe.model.build()?;
    let mut params = ParamStore::new(device);
    let model = ResNet::new(&model_cfg, &mut params)?;
    if let (Some(init), None) = (&recipe.init, &resume_dir) {
        load_init(init, &params)?;
        // A pruned checkpoint stays pruned (but for re-initialised tensors).
        let masks = init.from.join(checkpoint::MASKS_FILE);
        if init.from.is_dir() && masks.is_file() {
            for (name, mask) in crate::models::params::read_safetensors(&masks)? {
                if !init.reinit.contains(&name) {
                    params.set_mask(&name, mask)?;
                }
            }
        }
    }
    let distiller = match &recipe.distill {
        Some(d) => Some(crate::distill::ClassifierDistiller::new(
            d,
            &recipe.model,
            device,
        )?),
        None => None,
    };
    let mut optimizer = Optimizer::build(&recipe.optim, &params)?;
    let schedule = Schedule::new(&recipe.schedule, recipe.optim.lr(), total_steps);

    let mut state = TrainState {
        format: 1,
        step: 0,
        tokens: 0, // images, for a classifier
        seed: recipe.run.seed,
        train_seconds: 0.0,
        last_valid_loss: None,
    };
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
        if state.step >= total_steps {
            return Ok(Outcome::AlreadyDone { step: state.step });
        }
    }
    // Magnitude pruning or GSM's cut; an event at the step the run (re)starts at fires now.
    let pruner = Pruner::for_run(recipe.prune.as_ref(), &recipe.optim, &params, total_steps)?;
    if let Some(p) = &pruner {
        p.on_step(state.step, &mut params)?;
    }
    let dp = crate::dist::DataParallel::start(
        &world,
        device,
        &recipe.run.collectives(),
        &params,
        state.step,
        &run_dir,
    )?;
    // Only rank 0 writes the run directory.
    let mut metrics = if main {
        prepare_run_dir(&run_dir, &config::to_toml(recipe), state.step)?;
        Some(MetricsLog::open(&run_dir, Some(state.step))?)
    } else {
        None
    };

    let steps_per_epoch = recipe.steps_per_epoch(train.len());
    tracing::info!(
        "{}: {} parameters, {} ({}), {} training images in {} classes ({} steps/epoch), {} validation images, {} steps",
        recipe.run.name,
        human(params.num_trainable() as f64),
        device::describe(device),
        precision.as_str(),
        train.len(),
        train.num_classes(),
        steps_per_epoch,
        valid.len(),
        total_steps
    );
    if let Device::Cuda(i) = device {
        let _ = torch_ext::accelerator_reset_peak(i);
    }

    // ---- loop ---------------------------------------------------------------------------
    let aug = Augment::from_config(&recipe.data);
    let prefetch = ImagePrefetcher::start(
        train.clone(),
        aug.clone(),
        batch_size,
        // This rank's rows of every global batch: each rank augments only its own images.
        shard_start..shard_start + shard_rows,
        recipe.run.seed,
        state.step,
        total_steps - 1,
        4,
    );
    let progress = if main {
        Progress::new(total_steps, state.step)
    } else {
        Progress::silent()
    };
    // Several processes: the gradients are averaged while the backward pass goes on (every rank
    // uses every parameter; not with a distillation teacher, as for language models).
    let overlap = if world.is_distributed() && distiller.is_none() {
        Some(crate::dist::OverlappedGrads::new(&dp, &params)?)
    } else {
        None
    };
    let eval = |model: &ResNet| -> Result<EvalResult> {
        let limit = recipe
            .train
            .eval_images
            .map_or(valid.len(), |n| (n as usize).min(valid.len()));
        // With several processes each evaluates its share of the batches; the sums are added
        // over the ranks (one all-reduce).
        let mut sums = evaluate_part(
            model, &valid, &aug, limit, batch_size, device, precision, world.rank, world.size,
        )?;
        dp.sum(&mut sums)?;
        Ok(eval_result(sums, limit))
    };
    let mut last_train_loss = None;
    let mut last_eval: Option<EvalResult> = None;
    let mut window_start = Instant::now();
    let mut window_images = 0i64;
    let session_start = Instant::now();
    let seconds_before = state.train_seconds;
    let images_before = state.tokens;
    let (mut step_seconds, mut step_images) = (0.0f64, 0i64);
    let mut last_checkpoint = None;
    let per_step = recipe.train.batch_size;

    while state.step < total_steps {
        let step = state.step;
        let step_start = Instant::now();
        // Dropout (WRN) and any other torch randomness: a pure function of (seed, step, rank).
        tch::manual_seed((stream_seed(recipe.run.seed, step, -1, world.rank as i64) >> 1) as i64);
        let batch = prefetch
            .next()
            .ok_or_else(|| Error::Torch("data prefetch thread stopped".into()))?;
        // This rank's rows of the global batch (the prefetcher built only those).
        let x = batch.images.to_device(device); // [b, 3, h, w]
        let y = batch.labels.to_device(device); // [b]
        let logits = forward(&model, &x, true, device, precision)?; // [b, classes]
        let loss = classification_loss(&logits, &y, recipe.train.label_smoothing)?;
        // `[distill]`: alpha * kd + (1 - alpha) * the cross-entropy above.
        let (loss, distill_parts) = match &distiller {
            Some(d) => {
                let l = d.loss(&x, &logits, &loss, device, precision)?;
                (
                    l.total,
                    vec![("kd_loss", json!(l.kd)), ("ce_loss", json!(l.ce))],
                )
            }
            None => (loss, Vec::new()),
        };
        match &overlap {
            Some(o) => o.backward(&dp, || loss.f_backward())?,
            None => loss.f_backward()?,
        }
        // Several ranks: average the gradients; sum the loss and correct predictions (for the
        // log) and the stop flags.
        let mut global = None;
        let mut stop_all = false;
        if world.is_distributed() {
            let (top1, _) = correct(&logits.detach(), &y, 1);
            let mut sums = [
                loss.double_value(&[]),
                top1 as f64,
                f64::from(u8::from(stop.requested())),
            ];
            match &overlap {
                Some(o) => o.finish(&dp, &mut sums)?,
                None => {
                    let trainable: Vec<&Tensor> = params.trainable().map(|p| &p.tensor).collect();
                    dp.reduce_step(&trainable, &mut sums)?
                }
            }
            global = Some((sums[0] / world.size as f64, sums[1]));
            stop_all = sums[2] > 0.0;
        }
        let grad_norm = clip_grad_norm(&params, None)?;
        if !grad_norm.is_finite() {
            return Err(Error::Torch(format!(
                "gradient norm is {grad_norm} at step {}: training diverged (lower optim.lr); the last checkpoint is intact",
                step + 1
            )));
        }
        let lr = schedule.lr(step);
        optimizer.step(lr)?;
        params.apply_masks();
        params.zero_grad();
        if world.is_distributed() {
            // BatchNorm's running statistics (and any other buffer): rank 0's.
            let buffers: Vec<&Tensor> = params
                .iter()
                .filter(|p| !p.trainable)
                .map(|p| &p.tensor)
                .collect();
            dp.broadcast_from_main(&buffers)?;
        }
        state.step += 1;
        state.tokens += per_step;
        window_images += per_step;
        if state.tokens - images_before > per_step {
            step_seconds += step_start.elapsed().as_secs_f64();
            step_images += per_step;
        }
        if let Some(p) = &pruner {
            p.on_step(state.step, &mut params)?;
        }
        let done = state.step == total_steps;

        if state.step % recipe.train.log_every == 0 || done {
            let (loss, top1) = match global {
                Some((loss, top1)) => (loss, top1 as i64),
                None => (loss.double_value(&[]), correct(&logits.detach(), &y, 1).0),
            };
            if !loss.is_finite() {
                return Err(Error::Torch(format!(
                    "loss is {loss} at step {}: training diverged (lower optim.lr)",
                    state.step
                )));
            }
            let elapsed = window_start.elapsed().as_secs_f64().max(1e-9);
            let images_per_s = window_images as f64 / elapsed;
            let eta = (total_steps - state.step) as f64 * per_step as f64 / images_per_s;
            let mut r = row(&[
                ("step", json!(state.step)),
                ("loss", json!(loss)),
                ("lr", json!(lr)),
                ("grad_norm", json!(grad_norm)),
                ("top1", json!(top1 as f64 / per_step as f64)),
                ("images", json!(state.tokens)),
                ("images_per_s", json!(images_per_s)),
                ("epoch", json!(state.step as f64 / steps_per_epoch as f64)),
            ]);
            r.extend(distill_parts.into_iter().map(|(k, v)| (k.to_string(), v)));
            r.extend(super::pretrain::pruning_metrics(
                pruner.as_ref(),
                &optimizer,
                &params,
            ));
            if let Some(m) = metrics.as_mut() {
                m.log(r)?;
            }
            progress.update(state.step, loss, lr, images_per_s, eta);
            last_train_loss = Some(loss);
            window_start = Instant::now();
            window_images = 0;
        }
        if recipe.train.eval_every.is_some_and(|e| state.step % e == 0) || done {
            let r = eval(&model)?;
            state.last_valid_loss = Some(r.loss);
            last_eval = Some(r);
            if let Some(m) = metrics.as_mut() {
                m.log(row(&[
                    ("step", json!(state.step)),
                    ("split", json!("valid")),
                    ("loss", json!(r.loss)),
                    ("top1", json!(r.top1)),
                    ("top5", json!(r.top5)),
                    ("images", json!(r.images)),
                ]))?;
            }
            progress.println(&format!(
                "step {}: valid loss {:.4}, top-1 {:.2}%, top-5 {:.2}% ({} images)",
                state.step,
                r.loss,
                100.0 * r.top1,
                100.0 * r.top5,
                r.images
            ));
            window_start = Instant::now();
            window_images = 0;
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
            window_images = 0;
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
    let images_per_s_wall = (state.tokens - images_before) as f64 / session_seconds.max(1e-9);
    let images_per_s = if step_images > 0 {
        step_images as f64 / step_seconds.max(1e-9)
    } else {
        images_per_s_wall
    };
    let (peak, peak_kind) = peak_memory(device);
    let summary = Summary {
        name: recipe.run.name.clone(),
        steps: state.step,
        images: state.tokens,
        epochs: state.step as f64 / steps_per_epoch as f64,
        final_train_loss: last_train_loss,
        final_valid_loss: last_eval.map(|r| r.loss),
        final_valid_top1: last_eval.map(|r| r.top1),
        final_valid_top5: last_eval.map(|r| r.top5),
        num_classes: train.num_classes(),
        train_images: train.len(),
        valid_images: valid.len(),
        train_seconds: seconds_before + session_seconds,
        images_per_s,
        images_per_s_wall,
        params: params.num_params(),
        trainable_params: params.num_trainable(),
        param_bytes: params.bytes(),
        optimizer_state_bytes: optimizer.state_bytes(),
        pruning: pruner.as_ref().map(|p| p.report(&params)),
        device: device::describe(device),
        precision: precision.as_str().to_string(),
        peak_memory_bytes: peak,
        peak_memory_kind: peak_kind,
        resumed_from: resume_dir,
    };
    if main {
        let path = run_dir.join("summary.json");
        let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
        std::fs::write(&path, text + "\n")
            .map_err(io_err(format!("writing {}", path.display())))?;
    }
    Ok(Outcome::Finished(summary))
}

/// Reads data.train and data.valid and checks them against the model and the batch size.
fn open_data(recipe: &ClassifyRecipe) -> Result<(ImageSet, ImageSet)> {
    let train = images::open(&recipe.data.train, "data.train", &recipe.data)?;
    let valid = images::open(&recipe.data.valid, "data.valid", &recipe.data)?;
    let classes = recipe.model.num_classes();
    for (key, set) in [("data.train", &train), ("data.valid", &valid)] {
        if set.num_classes() != classes {
            return Err(Error::Data {
                path: format!("{key} = {}", set.name),
                msg: format!(
                    "has {} classes but model.num_classes is {classes}",
                    set.num_classes()
                ),
            });
        }
    }
    if train.classes != valid.classes {
        return Err(Error::Data {
            path: format!("data.valid = {}", valid.name),
            msg: format!(
                "its classes {:?} differ from data.train's {:?}",
                valid.classes, train.classes
            ),
        });
    }
    if train.len() < recipe.train.batch_size as usize {
        return Err(Error::Data {
            path: format!("data.train = {}", train.name),
            msg: format!(
                "holds {} images, fewer than train.batch_size ({})",
                train.len(),
                recipe.train.batch_size
            ),
        });
    }
    Ok((train, valid))
}

/// Logits `[b, classes]`, under bf16 autocast for `bf16-mixed`.
fn forward(
    model: &ResNet,
    x: &Tensor,
    train: bool,
    device: Device,
    precision: Precision,
) -> Result<Tensor> {
    let run = || model.forward(x, train).to_kind(Kind::Float);
    match precision {
        Precision::Bf16Mixed => {
            torch_ext::with_autocast_bf16(device.is_cuda(), run).map_err(Error::Torch)
        }
        Precision::Fp32 | Precision::Bf16 => Ok(run()),
    }
}

/// Mean cross-entropy of `logits` `[b, classes]` against `labels` `[b]`, with the target
/// (1 - smoothing) one-hot + smoothing uniform over the classes.
pub fn classification_loss(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Result<Tensor> {
    Ok(logits.f_cross_entropy_loss::<Tensor>(labels, None, Reduction::Mean, -100, smoothing)?)
}

/// How many rows of `logits` have their label among the top `k` (k capped at the classes), and
/// the k used.
fn correct(logits: &Tensor, labels: &Tensor, k: i64) -> (i64, i64) {
    let k = k.min(logits.size()[1]);
    let (_, top) = logits.topk(k, 1, true, true); // [b, k]
    let hit = top.eq_tensor(&labels.unsqueeze(1)).any_dim(1, false); // [b]
    (
        hit.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[]),
        k,
    )
}

/// Summed cross-entropy (unsmoothed), top-1 hits and top-5 hits, with BatchNorm on its running
/// statistics, over this rank's validation batches: batch `i` of the first `limit` images in
/// batches of `batch_size` when `i % world == rank`. Summed over the ranks they give the whole
/// set's result (`eval_result`), and each of N processes evaluates 1/N of the batches.
#[allow(clippy::too_many_arguments)]
fn evaluate_part(
    model: &ResNet,
    set: &ImageSet,
    aug: &Augment,
    limit: usize,
    batch_size: usize,
    device: Device,
    precision: Precision,
    rank: usize,
    world: usize,
) -> Result<[f64; 3]> {
    tch::no_grad(|| {
        let (mut loss_sum, mut top1, mut top5) = (0.0f64, 0i64, 0i64);
        let batches = limit.div_ceil(batch_size);
        for i in (rank..batches).step_by(world) {
            let start = i * batch_size;
            let len = batch_size.min(limit - start);
            let b = eval_batch(set, aug, start, len);
            let y = b.labels.to_device(device);
            let logits = forward(model, &b.images.to_device(device), false, device, precision)?;
            let loss =
                logits.f_cross_entropy_loss::<Tensor>(&y, None, Reduction::Sum, -100, 0.0)?;
            loss_sum += loss.double_value(&[]);
            top1 += correct(&logits, &y, 1).0;
            top5 += correct(&logits, &y, 5).0;
        }
        Ok([loss_sum, top1 as f64, top5 as f64])
    })
}

/// Means over `images` from the sums of `evaluate_part`.
fn eval_result([loss_sum, top1, top5]: [f64; 3], images: usize) -> EvalResult {
    let n = images.max(1) as f64;
    EvalResult {
        loss: loss_sum / n,
        top1: top1 / n,
        top5: top5 / n,
        images,
    }
}

pub fn print_summary(s: &Summary) {
    let gib = |b: i64| b as f64 / (1u64 << 30) as f64;
    eprintln!("\n  run               {}", s.name);
    eprintln!(
        "  steps             {} ({:.2} epochs of {} images)",
        s.steps, s.epochs, s.train_images
    );
    if let Some(l) = s.final_train_loss {
        eprintln!("  train loss        {l:.4}");
    }
    if let (Some(l), Some(t1), Some(t5)) =
        (s.final_valid_loss, s.final_valid_top1, s.final_valid_top5)
    {
        eprintln!(
            "  valid             loss {l:.4}, top-1 {:.2}%, top-5 {:.2}% ({} images, {} classes)",
            100.0 * t1,
            100.0 * t5,
            s.valid_images,
            s.num_classes
        );
    }
    eprintln!("  wall time         {}", format_duration(s.train_seconds));
    eprintln!(
        "  images/s          {:.0} in steps ({:.0} over the wall time)",
        s.images_per_s, s.images_per_s_wall
    );
    if let Some(p) = s.peak_memory_bytes {
        eprintln!(
            "  peak memory       {:.2} GiB ({})",
            gib(p),
            s.peak_memory_kind
        );
    }
    eprintln!(
        "  parameters        {} ({:.3} GiB)",
        human(s.params as f64),
        gib(s.param_bytes)
    );
    if let Some(p) = &s.pruning {
        eprintln!(
            "  sparsity          {:.2}% of {} prunable weights are zero",
            100.0 * p.global_sparsity,
            p.prunable_params
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_smoothing_loss_matches_the_formula() {
        // loss = mean_i [ (1 - s) * -log p(y_i) + s * mean_c -log p(c) ]
        tch::manual_seed(0);
        let logits = Tensor::randn([6, 5], (Kind::Double, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 4, 2, 2, 1, 3]);
        let logp = logits.log_softmax(1, Kind::Double);
        let lp: Vec<f64> = Vec::try_from(logp.reshape([-1])).expect("f64");
        for s in [0.0, 0.1, 0.3] {
            let mut want = 0.0;
            for (i, &y) in [0usize, 4, 2, 2, 1, 3].iter().enumerate() {
                let row = &lp[i * 5..i * 5 + 5];
                want += (1.0 - s) * -row[y] + s * row.iter().map(|v| -v).sum::<f64>() / 5.0;
            }
            want /= 6.0;
            let got = classification_loss(&logits, &labels, s)
                .expect("loss")
                .double_value(&[]);
            assert!((got - want).abs() < 1e-12, "smoothing {s}: {got} vs {want}");
        }
    }

    #[test]
    fn top_k_counts_rows_whose_label_is_among_the_k_largest() {
        let logits = Tensor::from_slice(&[
            0.1f32, 0.9, 0.0, 0.5, //
            0.8, 0.1, 0.7, 0.0, //
            0.0, 0.1, 0.2, 0.3,
        ])
        .view([3, 4]);
        let labels = Tensor::from_slice(&[1i64, 2, 0]);
        assert_eq!(correct(&logits, &labels, 1), (1, 1));
        assert_eq!(correct(&logits, &labels, 2), (2, 2));
        assert_eq!(
            correct(&logits, &labels, 5),
            (3, 4),
            "k is capped at the classes"
        );
    }
}
