//! Image classification with a ResNet. `run` reads top to bottom: set-up (`harness::Setup`), the
//! model and its optimizer (`Net::build`), the state to start from, the shared run
//! (`harness::Run`), then the loop: one `Net::step` (forward, backward, all-reduce, clipping,
//! the optimizer step), its log row, evaluation, and `harness`'s checkpoint-or-stop; last, the
//! summary.
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

use super::harness::{self, Run, RunSummary, Sections, Setup};
use crate::checkpoint::{self, TrainState};
use crate::config::{self, ClassifyRecipe, Precision};
use crate::data::images::{self, eval_batch, Augment, ImagePrefetcher, ImageSet};
use crate::data::loader::stream_seed;
use crate::device;
use crate::dist::OverlappedGrads;
use crate::distill::ClassifierDistiller;
use crate::error::{Error, Result};
use crate::metrics::progress::format_duration;
use crate::metrics::row;
use crate::models::params::ParamStore;
use crate::models::resnet::ResNet;
use crate::optim::{clip_grad_norm, Optimizer};
use crate::prune::Pruner;
use crate::schedule::Schedule;
use crate::signals::StopFlag;
use serde::Serialize;
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Reduction, Tensor};

pub type Outcome = harness::Outcome<Summary>;

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
    #[serde(flatten)]
    pub sizes: harness::Sizes,
    #[serde(flatten)]
    pub footprint: harness::Footprint,
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

/// Trains `recipe`, waiting up to `wait_for_lock` for another run holding its run directory.
pub fn run(
    recipe: &ClassifyRecipe,
    resume: harness::Resume,
    wait_for_lock: Duration,
    stop: &StopFlag,
) -> Result<Outcome> {
    // ---- set-up -------------------------------------------------------------------------
    let _lock = harness::lock_run_dir(&recipe.run.out_dir, wait_for_lock)?;
    let setup = Setup::new(&recipe.run, recipe.train.batch_size, &resume)?;
    let (train, valid) = open_data(recipe)?;
    let total_steps = recipe.max_steps(train.len());
    recipe.check_warmup(total_steps).map_err(|inv| {
        Error::Recipe(format!(
            "{}: {} (a run of {total_steps} steps)",
            inv.key, inv.msg
        ))
    })?;
    let mut net = Net::build(recipe, &setup)?;
    let schedule = Schedule::new(&recipe.schedule, recipe.optim.lr(), total_steps);
    let (seed, params, optimizer) = (recipe.run.seed, &mut net.params, &mut net.optimizer);
    let mut state = match &setup.resume_dir {
        Some(dir) => harness::load_resume(dir, seed, params, optimizer, false)?,
        None => harness::fresh_state(seed),
    };
    if let Some(done) = harness::already_done(&setup, &state, total_steps) {
        return Ok(done);
    }
    let sections = Sections {
        run: &recipe.run,
        optim: &recipe.optim,
        prune: recipe.prune.as_ref(),
        checkpoint_every: recipe.train.checkpoint_every,
        async_checkpoints: false,
        keep_checkpoints: recipe.train.keep_checkpoints,
        resolved: config::to_toml(recipe),
    };
    net.pruner = harness::start_pruner(&sections, params, total_steps, state.step)?;
    let mut run = Run::start(setup, &sections, &net.params, &state, stop)?;
    log_start(recipe, &run, &net, &train, &valid, total_steps);
    run.reset_peak_memory();

    // ---- loop ---------------------------------------------------------------------------
    let aug = Augment::from_config(&recipe.data);
    let prefetch = ImagePrefetcher::start(
        train.clone(),
        aug.clone(),
        recipe.train.batch_size as usize,
        // This rank's rows of every global batch: each rank augments only its own images.
        run.shard_start..run.shard_start + run.shard_rows,
        recipe.run.seed,
        state.step,
        total_steps - 1,
        4,
    );
    // Several processes: the gradients are averaged while the backward pass goes on (every rank
    // uses every parameter; not with a distillation teacher, as for language models).
    let overlap = if run.world.is_distributed() && net.distiller.is_none() {
        Some(OverlappedGrads::new(&run.dp, &net.params, None, None)?)
    } else {
        None
    };
    let mut last_eval: Option<EvalResult> = None;
    run.start_loop(total_steps, recipe.train.batch_size, &state, None);
    while state.step < total_steps {
        let step = state.step;
        let step_start = Instant::now();
        // Dropout (WRN) and any other torch randomness: a pure function of (seed, step, rank).
        tch::manual_seed(
            (stream_seed(recipe.run.seed, step, -1, run.world.rank as i64) >> 1) as i64,
        );
        let lr = schedule.lr(step);
        let out = net.step(recipe, &run, &prefetch, overlap.as_ref(), lr, step)?;
        run.step_done(&mut state, step_start);
        if let Some(p) = &net.pruner {
            p.on_step(state.step, &mut net.params)?;
        }
        let done = state.step == total_steps;
        if state.step % recipe.train.log_every == 0 || done {
            log_step(recipe, &net, &mut run, &state, out.log, train.len())?;
        }
        if recipe.train.eval_every.is_some_and(|e| state.step % e == 0) || done {
            let r = evaluate_and_log(&net.model, &valid, &aug, recipe, &mut run, &mut state)?;
            last_eval = Some(r);
        }
        let (params, optimizer) = (&net.params, &net.optimizer);
        if let Some(outcome) =
            run.checkpoint_or_stop(&mut state, params, optimizer, done, out.stop_all)?
        {
            return Ok(outcome);
        }
    }
    run.progress.finish();
    drop(prefetch);

    // ---- summary ------------------------------------------------------------------------
    let summary = net.summary(recipe, &run, &state, &train, &valid, last_eval);
    run.write_summary(&summary)?;
    Ok(Outcome::Finished(summary))
}

/// The classifier being trained and everything that updates it.
struct Net {
    model: ResNet,
    params: ParamStore,
    optimizer: Optimizer,
    /// `[distill]`: the frozen teacher.
    distiller: Option<ClassifierDistiller>,
    /// Magnitude pruning or GSM's cut (set once the start state is known).
    pruner: Option<Pruner>,
}

/// What a step leaves for its log row.
struct StepLog {
    lr: f64,
    /// The step's loss on this rank; its logits `[b, classes]` and labels `[b]` (top-1).
    loss: Tensor,
    logits: Tensor,
    labels: Tensor,
    /// Several ranks: the loss averaged and the correct predictions summed over them.
    global: Option<(f64, f64)>,
    grad_norm: f64,
    /// `[distill]`: the distillation and cross-entropy parts of the loss.
    distill_parts: Vec<(&'static str, serde_json::Value)>,
}

/// A step's result: its log, and whether any rank was asked to stop (several ranks).
struct StepOut {
    log: StepLog,
    stop_all: bool,
}

impl Net {
    /// The ResNet on the run's device, its weights from `[init]` (unless resuming), the
    /// distillation teacher and the optimizer, in the order that draws the seeded initial values.
    fn build(recipe: &ClassifyRecipe, setup: &Setup) -> Result<Net> {
        tch::manual_seed(recipe.run.seed as i64);
        let model_cfg = recipe.model.build()?;
        let mut params = ParamStore::new(setup.device);
        let model = ResNet::new(&model_cfg, &mut params)?;
        if let (Some(init), None) = (&recipe.init, &setup.resume_dir) {
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
            Some(d) => Some(ClassifierDistiller::new(d, &recipe.model, setup.device)?),
            None => None,
        };
        let optimizer = Optimizer::build(&recipe.optim, &params)?;
        Ok(Net {
            model,
            params,
            optimizer,
            distiller,
            pruner: None,
        })
    }

    /// One optimizer step: forward and backward of this rank's rows, the gradients averaged
    /// over the ranks and clipped, the update; then BatchNorm's running statistics are rank 0's.
    fn step(
        &mut self,
        recipe: &ClassifyRecipe,
        run: &Run,
        batches: &ImagePrefetcher,
        overlap: Option<&OverlappedGrads>,
        lr: f64,
        step: i64,
    ) -> Result<StepOut> {
        let (device, precision) = (run.device, recipe.run.precision);
        let batch = batches
            .next()
            .ok_or_else(|| Error::Torch("data prefetch thread stopped".into()))?;
        // This rank's rows of the global batch (the prefetcher built only those).
        let x = batch.images.to_device(device); // [b, 3, h, w]
        let y = batch.labels.to_device(device); // [b]
        let logits = forward(&self.model, &x, true, device, precision)?; // [b, classes]
        let loss = classification_loss(&logits, &y, recipe.train.label_smoothing)?;
        // `[distill]`: alpha * kd + (1 - alpha) * the cross-entropy above.
        let (loss, distill_parts) = match &self.distiller {
            Some(d) => {
                let l = d.loss(&x, &logits, &loss, device, precision)?;
                let parts = vec![("kd_loss", json!(l.kd)), ("ce_loss", json!(l.ce))];
                (l.total, parts)
            }
            None => (loss, Vec::new()),
        };
        match overlap {
            Some(o) => o.backward(&run.dp, || loss.f_backward())?,
            None => loss.f_backward()?,
        }
        // Several ranks: average the gradients; sum the loss and correct predictions (for the
        // log) and the stop votes.
        let (mut global, mut stop_all) = (None, false);
        if run.world.is_distributed() {
            let (top1, _) = correct(&logits.detach(), &y, 1);
            let mut sums = [loss.double_value(&[]), top1 as f64, run.stop_vote()];
            run.reduce_step(overlap, &self.params, &mut sums)?;
            global = Some((sums[0] / run.world.size as f64, sums[1]));
            stop_all = sums[2] > 0.0;
        }
        let grad_norm = clip_grad_norm(&self.params, None)?;
        harness::check_grad_norm(grad_norm, step + 1, "lower optim.lr")?;
        self.optimizer.step(lr)?;
        self.params.apply_masks();
        self.params.zero_grad();
        if run.world.is_distributed() {
            // BatchNorm's running statistics (and any other buffer): rank 0's.
            let buffers: Vec<&Tensor> = self
                .params
                .iter()
                .filter(|p| !p.trainable)
                .map(|p| &p.tensor)
                .collect();
            run.dp.broadcast_from_main(&buffers)?;
        }
        let log = StepLog {
            lr,
            loss,
            logits,
            labels: y,
            global,
            grad_norm,
            distill_parts,
        };
        Ok(StepOut { log, stop_all })
    }

    /// summary.json's numbers at the end of the run.
    fn summary(
        &self,
        recipe: &ClassifyRecipe,
        run: &Run,
        state: &TrainState,
        train: &ImageSet,
        valid: &ImageSet,
        last_eval: Option<EvalResult>,
    ) -> Summary {
        let time = run.clock.throughput(state.tokens);
        let footprint = run.footprint(
            &self.params,
            &self.optimizer,
            self.pruner.as_ref(),
            recipe.run.precision,
        );
        Summary {
            name: recipe.run.name.clone(),
            steps: state.step,
            images: state.tokens,
            epochs: state.step as f64 / recipe.steps_per_epoch(train.len()) as f64,
            final_train_loss: run.last_train_loss,
            final_valid_loss: last_eval.map(|r| r.loss),
            final_valid_top1: last_eval.map(|r| r.top1),
            final_valid_top5: last_eval.map(|r| r.top5),
            num_classes: train.num_classes(),
            train_images: train.len(),
            valid_images: valid.len(),
            train_seconds: time.train_seconds,
            images_per_s: time.per_s,
            images_per_s_wall: time.per_s_wall,
            sizes: harness::Sizes::of(&self.params),
            footprint,
            resumed_from: run.resume_dir.clone(),
        }
    }
}

/// The start-up line: sizes, device, the data and the length of the run.
fn log_start(
    recipe: &ClassifyRecipe,
    run: &Run,
    net: &Net,
    train: &ImageSet,
    valid: &ImageSet,
    total_steps: i64,
) {
    tracing::info!(
        "{}: {} parameters, {} ({}), {} training images in {} classes ({} steps/epoch), {} validation images, {} steps",
        recipe.run.name,
        harness::human(net.params.num_trainable() as f64),
        device::describe(run.device),
        recipe.run.precision.as_str(),
        train.len(),
        train.num_classes(),
        recipe.steps_per_epoch(train.len()),
        valid.len(),
        total_steps
    );
}

/// A logged training step's row: the loss, LR, gradient norm, top-1 accuracy of the batch,
/// throughput and epoch, then distillation and pruning columns.
fn log_step(
    recipe: &ClassifyRecipe,
    net: &Net,
    run: &mut Run,
    state: &TrainState,
    out: StepLog,
    train_images: usize,
) -> Result<()> {
    let (loss, top1) = match out.global {
        Some((loss, top1)) => (loss, top1 as i64),
        None => (
            out.loss.double_value(&[]),
            correct(&out.logits.detach(), &out.labels, 1).0,
        ),
    };
    harness::check_loss(loss, state.step, "lower optim.lr")?;
    let images_per_s = run.clock.window_rate();
    let per_step = recipe.train.batch_size;
    let steps_per_epoch = recipe.steps_per_epoch(train_images);
    let mut r = row(&[
        ("step", json!(state.step)),
        ("loss", json!(loss)),
        ("lr", json!(out.lr)),
        ("grad_norm", json!(out.grad_norm)),
        ("top1", json!(top1 as f64 / per_step as f64)),
        ("images", json!(state.tokens)),
        ("images_per_s", json!(images_per_s)),
        ("epoch", json!(state.step as f64 / steps_per_epoch as f64)),
    ]);
    r.extend(
        out.distill_parts
            .into_iter()
            .map(|(k, v)| (k.to_string(), v)),
    );
    r.extend(harness::pruning_metrics(
        net.pruner.as_ref(),
        &net.optimizer,
        &net.params,
    ));
    run.log_train(r, state.step, loss, out.lr, images_per_s)
}

/// Evaluates on data.valid (or its first `train.eval_images`), logs the row and the line, and keeps
/// the loss in the state (checkpointed). With several processes each evaluates its share of the
/// batches; the sums are added over the ranks (one all-reduce).
fn evaluate_and_log(
    model: &ResNet,
    valid: &ImageSet,
    aug: &Augment,
    recipe: &ClassifyRecipe,
    run: &mut Run,
    state: &mut TrainState,
) -> Result<EvalResult> {
    let limit = recipe
        .train
        .eval_images
        .map_or(valid.len(), |n| (n as usize).min(valid.len()));
    let batch_size = recipe.train.batch_size as usize;
    let (device, precision, world) = (run.device, recipe.run.precision, &run.world);
    let mut sums = evaluate_part(
        model, valid, aug, limit, batch_size, device, precision, world.rank, world.size,
    )?;
    run.dp.sum(&mut sums)?;
    let r = eval_result(sums, limit);
    state.last_valid_loss = Some(r.loss);
    run.log(row(&[
        ("step", json!(state.step)),
        ("split", json!("valid")),
        ("loss", json!(r.loss)),
        ("top1", json!(r.top1)),
        ("top5", json!(r.top5)),
        ("images", json!(r.images)),
    ]))?;
    run.progress.println(&format!(
        "step {}: valid loss {:.4}, top-1 {:.2}%, top-5 {:.2}% ({} images)",
        state.step,
        r.loss,
        100.0 * r.top1,
        100.0 * r.top5,
        r.images
    ));
    run.clock.restart_window();
    Ok(r)
}

impl RunSummary for Summary {
    fn report(&self) -> Vec<(&'static str, String)> {
        let steps = format!(
            "{} ({:.2} epochs of {} images)",
            self.steps, self.epochs, self.train_images
        );
        let mut lines = vec![("run", self.name.clone()), ("steps", steps)];
        if let Some(l) = self.final_train_loss {
            lines.push(("train loss", format!("{l:.4}")));
        }
        if let (Some(l), Some(t1), Some(t5)) = (
            self.final_valid_loss,
            self.final_valid_top1,
            self.final_valid_top5,
        ) {
            let valid = format!(
                "loss {l:.4}, top-1 {:.2}%, top-5 {:.2}% ({} images, {} classes)",
                100.0 * t1,
                100.0 * t5,
                self.valid_images,
                self.num_classes
            );
            lines.push(("valid", valid));
        }
        lines.push(("wall time", format_duration(self.train_seconds)));
        let rates = format!(
            "{:.0} in steps ({:.0} over the wall time)",
            self.images_per_s, self.images_per_s_wall
        );
        lines.push(("images/s", rates));
        lines.extend(harness::report_peak_memory(
            self.footprint.peak_memory_bytes,
            &self.footprint.peak_memory_kind,
        ));
        let size = format!(
            "{} ({:.3} GiB)",
            harness::human(self.sizes.params as f64),
            harness::gib(self.sizes.param_bytes)
        );
        lines.push(("parameters", size));
        lines.extend(harness::report_sparsity(self.footprint.pruning.as_ref()));
        lines
    }
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
    crate::device::autocast(precision, device, || {
        model.forward(x, train).to_kind(Kind::Float)
    })
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
