//! An image-classification recipe (`[run] task = "classify"`, run by `train/classify.rs`): a
//! ResNet family in `[model]` (`models::ClassifierConfig`), image sources in `[data]`
//! (`data::ImageDataConfig`), and the same `[run]`, `[optim]` and `[schedule]` sections as a
//! language-model recipe.
//!
//! Like `recipe.rs`: unknown keys and wrong types are rejected by deserialization
//! (`deny_unknown_fields`), ranges by `validate`, and `config::parse_any` turns both into one line
//! with the file location and key path. Validation never opens the data: how many images a
//! folder holds is checked when the run opens it.

use super::recipe::{validate_optim_schedule, validate_pruning, RunConfig, Shard, Task};
use crate::data::ImageDataConfig;
use crate::device::Precision;
use crate::distill::DistillConfig;
use crate::models::ClassifierConfig;
use crate::optim::OptimConfig;
use crate::prune::PruneConfig;
use crate::schedule::ScheduleConfig;
use crate::validate::{check, positive, Invalid};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRecipe {
    /// The run's identity, output directory and machine settings (`task = "classify"`).
    pub run: RunConfig,
    /// Initial weights, e.g. a torchvision state dict saved as safetensors; absent: random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<ClassifierInit>,
    /// The ResNet family (`kind`), its depth and the number of classes.
    pub model: ClassifierConfig,
    /// The training and validation image sources, image size and augmentation.
    pub data: ImageDataConfig,
    /// The optimizer (`kind`) and its hyperparameters; `lr` is the peak learning rate.
    pub optim: OptimConfig,
    /// How the learning rate moves from `optim.lr` over the run; absent: constant, no warmup.
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Batch size, run length, loss, evaluation, logging and checkpoint cadence.
    pub train: ClassifyTrainConfig,
    /// Knowledge distillation from a frozen teacher classifier (`distill/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig<ClassifierConfig>>,
    /// Magnitude pruning during training (`prune/`), one-shot or gradual.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<PruneConfig>,
}

/// `[init]` of a classifier: `from` is a safetensors file with torchvision's state-dict names
/// (`torch.save`'s dict written with `safetensors.torch.save_file`), or a trainer checkpoint
/// directory (`.../checkpoints/step-N`). Every tensor must match the model by name and shape,
/// except those named in `reinit` (e.g. `["fc.weight", "fc.bias"]` to fine-tune onto another
/// label set), which keep their fresh initialisation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifierInit {
    /// A safetensors file of torchvision-named tensors, or a trainer checkpoint directory.
    pub from: std::path::PathBuf,
    /// Tensor names left at their fresh initialisation (e.g. a new classifier head).
    #[serde(default)]
    pub reinit: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClassifyTrainConfig {
    /// Images per optimizer step.
    pub batch_size: i64,
    /// Length of the run in optimizer steps; give this or `epochs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<i64>,
    /// Length of the run in passes over data.train (each `len / batch_size` steps, the last
    /// partial batch of an epoch dropped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<i64>,
    /// Cross-entropy against (1 - s) one-hot + s uniform (Szegedy et al. 2016); 0: plain.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Evaluate on data.valid every this many steps (and always at the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_every: Option<i64>,
    /// Evaluate on the first this many images of data.valid; absent: all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_images: Option<i64>,
    /// Log a metrics row every this many optimizer steps.
    #[serde(default = "default_log_every")]
    pub log_every: i64,
    /// Checkpoint every this many steps (and always at the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<i64>,
    /// How many checkpoints to keep; older ones are deleted once a newer one is complete.
    #[serde(default = "default_keep")]
    pub keep_checkpoints: i64,
}

fn default_log_every() -> i64 {
    10
}
fn default_keep() -> i64 {
    3
}

impl ClassifyRecipe {
    /// Range checks that the types cannot express. The first failure is returned.
    pub fn validate(&self) -> Result<(), Invalid> {
        let r = &self.run;
        check(
            r.task == Task::Classify,
            "run.task",
            "expected \"classify\" for an image-classification recipe",
        )?;
        r.validate()?;
        check(
            r.shard == Shard::None,
            "run.shard",
            "sharding is for language-model recipes only",
        )?;
        check(
            !self.optim.layerwise(),
            "optim.layerwise",
            "layer-wise updates are for language-model recipes only",
        )?;
        check(
            r.precision != Precision::Bf16,
            "run.precision",
            "classify runs in fp32 or bf16-mixed (BatchNorm statistics stay fp32)",
        )?;
        check(
            !self.optim.master_weights(),
            "optim.master_weights",
            "fp32 copies of bf16 weights are for language-model recipes (classify keeps fp32 \
             weights)",
        )?;
        self.validate_model()?;
        self.validate_data()?;
        validate_optim_schedule(&self.optim, &self.schedule)?;
        if let Some(d) = &self.distill {
            d.validate_classifier()?;
        }
        self.validate_train()
    }

    fn validate_model(&self) -> Result<(), Invalid> {
        self.model.validate()
    }

    fn validate_data(&self) -> Result<(), Invalid> {
        self.data.validate(self.model.num_classes())
    }

    fn validate_train(&self) -> Result<(), Invalid> {
        let t = &self.train;
        positive(t.batch_size, "train.batch_size")?;
        match (t.max_steps, t.epochs) {
            (Some(_), Some(_)) => {
                return Err(Invalid {
                    key: "train.max_steps".into(),
                    msg: "give max_steps or epochs, not both".into(),
                })
            }
            (None, None) => {
                return Err(Invalid {
                    key: "train.max_steps".into(),
                    msg: "expected max_steps or epochs".into(),
                })
            }
            (Some(s), None) => positive(s, "train.max_steps")?,
            (None, Some(e)) => positive(e, "train.epochs")?,
        }
        check(
            (0.0..1.0).contains(&t.label_smoothing),
            "train.label_smoothing",
            format!("expected a value in [0, 1), got {}", t.label_smoothing),
        )?;
        if let Some(e) = t.eval_every {
            positive(e, "train.eval_every")?;
        }
        if let Some(n) = t.eval_images {
            positive(n, "train.eval_images")?;
        }
        positive(t.log_every, "train.log_every")?;
        if let Some(c) = t.checkpoint_every {
            positive(c, "train.checkpoint_every")?;
        }
        positive(t.keep_checkpoints, "train.keep_checkpoints")?;
        if let Some(steps) = t.max_steps {
            self.check_warmup(steps)?;
        }
        Ok(())
    }

    /// The schedule's phases and the pruning events must fit in the run; with `epochs`, checked
    /// once the data's size is known.
    pub fn check_warmup(&self, total_steps: i64) -> Result<(), Invalid> {
        validate_pruning(self.prune.as_ref(), &self.optim, total_steps)?;
        self.schedule.check_lengths(self.optim.lr(), total_steps)
    }

    /// Optimizer steps per epoch of a training set of `n` images (the partial batch dropped).
    pub fn steps_per_epoch(&self, n: usize) -> i64 {
        n as i64 / self.train.batch_size
    }

    /// The run's length in optimizer steps, given the size of data.train.
    pub fn max_steps(&self, train_images: usize) -> i64 {
        match (self.train.max_steps, self.train.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => e * self.steps_per_epoch(train_images),
            (None, None) => 0,
        }
    }

    /// "N steps" or "E epochs", for messages before the data is read.
    pub fn describe_length(&self) -> String {
        match (self.train.max_steps, self.train.epochs) {
            (Some(s), _) => format!("{s} steps"),
            (None, Some(e)) => format!("{e} epochs"),
            (None, None) => "no length".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse, parse_any, to_toml, AnyRecipe, Override};
    use super::*;

    const BASE: &str = r#"[run]
name = "c"
task = "classify"
out_dir = "runs/c"

[model]
kind = "wrn"
depth = 16
width = 2
num_classes = 10

[data]
train = { kind = "cifar10", path = "data/cifar-10-batches-bin", split = "train" }
valid = { kind = "cifar10", path = "data/cifar-10-batches-bin", split = "test" }

[optim]
kind = "sgd"
lr = 0.1
momentum = 0.9
nesterov = true

[train]
batch_size = 128
epochs = 2
"#;

    fn classify(text: &str, overrides: &[&str]) -> crate::Result<ClassifyRecipe> {
        let ovs: Vec<Override> = overrides
            .iter()
            .map(|o| Override::parse(o).expect("override"))
            .collect();
        match parse_any(text, "c.toml", &ovs)? {
            AnyRecipe::Classify(r) => Ok(r),
            AnyRecipe::Pretrain(_) => panic!("a classify recipe read as pretraining"),
        }
    }

    fn err(text: &str, overrides: &[&str]) -> String {
        classify(text, overrides)
            .err()
            .expect("an error")
            .to_string()
    }

    #[test]
    fn task_selects_the_schema_and_defaults_apply_without_reading_data() {
        let r = classify(BASE, &[]).expect("valid");
        assert_eq!(r.data.image_size, 32);
        assert_eq!((r.data.crop_padding, r.data.hflip), (4, true));
        assert_eq!(r.data.mean, crate::data::CIFAR10_MEAN);
        assert_eq!(r.max_steps(50_000), 2 * 390);
        assert_eq!(
            r.model.build().expect("wrn").stage_widths,
            vec![32, 64, 128]
        );
        let again = classify(&to_toml(&r), &[]).expect("resolved recipe parses");
        assert_eq!(r, again);
    }

    #[test]
    fn errors_name_location_and_key() {
        let e = err(BASE, &["model.depth=15"]);
        assert_eq!(e, "--set model.depth=15: model.depth: wrn depth must be 6n+4 (10, 16, 22, 28, 40), got 15");
        let e = err(&BASE.replace("width = 2", "width = 2\nwidht = 3"), &[]);
        assert!(
            e.starts_with("c.toml:10:1: model.widht: unknown field `widht`"),
            "{e}"
        );
        let e = err(BASE, &["data.image_size=64"]);
        assert!(
            e.contains(
                "data.image_size: data.train (cifar10) has 32x32 images; set image_size = 32"
            ),
            "{e}"
        );
        let e = err(BASE, &["train.max_steps=10"]);
        assert!(
            e.ends_with("train.max_steps: give max_steps or epochs, not both"),
            "{e}"
        );
        let e = err(&BASE.replace("split = \"test\"", "split = \"tset\""), &[]);
        // serde buffers the kind-tagged source, so the error is placed at data.valid.
        assert!(
            e.starts_with(
                "c.toml:14:1: data.valid: unknown variant `tset`, expected `train` or `test`"
            ),
            "{e}"
        );
        let e = err(BASE, &["train.label_smoothing=1.0"]);
        assert!(
            e.contains("train.label_smoothing: expected a value in [0, 1)"),
            "{e}"
        );
    }

    #[test]
    fn a_misspelled_task_or_a_classify_recipe_read_as_pretraining_is_named() {
        let e = parse_any(&BASE.replace("\"classify\"", "\"clasify\""), "c.toml", &[])
            .err()
            .expect("error")
            .to_string();
        assert!(
            e.starts_with("c.toml:3:1: run.task: unknown variant `clasify`"),
            "{e}"
        );
        let e = parse(BASE, "c.toml", &[]).err().expect("error").to_string();
        assert!(
            e.starts_with("c.toml:3:1: run.task: expected a pretraining recipe"),
            "{e}"
        );
    }
}
