//! `train.recompute`: `"block"` (each transformer block keeps only its input and runs again in
//! the backward pass) and `"selective"` (the attention core and the gated activation run again),
//! through `torch_ext::recompute`. The training curve is bitwise that of `"none"` on the CPU, in
//! fp32 and bf16-mixed, with a sliding-window mask, with gradient accumulation and clipping,
//! with MoE layers (selective) and with two processes (the gradient-ready hooks that overlap the
//! all-reduce fire inside the recomputation's backward pass). What a second run would not
//! repeat is refused.

mod common;

use common::*;

const RECIPE: &str = "tiny.toml";

#[test]
fn recomputed_blocks_train_bitwise_the_same_curve() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, RECIPE, &tiny_recipe("unused"));
    // (name, precision, another override): a sliding window shorter than the sequence takes
    // the explicit-mask path of attention.
    let cases = [
        ("fp32", "fp32", "train.log_every=1"),
        ("bf16-mixed", "bf16-mixed", "train.log_every=1"),
        ("window", "fp32", "model.sliding_window=6"),
    ];
    for (name, precision, extra) in cases {
        let set_precision = format!("run.precision=\"{precision}\"");
        let run = |mode: &str| {
            let set_mode = format!("train.recompute=\"{mode}\"");
            curve(&run_tiny(
                w,
                RECIPE,
                &format!("{name}-{mode}"),
                &[
                    "--set",
                    &set_precision,
                    "--set",
                    &set_mode,
                    "--set",
                    extra,
                    "--set",
                    "train.max_steps=12",
                    "--set",
                    "train.grad_accum=2",
                    "--set",
                    "train.clip_grad_norm=0.5",
                ],
            ))
        };
        let kept = run("none");
        assert_eq!(kept.len(), 14, "12 training rows and 2 evaluations");
        for mode in ["block", "selective"] {
            assert_eq!(kept, run(mode), "{name}, {mode}");
        }
    }
}

/// Layer-wise updates step each parameter from a hook as its gradient completes: inside the
/// recomputation's own backward pass here. The curve is still that of `"none"`.
#[test]
fn recomputation_works_with_layer_wise_updates() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, RECIPE, &tiny_recipe("unused"));
    let run = |mode: &str| {
        let set_mode = format!("train.recompute=\"{mode}\"");
        curve(&run_tiny(
            w,
            RECIPE,
            &format!("layerwise-{mode}"),
            &[
                "--set",
                &set_mode,
                "--set",
                "optim={kind=\"adamw\", lr=3e-3, layerwise=true}",
                "--set",
                "train.max_steps=8",
            ],
        ))
    };
    let kept = run("none");
    assert_eq!(kept, run("block"));
    assert_eq!(kept, run("selective"));
}

#[test]
fn selective_recomputation_works_with_moe_layers() {
    let work = workdir();
    let w = work.path();
    let moe = replace_line(
        &tiny_recipe("unused"),
        "max_seq_len = 16",
        "max_seq_len = 16\nmoe = { n_experts = 4, top_k = 2, routing = \"softmax_top_k\" }",
    );
    write_recipe(w, RECIPE, &moe);
    let run = |mode: &str| {
        let set_mode = format!("train.recompute=\"{mode}\"");
        curve(&run_tiny(
            w,
            RECIPE,
            &format!("moe-{mode}"),
            &["--set", &set_mode, "--set", "train.max_steps=8"],
        ))
    };
    assert_eq!(run("none"), run("selective"));
}

#[test]
fn recomputed_blocks_under_data_parallel_match_kept_ones() {
    let work = workdir();
    let w = work.path();
    write_recipe(w, RECIPE, &tiny_recipe("unused"));
    let run = |mode: &str| {
        let out = format!("run.out_dir=ddp-{mode}");
        let set_mode = format!("train.recompute=\"{mode}\"");
        trainer(
            w,
            &[
                "launch",
                "--nproc",
                "2",
                RECIPE,
                "--set",
                &out,
                "--set",
                &set_mode,
                "--set",
                "train.max_steps=6",
                "--set",
                "run.bucket_mb=0.01",
            ],
        )
        .assert_success();
        curve(&read_metrics(&w.join(format!("ddp-{mode}/metrics.jsonl"))))
    };
    let kept = run("none");
    assert_eq!(kept, run("block"));
    assert_eq!(kept, run("selective"));
}

#[test]
fn what_a_second_run_would_not_repeat_is_refused() {
    let work = workdir();
    let w = work.path();
    let moe = replace_line(
        &tiny_recipe("moe"),
        "max_seq_len = 16",
        "max_seq_len = 16\nmoe = { n_experts = 4, top_k = 1, routing = \"switch\" }",
    );
    write_recipe(w, "moe.toml", &moe);
    trainer(
        w,
        &["run", "moe.toml", "--set", "train.recompute=\"block\""],
    )
    .assert_one_error(&["train.recompute", "MoE"]);
    assert!(!w.join("moe").exists(), "a refused start writes nothing");
    let gpt2 = "[run]\nname = \"g\"\nout_dir = \"gpt2\"\ndevice = \"cpu\"\nthreads = 1\n\n\
        [model]\nkind = \"gpt2\"\nvocab_size = 256\nd_model = 32\nn_layers = 2\nn_heads = 4\n\
        max_seq_len = 16\ndropout = 0.1\n\n[data]\nseq_len = 16\ntrain = { kind = \"builtin\" }\n\n\
        [optim]\nkind = \"adamw\"\nlr = 1e-3\n\n[train]\nbatch_size = 4\nmax_steps = 2\n\
        recompute = \"block\"\n";
    write_recipe(w, "gpt2.toml", gpt2);
    trainer(w, &["run", "gpt2.toml"]).assert_one_error(&["train.recompute", "dropout"]);
    // LoRA's dropout inside a recomputed block; "selective" runs no projection again.
    let lora = format!(
        "{}\n[peft]\nkind = \"lora\"\nrank = 2\ndropout = 0.1\ntarget = [\"q_proj\", \"v_proj\"]\n",
        tiny_recipe("lora")
    );
    write_recipe(w, "lora.toml", &lora);
    trainer(
        w,
        &["run", "lora.toml", "--set", "train.recompute=\"block\""],
    )
    .assert_one_error(&["train.recompute", "peft.dropout"]);
    assert!(!w.join("lora").exists(), "a refused start writes nothing");
    trainer(
        w,
        &[
            "run",
            "lora.toml",
            "--set",
            "train.recompute=\"selective\"",
            "--set",
            "train.max_steps=6",
        ],
    )
    .assert_success();
    trainer(
        w,
        &["validate", "moe.toml", "--set", "train.recompute=\"all\""],
    )
    .assert_one_error(&["train.recompute"]);
}
