//! `train.weight_decay_schedule = "follow_lr"`, end to end with the real binary on the CPU: the
//! weight decay of a step is `optim.weight_decay * lr / optim.lr`, proven on the weights
//! themselves. For one step from the same weights and batch, runs with decay `wd_t`, `wd` and 0
//! differ only in their decay terms (`-lr * wd * p` for AdamW's decoupled decay and for SGD's
//! coupled one alike), so `(p_follow - p_none) / (p_constant - p_none) = wd_t / wd = lr / peak`
//! in every decayed tensor.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// The tiny recipe for 5 steps of `optim` at peak LR 0.1 with weight decay `wd`, its LR warming
/// up over 4 steps (the first step trains at lr = 0.1 / 4), a checkpoint after every step.
fn recipe(optim: &str, wd: f64, schedule: &str) -> String {
    let r = tiny_recipe("run");
    let r = replace_line(
        &r,
        "kind = \"adamw\"",
        &format!("kind = \"{optim}\"\nweight_decay = {wd:?}"),
    );
    let r = replace_line(&r, "lr = 3e-3", "lr = 0.1");
    let r = replace_line(&r, "kind = \"cosine\"", "kind = \"constant\"");
    let r = replace_line(&r, "warmup_steps = 5", "warmup_steps = 4");
    let r = replace_line(&r, "max_steps = 40", "max_steps = 5");
    let r = replace_line(&r, "checkpoint_every = 5", "checkpoint_every = 1");
    replace_line(
        &r,
        "keep_checkpoints = 2",
        &format!("keep_checkpoints = 10\nweight_decay_schedule = \"{schedule}\""),
    )
}

fn weights(run: &Path) -> BTreeMap<String, Tensor> {
    let path = run.join("checkpoints/step-00000001/model.safetensors");
    Tensor::read_safetensors(&path)
        .expect("model.safetensors")
        .into_iter()
        .map(|(n, t)| (n, t.to_kind(Kind::Double)))
        .collect()
}

#[test]
fn follow_lr_scales_the_decay_of_a_step_by_lr_over_peak() {
    let work = workdir();
    let w = work.path();
    for optim in ["adamw", "sgd"] {
        let runs = [
            ("follow", 0.5, "follow_lr"),
            ("constant", 0.5, "constant"),
            ("none", 0.0, "constant"),
        ];
        for (name, wd, schedule) in runs {
            let file = format!("{optim}_{name}.toml");
            write_recipe(w, &file, &recipe(optim, wd, schedule));
            let out = format!("{optim}_{name}");
            let rows = train_rows(&run_tiny(w, &file, &out, &[]));
            let lr = num(&rows[0], "lr");
            assert!((lr - 0.025).abs() < 1e-15, "{optim}: lr {lr}");
            // The coefficient used is logged with follow_lr only.
            match schedule {
                "follow_lr" => {
                    for r in &rows {
                        assert_eq!(num(r, "weight_decay"), 0.5 * (num(r, "lr") / 0.1), "{r}");
                    }
                }
                _ => assert!(rows[0].get("weight_decay").is_none(), "{}", rows[0]),
            }
        }
        let (follow, constant, none) = (
            weights(&w.join(format!("{optim}_follow"))),
            weights(&w.join(format!("{optim}_constant"))),
            weights(&w.join(format!("{optim}_none"))),
        );
        let mut decayed = 0;
        for (name, c) in &constant {
            let full = c - &none[name];
            let scaled = &follow[name] - &none[name];
            let norm = full.square().sum(Kind::Double).double_value(&[]);
            if norm == 0.0 {
                // Norm weights are never decayed: no difference at all.
                assert_eq!(scaled.abs().max().double_value(&[]), 0.0, "{optim} {name}");
                continue;
            }
            decayed += 1;
            let ratio = (&scaled * &full).sum(Kind::Double).double_value(&[]) / norm;
            assert!(
                (ratio - 0.25).abs() < 1e-5,
                "{optim} {name}: decay ratio {ratio}, expected lr / peak = 0.25"
            );
        }
        assert!(decayed >= 8, "{optim}: {decayed} decayed tensors");
    }
    // GSM's decay is its pruning mechanism: not scheduled.
    let gsm = recipe("gsm", 0.5, "follow_lr")
        .replace("weight_decay = 0.5", "weight_decay = 0.5\ndensity = 0.5");
    write_recipe(w, "gsm.toml", &gsm);
    trainer(w, &["validate", "gsm.toml"]).assert_one_error(&["train.weight_decay_schedule", "gsm"]);
}
