//! Parity of our MoE layer with Hugging Face transformers' Mixtral block.
//!
//! `tests/reference/moe_reference.py` builds, per case, a one-layer `MixtralForCausalLM` from a
//! `MixtralConfig` (fp32, seed 0, nothing downloaded), redraws its `MixtralSparseMoeBlock`'s
//! weights so that routing is decisive, and writes the block's state dict (in memory and as
//! `save_pretrained` writes it), an input `[2, 5, d]`, the block's output and router logits, and
//! transformers' own loss functions on those logits (Mixtral's `load_balancing_loss_func`, one
//! layer and pooled over two; Switch Transformers' `router_z_loss_func` and top-1
//! `load_balancing_loss_func`). This test then checks, per case:
//!
//! 1. our config table agrees with the script's, and our parameter names and shapes equal the
//!    block's `state_dict()` keys and shapes under `model.layers.0.mlp`;
//! 2. `ParamStore::load` takes those weights as they are, and `forward` (eval and train, no
//!    capacity) reproduces the output and router logits (max |ours - ref| / max |ref| < 1e-4),
//!    also with top-k-then-softmax routing (the same weights, in exact arithmetic);
//! 3. our aux loss equals `load_balancing_loss_func` (|ours - ref| / |ref| < 1e-4), pooled over
//!    two inputs too, our z-loss equals `router_z_loss_func`, and with Switch routing our aux loss
//!    equals Switch Transformers' top-1 loss;
//! 4. `fuse_checkpoint_experts` turns the on-disk per-expert layout into exactly the in-memory
//!    tensors, and `split_checkpoint_experts` gives back exactly the on-disk tensors.
//!
//! The Python side runs with `$TRAINER_PYTHON` (`python3` when unset) and needs torch,
//! transformers and safetensors; `scripts/test` installs them. Without them this test fails,
//! it never passes silently.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use tch::{Device, Tensor};
use trainer::models::moe::{
    fuse_checkpoint_experts, load_balancing_loss, split_checkpoint_experts, Moe, MoeConfig, Routing,
};
use trainer::models::params::{read_safetensors, ParamStore};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/reference/moe_reference.py"
);
const TOLERANCE: f64 = 1e-4;
const PREFIX: &str = "model.layers.0.mlp";
const LEGACY_PREFIX: &str = "model.layers.0.block_sparse_moe";

/// The model's width and the experts' hidden width of each case.
fn widths(case: &str) -> (i64, i64) {
    match case {
        "e4_k2" => (16, 24),
        "e6_k3" => (24, 20),
        other => panic!("unknown case {other}"),
    }
}

/// Our side of each case; must mirror `CASES` in the script (checked against its case.json).
fn config(case: &str) -> MoeConfig {
    let (n_experts, top_k) = match case {
        "e4_k2" => (4, 2),
        "e6_k3" => (6, 3),
        other => panic!("unknown case {other}"),
    };
    MoeConfig {
        n_experts,
        top_k,
        routing: Routing::SoftmaxThenTopK,
        capacity_factor: None,
        aux_loss_coef: 0.001,
        router_z_loss_coef: 0.0,
        shared_expert: false,
    }
}

const CASES: [&str; 2] = ["e4_k2", "e6_k3"];

/// Runs the reference script once, for every case, into a fresh temporary directory.
fn reference() -> tempfile::TempDir {
    let python = std::env::var("TRAINER_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let dir = tempfile::TempDir::new().expect("temporary directory");
    let hint = "the Hugging Face parity tests need Python with torch, transformers and \
                safetensors: run scripts/test, which installs them and sets TRAINER_PYTHON";
    let out = Command::new(&python)
        .arg(SCRIPT)
        .arg(dir.path())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{python}` ({e}); {hint}"));
    if !out.status.success() {
        panic!(
            "`{python} {SCRIPT} {}` failed ({}); {hint}\nstderr:\n{}",
            dir.path().display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_map(path: &Path) -> BTreeMap<String, Tensor> {
    read_safetensors(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .collect()
}

/// max |ours - ref| / max |ref|.
fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(ours.size(), reference.size(), "shapes differ");
    let diff = (ours - reference).abs().max().double_value(&[]);
    diff / reference.abs().max().double_value(&[]).max(1e-12)
}

fn build(c: &MoeConfig, (d_model, d_ff): (i64, i64), weights: &Path) -> Moe {
    let mut store = ParamStore::new(Device::Cpu);
    let moe = Moe::new(c, d_model, d_ff, PREFIX, &mut store).unwrap_or_else(|e| panic!("{e}"));
    store.load(weights).unwrap_or_else(|e| panic!("{e}"));
    moe
}

fn check_case(case: &str, dir: &Path) {
    let c = config(case);
    let (d_model, d_ff) = widths(case);
    let info = read_json(&dir.join("case.json"));

    // 1. Config and keys.
    let hf = &info["config"];
    for (k, ours) in [
        ("d_model", d_model),
        ("d_ff", d_ff),
        ("n_experts", c.n_experts),
        ("top_k", c.top_k),
    ] {
        assert_eq!(
            hf[k].as_i64(),
            Some(ours),
            "{case}: {k} differs between the script and this test"
        );
    }
    let mut store = ParamStore::new(Device::Cpu);
    Moe::new(&c, d_model, d_ff, PREFIX, &mut store).unwrap_or_else(|e| panic!("{e}"));
    let ours: Vec<(String, Vec<i64>)> = store
        .iter()
        .map(|p| (p.name.clone(), p.tensor.size()))
        .collect();
    let theirs: Vec<(String, Vec<i64>)> = info["state_dict"]
        .as_array()
        .expect("state_dict list")
        .iter()
        .map(|kv| {
            let name = kv[0].as_str().expect("key").to_string();
            let shape = kv[1]
                .as_array()
                .expect("shape")
                .iter()
                .map(|s| s.as_i64().expect("dim"))
                .collect();
            (name, shape)
        })
        .collect();
    assert_eq!(
        ours, theirs,
        "{case}: parameter names and shapes differ from the HF state dict"
    );

    // 2. Output and router logits.
    let weights = dir.join("moe.safetensors");
    let r = read_map(&dir.join("reference.safetensors"));
    let moe = build(&c, widths(case), &weights);
    for train in [false, true] {
        let out = moe.forward(&r["x"], train);
        let err = rel_err(&out.out, &r["out"]);
        assert!(
            err < TOLERANCE,
            "{case}: output rel err {err:.3e} (train = {train})"
        );
        let err = rel_err(&out.router_logits, &r["router_logits"]);
        assert!(err < TOLERANCE, "{case}: router logits rel err {err:.3e}");
        assert_eq!(
            out.dropped_fraction, 0.0,
            "{case}: no capacity, nothing dropped"
        );
    }
    let topk_softmax = build(
        &MoeConfig {
            routing: Routing::TopKThenSoftmax,
            ..c.clone()
        },
        widths(case),
        &weights,
    );
    let err = rel_err(&topk_softmax.forward(&r["x"], false).out, &r["out"]);
    assert!(
        err < TOLERANCE,
        "{case}: top-k-then-softmax output rel err {err:.3e}"
    );

    // 3. Losses.
    let out = moe.forward(&r["x"], true);
    let err = rel_err(&out.aux_loss, &r["aux_loss"]);
    assert!(err < TOLERANCE, "{case}: aux loss rel err {err:.3e}");
    eprintln!(
        "{case}: rel err output {:.1e}, aux loss {err:.1e}",
        rel_err(&out.out, &r["out"])
    );
    let loss_want = &r["aux_loss"] * c.aux_loss_coef;
    assert!(
        rel_err(&out.loss, &loss_want) < TOLERANCE,
        "{case}: weighted loss"
    );
    let err = rel_err(&out.z_loss, &r["z_loss"]);
    assert!(err < TOLERANCE, "{case}: z-loss rel err {err:.3e}");
    let logits2 = moe.forward(&r["x2"], true).router_logits;
    assert!(
        rel_err(&logits2, &r["router_logits2"]) < TOLERANCE,
        "{case}: router logits 2"
    );
    let pooled = load_balancing_loss(&[&out.router_logits, &logits2], c.n_experts, c.top_k);
    let err = rel_err(&pooled, &r["aux_loss_pooled"]);
    assert!(err < TOLERANCE, "{case}: pooled aux loss rel err {err:.3e}");
    let switch = build(
        &MoeConfig {
            routing: Routing::Switch,
            top_k: 1,
            ..c.clone()
        },
        widths(case),
        &weights,
    );
    let sw = switch.forward(&r["x"], true);
    let err = rel_err(&sw.aux_loss, &r["switch_aux_loss"]);
    assert!(err < TOLERANCE, "{case}: Switch aux loss rel err {err:.3e}");
    assert!(
        rel_err(&sw.z_loss, &r["z_loss"]) < TOLERANCE,
        "{case}: Switch z-loss"
    );

    // 4. On-disk (per-expert) layout <-> in-memory (fused) layout.
    let ckpt_path = dir.join("checkpoint.safetensors");
    let on_disk = read_map(&ckpt_path);
    let disk_keys: Vec<&str> = info["checkpoint_keys"]
        .as_array()
        .expect("checkpoint_keys")
        .iter()
        .map(|k| k.as_str().expect("key"))
        .collect();
    assert_eq!(
        on_disk.keys().map(String::as_str).collect::<Vec<_>>(),
        disk_keys,
        "{case}"
    );
    let in_memory = read_map(&weights);
    let mut tensors: BTreeMap<String, Tensor> = on_disk
        .iter()
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    fuse_checkpoint_experts(&mut tensors, LEGACY_PREFIX, PREFIX, c.n_experts, &ckpt_path)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        tensors.keys().collect::<Vec<_>>(),
        in_memory.keys().collect::<Vec<_>>(),
        "{case}"
    );
    for (k, v) in &in_memory {
        assert!(
            tensors[k].equal(v),
            "{case}: fused {k} differs from transformers' state dict"
        );
    }
    split_checkpoint_experts(&mut tensors, PREFIX, LEGACY_PREFIX, &ckpt_path)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        tensors.keys().collect::<Vec<_>>(),
        on_disk.keys().collect::<Vec<_>>(),
        "{case}"
    );
    for (k, v) in &on_disk {
        assert!(
            tensors[k].equal(v),
            "{case}: split {k} differs from save_pretrained's"
        );
    }
}

#[test]
fn mixtral_moe_block_matches_transformers() {
    let dir = reference();
    for case in CASES {
        check_case(case, &dir.path().join(case));
    }
}
