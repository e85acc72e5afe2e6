//! Chat fine-tuning end to end through the real binary (configs/sft_chat.toml on the example
//! that configs/sft/make_sft_example.py makes: a tiny Qwen2-shaped checkpoint with its own BPE
//! tokenizer and ChatML template, and generated conversations):
//! - LoRA on packed conversations: the validation loss falls; the log reports the samples;
//! - the same with `data.packing = false` (one padded conversation per row);
//! - `trainer export --to peft`: peft loads the adapter on transformers' model, and the adapted
//!   model's loss on the validation conversations (rendered by transformers' own
//!   `apply_chat_template`) is below the base's (tests/reference/sft_reference.py);
//! - bad chat data is one line naming the file and line.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn python_script(script: &str, args: &[&str]) -> String {
    let out = Command::new(python())
        .arg(repo_root().join(script))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); set TRAINER_PYTHON", python()));
    assert!(
        out.status.success(),
        "{script} failed (exit {:?}); it needs torch, transformers, tokenizers and peft from scripts/requirements-test.txt:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn make_example(dir: &Path) {
    let out_dir = dir.join("runs/sft-example");
    python_script(
        "configs/sft/make_sft_example.py",
        &[out_dir.to_str().expect("utf-8")],
    );
}

fn recipe() -> String {
    repo_root()
        .join("configs/sft_chat.toml")
        .to_str()
        .expect("utf-8")
        .to_string()
}

fn valid_losses(run_dir: &Path) -> Vec<f64> {
    eval_rows(&read_metrics(&run_dir.join("metrics.jsonl")), "valid")
        .iter()
        .map(|r| num(r, "loss"))
        .collect()
}

#[test]
fn lora_sft_on_chat_data_learns_and_exports_an_adapter_peft_loads() {
    let work = workdir();
    let w = work.path();
    make_example(w);
    let r = recipe();
    let short = [
        "--set",
        "train.max_steps=60",
        "--set",
        "train.eval_every=20",
        "--set",
        "train.checkpoint_every=60",
        "--set",
        "run.threads=1",
    ];
    let mut args = vec!["run", r.as_str()];
    args.extend(short);
    let out = trainer(w, &args);
    out.assert_success();
    assert!(
        out.stderr
            .contains("data.train: 600 records -> 600 samples"),
        "{}",
        out.describe()
    );
    let summary = read_summary(&w.join("runs/sft-chat"));
    assert_eq!(summary["samples"]["train"]["samples"], 600, "{summary}");
    assert_eq!(summary["samples"]["train"]["truncated"], 0, "{summary}");
    let packed = valid_losses(&w.join("runs/sft-chat"));
    assert_eq!(packed.len(), 3, "{packed:?}");
    assert!(
        packed[2] < packed[0] - 0.05,
        "valid loss did not fall: {packed:?}"
    );

    // The same conversations from Parquet (as pyarrow writes them): the same samples.
    python_script(
        "crates/trainer-cli/tests/reference/tokenize_reference.py",
        &[
            "to_parquet",
            w.join("runs/sft-example/train.jsonl")
                .to_str()
                .expect("utf-8"),
            w.join("train.parquet").to_str().expect("utf-8"),
        ],
    );
    let mut args = vec!["run", r.as_str()];
    args.extend(short);
    args.extend([
        "--set",
        "data.train={kind=\"chat\", path=\"train.parquet\", tokenizer=\"runs/sft-example/model\"}",
        "--set",
        "run.out_dir=runs/sft-parquet",
    ]);
    let out = trainer(w, &args);
    out.assert_success();
    assert!(
        out.stderr
            .contains("data.train: 600 records -> 600 samples, 21936 tokens (6620 targets)"),
        "{}",
        out.describe()
    );
    assert_eq!(
        valid_losses(&w.join("runs/sft-parquet")),
        packed,
        "Parquet vs JSONL"
    );

    // One padded conversation per row: learns too.
    let mut args = vec!["run", r.as_str()];
    args.extend(short);
    args.extend([
        "--set",
        "data.packing=false",
        "--set",
        "run.out_dir=runs/sft-padded",
    ]);
    trainer(w, &args).assert_success();
    let padded = valid_losses(&w.join("runs/sft-padded"));
    assert!(
        padded[2] < padded[0] - 0.05,
        "valid loss did not fall: {padded:?}"
    );

    trainer(
        w,
        &[
            "export",
            "runs/sft-chat",
            "--to",
            "peft",
            "runs/sft-adapter",
        ],
    )
    .assert_success();
    let text = python_script(
        "crates/trainer-cli/tests/reference/sft_reference.py",
        &[
            "peft_chat_loss",
            w.join("runs/sft-example/model").to_str().expect("utf-8"),
            w.join("runs/sft-adapter").to_str().expect("utf-8"),
            w.join("runs/sft-example/valid.jsonl")
                .to_str()
                .expect("utf-8"),
        ],
    );
    let got: Value = serde_json::from_str(text.lines().last().expect("a line")).expect("JSON");
    assert!(num(&got, "lora_b_abs_sum") > 0.0, "{got}");
    assert!(
        num(&got, "peft") < num(&got, "base") - 0.05,
        "the adapter does not help under transformers: {got}"
    );
}

#[test]
fn bad_chat_data_is_one_line_naming_file_and_line() {
    let work = workdir();
    let w = work.path();
    make_example(w);
    let r = recipe();
    let cases = [
        (
            "{\"messages\": [{\"role\": \"wizard\", \"content\": \"hi\"}]}",
            "bad.jsonl:2: messages[0] has role \"wizard\"",
        ),
        ("{\"messages\": [", "bad.jsonl:2: not JSON"),
        ("{\"prompt\": \"x\"}", "bad.jsonl:2: no field \"messages\""),
    ];
    for (line, needle) in cases {
        let good =
            std::fs::read_to_string(w.join("runs/sft-example/train.jsonl")).expect("train.jsonl");
        let first = good.lines().next().expect("a record");
        std::fs::write(w.join("bad.jsonl"), format!("{first}\n{line}\n")).expect("write");
        let out = trainer(
            w,
            &[
                "run",
                &r,
                "--set",
                "data.train={kind=\"chat\", path=\"bad.jsonl\", tokenizer=\"runs/sft-example/model\"}",
            ],
        );
        out.assert_one_error(&[needle]);
        assert!(
            !w.join("runs/sft-chat").exists(),
            "a refused run left its directory"
        );
    }
    // A template that fails names the template and the record.
    std::fs::write(
        w.join("raise.jinja"),
        "{{ raise_exception('system role not supported') }}",
    )
    .expect("write");
    let out = trainer(
        w,
        &[
            "run",
            &r,
            "--set",
            "data.train={kind=\"chat\", path=\"runs/sft-example/train.jsonl\", tokenizer=\"runs/sft-example/model\", template=\"raise.jinja\"}",
        ],
    );
    out.assert_one_error(&["train.jsonl:1: the chat template failed: system role not supported"]);
    // Packing applies to samples only; chat data is not mixed with token streams.
    let q = repo_root().join("configs/quickstart.toml");
    let out = trainer(
        w,
        &[
            "validate",
            q.to_str().expect("utf-8"),
            "--set",
            "data.packing=false",
        ],
    );
    out.assert_one_error(&[
        "data.packing",
        "applies to chat and instruction sources only",
    ]);
}

/// Resuming a chat run from a checkpoint replays the same packed rows (the row plan is a pure
/// function of seed and step): the checkpoint at the end is byte for byte the uninterrupted
/// one. And the loss is the mean over the step's target tokens: 8 rows in one micro-batch or
/// 4 + 4 in two give the same losses.
#[test]
fn chat_runs_resume_exactly_and_normalise_over_target_tokens() {
    let work = workdir();
    let w = work.path();
    make_example(w);
    let r = recipe();
    let set = [
        "--set",
        "train.max_steps=12",
        "--set",
        "train.checkpoint_every=6",
        "--set",
        "train.eval_every=6",
        "--set",
        "train.log_every=1",
        "--set",
        "run.threads=1",
    ];
    let mut args = vec!["run", r.as_str()];
    args.extend(set);
    trainer(w, &args).assert_success();
    let model = |w: &Path| {
        std::fs::read(w.join("runs/sft-chat/checkpoints/step-00000012/model.safetensors"))
            .expect("model")
    };
    let first = model(w);
    let losses = |path: &Path| -> Vec<f64> {
        train_rows(&read_metrics(path))
            .iter()
            .map(|row| num(row, "loss"))
            .collect()
    };
    let straight = losses(&w.join("runs/sft-chat/metrics.jsonl"));
    args.extend(["--resume", "runs/sft-chat/checkpoints/step-00000006"]);
    trainer(w, &args).assert_success();
    assert!(first == model(w), "the resumed run ends on other weights");
    assert_eq!(losses(&w.join("runs/sft-chat/metrics.jsonl")), straight);

    let mut args = vec!["run", r.as_str()];
    args.extend(set);
    args.extend([
        "--set",
        "train.batch_size=4",
        "--set",
        "train.grad_accum=2",
        "--set",
        "run.out_dir=runs/accum",
    ]);
    trainer(w, &args).assert_success();
    let accum = losses(&w.join("runs/accum/metrics.jsonl"));
    assert_eq!(accum.len(), straight.len());
    for (a, b) in accum.iter().zip(&straight) {
        assert!((a - b).abs() < 1e-4 * b.abs(), "{accum:?} vs {straight:?}");
    }
}

/// Data parallel on packed chat rows: each rank takes its rows of the global batch (with their
/// segments and positions), and the loss is normalised over the target tokens of all ranks; two
/// processes log the losses of one.
#[test]
fn two_processes_match_one_on_packed_chat_data() {
    let work = workdir();
    let w = work.path();
    make_example(w);
    let r = recipe();
    let set = [
        "--set",
        "train.max_steps=6",
        "--set",
        "train.log_every=1",
        "--set",
        "train.eval_every=6",
        "--set",
        "train.grad_accum=2",
        "--set",
        "schedule.warmup_steps=2",
        "--set",
        "run.threads=1",
    ];
    let mut args = vec!["run", r.as_str()];
    args.extend(set);
    trainer(w, &args).assert_success();
    let mut args = vec![
        "launch",
        "--nproc",
        "2",
        r.as_str(),
        "--set",
        "run.out_dir=runs/two",
    ];
    args.extend(set);
    trainer(w, &args).assert_success();
    let rows = |dir: &str| read_metrics(&w.join(dir).join("metrics.jsonl"));
    let (one, two) = (rows("runs/sft-chat"), rows("runs/two"));
    let pairs = train_rows(&one).into_iter().zip(train_rows(&two)).chain(
        eval_rows(&one, "valid")
            .into_iter()
            .zip(eval_rows(&two, "valid")),
    );
    let mut n = 0;
    for (a, b) in pairs {
        let (x, y) = (num(&a, "loss"), num(&b, "loss"));
        assert!(
            (x - y).abs() < 1e-5 * x.abs(),
            "step {}: {x} vs {y}",
            step_of(&a)
        );
        n += 1;
    }
    assert_eq!(n, 7, "six steps and one evaluation");
}

/// Chat samples mixed with replayed token data (`[data.mixture]`): rows of both kinds in one
/// batch, the realised shares reported, and a resumed run reads exactly the rows the
/// uninterrupted one read (each sample source's cursor is recomputed from the steps).
#[test]
fn chat_mixed_with_replayed_tokens_trains_and_resumes_exactly() {
    let work = workdir();
    let w = work.path();
    make_example(w);
    let text = "The river runs past the old stone bridge. ".repeat(300);
    std::fs::write(w.join("replay.txt"), text).expect("write");
    trainer(
        w,
        &[
            "tokenize",
            "replay.txt",
            "--tokenizer",
            "runs/sft-example/model",
            "--out",
            "replay.bin",
        ],
    )
    .assert_success();
    let base = std::fs::read_to_string(recipe()).expect("recipe");
    let train_line = base
        .lines()
        .find(|l| l.starts_with("train = "))
        .expect("a train line");
    let mut text = replace_line(&base, train_line, "");
    text.push_str(
        "\n[[data.mixture.sources]]\nname = \"chat\"\nweight = 0.7\n\
         source = { kind = \"chat\", path = \"runs/sft-example/train.jsonl\", tokenizer = \"runs/sft-example/model\" }\n\
         \n[[data.mixture.sources]]\nname = \"replay\"\nweight = 0.3\n\
         source = { kind = \"tokens\", path = \"replay.bin\" }\n",
    );
    let r = write_recipe(w, "mixed.toml", &text);
    let set = [
        "--set",
        "train.max_steps=12",
        "--set",
        "train.checkpoint_every=6",
        "--set",
        "train.eval_every=6",
        "--set",
        "train.log_every=1",
        "--set",
        "run.threads=1",
    ];
    let mut args = vec!["run", r.as_str()];
    args.extend(set);
    trainer(w, &args).assert_success();
    let rows = read_metrics(&w.join("runs/sft-chat/metrics.jsonl"));
    let last = train_rows(&rows).last().cloned().expect("rows");
    let (chat, replay) = (
        num(&last, "mix_chat_fraction"),
        num(&last, "mix_replay_fraction"),
    );
    assert!(
        (chat + replay - 1.0).abs() < 1e-9 && chat > 0.5 && replay > 0.1,
        "{last}"
    );
    let model = || {
        std::fs::read(w.join("runs/sft-chat/checkpoints/step-00000012/model.safetensors"))
            .expect("model")
    };
    let first = model();
    let summary = read_summary(&w.join("runs/sft-chat"));
    assert_eq!(summary["samples"]["chat"]["records"], 600, "{summary}");
    assert!(summary["samples"].get("replay").is_none(), "{summary}");
    args.extend(["--resume", "runs/sft-chat/checkpoints/step-00000006"]);
    trainer(w, &args).assert_success();
    assert!(
        first == model(),
        "the resumed mixed run ends on other weights"
    );
}

/// Distillation on chat data: with one conversation per row (`data.packing = false`) the
/// teacher's and student's distributions are compared on the assistant tokens (the targets);
/// packed rows with a teacher are refused in one line.
#[test]
fn distillation_reads_chat_rows_one_per_row_and_refuses_packed_ones() {
    let work = workdir();
    let w = work.path();
    make_example(w);
    let mut text = std::fs::read_to_string(recipe()).expect("recipe");
    text.push_str(
        "\n[distill]\nteacher = \"hf:runs/sft-example/model\"\nloss = \"forward_kl\"\n\
         temperature = 2.0\nalpha = 0.5\n",
    );
    let r = write_recipe(w, "distill.toml", &text);
    let set = [
        "--set",
        "train.max_steps=4",
        "--set",
        "train.eval_every=4",
        "--set",
        "train.log_every=1",
        "--set",
        "schedule.warmup_steps=1",
        "--set",
        "run.threads=1",
    ];
    let mut args = vec!["run", r.as_str(), "--set", "data.packing=false"];
    args.extend(set);
    trainer(w, &args).assert_success();
    let rows = read_metrics(&w.join("runs/sft-chat/metrics.jsonl"));
    let first = &train_rows(&rows)[0];
    assert!(num(first, "loss").is_finite(), "{first}");
    let mut args = vec!["run", r.as_str(), "--set", "run.out_dir=runs/packed"];
    args.extend(set);
    trainer(w, &args).assert_one_error(&["data.packing", "cannot be distilled yet"]);
}
