//! The run directory's life cycle, shared by every training recipe: its lock, whether a
//! directory already holds a run, which checkpoint a start resumes from, writing the resolved recipe without
//! losing an earlier one, and the peak memory a run reports.

use super::harness::Resume;
use crate::checkpoint;
use crate::error::{io_err, Error, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::Device;

/// The run directory's lock file: an advisory `flock` held by rank 0 for the life of a run.
pub const LOCK_FILE: &str = ".lock";

/// An exclusive lock on a run directory, held until dropped. It is the kernel's `flock` on
/// `out_dir/.lock`: released when the process exits however it exits, so a stale lock of a
/// dead process never blocks a resume. Works on local filesystems and on NFSv4 and Lustre
/// mounted with locking; where the filesystem has no locks (NFSv3 without lockd, some FUSE
/// mounts) taking it fails with the filesystem's error instead of pretending.
pub struct RunLock {
    file: std::fs::File,
    dir: PathBuf,
    /// The directory did not exist before this lock: a start that fails before writing
    /// anything else removes it again (nothing written).
    created: bool,
}

impl RunLock {
    /// Takes the lock of `run_dir` (created if missing). While another process holds it, waits
    /// up to `wait` (polling once a second; a Slurm requeue may start while the old job's tasks
    /// are still writing their last checkpoint), then fails in one line naming the host and PID
    /// of the holder.
    pub fn acquire(run_dir: &Path, wait: Duration) -> Result<RunLock> {
        let created = !run_dir.exists();
        std::fs::create_dir_all(run_dir)
            .map_err(io_err(format!("creating {}", run_dir.display())))?;
        let path = run_dir.join(LOCK_FILE);
        let deadline = Instant::now() + wait;
        let mut said_waiting = false;
        // A holder that gives up on a fresh directory removes its lock file (see Drop): whoever
        // locked the removed file retries on the new one, so two never hold "the" lock.
        let mut retries = 0;
        while retries < 100 {
            let file = match lock_file(run_dir, &path) {
                Ok(file) => file,
                Err(Held(holder)) if Instant::now() < deadline => {
                    if !said_waiting {
                        tracing::warn!(
                            "{}: in use by another run ({holder}); waiting up to {} s for it to end",
                            run_dir.display(),
                            wait.as_secs()
                        );
                        said_waiting = true;
                    }
                    std::thread::sleep(POLL.min(deadline - Instant::now()));
                    continue;
                }
                Err(Held(holder)) => return Err(held_error(run_dir, &holder, wait)),
                Err(Failed(e)) => return Err(e),
            };
            retries += 1;
            if same_file(&path, &file) {
                let lock = RunLock {
                    file,
                    dir: run_dir.to_path_buf(),
                    created,
                };
                lock.write_holder();
                return Ok(lock);
            }
        }
        Err(Error::RunDir {
            path: run_dir.to_path_buf(),
            msg: format!("{LOCK_FILE} keeps being removed while this run takes it"),
        })
    }

    /// Records who holds the lock, for the error of the next process that tries.
    fn write_holder(&self) {
        use std::io::{Seek, Write};
        let me = format!("host {}, pid {}", hostname(), std::process::id());
        let mut f = &self.file;
        let _ = f.set_len(0);
        let _ = f.seek(std::io::SeekFrom::Start(0));
        let _ = f.write_all(me.as_bytes());
        let _ = f.sync_all();
    }
}

impl Drop for RunLock {
    /// A start that failed before writing anything leaves nothing behind: the lock file goes,
    /// and the directory too when this start created it. The lock is released after (when the
    /// file closes), so no other process can have started writing in between.
    fn drop(&mut self) {
        let only_the_lock = std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .all(|e| e.file_name() == LOCK_FILE)
            })
            .unwrap_or(false);
        if only_the_lock {
            let _ = std::fs::remove_file(self.dir.join(LOCK_FILE));
            if self.created {
                let _ = std::fs::remove_dir(&self.dir);
            }
        }
    }
}

/// Why `lock_file` did not lock.
enum NotLocked {
    /// Another process holds the lock: who (as it wrote it), possibly empty.
    Held(String),
    Failed(Error),
}
use NotLocked::{Failed, Held};

/// How often a waiting start tries the lock again.
const POLL: Duration = Duration::from_secs(1);

/// Opens `path` and takes its exclusive lock without waiting.
fn lock_file(run_dir: &Path, path: &Path) -> std::result::Result<std::fs::File, NotLocked> {
    use std::io::Read;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| Failed(io_err(format!("opening {}", path.display()))(e)))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            Err(Held(holder.trim().to_string()))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(Failed(Error::RunDir {
            path: run_dir.to_path_buf(),
            msg: format!("cannot lock {LOCK_FILE}: {e} (a filesystem without locks?)"),
        })),
    }
}

/// The one line of a start that found the run directory in use (after waiting `waited`).
fn held_error(run_dir: &Path, holder: &str, waited: Duration) -> Error {
    let holder = if holder.is_empty() {
        "holder unknown"
    } else {
        holder
    };
    let advice = if waited.is_zero() {
        "wait for it to end (--wait-for-lock SECONDS waits here), or choose another run.out_dir"
            .to_string()
    } else {
        format!(
            "still held after waiting {} s; choose another run.out_dir",
            waited.as_secs()
        )
    };
    Error::RunDir {
        path: run_dir.to_path_buf(),
        msg: format!("is in use by another run ({holder}); {advice}"),
    }
}

/// Whether `path` still names the file `file` has open (not removed or replaced meanwhile).
fn same_file(path: &Path, file: &std::fs::File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
}

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
            let complete = checkpoint::list_complete(run_dir);
            if complete.is_empty() && holds_run(run_dir) {
                tracing::warn!(
                    "{} holds a run without a complete checkpoint; starting it from step 0",
                    run_dir.display()
                );
            }
            newest_intact(&complete).map(|c| c.map(|(_, p)| p))
        }
        Resume::From(dir) => {
            checkpoint::read_state(dir)?;
            verified(dir)?;
            Ok(Some(dir.clone()))
        }
    }
}

/// The newest of `complete` (oldest first) whose files match their checksums; a corrupt one is
/// skipped with a warning naming what failed. All of them corrupt is an error: starting over
/// would throw the run away.
pub fn newest_intact(complete: &[(i64, PathBuf)]) -> Result<Option<(i64, PathBuf)>> {
    let mut newest_error = None;
    for (step, dir) in complete.iter().rev() {
        match verified(dir) {
            Ok(()) => return Ok(Some((*step, dir.clone()))),
            Err(e) => {
                tracing::warn!("not resuming from {}: {e}", dir.display());
                newest_error.get_or_insert(e);
            }
        }
    }
    match newest_error {
        Some(e) => Err(Error::RunDir {
            path: complete.last().map(|(_, p)| p.clone()).unwrap_or_default(),
            msg: format!("no intact checkpoint to resume from (the newest: {e})"),
        }),
        None => Ok(None),
    }
}

/// Checks a checkpoint's files against its checksums; one written before checksums existed
/// is accepted with a warning.
fn verified(dir: &Path) -> Result<()> {
    if checkpoint::verify(dir, None)? == checkpoint::Verified::Unverified {
        tracing::warn!(
            "{} has no {}: written before checksums, not verified",
            dir.display(),
            checkpoint::CHECKSUMS_FILE
        );
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_is_exclusive_and_a_failed_fresh_start_leaves_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("run");
        let first = RunLock::acquire(&dir, Duration::ZERO).expect("free");
        let holder = std::fs::read_to_string(dir.join(LOCK_FILE)).expect("holder");
        assert!(
            holder.contains(&format!("pid {}", std::process::id())),
            "{holder}"
        );
        let e = RunLock::acquire(&dir, Duration::ZERO)
            .err()
            .expect("held")
            .to_string();
        assert!(
            e.contains("in use by another run") && e.contains(&holder),
            "{e}"
        );
        // Nothing but the lock was written: the directory it created goes with it.
        drop(first);
        assert!(!dir.exists());
        // A directory with a run in it keeps everything, the lock file included.
        let lock = RunLock::acquire(&dir, Duration::ZERO).expect("free again");
        std::fs::write(dir.join("config.toml"), "x").expect("write");
        drop(lock);
        assert!(dir.join("config.toml").is_file() && dir.join(LOCK_FILE).is_file());
        RunLock::acquire(&dir, Duration::ZERO).expect("a released lock is free");
    }

    #[test]
    fn a_waiting_start_takes_the_lock_when_its_holder_lets_go_or_gives_up_in_one_line() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("run");
        let holder = RunLock::acquire(&dir, Duration::ZERO).expect("free");
        std::fs::write(dir.join("config.toml"), "x").expect("write");
        let e = RunLock::acquire(&dir, Duration::from_millis(300))
            .err()
            .expect("still held")
            .to_string();
        assert!(e.contains("still held after waiting 0 s"), "{e}");
        let released = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            drop(holder);
        });
        let start = Instant::now();
        RunLock::acquire(&dir, Duration::from_secs(60)).expect("taken once released");
        assert!(start.elapsed() >= Duration::from_millis(400));
        released.join().expect("thread");
    }
}
