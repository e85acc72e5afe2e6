//! Models, one file per family, and the parameter store they register their weights in.

pub mod hf;
pub mod load;
pub mod moe;
pub mod params;
pub mod resnet;
pub mod transformer;
