//! Running a `[[stages]]` recipe (parsed by `config/stages.rs`): the stages in order as one
//! run, in one run directory, with one step counter.
//!
//! How a stage runs: it is an ordinary pretraining run of `train.max_steps = start + steps` whose
//! schedule is the stage's own, counted from the stage's first step (a stage's warmup starts at
//! its start), and whose mixture fractions are counted over the stage alone. A stage after the
//! first continues from the checkpoint that the previous stage wrote at its last step (weights,
//! optimizer state, step), exactly as `--resume auto` does. So a run interrupted anywhere
//! continues with `--resume auto`: the newest checkpoint's step says which stage it is in, and
//! the losses are bitwise those of the uninterrupted run (on the CPU), as for one-stage runs.
//! The run directory's `config.toml` is the current stage's resolved recipe; each earlier
//! stage's is kept as `config.before-step-N.toml` (N: the step at which the next stage began).
//! Every row of `metrics.jsonl` (training and evaluation) carries the name of its stage as
//! `stage`, and summary.json lists the stages with the steps of their rows.

use super::harness::Resume;
use super::pretrain::{self, Outcome};
use crate::checkpoint;
use crate::config::Stage;
use crate::error::Result;
use crate::signals::StopFlag;
use std::time::Duration;

/// Runs the stages in order from where the run stands: a fresh run from stage 0; a resumed one
/// from the stage that holds the checkpoint's step. The run directory's lock is taken first
/// (waiting up to `wait_for_lock`) and held across all stages, so that the stage is judged from
/// checkpoints no other run is writing, and no other start slips in between two stages.
pub fn run(
    stages: &[Stage],
    resume: Resume,
    wait_for_lock: Duration,
    stop: &StopFlag,
) -> Result<Outcome> {
    let run_dir = &stages[0].recipe.run.out_dir;
    let _lock = super::harness::lock_run_dir(run_dir, wait_for_lock)?;
    let at_step = match &resume {
        Resume::No => 0,
        // The checkpoint `--resume auto` will take: the newest intact one.
        Resume::Auto => super::run_dir::newest_intact(&checkpoint::list_complete(run_dir))?
            .map_or(0, |(step, _)| step),
        Resume::From(dir) => checkpoint::read_state(dir)?.step,
    };
    let all: Vec<pretrain::StageSteps> = stages
        .iter()
        .map(|s| pretrain::StageSteps {
            name: s.name.clone(),
            steps: s.steps,
            first_step: s.start + 1,
            last_step: s.end(),
        })
        .collect();
    let mut resume = Some(resume);
    let mut outcome = None;
    for (k, stage) in stages.iter().enumerate() {
        if stage.end() <= at_step {
            continue;
        }
        tracing::info!(
            "stage {}/{} {:?}: steps {}..{}",
            k + 1,
            stages.len(),
            stage.name,
            stage.start,
            stage.end()
        );
        // The first stage run takes the caller's resume mode; later ones continue from the
        // checkpoint the previous stage wrote at its end.
        let mode = resume.take().unwrap_or(Resume::Auto);
        let at = pretrain::InStage {
            name: &stage.name,
            start: stage.start,
            all: &all,
        };
        match pretrain::run_from(&stage.recipe, mode, stop, Some(&at))? {
            Outcome::Finished(summary) => outcome = Some(Outcome::Finished(summary)),
            Outcome::AlreadyDone { step } => outcome = Some(Outcome::AlreadyDone { step }),
            interrupted @ Outcome::Interrupted { .. } => return Ok(interrupted),
        }
    }
    Ok(outcome.unwrap_or(Outcome::AlreadyDone { step: at_step }))
}
