//! One readable file per training method.

pub mod evaluate;
pub mod pretrain;
