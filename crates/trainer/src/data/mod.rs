//! Data: token sources (token files, text, JSONL, Parquet, the built-in corpus) and their
//! windows (`source`, `loader`, `mixture`); corpora tokenized into token files (`corpus`,
//! `tokenize`, `token_file`); chat and instruction samples rendered through chat templates
//! (`chat`, `sft`), packed or padded into rows; what a run reads, windows or samples, behind one
//! interface (`rows`); image datasets (CIFAR, folders, the built-in generated set) and their
//! augmented batches; how much each sequence of a batch counts in the loss (`reweight`).
//!
//! `config` holds `[data]` of both tasks (`DataConfig`, `ImageDataConfig`) and its checks.
//! Imports: `models/` (the per-token loss that `reweight` weighs), `validate`, `error`.

pub mod chat;
pub mod config;
pub mod corpus;
pub mod images;
pub mod loader;
pub mod mixture;
pub mod reweight;
pub mod rows;
pub mod sft;
pub mod source;
pub mod token_file;
pub mod tokenize;
pub mod tokenizer;

pub use config::{
    Cifar100Labels, DataConfig, ImageDataConfig, ImageSourceConfig, MixtureConfig, MixtureSource,
    SourceConfig, Split, TokenDtype, CIFAR10_MEAN, CIFAR10_STD,
};
