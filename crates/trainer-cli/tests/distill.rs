//! Knowledge distillation end to end with the real binary on the CPU: a tiny teacher is trained
//! for a few steps, then a smaller student learns from it (a language model with a hidden-state
//! pair across different widths, and a CIFAR ResNet); its loss goes down, the kd and ce parts
//! are logged separately, and the distilled checkpoint is usable as a model. Bad `[distill]`
//! input is one line naming the key.

mod common;

use common::*;
use std::path::Path;

/// The mean of `key` over the first and the last `n` training rows.
fn first_and_last(rows: &[serde_json::Value], key: &str, n: usize) -> (f64, f64) {
    let train = train_rows(rows);
    assert!(train.len() >= 2 * n, "{} training rows", train.len());
    let mean = |r: &[serde_json::Value]| r.iter().map(|r| num(r, key)).sum::<f64>() / n as f64;
    (mean(&train[..n]), mean(&train[train.len() - n..]))
}

/// The tensor names in a safetensors file (its JSON header).
fn safetensors_names(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value =
        serde_json::from_slice(&bytes[8..8 + len]).expect("safetensors header");
    header
        .as_object()
        .expect("object")
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect()
}

/// The tiny recipe as a student: d_model 16 (the teacher's is 32), one layer.
fn student_recipe(out_dir: &str, distill: &str) -> String {
    let r = tiny_recipe(out_dir);
    let r = replace_line(&r, "d_model = 32", "d_model = 16");
    let r = replace_line(&r, "n_layers = 2", "n_layers = 1");
    let r = replace_line(&r, "max_steps = 40", "max_steps = 30");
    format!("{r}\n[distill]\n{distill}\n")
}

#[test]
fn a_language_model_student_learns_from_its_teacher_and_bad_teachers_are_named() {
    let work = workdir();
    let w = work.path();
    let teacher = replace_line(&tiny_recipe("teacher"), "max_steps = 40", "max_steps = 20");
    write_recipe(w, "teacher.toml", &teacher);
    trainer(w, &["run", "teacher.toml"]).assert_success();

    let distill = r#"teacher = "teacher"
loss = "forward_kl"
temperature = 2.0
alpha = 0.5
chunk_tokens = 24
hidden = [{ student = 1, teacher = 2 }]
hidden_loss = "cosine"
hidden_weight = 0.1"#;
    write_recipe(w, "student.toml", &student_recipe("student", distill));
    let out = trainer(w, &["run", "student.toml"]);
    out.assert_success();
    let rows = read_metrics(&w.join("student/metrics.jsonl"));
    for r in train_rows(&rows) {
        for key in ["loss", "kd_loss", "ce_loss", "hidden_loss"] {
            assert!(num(&r, key).is_finite(), "{key} in {r}");
        }
        // loss = 0.5 kd + 0.5 ce + 0.1 hidden
        let want =
            0.5 * num(&r, "kd_loss") + 0.5 * num(&r, "ce_loss") + 0.1 * num(&r, "hidden_loss");
        assert!(
            (num(&r, "loss") - want).abs() < 1e-4 * want.abs().max(1.0),
            "{r}"
        );
    }
    let (first, last) = first_and_last(&rows, "loss", 3);
    assert!(last < first - 0.3, "the loss went from {first} to {last}");
    let (kd_first, kd_last) = first_and_last(&rows, "kd_loss", 3);
    assert!(kd_last < kd_first, "kd went from {kd_first} to {kd_last}");

    // The projection (16 -> 32) is trained with the student and saved in its checkpoint...
    let ckpt = w.join("student/checkpoints/step-00000030");
    let names = safetensors_names(&ckpt.join("model.safetensors"));
    assert!(
        names.contains(&"distill.hidden.0.proj.weight".to_string()),
        "{names:?}"
    );
    // ...which still loads as a plain model.
    std::fs::write(
        w.join("corpus.txt"),
        "the quick brown fox jumps over the lazy dog. ".repeat(20),
    )
    .expect("corpus");
    trainer(
        w,
        &[
            "eval",
            "--init",
            "student",
            "--data",
            "corpus.txt",
            "--seq-len",
            "16",
            "--batches",
            "2",
            "--device",
            "cpu",
        ],
    )
    .assert_success();

    trainer(w, &["export", "student", "--to", "hf", "student-export"]).assert_success();
    let exported = safetensors_names(&w.join("student-export/model.safetensors"));
    assert!(
        exported.iter().all(|n| !n.starts_with("distill.")),
        "{exported:?}"
    );

    // Resumed from step 25 (weights, projection, optimizer state), steps 26..30 log the same
    // losses bitwise.
    trainer(
        w,
        &[
            "run",
            "student.toml",
            "--set",
            "run.out_dir=resumed",
            "--resume",
            "student/checkpoints/step-00000025",
        ],
    )
    .assert_success();
    let resumed = train_rows(&read_metrics(&w.join("resumed/metrics.jsonl")));
    let tail: Vec<_> = train_rows(&rows)
        .into_iter()
        .filter(|r| step_of(r) > 25)
        .collect();
    assert_eq!(resumed.len(), 5);
    for (a, b) in resumed.iter().zip(&tail) {
        for key in ["step", "loss", "kd_loss", "ce_loss", "hidden_loss"] {
            assert_eq!(a[key], b[key], "{key} after resuming: {a} vs {b}");
        }
    }

    // The same teacher exported to Hugging Face format (`hf:PATH`) teaches the same first step.
    trainer(w, &["export", "teacher", "--to", "hf", "teacher-hf"]).assert_success();
    let d = distill.replace("teacher = \"teacher\"", "teacher = \"hf:teacher-hf\"");
    write_recipe(w, "hf.toml", &student_recipe("student-hf", &d));
    let short = [
        "--set",
        "train.max_steps=2",
        "--set",
        "schedule.warmup_steps=1",
    ];
    trainer(w, &[&["run", "hf.toml"][..], &short].concat()).assert_success();
    let hf_rows = read_metrics(&w.join("student-hf/metrics.jsonl"));
    let (a, b) = (&train_rows(&rows)[0], &train_rows(&hf_rows)[0]);
    for key in ["kd_loss", "ce_loss", "hidden_loss"] {
        assert!(
            (num(a, key) - num(b, key)).abs() < 1e-5,
            "{key}: {a} vs {b}"
        );
    }

    // A teacher whose vocabulary differs from the student's.
    let r = replace_line(
        &student_recipe("s2", "teacher = \"teacher\""),
        "vocab_size = 256",
        "vocab_size = 320",
    );
    write_recipe(w, "vocab.toml", &r);
    trainer(w, &["run", "vocab.toml"]).assert_one_error(&[
        "distill.teacher: teacher has vocab_size 256 but the student's model.vocab_size is 320",
    ]);
    assert!(!w.join("s2").exists(), "a refused run writes nothing");
    // A teacher that is not there, hidden layers it lacks.
    write_recipe(
        w,
        "missing.toml",
        &student_recipe("s3", "teacher = \"nope\""),
    );
    trainer(w, &["run", "missing.toml"]).assert_one_error(&["distill.teacher:", "nope"]);
    let d = "teacher = \"teacher\"\nhidden = [{ student = 1, teacher = 5 }]";
    write_recipe(w, "layers.toml", &student_recipe("s4", d));
    trainer(w, &["run", "layers.toml"])
        .assert_one_error(&["distill.hidden: hidden[0].teacher = 5 but the teacher has 2 layers"]);
}

#[test]
fn bad_distill_values_are_one_line_errors_naming_the_key() {
    let work = workdir();
    let w = work.path();
    let cases = [
        (
            "teacher = \"t\"\ntemperature = 0.0",
            "distill.temperature: expected a positive number, got 0",
        ),
        (
            "teacher = \"t\"\ntemperature = -1.0",
            "distill.temperature: expected a positive number, got -1",
        ),
        (
            "teacher = \"t\"\nalpha = 1.5",
            "distill.alpha: expected a weight in [0, 1], got 1.5",
        ),
        (
            "teacher = \"t\"\nalpha = -0.1",
            "distill.alpha: expected a weight in [0, 1], got -0.1",
        ),
        (
            "teacher = \"t\"\nchunk_tokens = 0",
            "distill.chunk_tokens: expected a positive integer, got 0",
        ),
        (
            "teacher = \"t\"\nloss = \"kl\"",
            "distill.loss: unknown variant `kl`",
        ),
        (
            "teacher = \"t\"\ntemprature = 2.0",
            "distill.temprature: unknown field",
        ),
        (
            "teacher = \"\"",
            "distill.teacher: expected \"hf:PATH\" or the path",
        ),
    ];
    for (i, (distill, want)) in cases.iter().enumerate() {
        let name = write_recipe(w, &format!("bad{i}.toml"), &student_recipe("s", distill));
        trainer(w, &["validate", &name]).assert_one_error(&[want]);
    }
}

/// A CIFAR ResNet-8 on a slice of the built-in shapes (`classify.rs`'s tiny recipe, shorter).
fn classify_recipe(out_dir: &str, steps: i64, extra: &str) -> String {
    format!(
        r#"[run]
name = "c"
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
train = {{ kind = "builtin_shapes", split = "train", images = 1000 }}
valid = {{ kind = "builtin_shapes", split = "test", images = 100 }}

[optim]
kind = "sgd"
lr = 0.05
momentum = 0.9

[train]
batch_size = 32
max_steps = {steps}
log_every = 1
{extra}"#,
        out_dir = toml_str(out_dir)
    )
}

#[test]
fn a_resnet_student_learns_from_its_teacher() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "teacher.toml", &classify_recipe("teacher", 30, ""));
    trainer(w, &["run", "teacher.toml"]).assert_success();

    let distill =
        "\n[distill]\nteacher = \"teacher\"\nloss = \"jsd\"\ntemperature = 4.0\nalpha = 0.7\n";
    write_recipe(w, "student.toml", &classify_recipe("student", 30, distill));
    let out = trainer(w, &["run", "student.toml"]);
    out.assert_success();
    let rows = read_metrics(&w.join("student/metrics.jsonl"));
    for r in train_rows(&rows) {
        let want = 0.7 * num(&r, "kd_loss") + 0.3 * num(&r, "ce_loss");
        assert!((num(&r, "loss") - want).abs() < 1e-4, "{r}");
    }
    let (first, last) = first_and_last(&rows, "loss", 5);
    assert!(last < first, "the loss went from {first} to {last}");
    let (ce_first, ce_last) = first_and_last(&rows, "ce_loss", 5);
    assert!(ce_last < ce_first, "ce went from {ce_first} to {ce_last}");

    // A teacher with another label set, and hidden pairs (language models only).
    let bad = "\n[distill]\nteacher = \"teacher\"\n[distill.teacher_model]\nkind = \"cifar_resnet\"\ndepth = 8\nnum_classes = 5\n";
    write_recipe(w, "classes.toml", &classify_recipe("s2", 5, bad));
    trainer(w, &["run", "classes.toml"]).assert_one_error(&[
        "distill.teacher: teacher predicts 5 classes but the student's model.num_classes is 10",
    ]);
    let bad = "\n[distill]\nteacher = \"teacher\"\nhidden = [{ student = 1, teacher = 1 }]\n";
    write_recipe(w, "hidden.toml", &classify_recipe("s3", 5, bad));
    trainer(w, &["validate", "hidden.toml"])
        .assert_one_error(&["distill.hidden: hidden-state matching is for language models"]);
}

/// `configs/distill_quickstart.toml` and `configs/distill_classify.toml` run (two steps each)
/// from teachers made by the quickstart recipes, as their comments say.
#[test]
fn the_distill_configs_run_from_the_quickstart_teachers() {
    let work = workdir();
    let w = work.path();
    let config = |name: &str| repo_root().join("configs").join(name).display().to_string();
    let short = [
        "--set",
        "train.max_steps=2",
        "--set",
        "run.threads=1",
        "--set",
        "run.device=cpu",
    ];
    let run = |recipe: &str, extra: &[&str]| {
        let mut args = vec!["run", recipe];
        args.extend_from_slice(&short);
        args.extend_from_slice(extra);
        trainer(w, &args).assert_success();
    };
    let warmup = ["--set", "schedule.warmup_steps=1"];
    run(&config("quickstart.toml"), &warmup);
    run(&config("distill_quickstart.toml"), &warmup);
    let rows = read_metrics(&w.join("runs/distill_quickstart/metrics.jsonl"));
    let last = train_rows(&rows).pop().expect("a training row");
    for key in ["kd_loss", "ce_loss", "hidden_loss"] {
        assert!(num(&last, key).is_finite(), "{key} in {last}");
    }
    run(
        &config("classify_quickstart.toml"),
        &[&warmup[..], &["--set", "train.eval_every=2"]].concat(),
    );
    run(
        &config("distill_classify.toml"),
        &[&warmup[..], &["--set", "train.eval_every=2"]].concat(),
    );
    let rows = read_metrics(&w.join("runs/distill_classify/metrics.jsonl"));
    let last = train_rows(&rows).pop().expect("a training row");
    assert!(num(&last, "kd_loss").is_finite(), "{last}");
}
