//! The trainer's building blocks: one concept per module, one file per model or method.
//! See DESIGN.md (shared) for the architecture and the contracts between modules.
//!
//! Imports go one way, from the top of this map to the bottom; no module imports one above it
//! (`shared/tools/module-graph` checks that the folder graph has no cycle):
//!
//! - `sweep/`: seeds-and-grid sweeps over recipes, each point a run of `train/`.
//! - `train/`: the training loops, one file per task (pretrain, classify, stages, soup,
//!   evaluate) on a shared run harness (run directory, resume, checkpoint-or-stop, summary).
//! - `config/`: reads `configs/*.toml`, applies `--set`, locates errors, composes the
//!   components' sections into a recipe; owns only the loop's own sections (`[run]`, `[init]`,
//!   `[train]`) and the `[[stages]]` format.
//! - `load.rs`: a model from `hf:DIR`, a run or a checkpoint, with its LoRA adapters and masks.
//! - methods, each with its `config.rs`: `distill/` (teacher, losses), `checkpoint/` (the
//!   on-disk layout, atomic writes, checksums; it saves optimizer state), `peft/` (LoRA,
//!   ReLoRA), `prune/`, `optim/` (optimizers that own their state), `dist.rs` (c10d data
//!   parallelism), `shard.rs` and `flat_shard.rs` (the training state divided among ranks:
//!   whole tensors, or equal slices of flat buckets).
//! - `models/`: `transformer.rs` (the decoders: Llama and its Hugging Face variants, GPT-2,
//!   GPT-NeoX), `moe.rs`, `rope.rs`, `resnet.rs`, `config.rs` for `[model]`, `hf/` (one
//!   config.json reader and writer per family), `params.rs` (the parameter store and the one
//!   name-pattern rule).
//! - leaves with their own config types: `data/`, `schedule/`, `metrics/`.
//! - the ground floor: `validate.rs` (range checks that name their key), `error.rs`,
//!   `device.rs` (devices and `run.precision`), `memory.rs` (will it fit), `signals.rs`.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod device;
pub mod dist;
pub mod distill;
pub mod error;
pub mod flat_shard;
pub mod load;
pub mod memory;
pub mod metrics;
pub mod models;
pub mod optim;
pub mod peft;
pub mod prune;
pub mod schedule;
pub mod shard;
pub mod signals;
pub mod sweep;
pub mod train;
pub mod validate;

pub use error::{Error, Result};
