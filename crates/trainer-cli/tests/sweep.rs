//! Sweeps, model soups, run reports and determinism, end to end with the real binary on tiny
//! recipes on the CPU:
//! - `trainer sweep`: 2 learning rates x 2 seeds give 4 run directories and a results table whose
//!   mean, sample std and count are those of the runs' summaries; a second sweep skips them; a
//!   half-done run is resumed; a sweep key that the recipe does not have is a one-line error.
//! - `trainer soup`: the uniform soup of two runs fine-tuned from one start is the elementwise
//!   mean of their weights, evaluates with `trainer eval` and exports; the greedy soup is never
//!   worse on validation than its best ingredient; each ingredient's loss as the soup measures
//!   it is the final_valid_loss of its own run (the same evaluation).
//! - `trainer report`: a non-empty PNG and SVG.
//! - Determinism: the same recipe and seed give bitwise the same metrics.jsonl, with and without
//!   `run.deterministic = true`. The one field left out of the comparison is `tokens_per_s`
//!   (wall-clock throughput); every other field (step, loss, lr, grad_norm, tokens, and the eval
//!   rows' split, loss, perplexity) must be equal.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// The tiny recipe, 10 steps, evaluating at 5 and 10, a checkpoint every 5.
fn short_recipe(out_dir: &str) -> String {
    let r = tiny_recipe(out_dir);
    let r = replace_line(&r, "max_steps = 40", "max_steps = 10");
    replace_line(&r, "eval_every = 10", "eval_every = 5")
}

fn read_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// results.csv as one map per row (header -> cell).
fn read_csv(path: &Path) -> Vec<BTreeMap<String, String>> {
    let text = read_text(path);
    let mut lines = text.lines();
    let header = csv_cells(lines.next().expect("a header line"));
    lines
        .map(|l| {
            let cells = csv_cells(l);
            assert_eq!(cells.len(), header.len(), "{l}");
            header.iter().cloned().zip(cells).collect()
        })
        .collect()
}

const SWEEP: &str = r#"
[sweep]
base = "tiny.toml"
seeds = [1, 2]
metrics = ["final_valid_loss", "final_train_loss"]

[sweep.grid]
"optim.lr" = [1e-3, 3e-3]
"#;

#[test]
fn sweep_runs_every_point_aggregates_and_skips_finished_ones() {
    let work = workdir();
    let dir = work.path();
    write_recipe(dir, "tiny.toml", &short_recipe("unused"));
    write_recipe(dir, "lr.toml", SWEEP);
    let out = trainer(dir, &["sweep", "lr.toml", "--parallel", "2"]);
    out.assert_success();

    let point_dirs = ["optim.lr=0.001", "optim.lr=0.003"];
    let mut runs = Vec::new();
    for p in point_dirs {
        for seed in [1, 2] {
            let run = dir.join("runs/lr").join(p).join(format!("seed={seed}"));
            let s = read_summary(&run);
            assert_eq!(s["steps"], 10, "{}", run.display());
            let config = read_text(&run.join("config.toml"));
            assert!(config.contains(&format!("seed = {seed}")), "{config}");
            runs.push(run);
        }
    }
    // Different seeds and learning rates give different runs.
    let losses: Vec<f64> = runs
        .iter()
        .map(|r| {
            read_summary(r)["final_valid_loss"]
                .as_f64()
                .expect("a number")
        })
        .collect();
    for i in 0..4 {
        for j in 0..i {
            assert_ne!(losses[i], losses[j], "runs {i} and {j}");
        }
    }

    // results.csv: mean, sample std (numpy's ddof=1) and count over the two seeds.
    let rows = read_csv(&dir.join("runs/lr/results.csv"));
    assert_eq!(rows.len(), 2);
    for (row, p) in rows.iter().zip(point_dirs) {
        assert_eq!(row["point"], p);
        assert_eq!(row["runs"], "2");
        assert_eq!(row["unfinished"], "0");
        for metric in ["final_valid_loss", "final_train_loss"] {
            let xs: Vec<f64> = [1, 2]
                .iter()
                .map(|s| {
                    read_summary(&dir.join("runs/lr").join(p).join(format!("seed={s}")))[metric]
                        .as_f64()
                        .expect("a number")
                })
                .collect();
            let mean = (xs[0] + xs[1]) / 2.0;
            let std = (((xs[0] - mean).powi(2) + (xs[1] - mean).powi(2)) / 1.0).sqrt();
            let got_mean: f64 = row[&format!("{metric}_mean")]
                .parse()
                .expect("a number in the CSV");
            let got_std: f64 = row[&format!("{metric}_std")]
                .parse()
                .expect("a number in the CSV");
            assert!(
                (got_mean - mean).abs() <= 1e-12 * mean.abs(),
                "{metric} mean {got_mean} vs {mean}"
            );
            assert!(
                (got_std - std).abs() <= 1e-9 * std.abs().max(1e-12),
                "{metric} std {got_std} vs {std}"
            );
            assert_eq!(row[&format!("{metric}_n")], "2");
        }
    }
    let md = read_text(&dir.join("runs/lr/results.md"));
    assert!(
        md.contains("| `optim.lr` | final_valid_loss | final_train_loss | unfinished |"),
        "{md}"
    );
    assert!(dir.join("runs/lr/runs.csv").is_file());

    // A second sweep starts nothing: every run has its summary.
    let before = std::fs::read(runs[0].join("summary.json")).expect("reading a test file");
    let again = trainer(dir, &["sweep", "lr.toml"]);
    again.assert_success();
    assert!(
        again.stderr.contains("4 runs already finished"),
        "{}",
        again.describe()
    );
    assert!(!again.stderr.contains("start "), "{}", again.describe());
    assert_eq!(
        std::fs::read(runs[0].join("summary.json")).expect("reading a test file"),
        before
    );

    // A half-done run (stopped after its step-5 checkpoint) is resumed, to the same result.
    let half = &runs[3];
    let full = read_summary(half);
    std::fs::remove_file(half.join("summary.json")).expect("removing a file");
    std::fs::remove_dir_all(half.join("checkpoints/step-00000010")).expect("removing a file");
    let resumed = trainer(dir, &["sweep", "lr.toml"]);
    resumed.assert_success();
    assert!(
        resumed.stderr.contains("3 runs already finished"),
        "{}",
        resumed.describe()
    );
    assert!(
        resumed.stderr.contains("(resuming)"),
        "{}",
        resumed.describe()
    );
    let s = read_summary(half);
    assert_eq!(s["final_valid_loss"], full["final_valid_loss"]);
    assert!(
        s["resumed_from"]
            .as_str()
            .expect("resumed_from is set")
            .ends_with("step-00000005"),
        "{s}"
    );
}

#[test]
fn index_runs_one_run_and_collect_writes_the_table() {
    // What a scheduler's job array does: one run per task, then the table.
    let work = workdir();
    let dir = work.path();
    write_recipe(dir, "tiny.toml", &short_recipe("unused"));
    write_recipe(
        dir,
        "arr.toml",
        "[sweep]\nbase = \"tiny.toml\"\nseeds = [1, 2]\n",
    );
    let listed = trainer(dir, &["sweep", "arr.toml", "--dry-run"]);
    listed.assert_success();
    assert_eq!(
        listed.stdout.lines().collect::<Vec<_>>(),
        [
            "new       runs/arr/base/seed=1",
            "new       runs/arr/base/seed=2"
        ]
    );
    trainer(dir, &["sweep", "arr.toml", "--index", "1"]).assert_success();
    assert!(dir.join("runs/arr/base/seed=2/summary.json").is_file());
    assert!(!dir.join("runs/arr/base/seed=1").exists());
    trainer(dir, &["sweep", "arr.toml", "--index", "2"]).assert_one_error(&["--index 2", "2 runs"]);
    trainer(dir, &["sweep", "arr.toml", "--collect"]).assert_success();
    let rows = read_csv(&dir.join("runs/arr/results.csv"));
    assert_eq!(rows[0]["final_valid_loss_n"], "1");
    assert_eq!(rows[0]["unfinished"], "1");
    assert_eq!(
        rows[0]["final_valid_loss_mean"]
            .parse::<f64>()
            .expect("a number in the CSV"),
        read_summary(&dir.join("runs/arr/base/seed=2"))["final_valid_loss"]
            .as_f64()
            .expect("a number")
    );
}

#[test]
fn the_example_sweep_validates() {
    // --dry-run reads the sweep and checks every point against the recipe; it writes nothing.
    let out = trainer(
        &repo_root(),
        &["sweep", "configs/sweeps/quickstart_lr.toml", "--dry-run"],
    );
    out.assert_success();
    assert!(
        out.stderr.contains("3 points x 3 seeds = 9 runs"),
        "{}",
        out.describe()
    );
    assert_eq!(out.stdout.lines().count(), 9, "{}", out.describe());
    assert!(out
        .stdout
        .contains("runs/sweeps/quickstart_lr/optim.lr=0.01/seed=3"));
}

#[test]
fn bad_sweeps_are_one_line_errors_before_anything_runs() {
    let work = workdir();
    let dir = work.path();
    write_recipe(dir, "tiny.toml", &short_recipe("unused"));
    for (name, text, needles) in [
        (
            "typo.toml",
            "[sweep]\nbase = \"tiny.toml\"\n[sweep.grid]\n\"optim.lrr\" = [1e-3, 3e-3]\n",
            vec![
                "typo.toml",
                "sweep key \"optim.lrr\"",
                "unknown field `lrr`",
            ],
        ),
        (
            "section.toml",
            "[sweep]\nbase = \"tiny.toml\"\n[sweep.grid]\n\"trian.max_steps\" = [5]\n",
            vec!["sweep key \"trian.max_steps\"", "unknown field `trian`"],
        ),
        (
            "range.toml",
            concat!(
                "[sweep]\nbase = \"tiny.toml\"\n",
                "[[sweep.points]]\n\"train.max_steps\" = 5\n",
                "[[sweep.points]]\n\"train.max_steps\" = 0\n",
            ),
            vec![
                "sweep point train.max_steps=0",
                "train.max_steps",
                "positive",
            ],
        ),
        (
            "nobase.toml",
            "[sweep]\nbase = \"missing.toml\"\n",
            vec!["sweep.base", "missing.toml"],
        ),
        (
            "seed.toml",
            "[sweep]\nbase = \"tiny.toml\"\n[sweep.grid]\n\"run.seed\" = [1, 2]\n",
            vec!["run.seed", "sweep.seeds"],
        ),
    ] {
        write_recipe(dir, name, text);
        trainer(dir, &["sweep", name]).assert_one_error(&needles);
    }
    // Nothing ran: the first point of range.toml is valid but was not started.
    assert!(!dir.join("runs").exists());
}

#[test]
fn a_failed_run_is_reported_and_the_others_finish() {
    let work = workdir();
    let dir = work.path();
    write_recipe(dir, "tiny.toml", &short_recipe("unused"));
    // The second point is a valid recipe whose data file is missing: it fails when it runs.
    write_recipe(
        dir,
        "mixed.toml",
        r#"
[sweep]
base = "tiny.toml"
[[sweep.points]]
"optim.lr" = 1e-3
[[sweep.points]]
"data.train.kind" = "text"
"data.train.path" = "missing.txt"
"#,
    );
    let out = trainer(dir, &["sweep", "mixed.toml", "--parallel", "2"]);
    out.assert_one_error(&["sweep mixed: 1 of 2 runs failed", "missing.txt"]);
    assert!(out.stderr.contains("FAILED"), "{}", out.describe());
    assert!(dir
        .join("runs/mixed/optim.lr=0.001/seed=7/summary.json")
        .is_file());
    let failed = dir.join("runs/mixed/data.train.kind=text,data.train.path=missing.txt/seed=7");
    let log = read_text(&failed.join("sweep.log"));
    assert!(
        log.contains("error:") && log.contains("missing.txt"),
        "{log}"
    );
    let rows = read_csv(&dir.join("runs/mixed/results.csv"));
    assert_eq!(
        (
            rows[0]["unfinished"].as_str(),
            rows[1]["unfinished"].as_str()
        ),
        ("0", "1")
    );
    assert_eq!(rows[1]["final_valid_loss_n"], "0");
}

/// A base run and two fine-tunes of it (different seeds and learning rates) through a sweep.
fn fine_tunes(dir: &Path) -> Vec<String> {
    write_recipe(dir, "tiny.toml", &short_recipe("runs/base"));
    trainer(dir, &["run", "tiny.toml"]).assert_success();
    write_recipe(
        dir,
        "ft.toml",
        r#"
[sweep]
base = "tiny.toml"
seeds = [11, 12]
set = ["init.from=runs/base"]
[sweep.grid]
"optim.lr" = [1e-3, 3e-3]
"#,
    );
    trainer(dir, &["sweep", "ft.toml", "--parallel", "2"]).assert_success();
    let mut runs = Vec::new();
    for p in ["optim.lr=0.001", "optim.lr=0.003"] {
        for s in [11, 12] {
            runs.push(format!("runs/ft/{p}/seed={s}"));
        }
    }
    runs
}

fn tensors(path: &Path) -> BTreeMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

#[test]
fn soups_average_weights_evaluate_and_greedy_is_no_worse_than_the_best() {
    let work = workdir();
    let dir = work.path();
    let runs = fine_tunes(dir);

    // Uniform soup of two: the elementwise mean, bitwise (fp32: (a + b) / 2 rounds once).
    let out = trainer(
        dir,
        &[
            "soup", &runs[0], &runs[3], "--out", "soup2", "--device", "cpu",
        ],
    );
    out.assert_success();
    let a = tensors(
        &dir.join(&runs[0])
            .join("checkpoints/step-00000010/model.safetensors"),
    );
    let b = tensors(
        &dir.join(&runs[3])
            .join("checkpoints/step-00000010/model.safetensors"),
    );
    let soup = tensors(&dir.join("soup2/checkpoints/step-00000010/model.safetensors"));
    assert_eq!(soup.len(), a.len());
    for (name, t) in &soup {
        let mean = (&a[name] + &b[name]) / 2.0;
        assert!(
            t.equal(&mean),
            "{name}: the soup is not the mean of the two runs"
        );
        assert!(!t.equal(&a[name]) || a[name].equal(&b[name]), "{name}");
    }
    let report: Value =
        serde_json::from_str(&read_text(&dir.join("soup2/soup.json"))).expect("valid JSON");
    assert_eq!(report["method"], "uniform");
    // The soup measures each ingredient exactly as its training run did.
    for (i, r) in [&runs[0], &runs[3]].iter().enumerate() {
        assert_eq!(
            report["ingredients"][i]["valid_loss"],
            read_summary(&dir.join(r))["final_valid_loss"],
            "{r}"
        );
    }
    // It is a model that eval and export take.
    std::fs::write(
        dir.join("text.txt"),
        "Alice was beginning to get very tired. ".repeat(20),
    )
    .expect("writing text.txt");
    let eval = trainer(
        dir,
        &[
            "eval",
            "--init",
            "soup2",
            "--data",
            "text.txt",
            "--seq-len",
            "16",
            "--json",
        ],
    );
    eval.assert_success();
    let e: Value = serde_json::from_str(eval.stdout.trim()).expect("valid JSON");
    assert!(e["loss"].as_f64().expect("a number").is_finite(), "{e}");
    trainer(dir, &["export", "soup2", "--to", "hf", "hf_soup"]).assert_success();
    assert!(dir.join("hf_soup/model.safetensors").is_file());

    // Greedy soup of all four: never worse than its best ingredient.
    let mut args = vec!["soup"];
    args.extend(runs.iter().map(String::as_str));
    args.extend(["--greedy", "--out", "greedy", "--device", "cpu"]);
    trainer(dir, &args).assert_success();
    let g: Value =
        serde_json::from_str(&read_text(&dir.join("greedy/soup.json"))).expect("valid JSON");
    let best = g["ingredients"]
        .as_array()
        .expect("a JSON array")
        .iter()
        .map(|i| i["valid_loss"].as_f64().expect("a number"))
        .fold(f64::INFINITY, f64::min);
    let loss = g["valid_loss"].as_f64().expect("a number");
    assert!(
        loss <= best,
        "greedy soup {loss} is worse than the best ingredient {best}"
    );
    assert_eq!(g["greedy_valid_loss"].as_f64(), Some(loss));
    assert!(g["ingredients"]
        .as_array()
        .expect("a JSON array")
        .iter()
        .any(|i| i["in_soup"] == true));
}

#[test]
fn soups_refuse_runs_of_another_architecture() {
    let work = workdir();
    let dir = work.path();
    write_recipe(dir, "tiny.toml", &short_recipe("runs/a"));
    trainer(dir, &["run", "tiny.toml"]).assert_success();
    trainer(
        dir,
        &[
            "run",
            "tiny.toml",
            "--set",
            "run.out_dir=runs/b",
            "--set",
            "model.d_ff=48",
        ],
    )
    .assert_success();
    trainer(dir, &["soup", "runs/a", "runs/b", "--out", "s"]).assert_one_error(&[
        "soup",
        "runs/b",
        "[model] differs",
    ]);
    trainer(dir, &["soup", "runs/a", "runs/a", "--out", "runs/a"])
        .assert_one_error(&["--out runs/a", "not empty"]);
    assert!(!dir.join("s").exists());
}

#[test]
fn report_draws_png_and_svg() {
    let work = workdir();
    let dir = work.path();
    write_recipe(dir, "tiny.toml", &short_recipe("runs/a"));
    trainer(dir, &["run", "tiny.toml"]).assert_success();
    trainer(
        dir,
        &[
            "run",
            "tiny.toml",
            "--set",
            "run.out_dir=runs/b",
            "--set",
            "optim.lr=1e-3",
        ],
    )
    .assert_success();
    trainer(dir, &["report", "runs/a", "runs/b", "--out", "r.png"]).assert_success();
    let png = std::fs::read(dir.join("r.png")).expect("reading a test file");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 2000,
        "{} bytes",
        png.len()
    );
    trainer(
        dir,
        &[
            "report",
            "runs/a",
            "runs/b",
            "--out",
            "r.svg",
            "--metrics",
            "loss,lr,grad_norm",
        ],
    )
    .assert_success();
    let svg = read_text(&dir.join("r.svg"));
    assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(200)]);
    // 2 runs: train + valid loss, lr, grad_norm: 6 curves (plus grid lines).
    assert!(svg.matches("<polyline").count() >= 6);
    for word in [">\nloss\n<", ">\nlr\n<", ">\ngrad_norm\n<", "runs/b valid"] {
        assert!(svg.contains(word), "the SVG should contain {word:?}");
    }
    // The default: report.png in the first run directory.
    trainer(dir, &["report", "runs/a"]).assert_success();
    assert!(dir.join("runs/a/report.png").is_file());
    trainer(
        dir,
        &["report", "runs/a", "--metrics", "nope", "--out", "x.png"],
    )
    .assert_one_error(&["--metrics nope", "loss"]);
    trainer(dir, &["report", "runs/a", "--out", "x.jpg"])
        .assert_one_error(&["--out x.jpg", ".svg"]);
}

/// metrics.jsonl's lines as written, without the wall-clock field `"tokens_per_s":...`: text
/// equality of Rust's shortest round-trip float printing is bitwise equality of the values.
fn comparable_rows(run_dir: &Path) -> Vec<String> {
    let text = read_text(&run_dir.join("metrics.jsonl"));
    text.lines()
        .map(|l| match l.find("\"tokens_per_s\":") {
            None => l.to_string(),
            Some(start) => {
                let rest = &l[start..];
                let end = rest.find([',', '}']).expect("the end of the field");
                if rest[end..].starts_with(',') {
                    format!("{}{}", &l[..start], &rest[end + 1..])
                } else {
                    // The last field: drop the comma before it instead.
                    format!("{}{}", l[..start].trim_end_matches(','), &rest[end..])
                }
            }
        })
        .collect()
}

#[test]
fn same_recipe_and_seed_give_bitwise_identical_metrics() {
    let work = workdir();
    let dir = work.path();
    // The full tiny recipe: 40 steps, dropout-free Llama, logged every step.
    write_recipe(dir, "tiny.toml", &tiny_recipe("runs/one"));
    trainer(dir, &["run", "tiny.toml"]).assert_success();
    trainer(dir, &["run", "tiny.toml", "--set", "run.out_dir=runs/two"]).assert_success();
    trainer(
        dir,
        &[
            "run",
            "tiny.toml",
            "--set",
            "run.out_dir=runs/det",
            "--set",
            "run.deterministic=true",
        ],
    )
    .assert_success();
    let one = comparable_rows(&dir.join("runs/one"));
    assert_eq!(one.len(), 44, "40 training rows and 4 evaluations");
    let first: Value = serde_json::from_str(&one[0]).expect("valid JSON");
    let mut fields: Vec<&String> = first.as_object().expect("a JSON object").keys().collect();
    fields.sort();
    assert_eq!(fields, ["grad_norm", "loss", "lr", "step", "tokens"]);
    assert_eq!(one, comparable_rows(&dir.join("runs/two")));
    assert_eq!(one, comparable_rows(&dir.join("runs/det")));
    let config = read_text(&dir.join("runs/det/config.toml"));
    assert!(config.contains("deterministic = true"), "{config}");
    let config = read_text(&dir.join("runs/one/config.toml"));
    assert!(!config.contains("deterministic"), "{config}");
    // A different seed gives different numbers (the comparison can fail).
    trainer(
        dir,
        &[
            "run",
            "tiny.toml",
            "--set",
            "run.out_dir=runs/other",
            "--set",
            "run.seed=8",
        ],
    )
    .assert_success();
    assert_ne!(one, comparable_rows(&dir.join("runs/other")));
}
