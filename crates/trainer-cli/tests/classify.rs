//! Image classification end to end with the real binary on the CPU: a small CIFAR ResNet learns
//! the built-in generated set to well above chance, a run stopped by SIGTERM and resumed logs
//! bitwise the same losses and accuracies as the uninterrupted one, and bad data or recipes are
//! one-line errors.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;

/// A ResNet-8 (the CIFAR family's smallest, 6n+2 with n = 1) on a 2000-image slice of the
/// built-in set, one thread (bitwise reproducible), SGD with Nesterov momentum.
fn tiny_classify_recipe(out_dir: &str) -> String {
    format!(
        r#"# A tiny classification recipe for the end-to-end tests.
[run]
name = "tiny-classify"
task = "classify"
seed = 3
out_dir = {out_dir}
device = "cpu"
threads = 1

[model]
kind = "cifar_resnet"
depth = 8
num_classes = 10

[data]
train = {{ kind = "builtin_shapes", split = "train", images = 2000 }}
valid = {{ kind = "builtin_shapes", split = "test", images = 300 }}
crop_padding = 4
hflip = true

[optim]
kind = "sgd"
lr = 0.1
momentum = 0.9
nesterov = true
weight_decay = 5e-4

[schedule]
kind = "cosine"
warmup_steps = 5

[train]
batch_size = 32
max_steps = 60
label_smoothing = 0.1
eval_every = 20
log_every = 1
checkpoint_every = 10
keep_checkpoints = 2
"#,
        out_dir = toml_str(out_dir)
    )
}

fn summary(run_dir: &Path) -> Value {
    let path = run_dir.join("summary.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("summary.json is JSON")
}

#[test]
fn builtin_shapes_train_well_above_chance_and_resume_is_bitwise_exact() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "c.toml", &tiny_classify_recipe("a"));
    let out = trainer(w, &["run", "c.toml"]);
    out.assert_success();
    assert!(out.stderr.contains("top-1"), "{}", out.describe());
    let reference = read_metrics(&w.join("a/metrics.jsonl"));
    let evals = eval_rows(&reference, "valid");
    assert_eq!(
        evals.iter().map(step_of).collect::<Vec<_>>(),
        vec![20, 40, 60]
    );
    let last = evals.last().expect("eval rows");
    for key in ["loss", "top1", "top5"] {
        assert!(num(last, key).is_finite(), "{last}");
    }
    let s = summary(&w.join("a"));
    let top1 = s["final_valid_top1"].as_f64().expect("final_valid_top1");
    let top5 = s["final_valid_top5"].as_f64().expect("final_valid_top5");
    assert_eq!(top1, num(last, "top1"));
    // 10 balanced classes: chance is 10% top-1.
    assert!(top1 > 0.2, "top-1 {top1} is not well above chance (0.1)");
    assert!(top5 >= top1 && top5 > 0.6, "top-5 {top5}");
    assert_eq!(s["steps"], 60);
    assert_eq!(s["images"], 60 * 32);
    assert!(w
        .join("a/checkpoints/step-00000060/model.safetensors")
        .is_file());
    // BatchNorm running statistics are saved with the model.
    let model =
        std::fs::read(w.join("a/checkpoints/step-00000060/model.safetensors")).expect("model");
    let header = String::from_utf8_lossy(&model[..model.len().min(20000)]).to_string();
    assert!(
        header.contains("bn1.running_mean") && header.contains("num_batches_tracked"),
        "no BN buffers"
    );

    // Stopped by SIGTERM, then resumed: the same losses, bit for bit.
    let mut b = spawn(w, &["run", "c.toml", "--set", "run.out_dir=b"]);
    let seen = wait_for_step(&mut b, &w.join("b/metrics.jsonl"), 12);
    send_signal(b.pid(), "TERM");
    let out = b.wait(TIMEOUT);
    assert_eq!(
        out.code,
        Some(EXIT_INTERRUPTED),
        "stopped after step {seen}:\n{}",
        out.describe()
    );
    trainer(
        w,
        &[
            "run",
            "c.toml",
            "--set",
            "run.out_dir=b",
            "--resume",
            "auto",
        ],
    )
    .assert_success();
    let resumed = read_metrics(&w.join("b/metrics.jsonl"));
    let (ta, tb) = (train_rows(&reference), train_rows(&resumed));
    assert_eq!(ta.len(), 60);
    assert_eq!(
        tb.iter().map(step_of).collect::<Vec<_>>(),
        (1..=60).collect::<Vec<_>>(),
        "one row per step"
    );
    for (a, b) in ta.iter().zip(&tb) {
        for key in ["loss", "lr", "top1"] {
            let (x, y) = (num(a, key), num(b, key));
            assert!(
                x == y,
                "step {}: {key} {y:e} after resume, {x:e} uninterrupted",
                step_of(a)
            );
        }
    }
    let eb = eval_rows(&resumed, "valid");
    assert_eq!(eb.len(), 3);
    for (a, b) in evals.iter().zip(&eb) {
        for key in ["loss", "top1", "top5"] {
            assert!(
                num(a, key) == num(b, key),
                "step {}: valid {key} differs after resume",
                step_of(a)
            );
        }
    }
}

#[test]
fn classify_recipe_errors_are_one_line() {
    let work = workdir();
    let w = work.path();
    let base = tiny_classify_recipe("r");

    // An unknown key: file, line, column and key path.
    let text = replace_line(&base, "hflip = true", "hflip = true\nflop = 1");
    write_recipe(w, "unknown.toml", &text);
    let line = line_of(&text, "flop");
    let e = trainer(w, &["validate", "unknown.toml"]).assert_one_error(&[&format!(
        "unknown.toml:{line}:1: data.flop: unknown field `flop`"
    )]);
    assert!(e.contains("crop_padding"), "{e}");
    // A range error names the key; the model must fit the data's classes.
    write_recipe(
        w,
        "classes.toml",
        &replace_line(&base, "num_classes = 10", "num_classes = 7"),
    );
    trainer(w, &["validate", "classes.toml"])
        .assert_one_error(&["model.num_classes", "has 10 classes"]);
    trainer(w, &["validate", "c.toml"]).assert_one_error(&["c.toml"]);
    write_recipe(w, "c.toml", &base);
    trainer(w, &["validate", "c.toml", "--set", "model.depth=21"])
        .assert_one_error(&["--set model.depth=21: model.depth: cifar_resnet depth must be 6n+2"]);
    // fp32 master copies of bf16 weights: language models only.
    let masters = "optim={kind=\"adamw\", lr=1e-3, master_weights=true}";
    trainer(w, &["validate", "c.toml", "--set", masters])
        .assert_one_error(&["optim.master_weights", "language-model"]);

    // A truncated CIFAR file: named, with what was expected.
    let cifar = w.join("cifar");
    std::fs::create_dir(&cifar).expect("mkdir");
    std::fs::write(cifar.join("data_batch_1.bin"), vec![1u8; 3073 * 2 + 17]).expect("write");
    std::fs::write(cifar.join("test_batch.bin"), vec![1u8; 3073]).expect("write");
    let text = replace_line(
        &base,
        r#"train = { kind = "builtin_shapes", split = "train", images = 2000 }"#,
        r#"train = { kind = "cifar10", path = "cifar", split = "train" }"#,
    );
    write_recipe(w, "cifar.toml", &text);
    trainer(w, &["validate", "cifar.toml"]).assert_success();
    trainer(w, &["run", "cifar.toml"]).assert_one_error(&[
        "data.train = cifar/data_batch_1.bin",
        "6163 bytes is not a whole number of 3073-byte CIFAR-10 records",
    ]);

    // A folder with an empty class directory.
    let folder = w.join("folder");
    std::fs::create_dir_all(folder.join("cat")).expect("mkdir");
    std::fs::create_dir_all(folder.join("dog")).expect("mkdir");
    std::fs::write(folder.join("dog/notes.txt"), "not an image").expect("write");
    let text = replace_line(
        &base,
        r#"train = { kind = "builtin_shapes", split = "train", images = 2000 }"#,
        r#"train = { kind = "folder", path = "folder" }"#,
    );
    let text = replace_line(
        &text,
        r#"valid = { kind = "builtin_shapes", split = "test", images = 300 }"#,
        r#"valid = { kind = "folder", path = "folder" }"#,
    );
    write_recipe(
        w,
        "folder.toml",
        &replace_line(&text, "num_classes = 10", "num_classes = 2"),
    );
    trainer(w, &["run", "folder.toml", "--set", "run.out_dir=f"])
        .assert_one_error(&["data.train = folder/cat: class folder holds no PNG or JPEG images"]);
    assert!(
        !w.join("r").exists() && !w.join("f").exists(),
        "a failed start wrote a run directory"
    );
}

/// `[init] from` a torchvision state dict saved as safetensors: the run starts from exactly those
/// weights (checked in its first checkpoint after one step of lr 1e-12), and `reinit` swaps in
/// a fresh head for another label set.
#[test]
fn torchvision_weights_initialise_a_classifier() {
    let dir = workdir();
    let cwd = dir.path();
    let script = "import sys, torch, torchvision\n\
                  from safetensors.torch import save_file\n\
                  torch.manual_seed(0)\n\
                  for path, classes in ((sys.argv[1], 10), (sys.argv[2], 1000)):\n\
                  \x20   m = torchvision.models.resnet18(weights=None, num_classes=classes)\n\
                  \x20   save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path)\n";
    let out = std::process::Command::new(python())
        .args([
            "-c",
            script,
            cwd.join("tv.safetensors").to_str().expect("utf-8"),
            cwd.join("tv1000.safetensors").to_str().expect("utf-8"),
        ])
        .output()
        .expect("python (run scripts/test, which installs torchvision)");
    assert!(
        out.status.success(),
        "torchvision export failed (run scripts/test): {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let base = tiny_classify_recipe("runs/tv");
    let base = replace_line(&base, "kind = \"cifar_resnet\"", "kind = \"resnet\"");
    let base = replace_line(&base, "depth = 8", "depth = 18");
    let base = replace_line(&base, "lr = 0.1", "lr = 1e-12");
    let base = replace_line(&base, "momentum = 0.9", "momentum = 0.0");
    let base = replace_line(&base, "nesterov = true", "nesterov = false");
    let base = replace_line(&base, "weight_decay = 5e-4", "weight_decay = 0.0");
    let recipe = base.replace("[model]", "[init]\nfrom = \"tv.safetensors\"\n\n[model]");
    let name = write_recipe(cwd, "tv.toml", &recipe);
    let set = [
        "--set",
        "train.max_steps=1",
        "--set",
        "schedule.warmup_steps=0",
        "--set",
        "train.eval_every=1",
    ];
    let mut args = vec!["run", name.as_str()];
    args.extend_from_slice(&set);
    trainer(cwd, &args).assert_success();

    let tv = tch::Tensor::read_safetensors(cwd.join("tv.safetensors")).expect("read");
    let ours = tch::Tensor::read_safetensors(
        cwd.join("runs/tv/checkpoints/step-00000001/model.safetensors"),
    )
    .expect("read");
    let ours: std::collections::BTreeMap<String, tch::Tensor> = ours.into_iter().collect();
    for (k, t) in &tv {
        if k.contains("running_") || k.ends_with("num_batches_tracked") {
            continue; // BatchNorm statistics move in the training step
        }
        let diff = (t - &ours[k]).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{k} differs from torchvision's by {diff}");
    }

    // Weights trained on another label set (torchvision's 1000 classes): the head is
    // re-initialised, everything else loads.
    let five = recipe
        .replace(
            "from = \"tv.safetensors\"",
            "from = \"tv1000.safetensors\"\nreinit = [\"fc.weight\", \"fc.bias\"]",
        )
        .replace("runs/tv", "runs/tv5");
    let name5 = write_recipe(cwd, "tv5.toml", &five);
    let mut args = vec!["run", name5.as_str()];
    args.extend_from_slice(&set);
    trainer(cwd, &args).assert_success();

    // Without reinit the head's shape mismatch is one clear line naming the tensor.
    let bad = recipe
        .replace("tv.safetensors", "tv1000.safetensors")
        .replace("runs/tv", "runs/tvbad");
    let bad_name = write_recipe(cwd, "bad.toml", &bad);
    let out = trainer(
        cwd,
        &[
            "run",
            &bad_name,
            "--set",
            "train.max_steps=1",
            "--set",
            "schedule.warmup_steps=0",
        ],
    );
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("fc.weight") && out.stderr.contains("[1000, 512]"),
        "{}",
        out.describe()
    );
}
