//! Parameter-efficient fine-tuning: low-rank adapters on a frozen base model.
//!
//! - `lora`: LoRA (Hu et al. 2021) and LoRA-FA (Zhang et al. 2023), in Hugging Face peft's layout.

//! - `relora`: ReLoRA (Lialin et al. 2023): LoRA merged into the base and restarted periodically.

pub mod lora;
pub mod relora;

/// Serialises the peft tests that seed and draw from torch's global generator (the test harness
/// runs tests on parallel threads; a draw from another test between `manual_seed` and a model's
/// initialisation would change its weights).
#[cfg(test)]
pub(crate) static TEST_RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
