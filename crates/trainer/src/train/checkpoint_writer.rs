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

use crate::checkpoint::{self, optimizer_shards, TrainState};
use crate::dist::DataParallel;
use crate::error::{Error, Result};
use crate::models::params::ParamStore;
use crate::optim::Optimizer;
use std::path::{Path, PathBuf};
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
    /// Where the model file's tensors come from when the weights are not whole on rank 0
    /// (`run.shard = "full"`: gathered a block at a time, every rank taking part); else
    /// `checkpoint::model_tensors`.
    model_source: Option<ModelSource>,
}

/// The model's tensors as host copies on rank 0 (nothing on the other ranks); called on every
/// rank.
pub type ModelSource = Box<dyn Fn(&ParamStore) -> Result<Vec<(String, Tensor)>>>;

/// What one checkpoint writes besides the masks, on the host.
struct Contents {
    run_dir: PathBuf,
    tmp: PathBuf,
    state: TrainState,
    /// The model (rank 0 only).
    model: Option<Vec<(String, Tensor)>>,
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
            model_source: None,
        }
    }

    /// `run.shard = "full"`: the model file's tensors come from `source` (see `ModelSource`).
    pub fn set_model_source(&mut self, source: ModelSource) {
        self.model_source = Some(source);
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
        let tmp = self.prepare(dp, run_dir, state.step)?;
        if main {
            checkpoint::write_masks(&tmp, params)?;
        }
        let model = match &self.model_source {
            Some(source) => Some(source(params)?),
            None => None,
        };
        let contents = Contents {
            run_dir: run_dir.to_path_buf(),
            tmp,
            state: state.clone(),
            model: main
                .then(|| model.unwrap_or_else(|| checkpoint::model_tensors(params, background))),
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

    /// The temporary directory the checkpoint of `step` is written into, created by rank 0 (its
    /// process id names it on every rank); sharded, every rank returns once it exists.
    fn prepare(&self, dp: &DataParallel, run_dir: &Path, step: i64) -> Result<PathBuf> {
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
            checkpoint::begin(run_dir, step, pid)?;
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

    /// This rank's share of the optimizer state.
    fn write_share(&self, rank: usize, world: usize) -> Result<()> {
        let share: Vec<(String, Tensor)> = self
            .optimizer
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        optimizer_shards::write_share(&self.tmp, rank, world, share)
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
        let model = self.model.unwrap_or_default();
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
