//! ReLoRA through the real binary on the CPU: a tiny run with a full-rank warm start of 5 steps,
//! then merges and restarts every 8 steps (after steps 5, 8, 16, 24, 32, 40), logs the jagged
//! schedule (LR 0 on the first step after each restart), and a run resumed from a checkpoint in
//! the middle (at the switch to ReLoRA, and between two merges) replays every later loss, LR and
//! the final model bitwise: the ReLoRA counters are pure functions of the step.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;

const STEPS: i64 = 40;

fn recipe() -> String {
    let r = tiny_recipe("a");
    let r = replace_line(&r, "keep_checkpoints = 2", "keep_checkpoints = 10");
    format!(
        "{r}\n[peft]\nkind = \"relora\"\nrank = 2\nalpha = 4\ntarget = [\"q_proj\", \"v_proj\", \"mlp.*\"]\n\
         merge_every = 8\noptimizer_reset = \"magnitude\"\nkeep_fraction = 0.1\nrewarm_steps = 2\n\
         full_rank_warmup_steps = 5\n"
    )
}

fn rows_by_step(rows: &[Value]) -> BTreeMap<i64, Value> {
    train_rows(rows)
        .into_iter()
        .map(|r| (step_of(&r), r))
        .collect()
}

#[test]
fn relora_rewarms_after_each_merge_and_resumes_bitwise_from_the_middle() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "relora.toml", &recipe());
    let a = run_tiny(w, "relora.toml", "a", &[]);
    let ra = rows_by_step(&a);
    assert_eq!(ra.len() as i64, STEPS);
    // Logged step s ran 0-based step s - 1: LR 0 right after each restart, half-way the next.
    for reset in [5, 8, 16, 24, 32] {
        assert_eq!(
            num(&ra[&(reset + 1)], "lr"),
            0.0,
            "step {} after the restart at {reset}",
            reset + 1
        );
        assert!(num(&ra[&(reset + 2)], "lr") > 0.0);
    }
    for s in [2, 3, 4, 5, 8, 12, 20] {
        assert!(
            num(&ra[&s], "lr") > 0.0,
            "step {s} has the main schedule's LR"
        );
    }
    assert!(
        num(&ra[&STEPS], "loss") < num(&ra[&1], "loss"),
        "the loss falls: {} -> {}",
        num(&ra[&1], "loss"),
        num(&ra[&STEPS], "loss")
    );

    // After the full-rank warm start only the adapters train.
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(w.join("a/summary.json")).expect("summary"))
            .expect("json");
    let (total, trainable) = (
        summary["params"].as_i64().expect("params"),
        summary["trainable_params"].as_i64().expect("trainable"),
    );
    assert!(
        trainable > 0 && trainable * 10 < total,
        "{trainable} of {total} trainable"
    );

    for from in [5, 15] {
        let out = format!("b{from}");
        let ckpt = format!("a/checkpoints/step-{from:08}");
        let b = run_tiny(w, "relora.toml", &out, &["--resume", &ckpt]);
        let rb = rows_by_step(&b);
        for step in from + 1..=STEPS {
            let (x, y) = (
                &ra[&step],
                rb.get(&step)
                    .unwrap_or_else(|| panic!("no step {step} after resume at {from}")),
            );
            for key in ["loss", "lr"] {
                assert!(
                    num(x, key).to_bits() == num(y, key).to_bits(),
                    "resumed at {from}, step {step}: {key} {:e} vs {:e} uninterrupted",
                    num(y, key),
                    num(x, key)
                );
            }
        }
        let model = |run: &str| {
            std::fs::read(
                w.join(run)
                    .join(format!("checkpoints/step-{STEPS:08}/model.safetensors")),
            )
            .expect("final model")
        };
        assert!(
            model("a") == model(&out),
            "the final model after resuming at {from} differs"
        );
    }
}
