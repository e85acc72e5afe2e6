//! `train.loss_chunk_tokens`: the language-model loss computed a chunk of positions at a time
//! (the whole logits never held) trains the same curve as the composite loss of the whole
//! micro-batch: within 1e-6 in fp32 over 30 steps, within bf16 rounding with bf16-mixed, and
//! evaluates the same validation losses. The op itself is compared with the composite in
//! `torch-ext`'s unit tests (`linear_cross_entropy.rs`).

mod common;

use common::*;

const RECIPE: &str = "tiny.toml";

/// Training and validation losses of every metrics row, in order.
fn losses(rows: &[serde_json::Value]) -> Vec<f64> {
    rows.iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| num(r, "loss"))
        .collect()
}

fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) / y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn chunked_and_whole_losses_train_the_same_curve() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, RECIPE, &tiny_recipe("unused"));
    // 4 rows x 16 positions per micro-batch: chunks of 5 positions split rows and leave a short
    // last chunk; 4096 is the default (one chunk here).
    for (precision, tolerance) in [("fp32", 1e-6), ("bf16-mixed", 2e-3)] {
        let set_precision = format!("run.precision=\"{precision}\"");
        let run = |chunk: &str| {
            let set_chunk = format!("train.loss_chunk_tokens={chunk}");
            let out_dir = format!("{precision}-{chunk}");
            losses(&run_tiny(
                w,
                RECIPE,
                &out_dir,
                &[
                    "--set",
                    &set_precision,
                    "--set",
                    &set_chunk,
                    "--set",
                    "train.max_steps=30",
                ],
            ))
        };
        let whole = run("0");
        assert_eq!(whole.len(), 33, "30 training rows and 3 evaluations");
        for chunk in ["5", "4096"] {
            let chunked = run(chunk);
            let d = max_rel_diff(&chunked, &whole);
            assert!(
                d < tolerance,
                "{precision}, chunks of {chunk}: relative difference {d:e}"
            );
        }
    }
}

#[test]
fn a_negative_chunk_is_refused_by_name() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, RECIPE, &tiny_recipe("run"));
    trainer(
        w,
        &["validate", RECIPE, "--set", "train.loss_chunk_tokens=-1"],
    )
    .assert_one_error(&["train.loss_chunk_tokens"]);
}
