//! One readable file per training method. `harness.rs` is what the training loops share (set-up,
//! resume, run directory and log, checkpoint-or-stop, outcome, summary); `pretrain.rs` (also run
//! per stage by `stages.rs`) and `classify.rs` each hold their task's model, step and log rows.

pub mod classify;
pub mod evaluate;
pub mod harness;
pub mod pretrain;
pub mod run_dir;
pub mod soup;
pub mod stages;
