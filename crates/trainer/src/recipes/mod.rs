//! One readable file per training method.

pub mod pretrain;
