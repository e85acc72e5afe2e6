//! Where a model's weights come from, for `[init] from`, `trainer eval`, `generate` and `export`:
//! `hf:PATH` (a Hugging Face directory), a trainer checkpoint (`run/checkpoints/step-N`), or a
//! trainer run directory (its newest complete checkpoint). Trainer checkpoints take their
//! architecture from the run's `config.toml`.

use super::hf;
use super::params::ParamStore;
use super::transformer::{Transformer, TransformerConfig};
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::recipe::{self, ModelConfig};
use std::path::{Path, PathBuf};
use tch::Device;

#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Hf(PathBuf),
    /// A checkpoint directory and the run directory whose `config.toml` describes it.
    Checkpoint { dir: PathBuf, run_dir: PathBuf },
}

impl ModelSource {
    pub fn parse(text: &str) -> Result<ModelSource> {
        if let Some(path) = text.strip_prefix("hf:") {
            let dir = PathBuf::from(path);
            if !dir.join("config.json").is_file() {
                return Err(Error::Checkpoint {
                    path: dir,
                    msg: "no config.json here (expected a Hugging Face model directory)".into(),
                });
            }
            return Ok(ModelSource::Hf(dir));
        }
        let path = PathBuf::from(text);
        if path.join(checkpoint::STATE_FILE).is_file() {
            // run/checkpoints/step-N
            let run_dir = path
                .parent()
                .and_then(Path::parent)
                .map(Path::to_path_buf)
                .unwrap_or_default();
            return Ok(ModelSource::Checkpoint { dir: path, run_dir });
        }
        if path.join("config.toml").is_file() {
            let Some((_, dir)) = checkpoint::list_complete(&path).pop() else {
                return Err(Error::Checkpoint {
                    path,
                    msg: "this run directory has no complete checkpoint".into(),
                });
            };
            return Ok(ModelSource::Checkpoint { dir, run_dir: path });
        }
        Err(Error::Checkpoint {
            path,
            msg: "not a checkpoint (no state.json), a run directory (no config.toml), \
                  or hf:PATH"
                .into(),
        })
    }

    /// The architecture stored with the weights.
    pub fn model_config(&self) -> Result<ModelConfig> {
        match self {
            ModelSource::Hf(dir) => hf::read_config(dir),
            ModelSource::Checkpoint { run_dir, .. } => {
                let path = run_dir.join("config.toml");
                if !path.is_file() {
                    return Err(Error::Checkpoint {
                        path,
                        msg: "missing: the checkpoint's run directory has no config.toml".into(),
                    });
                }
                Ok(recipe::load(&path, &[])?.model)
            }
        }
    }

    /// Copies the weights into `params`, built from `config`.
    pub fn load_weights(&self, config: &TransformerConfig, params: &mut ParamStore) -> Result<()> {
        match self {
            ModelSource::Hf(dir) => hf::load_weights(dir, config, params),
            ModelSource::Checkpoint { dir, .. } => params.load(&dir.join(checkpoint::MODEL_FILE)),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            ModelSource::Hf(dir) => format!("hf:{}", dir.display()),
            ModelSource::Checkpoint { dir, .. } => dir.display().to_string(),
        }
    }
}

/// A model built and loaded from a source, ready for evaluation or generation.
pub struct Loaded {
    pub config: TransformerConfig,
    pub params: ParamStore,
    pub model: Transformer,
}

pub fn load(source: &ModelSource, device: Device) -> Result<Loaded> {
    let config = TransformerConfig::from_recipe(&source.model_config()?);
    let mut params = ParamStore::new(device);
    let model = Transformer::new(&config, &mut params);
    source.load_weights(&config, &mut params)?;
    Ok(Loaded { config, params, model })
}
