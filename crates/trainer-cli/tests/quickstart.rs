//! The README's first command, shortened: the quickstart recipe trains end to end on the built-in
//! corpus and its validation loss falls, below that of a uniform guess over 256 bytes.

mod common;

use common::*;

#[test]
fn quickstart_learns_in_30_steps() {
    let work = workdir();
    let w = work.path();
    let recipe = repo_root().join("configs/quickstart.toml");
    let out_dir = w.join("quickstart");
    let out = trainer(
        w,
        &[
            "run",
            recipe.to_str().expect("utf-8 path"),
            "--set",
            "train.max_steps=30",
            "--set",
            &format!("run.out_dir={}", out_dir.to_str().expect("utf-8 path")),
            "--set",
            "train.eval_every=10",
            // One intra-op thread: on a shared 2-core machine libtorch's default (one per core)
            // runs ~10x slower whenever another process is busy (OpenMP threads spin-wait on
            // each other); one thread keeps this test at seconds either way.
            "--set",
            "run.threads=1",
        ],
    );
    out.assert_success();
    let rows = read_metrics(&out_dir.join("metrics.jsonl"));
    let evals = eval_rows(&rows, "valid");
    assert_eq!(
        evals.iter().map(step_of).collect::<Vec<_>>(),
        vec![10, 20, 30],
        "eval steps"
    );
    let first = num(&evals[0], "loss");
    let last = num(&evals[2], "loss");
    let uniform = 256f64.ln(); // 5.545
    assert!(
        last < first,
        "valid loss did not fall: step 10 {first}, step 30 {last}"
    );
    assert!(
        last < uniform,
        "valid loss at step 30 is {last}, not below ln(256) = {uniform:.3}"
    );
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("summary.json")).expect("summary.json"),
    )
    .expect("json");
    assert_eq!(summary["steps"], 30);
    assert!(
        summary["final_valid_loss"].as_f64() == Some(last),
        "{summary}"
    );
    // The summary table the user sees at the end.
    assert!(out.stderr.contains("valid loss"), "{}", out.describe());
}
