//! The training loops and the other tasks that produce a model, one readable file per task:
//! `pretrain` (language models, also each stage of `stages`), `classify` (images), `soup`
//! (weight averaging), `prune` (`trainer prune`: one-shot pruning of a saved model), `evaluate`
//! (held-out loss and generation); `run_dir` is the run directory they share. `harness.rs` is
//! what the training loops share (set-up, resume, run directory and log, checkpoint-or-stop,
//! outcome, summary); `pretrain.rs` and `classify.rs` each hold their task's model, step and
//! log rows.
//!
//! The top of the library: it imports `config/` and everything below it; nothing imports it but
//! `sweep/` and the CLI.

pub mod checkpoint_writer;
pub mod classify;
pub mod evaluate;
pub mod harness;
pub mod pretrain;
pub mod prune;
pub mod run_dir;
pub mod soup;
pub mod stages;
