//! Checkpoints and exact resume, end to end with the real binary on the CPU: a run stopped by
//! SIGTERM (or killed) and resumed logs bitwise the same losses as the uninterrupted run, one row
//! per step; resuming from an older checkpoint replays the same steps bitwise; old checkpoints
//! are pruned; the run directory holds what DESIGN.md promises.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

const RECIPE: &str = "tiny.toml";
const STEPS: i64 = 40;

fn setup() -> tempfile::TempDir {
    let work = workdir();
    write_recipe(work.path(), RECIPE, &tiny_recipe("run"));
    work
}

/// Rows keyed by step; panics on a duplicated step (a resumed run must not log a step twice).
fn by_step(rows: &[Value], what: &str) -> BTreeMap<i64, Value> {
    let mut out = BTreeMap::new();
    for r in rows {
        let step = step_of(r);
        assert!(
            out.insert(step, r.clone()).is_none(),
            "{what}: step {step} is logged twice"
        );
    }
    out
}

/// Asserts that two runs logged the same steps with bitwise equal losses (and learning rates
/// and token counts) in both training and validation rows.
fn assert_bitwise_same(
    reference: &[Value],
    resumed: &[Value],
    steps: std::ops::RangeInclusive<i64>,
) {
    let (ra, rb) = (
        by_step(&train_rows(reference), "reference"),
        by_step(&train_rows(resumed), "resumed"),
    );
    for step in steps.clone() {
        let a = ra
            .get(&step)
            .unwrap_or_else(|| panic!("the reference run has no row for step {step}"));
        let b = rb
            .get(&step)
            .unwrap_or_else(|| panic!("the resumed run has no row for step {step}"));
        for key in ["loss", "lr"] {
            let (x, y) = (num(a, key), num(b, key));
            assert!(
                x == y,
                "step {step}: {key} {y:e} after resume, {x:e} uninterrupted (bits {:#x} vs {:#x})",
                y.to_bits(),
                x.to_bits()
            );
        }
        assert_eq!(a.get("tokens"), b.get("tokens"), "step {step}: tokens");
    }
    let keys = |m: &BTreeMap<i64, Value>| {
        m.keys()
            .copied()
            .filter(|s| steps.contains(s))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        keys(&ra),
        keys(&rb),
        "the two runs logged different training steps"
    );

    let (va, vb) = (
        by_step(&eval_rows(reference, "valid"), "reference eval"),
        by_step(&eval_rows(resumed, "valid"), "resumed eval"),
    );
    assert_eq!(
        keys(&va),
        keys(&vb),
        "the two runs evaluated at different steps"
    );
    for (step, a) in va.iter().filter(|(s, _)| steps.contains(s)) {
        let (x, y) = (num(a, "loss"), num(&vb[step], "loss"));
        assert!(
            x == y,
            "step {step}: valid loss {y:e} after resume, {x:e} uninterrupted"
        );
    }
}

/// The steps of the complete checkpoints (`step-NNNNNNNN`) of a run.
fn checkpoint_steps(run_dir: &Path) -> Vec<i64> {
    checkpoint_entries(run_dir)
        .iter()
        .filter_map(|n| n.strip_prefix("step-")?.parse().ok())
        .collect()
}

/// A run is stopped by `signal` once it has logged `at` steps, then resumed with `--resume auto`;
/// its metrics must equal the uninterrupted run's bitwise. Returns the step it stopped after.
fn stop_and_resume(signal: &str, at: i64) -> i64 {
    let work = setup();
    let w = work.path();
    let reference = run_tiny(w, RECIPE, "a", &[]);
    assert_eq!(
        train_rows(&reference).len() as i64,
        STEPS,
        "log_every = 1 logs every step"
    );

    let mut b = spawn(w, &["run", RECIPE, "--set", "run.out_dir=b"]);
    let seen = wait_for_step(&mut b, &w.join("b/metrics.jsonl"), at);
    send_signal(b.pid(), signal);
    let out = b.wait(TIMEOUT);
    let stopped = match signal {
        "KILL" => {
            assert_eq!(
                out.code,
                None,
                "SIGKILL ends the process without an exit code:\n{}",
                out.describe()
            );
            None
        }
        _ => {
            assert_eq!(
                out.code,
                Some(EXIT_INTERRUPTED),
                "SIGTERM after step {seen} of {STEPS} should stop the run with exit code {EXIT_INTERRUPTED} \
                 (0 means it finished before the signal landed):\n{}",
                out.describe()
            );
            assert!(!out.stderr.contains("panicked"), "{}", out.describe());
            assert!(
                out.stderr.contains("--resume auto"),
                "the stop message should say how to continue:\n{}",
                out.describe()
            );
            Some(())
        }
    };
    let ckpts = checkpoint_steps(&w.join("b"));
    let newest = *ckpts
        .last()
        .unwrap_or_else(|| panic!("no checkpoint after the {signal}"));
    let last_logged = last_logged_step(&w.join("b/metrics.jsonl")).expect("metrics rows");
    if stopped.is_some() {
        // The step in progress is finished and checkpointed, whatever checkpoint_every says.
        assert!(
            newest >= seen && newest < STEPS,
            "stopped at step {newest}, signalled after step {seen}"
        );
        assert_eq!(
            newest, last_logged,
            "the checkpoint is of the last logged step"
        );
    } else {
        assert!(
            newest <= last_logged && newest < STEPS,
            "newest checkpoint {newest}, last logged step {last_logged}"
        );
    }

    let out = trainer(
        w,
        &["run", RECIPE, "--set", "run.out_dir=b", "--resume", "auto"],
    );
    out.assert_success();
    let resumed = read_metrics(&w.join("b/metrics.jsonl"));
    assert_bitwise_same(&reference, &resumed, 1..=STEPS);
    assert_eq!(
        train_rows(&resumed).len() as i64,
        STEPS,
        "one training row per step"
    );
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(w.join("b/summary.json")).expect("summary"))
            .expect("json");
    assert_eq!(summary["steps"], STEPS);
    assert_eq!(summary["tokens"], STEPS * 64);
    assert!(
        summary["resumed_from"]
            .as_str()
            .is_some_and(|p| p.ends_with(&format!("step-{newest:08}"))),
        "{summary}"
    );
    // Both runs end with the same model, byte for byte.
    let model = |run: &str| {
        std::fs::read(
            w.join(run)
                .join(format!("checkpoints/step-{STEPS:08}/model.safetensors")),
        )
        .expect("final checkpoint")
    };
    assert!(
        model("a") == model("b"),
        "the final model of the resumed run differs from the uninterrupted one"
    );
    newest
}

#[test]
fn sigterm_then_resume_auto_is_bitwise_exact() {
    stop_and_resume("TERM", 12);
}

/// A crash: no chance to checkpoint, rows logged after the last checkpoint are logged again.
#[test]
fn sigkill_then_resume_auto_is_bitwise_exact() {
    stop_and_resume("KILL", 17);
}

#[test]
fn resume_from_an_older_checkpoint_replays_bitwise() {
    let work = setup();
    let w = work.path();
    let set = [
        "--set",
        "train.max_steps=20",
        "--set",
        "train.checkpoint_every=10",
        "--set",
        "train.keep_checkpoints=3",
    ];
    let first = run_tiny(w, RECIPE, "c", &set);
    assert_eq!(checkpoint_steps(&w.join("c")), vec![10, 20]);
    // Written in the background (train.async_checkpoints): the same curve and, byte for byte,
    // the same checkpoint files.
    let mut async_set = set.to_vec();
    async_set.extend(["--set", "train.async_checkpoints=true"]);
    let in_background = run_tiny(w, RECIPE, "a", &async_set);
    assert_bitwise_same(&first, &in_background, 1..=20);
    assert_eq!(checkpoint_steps(&w.join("a")), vec![10, 20]);
    for step in ["step-00000010", "step-00000020"] {
        for f in [
            "model.safetensors",
            "optimizer.safetensors",
            "checksums.json",
        ] {
            let read =
                |run: &str| std::fs::read(w.join(run).join("checkpoints").join(step).join(f));
            let (a, c) = (read("a").expect("async"), read("c").expect("sync"));
            // checksums.json covers state.json, whose train_seconds differ: compare the rest.
            if f == "checksums.json" {
                let a: Value = serde_json::from_slice(&a).expect("json");
                let c: Value = serde_json::from_slice(&c).expect("json");
                for k in ["model.safetensors", "optimizer.safetensors"] {
                    assert_eq!(a[k], c[k], "{step}/{k}");
                }
            } else {
                assert!(a == c, "{step}/{f} differs");
            }
        }
    }
    let model20 =
        std::fs::read(w.join("c/checkpoints/step-00000020/model.safetensors")).expect("model");
    let optim20 = std::fs::read(w.join("c/checkpoints/step-00000020/optimizer.safetensors"))
        .expect("optimizer");

    let mut args = vec![
        "run",
        RECIPE,
        "--set",
        "run.out_dir=c",
        "--resume",
        "c/checkpoints/step-00000010",
    ];
    args.extend_from_slice(&set);
    trainer(w, &args).assert_success();
    let second = read_metrics(&w.join("c/metrics.jsonl"));
    assert_bitwise_same(&first, &second, 1..=20);
    assert_eq!(
        train_rows(&second).len(),
        20,
        "steps 11..20 are logged once, not twice"
    );
    assert_eq!(
        eval_rows(&second, "valid").len(),
        2,
        "evals at 10 and 20, once each"
    );
    // The replayed checkpoint of step 20 replaced the first one and equals it byte for byte.
    assert_eq!(
        checkpoint_entries(&w.join("c")),
        vec!["step-00000010", "step-00000020"]
    );
    assert!(
        model20
            == std::fs::read(w.join("c/checkpoints/step-00000020/model.safetensors"))
                .expect("model"),
        "model differs"
    );
    assert!(
        optim20
            == std::fs::read(w.join("c/checkpoints/step-00000020/optimizer.safetensors"))
                .expect("optim"),
        "optimizer differs"
    );
}

#[test]
fn keep_checkpoints_keeps_the_newest_and_no_temporaries() {
    let work = setup();
    let w = work.path();
    run_tiny(w, RECIPE, "run", &["--set", "train.max_steps=23"]);
    // checkpoint_every 5 and at the end: 5, 10, 15, 20, 23; keep 2.
    assert_eq!(
        checkpoint_entries(&w.join("run")),
        vec!["step-00000020", "step-00000023"]
    );
    // The same when they are written in the background.
    let set = [
        "--set",
        "train.max_steps=23",
        "--set",
        "train.async_checkpoints=true",
    ];
    run_tiny(w, RECIPE, "bg", &set);
    assert_eq!(
        checkpoint_entries(&w.join("bg")),
        vec!["step-00000020", "step-00000023"]
    );
    for name in ["step-00000020", "step-00000023"] {
        for f in ["model.safetensors", "optimizer.safetensors", "state.json"] {
            assert!(
                w.join("run/checkpoints").join(name).join(f).is_file(),
                "{name}/{f} missing"
            );
        }
    }
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(w.join("run/checkpoints/step-00000023/state.json"))
            .expect("state.json"),
    )
    .expect("json");
    assert_eq!(state["step"], 23);
    assert_eq!(state["tokens"], 23 * 64);
}

#[test]
fn run_directory_summary_and_metrics_hold_the_documented_fields() {
    let work = setup();
    let w = work.path();
    let rows = run_tiny(w, RECIPE, "run", &[]);
    let run = w.join("run");
    for f in ["config.toml", "metrics.jsonl", "summary.json"] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let events: Vec<_> = std::fs::read_dir(run.join("tb"))
        .expect("tb/")
        .filter_map(|e| e.ok())
        .collect();
    assert!(
        events.iter().any(|e| e
            .file_name()
            .to_string_lossy()
            .starts_with("events.out.tfevents.")),
        "no event file in tb/"
    );
    // The resolved recipe is a valid recipe that gives the same run.
    let out = trainer(w, &["validate", "run/config.toml"]);
    out.assert_success();
    assert!(out.stdout.contains("max_steps = 40"), "{}", out.describe());

    let train = train_rows(&rows);
    assert_eq!(
        train.iter().map(step_of).collect::<Vec<_>>(),
        (1..=STEPS).collect::<Vec<_>>()
    );
    for r in &train {
        for key in ["loss", "lr", "tokens_per_s"] {
            let v = num(r, key);
            assert!(v.is_finite() && v > 0.0, "{key} = {v} in {r}");
        }
        assert_eq!(r["tokens"].as_i64(), Some(step_of(r) * 64), "{r}");
    }
    let evals = eval_rows(&rows, "valid");
    assert_eq!(
        evals.iter().map(step_of).collect::<Vec<_>>(),
        vec![10, 20, 30, 40]
    );
    for r in &evals {
        let loss = num(r, "loss");
        assert!(loss.is_finite() && loss > 0.0, "{r}");
    }
    assert!(
        rows.iter()
            .all(|r| r.get("split").is_none() || r["split"] == "valid"),
        "unexpected split"
    );

    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).expect("summary"))
            .expect("json");
    assert_eq!(summary["steps"], STEPS);
    assert_eq!(summary["tokens"], STEPS * 64);
    let final_valid = summary["final_valid_loss"]
        .as_f64()
        .unwrap_or_else(|| panic!("final_valid_loss: {summary}"));
    assert!(
        final_valid == num(evals.last().expect("evals"), "loss"),
        "final_valid_loss is the last eval's loss"
    );
    assert!(
        summary["peak_memory_bytes"].as_i64().is_some_and(|b| b > 0),
        "peak_memory_bytes: {summary}"
    );
    // Training made progress on the built-in corpus.
    assert!(
        final_valid < num(&evals[0], "loss"),
        "valid loss did not fall: {evals:?}"
    );
}

/// A finished run started again with `--resume auto` (a requeued Slurm job does this) has nothing
/// to do and must leave every file as it was: summary.json, metrics, tb/, checkpoints.
#[test]
fn resume_auto_on_a_finished_run_changes_nothing() {
    let work = setup();
    let w = work.path();
    run_tiny(w, RECIPE, "run", &["--set", "train.max_steps=10"]);
    let before = snapshot(&w.join("run"));
    let out = trainer(
        w,
        &[
            "run",
            RECIPE,
            "--set",
            "train.max_steps=10",
            "--resume",
            "auto",
        ],
    );
    out.assert_success();
    assert!(out.stderr.contains("nothing to do"), "{}", out.describe());
    assert_same_files(
        &before,
        &snapshot(&w.join("run")),
        "--resume auto on a finished run",
    );
}

/// Waits (at most 10 s) until signal `signal` is no longer pending for process `pid`, per the
/// SigPnd/ShdPnd masks of /proc/PID/status.
fn wait_until_delivered(pid: u32, signal: u32) {
    let bit = 1u64 << (signal - 1);
    let start = std::time::Instant::now();
    while start.elapsed() < std::time::Duration::from_secs(10) {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            return; // gone already
        };
        let pending = status
            .lines()
            .filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
            .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
            .any(|mask| mask & bit != 0);
        if !pending {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// SIGINT stops after the current step with a checkpoint (exit 75); a second SIGINT while that
/// is pending exits at once (exit 130) without writing a checkpoint of its own.
#[test]
fn first_sigint_checkpoints_second_sigint_exits_at_once() {
    let dir = workdir();
    let cwd = dir.path();
    // Steps long enough (a wider model, one thread) that two signals land within one step.
    let recipe = replace_line(&tiny_recipe("runs/int"), "d_model = 32", "d_model = 256");
    let recipe = replace_line(&recipe, "d_ff = 64", "d_ff = 1024");
    let recipe = replace_line(&recipe, "batch_size = 4", "batch_size = 32");
    let recipe = replace_line(&recipe, "checkpoint_every = 5", "checkpoint_every = 1000");
    let name = write_recipe(cwd, "int.toml", &recipe);
    let metrics = cwd.join("runs/int/metrics.jsonl");

    // One SIGINT: the run finishes its step, checkpoints and exits 75.
    let mut once = spawn(cwd, &["run", &name]);
    let step = wait_for_step(&mut once, &metrics, 2);
    send_signal(once.pid(), "INT");
    let out = once.wait(TIMEOUT);
    assert_eq!(out.code, Some(EXIT_INTERRUPTED), "{}", out.describe());
    let saved = checkpoint_entries(&cwd.join("runs/int"));
    assert_eq!(saved.len(), 1, "one checkpoint at the stop: {saved:?}");
    assert!(saved[0].starts_with("step-"), "{saved:?}");
    assert!(step >= 2);

    // Two SIGINTs in a row: the second one ends the process at once, code 130.
    let mut twice = spawn(cwd, &["run", &name, "--resume", "auto"]);
    let first = last_logged_step(&metrics).unwrap_or(0);
    wait_for_step(&mut twice, &metrics, first + 1);
    send_signal(twice.pid(), "INT");
    // Two signals sent back to back can merge into one while the first is still pending (a
    // loaded machine may not run the process in between): wait until it has been delivered.
    wait_until_delivered(twice.pid(), 2);
    send_signal(twice.pid(), "INT");
    let out = twice.wait(TIMEOUT);
    assert_eq!(out.code, Some(130), "{}", out.describe());
    assert_eq!(
        checkpoint_entries(&cwd.join("runs/int")),
        saved,
        "no new checkpoint after the second SIGINT"
    );
}
