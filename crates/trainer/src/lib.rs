//! The trainer's building blocks: one concept per module, one file per model or method.
//! See DESIGN.md (shared) for the architecture and the contracts between modules.

pub mod checkpoint;
pub mod data;
pub mod device;
pub mod dist;
pub mod distill;
pub mod error;
pub mod metrics;
pub mod models;
pub mod optim;
pub mod peft;
pub mod prune;
pub mod recipe;
pub mod recipes;
pub mod schedule;
pub mod signals;
pub mod sweep;

pub use error::{Error, Result};
