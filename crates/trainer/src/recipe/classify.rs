//! The TOML schema of an image-classification recipe (`[run] task = "classify"`, run by
//! `recipes/classify.rs`): a ResNet family in `[model]`, image sources in `[data]`, and the same
//! `[run]`, `[optim]` and `[schedule]` sections as a pretraining recipe.
//!
//! Like `schema.rs`: unknown keys and wrong types are rejected by deserialization
//! (`deny_unknown_fields`), ranges by `validate`, and `recipe::parse_any` turns both into one line
//! with the file location and key path. Validation never opens the data: how many images a
//! folder holds is checked when the run opens it.

use super::schema::{
    check, positive, validate_optim_schedule, Invalid, OptimConfig, Precision, RunConfig,
    ScheduleConfig, Task,
};
use crate::models::resnet::ResNetConfig;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClassifyRecipe {
    pub run: RunConfig,
    /// Initial weights, e.g. a torchvision state dict saved as safetensors; absent: random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<ClassifierInit>,
    pub model: ClassifierConfig,
    pub data: ImageDataConfig,
    pub optim: OptimConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    pub train: ClassifyTrainConfig,
    /// Knowledge distillation from a frozen teacher classifier (`distill/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<super::DistillConfig<ClassifierConfig>>,
    /// Magnitude pruning during training (`prune/`), one-shot or gradual.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prune: Option<super::PruneConfig>,
}

/// `[init]` of a classifier: `from` is a safetensors file with torchvision's state-dict names
/// (`torch.save`'s dict written with `safetensors.torch.save_file`), or a trainer checkpoint
/// directory (`.../checkpoints/step-N`). Every tensor must match the model by name and shape,
/// except those named in `reinit` (e.g. `["fc.weight", "fc.bias"]` to fine-tune onto another
/// label set), which keep their fresh initialisation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClassifierInit {
    pub from: std::path::PathBuf,
    #[serde(default)]
    pub reinit: Vec<String>,
}

/// The classifier registry: the three families of `models/resnet.rs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClassifierConfig {
    /// torchvision's ImageNet ResNet: depth 18, 34, 50, 101 or 152.
    Resnet { depth: i64, num_classes: i64 },
    /// He et al.'s CIFAR ResNet (option A shortcuts): depth 6n+2 (20, 32, 44, 56, 110).
    CifarResnet { depth: i64, num_classes: i64 },
    /// Wide ResNet WRN-depth-width: depth 6n+4 (10, 16, 22, 28, 40), widen factor `width` (k).
    Wrn {
        depth: i64,
        width: i64,
        num_classes: i64,
        /// Dropout between the two convs of each block (the paper uses 0.3 on CIFAR).
        #[serde(default)]
        dropout: f64,
    },
}

impl ClassifierConfig {
    pub fn num_classes(&self) -> i64 {
        match self {
            ClassifierConfig::Resnet { num_classes, .. }
            | ClassifierConfig::CifarResnet { num_classes, .. }
            | ClassifierConfig::Wrn { num_classes, .. } => *num_classes,
        }
    }

    /// The model's architecture; fails (naming the field) on a depth or width the family lacks.
    pub fn build(&self) -> crate::Result<ResNetConfig> {
        match self {
            ClassifierConfig::Resnet { depth, num_classes } => {
                ResNetConfig::resnet(*depth, *num_classes)
            }
            ClassifierConfig::CifarResnet { depth, num_classes } => {
                ResNetConfig::cifar_resnet(*depth, *num_classes)
            }
            ClassifierConfig::Wrn {
                depth,
                width,
                num_classes,
                dropout,
            } => Ok(ResNetConfig {
                dropout: *dropout,
                ..ResNetConfig::wrn(*depth, *width, *num_classes)?
            }),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageDataConfig {
    pub train: ImageSourceConfig,
    /// Top-1/top-5 accuracy and loss are measured on this set.
    pub valid: ImageSourceConfig,
    /// Side of the square images the model sees. CIFAR and the built-in set are 32x32; folder
    /// images are resized (shorter side to `resize`) and center-cropped to it.
    #[serde(default = "default_image_size")]
    pub image_size: i64,
    /// Folder sources: the shorter side before the center crop; absent: `image_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<i64>,
    /// Training augmentation: pad by this many pixels (black) and crop back at a random offset;
    /// 0: no random crop.
    #[serde(default = "default_crop_padding")]
    pub crop_padding: i64,
    /// Training augmentation: flip half of the images left to right.
    #[serde(default = "default_true")]
    pub hflip: bool,
    /// Per-channel (R, G, B) normalisation of pixels scaled to [0, 1]: (x - mean) / std.
    /// Defaults: CIFAR-10's training-set statistics.
    #[serde(default = "default_mean")]
    pub mean: [f64; 3],
    #[serde(default = "default_std")]
    pub std: [f64; 3],
}

fn default_image_size() -> i64 {
    32
}
fn default_crop_padding() -> i64 {
    4
}
fn default_true() -> bool {
    true
}
/// CIFAR-10 training set, per channel, pixels in [0, 1].
pub const CIFAR10_MEAN: [f64; 3] = [0.4914, 0.4822, 0.4465];
pub const CIFAR10_STD: [f64; 3] = [0.2470, 0.2435, 0.2616];
fn default_mean() -> [f64; 3] {
    CIFAR10_MEAN
}
fn default_std() -> [f64; 3] {
    CIFAR10_STD
}

/// The image source registry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageSourceConfig {
    /// The CIFAR-10 binary version (`cifar-10-batches-bin`): `path` is its directory; `train`
    /// reads `data_batch_*.bin`, `test` reads `test_batch.bin`.
    Cifar10 { path: PathBuf, split: Split },
    /// The CIFAR-100 binary version (`cifar-100-binary`): `train.bin` or `test.bin`.
    Cifar100 {
        path: PathBuf,
        split: Split,
        /// The 100 fine classes or the 20 coarse superclasses.
        #[serde(default)]
        labels: Cifar100Labels,
    },
    /// One sub-directory per class under `path`; class ids follow the sorted directory names.
    /// PNG and JPEG files.
    Folder { path: PathBuf },
    /// A generated set of 10 classes of coloured shapes and stripes (32x32, with noise), the
    /// same on every machine: 5000 training or 1000 test images unless `images` says otherwise.
    BuiltinShapes {
        split: Split,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        images: Option<i64>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Test,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Cifar100Labels {
    #[default]
    Fine,
    Coarse,
}

impl ImageSourceConfig {
    /// The number of classes, where the kind fixes it (folders: found when read).
    pub fn fixed_classes(&self) -> Option<i64> {
        match self {
            ImageSourceConfig::Cifar10 { .. } | ImageSourceConfig::BuiltinShapes { .. } => Some(10),
            ImageSourceConfig::Cifar100 {
                labels: Cifar100Labels::Fine,
                ..
            } => Some(100),
            ImageSourceConfig::Cifar100 {
                labels: Cifar100Labels::Coarse,
                ..
            } => Some(20),
            ImageSourceConfig::Folder { .. } => None,
        }
    }

    /// The side of the images, where the kind fixes it.
    pub fn fixed_size(&self) -> Option<i64> {
        match self {
            ImageSourceConfig::Folder { .. } => None,
            _ => Some(32),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ImageSourceConfig::Cifar10 { .. } => "cifar10",
            ImageSourceConfig::Cifar100 { .. } => "cifar100",
            ImageSourceConfig::Folder { .. } => "folder",
            ImageSourceConfig::BuiltinShapes { .. } => "builtin_shapes",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    #[serde(default = "default_log_every")]
    pub log_every: i64,
    /// Checkpoint every this many steps (and always at the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<i64>,
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
            !self.optim.layerwise(),
            "optim.layerwise",
            "layer-wise updates are for language-model recipes only",
        )?;
        check(
            r.precision != Precision::Bf16,
            "run.precision",
            "classify runs in fp32 or bf16-mixed (BatchNorm statistics stay fp32)",
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
        match &self.model {
            ClassifierConfig::Resnet { depth, .. } => check(
                [18, 34, 50, 101, 152].contains(depth),
                "model.depth",
                format!("resnet depth must be one of 18, 34, 50, 101, 152, got {depth}"),
            )?,
            ClassifierConfig::CifarResnet { depth, .. } => check(
                *depth >= 8 && (depth - 2) % 6 == 0,
                "model.depth",
                format!("cifar_resnet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}"),
            )?,
            ClassifierConfig::Wrn {
                depth,
                width,
                dropout,
                ..
            } => {
                check(
                    *depth >= 10 && (depth - 4) % 6 == 0,
                    "model.depth",
                    format!("wrn depth must be 6n+4 (10, 16, 22, 28, 40), got {depth}"),
                )?;
                positive(*width, "model.width")?;
                check(
                    (0.0..1.0).contains(dropout),
                    "model.dropout",
                    format!("expected a probability in [0, 1), got {dropout}"),
                )?;
            }
        }
        positive(self.model.num_classes(), "model.num_classes")
    }

    fn validate_data(&self) -> Result<(), Invalid> {
        let d = &self.data;
        positive(d.image_size, "data.image_size")?;
        if let Some(r) = d.resize {
            check(
                r >= d.image_size,
                "data.resize",
                format!(
                    "the shorter side ({r}) must be at least data.image_size ({})",
                    d.image_size
                ),
            )?;
        }
        check(
            d.crop_padding >= 0 && d.crop_padding < d.image_size,
            "data.crop_padding",
            format!(
                "expected 0 <= crop_padding < image_size ({}), got {}",
                d.image_size, d.crop_padding
            ),
        )?;
        for (i, s) in d.std.iter().enumerate() {
            check(
                *s > 0.0 && s.is_finite(),
                "data.std",
                format!("expected positive numbers, got std[{i}] = {s}"),
            )?;
        }
        for (i, m) in d.mean.iter().enumerate() {
            check(
                m.is_finite(),
                "data.mean",
                format!("expected finite numbers, got mean[{i}] = {m}"),
            )?;
        }
        let classes = self.model.num_classes();
        for (key, src) in [("data.train", &d.train), ("data.valid", &d.valid)] {
            if let Some(size) = src.fixed_size() {
                check(
                    d.image_size == size,
                    "data.image_size",
                    format!(
                        "{key} ({}) has {size}x{size} images; set image_size = {size}",
                        src.kind()
                    ),
                )?;
            }
            if let Some(n) = src.fixed_classes() {
                check(
                    n == classes,
                    "model.num_classes",
                    format!(
                        "{key} ({}) has {n} classes but model.num_classes is {classes}",
                        src.kind()
                    ),
                )?;
            }
            match src {
                ImageSourceConfig::BuiltinShapes {
                    images: Some(n), ..
                } => positive(*n, &format!("{key}.images"))?,
                ImageSourceConfig::Cifar10 { path, .. }
                | ImageSourceConfig::Cifar100 { path, .. }
                | ImageSourceConfig::Folder { path } => check(
                    !path.as_os_str().is_empty(),
                    &format!("{key}.path"),
                    "expected a path",
                )?,
                ImageSourceConfig::BuiltinShapes { images: None, .. } => {}
            }
        }
        Ok(())
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
        super::schema::validate_pruning(self.prune.as_ref(), &self.optim, total_steps)?;
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
        assert_eq!(r.data.mean, CIFAR10_MEAN);
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
