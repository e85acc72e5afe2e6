//! The run harness every training loop shares (`pretrain.rs`, `classify.rs`; `stages.rs` runs
//! `pretrain` once per stage): where a start resumes from, the world it trains in (ranks,
//! device, rows of the batch), the run directory and its log, the progress display, the clocks
//! behind the time and throughput numbers, the checkpoint-or-stop tail of every step, the
//! outcome, and the summary's common numbers and printing.
//!
//! The shape: a loop builds its model and optimizer, then holds a [`Run`] (the shared state)
//! and calls these plain functions around its own step. Nothing here knows the task's model,
//! data or loss.

use super::checkpoint_writer::CheckpointWriter;
use super::run_dir::{peak_memory, prepare_run_dir, resume_checkpoint, RunLock};
use crate::checkpoint::{self, TrainState};
use crate::config::{OptimConfig, Precision, PruneConfig, RunConfig};
use crate::device;
use crate::dist::{DataParallel, OverlappedGrads, World};
use crate::error::{io_err, Error, Result};
use crate::metrics::progress::Progress;
use crate::metrics::MetricsLog;
use crate::models::params::ParamStore;
use crate::optim::Optimizer;
use crate::prune::{Pruner, SparsityReport};
use crate::signals::StopFlag;
use serde::Serialize;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

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

/// How a run ended; `S` is the task's summary.
#[derive(Debug)]
pub enum Outcome<S> {
    Finished(S),
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

/// A task's summary.json, which also prints as labelled lines at the end of a run.
pub trait RunSummary: Serialize {
    /// The (label, value) lines of the terminal report, in order.
    fn report(&self) -> Vec<(&'static str, String)>;
}

/// Prints report lines to stderr, the labels in one column.
pub fn print_report(lines: &[(&str, String)]) {
    eprintln!();
    for (label, value) in lines {
        eprintln!("  {label:<18}{value}");
    }
}

/// Where and how this process trains, decided before any data or model is touched.
pub struct Setup {
    pub run_dir: PathBuf,
    /// The checkpoint this start resumes from; `None` for a fresh run.
    pub resume_dir: Option<PathBuf>,
    pub world: World,
    pub device: Device,
    /// This rank's rows of every global batch: `shard_start..shard_start + shard_rows`.
    pub shard_start: usize,
    pub shard_rows: usize,
}

impl Setup {
    /// Checks the run directory against `resume` and picks its checkpoint, sets torch's threads
    /// and determinism, and reads the world (`trainer launch`, torchrun, Slurm): this process's
    /// rank, its device (LOCAL_RANK's GPU) and its rows of every global batch, all checked
    /// before anyone waits on anyone.
    /// The caller holds the run directory's lock (`lock_run_dir`).
    pub fn new(run: &RunConfig, batch_size: i64, resume: &Resume) -> Result<Setup> {
        let run_dir = run.out_dir.clone();
        let world = World::from_env()?;
        let resume_dir = resume_checkpoint(&run_dir, resume)?;
        if run.threads > 0 {
            tch::set_num_threads(run.threads as i32);
        }
        device::set_deterministic(run.deterministic)?;
        let device = world.device(device::resolve(&run.device)?)?;
        let (shard_start, shard_rows) = world.shard(batch_size as usize, "train.batch_size")?;
        Ok(Setup {
            run_dir,
            resume_dir,
            world,
            device,
            shard_start,
            shard_rows,
        })
    }
}

/// Rank 0's lock on the run directory (`run_dir::RunLock`; other ranks hold none), taken before
/// the directory is judged so that two starts cannot both find it free, and held by the caller
/// for the whole run (all stages of a `[[stages]]` run). `wait`: how long to wait for another
/// run holding it (`--wait-for-lock`).
pub fn lock_run_dir(run_dir: &Path, wait: Duration) -> Result<Option<RunLock>> {
    if World::from_env()?.rank == 0 {
        Ok(Some(RunLock::acquire(run_dir, wait)?))
    } else {
        Ok(None)
    }
}

/// The state of a fresh run.
pub fn fresh_state(seed: u64) -> TrainState {
    TrainState {
        format: 1,
        step: 0,
        tokens: 0,
        seed,
        train_seconds: 0.0,
        last_valid_loss: None,
    }
}

/// Loads the checkpoint `dir` into `params` and `optimizer` and returns its state. A `run.seed`
/// that differs from the checkpoint's wins, with a warning: the data order changes from here.
pub fn load_resume(
    dir: &Path,
    seed: u64,
    params: &mut ParamStore,
    optimizer: &mut Optimizer,
    optimizer_part: bool,
) -> Result<TrainState> {
    let mut state = checkpoint::load(dir, params, optimizer, optimizer_part)?;
    if state.seed != seed {
        tracing::warn!(
            "run.seed is {seed} but the checkpoint was trained with seed {}; data order changes",
            state.seed
        );
        state.seed = seed;
    }
    tracing::info!("resuming from {} (step {})", dir.display(), state.step);
    Ok(state)
}

/// A resumed run whose checkpoint is at or past `total_steps`: nothing to train, and a finished
/// run's files (summary.json, tb/, metrics) are left exactly as they are.
pub fn already_done<S>(setup: &Setup, state: &TrainState, total_steps: i64) -> Option<Outcome<S>> {
    let resumed = setup.resume_dir.is_some();
    (resumed && state.step >= total_steps).then_some(Outcome::AlreadyDone { step: state.step })
}

/// Magnitude pruning or GSM's cut, if the recipe asks for one; an event at `step` (where the run
/// starts or resumes) fires now.
pub fn start_pruner(
    sections: &Sections,
    params: &mut ParamStore,
    total_steps: i64,
    step: i64,
) -> Result<Option<Pruner>> {
    let pruner = Pruner::for_run(sections.prune, sections.optim, params, total_steps)?;
    if let Some(p) = &pruner {
        p.on_step(step, params)?;
    }
    Ok(pruner)
}

/// The sections of a task's recipe that the harness reads.
pub struct Sections<'r> {
    pub run: &'r RunConfig,
    pub optim: &'r OptimConfig,
    pub prune: Option<&'r PruneConfig>,
    /// `train.checkpoint_every` (a checkpoint is also written at the end and on a stop) and
    /// `train.keep_checkpoints`.
    pub checkpoint_every: Option<i64>,
    pub keep_checkpoints: i64,
    /// `train.async_checkpoints`: periodic checkpoints written on a background thread.
    pub async_checkpoints: bool,
    /// The resolved recipe, written to the run directory as config.toml.
    pub resolved: String,
}

/// The state every training loop shares, from the start of training to the summary.
pub struct Run<'a> {
    pub world: World,
    pub device: Device,
    pub run_dir: PathBuf,
    pub resume_dir: Option<PathBuf>,
    /// This rank's rows of every global batch: `shard_start..shard_start + shard_rows`.
    pub shard_start: usize,
    pub shard_rows: usize,
    /// Data parallelism over the ranks (every operation a no-op for one process).
    pub dp: DataParallel,
    /// metrics.jsonl and TensorBoard; rank 0 only.
    metrics: Option<MetricsLog>,
    pub progress: Progress,
    pub clock: Clock,
    /// The loss of the last logged training step, for the summary.
    pub last_train_loss: Option<f64>,
    stop: &'a StopFlag,
    checkpoint_every: Option<i64>,
    /// Writes the checkpoints (each rank its share of the optimizer state with `run.shard`;
    /// periodic ones in the background with `train.async_checkpoints`).
    writer: CheckpointWriter,
    last_checkpoint: Option<PathBuf>,
    total_steps: i64,
    /// Tokens (or images) per optimizer step.
    per_step: i64,
}

impl<'a> Run<'a> {
    /// Once the weights and optimizer state are in place (fresh, initialised or resumed at
    /// `state`): every rank takes rank 0's weights and must be at the same step, and rank 0
    /// alone writes the run directory (resolved recipe, logs, TensorBoard, checkpoints, summary).
    pub fn start(
        setup: Setup,
        sections: &Sections,
        params: &ParamStore,
        state: &TrainState,
        stop: &'a StopFlag,
    ) -> Result<Run<'a>> {
        let Setup {
            run_dir,
            resume_dir,
            world,
            device,
            shard_start,
            shard_rows,
        } = setup;
        let run = sections.run;
        let dp = DataParallel::start(
            &world,
            device,
            &run.collectives(),
            params,
            state.step,
            &run_dir,
        )?;
        let metrics = if world.is_main() {
            prepare_run_dir(&run_dir, &sections.resolved, state.step)?;
            Some(MetricsLog::open(&run_dir, Some(state.step))?)
        } else {
            None
        };
        let sharded = run.shard != crate::config::Shard::None && world.is_distributed();
        let writer = CheckpointWriter::new(
            sections.async_checkpoints,
            sharded,
            sections.keep_checkpoints.max(1) as usize,
            Duration::from_secs_f64(run.collective_timeout_s),
        );
        Ok(Run {
            world,
            device,
            run_dir,
            resume_dir,
            shard_start,
            shard_rows,
            dp,
            metrics,
            progress: Progress::silent(),
            clock: Clock::new(state),
            last_train_loss: None,
            stop,
            checkpoint_every: sections.checkpoint_every,
            writer,
            last_checkpoint: None,
            total_steps: 0,
            per_step: 0,
        })
    }

    /// `run.shard = "full"`: what each rank writes of the checkpoints' model file
    /// (`CheckpointWriter::set_model_part`).
    pub fn set_model_part(&mut self, part: super::checkpoint_writer::ModelPart) {
        self.writer.set_model_part(part);
    }

    /// Peak memory counts from here (CUDA; the CPU's peak resident set cannot be reset).
    pub fn reset_peak_memory(&self) {
        if let Device::Cuda(i) = self.device {
            let _ = torch_ext::accelerator_reset_peak(i);
        }
    }

    /// Starts the clocks and, on rank 0, the progress display (named after the stage of a
    /// `[[stages]]` run), for a loop to `total_steps` of `per_step` tokens or images each.
    pub fn start_loop(
        &mut self,
        total_steps: i64,
        per_step: i64,
        state: &TrainState,
        stage: Option<&str>,
    ) {
        self.total_steps = total_steps;
        self.per_step = per_step;
        self.progress = match (self.world.is_main(), stage) {
            (false, _) => Progress::silent(),
            (true, None) => Progress::new(total_steps, state.step),
            (true, Some(name)) => Progress::new(total_steps, state.step).in_stage(name),
        };
        self.clock = Clock::new(state);
    }

    /// This rank's stop flag as a number for the step's all-reduce: summed over the ranks, a
    /// signal to any rank stops all of them after the same step.
    pub fn stop_vote(&self) -> f64 {
        f64::from(u8::from(self.stop.requested()))
    }

    /// Several ranks: averages the gradients of the trainable parameters (or finishes the
    /// all-reduce that `overlap` started during the backward pass) and sums `scalars` over the
    /// ranks.
    pub fn reduce_step(
        &self,
        overlap: Option<&OverlappedGrads>,
        params: &ParamStore,
        scalars: &mut [f64],
    ) -> Result<()> {
        match overlap {
            Some(o) => o.finish(&self.dp, scalars),
            None => {
                let trainable: Vec<&Tensor> = params.trainable().map(|p| &p.tensor).collect();
                self.dp.reduce_step(&trainable, scalars)
            }
        }
    }

    /// Counts the optimizer step that began at `step_start`.
    pub fn step_done(&mut self, state: &mut TrainState, step_start: Instant) {
        state.step += 1;
        state.tokens += self.per_step;
        self.clock
            .step_done(state.tokens, self.per_step, step_start);
    }

    /// A logged training step: its row in metrics.jsonl (rank 0), the progress display, the
    /// loss kept for the summary, and a new log window. `rate`: tokens or images per second.
    pub fn log_train(
        &mut self,
        row: Map<String, Value>,
        step: i64,
        loss: f64,
        lr: f64,
        rate: f64,
    ) -> Result<()> {
        self.log(row)?;
        let eta = (self.total_steps - step) as f64 * self.per_step as f64 / rate;
        self.progress.update(step, loss, lr, rate, eta);
        self.last_train_loss = Some(loss);
        self.clock.restart_window();
        Ok(())
    }

    /// A row in metrics.jsonl (rank 0; nothing on the other ranks).
    pub fn log(&mut self, row: Map<String, Value>) -> Result<()> {
        match self.metrics.as_mut() {
            Some(m) => m.log(row),
            None => Ok(()),
        }
    }

    /// The tail of every step: a checkpoint when `train.checkpoint_every` says so, at the end
    /// (`done`) and when stopping (`stop_all`: the ranks' summed stop votes, on several ranks);
    /// then, when a signal stops the run before its end, the outcome to return.
    pub fn checkpoint_or_stop<S>(
        &mut self,
        state: &mut TrainState,
        params: &ParamStore,
        optimizer: &Optimizer,
        done: bool,
        stop_all: bool,
    ) -> Result<Option<Outcome<S>>> {
        let stopping = if self.world.is_distributed() {
            stop_all
        } else {
            self.stop.requested()
        };
        if self.checkpoint_every.is_some_and(|c| state.step % c == 0) || done || stopping {
            state.train_seconds = self.clock.train_seconds();
            let dir = self.writer.save(
                &self.dp,
                &self.run_dir,
                state,
                params,
                optimizer,
                done || stopping,
            )?;
            let line = format!("step {}: checkpoint {}", state.step, dir.display());
            self.progress.println(&line);
            self.last_checkpoint = Some(dir);
            self.clock.restart_window();
        }
        if !stopping || done {
            return Ok(None);
        }
        self.progress.finish();
        let checkpoint = self.last_checkpoint.clone().unwrap_or_default();
        tracing::warn!(
            "stopped by signal after step {}; checkpoint {}; continue with --resume auto",
            state.step,
            checkpoint.display()
        );
        Ok(Some(Outcome::Interrupted {
            step: state.step,
            checkpoint,
        }))
    }

    /// What every summary reports about the optimizer, the sparsity, the machine and the peak
    /// memory at the end.
    pub fn footprint(
        &self,
        params: &ParamStore,
        optimizer: &Optimizer,
        pruner: Option<&Pruner>,
        precision: Precision,
    ) -> Footprint {
        let (peak_memory_bytes, peak_memory_kind) = peak_memory(self.device);
        Footprint {
            optimizer_state_bytes: optimizer.state_bytes(),
            pruning: pruner.map(|p| p.report(params)),
            device: device::describe(self.device),
            precision: precision.as_str().to_string(),
            peak_memory_bytes,
            peak_memory_kind,
        }
    }

    /// Writes summary.json (rank 0).
    pub fn write_summary(&self, summary: &impl Serialize) -> Result<()> {
        if !self.world.is_main() {
            return Ok(());
        }
        let path = self.run_dir.join("summary.json");
        let text = serde_json::to_string_pretty(summary).unwrap_or_default();
        std::fs::write(&path, text + "\n").map_err(io_err(format!("writing {}", path.display())))
    }
}

/// An error for a training step whose gradient norm is NaN or infinite: stepping would write it
/// into the weights and the next checkpoint. `hint` says what to change in the recipe.
pub fn check_grad_norm(grad_norm: f64, step: i64, hint: &str) -> Result<()> {
    if grad_norm.is_finite() {
        return Ok(());
    }
    Err(Error::Torch(format!(
        "gradient norm is {grad_norm} at step {step}: training diverged ({hint}); the last checkpoint is intact"
    )))
}

/// An error for a logged training loss that is NaN or infinite.
pub fn check_loss(loss: f64, step: i64, hint: &str) -> Result<()> {
    if loss.is_finite() {
        return Ok(());
    }
    Err(Error::Torch(format!(
        "loss is {loss} at step {step}: training diverged ({hint})"
    )))
}

/// The clocks behind a run's time and throughput numbers.
pub struct Clock {
    /// This start of the run.
    start: Instant,
    /// Seconds and tokens (or images) of the earlier starts (the resumed checkpoint's).
    seconds_before: f64,
    count_before: i64,
    /// The log window: since the last log row, evaluation or checkpoint.
    window_start: Instant,
    window_count: i64,
    /// Time in optimizer steps and what they consumed, leaving out the first step of this start
    /// (allocator and kernel warm-up).
    step_seconds: f64,
    step_count: i64,
}

/// A run's time and throughput at its end.
pub struct Throughput {
    /// Wall-clock seconds of the whole run (summed over resumes).
    pub train_seconds: f64,
    /// Tokens (or images) per second in optimizer steps.
    pub per_s: f64,
    /// Tokens (or images) per second over the wall time of this start.
    pub per_s_wall: f64,
}

impl Clock {
    fn new(state: &TrainState) -> Clock {
        Clock {
            start: Instant::now(),
            seconds_before: state.train_seconds,
            count_before: state.tokens,
            window_start: Instant::now(),
            window_count: 0,
            step_seconds: 0.0,
            step_count: 0,
        }
    }

    /// Counts a step of `per_step` that began at `step_start`; `count` is the run's total after it.
    fn step_done(&mut self, count: i64, per_step: i64, step_start: Instant) {
        self.window_count += per_step;
        if count - self.count_before > per_step {
            self.step_seconds += step_start.elapsed().as_secs_f64();
            self.step_count += per_step;
        }
    }

    /// Evaluations and checkpoints do not count against the logged throughput.
    pub fn restart_window(&mut self) {
        self.window_start = Instant::now();
        self.window_count = 0;
    }

    /// Tokens (or images) per second over the log window.
    pub fn window_rate(&self) -> f64 {
        let elapsed = self.window_start.elapsed().as_secs_f64().max(1e-9);
        self.window_count as f64 / elapsed
    }

    /// Seconds of the whole run so far (summed over resumes).
    pub fn train_seconds(&self) -> f64 {
        self.seconds_before + self.start.elapsed().as_secs_f64()
    }

    /// The run's time and throughput, with `count` tokens (or images) consumed in all.
    pub fn throughput(&self, count: i64) -> Throughput {
        let session_seconds = self.start.elapsed().as_secs_f64();
        let per_s_wall = (count - self.count_before) as f64 / session_seconds.max(1e-9);
        let per_s = if self.step_count > 0 {
            self.step_count as f64 / self.step_seconds.max(1e-9)
        } else {
            per_s_wall
        };
        Throughput {
            train_seconds: self.seconds_before + session_seconds,
            per_s,
            per_s_wall,
        }
    }
}

/// The model's size in every summary.json (flattened into the task's summary).
#[derive(Debug, Clone, Serialize)]
pub struct Sizes {
    pub params: i64,
    pub trainable_params: i64,
    pub param_bytes: i64,
}

impl Sizes {
    pub fn of(params: &ParamStore) -> Sizes {
        Sizes {
            params: params.num_params(),
            trainable_params: params.num_trainable(),
            param_bytes: params.bytes(),
        }
    }
}

/// The end of every summary.json's middle: the optimizer state, the sparsity, the machine and
/// the peak memory (flattened into the task's summary, so its fields stand at the same place in
/// both summaries).
#[derive(Debug, Clone, Serialize)]
pub struct Footprint {
    pub optimizer_state_bytes: i64,
    /// With `[prune]` or GSM: zeros per prunable layer and over all of them, at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pruning: Option<SparsityReport>,
    pub device: String,
    pub precision: String,
    /// Peak allocated accelerator memory (CUDA), or the process's peak resident set (CPU).
    pub peak_memory_bytes: Option<i64>,
    pub peak_memory_kind: String,
}

/// The pruning columns of a log row: sparsity so far, and GSM's selection and would-be cut.
pub fn pruning_metrics(
    pruner: Option<&Pruner>,
    optimizer: &Optimizer,
    params: &ParamStore,
) -> Vec<(String, Value)> {
    let mut out = pruner.map_or_else(Vec::new, |p| p.metrics(params));
    if let Optimizer::Gsm(g) = optimizer {
        if let Some(f) = g.selected_fraction() {
            out.push(("gsm/selected_fraction".into(), serde_json::json!(f)));
        }
    }
    out
}

/// Bytes in GiB, for the report.
pub fn gib(bytes: i64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The report line of the peak memory, when measured.
pub fn report_peak_memory(bytes: Option<i64>, kind: &str) -> Option<(&'static str, String)> {
    bytes.map(|b| ("peak memory", format!("{:.2} GiB ({kind})", gib(b))))
}

/// The report line of the sparsity at the end, with `[prune]` or GSM.
pub fn report_sparsity(pruning: Option<&SparsityReport>) -> Option<(&'static str, String)> {
    pruning.map(|p| {
        let zeros = format!(
            "{:.2}% of {} prunable weights are zero",
            100.0 * p.global_sparsity,
            p.prunable_params
        );
        ("sparsity", zeros)
    })
}

/// A count in K, M or B, for people.
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
