//! Parameter-efficient fine-tuning: low-rank adapters on a frozen base model.
//!
//! - `config`: the `[peft]` section (`PeftConfig`).
//! - `lora`: LoRA (Hu et al. 2021) and LoRA-FA (Zhang et al. 2023), in Hugging Face peft's layout.
//! - `relora`: ReLoRA (Lialin et al. 2023): LoRA merged into the base and restarted periodically.
//!
//! Imports: `models/` (the linear layers' adapter hook, the parameter store), `optim/` (ReLoRA
//! resets the adapters' optimizer state), `validate`, `error`.

pub mod config;
pub mod lora;
pub mod relora;

pub use config::{OptimizerReset, PeftConfig, PeftKind};

/// Serialises the peft tests that seed and draw from torch's global generator (the test harness
/// runs tests on parallel threads; a draw from another test between `manual_seed` and a model's
/// initialisation would change its weights).
#[cfg(test)]
pub(crate) static TEST_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
