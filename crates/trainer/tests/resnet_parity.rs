//! Parity of our ResNets with torchvision's (`torchvision.models.resnet`).
//!
//! For each case, `tests/reference/resnet_reference.py` builds the torchvision model with random
//! weights (`weights=None`, seed 0; nothing is downloaded), makes its BatchNorm statistics and
//! affine parameters non-trivial, and writes the state dict, an input batch [2, 3, 64, 64], the
//! eval-mode logits, the train-mode logits, loss and a few gradients, and the running statistics
//! after that train-mode pass. This test then checks, per case:
//!
//! 1. the architecture the script read off the torchvision module (block type, blocks per stage,
//!    bottleneck width, classes) is our preset's;
//! 2. `ParamStore::load` takes torchvision's state dict as it is (every key, shape and dtype,
//!    buffers included);
//! 3. eval-mode logits, then train-mode logits, loss and gradients, equal torchvision's to a
//!    relative error below 1e-4 (max |ours - ref| / max |ref|);
//! 4. after that one train-mode forward, every running_mean, running_var and
//!    num_batches_tracked equals torchvision's.
//!
//! A further test compares our names, order, shapes and dtypes with the `state_dict()` of every
//! torchvision ImageNet ResNet preset (built on the meta device by the script).
//!
//! The Python side runs with `$TRAINER_PYTHON` (`python3` when unset) and needs torch,
//! torchvision and safetensors; `scripts/test` installs them. Without them these tests fail,
//! they never pass silently.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use tch::{Device, Kind, Tensor};
use trainer::models::params::ParamStore;
use trainer::models::resnet::{Block, ResNet, ResNetConfig};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/reference/resnet_reference.py"
);
const TOLERANCE: f64 = 1e-4;

/// Our side of each case; must mirror `CASES` in the script (checked against its case.json).
fn config(case: &str) -> ResNetConfig {
    match case {
        "resnet18" => ResNetConfig::resnet18(1000),
        "resnet50" => ResNetConfig::resnet50(10),
        "wide_resnet50_2" => ResNetConfig::wide_resnet50_2(10),
        other => panic!("unknown case {other}"),
    }
}

/// Runs the reference script once for `names` (cases or `layouts`) into a fresh temporary
/// directory; each name gets its subdirectory.
fn reference(names: &[&str]) -> tempfile::TempDir {
    let python = std::env::var("TRAINER_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let dir = tempfile::TempDir::new().expect("temporary directory");
    let hint = "the torchvision parity tests need Python with torch, torchvision and safetensors: \
                run scripts/test, which installs them and sets TRAINER_PYTHON";
    let out = Command::new(&python)
        .arg(SCRIPT)
        .arg(dir.path())
        .args(names)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{python}` ({e}); {hint}"));
    if !out.status.success() {
        panic!(
            "`{python} {SCRIPT} {} {}` failed ({}); {hint}\nstderr:\n{}",
            dir.path().display(),
            names.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_tensors(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn max_relative_error(ours: &Tensor, reference: &Tensor) -> f64 {
    let diff = (ours - reference).abs().max().double_value(&[]);
    diff / reference.abs().max().double_value(&[])
}

fn assert_close(case: &str, what: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.size(), reference.size(), "{case}: {what} shape");
    let err = max_relative_error(ours, reference);
    eprintln!("{case}: {what} max relative error {err:e}");
    assert!(
        err < TOLERANCE,
        "{case}: {what} differs from torchvision: max relative error {err:e}"
    );
}

/// The architecture torchvision's module has is the one our preset builds.
fn assert_architecture_matches(case: &str, c: &ResNetConfig, dir: &Path) {
    let arch = &read_json(&dir.join("case.json"))["architecture"];
    let block = match c.block {
        Block::Basic => "basic",
        Block::Bottleneck => "bottleneck",
        Block::PreActBasic => "preact",
    };
    assert_eq!(arch["block"].as_str(), Some(block), "{case}: block");
    let stages: Vec<i64> = arch["stage_blocks"]
        .as_array()
        .expect("stage_blocks")
        .iter()
        .map(|v| v.as_i64().expect("int"))
        .collect();
    assert_eq!(stages, c.stage_blocks, "{case}: blocks per stage");
    assert_eq!(
        arch["num_classes"].as_i64(),
        Some(c.num_classes),
        "{case}: classes"
    );
    if c.block == Block::Bottleneck {
        let inner = c.stage_widths[0] * c.width_per_group / 64;
        assert_eq!(
            arch["bottleneck_width_layer1"].as_i64(),
            Some(inner),
            "{case}: bottleneck width"
        );
    }
}

fn check_case(case: &str, dir: &Path) {
    let c = config(case);
    assert_architecture_matches(case, &c, dir);

    tch::manual_seed(0);
    let mut store = ParamStore::new(Device::Cpu);
    let model = ResNet::new(&c, &mut store).expect("valid preset");
    store
        .load(&dir.join("model.safetensors"))
        .unwrap_or_else(|e| {
            panic!("{case}: our model does not load torchvision's state dict: {e}")
        });

    let refs = read_tensors(&dir.join("reference.safetensors"));
    let x = &refs["input"]; // [b, 3, h, w]
    let labels = &refs["labels"]; // [b]

    let logits = tch::no_grad(|| model.forward(x, false)); // [b, classes]
    assert_eq!(logits.kind(), Kind::Float, "{case}: logits dtype");
    assert_close(case, "eval-mode logits", &logits, &refs["logits_eval"]);

    // Eval mode leaves the buffers alone; train mode updates them once.
    let logits = model.forward(x, true);
    assert_close(case, "train-mode logits", &logits, &refs["logits_train"]);
    let loss = logits.cross_entropy_for_logits(labels);
    assert_close(
        case,
        "train-mode loss",
        &loss.reshape([1]),
        &refs["loss_train"],
    );
    loss.backward();
    for (key, reference) in refs.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let name = &key["grad.".len()..];
        let grad = store
            .get(name)
            .unwrap_or_else(|| panic!("{case}: no parameter {name}"))
            .grad();
        assert!(grad.defined(), "{case}: no gradient for {name}");
        assert_close(case, key, &grad, reference);
    }

    let after = read_tensors(&dir.join("after_train.safetensors"));
    let ours_buffers: Vec<&str> = store
        .iter()
        .filter(|p| !p.trainable)
        .map(|p| p.name.as_str())
        .collect();
    let theirs_buffers: Vec<&str> = after.keys().map(String::as_str).collect();
    let mut sorted = ours_buffers.clone();
    sorted.sort();
    assert_eq!(sorted, theirs_buffers, "{case}: buffer names");
    let mut worst = 0.0f64;
    for name in ours_buffers {
        let (ours, theirs) = (store.get(name).expect("buffer"), &after[name]);
        assert_eq!(ours.kind(), theirs.kind(), "{case}: {name} dtype");
        if name.ends_with("num_batches_tracked") {
            assert_eq!(
                ours.int64_value(&[]),
                theirs.int64_value(&[]),
                "{case}: {name}"
            );
        } else {
            let err = max_relative_error(ours, theirs);
            assert!(
                err < TOLERANCE,
                "{case}: {name} after one train-mode forward: max relative error {err:e}"
            );
            worst = worst.max(err);
        }
    }
    eprintln!(
        "{case}: running statistics after one train-mode forward, max relative error {worst:e}"
    );
}

/// One test for the three cases: one Python start (importing torch and torchvision costs seconds
/// on two cores); a failure names its case.
#[test]
fn resnet18_resnet50_wide_resnet50_2_match_torchvision() {
    let cases = ["resnet18", "resnet50", "wide_resnet50_2"];
    let dir = reference(&cases);
    for case in cases {
        check_case(case, &dir.path().join(case));
    }
}

/// Every torchvision ImageNet preset: our registration order, names, shapes and dtypes are its
/// `state_dict()`'s, so a torchvision checkpoint maps one to one in both directions.
#[test]
fn presets_have_torchvision_state_dict_layouts() {
    let dir = reference(&["layouts"]);
    let listing = read_json(&dir.path().join("layouts").join("layouts.json"));
    let models = listing["models"].as_object().expect("models");
    let presets = [
        ("resnet18", ResNetConfig::resnet18(1000)),
        ("resnet34", ResNetConfig::resnet34(1000)),
        ("resnet50", ResNetConfig::resnet50(1000)),
        ("resnet101", ResNetConfig::resnet101(1000)),
        ("resnet152", ResNetConfig::resnet152(1000)),
        ("wide_resnet50_2", ResNetConfig::wide_resnet50_2(1000)),
        ("wide_resnet101_2", ResNetConfig::wide_resnet101_2(1000)),
    ];
    assert_eq!(
        models.len(),
        presets.len(),
        "the script lists other models than this test"
    );
    for (name, preset) in presets {
        let theirs: Vec<(String, Vec<i64>, String)> = models[name]
            .as_array()
            .unwrap_or_else(|| panic!("layouts.json lacks {name}"))
            .iter()
            .map(|e| {
                let shape = e["shape"]
                    .as_array()
                    .expect("shape")
                    .iter()
                    .map(|d| d.as_i64().expect("dim"));
                (
                    e["name"].as_str().expect("name").to_string(),
                    shape.collect(),
                    e["dtype"].as_str().expect("dtype").to_string(),
                )
            })
            .collect();
        let mut store = ParamStore::new(Device::Cpu);
        let _model = ResNet::new(&preset, &mut store).expect("valid preset");
        let ours: Vec<(String, Vec<i64>, String)> = store
            .iter()
            .map(|p| {
                let dtype = match p.tensor.kind() {
                    Kind::Float => "float32",
                    Kind::Int64 => "int64",
                    other => panic!("{name}: unexpected kind {other:?} of {}", p.name),
                };
                (p.name.clone(), p.tensor.size(), dtype.to_string())
            })
            .collect();
        assert_eq!(
            ours.len(),
            theirs.len(),
            "{name}: number of state-dict entries"
        );
        for (o, t) in ours.iter().zip(&theirs) {
            assert_eq!(
                o, t,
                "{name}: first difference from torchvision's state_dict() (ours, theirs)"
            );
        }
        eprintln!(
            "{name}: {} state-dict entries match torchvision",
            ours.len()
        );
    }
}
