//! Token data: sources (token files, text, the built-in corpus) and batching.

pub mod loader;
pub mod source;
