//! Nothing lost, nothing trusted blindly, end to end with the real binary: the run directory's
//! lock (a second start, and a `--resume auto` during a live run, are refused in one line naming
//! the holder; `--wait-for-lock` waits for the holder and resumes after it; a dead holder never
//! blocks), checkpoint checksums (flipped bytes and an edited
//! step are found by `trainer verify`, `--resume auto` falls back to the newest intact
//! checkpoint, an explicitly named corrupt one is an error), and leftovers of an interrupted
//! deletion removed at the next start.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::Path;

const RECIPE: &str = "tiny.toml";

fn error_lines(out: &Out) -> Vec<String> {
    out.stderr
        .lines()
        .filter(|l| l.starts_with("error:"))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_live_run_directory_is_locked_and_a_dead_holder_never_blocks() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, RECIPE, &tiny_recipe("live"));
    // Long enough to be alive while the others try.
    let mut holder = spawn(
        w,
        &[
            "run",
            RECIPE,
            "--set",
            "train.max_steps=100000",
            "--set",
            "train.checkpoint_every=50",
        ],
    );
    wait_for_step(&mut holder, &w.join("live/metrics.jsonl"), 3);
    for resume in [None, Some("auto")] {
        let mut args = vec!["run", RECIPE];
        if let Some(r) = resume {
            args.extend(["--resume", r]);
        }
        let out = trainer(w, &args);
        assert_eq!(out.code, Some(1), "{}", out.describe());
        let errors = error_lines(&out);
        assert_eq!(errors.len(), 1, "{}", out.describe());
        assert!(
            errors[0].contains("in use by another run")
                && errors[0].contains(&format!("pid {}", holder.pid())),
            "{}",
            errors[0]
        );
    }
    // A requeued start with --wait-for-lock waits for the holder instead of failing, then
    // resumes from the checkpoint the holder wrote when it stopped.
    let mut waiter = spawn(
        w,
        &[
            "run",
            RECIPE,
            "--resume",
            "auto",
            "--wait-for-lock",
            "600",
            "--set",
            "train.max_steps=100000",
            "--set",
            "train.checkpoint_every=50",
        ],
    );
    let start = std::time::Instant::now();
    while !waiter.stderr_so_far().contains("waiting up to 600 s") {
        assert!(waiter.try_wait().is_none(), "{}", waiter.stderr_so_far());
        assert!(start.elapsed() < TIMEOUT, "{}", waiter.stderr_so_far());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    send_signal(holder.pid(), "TERM");
    let out = holder.wait(TIMEOUT);
    assert_eq!(out.code, Some(EXIT_INTERRUPTED), "{}", out.describe());
    let held_until = last_logged_step(&w.join("live/metrics.jsonl")).expect("rows");
    wait_for_step(&mut waiter, &w.join("live/metrics.jsonl"), held_until + 2);
    send_signal(waiter.pid(), "TERM");
    let out = waiter.wait(TIMEOUT);
    assert_eq!(out.code, Some(EXIT_INTERRUPTED), "{}", out.describe());
    assert!(
        out.stderr.contains(&format!("step-{held_until:08}")),
        "the waiter resumed from the holder's last checkpoint (step {held_until}): {}",
        out.describe()
    );
    // The two runs' metrics follow each other: one row per step, no step twice, none missing.
    let steps: Vec<i64> = train_rows(&read_metrics(&w.join("live/metrics.jsonl")))
        .iter()
        .map(step_of)
        .collect();
    let last = *steps.last().expect("rows");
    assert!(last >= held_until + 2);
    assert_eq!(steps, (1..=last).collect::<Vec<_>>());
    // Without --wait-for-lock's patience: a short wait on a live run ends in one line.
    let mut holder = spawn(
        w,
        &[
            "run",
            RECIPE,
            "--resume",
            "auto",
            "--set",
            "train.max_steps=100000",
        ],
    );
    wait_for_step(&mut holder, &w.join("live/metrics.jsonl"), last + 1);
    let out = trainer(
        w,
        &["run", RECIPE, "--resume", "auto", "--wait-for-lock", "1"],
    );
    out.assert_one_error(&["in use by another run", "still held after waiting 1 s"]);
    send_signal(holder.pid(), "TERM");
    let out = holder.wait(TIMEOUT);
    assert_eq!(out.code, Some(EXIT_INTERRUPTED), "{}", out.describe());
    let last = last_logged_step(&w.join("live/metrics.jsonl")).expect("rows");
    // The lock file stays behind, but its holder is gone: a resume goes ahead.
    assert!(w.join("live/.lock").is_file());
    let more = format!("train.max_steps={}", last + 2);
    let out = trainer(w, &["run", RECIPE, "--resume", "auto", "--set", &more]);
    out.assert_success();
}

/// Flips a byte near the end of `file` (tensor data, the header intact).
fn flip_a_byte(file: &Path) {
    let mut bytes = std::fs::read(file).expect("read");
    let i = bytes.len() - 7;
    bytes[i] ^= 0x5a;
    std::fs::write(file, bytes).expect("write");
}

#[test]
fn corrupt_checkpoints_are_found_and_resume_falls_back_to_an_intact_one() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, RECIPE, &tiny_recipe("run"));
    trainer(w, &["run", RECIPE, "--set", "train.max_steps=20"]).assert_success();
    let ckpts = w.join("run/checkpoints");
    let (older, newest) = (ckpts.join("step-00000015"), ckpts.join("step-00000020"));
    assert!(older.join("checksums.json").is_file() && newest.join("checksums.json").is_file());
    let verify = trainer(w, &["verify", "run"]);
    verify.assert_success();
    assert_eq!(
        verify.stdout.matches(": ok (").count(),
        2,
        "{}",
        verify.describe()
    );

    flip_a_byte(&newest.join("model.safetensors"));
    let verify = trainer(w, &["verify", "run"]);
    assert_eq!(verify.code, Some(1), "{}", verify.describe());
    assert!(
        verify.stdout.contains("step-00000020: CORRUPT")
            && verify.stdout.contains("model.safetensors")
            && verify.stdout.contains("step-00000015: ok"),
        "{}",
        verify.describe()
    );
    // Named explicitly, the corrupt checkpoint is refused in one line.
    let named = trainer(
        w,
        &[
            "run",
            RECIPE,
            "--set",
            "train.max_steps=25",
            "--resume",
            "run/checkpoints/step-00000020",
        ],
    );
    assert_eq!(named.code, Some(1), "{}", named.describe());
    let errors = error_lines(&named);
    assert_eq!(errors.len(), 1, "{}", named.describe());
    assert!(errors[0].contains("checksum mismatch"), "{}", errors[0]);
    // `--resume auto` warns and continues from the newest intact checkpoint.
    let auto = trainer(
        w,
        &[
            "run",
            RECIPE,
            "--set",
            "train.max_steps=25",
            "--resume",
            "auto",
        ],
    );
    auto.assert_success();
    assert!(
        auto.stderr.contains("not resuming from") && auto.stderr.contains("step-00000020"),
        "{}",
        auto.describe()
    );
    let summary = read_summary(&w.join("run"));
    assert!(
        summary["resumed_from"]
            .as_str()
            .is_some_and(|p| p.ends_with("step-00000015")),
        "{summary}"
    );

    // An edited step in state.json is found too.
    let state = ckpts.join("step-00000025/state.json");
    let text = std::fs::read_to_string(&state).expect("state");
    std::fs::write(&state, text.replace("\"step\": 25", "\"step\": 99")).expect("edit");
    let verify = trainer(w, &["verify", "run/checkpoints/step-00000025"]);
    assert_eq!(verify.code, Some(1), "{}", verify.describe());
    assert!(
        verify.stdout.contains("state.json"),
        "{}",
        verify.describe()
    );
}

#[test]
fn leftovers_of_an_interrupted_deletion_are_removed_at_the_next_start() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, RECIPE, &tiny_recipe("run"));
    trainer(w, &["run", RECIPE, "--set", "train.max_steps=10"]).assert_success();
    let ckpts = w.join("run/checkpoints");
    // What a kill -9 during a deletion leaves: a renamed-away directory (this version) and a
    // step directory without its state.json (an earlier version's in-place deletion).
    std::fs::create_dir_all(ckpts.join(".del-step-00000005-4242")).expect("mkdir");
    std::fs::write(
        ckpts.join(".del-step-00000005-4242/model.safetensors"),
        b"x",
    )
    .expect("w");
    std::fs::create_dir_all(ckpts.join("step-00000003")).expect("mkdir");
    std::fs::write(ckpts.join("step-00000003/optimizer.safetensors"), b"x").expect("w");
    trainer(
        w,
        &[
            "run",
            RECIPE,
            "--set",
            "train.max_steps=15",
            "--resume",
            "auto",
        ],
    )
    .assert_success();
    let left: BTreeSet<String> = std::fs::read_dir(&ckpts)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        left,
        ["step-00000010", "step-00000015"]
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
    );
}

/// A run's config.toml is bounded by its checkpoint's weights as an hf: config.json is: an edited
/// size is one line before anything is allocated.
#[test]
fn an_edited_run_config_is_bounded_by_its_weights() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, RECIPE, &tiny_recipe("run"));
    trainer(w, &["run", RECIPE, "--set", "train.max_steps=5"]).assert_success();
    std::fs::write(
        w.join("data.txt"),
        "some text to evaluate on, long enough ".repeat(20),
    )
    .expect("data");
    let config = w.join("run/config.toml");
    let text = std::fs::read_to_string(&config).expect("config");
    for (from, to) in [
        ("vocab_size = 256", "vocab_size = 1000000000000"),
        ("n_layers = 2", "n_layers = 1000000"),
    ] {
        assert!(text.contains(from), "{text}");
        std::fs::write(&config, text.replace(from, to)).expect("edit");
        let out = trainer(
            w,
            &[
                "eval",
                "--init",
                "run",
                "--data",
                "data.txt",
                "--seq-len",
                "8",
            ],
        );
        out.assert_one_error(&["config.toml", "parameters"]);
    }
}

/// A model whose weights cannot fit in the memory this machine has free is refused in one line
/// before anything is allocated (here with the free memory stated through
/// TRAINER_ASSUME_MEMORY_AVAILABLE), for evaluation and for training; training also counts the
/// gradients, the optimizer state and a micro-batch's logits; TRAINER_NO_MEMORY_CHECK=1 goes
/// ahead anyway.
#[test]
fn a_model_larger_than_free_memory_is_refused_before_allocating() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, RECIPE, &tiny_recipe("run"));
    trainer(w, &["run", RECIPE, "--set", "train.max_steps=5"]).assert_success();
    std::fs::write(
        w.join("data.txt"),
        "some text to evaluate on, long enough ".repeat(20),
    )
    .expect("data");
    let tiny_memory = [("TRAINER_ASSUME_MEMORY_AVAILABLE", "1000".to_string())];
    let eval = [
        "eval",
        "--init",
        "run",
        "--data",
        "data.txt",
        "--seq-len",
        "8",
    ];
    let line = spawn_env(w, &eval, &tiny_memory)
        .wait(TIMEOUT)
        .assert_one_error(&["parameters): at least", "GiB", "TRAINER_NO_MEMORY_CHECK=1"]);
    let params: u64 = line
        .split("model (")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no parameter count in {line}"));
    let fresh = ["run", RECIPE, "--set", "run.out_dir=other"];
    spawn_env(w, &fresh, &tiny_memory)
        .wait(TIMEOUT)
        .assert_one_error(&["training: at least", "weights"]);
    assert!(!w.join("other").exists(), "a refused start writes nothing");
    // Room for the fp32 weights, not for training them: evaluation goes ahead, training is
    // refused naming its gradients, AdamW's moments and the logits of a micro-batch.
    let weights_only = [(
        "TRAINER_ASSUME_MEMORY_AVAILABLE",
        (params * 4 + 1000).to_string(),
    )];
    spawn_env(w, &eval, &weights_only)
        .wait(TIMEOUT)
        .assert_success();
    spawn_env(w, &fresh, &weights_only)
        .wait(TIMEOUT)
        .assert_one_error(&[
            "training: at least",
            "gradients",
            "optimizer state",
            "logits",
        ]);
    assert!(!w.join("other").exists(), "a refused start writes nothing");
    // Weights, gradients, AdamW's two moments (16 bytes per parameter) and the logits
    // (4 rows x 16 positions x 256 tokens x 4 bytes) fit exactly.
    let enough = [(
        "TRAINER_ASSUME_MEMORY_AVAILABLE",
        (params * 16 + 4 * 16 * 256 * 4).to_string(),
    )];
    let short = [
        "run",
        RECIPE,
        "--set",
        "run.out_dir=other",
        "--set",
        "train.max_steps=6",
    ];
    let one_byte_short = [(
        "TRAINER_ASSUME_MEMORY_AVAILABLE",
        (params * 16 + 4 * 16 * 256 * 4 - 1).to_string(),
    )];
    spawn_env(w, &short, &one_byte_short)
        .wait(TIMEOUT)
        .assert_one_error(&["training: at least"]);
    spawn_env(w, &short, &enough).wait(TIMEOUT).assert_success();
    let brave = [
        tiny_memory[0].clone(),
        ("TRAINER_NO_MEMORY_CHECK", "1".to_string()),
    ];
    spawn_env(w, &eval, &brave).wait(TIMEOUT).assert_success();
}
