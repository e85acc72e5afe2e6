//! `trainer verify RUN_OR_CHECKPOINT`: checks checkpoints against their checksums without
//! training. For a run directory, every complete checkpoint (`checkpoints/step-*`); for a
//! checkpoint directory, that one. One line per checkpoint: `ok` (every file matches its
//! SHA-256), `unverified` (written before checksums existed), or `CORRUPT` with what failed.
//! Exit status 1 when any checkpoint is corrupt, or when there is none to check.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use trainer::checkpoint::{self, Verified};

pub fn run(target: &Path) -> Result<ExitCode> {
    let dirs: Vec<PathBuf> = if target.join(checkpoint::STATE_FILE).is_file() {
        vec![target.to_path_buf()]
    } else if target.is_dir() {
        checkpoint::list_complete(target)
            .into_iter()
            .map(|(_, p)| p)
            .collect()
    } else {
        bail!("{}: no such run or checkpoint directory", target.display());
    };
    if dirs.is_empty() {
        bail!("{}: no complete checkpoint to verify", target.display());
    }
    let mut corrupt = 0;
    for dir in &dirs {
        match checkpoint::verify(dir, None) {
            Ok(Verified::Intact { files }) => println!("{}: ok ({files} files)", dir.display()),
            Ok(Verified::Unverified) => println!(
                "{}: unverified (no {}: written before checksums)",
                dir.display(),
                checkpoint::CHECKSUMS_FILE
            ),
            Err(e) => {
                corrupt += 1;
                println!("{}: CORRUPT: {e}", dir.display());
            }
        }
    }
    if corrupt > 0 {
        eprintln!(
            "error: {corrupt} of {} checkpoints failed verification",
            dirs.len()
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
