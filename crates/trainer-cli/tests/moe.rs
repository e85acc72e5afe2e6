//! Mixture-of-Experts through the real binary: training from scratch logs the routers' losses
//! and per-layer expert load, resumes bitwise, and sparse upcycling of a dense run starts from
//! the dense model's function.

mod common;

use common::*;
use serde_json::Value;

fn moe_recipe(out_dir: &str) -> String {
    replace_line(
        &tiny_recipe(out_dir),
        "max_seq_len = 16",
        "max_seq_len = 16\nmoe = { n_experts = 4, top_k = 1, routing = \"switch\", capacity_factor = 1.25, aux_loss_coef = 0.01, z_loss_coef = 0.001 }",
    )
}

#[test]
fn moe_from_scratch_logs_router_statistics_and_resumes_exactly() {
    let dir = workdir();
    let cwd = dir.path();
    let name = write_recipe(cwd, "moe.toml", &moe_recipe("runs/moe"));
    let rows = run_tiny(cwd, &name, "runs/moe", &["--set", "train.max_steps=10"]);
    let train = train_rows(&rows);
    assert_eq!(train.len(), 10);
    for r in &train {
        assert!(num(r, "moe_aux_loss") > 0.0, "{r}");
        assert!(num(r, "moe_z_loss") > 0.0, "{r}");
        let dropped = num(r, "moe_dropped_fraction");
        assert!((0.0..1.0).contains(&dropped), "{r}");
        let loads = r["moe_expert_load"].as_array().expect("per-layer loads");
        assert_eq!(loads.len(), 2, "one entry per layer: {r}");
        for layer in loads {
            let load: Vec<f64> = layer
                .as_array()
                .expect("per expert")
                .iter()
                .map(|x| x.as_f64().expect("f64"))
                .collect();
            assert_eq!(load.len(), 4);
            assert!((load.iter().sum::<f64>() - 1.0).abs() < 1e-5, "{r}");
        }
        assert!(
            num(r, "moe_max_load_l0") >= 1.0 - 1e-6,
            "busiest expert >= uniform: {r}"
        );
    }

    // Resume from the step-5 checkpoint: steps 6..10 again, bitwise.
    let again = run_tiny(
        cwd,
        &name,
        "runs/moe-resumed",
        &[
            "--set",
            "train.max_steps=10",
            "--resume",
            "runs/moe/checkpoints/step-00000005",
        ],
    );
    let again = train_rows(&again);
    let first: Vec<f64> = train
        .iter()
        .filter(|r| step_of(r) > 5)
        .map(|r| num(r, "loss"))
        .collect();
    let second: Vec<f64> = again
        .iter()
        .filter(|r| step_of(r) > 5)
        .map(|r| num(r, "loss"))
        .collect();
    assert_eq!(first, second, "resumed MoE losses differ");
}

#[test]
fn upcycled_run_starts_from_the_dense_models_validation_loss() {
    let dir = workdir();
    let cwd = dir.path();
    let dense = write_recipe(cwd, "dense.toml", &tiny_recipe("runs/dense"));
    let rows = run_tiny(cwd, &dense, "runs/dense", &["--set", "train.max_steps=10"]);
    let dense_valid = num(
        eval_rows(&rows, "valid").last().expect("final eval"),
        "loss",
    );

    // An upcycled run whose only step barely moves the weights: its validation loss after that
    // step is the dense model's on the same validation windows.
    let recipe = tiny_recipe("runs/up");
    let start = recipe.find("[model]").expect("model");
    let end = recipe.find("[data]").expect("data");
    let recipe = format!(
        "{}[init]\nfrom = \"runs/dense\"\nupcycle = {{ n_experts = 4, top_k = 2 }}\n\n{}",
        &recipe[..start],
        &recipe[end..]
    );
    let up = write_recipe(cwd, "up.toml", &recipe);
    let rows = run_tiny(
        cwd,
        &up,
        "runs/up",
        &[
            "--set",
            "train.max_steps=1",
            "--set",
            "optim.lr=1e-12",
            "--set",
            "schedule.warmup_steps=0",
            "--set",
            "schedule.min_lr=0",
        ],
    );
    let up_valid = num(
        eval_rows(&rows, "valid").last().expect("final eval"),
        "loss",
    );
    assert!(
        (up_valid - dense_valid).abs() < 1e-5,
        "upcycled {up_valid} vs dense {dense_valid}"
    );
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(cwd.join("runs/up/summary.json")).expect("summary"),
    )
    .expect("json");
    assert!(summary["params"].as_i64().expect("params") > 0);

    // The upcycled run exports as a Mixtral checkpoint.
    trainer(cwd, &["export", "runs/up", "--to", "hf", "up-hf"]).assert_success();
    let config = std::fs::read_to_string(cwd.join("up-hf/config.json")).expect("config");
    assert!(config.contains("\"model_type\": \"mixtral\""), "{config}");
    // Switch MoE is not Mixtral: export refuses it in one line.
    let sw = write_recipe(cwd, "sw.toml", &moe_recipe("runs/sw"));
    run_tiny(
        cwd,
        &sw,
        "runs/sw",
        &[
            "--set",
            "train.max_steps=1",
            "--set",
            "schedule.warmup_steps=0",
        ],
    );
    let out = trainer(cwd, &["export", "runs/sw", "--to", "hf", "sw-hf"]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("only Mixtral-style MoE exports"),
        "{}",
        out.describe()
    );
    assert!(
        !cwd.join("sw-hf").exists(),
        "a refused export leaves nothing behind"
    );
}
