//! Layer-wise updates (`[optim] layerwise = true`) through the real binary: each parameter is
//! updated inside the backward pass as soon as its gradient is complete. The update of every
//! parameter is the whole-step update, so the losses are bitwise those of the ordinary run
//! (AdamW unfused and fused, GaLore-AdamW, with gradient accumulation), a resumed run replays
//! the uninterrupted one, and the settings it cannot serve are one-line errors.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;

/// (loss, grad_norm) of every training row, by step.
fn rows(rows: &[Value]) -> BTreeMap<i64, (f64, f64)> {
    train_rows(rows)
        .iter()
        .map(|r| (step_of(r), (num(r, "loss"), num(r, "grad_norm"))))
        .collect()
}

fn valid(rows: &[Value]) -> Vec<u64> {
    eval_rows(rows, "valid")
        .iter()
        .map(|r| num(r, "loss").to_bits())
        .collect()
}

#[test]
fn layerwise_updates_give_the_losses_of_whole_steps() {
    let work = workdir();
    let w = work.path();
    let base = replace_line(&tiny_recipe("a"), "max_steps = 40", "max_steps = 12");
    let cases = [
        (
            "adamw",
            "kind = \"adamw\"\nfused = false".to_string(),
            "batch_size = 4",
        ),
        (
            "fused",
            "kind = \"adamw\"\nfused = true".to_string(),
            "batch_size = 4",
        ),
        (
            "galore",
            "kind = \"galore_adamw\"\nrank = 8\nupdate_proj_gap = 5".to_string(),
            "batch_size = 4",
        ),
        (
            "accum",
            "kind = \"adamw\"\nfused = false".to_string(),
            "batch_size = 2\ngrad_accum = 2",
        ),
    ];
    for (name, optim, batch) in cases {
        let whole = replace_line(&base, "kind = \"adamw\"", &optim);
        let whole = replace_line(&whole, "batch_size = 4", batch);
        let layerwise = replace_line(&whole, "lr = 3e-3", "lr = 3e-3\nlayerwise = true");
        write_recipe(w, &format!("{name}.toml"), &whole);
        write_recipe(w, &format!("{name}-lw.toml"), &layerwise);
        let a_rows = run_tiny(w, &format!("{name}.toml"), name, &[]);
        let b_rows = run_tiny(w, &format!("{name}-lw.toml"), &format!("{name}-lw"), &[]);
        let (a, b) = (rows(&a_rows), rows(&b_rows));
        assert_eq!(a.len(), 12, "{name}");
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (step, (loss, norm)) in &a {
            let (lw_loss, lw_norm) = b[step];
            assert_eq!(
                loss.to_bits(),
                lw_loss.to_bits(),
                "{name} step {step}: loss {loss} whole, {lw_loss} layer-wise"
            );
            // The norm is summed parameter by parameter instead of in one reduction.
            assert!(
                (norm - lw_norm).abs() <= 1e-5 * norm,
                "{name} step {step}: grad norm {norm} whole, {lw_norm} layer-wise"
            );
        }
        assert_eq!(valid(&a_rows), valid(&b_rows), "{name}: validation losses");
        assert!(a[&12].0 < a[&1].0 - 0.5, "{name}: it learns");
    }

    // Resumed from a layer-wise checkpoint: bitwise the uninterrupted run.
    let resumed = rows(&run_tiny(
        w,
        "galore-lw.toml",
        "galore-lw-resumed",
        &["--resume", "galore-lw/checkpoints/step-00000010"],
    ));
    let full = rows(&read_metrics(&w.join("galore-lw/metrics.jsonl")));
    for (step, (loss, _)) in &resumed {
        assert_eq!(
            loss.to_bits(),
            full[step].0.to_bits(),
            "resumed, step {step}"
        );
    }
    assert_eq!(resumed.keys().next(), Some(&11));
}

#[test]
fn settings_layerwise_cannot_serve_are_one_line_errors() {
    let work = workdir();
    let w = work.path();
    let recipe = write_recipe(w, "tiny.toml", &tiny_recipe("run"));
    let on = "optim.layerwise=true";
    let refused = |extra: &[&str], words: &str| {
        let mut args = vec!["validate", recipe.as_str(), "--set", on];
        args.extend_from_slice(extra);
        trainer(w, &args).assert_one_error(&["optim.layerwise", words]);
    };
    refused(&["--set", "train.clip_grad_norm=1.0"], "clip");
    refused(
        &[
            "--set",
            "peft={kind=\"relora\", rank=4, target=[\"q_proj\"], merge_every=5}",
        ],
        "ReLoRA",
    );
    // SGD has no layer-wise updates: the key is unknown there.
    let out = trainer(
        w,
        &[
            "validate",
            &recipe,
            "--set",
            "optim={kind=\"sgd\", lr=0.1, layerwise=true}",
        ],
    );
    out.assert_one_error(&["layerwise"]);
    // Several processes: the gradients must be averaged before any update.
    let out = trainer(
        w,
        &[
            "launch",
            "--nproc",
            "2",
            &recipe,
            "--set",
            on,
            "--set",
            "train.max_steps=6",
        ],
    );
    assert_ne!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stderr.contains("optim.layerwise: one process only"),
        "{}",
        out.describe()
    );
    assert!(!w.join("run/checkpoints").exists(), "nothing was trained");
}
