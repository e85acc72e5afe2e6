//! The run directory's life cycle, shared by every training recipe: whether a directory already
//! holds a run, which checkpoint a start resumes from, writing the resolved recipe without
//! losing an earlier one, and the peak memory a run reports.

use super::harness::Resume;
use crate::checkpoint;
use crate::error::{io_err, Error, Result};
use std::path::{Path, PathBuf};
use tch::Device;

/// True when `dir` already holds (part of) a run.
pub fn holds_run(dir: &Path) -> bool {
    [
        "config.toml",
        "metrics.jsonl",
        "checkpoints",
        "summary.json",
    ]
    .iter()
    .any(|f| dir.join(f).exists())
}

/// The checkpoint to resume from, after checking the run directory against the resume mode.
pub fn resume_checkpoint(run_dir: &Path, resume: &Resume) -> Result<Option<PathBuf>> {
    match resume {
        Resume::No if holds_run(run_dir) => Err(Error::RunDir {
            path: run_dir.to_path_buf(),
            msg: "already holds a run; continue it with --resume auto, or choose another run.out_dir \
                  (e.g. --set run.out_dir=...)"
                .into(),
        }),
        Resume::No => Ok(None),
        Resume::Auto => {
            let newest = checkpoint::list_complete(run_dir).pop().map(|(_, p)| p);
            if newest.is_none() && holds_run(run_dir) {
                tracing::warn!(
                    "{} holds a run without a complete checkpoint; starting it from step 0",
                    run_dir.display()
                );
            }
            Ok(newest)
        }
        Resume::From(dir) => {
            checkpoint::read_state(dir)?;
            Ok(Some(dir.clone()))
        }
    }
}

/// Creates the run directory and writes the resolved recipe. On resume, a `config.toml` that
/// differs from the recipe now in force is kept as `config.before-step-N.toml`, not overwritten.
pub fn prepare_run_dir(run_dir: &Path, resolved_recipe: &str, step: i64) -> Result<()> {
    std::fs::create_dir_all(run_dir).map_err(io_err(format!("creating {}", run_dir.display())))?;
    let path = run_dir.join("config.toml");
    let text = resolved_recipe.to_string();
    if let Ok(old) = std::fs::read_to_string(&path) {
        if old == text {
            return Ok(());
        }
        let kept = run_dir.join(format!("config.before-step-{step}.toml"));
        std::fs::rename(&path, &kept).map_err(io_err(format!("renaming {}", path.display())))?;
        tracing::warn!(
            "the recipe changed since the last start; the old one is kept as {}",
            kept.display()
        );
    }
    std::fs::write(&path, text).map_err(io_err(format!("writing {}", path.display())))
}

/// Writes the checkpoint of `state` from rank 0 (every rank holds the same weights and optimizer
/// state) and returns its directory. With `last` (the run ends or stops here), the other ranks
/// leave only once it is on disk, or learn that rank 0 failed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn save_checkpoint(
    dp: &crate::dist::DataParallel,
    run_dir: &Path,
    state: &checkpoint::TrainState,
    params: &crate::models::params::ParamStore,
    optimizer: &crate::optim::Optimizer,
    keep: i64,
    last: bool,
) -> Result<PathBuf> {
    let dir = if dp.world.is_main() {
        checkpoint::save(run_dir, state, params, optimizer, keep as usize)?
    } else {
        checkpoint::step_dir(run_dir, state.step)
    };
    if last {
        dp.barrier()?; // nothing for a single process
    }
    Ok(dir)
}

pub fn peak_memory(device: Device) -> (Option<i64>, String) {
    match device {
        Device::Cuda(i) => match torch_ext::accelerator_memory(i) {
            Ok(m) => (Some(m.peak_allocated), "cuda_peak_allocated".into()),
            Err(_) => (None, "unavailable".into()),
        },
        _ => (peak_rss(), "process_peak_rss".into()),
    }
}

/// VmHWM of /proc/self/status (Linux), in bytes.
fn peak_rss() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
