//! `train.momentum_schedule = "inverse_lr"`: step t's momentum (SGD's `momentum`, AdamW's and
//! GaLore-AdamW's beta1) is `max - (max - train.momentum_min) * lr(t) / optim.lr`.
//!
//! - Against PyTorch: `tests/reference/momentum_reference.py` (run through $TRAINER_PYTHON, torch
//!   2.11.0 and galore-torch 1.0) steps torch.optim.AdamW, torch.optim.SGD (plain, Nesterov,
//!   dampening with weight decay) and galore_torch.GaLoreAdamW six times through a warmup and a
//!   decay, writing each step's momentum into the param groups as OneCycleLR(cycle_momentum=True)
//!   does. Our optimizers replay the same gradients with `set_momentum` from
//!   `MomentumSchedule::momentum` before each step; the momenta must be the reference's (to
//!   1e-12) and the parameters within the tolerances of the optimizers' own reference tests
//!   (crates/trainer/tests/optim_reference.rs: 1e-6 relative + 1e-7 absolute;
//!   galore_reference.rs: 1e-5 + 1e-6 for its SVD). Adam's bias correction uses the current
//!   beta1 (`1 - beta1^t`), as torch does.
//! - End to end: a tiny AdamW run logs `momentum` in each training row, following the formula
//!   at warmup start, the LR's peak (exactly momentum_min) and the end; the momentum logged for
//!   step 1 is the one that stepped (the weights after step 1 equal those of a constant-momentum
//!   run with that beta1, bit for bit).
//! - Bad settings are one-line errors naming the key.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use tch::{Kind, Tensor};
use trainer::config::MomentumSchedule;
use trainer::optim::galore::Projection;
use trainer::optim::{AdamW, GaloreAdamW, Optimizer, Sgd};

fn reference() -> Value {
    let script = repo_root().join("crates/trainer-cli/tests/reference/momentum_reference.py");
    let out = Command::new(python())
        .arg(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); set TRAINER_PYTHON to a Python with torch and galore-torch (scripts/requirements-test.txt)", python()));
    assert!(
        out.status.success(),
        "momentum_reference.py failed (exit {:?}); it needs torch and galore-torch from scripts/requirements-test.txt:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().expect("a JSON line")).expect("JSON")
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number"))
        .collect()
}

fn f32s(v: &Value) -> Vec<f32> {
    f64s(v).into_iter().map(|x| x as f32).collect()
}

fn pair(v: &Value) -> [f64; 2] {
    let b = f64s(v);
    [b[0], b[1]]
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.detach().reshape([-1])).expect("float32 tensor")
}

/// Gives `p` exactly the gradient `g`: d/dp sum(p * g) = g, accumulated onto a zeroed grad.
fn set_grad(p: &Tensor, g: &[f32]) {
    let mut old = p.grad();
    if old.defined() {
        let _ = old.zero_();
    }
    let g = Tensor::from_slice(g).reshape(p.size());
    (p * g).sum(Kind::Float).backward();
}

/// The case's optimizer over fresh leaves holding its initial parameters.
fn build(case: &Value, fused: bool) -> (Optimizer, Vec<Tensor>) {
    let params: Vec<Tensor> = case["params"]
        .as_array()
        .expect("array")
        .iter()
        .map(|p| {
            let shape: Vec<i64> = f64s(&p["shape"]).into_iter().map(|x| x as i64).collect();
            Tensor::from_slice(&f32s(&p["init"]))
                .reshape(&shape)
                .set_requires_grad(true)
        })
        .collect();
    let named: Vec<(String, Tensor, bool)> = case["params"]
        .as_array()
        .expect("array")
        .iter()
        .zip(&params)
        .map(|(p, t)| {
            let name = p["name"].as_str().expect("string").to_string();
            (name, t.shallow_clone(), p["decay"].as_bool().expect("bool"))
        })
        .collect();
    let wd = case["weight_decay"].as_f64().expect("number");
    let opt = match case["kind"].as_str().expect("string") {
        "adamw" => {
            let mut o = AdamW::new(
                named,
                pair(&case["betas"]),
                case["eps"].as_f64().expect("number"),
                wd,
            );
            o.fused = fused;
            Optimizer::AdamW(o)
        }
        "sgd" => Optimizer::Sgd(Sgd::new(
            named,
            case["momentum"].as_f64().expect("number"),
            case["dampening"].as_f64().expect("number"),
            case["nesterov"].as_bool().expect("bool"),
            wd,
        )),
        "galore_adamw" => {
            let target: Vec<String> = case["target"]
                .as_array()
                .expect("array")
                .iter()
                .map(|t| t.as_str().expect("string").to_string())
                .collect();
            let projection = Projection {
                rank: case["rank"].as_i64().expect("integer"),
                update_proj_gap: case["update_proj_gap"].as_i64().expect("integer"),
                scale: case["scale"].as_f64().expect("number"),
            };
            Optimizer::GaloreAdamW(
                GaloreAdamW::new(
                    named,
                    &target,
                    projection,
                    pair(&case["betas"]),
                    case["eps"].as_f64().expect("number"),
                    wd,
                )
                .expect("galore"),
            )
        }
        other => panic!("unknown kind {other}"),
    };
    (opt, params)
}

/// Replays the case's steps, setting the scheduled momentum before each, and compares every
/// parameter after every step with `|ours - torch| <= atol + rtol * |torch|`.
fn check_case(case: &Value, fused: bool) {
    let label = format!(
        "{}{}",
        case["name"].as_str().expect("string"),
        if fused { " (fused)" } else { "" }
    );
    let (rtol, atol) = if case["kind"] == "galore_adamw" {
        (1e-5, 1e-6)
    } else {
        (1e-6, 1e-7)
    };
    let max = case.get("betas").map_or_else(
        || case["momentum"].as_f64().expect("number"),
        |b| pair(b)[0],
    );
    let min = case["momentum_min"].as_f64().expect("number");
    let peak = case["peak_lr"].as_f64().expect("number");
    let (mut opt, params) = build(case, fused);
    let lrs = f64s(&case["lrs"]);
    let momenta = f64s(&case["momenta"]);
    let grads = case["grads"].as_array().expect("array");
    let after = case["after_step"].as_array().expect("array");
    for step in 0..lrs.len() {
        let m = MomentumSchedule::InverseLr
            .momentum(max, Some(min), lrs[step], peak)
            .expect("a scheduled momentum");
        // Not to the bit: serde_json's default float parsing may round the last bit of an input.
        assert!(
            (m - momenta[step]).abs() < 1e-12,
            "{label} step {}: momentum {m}, torch's {}",
            step + 1,
            momenta[step]
        );
        opt.set_momentum(m);
        for (p, g) in params.iter().zip(grads[step].as_array().expect("array")) {
            set_grad(p, &f32s(g));
        }
        opt.step(lrs[step]).expect("optimizer step");
        for (i, (p, e)) in params
            .iter()
            .zip(after[step].as_array().expect("array"))
            .enumerate()
        {
            for (j, (a, e)) in values(p).iter().zip(f32s(e)).enumerate() {
                let (a, e) = (f64::from(*a), f64::from(e));
                assert!(
                    (a - e).abs() <= atol + rtol * e.abs(),
                    "{label} step {} param {i}[{j}]: ours {a:e}, torch {e:e}",
                    step + 1
                );
            }
        }
    }
}

#[test]
fn scheduled_momentum_steps_like_torch() {
    let reference = reference();
    let cases = reference["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 5);
    for case in cases {
        check_case(case, false);
        if case["kind"] == "adamw" {
            // The fused kernel takes the betas per call.
            check_case(case, true);
        }
    }
}

/// The tiny recipe with AdamW betas [0.9, 0.95] at peak LR 3e-3, cosine after 5 warmup steps,
/// 10 steps, a checkpoint after each; `extra_train` is appended to `[train]`.
fn recipe(betas: &str, extra_train: &str) -> String {
    let r = tiny_recipe("run");
    let r = replace_line(
        &r,
        "kind = \"adamw\"",
        &format!("kind = \"adamw\"\nbetas = {betas}"),
    );
    let r = replace_line(&r, "max_steps = 40", "max_steps = 10");
    let r = replace_line(&r, "checkpoint_every = 5", "checkpoint_every = 1");
    replace_line(
        &r,
        "keep_checkpoints = 2",
        &format!("keep_checkpoints = 20\n{extra_train}"),
    )
}

fn weights(run: &Path, step: i64) -> BTreeMap<String, Tensor> {
    let path = run.join(format!("checkpoints/step-{step:08}/model.safetensors"));
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn same_weights(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> bool {
    a.len() == b.len() && a.iter().all(|(n, t)| t.equal(&b[n]))
}

#[test]
fn inverse_lr_logs_and_applies_the_momentum_of_each_step() {
    let work = workdir();
    let w = work.path();
    let schedule = "momentum_schedule = \"inverse_lr\"\nmomentum_min = 0.85";
    write_recipe(w, "inverse.toml", &recipe("[0.9, 0.95]", schedule));
    let rows = train_rows(&run_tiny(w, "inverse.toml", "inverse", &[]));
    assert_eq!(rows.len(), 10);
    let peak = 3e-3;
    for r in &rows {
        let expected = 0.9 - (0.9 - 0.85) * (num(r, "lr") / peak);
        assert_eq!(num(r, "momentum"), expected, "{r}");
    }
    // Warmup start: low LR, momentum near the optimizer's own 0.9.
    let first = num(&rows[0], "momentum");
    assert!(
        (first - (0.9 - 0.05 / 5.0)).abs() < 1e-12,
        "step 1: {first}"
    );
    // At the LR's peak, exactly momentum_min.
    let at_peak: Vec<&Value> = rows.iter().filter(|r| num(r, "lr") == peak).collect();
    assert!(!at_peak.is_empty(), "no step at the peak LR: {rows:?}");
    for r in at_peak {
        assert!((num(r, "momentum") - 0.85).abs() < 1e-15, "{r}");
    }
    // The end of the cosine decay: LR near min_lr 3e-4, momentum back up near 0.895.
    let last = &rows[9];
    assert!(num(last, "lr") < 1e-3, "{last}");
    assert!(num(last, "momentum") > 0.88, "{last}");

    // The logged momentum is the one that stepped: a constant-momentum run whose beta1 is step
    // 1's momentum leaves the same weights after step 1 (and different ones after step 2, where
    // the scheduled momentum has moved on).
    let betas = format!("[{:?}, 0.95]", num(&rows[0], "momentum"));
    write_recipe(w, "constant.toml", &recipe(&betas, ""));
    let constant_rows = train_rows(&run_tiny(w, "constant.toml", "constant", &[]));
    assert!(
        constant_rows[0].get("momentum").is_none(),
        "{}",
        constant_rows[0]
    );
    let (inverse, constant) = (w.join("inverse"), w.join("constant"));
    assert!(same_weights(&weights(&inverse, 1), &weights(&constant, 1)));
    assert!(!same_weights(&weights(&inverse, 2), &weights(&constant, 2)));
}

#[test]
fn bad_momentum_schedules_are_one_line_errors() {
    let work = workdir();
    let w = work.path();
    let cases: [(&str, &str, &[&str]); 6] = [
        (
            "kind = \"adamw\"",
            "momentum_schedule = \"inverse_lr\"",
            &["train.momentum_min", "needs"],
        ),
        (
            "kind = \"adamw\"",
            "momentum_min = 0.85",
            &["train.momentum_min", "inverse_lr"],
        ),
        (
            "kind = \"adamw\"",
            "momentum_schedule = \"inverse_lr\"\nmomentum_min = 0.9",
            &["train.momentum_min", "0.9"],
        ),
        (
            "kind = \"adamw\"",
            "momentum_schedule = \"inverse_lr\"\nmomentum_min = -0.1",
            &["train.momentum_min", "-0.1"],
        ),
        (
            "kind = \"sgd\"",
            "momentum_schedule = \"inverse_lr\"\nmomentum_min = 0.5",
            &["train.momentum_schedule", "no momentum"],
        ),
        (
            "kind = \"gsm\"\ndensity = 0.5",
            "momentum_schedule = \"inverse_lr\"\nmomentum_min = 0.5",
            &["train.momentum_schedule", "gsm"],
        ),
    ];
    for (i, (optim, train, needles)) in cases.iter().enumerate() {
        let r = tiny_recipe("run");
        let r = replace_line(&r, "kind = \"adamw\"", optim);
        let r = replace_line(
            &r,
            "keep_checkpoints = 2",
            &format!("keep_checkpoints = 2\n{train}"),
        );
        let file = format!("bad{i}.toml");
        write_recipe(w, &file, &r);
        trainer(w, &["validate", &file]).assert_one_error(needles);
    }
}
