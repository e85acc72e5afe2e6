//! Where a model's weights come from, for `[init] from`, `trainer eval`, `generate` and `export`:
//! `hf:PATH` (a Hugging Face directory), a trainer checkpoint (`run/checkpoints/step-N`), or a
//! trainer run directory (its newest complete checkpoint). Trainer checkpoints take their
//! architecture (and LoRA adapters) from the run's `config.toml`.
//!
//! This sits above `models/` because it needs checkpoints, adapters (`peft/`) and the config
//! types; `config/` and `train/` import it, and it imports neither.

use crate::checkpoint;
use crate::error::{one_line, Error, Result};
use crate::models::hf;
use crate::models::mapped::{self, Stored};
use crate::models::params::{copy_named, ParamStore};
use crate::models::transformer::{Transformer, TransformerConfig};
use crate::models::{ClassifierConfig, ModelConfig};
use crate::peft::PeftConfig;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Device;

/// The directory of `hf:PATH`: PATH itself when it holds a config.json, else, for a repository
/// id `ORG/NAME`, its snapshot in the local Hugging Face hub cache, found the way transformers
/// finds it offline: `models--ORG--NAME/snapshots/<the revision in refs/main>` under
/// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`. Nothing is downloaded.
fn resolve_hf(path: &str) -> Result<PathBuf> {
    let dir = PathBuf::from(path);
    if dir.join("config.json").is_file() {
        return Ok(dir);
    }
    let parts: Vec<&str> = path.split('/').collect();
    let repo_id = parts.len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && !p.starts_with('.') && !p.contains('\\'));
    let Some(cache) = hub_cache().filter(|_| repo_id) else {
        return Err(Error::Checkpoint {
            path: dir,
            msg: "no config.json here (expected a Hugging Face model directory)".into(),
        });
    };
    let repo = cache.join(format!("models--{}--{}", parts[0], parts[1]));
    let snapshot = std::fs::read_to_string(repo.join("refs/main"))
        .ok()
        .map(|rev| repo.join("snapshots").join(rev.trim()));
    match snapshot {
        Some(snap) if snap.join("config.json").is_file() => Ok(snap),
        _ => Err(Error::Checkpoint {
            path: dir,
            msg: format!(
                "no config.json here, nor in the Hugging Face cache at {}/snapshots/<refs/main> \
                 (offline: nothing is downloaded; set HF_HUB_CACHE or HF_HOME, or give the \
                 model's directory)",
                repo.display()
            ),
        }),
    }
}

/// The hub cache directory as huggingface_hub resolves it.
fn hub_cache() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface/hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache/huggingface/hub")))
}

#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Hf(PathBuf),
    /// A checkpoint directory and the run directory whose `config.toml` describes it.
    Checkpoint {
        dir: PathBuf,
        run_dir: PathBuf,
    },
}

impl ModelSource {
    pub fn parse(text: &str) -> Result<ModelSource> {
        if let Some(path) = text.strip_prefix("hf:") {
            return Ok(ModelSource::Hf(resolve_hf(path)?));
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

    /// The directory whose tokenizer files (`data::tokenizer::TOKENIZER_FILES`) belong to this
    /// model: the Hugging Face directory, or the run directory of a checkpoint.
    pub fn files_dir(&self) -> &Path {
        match self {
            ModelSource::Hf(dir) => dir,
            ModelSource::Checkpoint { run_dir, .. } => run_dir,
        }
    }

    /// The architecture stored with the weights.
    pub fn model_config(&self) -> Result<ModelConfig> {
        Ok(self.architecture()?.0)
    }

    /// The architecture stored with the weights and, for a trainer run, its `[peft]` adapters
    /// (whose weights are in the checkpoint beside the base weights; None for `hf:`). One read
    /// of the run's `config.toml`.
    pub fn architecture(&self) -> Result<(ModelConfig, Option<PeftConfig>)> {
        match self {
            ModelSource::Hf(dir) => Ok((hf::read_config(dir)?, None)),
            ModelSource::Checkpoint { run_dir, .. } => {
                let path = run_dir.join("config.toml");
                if !path.is_file() {
                    return Err(Error::Checkpoint {
                        path,
                        msg: "missing: the checkpoint's run directory has no config.toml".into(),
                    });
                }
                match StoredModel::read(run_dir)? {
                    StoredModel::Lm { model, peft } => {
                        // config.toml is bounded by the weights as an hf: config.json is.
                        let ModelSource::Checkpoint { dir, .. } = self else {
                            unreachable!("matched above")
                        };
                        hf::check_sizes(&[dir.join(checkpoint::MODEL_FILE)], &path, &model)?;
                        Ok((model, peft))
                    }
                    StoredModel::Classifier(_) => Err(Error::Checkpoint {
                        path,
                        msg: "is an image classifier's run (task = \"classify\"), not a language model"
                            .into(),
                    }),
                }
            }
        }
    }

    /// Copies the weights into `params`, built from `config`.
    pub fn load_weights(&self, config: &TransformerConfig, params: &mut ParamStore) -> Result<()> {
        match self {
            ModelSource::Hf(dir) => {
                hf::load_weights(dir, config, params)?;
                // `trainer prune` leaves the masks of a pruned HF model beside its weights.
                params.load_masks_if_present(&dir.join(checkpoint::MASKS_FILE))
            }
            ModelSource::Checkpoint { dir, .. } => {
                checkpoint::verify(dir, Some(&[checkpoint::MODEL_FILE, checkpoint::MASKS_FILE]))?;
                load_model_file(params, &dir.join(checkpoint::MODEL_FILE))?;
                // A pruned model stays pruned through further training.
                params.load_masks_if_present(&dir.join(checkpoint::MASKS_FILE))
            }
        }
    }

    /// The raw tensors of the source, under our names, mapped (`models::mapped`): their data is
    /// read when they are copied.
    pub fn mapped_tensors(&self, config: &TransformerConfig) -> Result<Vec<(String, Stored)>> {
        match self {
            ModelSource::Hf(dir) => hf::mapped_weights(dir, config),
            ModelSource::Checkpoint { dir, .. } => {
                checkpoint::verify(dir, Some(&[checkpoint::MODEL_FILE]))?;
                mapped::open(&dir.join(checkpoint::MODEL_FILE))
            }
        }
    }

    /// Sparse upcycling: loads a dense Llama source into an MoE model of the same shape
    /// otherwise. Every non-MLP tensor is copied by name; each layer's dense
    /// `mlp.{gate,up,down}_proj.weight` becomes every expert of that layer; routers (and a
    /// shared expert) keep their fresh initialisation.
    pub fn load_upcycled(
        &self,
        dense_config: &TransformerConfig,
        params: &ParamStore,
        model: &Transformer,
    ) -> Result<()> {
        let path = PathBuf::from(self.describe());
        let mut mlp: BTreeMap<String, Stored> = BTreeMap::new();
        let mut rest = Vec::new();
        for (name, t) in self.mapped_tensors(dense_config)? {
            if name.contains(".mlp.") {
                mlp.insert(name, t);
            } else {
                rest.push((name, t));
            }
        }
        copy_named(
            &mut params
                .iter()
                .filter(|p| !p.name.contains(".mlp."))
                .map(|p| (p.name.as_str(), &p.tensor)),
            rest,
            &path,
        )?;
        for (i, layer) in model.moe_layers().into_iter().enumerate() {
            let mut take = |which: &str| {
                let key = format!("model.layers.{i}.mlp.{which}.weight");
                mlp.remove(&key).ok_or_else(|| Error::Checkpoint {
                    path: path.clone(),
                    msg: format!("missing tensor {key} (upcycling needs a dense Llama MLP)"),
                })
            };
            // One layer's dense MLP in memory at a time.
            let (gate, up, down) = (take("gate_proj")?, take("up_proj")?, take("down_proj")?);
            let (gate, up, down) = (gate.to_tensor()?, up.to_tensor()?, down.to_tensor()?);
            layer.upcycle_from_dense(&gate, &up, &down, &path)?;
        }
        if let Some(extra) = mlp.keys().next() {
            return Err(Error::Checkpoint {
                path,
                msg: format!("unexpected tensor {extra} (not a dense Llama MLP weight)"),
            });
        }
        Ok(())
    }

    pub fn describe(&self) -> String {
        match self {
            ModelSource::Hf(dir) => format!("hf:{}", dir.display()),
            ModelSource::Checkpoint { dir, .. } => dir.display().to_string(),
        }
    }
}

/// Loads a trainer checkpoint's `model.safetensors` into `params`, mapped and copied one tensor
/// at a time, leaving out what distillation adds to a student's checkpoint (its hidden-state
/// projections, `distill.*`), which is not part of the model.
fn load_model_file(params: &mut ParamStore, path: &Path) -> Result<()> {
    let tensors = mapped::open(path)?
        .into_iter()
        .filter(|(name, _)| !name.starts_with(checkpoint::DISTILL_PARAM_PREFIX))
        .collect();
    copy_named(
        &mut params.iter().map(|p| (p.name.as_str(), &p.tensor)),
        tensors,
        path,
    )
}

/// A model built and loaded from a source, ready for evaluation or generation.
pub struct Loaded {
    pub config: TransformerConfig,
    pub params: ParamStore,
    pub model: Transformer,
    /// The LoRA adapters of a run trained with `[peft]` (already loaded, not merged).
    pub lora: Option<crate::peft::lora::Lora>,
}

pub fn load(source: &ModelSource, device: Device) -> Result<Loaded> {
    let (model_config, peft) = source.architecture()?;
    let config = TransformerConfig::from_recipe(&model_config);
    check_memory(&config, device)?;
    let mut params = ParamStore::new(device);
    let mut model = Transformer::new(&config, &mut params)?;
    let lora = match peft {
        Some(peft) => Some(crate::peft::lora::apply(&mut model, &mut params, &peft)?),
        None => None,
    };
    source.load_weights(&config, &mut params)?;
    Ok(Loaded {
        config,
        params,
        model,
        lora,
    })
}

/// Refuses, before any tensor is made, a model whose fp32 weights alone need more memory than
/// `device` has free (`memory.rs`).
pub fn check_memory(config: &TransformerConfig, device: Device) -> Result<()> {
    let params = config.param_count().max(0) as u128;
    let need = crate::memory::MemoryNeed::weights(params, 4);
    crate::memory::check(&need, device, &format!("model ({params} parameters)"))
}

/// The model a trainer run trained, as its `config.toml` (the resolved recipe, written when the
/// run started) describes it. Only `[run] task`, `[model]` and `[peft]` are read; the model's
/// ranges are checked again, since the file may have been edited since.
pub enum StoredModel {
    Lm {
        model: ModelConfig,
        peft: Option<PeftConfig>,
    },
    Classifier(ClassifierConfig),
}

impl StoredModel {
    pub fn read(run_dir: &Path) -> Result<StoredModel> {
        let path = run_dir.join("config.toml");
        let bad = |msg: String| Error::Checkpoint {
            path: path.clone(),
            msg,
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| bad(format!("cannot read the run's recipe: {e}")))?;
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            bad(format!("malformed TOML: {}", one_line(e.message())))
        })?;
        let task = table
            .get("run")
            .and_then(|r| r.get("task"))
            .and_then(|t| t.as_str())
            .unwrap_or("pretrain")
            .to_string();
        let model = table
            .remove("model")
            .ok_or_else(|| bad("missing [model]".into()))?;
        let section =
            |key: &str, e: toml::de::Error| bad(format!("{key}: {}", one_line(e.message())));
        let invalid = |inv: crate::validate::Invalid| bad(format!("{}: {}", inv.key, inv.msg));
        if task == "classify" {
            let model: ClassifierConfig = model.try_into().map_err(|e| section("model", e))?;
            model.validate().map_err(invalid)?;
            return Ok(StoredModel::Classifier(model));
        }
        let model: ModelConfig = model.try_into().map_err(|e| section("model", e))?;
        model.validate().map_err(invalid)?;
        let peft: Option<PeftConfig> = match table.remove("peft") {
            Some(p) => Some(p.try_into().map_err(|e| section("peft", e))?),
            None => None,
        };
        if let Some(p) = &peft {
            p.validate().map_err(invalid)?;
        }
        Ok(StoredModel::Lm { model, peft })
    }
}
