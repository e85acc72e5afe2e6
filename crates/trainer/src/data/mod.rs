//! Data: token sources (token files, text, the built-in corpus) and their batches; image
//! datasets (CIFAR, folders, the built-in generated set) and their augmented batches; how much
//! each sequence of a batch counts in the loss (`reweight`).

pub mod images;
pub mod loader;
pub mod mixture;
pub mod reweight;
pub mod source;
pub mod tokenizer;
