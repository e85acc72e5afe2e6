//! Parameter-efficient fine-tuning: low-rank adapters on a frozen base model.
//!
//! - `lora`: LoRA (Hu et al. 2021) and LoRA-FA (Zhang et al. 2023), in Hugging Face peft's layout.

pub mod lora;
