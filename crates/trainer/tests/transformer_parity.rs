//! Parity of our decoder transformer with Hugging Face transformers (Llama and GPT-2 families).
//!
//! For each case, `tests/reference/transformer_reference.py` builds a tiny randomly initialised
//! `LlamaForCausalLM` or `GPT2LMHeadModel` in fp32 with eager attention (seed 0; nothing is
//! downloaded) and writes its state dict, the input ids, the logits and the model's own
//! causal-LM loss. This test then checks, per case:
//!
//! 1. our config table agrees with the one the script read off the Hugging Face config;
//! 2. our parameter names and shapes equal the Hugging Face `state_dict()` keys and shapes, less
//!    a tied `lm_head.weight` (what a Hugging Face import relies on);
//! 3. `ParamStore::load` accepts the Hugging Face weights as they are, and `forward` and
//!    `Transformer::loss` reproduce the reference logits and loss to a relative error below
//!    1e-4 (max |ours - ref| / max |ref| over all logits; |ours - ref| / |ref| for the loss).
//!
//! The Python side runs with `$TRAINER_PYTHON` (`python3` when unset) and needs torch,
//! transformers and safetensors; `scripts/test` installs them. Without them these tests fail,
//! they never pass silently.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use tch::{Device, Kind, Tensor};
use trainer::models::params::ParamStore;
use trainer::models::transformer::{Family, Transformer, TransformerConfig};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/reference/transformer_reference.py"
);
const TOLERANCE: f64 = 1e-4;

/// Our side of each case; must mirror `CASES` in the script (checked against its case.json).
fn config(case: &str) -> TransformerConfig {
    let llama =
        |vocab_size, d_model, n_heads, n_kv_heads, d_ff, max_seq_len, rope_theta, norm_eps, tie| {
            TransformerConfig {
                family: Family::Llama,
                vocab_size,
                d_model,
                n_layers: 2,
                n_heads,
                n_kv_heads,
                head_dim: None,
                d_ff,
                max_seq_len,
                rope_theta,
                norm_eps,
                tie_embeddings: tie,
                dropout: 0.0,
                moe: None,
                variant: Default::default(),
            }
        };
    match case {
        "llama_mha_untied" => llama(96, 32, 4, 4, 64, 32, 10000.0, 1e-5, false),
        "llama_gqa_tied" => llama(96, 32, 4, 2, 80, 32, 10000.0, 1e-6, true),
        "llama_gqa3_theta500k" => llama(80, 48, 6, 2, 96, 24, 500000.0, 1e-5, false),
        "gpt2_2layer" => TransformerConfig {
            family: Family::Gpt2,
            vocab_size: 96,
            d_model: 32,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 4,
            head_dim: None,
            d_ff: 128,
            max_seq_len: 32,
            rope_theta: 0.0,
            norm_eps: 1e-5,
            tie_embeddings: true,
            dropout: 0.0,
            moe: None,
            variant: Default::default(),
        },
        other => panic!("unknown case {other}"),
    }
}

/// Runs the reference script for `case` into a fresh temporary directory.
fn reference(case: &str) -> tempfile::TempDir {
    let python = std::env::var("TRAINER_PYTHON").unwrap_or_else(|_| "python3".to_string());
    let dir = tempfile::TempDir::new().expect("temporary directory");
    let hint =
        "the Hugging Face parity tests need Python with torch, transformers and safetensors: \
                run scripts/test, which installs them and sets TRAINER_PYTHON";
    let out = Command::new(&python)
        .arg(SCRIPT)
        .arg(dir.path())
        .arg(case)
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{python}` ({e}); {hint}"));
    if !out.status.success() {
        panic!(
            "`{python} {SCRIPT} {} {case}` failed ({}); {hint}\nstderr:\n{}",
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

/// Our hardcoded config equals the one the script derived from the Hugging Face config object.
fn assert_config_matches(case: &str, c: &TransformerConfig, dir: &Path) {
    let info = read_json(&dir.join("case.json"));
    let hf = &info["config"];
    let family = match c.family {
        Family::Llama => "llama",
        Family::Gpt2 => "gpt2",
        Family::GptNeox => "gpt_neox",
    };
    let int = |k: &str| {
        hf[k]
            .as_i64()
            .unwrap_or_else(|| panic!("{case}: case.json lacks {k}"))
    };
    let float = |k: &str| {
        hf[k]
            .as_f64()
            .unwrap_or_else(|| panic!("{case}: case.json lacks {k}"))
    };
    assert_eq!(hf["family"].as_str(), Some(family), "{case}: family");
    for (k, ours) in [
        ("vocab_size", c.vocab_size),
        ("d_model", c.d_model),
        ("n_layers", c.n_layers),
        ("n_heads", c.n_heads),
        ("n_kv_heads", c.n_kv_heads),
        ("d_ff", c.d_ff),
        ("max_seq_len", c.max_seq_len),
        ("head_dim", c.head_dim()),
    ] {
        assert_eq!(
            int(k),
            ours,
            "{case}: {k} differs between the script and this test"
        );
    }
    for (k, ours) in [("rope_theta", c.rope_theta), ("norm_eps", c.norm_eps)] {
        assert_eq!(
            float(k),
            ours,
            "{case}: {k} differs between the script and this test"
        );
    }
    assert_eq!(
        hf["tie_embeddings"].as_bool(),
        Some(c.tie_embeddings),
        "{case}: tie_embeddings"
    );
}

/// Our parameter names and shapes equal the Hugging Face state-dict keys and shapes, where the
/// only key we do not have is `lm_head.weight` when it is tied to (shares storage with) the
/// token embedding.
fn assert_names_match_hf(case: &str, c: &TransformerConfig, store: &ParamStore, dir: &Path) {
    let listing = read_json(&dir.join("state_dict.json"));
    let entries = listing.as_array().expect("state_dict.json is a list");
    let embed = match c.family {
        Family::Llama => "model.embed_tokens.weight",
        Family::Gpt2 => "transformer.wte.weight",
        Family::GptNeox => "gpt_neox.embed_in.weight",
    };
    let mut hf = BTreeMap::new();
    let mut tied = Vec::new();
    for e in entries {
        let name = e["name"].as_str().expect("name").to_string();
        let shape: Vec<i64> = e["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_i64().expect("dim"))
            .collect();
        match e["tied_to"].as_str() {
            Some(to) => tied.push((name, to.to_string())),
            None => {
                hf.insert(name, shape);
            }
        }
    }
    let expected_tied: Vec<(String, String)> = if c.tie_embeddings {
        vec![("lm_head.weight".to_string(), embed.to_string())]
    } else {
        vec![]
    };
    assert_eq!(
        tied, expected_tied,
        "{case}: tied keys in the Hugging Face state dict"
    );

    let ours: BTreeMap<String, Vec<i64>> = store
        .iter()
        .map(|p| (p.name.clone(), p.tensor.size()))
        .collect();
    let missing: Vec<_> = hf.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !hf.contains_key(*k)).collect();
    let shapes: Vec<_> = hf
        .iter()
        .filter_map(|(k, s)| {
            ours.get(k)
                .filter(|o| *o != s)
                .map(|o| format!("{k}: ours {o:?}, HF {s:?}"))
        })
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && shapes.is_empty(),
        "{case}: parameter names differ from the Hugging Face state dict\n  \
         in HF only: {missing:?}\n  ours only: {extra:?}\n  shape mismatches: {shapes:?}"
    );
}

fn max_relative_error(ours: &Tensor, reference: &Tensor) -> f64 {
    let diff = (ours - reference).abs().max().double_value(&[]);
    diff / reference.abs().max().double_value(&[])
}

fn check_case(case: &str) {
    let dir = reference(case);
    let dir = dir.path();
    let c = config(case);
    assert_config_matches(case, &c, dir);

    tch::manual_seed(0);
    let mut store = ParamStore::new(Device::Cpu);
    let model = Transformer::new(&c, &mut store).expect("model");
    assert_names_match_hf(case, &c, &store, dir);
    store
        .load(&dir.join("model.safetensors"))
        .unwrap_or_else(|e| {
            panic!("{case}: our model does not load the Hugging Face weights: {e}")
        });

    let refs: BTreeMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("reference.safetensors"))
            .expect("reference.safetensors")
            .into_iter()
            .collect();
    let ids = &refs["input_ids"]; // [b, t] int64
    let ref_logits = &refs["logits"]; // [b, t, vocab]
    let ref_loss = refs["loss"].double_value(&[0]);
    let (b, t) = ids.size2().expect("input ids are [b, t]");

    let logits = tch::no_grad(|| model.forward(ids, false));
    assert_eq!(logits.size(), ref_logits.size(), "{case}: logits shape");
    assert_eq!(logits.kind(), Kind::Float, "{case}: logits dtype");
    let err = max_relative_error(&logits, ref_logits);
    eprintln!("{case}: logits max relative error {err:e}");
    assert!(
        err < TOLERANCE,
        "{case}: logits differ from transformers: max relative error {err:e}"
    );

    // transformers' causal-LM loss: logits[:, :-1] against ids[:, 1:], mean over b * (t - 1).
    // (`loss` views its arguments, so slices are made contiguous, as the data loader does.)
    let shifted = Transformer::loss(
        &logits.narrow(1, 0, t - 1).contiguous(),
        &ids.narrow(1, 1, t - 1).contiguous(),
    );
    // The same loss as transformers computes it: full logits, labels shifted left and padded
    // with the ignore index -100.
    let pad = Tensor::full([b, 1], -100, (Kind::Int64, Device::Cpu));
    let labels = Tensor::cat(&[&ids.narrow(1, 1, t - 1), &pad], 1);
    let padded = Transformer::loss(&logits, &labels);
    for (how, loss) in [("shifted", shifted), ("padded with -100", padded)] {
        let loss = loss.double_value(&[]);
        let err = (loss - ref_loss).abs() / ref_loss.abs();
        eprintln!("{case}: loss ({how}) {loss} vs {ref_loss}, relative error {err:e}");
        assert!(
            err < TOLERANCE,
            "{case}: loss ({how}) {loss} differs from transformers' {ref_loss}: relative error {err:e}"
        );
    }
}

#[test]
fn llama_mha_untied_matches_transformers() {
    check_case("llama_mha_untied");
}

#[test]
fn llama_gqa_tied_matches_transformers() {
    check_case("llama_gqa_tied");
}

#[test]
fn llama_gqa3_theta500k_matches_transformers() {
    check_case("llama_gqa3_theta500k");
}

#[test]
fn gpt2_2layer_matches_transformers() {
    check_case("gpt2_2layer");
}
