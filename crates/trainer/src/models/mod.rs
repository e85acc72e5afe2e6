//! Models, one file per family, and the parameter store they register their weights in.
//!
//! - `config`: `[model]` (`ModelConfig` for language models, one type per family;
//!   `ClassifierConfig` for image classifiers) and its range checks.
//! - `transformer`: the decoder families (Llama and its variants, GPT-2) with MoE layers from
//!   `moe` and rotary embeddings from `rope`.
//! - `resnet`: ResNets and Wide ResNets.
//! - `hf`: Hugging Face `config.json` and safetensors names, in and out.
//! - `params`: the parameter store, and the one name-pattern rule every `target`/`prunable`
//!   list uses.
//!
//! Imports: only `validate`, `error` and `device` below it. Models know nothing of adapters,
//! recipes or checkpoints: LoRA wraps a `Linear` through the `LinearAdapter` hook that
//! `transformer.rs` exposes (`peft/` implements it), and loading from a run or checkpoint is
//! `load.rs`, above.

pub mod config;
pub mod hf;
pub mod mapped;
pub mod moe;
pub mod params;
pub mod resnet;
pub mod rope;
pub mod transformer;

pub use config::{
    ClassifierConfig, DecoderFamily, Gpt2Config, GptNeoxConfig, LayerType, LlamaConfig, ModelConfig,
};
pub use moe::{MoeConfig, Routing};
