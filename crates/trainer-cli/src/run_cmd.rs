//! `trainer run RECIPE [--set K=V]... [--resume auto|DIR] [--wait-for-lock SECONDS]`: trains a language-model recipe, a
//! `[[stages]]` recipe or a `task = "classify"` recipe. One reading of `--resume` and one ending
//! (exit code, summary) for all three.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use trainer::config::{self, AnyRecipe};
use trainer::signals::{StopFlag, EXIT_INTERRUPTED};
use trainer::train::harness::{self, Outcome, Resume, RunSummary};
use trainer::train::{classify, pretrain, stages};

pub fn run(
    path: &Path,
    set: &[String],
    resume: Option<&str>,
    wait_for_lock_s: u64,
) -> anyhow::Result<ExitCode> {
    let overrides = crate::parse_overrides(set)?;
    let resume = resume_mode(resume);
    let wait = Duration::from_secs(wait_for_lock_s);
    if let Some(stages) = trainer::config::stages::load(path, &overrides)? {
        let stop = install_stop()?;
        let outcome = stages::run(&stages, resume, wait, &stop)?;
        return Ok(finish(outcome, &stages[0].recipe.run.out_dir, ""));
    }
    match config::load_any(path, &overrides)? {
        AnyRecipe::Pretrain(recipe) => {
            let stop = install_stop()?;
            let outcome = pretrain::run(&recipe, resume, wait, &stop)?;
            let length = format!(" of {}", recipe.max_steps());
            Ok(finish(outcome, &recipe.run.out_dir, &length))
        }
        AnyRecipe::Classify(recipe) => {
            let stop = install_stop()?;
            let outcome = classify::run(&recipe, resume, wait, &stop)?;
            let length = format!(" ({})", recipe.describe_length());
            Ok(finish(outcome, &recipe.run.out_dir, &length))
        }
    }
}

/// `--resume`: absent, `auto`, or a checkpoint directory.
pub fn resume_mode(arg: Option<&str>) -> Resume {
    match arg {
        None => Resume::No,
        Some("auto") => Resume::Auto,
        Some(dir) => Resume::From(PathBuf::from(dir)),
    }
}

/// Signal handlers, installed once the recipe is known to be valid.
fn install_stop() -> anyhow::Result<StopFlag> {
    StopFlag::install().context("installing signal handlers")
}

/// The exit code of a run's outcome. A finished run's summary is printed by rank 0 (it speaks for
/// a multi-process run); `length` ends the "already done" line (e.g. " of 600").
pub fn finish<S: RunSummary>(outcome: Outcome<S>, run_dir: &Path, length: &str) -> ExitCode {
    match outcome {
        Outcome::Finished(summary) => {
            if trainer::dist::World::from_env().is_ok_and(|w| w.is_main()) {
                let mut lines = summary.report();
                lines.push(("run directory", run_dir.display().to_string()));
                harness::print_report(&lines);
            }
            ExitCode::SUCCESS
        }
        Outcome::Interrupted { .. } => ExitCode::from(EXIT_INTERRUPTED as u8),
        Outcome::AlreadyDone { step } => {
            tracing::info!(
                "{}: the run already reached step {step}{length}; nothing to do",
                run_dir.display()
            );
            ExitCode::SUCCESS
        }
    }
}
