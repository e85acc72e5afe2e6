//! Data mixtures with replay, several named validation sets, and `[init] load = "full"`, end to
//! end with the real binary on two clearly different corpora: English text (the built-in corpus)
//! and a synthetic alphabet text generated here.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;

/// A synthetic corpus far from English: runs of the alphabet with a varying stride.
fn alphabet_text(n: usize) -> String {
    let letters: Vec<char> = "abcdefghijklmnopqrstuvwxyz".chars().collect();
    let mut out = String::with_capacity(n);
    let mut i = 0usize;
    while out.len() < n {
        let stride = 1 + (i / 26) % 3;
        out.push(letters[(i * stride) % 26]);
        if i % 13 == 12 {
            out.push(' ');
        }
        i += 1;
    }
    out
}

/// The tiny recipe with `data.train` replaced by a mixture of `alpha.txt` (new) and the
/// built-in corpus (replay).
fn mixture_recipe(w: &Path, weights: (f64, f64)) -> String {
    std::fs::write(w.join("alpha.txt"), alphabet_text(20_000)).expect("writing alpha.txt");
    let base = tiny_recipe("run");
    let base = replace_line(&base, "train = { kind = \"builtin\" }", "");
    let base = replace_line(&base, "max_steps = 40", "max_steps = 20");
    let base = replace_line(&base, "keep_checkpoints = 2", "keep_checkpoints = 10");
    format!(
        "{base}
[[data.mixture.sources]]
name = \"new\"
weight = {}
source = {{ kind = \"text\", path = \"alpha.txt\" }}

[[data.mixture.sources]]
name = \"replay\"
weight = {}
source = {{ kind = \"builtin\" }}
",
        weights.0, weights.1
    )
}

fn summary(run: &Path) -> Value {
    let text = std::fs::read_to_string(run.join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).expect("summary is JSON")
}

#[test]
fn mixture_logs_proportions_epochs_and_a_curve_per_source_and_resumes_exactly() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "mix.toml", &mixture_recipe(w, (0.8, 0.2)));
    let rows = run_tiny(w, "mix.toml", "full", &[]);
    let train = train_rows(&rows);
    assert_eq!(train.len(), 20);
    let last = train.last().expect("rows");
    let (fnew, freplay) = (
        num(last, "mix_new_fraction"),
        num(last, "mix_replay_fraction"),
    );
    assert!((fnew + freplay - 1.0).abs() < 1e-9, "{last}");
    // 20 steps x 4 rows = 80 sequences: loosely near the weights (the 1% bound is tested on the
    // sampler over many steps).
    assert!((fnew - 0.8).abs() < 0.15, "{last}");
    assert!(
        num(last, "mix_new_epochs") > 0.0 && num(last, "mix_replay_epochs") > 0.0,
        "{last}"
    );
    // Without [data.valid_sets], each source's held-out part is its own validation set.
    for split in ["new", "replay"] {
        let evals = eval_rows(&rows, split);
        assert_eq!(
            evals.iter().map(step_of).collect::<Vec<_>>(),
            vec![10, 20],
            "{split}"
        );
    }
    let s = summary(&w.join("full"));
    let losses = &s["final_valid_losses"];
    assert!(
        losses["new"].as_f64().is_some() && losses["replay"].as_f64().is_some(),
        "{s}"
    );
    // The alphabet is far easier to predict than English.
    assert!(losses["new"].as_f64() < losses["replay"].as_f64(), "{s}");
    assert_eq!(s["mixture"]["new"]["fraction"].as_f64(), Some(fnew), "{s}");
    assert_eq!(s["mixture"]["replay"]["weight"].as_f64(), Some(0.2), "{s}");
    // TensorBoard tags per set.
    let tb: Vec<_> = std::fs::read_dir(w.join("full/tb")).expect("tb").collect();
    assert!(!tb.is_empty());

    // Resumed from step 10 into another directory: the same losses and proportions, bitwise.
    let ckpt = w.join("full/checkpoints/step-00000010");
    assert!(ckpt.is_dir(), "no {}", ckpt.display());
    let resumed = run_tiny(
        w,
        "mix.toml",
        "resumed",
        &["--resume", ckpt.to_str().expect("utf-8")],
    );
    let resumed_train = train_rows(&resumed);
    assert_eq!(step_of(&resumed_train[0]), 11);
    for (a, b) in train[10..].iter().zip(&resumed_train) {
        assert_eq!(step_of(a), step_of(b));
        for key in ["loss", "mix_new_fraction", "mix_replay_epochs"] {
            assert_eq!(
                num(a, key).to_bits(),
                num(b, key).to_bits(),
                "step {}: {key}",
                step_of(a)
            );
        }
    }
}

#[test]
fn named_validation_sets_each_get_a_curve_and_a_final_loss() {
    let work = workdir();
    let w = work.path();
    std::fs::write(w.join("alpha.txt"), alphabet_text(5_000)).expect("alpha");
    let recipe = replace_line(&tiny_recipe("run"), "max_steps = 40", "max_steps = 10")
        + "\n[data.valid_sets]\nupstream = { kind = \"builtin\" }\ndownstream = { kind = \"text\", path = \"alpha.txt\" }\n";
    write_recipe(w, "sets.toml", &recipe);
    let rows = run_tiny(w, "sets.toml", "sets", &[]);
    for split in ["upstream", "downstream"] {
        assert_eq!(eval_rows(&rows, split).len(), 1, "{split}");
    }
    assert!(eval_rows(&rows, "valid").is_empty());
    let s = summary(&w.join("sets"));
    let keys: Vec<&String> = s["final_valid_losses"]
        .as_object()
        .expect("map")
        .keys()
        .collect();
    assert_eq!(keys, vec!["downstream", "upstream"], "{s}");
}

#[test]
fn init_load_full_continues_weights_optimizer_and_step() {
    let work = workdir();
    let w = work.path();
    let base = replace_line(&tiny_recipe("run"), "max_steps = 40", "max_steps = 10");
    write_recipe(w, "a.toml", &base);
    run_tiny(w, "a.toml", "a", &[]);
    let cont = replace_line(&base, "max_steps = 10", "max_steps = 15")
        + "\n[init]\nfrom = \"a\"\nload = \"full\"\n";
    write_recipe(w, "b.toml", &cont);
    let rows = run_tiny(w, "b.toml", "b", &[]);
    let train = train_rows(&rows);
    assert_eq!(
        train.iter().map(step_of).collect::<Vec<_>>(),
        (11..=15).collect::<Vec<_>>()
    );
    let s = summary(&w.join("b"));
    assert_eq!(s["steps"].as_i64(), Some(15));
    assert_eq!(s["init_load"].as_str(), Some("full"), "{s}");
    assert!(
        s["init_from"]
            .as_str()
            .is_some_and(|f| f.contains("step-00000010")),
        "{s}"
    );
    // A checkpoint already at the end: one clear error.
    let done = replace_line(&base, "max_steps = 10", "max_steps = 10")
        + "\n[init]\nfrom = \"a\"\nload = \"full\"\n";
    write_recipe(w, "c.toml", &done);
    trainer(w, &["run", "c.toml", "--set", "run.out_dir=c"])
        .assert_one_error(&["init.from", "raise train.max_steps"]);
    // The default (load = "model") starts at step 1 with the same weights.
    let fresh = base.clone() + "\n[init]\nfrom = \"a\"\n";
    write_recipe(w, "d.toml", &fresh);
    let rows = run_tiny(w, "d.toml", "d", &[]);
    assert_eq!(step_of(&train_rows(&rows)[0]), 1);
    assert_eq!(summary(&w.join("d"))["init_load"].as_str(), Some("model"));
}

#[test]
fn bad_mixtures_are_one_line_errors_naming_the_key() {
    let work = workdir();
    let w = work.path();
    let good = mixture_recipe(w, (0.95, 0.05));
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            good.replace("weight = 0.05", "weight = -0.05"),
            vec!["data.mixture.sources[1].weight", "non-negative"],
        ),
        (
            good.replace("weight = 0.05", "weight = 0")
                .replace("weight = 0.95", "weight = 0"),
            vec!["data.mixture.sources", "all zero"],
        ),
        (
            good.replace("name = \"replay\"", "name = \"new\""),
            vec!["data.mixture.sources[1].name", "duplicate"],
        ),
        (
            good.replace("alpha.txt", "missing.txt"),
            vec!["data.mixture.sources[0].source.path", "missing.txt"],
        ),
        (
            good.replacen(
                "\n[[data.mixture",
                "\n[data.train]\nkind = \"builtin\"\n\n[[data.mixture",
                1,
            ),
            vec!["data.mixture", "not both"],
        ),
    ];
    for (i, (text, needles)) in cases.iter().enumerate() {
        let name = format!("bad-{i}.toml");
        write_recipe(w, &name, text);
        trainer(w, &["validate", &name]).assert_one_error(needles);
    }
    // A source too short for its held-out part names the source.
    std::fs::write(w.join("alpha.txt"), alphabet_text(100)).expect("short");
    write_recipe(w, "short.toml", &good);
    trainer(w, &["run", "short.toml"])
        .assert_one_error(&["data.mixture.sources[0] (new)", "held-out"]);
    assert!(
        !w.join("run").exists(),
        "a failed start wrote a run directory"
    );
}
