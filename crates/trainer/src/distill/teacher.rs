//! The teacher: a model loaded from a checkpoint, frozen (no parameter requires a gradient),
//! run in eval mode (no dropout; BatchNorm on its running statistics) under `no_grad`, on the
//! student's device, and checked to share the student's vocabulary (language models) or label
//! set (classifiers). Every problem is one line naming `distill.teacher` (or the key at fault).

use super::config::{DistillConfig, TeacherPrecision};
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::load::{self, ModelSource, StoredModel};
use crate::models::params::{copy_named, read_safetensors, ParamStore};
use crate::models::resnet::ResNet;
use crate::models::transformer::{Transformer, TransformerConfig};
use crate::models::{ClassifierConfig, ModelConfig};
use std::path::PathBuf;
use tch::{Device, Kind};

fn teacher_err(e: impl std::fmt::Display) -> Error {
    Error::Recipe(format!("distill.teacher: {e}"))
}

/// Makes every tensor of `params` a constant: no gradient flows into the teacher.
fn freeze_all(params: &mut ParamStore) {
    let names: Vec<String> = params.iter().map(|p| p.name.clone()).collect();
    for name in names {
        params.freeze(&name);
    }
}

/// A language-model teacher.
pub struct LmTeacher {
    pub model: Transformer,
    pub params: ParamStore,
    pub config: TransformerConfig,
    /// Where it came from, for messages.
    pub source: String,
}

impl LmTeacher {
    /// Loads `cfg.teacher` onto `device` and checks it against the student: the same vocabulary,
    /// and a context of at least `seq_len`.
    pub fn load(
        cfg: &DistillConfig<ModelConfig>,
        student: &TransformerConfig,
        seq_len: i64,
        device: Device,
    ) -> Result<LmTeacher> {
        let source = ModelSource::parse(&cfg.teacher).map_err(teacher_err)?;
        let model_cfg = match &cfg.teacher_model {
            Some(m) => m.clone(),
            None => source.model_config().map_err(teacher_err)?,
        };
        let config = TransformerConfig::from_recipe(&model_cfg);
        check_vocab(&cfg.teacher, config.vocab_size, student.vocab_size)?;
        if config.max_seq_len < seq_len {
            return Err(teacher_err(format!(
                "{} has max_seq_len {} but data.seq_len is {seq_len}",
                cfg.teacher, config.max_seq_len
            )));
        }
        let (model, mut params) = if cfg.teacher_model.is_some() {
            let mut params = ParamStore::new(device);
            let model = Transformer::new(&config, &mut params)?;
            source
                .load_weights(&config, &mut params)
                .map_err(teacher_err)?;
            (model, params)
        } else {
            // A trainer run's LoRA adapters (if any) come with it, unmerged.
            let loaded = load::load(&source, device).map_err(teacher_err)?;
            (loaded.model, loaded.params)
        };
        if cfg.teacher_precision == TeacherPrecision::Bf16 {
            params.set_kind(Kind::BFloat16);
        }
        Ok(LmTeacher::new(model, params, source.describe()))
    }

    /// A teacher from a model already built (tests); freezes it.
    pub fn new(model: Transformer, mut params: ParamStore, source: String) -> LmTeacher {
        freeze_all(&mut params);
        LmTeacher {
            config: model.config.clone(),
            model,
            params,
            source,
        }
    }
}

/// Teacher and student must index the same tokens: their logits are compared id by id.
pub fn check_vocab(teacher: &str, teacher_vocab: i64, student_vocab: i64) -> Result<()> {
    if teacher_vocab != student_vocab {
        return Err(teacher_err(format!(
            "{teacher} has vocab_size {teacher_vocab} but the student's model.vocab_size is \
             {student_vocab}; the teacher must share the student's vocabulary"
        )));
    }
    Ok(())
}

/// A classifier teacher.
pub struct ClassifierTeacher {
    pub model: ResNet,
    pub params: ParamStore,
    pub source: String,
}

impl ClassifierTeacher {
    /// Loads `cfg.teacher`, a trainer checkpoint or run directory of a classification run, or a
    /// safetensors file of torchvision-named tensors (with `[distill.teacher_model]`), and checks
    /// that it predicts the student's `num_classes` classes.
    pub fn load(
        cfg: &DistillConfig<ClassifierConfig>,
        student_classes: i64,
        device: Device,
    ) -> Result<ClassifierTeacher> {
        let path = PathBuf::from(&cfg.teacher);
        let (file, stored) = if path.is_file() {
            (path, None)
        } else {
            match ModelSource::parse(&cfg.teacher).map_err(teacher_err)? {
                ModelSource::Hf(_) => {
                    return Err(teacher_err(
                        "hf: models are language models; a classifier's teacher is a trainer \
                         checkpoint or a safetensors file",
                    ))
                }
                ModelSource::Checkpoint { dir, run_dir } => {
                    (dir.join(checkpoint::MODEL_FILE), Some(run_dir))
                }
            }
        };
        let model_cfg = match (&cfg.teacher_model, stored) {
            (Some(m), _) => m.clone(),
            (None, Some(run_dir)) => match StoredModel::read(&run_dir).map_err(teacher_err)? {
                StoredModel::Classifier(model) => model,
                StoredModel::Lm { .. } => {
                    return Err(teacher_err(format!(
                        "{} is a language model's run; a classifier needs a classifier teacher",
                        cfg.teacher
                    )))
                }
            },
            (None, None) => {
                return Err(Error::Recipe(format!(
                    "distill.teacher_model: missing: {} carries no architecture; give \
                     [distill.teacher_model]",
                    cfg.teacher
                )))
            }
        };
        let classes = model_cfg.num_classes();
        if classes != student_classes {
            return Err(teacher_err(format!(
                "{} predicts {classes} classes but the student's model.num_classes is \
                 {student_classes}; the teacher must share the student's label set",
                cfg.teacher
            )));
        }
        let mut params = ParamStore::new(device);
        let model = ResNet::new(&model_cfg.build()?, &mut params)?;
        let loaded = read_safetensors(&file).map_err(teacher_err)?;
        copy_named(
            &mut params.iter().map(|p| (p.name.as_str(), &p.tensor)),
            loaded,
            &file,
        )
        .map_err(teacher_err)?;
        freeze_all(&mut params);
        Ok(ClassifierTeacher {
            model,
            params,
            source: file.display().to_string(),
        })
    }
}
