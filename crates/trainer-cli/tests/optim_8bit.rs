//! 8-bit optimizer states through the real binary: AdamW and GaLore-AdamW with block-wise
//! quantised moments track their 32-bit runs on the tiny recipe, hold about a quarter of the
//! state bytes, and resume bitwise (codes and scales are checkpointed).

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;

fn losses(rows: &[Value]) -> BTreeMap<i64, f64> {
    train_rows(rows)
        .iter()
        .map(|r| (step_of(r), num(r, "loss")))
        .collect()
}

fn state_bytes(dir: &std::path::Path) -> i64 {
    let s: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    s["optimizer_state_bytes"].as_i64().unwrap()
}

#[test]
fn eight_bit_states_track_the_32_bit_run_and_resume_bitwise() {
    let work = workdir();
    let w = work.path();
    let base = tiny_recipe("a");
    let galore = replace_line(
        &base,
        "kind = \"adamw\"",
        "kind = \"galore_adamw\"\nrank = 8\nupdate_proj_gap = 10",
    );
    for (name, recipe) in [("adamw", base), ("galore", galore)] {
        let r8 = replace_line(&recipe, "lr = 3e-3", "lr = 3e-3\nstate_bits = 8");
        let r8 = replace_line(&r8, "keep_checkpoints = 2", "keep_checkpoints = 10");
        write_recipe(w, &format!("{name}32.toml"), &recipe);
        write_recipe(w, &format!("{name}8.toml"), &r8);
        let full = losses(&run_tiny(
            w,
            &format!("{name}32.toml"),
            &format!("{name}32"),
            &[],
        ));
        let rows8 = run_tiny(w, &format!("{name}8.toml"), &format!("{name}8"), &[]);
        let eight = losses(&rows8);
        assert_eq!(full.len(), 40);
        for (step, l) in &full {
            let d = (eight[step] - l).abs() / l;
            assert!(
                d < 0.03,
                "{name} step {step}: 8-bit {} vs 32-bit {l}",
                eight[step]
            );
        }
        let (first, last) = (eight[&1], eight[&40]);
        assert!(
            last < first - 1.0,
            "{name}: the 8-bit run learns ({first} -> {last})"
        );
        let ratio = state_bytes(&w.join(format!("{name}8"))) as f64
            / state_bytes(&w.join(format!("{name}32"))) as f64;
        // AdamW: a quarter plus the block scales; GaLore also keeps its fp32 projectors.
        let most = if name == "adamw" { 0.27 } else { 0.6 };
        assert!(
            ratio < most,
            "{name}: 8-bit states are {ratio} of the 32-bit ones"
        );

        // Resumed from the middle: bitwise the same losses and final model.
        let resumed = format!("{name}8r");
        let ckpt = format!("{name}8/checkpoints/step-00000020");
        let b = losses(&run_tiny(
            w,
            &format!("{name}8.toml"),
            &resumed,
            &["--resume", &ckpt],
        ));
        for (step, l) in &b {
            assert_eq!(
                l.to_bits(),
                eight[step].to_bits(),
                "{name} resumed, step {step}"
            );
        }
        let model = |run: &str| {
            std::fs::read(
                w.join(run)
                    .join("checkpoints/step-00000040/model.safetensors"),
            )
            .unwrap()
        };
        assert!(
            model(&format!("{name}8")) == model(&resumed),
            "{name}: final model differs"
        );
    }
    // The fused kernel needs 32-bit states.
    let bad = replace_line(
        &tiny_recipe("x"),
        "lr = 3e-3",
        "lr = 3e-3\nstate_bits = 8\nfused = true",
    );
    write_recipe(w, "bad.toml", &bad);
    trainer(w, &["run", "bad.toml"]).assert_one_error(&["optim.fused", "32-bit"]);
    let bad = replace_line(&tiny_recipe("x"), "lr = 3e-3", "lr = 3e-3\nstate_bits = 4");
    write_recipe(w, "bad.toml", &bad);
    trainer(w, &["run", "bad.toml"]).assert_one_error(&["optim.state_bits", "32 or 8"]);
}
