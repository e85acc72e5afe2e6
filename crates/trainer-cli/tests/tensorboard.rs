//! TensorBoard event files that TensorBoard itself reads: after a short run, Python's
//! `tensorboard` package (EventAccumulator, as the TensorBoard UI uses) must find the `loss` and
//! `lr` scalars at exactly the logged steps, and `valid/loss` at the eval steps, with the values
//! of metrics.jsonl (to float32, the precision of a TensorBoard scalar).
//!
//! Needs a Python with `tensorboard`: `TRAINER_PYTHON`, else `python3`. `scripts/test` installs
//! it; without it this test fails (it never skips).

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;

const READER: &str = r#"
import json, sys
try:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
except ImportError as e:
    print(f"cannot import tensorboard: {e}", file=sys.stderr)
    sys.exit(3)
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
tags = acc.Tags()["scalars"]
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags}))
"#;

/// tag -> [(step, value)] as TensorBoard reads them from `dir`.
fn read_scalars(dir: &std::path::Path) -> BTreeMap<String, Vec<(i64, f64)>> {
    let py = python();
    let out = Command::new(&py)
        .arg("-c")
        .arg(READER)
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
            "cannot run Python ({py:?}: {e}) to read the TensorBoard files. Run the tests through \
             scripts/test, which installs Python's tensorboard package, or set TRAINER_PYTHON to \
             a Python that has it"
        )
        });
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{py} could not read the TensorBoard files (exit {:?}): {stderr}\nRun the tests through \
         scripts/test, which installs Python's tensorboard package (scripts/requirements-test.txt), \
         or set TRAINER_PYTHON to a Python that has it",
        out.status.code()
    );
    let parsed: BTreeMap<String, Vec<(i64, f64)>> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| {
            panic!(
                "unexpected reader output ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
    parsed
}

/// Asserts that TensorBoard's `tag` holds exactly the (step, value) pairs of `rows`' `key`.
fn assert_scalars_match(
    tb: &BTreeMap<String, Vec<(i64, f64)>>,
    tag: &str,
    rows: &[Value],
    key: &str,
) {
    let got = tb.get(tag).unwrap_or_else(|| {
        panic!(
            "no scalar {tag:?} in the event files; tags: {:?}",
            tb.keys()
        )
    });
    let want: Vec<(i64, f64)> = rows.iter().map(|r| (step_of(r), num(r, key))).collect();
    let steps = |v: &[(i64, f64)]| v.iter().map(|p| p.0).collect::<Vec<_>>();
    assert_eq!(
        steps(got),
        steps(&want),
        "{tag}: steps in TensorBoard vs metrics.jsonl"
    );
    for ((step, tb_value), (_, value)) in got.iter().zip(&want) {
        // A TensorBoard scalar is a float32: the metrics value rounded to float32.
        let expected = f64::from(*value as f32);
        let tol = f64::from(f32::EPSILON) * expected.abs();
        assert!(
            (tb_value - expected).abs() <= tol,
            "{tag} at step {step}: {tb_value} in TensorBoard, {value} in metrics.jsonl"
        );
    }
}

#[test]
fn tensorboard_reads_loss_lr_and_valid_loss_at_the_logged_steps() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "tiny.toml", &tiny_recipe("run"));
    // Logged at 3, 6, ..., 21 and at the end (23); evaluated at 10, 20 and at the end.
    let rows = run_tiny(
        w,
        "tiny.toml",
        "run",
        &["--set", "train.max_steps=23", "--set", "train.log_every=3"],
    );
    let train = train_rows(&rows);
    let evals = eval_rows(&rows, "valid");
    let mut logged: Vec<i64> = (1..=7).map(|k| 3 * k).collect();
    logged.push(23);
    assert_eq!(train.iter().map(step_of).collect::<Vec<_>>(), logged);
    assert_eq!(
        evals.iter().map(step_of).collect::<Vec<_>>(),
        vec![10, 20, 23]
    );

    let tb = read_scalars(&w.join("run/tb"));
    assert_scalars_match(&tb, "loss", &train, "loss");
    assert_scalars_match(&tb, "lr", &train, "lr");
    assert_scalars_match(&tb, "valid/loss", &evals, "loss");
    assert_scalars_match(&tb, "valid/perplexity", &evals, "perplexity");
}

/// A run resumed from an older checkpoint writes a second event file that repeats steps; TensorBoard
/// must still show each step once, with the values of metrics.jsonl.
#[test]
fn tensorboard_shows_each_step_once_after_a_resume() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "tiny.toml", &tiny_recipe("run"));
    let set = [
        "--set",
        "train.max_steps=20",
        "--set",
        "train.checkpoint_every=10",
        "--set",
        "train.keep_checkpoints=3",
    ];
    run_tiny(w, "tiny.toml", "run", &set);
    let mut args = vec![
        "run",
        "tiny.toml",
        "--resume",
        "run/checkpoints/step-00000010",
    ];
    args.extend_from_slice(&set);
    trainer(w, &args).assert_success();
    let rows = read_metrics(&w.join("run/metrics.jsonl"));
    let train = train_rows(&rows);
    assert_eq!(
        train.iter().map(step_of).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    let tb = read_scalars(&w.join("run/tb"));
    assert_scalars_match(&tb, "loss", &train, "loss");
    assert_scalars_match(&tb, "valid/loss", &eval_rows(&rows, "valid"), "loss");
}
