//! Checkpoints: `checkpoints/step-NNNNNNNN/{model.safetensors, optimizer.safetensors, state.json}`
//! (and `masks.safetensors` for a pruned model; a sharded run writes its optimizer state as one
//! file per rank with an index instead, `optimizer_shards.rs`, and with `run.shard = "full"`
//! every rank writes its weights into the one model file, `model_parts.rs`).
//!
//! A checkpoint is written into a temporary directory (`.tmp-step-NNNNNNNN-PID`) and renamed into
//! place once every file is complete and synced, so a reader never sees half of one; `state.json`
//! marks a directory complete, and `checksums.json` (written last) holds the SHA-256 of every
//! other file, `state.json` included, so that flipped bytes or an edited step are found on
//! resume (`verify`). Only the last `keep` complete checkpoints are kept; an older one is
//! deleted only after a newer one is complete, by renaming it out of the `step-*` names first,
//! so that a crash during the deletion leaves no half checkpoint that looks like one.
//!
//! Imports: `models/` (the parameter store) and `optim/` (an optimizer saves its own state);
//! above them, `load.rs`, `distill/` and `train/` read and write checkpoints.

use crate::error::{io_err, Error, Result};
use crate::models::params::ParamStore;
use crate::optim::Optimizer;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Tensor;

pub mod model_parts;
pub mod optimizer_shards;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";
/// Pruning masks of a pruned model (absent when nothing is pruned); see `ParamStore::set_mask`.
pub const MASKS_FILE: &str = "masks.safetensors";
/// SHA-256 of each file of the checkpoint (file name -> "sha256:HEX"), written last.
pub const CHECKSUMS_FILE: &str = "checksums.json";
/// Parameters that distillation adds to the student's store (its hidden-state projections,
/// `distill/`): saved and resumed with a checkpoint, left out when one is loaded as a model.
pub const DISTILL_PARAM_PREFIX: &str = "distill.";

/// Everything besides tensors that a resumed run needs. Data order and learning rate are pure
/// functions of (seed, step), so the step is the whole cursor.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub format: u32,
    /// Completed optimizer steps.
    pub step: i64,
    /// Training tokens consumed.
    pub tokens: i64,
    pub seed: u64,
    /// Wall-clock seconds spent training before this checkpoint (summed over resumes).
    pub train_seconds: f64,
    pub last_valid_loss: Option<f64>,
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

pub fn step_dir(run_dir: &Path, step: i64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!("step-{step:08}"))
}

/// Complete checkpoints (those with a `state.json`), oldest first.
pub fn list_complete(run_dir: &Path) -> Vec<(i64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(checkpoints_dir(run_dir)) else {
        return Vec::new();
    };
    let mut found: Vec<(i64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step: i64 = name.strip_prefix("step-")?.parse().ok()?;
            let path = e.path();
            path.join(STATE_FILE).is_file().then_some((step, path))
        })
        .collect();
    found.sort();
    found
}

/// Writes a checkpoint atomically and prunes old ones down to `keep`.
pub fn save(
    run_dir: &Path,
    state: &TrainState,
    params: &ParamStore,
    optimizer_state: Vec<(String, Tensor)>,
    keep: usize,
) -> Result<PathBuf> {
    let tmp = begin(run_dir, state.step, std::process::id())?;
    crate::optim::write_state(optimizer_state, &tmp.join(OPTIMIZER_FILE))?;
    sync_file(&tmp.join(OPTIMIZER_FILE))?;
    write_masks(&tmp, params)?;
    finish(
        run_dir,
        &tmp,
        state,
        Some(model_tensors(params, false)),
        keep,
    )
}

/// The model's tensors as a checkpoint writes them, on the host: views of those already there,
/// or with `copy` copies that training can no longer change (an asynchronous save).
pub fn model_tensors(params: &ParamStore, copy: bool) -> Vec<(String, Tensor)> {
    params
        .iter()
        .map(|p| (p.name.clone(), host_tensor(&p.tensor, copy)))
        .collect()
}

/// `t` on the host, detached: a view where it already is there unless `copy`. A device
/// tensor's copy for an asynchronous save (`copy`) lands in pinned (page-locked) host memory,
/// which the device copies into at full speed (pageable memory if pinning fails).
pub fn host_tensor(t: &Tensor, copy: bool) -> Tensor {
    let t = t.detach();
    match t.device() {
        tch::Device::Cpu if copy => t.copy(),
        tch::Device::Cpu => t,
        _ if copy => match torch_ext::empty_pinned_like(&t) {
            Ok(mut pinned) => {
                pinned.copy_(&t);
                pinned
            }
            Err(_) => t.to_device(tch::Device::Cpu),
        },
        _ => t.to_device(tch::Device::Cpu),
    }
}

/// The pruning masks of `params` (if any) into the checkpoint being written at `tmp`, synced.
pub fn write_masks(tmp: &Path, params: &ParamStore) -> Result<()> {
    params.save_masks(&tmp.join(MASKS_FILE))?;
    if params.has_masks() {
        sync_file(&tmp.join(MASKS_FILE))?;
    }
    Ok(())
}

/// The temporary directory a checkpoint of `step` is written into by the process (rank 0's)
/// `pid` before it is renamed into place.
pub fn tmp_dir(run_dir: &Path, step: i64, pid: u32) -> PathBuf {
    checkpoints_dir(run_dir).join(format!(".tmp-step-{step:08}-{pid}"))
}

/// Creates the temporary directory of a checkpoint (`tmp_dir`), after removing what an
/// interrupted write left: the first part of `save` (the writer of the run directory only).
pub fn begin(run_dir: &Path, step: i64, pid: u32) -> Result<PathBuf> {
    let parent = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&parent).map_err(io_err(format!("creating {}", parent.display())))?;
    remove_leftovers(&parent);
    let tmp = tmp_dir(run_dir, step, pid);
    std::fs::create_dir(&tmp).map_err(io_err(format!("creating {}", tmp.display())))?;
    Ok(tmp)
}

/// The rest of `save` once the optimizer state (one file, or every rank's, whose index is
/// written here) and the masks are in `tmp`: the model (`model_tensors`; None: the ranks
/// wrote it there already, `model_parts`) and the state, the checksums, then the rename into
/// place and the pruning of old checkpoints.
pub fn finish(
    run_dir: &Path,
    tmp: &Path,
    state: &TrainState,
    model: Option<Vec<(String, Tensor)>>,
    keep: usize,
) -> Result<PathBuf> {
    let final_dir = step_dir(run_dir, state.step);
    let parent = checkpoints_dir(run_dir);
    if let Some(model) = model {
        crate::models::params::write_safetensors(&model, &tmp.join(MODEL_FILE))?;
    }
    optimizer_shards::write_index(tmp)?;
    let json = serde_json::to_string_pretty(state).unwrap_or_default();
    write_synced(&tmp.join(STATE_FILE), json.as_bytes())?;
    sync_file(&tmp.join(MODEL_FILE))?;
    write_checksums(tmp)?;
    if final_dir.exists() {
        // A checkpoint of the same step exists (a run resumed from an older checkpoint and
        // reached this step again): it is replaced only now that the new one is complete.
        let old = parent.join(format!(
            ".old-step-{:08}-{}",
            state.step,
            std::process::id()
        ));
        std::fs::rename(&final_dir, &old)
            .map_err(io_err(format!("moving {}", final_dir.display())))?;
        std::fs::rename(tmp, &final_dir).map_err(io_err(format!("renaming {}", tmp.display())))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(tmp, &final_dir).map_err(io_err(format!("renaming {}", tmp.display())))?;
    }
    sync_dir(&parent);
    prune(run_dir, keep)?;
    Ok(final_dir)
}

/// Removes `.tmp-*` and `.old-*` directories left by a process that died while writing a
/// checkpoint. Only one process writes checkpoints into a run directory, so none is in use.
fn remove_leftovers(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        // A `step-*` without state.json is what a crash in the middle of a deletion by an
        // earlier version left (deletions now rename first).
        let half_deleted = name.starts_with("step-") && !e.path().join(STATE_FILE).exists();
        if name.starts_with(".tmp-step-")
            || name.starts_with(".old-step-")
            || name.starts_with(".del-step-")
            || half_deleted
        {
            tracing::info!(
                "removing {}, left by an interrupted checkpoint write",
                e.path().display()
            );
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn prune(run_dir: &Path, keep: usize) -> Result<()> {
    let all = list_complete(run_dir);
    if all.len() > keep {
        for (step, path) in &all[..all.len() - keep] {
            // Out of the `step-*` names first: a crash during the deletion leaves a `.del-*`
            // that the next start removes, never a half `step-*`.
            let doomed = checkpoints_dir(run_dir)
                .join(format!(".del-step-{step:08}-{}", std::process::id()));
            std::fs::rename(path, &doomed)
                .map_err(io_err(format!("moving {} away", path.display())))?;
            std::fs::remove_dir_all(&doomed)
                .map_err(io_err(format!("removing {}", doomed.display())))?;
        }
    }
    Ok(())
}

/// SHA-256 of a file's bytes, as `sha256:HEX`.
fn file_digest(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io_err(format!("reading {}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("sha256:{hex}"))
}

/// Writes `dir/checksums.json`: the SHA-256 of every other file of the checkpoint directory.
/// Every writer of a checkpoint directory calls it last (`save`, and the pruned and souped
/// checkpoints of `train/`).
pub fn write_checksums(dir: &Path) -> Result<()> {
    let mut sums = std::collections::BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(io_err(format!("listing {}", dir.display())))?;
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().to_string();
        if name != CHECKSUMS_FILE && e.path().is_file() {
            sums.insert(name, file_digest(&e.path())?);
        }
    }
    let json = serde_json::to_string_pretty(&sums).unwrap_or_default();
    write_synced(&dir.join(CHECKSUMS_FILE), json.as_bytes())
}

/// What `verify` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Every file listed in checksums.json has its recorded SHA-256.
    Intact { files: usize },
    /// No checksums.json: a checkpoint written before checksums existed, loaded as it is.
    Unverified,
}

/// Checks the files of checkpoint `dir` against its checksums.json (`only`: just these files,
/// e.g. the model file for an evaluation; None: every listed file). A mismatch, a listed file
/// that is missing, or a malformed checksums.json is an error naming the file.
pub fn verify(dir: &Path, only: Option<&[&str]>) -> Result<Verified> {
    let path = dir.join(CHECKSUMS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Verified::Unverified),
        Err(e) => {
            return Err(Error::Checkpoint {
                path,
                msg: format!("cannot read: {e}"),
            })
        }
    };
    let sums: std::collections::BTreeMap<String, String> =
        serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
            path: path.clone(),
            msg: format!("malformed {CHECKSUMS_FILE}: {e}"),
        })?;
    let mut files = 0;
    for (name, want) in &sums {
        if only.is_some_and(|only| !only.contains(&name.as_str())) {
            continue;
        }
        let file = dir.join(name);
        if !file.is_file() {
            return Err(Error::Checkpoint {
                path: file,
                msg: format!("missing, but listed in {CHECKSUMS_FILE}"),
            });
        }
        let got = file_digest(&file)?;
        if &got != want {
            return Err(Error::Checkpoint {
                path: file,
                msg: format!(
                    "checksum mismatch ({got}, {CHECKSUMS_FILE} says {want}): the file was \
                     corrupted or edited after it was written"
                ),
            });
        }
        files += 1;
    }
    Ok(Verified::Intact { files })
}

/// Reads `state.json` of a checkpoint directory.
pub fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Checkpoint {
        path: dir.to_path_buf(),
        msg: format!("cannot read {STATE_FILE}: {e} (not a complete checkpoint)"),
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: path.clone(),
        msg: format!("malformed {STATE_FILE}: {e}"),
    })
}

/// Loads model and optimizer state from a checkpoint directory; returns its train state.
pub fn load(
    dir: &Path,
    params: &mut ParamStore,
    optimizer: &mut Optimizer,
    optimizer_part: bool,
) -> Result<TrainState> {
    if !dir.is_dir() {
        return Err(Error::Checkpoint {
            path: dir.to_path_buf(),
            msg: "no such checkpoint directory".into(),
        });
    }
    let state = read_state(dir)?;
    params.load(&dir.join(MODEL_FILE))?;
    params.load_masks_if_present(&dir.join(MASKS_FILE))?;
    let wanted = optimizer_part.then(|| optimizer.state_names());
    let (tensors, path) = optimizer_shards::read(dir, wanted.as_ref())?;
    optimizer.load_named(tensors, &path)?;
    Ok(state)
}

pub(crate) fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).map_err(io_err(format!("creating {}", path.display())))?;
    f.write_all(bytes)
        .map_err(io_err(format!("writing {}", path.display())))?;
    f.sync_all()
        .map_err(io_err(format!("syncing {}", path.display())))
}

pub(crate) fn sync_file(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).map_err(io_err(format!("opening {}", path.display())))?;
    f.sync_all()
        .map_err(io_err(format!("syncing {}", path.display())))
}

fn sync_dir(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.sync_all();
    }
}
