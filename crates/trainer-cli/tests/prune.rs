//! Pruning through the real binary on the CPU: Wanda against a Python reference on a Hugging
//! Face Llama (`reference/wanda_reference.py`), one-shot magnitude pruning then evaluation and
//! fine-tuning with the zeros kept, gradual magnitude pruning during training that resumes
//! bitwise, GSM training with its final cut, and the bad inputs.

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn count(t: &Tensor) -> i64 {
    t.to_kind(Kind::Int64).sum(Kind::Int64).int64_value(&[])
}

fn summary(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).expect("summary"))
        .expect("json")
}

/// Some ASCII text that is not the built-in corpus, for calibration.
fn calib_text() -> String {
    let words = [
        "the", "queen", "said", "rabbit", "tea", "time", "curious", "door", "small",
    ];
    let mut x: u64 = 12345;
    let mut out = String::new();
    while out.len() < 2048 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.push_str(words[(x >> 33) as usize % words.len()]);
        out.push(if (x >> 20) % 7 == 0 { '.' } else { ' ' });
    }
    out
}

#[test]
fn wanda_masks_match_the_reference_implementation() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "tiny.toml", &tiny_recipe("a"));
    run_tiny(w, "tiny.toml", "a", &["--set", "train.max_steps=10"]);
    trainer(w, &["export", "a", "--to", "hf", "hf"]).assert_success();
    std::fs::write(w.join("calib.txt"), calib_text()).expect("calib");
    for (flag, value, name) in [("--sparsity", "0.5", "0.5"), ("--nm", "2:4", "2:4")] {
        let out = format!("p{}", name.replace([':', '.'], "_"));
        let o = trainer(
            w,
            &[
                "prune",
                "--init",
                "hf:hf",
                "--method",
                "wanda",
                flag,
                value,
                "--calib",
                "calib.txt",
                "--seq-len",
                "16",
                "--batch-size",
                "4",
                "--calib-batches",
                "3",
                "--out",
                &out,
            ],
        );
        o.assert_success();
        assert!(
            o.stdout.contains("total"),
            "the sparsity table: {}",
            o.stdout
        );
        let script = repo_root().join("crates/trainer-cli/tests/reference/wanda_reference.py");
        let status = std::process::Command::new(python())
            .current_dir(w)
            .args([
                script.to_str().unwrap(),
                "hf",
                "calib.txt",
                "16",
                "4",
                "3",
                name,
                "ref.safetensors",
            ])
            .status()
            .expect("running the reference");
        assert!(status.success(), "wanda_reference.py failed");
        let ours = tensors(&w.join(&out).join("masks.safetensors"));
        let reference = tensors(&w.join("ref.safetensors"));
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>(),
            "the same weights are pruned"
        );
        let (mut differ, mut total) = (0, 0);
        for (k, a) in &ours {
            let b = &reference[k];
            assert_eq!(count(a), count(b), "{k}: the same number of pruned weights");
            differ += count(&a.logical_xor(b));
            total += a.numel() as i64;
        }
        eprintln!("wanda {name}: {differ} of {total} mask entries differ from the reference");
        // The calibration norms are sums in a different order (SDPA vs eager attention), so a
        // near-tie may rank the other way; anything beyond that is a real difference.
        assert!(
            differ * 1000 <= total,
            "{name}: {differ} of {total} mask entries differ from the reference"
        );
        // The pruned HF model evaluates.
        let e = trainer(
            w,
            &[
                "eval",
                "--init",
                &format!("hf:{out}"),
                "--data",
                "calib.txt",
                "--seq-len",
                "16",
                "--json",
            ],
        );
        e.assert_success();
    }
    // 2:4: at most two weights kept in every group of four inputs.
    let masks = tensors(&w.join("p2_4/masks.safetensors"));
    for (k, m) in &masks {
        let s = m.size();
        let kept = m
            .logical_not()
            .to_kind(Kind::Int64)
            .reshape([s[0], s[1] / 4, 4])
            .sum_dim_intlist(2, false, Kind::Int64);
        assert_eq!(
            count(&kept.eq(2)),
            s[0] * s[1] / 4,
            "{k}: exactly 2 of every 4 kept"
        );
    }
}

#[test]
fn magnitude_pruned_checkpoint_evaluates_and_fine_tunes_with_the_zeros_kept() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "tiny.toml", &tiny_recipe("a"));
    run_tiny(w, "tiny.toml", "a", &["--set", "train.max_steps=10"]);
    let o = trainer(
        w,
        &[
            "prune",
            "--init",
            "a",
            "--method",
            "magnitude",
            "--sparsity",
            "0.6",
            "--out",
            "p",
        ],
    );
    o.assert_success();
    assert!(o.stdout.contains("60.00%"), "{}", o.stdout);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(w.join("p/pruning.json")).unwrap()).unwrap();
    let global = report["report"]["global_sparsity"].as_f64().unwrap();
    assert!((global - 0.6).abs() < 1e-4, "{global}");
    // Global ranking: the layers end up with different sparsities.
    let layers = report["report"]["layers"].as_array().unwrap();
    let sp: Vec<f64> = layers
        .iter()
        .map(|l| l["sparsity"].as_f64().unwrap())
        .collect();
    assert!(sp.iter().any(|s| (s - 0.6).abs() > 0.01), "{sp:?}");
    let ckpt = w.join("p/checkpoints/step-00000010");
    let masks = tensors(&ckpt.join("masks.safetensors"));
    let model = tensors(&ckpt.join("model.safetensors"));
    for (k, m) in &masks {
        assert_eq!(
            count(&model[k].eq(0.0).logical_and(m)),
            count(m),
            "{k} is zero where pruned"
        );
    }
    trainer(
        w,
        &[
            "eval",
            "--init",
            "p",
            "--data",
            "tiny.toml",
            "--seq-len",
            "16",
            "--batches",
            "2",
        ],
    )
    .assert_success();

    // Fine-tune from the pruned checkpoint: the pruned weights stay exactly zero.
    let ft = tiny_recipe("ft").replace("[model]", "[init]\nfrom = \"p\"\n\n[model]");
    write_recipe(w, "ft.toml", &ft);
    run_tiny(w, "ft.toml", "ft", &["--set", "train.max_steps=10"]);
    let after = tensors(&w.join("ft/checkpoints/step-00000010/model.safetensors"));
    let after_masks = tensors(&w.join("ft/checkpoints/step-00000010/masks.safetensors"));
    for (k, m) in &masks {
        assert_eq!(
            count(&after[k].eq(0.0).logical_and(m)),
            count(m),
            "{k} stayed zero"
        );
        assert!(
            after_masks[k].equal(m),
            "{k}: the mask travels with the checkpoint"
        );
        // And the kept weights did train.
        assert!(!after[k].equal(&model[k]), "{k} trained");
    }
}

fn gradual_recipe(out: &str) -> String {
    let r = tiny_recipe(out);
    let r = replace_line(&r, "keep_checkpoints = 2", "keep_checkpoints = 10");
    format!("{r}\n[prune]\nmethod = \"magnitude\"\nsparsity = 0.5\nstart_step = 5\nend_step = 25\nevery = 5\n")
}

#[test]
fn gradual_magnitude_pruning_keeps_zeros_and_resumes_bitwise() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "gradual.toml", &gradual_recipe("a"));
    let rows = train_rows(&run_tiny(w, "gradual.toml", "a", &[]));
    let sparsity: BTreeMap<i64, f64> = rows
        .iter()
        .map(|r| (step_of(r), num(r, "prune/sparsity")))
        .collect();
    assert_eq!(sparsity[&4], 0.0, "nothing pruned before start_step");
    // Cubic schedule: 0.5 * (1 - (1 - p)^3) after steps 10, 15, 20, 25.
    for (step, p) in [(10, 0.25), (15, 0.5), (20, 0.75), (25, 1.0)] {
        let want = 0.5 * (1.0 - (1.0f64 - p).powi(3));
        assert!(
            (sparsity[&step] - want).abs() < 1e-3,
            "step {step}: {} vs {want}",
            sparsity[&step]
        );
    }
    // The zeros stay through 15 more steps of training.
    assert!((sparsity[&40] - 0.5).abs() < 1e-3, "{}", sparsity[&40]);
    let s = summary(&w.join("a"));
    assert!((s["pruning"]["global_sparsity"].as_f64().unwrap() - 0.5).abs() < 1e-3);
    assert!(w
        .join("a/checkpoints/step-00000020/masks.safetensors")
        .is_file());

    // Resumed in the middle of the schedule: every later loss and the final model are bitwise
    // those of the uninterrupted run.
    let b = train_rows(&run_tiny(
        w,
        "gradual.toml",
        "b",
        &["--resume", "a/checkpoints/step-00000015"],
    ));
    let ra: BTreeMap<i64, f64> = rows.iter().map(|r| (step_of(r), num(r, "loss"))).collect();
    for r in &b {
        assert_eq!(
            num(r, "loss").to_bits(),
            ra[&step_of(r)].to_bits(),
            "step {}",
            step_of(r)
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
        model("a") == model("b"),
        "the final model after resuming differs"
    );
}

#[test]
fn gsm_trains_and_cuts_to_the_target_density() {
    let work = workdir();
    let w = work.path();
    let r = replace_line(
        &tiny_recipe("g"),
        "kind = \"adamw\"",
        "kind = \"gsm\"\nmomentum = 0.9\nweight_decay = 1e-3\ndensity = 0.3",
    );
    let r = replace_line(&r, "lr = 3e-3", "lr = 0.05");
    let r = replace_line(&r, "min_lr = 3e-4", "min_lr = 5e-3");
    write_recipe(w, "gsm.toml", &r);
    let rows = train_rows(&run_tiny(w, "gsm.toml", "g", &[]));
    let first = &rows[0];
    let last = rows.last().unwrap();
    assert!(num(last, "loss") < num(first, "loss"), "the loss falls");
    // Every step at least the density gets its gradient (more only on ties).
    for r in &rows {
        assert!(num(r, "gsm/selected_fraction") >= 0.3 - 1e-3, "{r}");
        assert!(
            (num(r, "gsm/density") - 0.3).abs() < 1e-3,
            "a cut now keeps the density"
        );
    }
    // Before the cut, the would-be-cut weights still hold some norm; after it they are zero.
    assert!(num(&rows[rows.len() - 2], "gsm/cut_norm_fraction") > 0.0);
    assert!((num(last, "prune/sparsity") - 0.7).abs() < 1e-3, "{last}");
    let s = summary(&w.join("g"));
    let p = &s["pruning"];
    assert!((p["global_sparsity"].as_f64().unwrap() - 0.7).abs() < 1e-3);
    // Per-layer sparsity comes from the global ranking, not one number for all.
    let layers: Vec<f64> = p["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["sparsity"].as_f64().unwrap())
        .collect();
    assert!(layers.iter().any(|x| (x - 0.7).abs() > 0.02), "{layers:?}");
    assert!(w
        .join("g/checkpoints/step-00000040/masks.safetensors")
        .is_file());
}

#[test]
fn bad_pruning_input_is_one_line_naming_the_key() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, "tiny.toml", &tiny_recipe("a"));
    run_tiny(w, "tiny.toml", "a", &["--set", "train.max_steps=5"]);
    let prune = |extra: &[&str]| {
        let mut args = vec!["prune", "--init", "a", "--out", "p"];
        args.extend_from_slice(extra);
        trainer(w, &args)
    };
    prune(&["--method", "magnitude", "--sparsity", "1.5"])
        .assert_one_error(&["--sparsity", "(0, 1)"]);
    prune(&["--method", "wanda", "--nm", "4:4"]).assert_one_error(&["--nm", "N < M"]);
    prune(&[
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "--prunable",
        "nothing_here",
    ])
    .assert_one_error(&["--prunable", "nothing_here"]);
    prune(&[
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--prunable",
        "nothing_here",
    ])
    .assert_one_error(&["--prunable", "nothing_here"]);
    assert!(!w.join("p").exists() || std::fs::read_dir(w.join("p")).unwrap().next().is_none());
    // An existing output directory is left alone.
    std::fs::create_dir(w.join("p")).unwrap();
    std::fs::write(w.join("p/keep.txt"), "mine").unwrap();
    prune(&["--method", "magnitude", "--sparsity", "0.5"])
        .assert_one_error(&["--out", "not empty"]);
    assert_eq!(
        std::fs::read_to_string(w.join("p/keep.txt")).unwrap(),
        "mine"
    );

    let gsm = |line: &str| replace_line(&tiny_recipe("g"), "kind = \"adamw\"", line);
    for (text, key) in [
        (gsm("kind = \"gsm\"\ndensity = 1.5"), "optim.density"),
        (gsm("kind = \"gsm\"\ndensity = 0.0"), "optim.density"),
        (gsm("kind = \"gsm\"\ndensity = 0.5\nweight_decay = 0.0"), "optim.weight_decay"),
        (gsm("kind = \"gsm\"\ndensity = 0.5\nprunable = [\"nothing_here\"]"), "optim.prunable"),
        (format!("{}\n[prune]\nmethod = \"magnitude\"\nsparsity = 0.5\nprunable = [\"nothing_here\"]\n", tiny_recipe("g")), "prune.prunable"),
        (format!("{}\n[prune]\nmethod = \"magnitude\"\nsparsity = 1.0\n", tiny_recipe("g")), "prune.sparsity"),
        (format!("{}\n[prune]\nmethod = \"magnitude\"\nsparsity = 0.5\nend_step = 400\n", tiny_recipe("g")), "prune.end_step"),
    ] {
        write_recipe(w, "bad.toml", &text);
        trainer(w, &["run", "bad.toml"]).assert_one_error(&[key]);
    }
}

/// GaLore's `target` and every `prunable` used to match substrings; such a pattern in an old
/// recipe stops the run before it starts, with one line naming the key, the pattern and the
/// spelling of its old meaning under the one name rule (`models/params.rs`).
#[test]
fn old_substring_patterns_stop_the_run_naming_the_new_spelling() {
    let work = workdir();
    let w = work.path();
    let optim = |line: &str| replace_line(&tiny_recipe("o"), "kind = \"adamw\"", line);
    for (text, needles) in [
        (
            optim("kind = \"galore_adamw\"\nrank = 2\ntarget = [\"attn\"]"),
            ["optim.target", "\"attn\"", "write \"*attn*\""],
        ),
        (
            optim("kind = \"gsm\"\ndensity = 0.5\nprunable = [\"mlp\"]"),
            ["optim.prunable", "\"mlp\"", "write \"mlp.*\""],
        ),
        (
            format!(
                "{}\n[prune]\nmethod = \"magnitude\"\nsparsity = 0.5\nprunable = [\"proj\"]\n",
                tiny_recipe("o")
            ),
            ["prune.prunable", "\"proj\"", "write \"*proj\""],
        ),
    ] {
        write_recipe(w, "old.toml", &text);
        trainer(w, &["run", "old.toml"]).assert_one_error(&needles);
        assert!(!w.join("o/checkpoints").exists());
    }
    // The new spellings run.
    let text = optim("kind = \"galore_adamw\"\nrank = 2\ntarget = [\"*attn*\", \"mlp.*\"]");
    write_recipe(w, "new.toml", &text);
    let out = trainer(w, &["run", "new.toml", "--set", "train.max_steps=6"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
}

#[test]
fn structured_pruning_makes_a_smaller_model_that_evaluates_and_trains() {
    let work = workdir();
    let w = work.path();
    let r = replace_line(&tiny_recipe("a"), "n_layers = 2", "n_layers = 3");
    write_recipe(w, "tiny.toml", &r);
    run_tiny(w, "tiny.toml", "a", &["--set", "train.max_steps=10"]);
    let o = trainer(
        w,
        &[
            "prune",
            "--init",
            "a",
            "--method",
            "structured",
            "--d-ff",
            "40",
            "--layers",
            "2",
            "--calib-batches",
            "2",
            "--out",
            "s",
        ],
    );
    o.assert_success();
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(w.join("s/pruning.json")).unwrap()).unwrap();
    assert_eq!(report["n_layers"].as_i64(), Some(2));
    assert_eq!(report["d_ff"].as_i64(), Some(40));
    assert!(report["params_after"].as_i64() < report["params_before"].as_i64());
    let config = std::fs::read_to_string(w.join("s/config.toml")).unwrap();
    assert!(
        config.contains("n_layers = 2") && config.contains("d_ff = 40"),
        "{config}"
    );
    trainer(
        w,
        &[
            "eval",
            "--init",
            "s",
            "--data",
            "tiny.toml",
            "--seq-len",
            "16",
            "--batches",
            "2",
        ],
    )
    .assert_success();
    // Recovery training starts from the pruned model; its architecture comes from the checkpoint.
    let ft = tiny_recipe("ft");
    let start = ft.find("[model]").unwrap();
    let end = ft.find("[data]").unwrap();
    let ft = format!("{}[init]\nfrom = \"s\"\n\n{}", &ft[..start], &ft[end..]);
    write_recipe(w, "ft.toml", &ft);
    let rows = train_rows(&run_tiny(
        w,
        "ft.toml",
        "ft",
        &["--set", "train.max_steps=10"],
    ));
    assert_eq!(rows.len(), 10);
    assert_eq!(
        summary(&w.join("ft"))["params"].as_i64(),
        report["params_after"].as_i64()
    );
    trainer(
        w,
        &[
            "prune",
            "--init",
            "a",
            "--method",
            "structured",
            "--layers",
            "4",
            "--out",
            "s2",
        ],
    )
    .assert_one_error(&["--layers", "1..=3"]);
    trainer(
        w,
        &[
            "prune",
            "--init",
            "a",
            "--method",
            "structured",
            "--heads",
            "3",
            "--out",
            "s4",
        ],
    )
    .assert_one_error(&["--heads", "multiple of 2"]);

    // Heads too (4 heads in 2 key/value groups -> 2 heads, head_dim stays 8): the Hugging Face
    // export loads in transformers, which computes the loss `trainer eval` does.
    trainer(
        w,
        &[
            "prune",
            "--init",
            "a",
            "--method",
            "structured",
            "--heads",
            "2",
            "--d-ff",
            "40",
            "--calib-batches",
            "2",
            "--out",
            "h",
        ],
    )
    .assert_success();
    let config = std::fs::read_to_string(w.join("h/config.toml")).unwrap();
    assert!(
        config.contains("n_heads = 2")
            && config.contains("n_kv_heads = 1")
            && config.contains("head_dim = 8"),
        "{config}"
    );
    trainer(w, &["export", "h", "--to", "hf", "h-hf"]).assert_success();
    let ours = trainer(
        w,
        &[
            "eval",
            "--init",
            "hf:h-hf",
            "--data",
            "tiny.toml",
            "--seq-len",
            "16",
            "--json",
        ],
    );
    ours.assert_success();
    let ours: Value = serde_json::from_str(ours.stdout.trim()).unwrap();
    let script = repo_root().join("crates/trainer-cli/tests/reference/hf_eval.py");
    let out = std::process::Command::new(python())
        .current_dir(w)
        .args([
            script.to_str().unwrap(),
            "eval",
            "h-hf",
            "tiny.toml",
            "16",
            "8",
        ])
        .output()
        .expect("running hf_eval.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Value = serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    let (a, b) = (
        ours["loss"].as_f64().unwrap(),
        theirs["loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-4 * b, "trainer {a} vs transformers {b}");
    trainer(
        w,
        &[
            "prune",
            "--init",
            "a",
            "--method",
            "structured",
            "--sparsity",
            "0.5",
            "--out",
            "s3",
        ],
    )
    .assert_one_error(&["--sparsity"]);
}

fn tiny_resnet(out_dir: &str, optim: &str, extra: &str) -> String {
    format!(
        "[run]\nname = \"r\"\ntask = \"classify\"\nseed = 3\nout_dir = {}\ndevice = \"cpu\"\nthreads = 1\n\n\
         {extra}\
         [model]\nkind = \"cifar_resnet\"\ndepth = 8\nnum_classes = 10\n\n\
         [data]\ntrain = {{ kind = \"builtin_shapes\", split = \"train\", images = 600 }}\n\
         valid = {{ kind = \"builtin_shapes\", split = \"test\", images = 100 }}\n\n\
         [optim]\n{optim}\n\n[train]\nbatch_size = 32\nmax_steps = 20\neval_every = 20\nlog_every = 1\ncheckpoint_every = 10\n",
        toml_str(out_dir)
    )
}

#[test]
fn gsm_and_magnitude_prune_a_resnet_classifier() {
    let work = workdir();
    let w = work.path();
    let gsm = "kind = \"gsm\"\nlr = 0.1\nmomentum = 0.9\nweight_decay = 1e-3\ndensity = 0.4";
    write_recipe(w, "gsm.toml", &tiny_resnet("g", gsm, ""));
    trainer(w, &["run", "gsm.toml"]).assert_success();
    let s = summary(&w.join("g"));
    let p = &s["pruning"];
    assert!(
        (p["global_sparsity"].as_f64().unwrap() - 0.6).abs() < 1e-3,
        "{p}"
    );
    // Convolutions and the classifier are prunable; BatchNorm is not.
    let names: Vec<&str> = p["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("conv1")) && names.contains(&"fc.weight"),
        "{names:?}"
    );
    assert!(!names.iter().any(|n| n.contains("bn")), "{names:?}");

    // One-shot magnitude pruning of the trained classifier, then fine-tuning with the zeros kept.
    let sgd = "kind = \"sgd\"\nlr = 0.05\nmomentum = 0.9";
    write_recipe(w, "dense.toml", &tiny_resnet("d", sgd, ""));
    trainer(w, &["run", "dense.toml"]).assert_success();
    trainer(
        w,
        &[
            "prune",
            "--init",
            "d",
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--scope",
            "layer",
            "--out",
            "p",
        ],
    )
    .assert_success();
    trainer(
        w,
        &[
            "prune",
            "--init",
            "d",
            "--method",
            "wanda",
            "--sparsity",
            "0.5",
            "--out",
            "p2",
        ],
    )
    .assert_one_error(&["--method", "magnitude"]);
    let init = "[init]\nfrom = \"p/checkpoints/step-00000020\"\n\n";
    write_recipe(w, "ft.toml", &tiny_resnet("ft", sgd, init));
    trainer(w, &["run", "ft.toml"]).assert_success();
    let masks = tensors(&w.join("p/checkpoints/step-00000020/masks.safetensors"));
    let after = tensors(&w.join("ft/checkpoints/step-00000020/model.safetensors"));
    for (k, m) in &masks {
        // Per layer: every prunable tensor is half zeros.
        assert!(
            (count(m) as f64 / m.numel() as f64 - 0.5).abs() < 0.02,
            "{k}"
        );
        assert_eq!(
            count(&after[k].eq(0.0).logical_and(m)),
            count(m),
            "{k} stayed zero"
        );
    }
}

/// The prune-then-distill pipeline's recipes (configs/prune_distill/, run by
/// scripts/prune_distill.sh) validate and train for two steps from tiny stand-ins of the models
/// the script makes first.
#[test]
fn prune_distill_pipeline_configs_run() {
    let work = workdir();
    let w = work.path();
    let quickstart = repo_root().join("configs/quickstart.toml");
    trainer(
        w,
        &[
            "run",
            quickstart.to_str().unwrap(),
            "--set",
            "train.max_steps=2",
            "--set",
            "run.threads=1",
            "--set",
            "schedule.warmup_steps=1",
            "--set",
            "run.out_dir=runs/prune_distill/teacher",
        ],
    )
    .assert_success();
    let teacher = "runs/prune_distill/teacher";
    trainer(
        w,
        &[
            "prune",
            "--init",
            teacher,
            "--method",
            "structured",
            "--d-ff",
            "176",
            "--heads",
            "2",
            "--layers",
            "3",
            "--calib-batches",
            "1",
            "--out",
            "runs/prune_distill/pruned",
        ],
    )
    .assert_success();
    trainer(
        w,
        &[
            "prune",
            "--init",
            teacher,
            "--method",
            "magnitude",
            "--sparsity",
            "0.5",
            "--out",
            "runs/prune_distill/magnitude",
        ],
    )
    .assert_success();
    for name in [
        "finetune",
        "distill",
        "magnitude_finetune",
        "gsm",
        "magnitude_adamw",
    ] {
        let path = repo_root().join(format!("configs/prune_distill/{name}.toml"));
        let p = path.to_str().unwrap();
        trainer(w, &["validate", p]).assert_success();
        trainer(
            w,
            &[
                "run",
                p,
                "--set",
                "train.max_steps=2",
                "--set",
                "schedule.warmup_steps=1",
                "--set",
                "run.threads=1",
            ],
        )
        .assert_success();
    }
    let gsm = summary(&w.join("runs/prune_distill/gsm"));
    assert!((gsm["pruning"]["global_sparsity"].as_f64().unwrap() - 0.5).abs() < 1e-3);
}
