//! LoRA and LoRA-FA through the real binary, against Hugging Face peft (reference:
//! tests/reference/peft_reference.py):
//! - a tiny run with `[peft]` trains only the adapters (the start-up line and summary.json count
//!   them), and `trainer eval --init RUN` evaluates base + adapters;
//! - `trainer export RUN --to hf` (the base) plus `--to peft` (the adapters), loaded with
//!   `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)`, give the
//!   same loss on the same windows; so do peft's `merge_and_unload()` and our `--merged` export;
//! - `[peft] from = ADAPTER` continues from an exported adapter;
//! - a rank too large for a weight and a pattern that matches nothing are one-line errors.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::Command;

fn reference(args: &[&str]) -> Value {
    let script = repo_root().join("crates/trainer-cli/tests/reference/peft_reference.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); set TRAINER_PYTHON to a Python with torch, transformers and peft (scripts/requirements-test.txt)", python()));
    assert!(
        out.status.success(),
        "peft_reference.py failed (exit {:?}); it needs torch, transformers and peft from scripts/requirements-test.txt (pip install -r scripts/requirements-test.txt):\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().expect("a JSON line")).expect("JSON")
}

fn write_data(dir: &Path) -> String {
    let text = std::fs::read_to_string(repo_root().join("crates/trainer/data/wonderland.txt"))
        .expect("corpus");
    std::fs::write(dir.join("data.txt"), &text.as_bytes()[..2000]).expect("data");
    "data.txt".to_string()
}

fn eval_loss(cwd: &Path, init: &str, data: &str) -> f64 {
    let out = trainer(
        cwd,
        &[
            "eval",
            "--init",
            init,
            "--data",
            data,
            "--seq-len",
            "16",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--json",
        ],
    );
    out.assert_success();
    let v: Value = serde_json::from_str(out.stdout.lines().last().expect("json")).expect("json");
    v["loss"].as_f64().expect("loss")
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() / b.abs() < 1e-5
}

/// The tiny recipe as a GPT-2 of the same width.
fn gpt2_recipe(out_dir: &str) -> String {
    let r = tiny_recipe(out_dir);
    let r = replace_line(&r, "kind = \"llama\"", "kind = \"gpt2\"");
    let r = replace_line(&r, "n_kv_heads = 2", "");
    replace_line(&r, "d_ff = 64", "")
}

/// Trains `recipe` + `peft` for 8 steps, then checks every export against peft; returns the
/// trainer's eval loss of the run.
fn check_against_peft(recipe: &str, peft: &str, expect_modules: &[&str], expect_trainable: i64) {
    let dir = workdir();
    let cwd = dir.path();
    let data = write_data(cwd);
    let text = format!("{recipe}\n{peft}");
    let name = write_recipe(cwd, "lora.toml", &text);
    let out = trainer(
        cwd,
        &[
            "run",
            &name,
            "--set",
            "train.max_steps=8",
            "--set",
            "schedule.warmup_steps=0",
            "--set",
            "optim.lr=1e-2",
        ],
    );
    out.assert_success();
    assert!(
        out.stderr
            .contains(&format!("({} trainable)", human(expect_trainable))),
        "start-up line:\n{}",
        out.describe()
    );
    let summary: Value = serde_json::from_str(
        &std::fs::read_to_string(cwd.join("runs/lora/summary.json")).expect("summary"),
    )
    .expect("json");
    assert_eq!(
        summary["trainable_params"].as_i64(),
        Some(expect_trainable),
        "{summary}"
    );
    assert!(
        summary["params"].as_i64().expect("params") > 10 * expect_trainable,
        "{summary}"
    );

    let ours = eval_loss(cwd, "runs/lora", &data);
    trainer(cwd, &["export", "runs/lora", "--to", "hf", "base"]).assert_success();
    trainer(cwd, &["export", "runs/lora", "--to", "peft", "adapter"]).assert_success();
    trainer(
        cwd,
        &["export", "runs/lora", "--to", "hf", "merged", "--merged"],
    )
    .assert_success();
    let path = |name: &str| cwd.join(name).display().to_string();
    let r = reference(&[
        "eval",
        &path("base"),
        &path("adapter"),
        &path("merged"),
        &path(&data),
        "16",
        "4",
    ]);
    let modules: Vec<&str> = r["lora_modules"]
        .as_array()
        .expect("modules")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        modules, expect_modules,
        "peft put adapters on other modules: {r}"
    );
    assert!(
        r["lora_b_abs_sum"].as_f64().expect("sum") > 0.0,
        "the adapters trained and loaded: {r}"
    );
    let base = r["base"].as_f64().expect("base");
    assert!(
        (base - ours).abs() > 1e-3,
        "the adapters change the loss: base {base} vs adapted {ours}"
    );
    for key in ["peft", "peft_merged", "merged"] {
        let theirs = r[key].as_f64().expect(key);
        assert!(
            close(theirs, ours),
            "{key}: peft/transformers {theirs} vs trainer eval {ours} ({r})"
        );
    }
    // The base export is the untouched base: evaluating it as a model of its own gives peft's base.
    assert!(close(
        eval_loss(cwd, &format!("hf:{}", cwd.join("base").display()), &data),
        base
    ));

    // Fine-tune the exported base (`[init] from = "hf:..."`, no [model]) starting from the
    // exported adapter: with a vanishing learning rate, the model is the adapted one.
    let model_start = text.find("[model]").expect("[model]");
    let model_end = text.find("[data]").expect("[data]");
    let without_model = format!("{}{}", &text[..model_start], &text[model_end..]);
    let cont = format!(
        "{}\nfrom = {}\n",
        without_model.replace(
            "[run]",
            &format!(
                "[init]\nfrom = {}\n\n[run]",
                toml_str(&format!("hf:{}", path("base")))
            )
        ),
        toml_str(&path("adapter"))
    );
    let cont_name = write_recipe(cwd, "cont.toml", &cont);
    trainer(
        cwd,
        &[
            "run",
            &cont_name,
            "--set",
            "run.out_dir=runs/cont",
            "--set",
            "train.max_steps=1",
            "--set",
            "schedule.warmup_steps=0",
            "--set",
            "optim.lr=1e-12",
            "--set",
            "optim.weight_decay=0",
            "--set",
            "schedule.min_lr=1e-13",
        ],
    )
    .assert_success();
    let again = eval_loss(cwd, "runs/cont", &data);
    assert!(
        close(again, ours),
        "continued from the adapter: {again} vs {ours}"
    );
}

/// The `human` of the start-up line (`pretrain::human`).
fn human(n: i64) -> String {
    let n = n as f64;
    if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1}K", n / 1e3)
    } else {
        format!("{n}")
    }
}

#[test]
fn llama_lora_matches_peft() {
    let peft = "[peft]\nkind = \"lora\"\nrank = 4\nalpha = 8\ndropout = 0.1\ntarget = [\"q_proj\", \"v_proj\"]";
    // d_model 32, 2 kv heads of 8: per layer q 4*32 + 32*4, v 4*32 + 16*4.
    check_against_peft(
        &tiny_recipe("runs/lora"),
        peft,
        &[
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.v_proj",
        ],
        2 * (256 + 192),
    );
}

#[test]
fn gpt2_lora_fa_matches_peft() {
    // Conv1D weights ([in, out]): peft's fan_in_fan_out. LoRA-FA trains B only:
    // per layer c_attn B 96*4, mlp.c_fc B 128*4.
    let peft = "[peft]\nkind = \"lora_fa\"\nrank = 4\nalpha = 16\nrslora = true\ntarget = [\"c_attn\", \"mlp.c_fc\"]";
    check_against_peft(
        &gpt2_recipe("runs/lora"),
        peft,
        &[
            "transformer.h.0.attn.c_attn",
            "transformer.h.0.mlp.c_fc",
            "transformer.h.1.attn.c_attn",
            "transformer.h.1.mlp.c_fc",
        ],
        2 * (96 * 4 + 128 * 4),
    );
}

#[test]
fn bad_peft_settings_are_one_line_errors() {
    let dir = workdir();
    let cwd = dir.path();
    let base = tiny_recipe("runs/bad");
    for (peft, needles) in [
        (
            "rank = 17\ntarget = [\"v_proj\"]",
            vec!["peft.rank", "model.layers.0.self_attn.v_proj.weight", "17"],
        ),
        (
            "rank = 4\ntarget = [\"q_proj\", \"qkv\"]",
            vec!["peft.target", "\"qkv\""],
        ),
        (
            "rank = 0\ntarget = [\"q_proj\"]",
            vec!["peft.rank", "positive"],
        ),
        ("rank = 4\ntarget = []", vec!["peft.target"]),
    ] {
        let name = write_recipe(
            cwd,
            "bad.toml",
            &format!("{base}\n[peft]\nkind = \"lora\"\n{peft}\n"),
        );
        let out = trainer(cwd, &["run", &name]);
        out.assert_one_error(&needles);
        assert!(
            !cwd.join("runs/bad/checkpoints").exists(),
            "{}",
            out.describe()
        );
    }
    // Export flags that do not fit the run.
    let name = write_recipe(cwd, "plain.toml", &base);
    trainer(
        cwd,
        &[
            "run",
            &name,
            "--set",
            "train.max_steps=1",
            "--set",
            "schedule.warmup_steps=0",
        ],
    )
    .assert_success();
    trainer(cwd, &["export", "runs/bad", "--to", "peft", "out"])
        .assert_one_error(&["no LoRA adapters"]);
    trainer(
        cwd,
        &["export", "runs/bad", "--to", "hf", "out", "--merged"],
    )
    .assert_one_error(&["--merged", "no LoRA adapters"]);
}

#[test]
fn lora_run_resumes_exactly() {
    // Adapters and their optimizer state round-trip through checkpoints: resuming from step 3
    // replays the uninterrupted run's losses bitwise (CPU, one thread).
    let dir = workdir();
    let cwd = dir.path();
    let peft =
        "[peft]\nkind = \"lora\"\nrank = 2\ndropout = 0.1\ntarget = [\"q_proj\", \"mlp.*\"]\n";
    let name = write_recipe(
        cwd,
        "lora.toml",
        &format!("{}\n{peft}", tiny_recipe("runs/full")),
    );
    let set = [
        "--set",
        "train.max_steps=6",
        "--set",
        "train.checkpoint_every=3",
        "--set",
        "schedule.warmup_steps=2",
    ];
    let full = run_tiny(cwd, &name, "runs/full", &set);
    let mut args = vec!["--resume", "runs/full/checkpoints/step-00000003"];
    args.extend_from_slice(&set);
    let resumed = run_tiny(cwd, &name, "runs/resumed", &args);
    let losses = |rows: &[Value]| -> Vec<(i64, f64)> {
        train_rows(rows)
            .iter()
            .filter(|r| step_of(r) > 3)
            .map(|r| (step_of(r), num(r, "loss")))
            .collect()
    };
    assert_eq!(losses(&full).len(), 3);
    assert_eq!(losses(&full), losses(&resumed));
}

/// A tiny Llama and a LoRA adapter both written by transformers and peft
/// (peft_reference.py `make_adapter`); returns peft's loss of the adapted model.
fn make_peft_adapter(cwd: &Path, variant: &str, data: &str) -> f64 {
    let path = |name: &str| cwd.join(name).display().to_string();
    let r = reference(&[
        "make_adapter",
        variant,
        &path("base"),
        &path("adapter"),
        &path(data),
        "16",
        "4",
    ]);
    let (peft, base) = (
        r["peft"].as_f64().expect("peft"),
        r["base"].as_f64().expect("base"),
    );
    assert!(
        (peft - base).abs() > 1e-3,
        "{variant}: the adapter changes the loss: {r}"
    );
    peft
}

/// A recipe on the base of `make_peft_adapter` starting from its adapter, with `peft` the
/// settings of the [peft] section.
fn recipe_from_adapter(cwd: &Path, peft: &str) -> String {
    let hf = format!("hf:{}", cwd.join("base").display());
    let adapter = cwd.join("adapter").display().to_string();
    format!(
        "{}\n[peft]\nkind = \"lora\"\nfrom = {}\n{peft}\n",
        tiny_recipe_from(&hf, "runs/from-peft"),
        toml_str(&adapter)
    )
}

/// Adapters as peft writes them: plain, rsLoRA, and per-module `rank_pattern` / `alpha_pattern`
/// load with peft's loss; a recipe that states another value than adapter_config.json, and a
/// DoRA adapter, are one-line errors naming the field.
#[test]
fn peft_adapters_load_as_peft_wrote_them() {
    for (variant, peft) in [
        (
            "plain",
            "rank = 4\nalpha = 8\ntarget = [\"q_proj\", \"v_proj\"]",
        ),
        (
            "rslora",
            "rank = 4\nalpha = 8\nrslora = true\ntarget = [\"q_proj\", \"v_proj\"]",
        ),
        (
            "patterns",
            "rank = 4\nalpha = 8\ntarget = [\"q_proj\", \"v_proj\", \"down_proj\"]\n\
             rank_pattern = { q_proj = 2 }\nalpha_pattern = { v_proj = 32.0 }",
        ),
        // Other families, every projection under the names peft gives them there.
        ("qwen2_all", "rank = 4\nalpha = 8\nrslora = true\nalpha_pattern = { down_proj = 16.0 }\ntarget = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"mlp.*\"]"),
        ("gemma_all", "rank = 4\nalpha = 8\nrslora = true\nalpha_pattern = { down_proj = 16.0 }\ntarget = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"mlp.*\"]"),
        ("olmo2_all", "rank = 4\nalpha = 8\nrslora = true\nalpha_pattern = { down_proj = 16.0 }\ntarget = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"mlp.*\"]"),
        ("gemma2_all", "rank = 4\nalpha = 8\nrslora = true\nalpha_pattern = { down_proj = 16.0 }\ntarget = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"mlp.*\"]"),
        ("gemma3_all", "rank = 4\nalpha = 8\nrslora = true\nalpha_pattern = { down_proj = 16.0 }\ntarget = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"mlp.*\"]"),
        ("phi3_all", "rank = 4\nalpha = 8\nrslora = true\nalpha_pattern = { down_proj = 16.0 }\ntarget = [\"qkv_proj\", \"o_proj\", \"gate_up_proj\", \"down_proj\"]"),
        ("mistral_all", "rank = 4\nalpha = 8\nrslora = true\nalpha_pattern = { down_proj = 16.0 }\ntarget = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"mlp.*\"]"),
        ("qwen3_all", "rank = 4\nalpha = 8\nrslora = true\nalpha_pattern = { down_proj = 16.0 }\ntarget = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"mlp.*\"]"),
        ("granite_all", "rank = 4\nalpha = 8\nrslora = true\nalpha_pattern = { down_proj = 16.0 }\ntarget = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"mlp.*\"]"),
        ("mixtral_attention", "rank = 4\nalpha = 8\nrslora = true\nalpha_pattern = { o_proj = 16.0 }\ntarget = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\"]"),
        ("neox_all", "rank = 4\nalpha = 8\nrslora = true\nalpha_pattern = { dense_4h_to_h = 16.0 }\ntarget = [\"query_key_value\", \"dense\", \"mlp.*\"]"),
    ] {
        let dir = workdir();
        let cwd = dir.path();
        let data = write_data(cwd);
        let reference = make_peft_adapter(cwd, variant, &data);
        let name = write_recipe(cwd, "from_peft.toml", &recipe_from_adapter(cwd, peft));
        trainer(
            cwd,
            &[
                "run",
                &name,
                "--set",
                "train.max_steps=1",
                "--set",
                "schedule.warmup_steps=0",
                "--set",
                "optim.lr=1e-12",
                "--set",
                "optim.weight_decay=0",
                "--set",
                "schedule.min_lr=1e-13",
            ],
        )
        .assert_success();
        let ours = eval_loss(cwd, "runs/from-peft", &data);
        assert!(
            (ours - reference).abs() / reference < 1e-4,
            "{variant}: trainer {ours} vs peft {reference}"
        );
        if variant == "patterns" {
            // The patterns travel back out: peft's own loader gives the same loss again.
            trainer(cwd, &["export", "runs/from-peft", "--to", "peft", "again"]).assert_success();
            let written: Value = serde_json::from_str(
                &std::fs::read_to_string(cwd.join("again/adapter_config.json")).expect("config"),
            )
            .expect("json");
            assert_eq!(written["rank_pattern"], serde_json::json!({"q_proj": 2}));
            assert_eq!(
                written["alpha_pattern"],
                serde_json::json!({"v_proj": 32.0})
            );
        }
        if variant == "rslora" {
            // The same adapter under a recipe that forgets rslora, or states another alpha.
            for (peft, needles) in [
                (
                    "rank = 4\nalpha = 8\ntarget = [\"q_proj\", \"v_proj\"]",
                    vec!["use_rslora = true", "peft.rslora"],
                ),
                (
                    "rank = 4\nalpha = 16\nrslora = true\ntarget = [\"q_proj\", \"v_proj\"]",
                    vec!["lora_alpha = 8", "peft.alpha"],
                ),
                (
                    "rank = 4\nrslora = true\ntarget = [\"q_proj\", \"v_proj\"]",
                    vec!["lora_alpha = 8", "peft.alpha = 4"],
                ),
            ] {
                let bad = write_recipe(cwd, "bad.toml", &recipe_from_adapter(cwd, peft));
                let out = trainer(cwd, &["run", &bad, "--set", "run.out_dir=runs/bad"]);
                out.assert_one_error(&needles);
            }
        }
    }
    // DoRA is refused by name, not loaded as plain LoRA.
    let dir = workdir();
    let cwd = dir.path();
    let data = write_data(cwd);
    make_peft_adapter(cwd, "dora", &data);
    let name = write_recipe(
        cwd,
        "dora.toml",
        &recipe_from_adapter(
            cwd,
            "rank = 4\nalpha = 8\ntarget = [\"q_proj\", \"v_proj\"]",
        ),
    );
    trainer(cwd, &["run", &name]).assert_one_error(&["use_dora = true", "DoRA"]);
}
