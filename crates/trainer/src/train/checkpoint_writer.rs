//! Writing a training run's checkpoints (`checkpoint/` holds the format): by rank 0 alone, or
//! with `run.shard` by every rank for its own share of the optimizer state
//! (`checkpoint/optimizer_shards.rs`) into the directory rank 0 prepares; now, or with
//! `train.async_checkpoints` from host copies on a background thread while training goes on.
//!
//! An asynchronous checkpoint is complete when its thread ends; at most one is in flight: the
//! next checkpoint, a stop and the end of the run wait for it first (`wait`), and an error it
//! met is theirs. The last checkpoint of a run and one written on a signal are written now. In
//! a sharded run, rank 0's thread waits for a marker file from each other rank's thread (the
//! threads run no collectives, which would interleave with the training loop's) before it adds
//! the model and the index and renames the directory into place.
//!
//! With `run.shard = "full"` no rank holds the whole model: rank 0 creates the model file with its
//! header and every rank writes the weights it holds into it (`checkpoint::model_parts`), beside
//! its share of the optimizer state.

use crate::checkpoint::model_parts::ModelLayout;
use crate::checkpoint::{self, optimizer_shards, TrainState};
use crate::dist::DataParallel;
use crate::error::{Error, Result};
use crate::models::params::ParamStore;
use crate::optim::Optimizer;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tch::Tensor;

/// How a run writes its checkpoints.
pub struct CheckpointWriter {
    /// `train.async_checkpoints`.
    background: bool,
    /// `run.shard` over several ranks: every rank writes its share of the optimizer state.
    sharded: bool,
    /// `train.keep_checkpoints`.
    keep: usize,
    /// How long rank 0's thread waits for the other ranks' shares (`run.collective_timeout_s`).
    timeout: Duration,
    /// The checkpoint being written in the background.
    pending: Option<JoinHandle<Result<()>>>,
    /// `run.shard = "full"`: the tensors this rank writes into the model file, which every rank
    /// writes its part of; else rank 0 writes it whole (`checkpoint::model_tensors`).
    model_part: Option<ModelPart>,
}

/// The tensors of the model file this rank writes (those it holds the values of); called on
/// every rank.
pub type ModelPart = Box<dyn Fn(&ParamStore) -> Result<Vec<(String, Tensor)>>>;

/// The model's tensors one process writes.
enum ModelTensors {
    /// None (a rank other than 0 without `run.shard = "full"`).
    None,
    /// All of them, into a new file (rank 0).
    Whole(Vec<(String, Tensor)>),
    /// This rank's part of the file rank 0 created with this layout.
    Part(Arc<ModelLayout>, Vec<(String, Tensor)>),
}

/// What one checkpoint writes besides the masks, on the host.
struct Contents {
    run_dir: PathBuf,
    tmp: PathBuf,
    state: TrainState,
    model: ModelTensors,
    optimizer: Vec<(String, Tensor)>,
    keep: usize,
}

impl CheckpointWriter {
    pub fn new(background: bool, sharded: bool, keep: usize, timeout: Duration) -> Self {
        CheckpointWriter {
            background,
            sharded,
            keep,
            timeout,
            pending: None,
            model_part: None,
        }
    }

    /// `run.shard = "full"`: every rank writes `part` of the model file (see `ModelPart`).
    pub fn set_model_part(&mut self, part: ModelPart) {
        self.model_part = Some(part);
    }

    /// Writes the checkpoint of `state` and returns its directory: complete on return when
    /// `now` (the run ends or stops here) or the run writes synchronously, else once its thread
    /// ends (`wait`). With `now`, the other ranks leave only once it is on disk, or learn that
    /// rank 0 failed.
    pub fn save(
        &mut self,
        dp: &DataParallel,
        run_dir: &Path,
        state: &TrainState,
        params: &ParamStore,
        optimizer: &Optimizer,
        now: bool,
    ) -> Result<PathBuf> {
        self.wait()?;
        let background = self.background && !now;
        let main = dp.world.is_main();
        let step_dir = checkpoint::step_dir(run_dir, state.step);
        if !self.sharded && !main {
            if now {
                dp.barrier()?; // rank 0 writes it
            }
            return Ok(step_dir);
        }
        let layout = match self.model_part {
            Some(_) => Some(Arc::new(ModelLayout::of(params)?)),
            None => None,
        };
        let tmp = self.prepare(dp, run_dir, state.step, layout.as_deref())?;
        if main {
            checkpoint::write_masks(&tmp, params)?;
        }
        let model = match (&self.model_part, layout) {
            (Some(part), Some(layout)) => ModelTensors::Part(
                layout.clone(),
                self.part(dp, &layout, part, params, background)?,
            ),
            _ if main => ModelTensors::Whole(checkpoint::model_tensors(params, background)),
            _ => ModelTensors::None,
        };
        let contents = Contents {
            run_dir: run_dir.to_path_buf(),
            tmp,
            state: state.clone(),
            model,
            optimizer: optimizer
                .state_tensors()
                .into_iter()
                .map(|(n, t)| (n, checkpoint::host_tensor(&t, background)))
                .collect(),
            keep: self.keep,
        };
        let (rank, world) = (dp.world.rank, dp.world.size);
        if !self.sharded {
            match background {
                true => self.pending = Some(std::thread::spawn(move || contents.write_whole())),
                false => contents.write_whole()?,
            }
        } else if background {
            let timeout = self.timeout;
            self.pending = Some(std::thread::spawn(move || {
                contents.write_share_in_background(rank, world, timeout)
            }));
        } else {
            contents.write_share(rank, world)?;
            dp.barrier()?;
            if main {
                contents.finish()?;
            }
        }
        if now {
            dp.barrier()?; // nothing for a single process
        }
        Ok(step_dir)
    }

    /// Waits for the checkpoint being written in the background, if any: its error is this
    /// call's.
    pub fn wait(&mut self) -> Result<()> {
        match self.pending.take() {
            None => Ok(()),
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(Error::Torch("the checkpoint writer panicked".into()))),
        }
    }

    /// This rank's part of the model file as host tensors (copies with `background`); an error
    /// on every rank unless the ranks' parts fill the file exactly (a tensor held by no rank,
    /// or by two).
    fn part(
        &self,
        dp: &DataParallel,
        layout: &ModelLayout,
        part: &ModelPart,
        params: &ParamStore,
        background: bool,
    ) -> Result<Vec<(String, Tensor)>> {
        let part: Vec<(String, Tensor)> = part(params)?
            .into_iter()
            .map(|(n, t)| (n, checkpoint::host_tensor(&t, background)))
            .collect();
        let mut bytes = [layout.part_bytes(&part) as f64];
        dp.sum(&mut bytes)?;
        if bytes[0] != layout.data_bytes() as f64 {
            return Err(Error::Torch(format!(
                "checkpoint: the ranks hold {} of the model file's {} bytes",
                bytes[0],
                layout.data_bytes()
            )));
        }
        Ok(part)
    }

    /// The temporary directory the checkpoint of `step` is written into, created by rank 0 (its
    /// process id names it on every rank), with the model file of `layout` in it if given;
    /// sharded, every rank returns once it exists.
    fn prepare(
        &self,
        dp: &DataParallel,
        run_dir: &Path,
        step: i64,
        layout: Option<&ModelLayout>,
    ) -> Result<PathBuf> {
        let mut pid = [if dp.world.is_main() {
            f64::from(std::process::id())
        } else {
            0.0
        }];
        if self.sharded {
            dp.sum(&mut pid)?;
        }
        let pid = pid[0] as u32;
        if dp.world.is_main() {
            let tmp = checkpoint::begin(run_dir, step, pid)?;
            if let Some(layout) = layout {
                layout.create(&tmp.join(checkpoint::MODEL_FILE))?;
            }
        }
        if self.sharded {
            dp.barrier()?;
        }
        Ok(checkpoint::tmp_dir(run_dir, step, pid))
    }
}

impl Contents {
    /// One process writes it all: the optimizer file, then the model and the rest.
    fn write_whole(mut self) -> Result<()> {
        let file = self.tmp.join(checkpoint::OPTIMIZER_FILE);
        crate::optim::write_state(std::mem::take(&mut self.optimizer), &file)?;
        checkpoint::sync_file(&file)?;
        self.finish()
    }

    /// This rank's share of the optimizer state, and its part of the model file if it writes
    /// one.
    fn write_share(&self, rank: usize, world: usize) -> Result<()> {
        let share: Vec<(String, Tensor)> = self
            .optimizer
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        optimizer_shards::write_share(&self.tmp, rank, world, share)?;
        if let ModelTensors::Part(layout, part) = &self.model {
            layout.write_part(&self.tmp.join(checkpoint::MODEL_FILE), part)?;
        }
        Ok(())
    }

    /// An asynchronous sharded checkpoint: this rank's share; then rank 0 waits for every
    /// other rank's marker (up to `timeout`) and finishes it, while the others leave theirs.
    fn write_share_in_background(self, rank: usize, world: usize, timeout: Duration) -> Result<()> {
        self.write_share(rank, world)?;
        if rank != 0 {
            return checkpoint::write_synced(&marker(&self.tmp, rank), b"");
        }
        wait_for_shares(&self.tmp, world, timeout, self.state.step)?;
        self.finish()
    }

    /// Rank 0, once the optimizer state is in place: the model, the index and the rest, then
    /// the rename into place.
    fn finish(self) -> Result<()> {
        let model = match self.model {
            ModelTensors::Whole(model) => Some(model),
            ModelTensors::Part(..) => None, // every rank wrote its part already
            ModelTensors::None => {
                return Err(Error::Torch(
                    "checkpoint: rank 0 has no model to write".into(),
                ))
            }
        };
        checkpoint::finish(&self.run_dir, &self.tmp, &self.state, model, self.keep)?;
        Ok(())
    }
}

/// The file an asynchronous writer of rank `rank` leaves in `tmp` once its share is there.
fn marker(tmp: &Path, rank: usize) -> PathBuf {
    tmp.join(format!(".rank{rank:05}.written"))
}

/// Rank 0's writer: waits until every other rank's marker is in `tmp`, then removes them.
fn wait_for_shares(tmp: &Path, world: usize, timeout: Duration, step: i64) -> Result<()> {
    let start = Instant::now();
    for r in 1..world {
        while !marker(tmp, r).is_file() {
            if start.elapsed() > timeout {
                return Err(Error::Checkpoint {
                    path: tmp.to_path_buf(),
                    msg: format!(
                        "checkpoint of step {step}: rank {r} did not write its share within {} s \
                         (run.collective_timeout_s)",
                        timeout.as_secs_f64()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for r in 1..world {
        let _ = std::fs::remove_file(marker(tmp, r));
    }
    Ok(())
}
