//! Loss-based sample reweighting (`[train.reweight]`), end to end with the real binary on the
//! CPU: the logged training loss of a run with `drop_highest` (with gradient accumulation, in
//! one process and in two) and with `softmax` equals the loss recomputed here from the
//! checkpoints, one sequence at a time through the library, with the rule written out
//! explicitly; a run without the option logs no `reweight/` columns; bad settings are one line
//! naming the key.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use tch::Device;
use trainer::data::mixture::Mixture;
use trainer::data::source::{self, Span};
use trainer::load::ModelSource;
use trainer::models::params::ParamStore;
use trainer::models::transformer::{Transformer, TransformerConfig};

/// The tiny recipe with 8 sequences per micro-batch, 2 micro-batches per step, a checkpoint
/// after every step, and the whole built-in corpus as training data (so that the batches are
/// easy to draw again here).
fn recipe(reweight: &str) -> String {
    let r = tiny_recipe("run");
    let r = replace_line(
        &r,
        "train = { kind = \"builtin\" }",
        "train = { kind = \"builtin\" }\nvalid = { kind = \"builtin\" }",
    );
    let r = replace_line(&r, "batch_size = 4", "batch_size = 8\ngrad_accum = 2");
    let r = replace_line(&r, "max_steps = 40", "max_steps = 12");
    let r = replace_line(&r, "checkpoint_every = 5", "checkpoint_every = 1");
    let r = replace_line(&r, "keep_checkpoints = 2", "keep_checkpoints = 20");
    format!("{r}{reweight}")
}

/// How the test weighs the sequence losses of one micro-batch (one rank's rows of it).
#[derive(Clone, Copy)]
enum Rule {
    DropHighest(usize),
    Softmax(f64),
}

/// The reweighted loss of `losses` by `rule`, written out: the mean of all but the `k` highest,
/// or `sum_i w_i l_i / n` with `w = n softmax(l / t)`.
fn weighted(losses: &[f64], rule: Rule) -> f64 {
    let n = losses.len();
    match rule {
        Rule::DropHighest(k) => {
            let mut sorted = losses.to_vec();
            sorted.sort_by(f64::total_cmp);
            sorted[..n - k].iter().sum::<f64>() / (n - k) as f64
        }
        Rule::Softmax(t) => {
            let e: Vec<f64> = losses.iter().map(|l| (l / t).exp()).collect();
            let z: f64 = e.iter().sum();
            losses.iter().zip(&e).map(|(l, e)| l * e / z).sum()
        }
    }
}

/// The mean token loss of every sequence of the training batch of (`step`, `micro`), with the
/// weights of checkpoint `step` of `run`, one sequence per forward pass.
fn sequence_losses(run: &Path, step: i64, micro: i64) -> Vec<f64> {
    let recipe = trainer::config::load(&run.join("config.toml"), &[]).expect("config.toml");
    let vocab = recipe.model.vocab_size();
    let cfg = TransformerConfig::from_recipe(&recipe.model);
    let mut params = ParamStore::new(Device::Cpu);
    let model = Transformer::new(&cfg, &mut params).expect("model");
    let dir = run.join(format!("checkpoints/step-{step:08}"));
    ModelSource::parse(dir.to_str().expect("utf-8"))
        .and_then(|s| s.load_weights(&cfg, &mut params))
        .expect("checkpoint weights");
    let data = source::open(
        recipe.data.train.as_ref().expect("data.train"),
        "data.train",
        vocab,
    )
    .expect("the built-in corpus");
    let batch = Mixture::from(Span::whole(data)).batch(
        recipe.data.seq_len as usize,
        recipe.train.batch_size as usize,
        recipe.run.seed,
        step,
        micro,
    );
    tch::no_grad(|| {
        (0..recipe.train.batch_size)
            .map(|i| {
                let logits = model.forward(&batch.inputs.narrow(0, i, 1), false);
                Transformer::loss(&logits, &batch.targets.narrow(0, i, 1)).double_value(&[])
            })
            .collect()
    })
}

/// Checks the logged loss of rows 2, 3 and 12 of `run` (trained on `ranks` processes): row
/// `s + 1` is the mean over micro-batches and ranks of `rule` applied to each rank's rows of
/// the batch of step `s`, with the weights of checkpoint `s`. Returns the rows.
fn check_losses(run: &Path, rule: Rule, ranks: usize) -> Vec<Value> {
    let rows = train_rows(&read_metrics(&run.join("metrics.jsonl")));
    assert_eq!(rows.len(), 12);
    for s in [1i64, 2, 11] {
        let (mut want, mut unweighted) = (0.0, 0.0);
        for micro in 0..2 {
            let losses = sequence_losses(run, s, micro);
            let per_rank = losses.len() / ranks;
            for rank_rows in losses.chunks(per_rank) {
                want += weighted(rank_rows, rule) / (2 * ranks) as f64;
            }
            unweighted += losses.iter().sum::<f64>() / (2 * losses.len()) as f64;
        }
        let row = &rows[s as usize];
        assert_eq!(step_of(row), s + 1);
        let (got, got_unweighted) = (num(row, "loss"), num(row, "reweight/unweighted_loss"));
        assert!(
            (got - want).abs() < 1e-6 * want,
            "row {}: logged loss {got}, recomputed {want}",
            s + 1
        );
        assert!(
            (got_unweighted - unweighted).abs() < 1e-6 * unweighted,
            "row {}: logged unweighted loss {got_unweighted}, recomputed {unweighted}",
            s + 1
        );
    }
    rows
}

const DROP: &str = "\n[train.reweight]\nrule = \"drop_highest\"\nfraction = 0.25\n";

#[test]
fn drop_highest_trains_on_the_mean_of_the_kept_sequences() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "drop.toml", &recipe(DROP));
    run_tiny(w, "drop.toml", "drop", &[]);
    // 0.25 of 8 sequences: the 2 highest of each micro-batch count 0, the other 6 count 8/6.
    let rows = check_losses(&w.join("drop"), Rule::DropHighest(2), 1);
    for r in &rows {
        let (min, max, ess) = (
            num(r, "reweight/min_weight"),
            num(r, "reweight/max_weight"),
            num(r, "reweight/ess"),
        );
        assert_eq!(min, 0.0, "{r}");
        assert!((max - 8.0 / 6.0).abs() < 1e-6, "{r}");
        assert!((ess - 0.75).abs() < 1e-6, "{r}");
        // Leaving out the hardest sequences lowers the loss below the unweighted one.
        assert!(num(r, "loss") < num(r, "reweight/unweighted_loss"), "{r}");
        assert!(r.get("stage").is_none(), "no stages, no stage field: {r}");
    }
    // It trains: the unweighted loss falls.
    let first = num(&rows[0], "reweight/unweighted_loss");
    let last = num(&rows[11], "reweight/unweighted_loss");
    assert!(last < first - 0.5, "unweighted loss {first} -> {last}");
    // The option is kept in the run's resolved recipe.
    let config = std::fs::read_to_string(w.join("drop/config.toml")).expect("config.toml");
    assert!(config.contains("[train.reweight]"), "{config}");

    // Without the option: no reweight columns, nothing in config.toml, and the first step's loss
    // is the unweighted loss of the reweighted run (the same initial weights and batch).
    write_recipe(w, "plain.toml", &recipe(""));
    let plain = train_rows(&run_tiny(w, "plain.toml", "plain", &[]));
    assert!(plain.iter().all(|r| r
        .as_object()
        .is_some_and(|o| !o.keys().any(|k| k.starts_with("reweight")))));
    let config = std::fs::read_to_string(w.join("plain/config.toml")).expect("config.toml");
    assert!(!config.contains("reweight"), "{config}");
    let (a, b) = (
        num(&plain[0], "loss"),
        num(&rows[0], "reweight/unweighted_loss"),
    );
    assert!((a - b).abs() < 1e-5 * a, "{a} vs {b}");
}

#[test]
fn softmax_weights_follow_the_formula() {
    let work = workdir();
    let w = work.path();
    // A negative temperature weights the high-loss sequences down.
    let softmax = "\n[train.reweight]\nrule = \"softmax\"\ntemperature = -0.2\n";
    write_recipe(w, "soft.toml", &recipe(softmax));
    run_tiny(w, "soft.toml", "soft", &[]);
    let rows = check_losses(&w.join("soft"), Rule::Softmax(-0.2), 1);
    for r in &rows {
        assert!(num(r, "reweight/min_weight") > 0.0, "{r}");
        assert!(num(r, "reweight/max_weight") > 1.0, "{r}");
        assert!(num(r, "reweight/ess") < 1.0, "{r}");
        assert!(num(r, "loss") < num(r, "reweight/unweighted_loss"), "{r}");
    }
}

/// Two processes: the rule applies to each rank's 4 rows of a micro-batch (1 of 4 dropped), and
/// the logged losses are the means over the ranks.
#[test]
fn with_two_processes_each_rank_reweights_its_own_rows() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "drop.toml", &recipe(DROP));
    let out = trainer(
        w,
        &[
            "launch",
            "--nproc",
            "2",
            "drop.toml",
            "--set",
            "run.out_dir=two",
        ],
    );
    out.assert_success();
    check_losses(&w.join("two"), Rule::DropHighest(1), 2);
    // 0.25 of 4 rows is one; 0.2 of 4 is none, which is refused before training.
    let out = trainer(
        w,
        &[
            "launch",
            "--nproc",
            "2",
            "drop.toml",
            "--set",
            "run.out_dir=none",
            "--set",
            "train.reweight.fraction=0.2",
        ],
    );
    assert_ne!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stderr.contains("train.reweight.fraction") && out.stderr.contains("drops none"),
        "{}",
        out.describe()
    );
    assert!(
        !w.join("none").exists(),
        "refused before the run directory is made"
    );
}

#[test]
fn bad_reweight_settings_are_one_line_errors_naming_the_key() {
    let work = workdir();
    let w = work.path();
    let cases: &[(&str, &[&str])] = &[
        (
            "rule = \"drop_highest\"\nfraction = 1.0",
            &["train.reweight.fraction", "[0, 1)"],
        ),
        (
            "rule = \"drop_lowest\"\nfraction = -0.1",
            &["train.reweight.fraction", "[0, 1)"],
        ),
        (
            "rule = \"drop_highest\"\nfraction = 0.1",
            &["train.reweight.fraction", "drops none"],
        ),
        (
            "rule = \"drop_biggest\"\nfraction = 0.25",
            &["train.reweight.rule", "drop_biggest", "drop_highest"],
        ),
        (
            "rule = \"softmax\"\ntemperature = 0.0",
            &["train.reweight.temperature", "non-zero"],
        ),
        (
            "rule = \"softmax\"",
            &["train.reweight.temperature", "missing"],
        ),
        (
            "rule = \"softmax\"\ntemperature = 1.0\nfraction = 0.25",
            &["train.reweight.fraction", "softmax"],
        ),
    ];
    for (body, needles) in cases {
        write_recipe(
            w,
            "bad.toml",
            &recipe(&format!("\n[train.reweight]\n{body}\n")),
        );
        for cmd in ["validate", "run"] {
            trainer(w, &[cmd, "bad.toml"]).assert_one_error(needles);
        }
        assert!(!w.join("run").exists(), "a refused recipe leaves no run");
    }
    // Distillation's loss is not reweighted.
    let distill = std::fs::read_to_string(repo_root().join("configs/distill_quickstart.toml"))
        .expect("the distillation recipe");
    write_recipe(w, "kd.toml", &format!("{distill}{DROP}"));
    trainer(w, &["validate", "kd.toml"]).assert_one_error(&["train.reweight", "[distill]"]);
    // Image classification has no reweighting.
    let classify = std::fs::read_to_string(repo_root().join("configs/classify_quickstart.toml"))
        .expect("the classification recipe");
    write_recipe(w, "cls.toml", &format!("{classify}{DROP}"));
    trainer(w, &["validate", "cls.toml"]).assert_one_error(&["reweight"]);
}
