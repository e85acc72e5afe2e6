use super::*;
use crate::models::params::ParamStore;
use crate::models::transformer::TransformerConfig;
use crate::models::ModelConfig;
use crate::optim::OptimConfig;
use crate::peft::lora::apply;

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

fn relora_cfg(reset: OptimizerReset, keep: Option<f64>) -> PeftConfig {
    PeftConfig {
        kind: PeftKind::Relora,
        rank: 2,
        alpha: Some(4.0),
        dropout: 0.0,
        target: vec!["q_proj".into(), "mlp.*".into()],
        rslora: false,
        rank_pattern: Default::default(),
        alpha_pattern: Default::default(),
        from: None,
        merge_every: Some(4),
        optimizer_reset: Some(reset),
        keep_fraction: keep,
        rewarm_steps: Some(2),
        full_rank_warmup_steps: None,
    }
}

fn build(p: &PeftConfig) -> (Transformer, ParamStore, Lora, Optimizer) {
    let _rng = rng_lock();
    tch::manual_seed(0);
    let mut store = ParamStore::new(Device::Cpu);
    let mut model = Transformer::new(&llama(), &mut store).expect("model");
    let lora = apply(&mut model, &mut store, p).expect("lora");
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
    (model, store, lora, opt)
}

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    crate::peft::TEST_RNG
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// `merge_and_reinit` draws the new A factors from torch's global generator.
fn merge(model: &Transformer) {
    let _rng = rng_lock();
    merge_and_reinit(model).expect("merge");
}

fn tokens(step: i64) -> Tensor {
    (Tensor::arange(2 * 12, (Kind::Int64, Device::Cpu)) * (step + 3))
        .remainder(64)
        .view([2, 12])
}

fn train_step(model: &Transformer, store: &mut ParamStore, opt: &mut Optimizer, step: i64) {
    let x = tokens(step);
    let logits = model.forward(&x.narrow(1, 0, 11), true);
    let loss = Transformer::loss(&logits, &x.narrow(1, 1, 11));
    loss.backward();
    opt.step(1e-2).expect("step");
    store.zero_grad();
}

fn weight(store: &ParamStore, module: &str) -> Tensor {
    store
        .get(&format!("{module}.weight"))
        .expect("weight")
        .detach()
        .copy()
}

/// Numerical rank: singular values above 1e-4 of the largest.
fn rank(t: &Tensor) -> i64 {
    let (_, s, _) = t.svd(true, false);
    let max = s.max().double_value(&[]);
    s.gt(max * 1e-4).sum(Kind::Int64).int64_value(&[])
}

#[test]
fn merged_update_after_several_restarts_has_rank_above_the_lora_rank() {
    let p = relora_cfg(OptimizerReset::Zero, None);
    let (model, mut store, lora, mut opt) = build(&p);
    let relora = Relora::from_config(&p).expect("relora");
    let module = "model.layers.0.self_attn.q_proj";
    let w0 = weight(&store, module);
    for step in 0..20 {
        train_step(&model, &mut store, &mut opt, step);
        if relora.resets_after(step + 1) {
            merge(&model);
            reset_optimizer(&relora, &lora, &mut opt).expect("reset");
        }
    }
    assert_eq!(relora.resets_done(20), 5);
    // The last merge was after step 20: the adapter is fresh, so W - W0 is the whole update.
    let delta = weight(&store, module) - &w0; // [out, in]
    let r = rank(&delta);
    assert!(
        r > 2,
        "rank of W - W0 after 5 restarts is {r}, not above the LoRA rank 2"
    );
    // Without restarts a single LoRA update has rank at most r (the base is frozen).
    // (Its own W0: tests running in parallel share torch's generator.)
    let (model, mut store, _, mut opt) = build(&p);
    let w0 = weight(&store, module);
    for step in 0..20 {
        train_step(&model, &mut store, &mut opt, step);
    }
    crate::peft::lora::merge(&model).expect("merge");
    assert!(rank(&(weight(&store, module) - &w0)) <= 2);
}

#[test]
fn merge_and_reinit_leaves_the_function_unchanged() {
    let p = relora_cfg(OptimizerReset::Zero, None);
    let (model, mut store, _lora, mut opt) = build(&p);
    for step in 0..3 {
        train_step(&model, &mut store, &mut opt, step);
    }
    let x = tokens(0);
    let a_before = store
        .get("model.layers.0.self_attn.q_proj.lora_A.weight")
        .expect("A")
        .copy();
    let before = tch::no_grad(|| model.forward(&x, false));
    merge(&model);
    let after = tch::no_grad(|| model.forward(&x, false));
    let diff = (&before - &after).abs().max().double_value(&[]);
    assert!(
        diff < 1e-5,
        "logits moved by {diff} across merge_and_reinit"
    );
    let a = store
        .get("model.layers.0.self_attn.q_proj.lora_A.weight")
        .expect("A");
    let b = store
        .get("model.layers.0.self_attn.q_proj.lora_B.weight")
        .expect("B");
    assert_eq!(b.abs().max().double_value(&[]), 0.0, "B is zeroed");
    assert!(
        (a - &a_before).abs().max().double_value(&[]) > 0.0,
        "A is re-drawn"
    );
    let bound = 1.0 / (32f64).sqrt();
    assert!(
        a.abs().max().double_value(&[]) <= bound,
        "A ~ U(-1/sqrt(in), 1/sqrt(in))"
    );
}

fn states(opt: &Optimizer) -> Vec<(String, Tensor)> {
    opt.state_tensors()
        .into_iter()
        .filter(|(n, _)| n != "step")
        .map(|(n, t)| (n, t.copy()))
        .collect()
}

#[test]
fn optimizer_reset_zeroes_or_prunes_exactly_the_adapter_moments() {
    for (reset, keep) in [
        (OptimizerReset::Zero, None),
        (OptimizerReset::Magnitude, Some(0.25)),
    ] {
        let mut p = relora_cfg(reset, keep);
        p.target = vec!["q_proj".into()];
        // Full-rank warm start: the base is in the optimizer too, and must keep its state.
        p.full_rank_warmup_steps = Some(2);
        let rng = rng_lock();
        tch::manual_seed(0);
        let mut store = ParamStore::new(Device::Cpu);
        let mut model = Transformer::new(&llama(), &mut store).expect("model");
        let base: Vec<String> = store.trainable().map(|q| q.name.clone()).collect();
        let lora = apply(&mut model, &mut store, &p).expect("lora");
        for n in &base {
            store.unfreeze(n);
        }
        let adam = OptimConfig::Adamw {
            lr: 1e-2,
            betas: [0.9, 0.95],
            eps: 1e-8,
            weight_decay: 0.0,
            decay_embeddings: false,
            fused: Some(true),
            state_bits: 32,
            layerwise: false,
            master_weights: false,
        };
        let mut opt = Optimizer::build(&adam, &store).expect("optimizer");
        drop(rng);
        for step in 0..2 {
            train_step(&model, &mut store, &mut opt, step);
        }
        let relora = Relora::from_config(&p).expect("relora");
        let before = states(&opt);
        let adapters = adapter_names(&lora);
        assert_eq!(
            reset_optimizer(&relora, &lora, &mut opt).expect("reset"),
            adapters.len()
        );
        let after = states(&opt);
        assert_eq!(before.len(), after.len());
        let mut seen = 0;
        for ((name, b), (_, a)) in before.iter().zip(&after) {
            let param = name.split_once('.').expect("slot.param").1;
            if adapters.iter().any(|n| n == param) {
                seen += 1;
                let n = b.numel() as f64;
                let kept = a.ne(0.0).sum(Kind::Int64).int64_value(&[]) as f64;
                match keep {
                    None => assert_eq!(kept, 0.0, "{name} is zeroed"),
                    Some(k) => {
                        // Distinct magnitudes: about k * n strictly above the (1 - k) quantile.
                        assert!(
                            (kept - (k * n).floor()).abs() <= 1.0,
                            "{name}: kept {kept} of {n}"
                        );
                        // The kept entries are unchanged and are the largest ones.
                        let mask = a.ne(0.0);
                        assert!(
                            a.masked_select(&mask).equal(&b.masked_select(&mask)),
                            "{name}"
                        );
                        let min_kept = a.abs().masked_select(&mask).min().double_value(&[]);
                        let max_dropped = b
                            .abs()
                            .masked_select(&mask.logical_not())
                            .max()
                            .double_value(&[]);
                        assert!(min_kept >= max_dropped, "{name}: pruned by magnitude");
                    }
                }
            } else {
                assert!(
                    a.equal(b),
                    "{name} is not an adapter moment and must be left alone"
                );
            }
        }
        assert_eq!(seen, 2 * adapters.len());
        assert_eq!(
            opt.state_tensors()[0].1.int64_value(&[]),
            2,
            "the step counter stays"
        );
    }
}

#[test]
fn jagged_schedule_rewarms_after_each_merge() {
    let r = Relora {
        merge_every: 10,
        rewarm_steps: 4,
        full_rank_warmup_steps: 0,
        keep_fraction: 0.0,
    };
    // Steps are 0-based; the merge after step 10 completes re-warms steps 10..14.
    let f: Vec<f64> = (8..16).map(|s| r.lr_factor(s)).collect();
    assert_eq!(f, vec![1.0, 1.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]);
    // Before the first merge the main schedule (and its own warmup) runs alone.
    assert!((0..10).all(|s| r.lr_factor(s) == 1.0));
    assert_eq!(r.lr_factor(20), 0.0);
    assert_eq!(r.lr_factor(23), 0.75);
    assert!(!r.resets_after(0) && !r.resets_after(9) && r.resets_after(10) && r.resets_after(30));
    assert_eq!(
        (r.resets_done(9), r.resets_done(10), r.resets_done(35)),
        (0, 1, 3)
    );

    // Full-rank warm start of 15 steps: the switch after step 15 resets and re-warms, merges
    // then come at 20, 30, ...
    let w = Relora {
        full_rank_warmup_steps: 15,
        ..r
    };
    assert!(w.full_rank(14) && !w.full_rank(15));
    assert!(!w.resets_after(10) && w.resets_after(15) && w.resets_after(20));
    assert_eq!(
        (
            w.lr_factor(10),
            w.lr_factor(15),
            w.lr_factor(17),
            w.lr_factor(19)
        ),
        (1.0, 0.0, 0.5, 1.0)
    );
    assert_eq!(w.lr_factor(21), 0.25);
    assert_eq!(
        (
            w.resets_done(14),
            w.resets_done(15),
            w.resets_done(20),
            w.resets_done(31)
        ),
        (0, 1, 2, 3)
    );
    // A switch that falls on a multiple of merge_every is one reset.
    let v = Relora {
        full_rank_warmup_steps: 20,
        ..r
    };
    assert_eq!(
        (v.resets_done(19), v.resets_done(20), v.resets_done(30)),
        (0, 1, 2)
    );
    assert_eq!(v.lr_factor(21), 0.25);
}

#[test]
fn relora_settings_are_validated_with_one_line_messages() {
    let ok = relora_cfg(OptimizerReset::Magnitude, Some(0.1));
    assert!(ok.validate().is_ok());
    let msg = |p: PeftConfig| {
        let e = p.validate().expect_err("invalid");
        format!("{}: {}", e.key, e.msg)
    };
    let m = msg(PeftConfig {
        rewarm_steps: Some(4),
        ..ok.clone()
    });
    assert!(
        m.contains("peft.rewarm_steps") && m.contains("merge_every (4)"),
        "{m}"
    );
    let m = msg(PeftConfig {
        merge_every: None,
        ..ok.clone()
    });
    assert!(m.contains("peft.merge_every"), "{m}");
    let m = msg(PeftConfig {
        merge_every: Some(0),
        ..ok.clone()
    });
    assert!(m.contains("peft.merge_every"), "{m}");
    let m = msg(PeftConfig {
        keep_fraction: Some(1.0),
        ..ok.clone()
    });
    assert!(m.contains("peft.keep_fraction"), "{m}");
    let m = msg(PeftConfig {
        keep_fraction: None,
        ..ok.clone()
    });
    assert!(m.contains("peft.keep_fraction"), "{m}");
    let m = msg(PeftConfig {
        optimizer_reset: Some(OptimizerReset::Zero),
        ..ok.clone()
    });
    assert!(
        m.contains("peft.keep_fraction") && m.contains("magnitude"),
        "{m}"
    );
    let m = msg(PeftConfig {
        full_rank_warmup_steps: Some(-1),
        ..ok.clone()
    });
    assert!(m.contains("peft.full_rank_warmup_steps"), "{m}");
    let m = msg(PeftConfig {
        kind: PeftKind::Lora,
        optimizer_reset: None,
        keep_fraction: None,
        ..ok.clone()
    });
    assert!(
        m.contains("peft.merge_every") && m.contains("relora"),
        "{m}"
    );
    assert!(!m.contains('\n'), "{m}");
}
