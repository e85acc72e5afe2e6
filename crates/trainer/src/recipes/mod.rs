//! One readable file per training method.

pub mod classify;
pub mod evaluate;
pub mod harness;
pub mod pretrain;
pub mod run_dir;
pub mod soup;
pub mod stages;
