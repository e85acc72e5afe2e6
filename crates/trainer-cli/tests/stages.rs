//! Multi-stage recipes (`[[stages]]`), end to end with the real binary on the CPU: two stages
//! with different data (the built-in corpus, then a mixture with a synthetic text) and different
//! schedules and peak LRs run as one run with one step counter; the logged LR and the mixture
//! fractions change at the boundary; a run stopped by SIGTERM inside stage 2 and resumed logs
//! bitwise the losses of the uninterrupted run; every metrics row names its stage (`stage`), also
//! after the resume; bad input is one line naming the key.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// A synthetic corpus far from English (as in mixture.rs).
fn alphabet_text(n: usize) -> String {
    let letters: Vec<char> = "abcdefghijklmnopqrstuvwxyz".chars().collect();
    let mut out = String::with_capacity(n);
    let mut i = 0usize;
    while out.len() < n {
        out.push(letters[(i * (1 + (i / 26) % 3)) % 26]);
        if i % 13 == 12 {
            out.push(' ');
        }
        i += 1;
    }
    out
}

/// Stage "english": 20 steps on the built-in corpus with the tiny recipe's cosine schedule
/// (peak 3e-3, warmup 5, min 3e-4). Stage "alpha": 20 steps on 90% alpha.txt + 10% replay,
/// peak LR 1e-3, re-warmed from 3e-4 over 4 steps and decayed linearly to 1e-4.
const STAGES: &str = r#"
[[stages]]
name = "english"
steps = 20

[[stages]]
name = "alpha"
steps = 20
set = { "optim.lr" = 1e-3 }
schedule = { kind = "rewarm", start_lr = 3e-4, warmup_steps = 4, decay_shape = "linear", min_lr = 1e-4 }

[stages.data.mixture]
sources = [
  { name = "new", weight = 0.9, source = { kind = "text", path = "alpha.txt" } },
  { name = "replay", weight = 0.1, source = { kind = "builtin" } },
]
"#;

fn staged_recipe(w: &Path, stages: &str) -> String {
    std::fs::write(w.join("alpha.txt"), alphabet_text(20_000)).expect("writing alpha.txt");
    let base = tiny_recipe("run");
    let base = replace_line(&base, "max_steps = 40", "");
    let base = replace_line(&base, "keep_checkpoints = 2", "keep_checkpoints = 10");
    format!("{base}{stages}")
}

fn by_step(rows: &[Value]) -> BTreeMap<i64, Value> {
    rows.iter().map(|r| (step_of(r), r.clone())).collect()
}

fn close(x: f64, want: f64) -> bool {
    (x - want).abs() <= 1e-12 * want.abs().max(1e-12)
}

#[test]
fn two_stages_switch_schedule_and_data_at_the_boundary_and_resume_bitwise() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "staged.toml", &staged_recipe(w, STAGES));

    let out = trainer(w, &["validate", "staged.toml"]);
    out.assert_success();
    assert!(
        out.stderr.contains("2 stages, 40 steps"),
        "{}",
        out.describe()
    );

    let reference = run_tiny(w, "staged.toml", "a", &[]);
    let train = by_step(&train_rows(&reference));
    assert_eq!(
        train.keys().copied().collect::<Vec<_>>(),
        (1..=40).collect::<Vec<_>>(),
        "one row per step, the counter continuing across the stages"
    );
    // Row `s` reports the LR of step index s - 1.
    let lr = |s: i64| num(&train[&s], "lr");
    let pi = std::f64::consts::PI;
    let cosine = |i: f64| 3e-4 + (3e-3 - 3e-4) * 0.5 * (1.0 + (pi * (i - 5.0) / 15.0).cos());
    for (s, want) in [
        (1, 3e-3 / 5.0),
        (5, 3e-3),
        (6, cosine(5.0)),
        (20, cosine(19.0)),
        // Stage 2's own schedule, counted from its first step (index 20): warmup from 3e-4.
        (21, 3e-4 + (1e-3 - 3e-4) / 4.0),
        (24, 1e-3),
        (25, 1e-3),
        (40, 1e-3 + (1e-4 - 1e-3) * 15.0 / 16.0),
    ] {
        assert!(close(lr(s), want), "row {s}: lr {} != {want}", lr(s));
    }
    // `trainer schedule` shows the LR the stages train with.
    trainer(w, &["schedule", "staged.toml", "--csv", "lr.csv"]).assert_success();
    let csv = std::fs::read_to_string(w.join("lr.csv")).expect("lr.csv");
    let planned: Vec<f64> = csv
        .lines()
        .filter_map(|l| l.split_once(',')?.1.parse().ok())
        .collect();
    assert_eq!(planned.len(), 40, "{csv}");
    for s in 1..=40 {
        let want = planned[s as usize - 1];
        assert!(
            close(lr(s), want),
            "step {s}: logged {} planned {want}",
            lr(s)
        );
    }
    // The mixture exists from stage 2 on, and its fractions count stage 2's sequences alone.
    for s in 1..=20 {
        assert!(train[&s].get("mix_new_fraction").is_none(), "row {s}");
    }
    for s in 21..=40 {
        let (new, replay) = (
            num(&train[&s], "mix_new_fraction"),
            num(&train[&s], "mix_replay_fraction"),
        );
        assert!(close(new + replay, 1.0), "row {s}: {new} + {replay}");
    }
    let new40 = num(&train[&40], "mix_new_fraction");
    assert!((0.75..=1.0).contains(&new40), "realised share {new40}");
    // Stage 1 validates on the built-in held-out tenth, stage 2 on each source's.
    let steps_of = |split: &str| {
        eval_rows(&reference, split)
            .iter()
            .map(step_of)
            .collect::<Vec<_>>()
    };
    assert_eq!(steps_of("valid"), vec![10, 20]);
    assert_eq!(steps_of("new"), vec![30, 40]);
    assert_eq!(steps_of("replay"), vec![30, 40]);
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(w.join("a/summary.json")).expect("summary.json"),
    )
    .expect("json");
    assert_eq!(summary["steps"], 40);
    // Every row names its stage: row s belongs to the stage that ran optimizer step s, so the
    // boundary rows are 20 ("english", also its last evaluation) and 21 ("alpha").
    assert_stages(&reference);
    assert_eq!(
        summary["stages"],
        serde_json::json!([
            { "name": "english", "steps": 20, "first_step": 1, "last_step": 20 },
            { "name": "alpha", "steps": 20, "first_step": 21, "last_step": 40 },
        ]),
        "{summary}"
    );
    assert!(
        summary["mixture"]["new"]["fraction"].as_f64() == Some(new40),
        "{summary}"
    );
    // The first stage's resolved recipe is kept beside the second's.
    assert!(w.join("a/config.before-step-20.toml").is_file());

    // Stopped inside stage 2, resumed: bitwise the same rows.
    let mut b = spawn(w, &["run", "staged.toml", "--set", "run.out_dir=b"]);
    let seen = wait_for_step(&mut b, &w.join("b/metrics.jsonl"), 26);
    send_signal(b.pid(), "TERM");
    let out = b.wait(TIMEOUT);
    assert_eq!(
        out.code,
        Some(EXIT_INTERRUPTED),
        "SIGTERM after step {seen} should stop the run:\n{}",
        out.describe()
    );
    let stopped = last_logged_step(&w.join("b/metrics.jsonl")).expect("rows");
    assert!((21..40).contains(&stopped), "stopped at {stopped}");
    trainer(
        w,
        &[
            "run",
            "staged.toml",
            "--set",
            "run.out_dir=b",
            "--resume",
            "auto",
        ],
    )
    .assert_success();
    let resumed = read_metrics(&w.join("b/metrics.jsonl"));
    assert_stages(&resumed);
    let resumed_train = by_step(&train_rows(&resumed));
    assert_eq!(train.len(), resumed_train.len());
    for (s, a) in &train {
        let b = &resumed_train[s];
        for key in ["loss", "lr", "mix_new_fraction"] {
            assert_eq!(
                a.get(key).and_then(Value::as_f64).map(f64::to_bits),
                b.get(key).and_then(Value::as_f64).map(f64::to_bits),
                "row {s}: {key} after resume differs (stopped after {stopped})"
            );
        }
    }
    for split in ["valid", "new", "replay"] {
        let (x, y) = (eval_rows(&reference, split), eval_rows(&resumed, split));
        assert_eq!(x.len(), y.len(), "{split}");
        for (a, b) in x.iter().zip(&y) {
            assert_eq!(
                num(a, "loss").to_bits(),
                num(b, "loss").to_bits(),
                "{split}"
            );
        }
    }
    // Resuming a finished staged run does nothing.
    let out = trainer(
        w,
        &[
            "run",
            "staged.toml",
            "--set",
            "run.out_dir=b",
            "--resume",
            "auto",
        ],
    );
    out.assert_success();
    assert!(out.stderr.contains("nothing to do"), "{}", out.describe());
}

/// The `stage` of every row of a run of `STAGES`: "english" for steps 1..=20, "alpha" after.
fn assert_stages(rows: &[Value]) {
    let train = train_rows(rows);
    assert_eq!(train.len(), 40);
    for r in rows {
        let want = if step_of(r) <= 20 { "english" } else { "alpha" };
        assert_eq!(r.get("stage").and_then(Value::as_str), Some(want), "{r}");
    }
    let at = |split: &str, step: i64| {
        eval_rows(rows, split)
            .into_iter()
            .find(|r| step_of(r) == step)
            .unwrap_or_else(|| panic!("no {split} row at step {step}"))
    };
    assert_eq!(at("valid", 20)["stage"], "english");
    assert_eq!(at("new", 30)["stage"], "alpha");
    assert_eq!(by_step(&train)[&21]["stage"], "alpha");
}

#[test]
fn bad_stages_are_one_line_errors_naming_the_key() {
    let work = workdir();
    let w = work.path();
    let cases: Vec<(String, Vec<&str>)> =
        vec![
        (
            STAGES.replace("name = \"english\"", "name = \"english\"\nlr = 1.0"),
            vec!["stages[0].lr", "unknown key"],
        ),
        (
            STAGES.replace("steps = 20\nset", "steps = 0\nset"),
            vec!["stages[1].steps", "positive"],
        ),
        (
            STAGES.replace("\"optim.lr\" = 1e-3", "\"optim.lrr\" = 1e-3"),
            vec!["lrr"],
        ),
        (
            STAGES.replace("warmup_steps = 4", "warmup_steps = 30"),
            vec!["stages[1]", "warmup_steps", "20 steps"],
        ),
        (
            STAGES.replace("name = \"alpha\"", "name = \"english\""),
            vec!["stages[1].name", "unique"],
        ),
        (
            STAGES.replace("path = \"alpha.txt\"", "path = \"missing.txt\""),
            vec!["alpha", "data.mixture.sources[0].source.path", "missing.txt"],
        ),
        (
            // A missing file in any stage is refused before the first stage trains.
            STAGES.replace(
                "name = \"english\"\n",
                "name = \"english\"\ndata = { train = { kind = \"text\", path = \"gone.txt\" } }\n",
            ),
            vec!["stages[0]", "data.train.path", "gone.txt"],
        ),
    ];
    for (stages, needles) in cases {
        write_recipe(w, "bad.toml", &staged_recipe(w, &stages));
        for cmd in ["validate", "run"] {
            trainer(w, &[cmd, "bad.toml"]).assert_one_error(&needles);
        }
        assert!(!w.join("run").exists(), "a refused recipe leaves no run");
    }
    // `stages = []` (a top-level key, so before the first section).
    let empty = format!("stages = []\n{}", staged_recipe(w, ""));
    write_recipe(w, "bad.toml", &empty);
    trainer(w, &["run", "bad.toml"]).assert_one_error(&["stages", "at least one"]);
    // train.max_steps given: it must equal the stages' sum (in the file or by --set).
    write_recipe(w, "bad.toml", &staged_recipe(w, STAGES));
    trainer(w, &["run", "bad.toml", "--set", "train.max_steps=30"]).assert_one_error(&[
        "train.max_steps",
        "30",
        "40",
    ]);
    trainer(w, &["validate", "bad.toml", "--set", "train.max_steps=40"]).assert_success();
}

/// The forgetting pipeline's recipes (configs/continual/, run by
/// scripts/continual_forgetting.sh) validate and train for two steps on the data files the
/// script writes (A = the built-in corpus, B = its ROT13), and the two-stage version validates
/// and shows its schedule.
#[test]
fn continual_pipeline_configs_run() {
    let work = workdir();
    let w = work.path();
    let text = std::fs::read_to_string(repo_root().join("crates/trainer/data/wonderland.txt"))
        .expect("the built-in corpus");
    let rot13: String = text
        .chars()
        .map(|c| match c {
            'a'..='z' => (((c as u8 - b'a' + 13) % 26) + b'a') as char,
            'A'..='Z' => (((c as u8 - b'A' + 13) % 26) + b'A') as char,
            c => c,
        })
        .collect();
    let data = w.join("runs/continual/data");
    std::fs::create_dir_all(&data).expect("data dir");
    let cut = text.len() - (text.len() + 5) / 10;
    for (name, t) in [("a", &text), ("b", &rot13)] {
        std::fs::write(data.join(format!("{name}_train.txt")), &t[..cut]).expect("train");
        std::fs::write(data.join(format!("{name}_valid.txt")), &t[cut..]).expect("valid");
    }
    let config = |name: &str| {
        repo_root()
            .join(format!("configs/continual/{name}.toml"))
            .to_str()
            .expect("utf-8")
            .to_string()
    };
    let short = ["--set", "train.max_steps=2", "--set", "run.threads=1"];
    let warmup = ["--set", "schedule.warmup_steps=1"];
    for (name, extra) in [
        ("pretrain_a", &warmup[..]),
        ("continue_b_constant", &[][..]),
        ("continue_b_rewarm", &warmup[..]),
        ("continue_b_replay", &warmup[..]),
        ("joint_ab", &warmup[..]),
    ] {
        let path = config(name);
        let mut args = vec!["run", path.as_str()];
        args.extend_from_slice(&short);
        args.extend_from_slice(extra);
        trainer(w, &args).assert_success();
        let summary: Value = serde_json::from_str(
            &std::fs::read_to_string(w.join(format!("runs/continual/{name}/summary.json")))
                .expect("summary.json"),
        )
        .expect("json");
        let losses = &summary["final_valid_losses"];
        assert!(
            losses["a"].is_number() && losses["b"].is_number(),
            "{name}: {summary}"
        );
    }
    let staged = config("staged_replay");
    let out = trainer(w, &["validate", &staged]);
    out.assert_success();
    assert!(
        out.stderr.contains("2 stages, 800 steps"),
        "{}",
        out.describe()
    );
    trainer(w, &["schedule", &staged]).assert_success();
}
