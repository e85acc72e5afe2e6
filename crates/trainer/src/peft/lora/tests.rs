use super::*;
use crate::models::transformer::TransformerConfig;
use crate::models::ModelConfig;
use crate::optim::OptimConfig;
use crate::optim::Optimizer;

fn llama() -> TransformerConfig {
    TransformerConfig::from_recipe(&ModelConfig::Llama(crate::models::LlamaConfig {
        vocab_size: 64,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: Some(2),
        head_dim: None,
        d_ff: 48,
        max_seq_len: 16,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        moe: None,
        family: Default::default(),
        attention_bias: false,
        mlp_bias: false,
        rope_scaling: None,
        sliding_window: None,
        layer_types: None,
        multipliers: None,
        attention_softcap: None,
        logits_softcap: None,
        query_pre_attn_scalar: None,
        local_rope_theta: None,
        partial_rotary_factor: None,
    }))
}

fn gpt2() -> TransformerConfig {
    TransformerConfig::from_recipe(&ModelConfig::Gpt2(crate::models::Gpt2Config {
        vocab_size: 64,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        d_ff: None,
        max_seq_len: 16,
        norm_eps: 1e-5,
        dropout: 0.0,
        scale_attn_weights: true,
        scale_attn_by_inverse_layer_idx: false,
        tie_embeddings: true,
    }))
}

fn peft(kind: PeftKind, target: &[&str]) -> PeftConfig {
    PeftConfig {
        kind,
        rank: 4,
        alpha: Some(8.0),
        dropout: 0.0,
        target: target.iter().map(|s| s.to_string()).collect(),
        rslora: false,
        rank_pattern: Default::default(),
        alpha_pattern: Default::default(),
        from: None,
        merge_every: None,
        optimizer_reset: None,
        keep_fraction: None,
        rewarm_steps: None,
        full_rank_warmup_steps: None,
    }
}

fn build(
    cfg: &TransformerConfig,
    p: Option<&PeftConfig>,
) -> (Transformer, ParamStore, Option<Lora>) {
    let _rng = crate::peft::TEST_RNG
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(0);
    let mut store = ParamStore::new(Device::Cpu);
    let mut model = Transformer::new(cfg, &mut store).expect("model");
    let lora = p.map(|p| apply(&mut model, &mut store, p).expect("lora"));
    (model, store, lora)
}

fn tokens() -> Tensor {
    Tensor::arange(2 * 12, (Kind::Int64, Device::Cpu))
        .remainder(64)
        .view([2, 12])
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Fills every B with random values so that the adapters change the function.
fn randomise_b(model: &Transformer) {
    tch::no_grad(|| {
        for lin in model.projections() {
            if let Some(ad) = adapter_of(lin) {
                let mut b = ad.b.shallow_clone();
                b.copy_(&(Tensor::randn(b.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    });
}

/// One pattern list means the same to LoRA's `target`, GaLore's `target`, pruning's `prunable`
/// (GSM and magnitude) and Wanda's `--prunable` (the name rule of `models::params`; the rule's
/// own cases, formerly here as `target_patterns_follow_peft_suffix_rule_with_globs`, are in
/// `models/params/tests.rs`).
#[test]
fn lora_galore_and_pruning_select_the_same_layers() {
    use crate::models::params::select_prunable;
    use crate::optim::galore::{GaloreAdamW, Projection};
    let llama_target = [
        "q_proj",
        "self_attn.v_proj",
        "mlp.*",
        "layers.1.self_attn.o_proj.weight",
    ];
    let mut llama_expect = vec!["model.layers.1.self_attn.o_proj.weight".to_string()];
    for l in 0..2 {
        for m in [
            "self_attn.q_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ] {
            llama_expect.push(format!("model.layers.{l}.{m}.weight"));
        }
    }
    let gpt2_target = ["c_attn", "h.1.mlp.*", "h.0.mlp.c_proj.weight"];
    let gpt2_expect: Vec<String> = [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.1.attn.c_attn.weight",
        "transformer.h.0.mlp.c_proj.weight",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.weight",
    ]
    .map(String::from)
    .to_vec();
    for (cfg, target, expect) in [
        (llama(), &llama_target[..], llama_expect),
        (gpt2(), &gpt2_target[..], gpt2_expect),
    ] {
        let expect: BTreeSet<String> = expect.into_iter().collect();
        let patterns: Vec<String> = target.iter().map(|s| s.to_string()).collect();
        let (model, store, _) = build(&cfg, None);

        let params = store
            .trainable()
            .map(|p| (p.name.clone(), p.tensor.shallow_clone(), true))
            .collect();
        let projection = Projection {
            rank: 2,
            update_proj_gap: 10,
            scale: 1.0,
        };
        let galore = GaloreAdamW::new(params, &patterns, projection, [0.9, 0.999], 1e-8, 0.0)
            .expect("galore");
        let galore: BTreeSet<String> = galore.projected().into_iter().map(String::from).collect();
        assert_eq!(galore, expect, "GaLore's target {target:?}");

        let prunable: BTreeSet<String> = select_prunable(&store, &patterns, "prune.prunable")
            .expect("prunable")
            .into_iter()
            .collect();
        assert_eq!(prunable, expect, "prunable {target:?}");

        let wanda: BTreeSet<String> = crate::prune::wanda::selected_weights(&model, &patterns)
            .expect("wanda")
            .into_iter()
            .collect();
        assert_eq!(wanda, expect, "--prunable (Wanda) {target:?}");

        let (_, _, lora) = build(&cfg, Some(&peft(PeftKind::Lora, target)));
        let lora: BTreeSet<String> = lora
            .expect("lora")
            .modules
            .iter()
            .map(|m| format!("{m}.weight"))
            .collect();
        assert_eq!(lora, expect, "LoRA's target {target:?}");
    }
}

#[test]
fn adapters_have_peft_names_shapes_and_init_and_start_from_the_base_model() {
    for (cfg, target, expect) in [
        (
            llama(),
            vec!["q_proj", "v_proj", "mlp.*"],
            vec![
                ("model.layers.0.self_attn.q_proj", 32, 32),
                ("model.layers.0.self_attn.v_proj", 32, 16),
                ("model.layers.0.mlp.gate_proj", 32, 48),
                ("model.layers.0.mlp.down_proj", 48, 32),
            ],
        ),
        (
            gpt2(),
            vec!["c_attn", "mlp.c_fc"],
            vec![
                ("transformer.h.1.attn.c_attn", 32, 96),
                ("transformer.h.1.mlp.c_fc", 32, 128),
            ],
        ),
    ] {
        let (base, base_store, _) = build(&cfg, None);
        let p = peft(PeftKind::Lora, &target);
        let (model, store, lora) = build(&cfg, Some(&p));
        // The base weights copied over: other tests draw from torch's global generator on
        // parallel threads, so the same seed alone need not give the same weights.
        let copied = tch::no_grad(|| {
            let mut n = 0;
            for bp in base_store.iter() {
                if let Some(t) = store.get(&bp.name) {
                    t.shallow_clone().copy_(&bp.tensor);
                    n += 1;
                }
            }
            n
        });
        assert_eq!(
            copied,
            base_store.iter().count(),
            "every base weight by name"
        );
        let lora = lora.expect("lora");
        for (module, fan_in, fan_out) in expect {
            assert!(
                lora.modules.iter().any(|m| m == module),
                "{module} in {:?}",
                lora.modules
            );
            let a = store.get(&a_name(module)).expect("A registered");
            let b = store.get(&b_name(module)).expect("B registered");
            assert_eq!(a.size(), vec![4, fan_in], "{module} A");
            assert_eq!(b.size(), vec![fan_out, 4], "{module} B");
            // kaiming_uniform(a = sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)).
            let bound = 1.0 / (fan_in as f64).sqrt();
            assert!(a.abs().max().double_value(&[]) <= bound);
            assert!(a.abs().max().double_value(&[]) > 0.5 * bound);
            assert_eq!(b.abs().sum(Kind::Float).double_value(&[]), 0.0);
        }
        // Same seed, same base weights; B = 0: the same logits exactly.
        let x = tokens();
        assert_eq!(
            max_diff(&base.forward(&x, false), &model.forward(&x, true)),
            0.0
        );
    }
}

#[test]
fn only_adapters_train_and_get_gradients() {
    let p = peft(PeftKind::Lora, &["q_proj", "v_proj"]);
    let (model, store, lora) = build(&llama(), Some(&p));
    let lora = lora.expect("lora");
    assert_eq!(lora.modules.len(), 4);
    let trainable: Vec<&str> = store.trainable().map(|p| p.name.as_str()).collect();
    assert_eq!(trainable.len(), 8);
    assert!(
        trainable.iter().all(|n| is_adapter_param(n)),
        "{trainable:?}"
    );
    // d=32, kv=16: q: 4*32 + 32*4, v: 4*32 + 16*4 per layer.
    assert_eq!(
        store.num_trainable(),
        2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    );
    let logits = model.forward(&tokens(), true);
    let loss = Transformer::loss(&logits, &tokens());
    loss.backward();
    for p in store.iter() {
        let has_grad = p.tensor.grad().defined();
        assert_eq!(
            has_grad, p.trainable,
            "{}: grad {has_grad}, trainable {}",
            p.name, p.trainable
        );
        assert_eq!(p.tensor.requires_grad(), p.trainable, "{}", p.name);
    }
    // Optimizer state only for the adapters.
    let opt = Optimizer::build(
        &OptimConfig::Adamw {
            lr: 1e-2,
            betas: [0.9, 0.95],
            eps: 1e-8,
            weight_decay: 0.0,
            decay_embeddings: false,
            fused: Some(false),
            state_bits: 32,
            layerwise: false,
            master_weights: false,
        },
        &store,
    )
    .expect("optimizer");
    let adapter_bytes: i64 = store
        .trainable()
        .map(|p| crate::models::params::bytes_of(&p.tensor))
        .sum();
    assert_eq!(
        opt.state_bytes(),
        2 * adapter_bytes,
        "two moments per adapter parameter, none for the base"
    );
}

#[test]
fn merge_then_unmerge_restores_weights_and_merged_model_gives_adapted_logits() {
    for cfg in [llama(), gpt2()] {
        let target: &[&str] = if cfg.family == Family::Llama {
            &["q_proj", "v_proj", "o_proj", "mlp.*"]
        } else {
            &["c_attn", "c_proj", "c_fc"]
        };
        let p = PeftConfig {
            rslora: true,
            ..peft(PeftKind::Lora, target)
        };
        let (model, store, _) = build(&cfg, Some(&p));
        randomise_b(&model);
        let before: Vec<(String, Tensor)> = store
            .iter()
            .map(|p| (p.name.clone(), p.tensor.detach().copy()))
            .collect();
        let x = tokens();
        let adapted = model.forward(&x, false);
        let (base, _, _) = build(&cfg, None);
        assert!(
            max_diff(&adapted, &base.forward(&x, false)) > 1e-3,
            "the adapters change the function"
        );
        merge(&model).expect("merge");
        merge(&model).expect("merge twice is a no-op");
        let merged = model.forward(&x, false);
        assert!(
            max_diff(&adapted, &merged) < 1e-5,
            "{:?}: merged {}",
            cfg.family,
            max_diff(&adapted, &merged)
        );
        // The merged weight is W + scale * B A in the weight's own layout.
        let lin = &model.projections()[0];
        let ad = adapter_of(lin).expect("adapted");
        let w0 = &before
            .iter()
            .find(|(n, _)| *n == format!("{}.weight", lin.path))
            .expect("w")
            .1;
        let delta = ad.delta();
        let expect = if lin.transposed {
            w0 + delta.tr()
        } else {
            w0 + delta
        };
        assert!(max_diff(&lin.weight, &expect) < 1e-6);
        assert_eq!(ad.scale, 8.0 / 2.0, "rslora: alpha / sqrt(r)");
        unmerge(&model).expect("unmerge");
        for (name, t) in &before {
            let now = store.get(name).expect("param");
            assert!(max_diff(t, now) < 1e-6, "{name} restored");
        }
        assert!(max_diff(&adapted, &model.forward(&x, false)) < 1e-5);
    }
}

#[test]
fn lora_fa_trains_b_only_and_leaves_a_unchanged() {
    let p = peft(PeftKind::LoraFa, &["q_proj", "v_proj", "down_proj"]);
    let (model, mut store, lora) = build(&llama(), Some(&p));
    let lora = lora.expect("lora");
    let trainable: Vec<String> = store.trainable().map(|p| p.name.clone()).collect();
    assert_eq!(trainable.len(), lora.modules.len());
    assert!(
        trainable.iter().all(|n| n.ends_with(".lora_B.weight")),
        "{trainable:?}"
    );
    let a_before: Vec<Tensor> = lora
        .modules
        .iter()
        .map(|m| store.get(&a_name(m)).expect("A").copy())
        .collect();
    let mut opt = Optimizer::build(
        &OptimConfig::Adamw {
            lr: 1e-2,
            betas: [0.9, 0.95],
            eps: 1e-8,
            weight_decay: 0.1,
            decay_embeddings: false,
            fused: None,
            state_bits: 32,
            layerwise: false,
            master_weights: false,
        },
        &store,
    )
    .expect("optimizer");
    let x = tokens();
    let mut losses = Vec::new();
    for _ in 0..5 {
        let loss = Transformer::loss(&model.forward(&x, true), &x);
        losses.push(loss.double_value(&[]));
        loss.backward();
        opt.step(1e-2).expect("step");
        store.zero_grad();
    }
    assert!(losses[4] < losses[0], "B learns: {losses:?}");
    for (m, a0) in lora.modules.iter().zip(&a_before) {
        assert_eq!(
            max_diff(a0, store.get(&a_name(m)).expect("A")),
            0.0,
            "{m}: A unchanged"
        );
        assert!(
            store
                .get(&b_name(m))
                .expect("B")
                .abs()
                .sum(Kind::Float)
                .double_value(&[])
                > 0.0,
            "{m}: B trained"
        );
    }
}

#[test]
fn bad_rank_and_unmatched_patterns_are_one_line_errors_naming_them() {
    let mut store = ParamStore::new(Device::Cpu);
    let mut model = Transformer::new(&llama(), &mut store).expect("model");
    let e = apply(
        &mut model,
        &mut store,
        &peft(PeftKind::Lora, &["q_proj", "qkv"]),
    )
    .expect_err("refused")
    .to_string();
    assert!(
        e.contains("peft.target") && e.contains("\"qkv\"") && e.contains("q_proj"),
        "{e}"
    );
    assert!(!e.contains('\n'));
    let e = apply(
        &mut model,
        &mut store,
        &PeftConfig {
            rank: 17,
            ..peft(PeftKind::Lora, &["v_proj"])
        },
    )
    .expect_err("refused")
    .to_string();
    assert!(
        e.contains("peft.rank")
            && e.contains("model.layers.0.self_attn.v_proj.weight")
            && e.contains("(16)"),
        "{e}"
    );
    // Nothing was frozen or added by the refused calls.
    assert_eq!(store.num_trainable(), store.num_params());
}

#[test]
fn peft_export_loads_back_into_the_same_adapters() {
    let p = peft(PeftKind::Lora, &["q_proj", "v_proj"]);
    let (model, _, lora) = build(&llama(), Some(&p));
    let lora = lora.expect("lora");
    randomise_b(&model);
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("adapter");
    export_peft(&model, &lora, None, &out).expect("export");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(ADAPTER_CONFIG)).expect("config"))
            .expect("json");
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8);
    assert_eq!(cfg["target_modules"], json!(["q_proj", "v_proj"]));
    assert_eq!(cfg["fan_in_fan_out"], false);
    let keys: Vec<String> = read_safetensors(&out.join(ADAPTER_WEIGHTS))
        .expect("weights")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert!(
        keys.contains(
            &"base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight".to_string()
        ),
        "{keys:?}"
    );
    assert_eq!(keys.len(), 8);
    // Refuses to overwrite.
    assert!(export_peft(&model, &lora, None, &out)
        .expect_err("not empty")
        .to_string()
        .contains("not empty"));

    tch::manual_seed(1);
    let (fresh, _, fresh_lora) = build(&llama(), Some(&p));
    load_peft(&fresh, fresh_lora.as_ref().expect("lora"), &out).expect("load");
    let x = tokens();
    assert!(max_diff(&model.forward(&x, false), &fresh.forward(&x, false)) < 1e-6);

    // An adapter for other targets is refused, naming the tensor.
    let other = peft(PeftKind::Lora, &["k_proj"]);
    let (m2, _, l2) = build(&llama(), Some(&other));
    let e = load_peft(&m2, l2.as_ref().expect("lora"), &out)
        .expect_err("mismatch")
        .to_string();
    assert!(e.contains("k_proj.lora_A.weight"), "{e}");

    // An adapter for another base (other widths) is refused, naming the tensor and both shapes.
    let mha = TransformerConfig {
        n_kv_heads: 4,
        head_dim: None,
        ..llama()
    };
    let (m3, _, l3) = build(&mha, Some(&p));
    let e = load_peft(&m3, l3.as_ref().expect("lora"), &out)
        .expect_err("mismatch")
        .to_string();
    assert!(
        e.contains("v_proj.lora_B.weight") && e.contains("[16, 4]") && e.contains("[32, 4]"),
        "{e}"
    );
}

#[test]
fn target_modules_fall_back_to_a_regex_when_leaf_names_select_more() {
    let p = peft(PeftKind::Lora, &["layers.1.*"]);
    let (model, _, lora) = build(&llama(), Some(&p));
    let v = peft_target_modules(&model, lora.as_ref().expect("lora"));
    let s = v.as_str().expect("a regex string");
    assert!(
        s.starts_with("^(?:model\\.layers\\.1\\.self_attn\\.q_proj|"),
        "{s}"
    );
    let p = peft(PeftKind::Lora, &["attn.c_proj"]);
    let (model, _, lora) = build(&gpt2(), Some(&p));
    assert!(
        peft_target_modules(&model, lora.as_ref().expect("lora")).is_string(),
        "c_proj alone would select mlp.c_proj too"
    );
}
