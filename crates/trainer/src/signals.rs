//! Stopping cleanly: SIGINT, SIGTERM and SIGUSR1 (Slurm's pre-emption warning with
//! `--signal=USR1@T`) set a flag; the training loop finishes the current step, writes a checkpoint
//! and exits with `EXIT_INTERRUPTED`. A second SIGINT exits at once (code 130).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Exit code after a signal-triggered stop with a checkpoint written: EX_TEMPFAIL from
/// sysexits.h, "try again later" (`--resume auto` continues the run).
pub const EXIT_INTERRUPTED: i32 = 75;

#[derive(Clone)]
pub struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    /// A flag that no signal sets (library use, tests).
    pub fn never() -> StopFlag {
        StopFlag(Arc::new(AtomicBool::new(false)))
    }

    /// Installs the handlers. Call once, early in `main`.
    pub fn install() -> std::io::Result<StopFlag> {
        use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
        let flag = Arc::new(AtomicBool::new(false));
        // Registered first so that it sees the flag before the handler below sets it: a SIGINT
        // that arrives when a stop is already pending exits immediately.
        signal_hook::flag::register_conditional_shutdown(SIGINT, 130, flag.clone())?;
        for sig in [SIGINT, SIGTERM, SIGUSR1] {
            signal_hook::flag::register(sig, flag.clone())?;
        }
        Ok(StopFlag(flag))
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
}
