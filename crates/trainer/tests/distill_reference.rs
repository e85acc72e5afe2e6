//! Distillation losses against torch.nn.functional, chunked against unchunked, and the teacher
//! kept out of autograd.
//!
//! `tests/reference/distill_reference.json` was written by `tests/reference/distill_reference.py`
//! (torch 2.11.0, CPU; its docstring gives the formulas and how to regenerate it): float32 logits
//! of a student and a teacher, and in float64 each divergence (forward, reverse, symmetric KL,
//! JSD) at three temperatures reduced per example (a classifier) and per counted token mixed
//! with the cross-entropy (a language model), with their gradients; and the hidden-state MSE and
//! cosine losses through a projection. We compute in float32, so values agree to about 1e-6;
//! the tolerance is 1e-5 (absolute plus relative). A wrong formula (a missing T^2, KL's
//! arguments swapped, a mean over all tokens instead of the counted ones) moves values by 1e-2
//! or more.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use trainer::config::{DistillConfig, HiddenLoss, HiddenPair, KdLoss, ModelConfig, Precision};
use trainer::distill::losses::{chunk_sums, divergence_rows, hidden_loss, kd_loss, IGNORE_INDEX};
use trainer::distill::{LmDistiller, LmTeacher};
use trainer::models::params::ParamStore;
use trainer::models::transformer::{Family, Transformer, TransformerConfig};

const TOL: f64 = 1e-5;

/// torch's generator is global and the tests of this file run on parallel threads: every test
/// that seeds it and draws from it (building models, batches) holds this lock throughout, so that
/// the same seed always gives the same model.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng() -> std::sync::MutexGuard<'static, ()> {
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Deserialize)]
struct Reference {
    rows: i64,
    vocab: i64,
    alpha: f64,
    student: Vec<f32>,
    teacher: Vec<f32>,
    targets: Vec<i64>,
    cases: Vec<Case>,
    hidden_student: Vec<f32>,
    hidden_teacher: Vec<f32>,
    hidden_proj: Vec<f32>,
    hidden_shape: [i64; 2],
    hidden_widths: [i64; 2],
    hidden: HiddenRef,
}

#[derive(Deserialize)]
struct Case {
    kind: String,
    temperature: f64,
    classifier_kd: f64,
    classifier_grad: Vec<f64>,
    lm_kd: f64,
    lm_ce: f64,
    lm_mixed: f64,
    lm_grad: Vec<f64>,
}

#[derive(Deserialize)]
struct HiddenRef {
    mse: f64,
    cosine: f64,
}

fn reference_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference")
}

fn read(path: &Path) -> Reference {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn kind(name: &str) -> KdLoss {
    match name {
        "forward_kl" => KdLoss::ForwardKl,
        "reverse_kl" => KdLoss::ReverseKl,
        "symmetric_kl" => KdLoss::SymmetricKl,
        "jsd" => KdLoss::Jsd,
        other => panic!("unknown kind {other}"),
    }
}

fn close(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= TOL * (1.0 + want.abs()),
        "{what}: ours {got}, torch {want}"
    );
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).reshape([-1])).expect("f64 values")
}

fn close_all(what: &str, got: &Tensor, want: &[f64]) {
    let got = values(got);
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        close(&format!("{what}[{i}]"), *g, *w);
    }
}

fn check_reference(r: &Reference) {
    let student = Tensor::from_slice(&r.student).view([r.rows, r.vocab]);
    let teacher = Tensor::from_slice(&r.teacher).view([r.rows, r.vocab]);
    let targets = Tensor::from_slice(&r.targets);
    let counted = r.targets.iter().filter(|&&t| t != IGNORE_INDEX).count() as f64;
    assert_eq!(r.cases.len(), 12, "4 losses x 3 temperatures");
    for c in &r.cases {
        let what = format!("{} T={}", c.kind, c.temperature);
        // A classifier: batchmean over the examples.
        let s = student.copy().set_requires_grad(true);
        let kd = kd_loss(kind(&c.kind), &s, &teacher, c.temperature);
        kd.backward();
        close(
            &format!("{what} classifier kd"),
            kd.double_value(&[]),
            c.classifier_kd,
        );
        close_all(
            &format!("{what} classifier grad"),
            &s.grad(),
            &c.classifier_grad,
        );
        // A language model: per counted token, mixed with the cross-entropy.
        let s = student.copy().set_requires_grad(true);
        let (kd_sum, ce_sum) = chunk_sums(kind(&c.kind), &s, &teacher, &targets, c.temperature);
        let (kd, ce) = (&kd_sum / counted, &ce_sum / counted);
        let mixed = &kd * r.alpha + &ce * (1.0 - r.alpha);
        mixed.backward();
        close(&format!("{what} lm kd"), kd.double_value(&[]), c.lm_kd);
        close(&format!("{what} lm ce"), ce.double_value(&[]), c.lm_ce);
        close(
            &format!("{what} lm mixed"),
            mixed.double_value(&[]),
            c.lm_mixed,
        );
        close_all(&format!("{what} lm grad"), &s.grad(), &c.lm_grad);
    }
    let [b, t] = r.hidden_shape;
    let [ds, dt] = r.hidden_widths;
    let hs = Tensor::from_slice(&r.hidden_student).view([b, t, ds]);
    let ht = Tensor::from_slice(&r.hidden_teacher).view([b, t, dt]);
    let w = Tensor::from_slice(&r.hidden_proj).view([dt, ds]);
    let proj = hs.linear(&w, None::<&Tensor>);
    close(
        "hidden mse",
        hidden_loss(HiddenLoss::Mse, &proj, &ht).double_value(&[]),
        r.hidden.mse,
    );
    close(
        "hidden cosine",
        hidden_loss(HiddenLoss::Cosine, &proj, &ht).double_value(&[]),
        r.hidden.cosine,
    );
}

#[test]
fn losses_match_torch_nn_functional() {
    check_reference(&read(&reference_dir().join("distill_reference.json")));
}

/// With TRAINER_PYTHON (a Python with torch), reruns the generator and checks that the committed
/// JSON is what it gives today and that our losses match the fresh run too.
#[test]
fn committed_reference_matches_a_fresh_torch_run() {
    let Some(python) = std::env::var_os("TRAINER_PYTHON") else {
        eprintln!("TRAINER_PYTHON is not set: not regenerating the reference");
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("distill_reference.json");
    let script = reference_dir().join("distill_reference.py");
    let status = std::process::Command::new(&python)
        .arg(&script)
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("running {python:?} {}: {e}", script.display()));
    assert!(status.success(), "{} failed: {status}", script.display());
    let fresh = read(&out);
    let committed = read(&reference_dir().join("distill_reference.json"));
    assert_eq!(fresh.student, committed.student, "inputs changed");
    for (f, c) in fresh.cases.iter().zip(&committed.cases) {
        close(
            &format!("{} fresh vs committed", f.kind),
            f.lm_mixed,
            c.lm_mixed,
        );
        close(
            &format!("{} fresh vs committed", f.kind),
            f.classifier_kd,
            c.classifier_kd,
        );
    }
    check_reference(&fresh);
}

#[test]
fn divergences_vanish_between_equal_distributions_and_are_positive_otherwise() {
    let _rng = rng();
    tch::manual_seed(0);
    let a = Tensor::randn([4, 9], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([4, 9], (Kind::Float, Device::Cpu));
    for k in [
        KdLoss::ForwardKl,
        KdLoss::ReverseKl,
        KdLoss::SymmetricKl,
        KdLoss::Jsd,
    ] {
        let same = divergence_rows(k, &a, &a, 2.0);
        assert!(values(&same).iter().all(|v| v.abs() < 1e-6), "{k:?}");
        let diff = divergence_rows(k, &a, &b, 2.0);
        assert!(values(&diff).iter().all(|v| *v > 0.0), "{k:?}");
    }
}

fn llama(vocab: i64, d_model: i64, n_layers: i64) -> TransformerConfig {
    TransformerConfig {
        family: Family::Llama,
        vocab_size: vocab,
        d_model,
        n_layers,
        n_heads: 2,
        n_kv_heads: 2,
        head_dim: None,
        d_ff: 2 * d_model,
        max_seq_len: 16,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        dropout: 0.0,
        moe: None,
        variant: Default::default(),
    }
}

fn distill_config(
    loss: KdLoss,
    chunk_tokens: i64,
    hidden: Vec<HiddenPair>,
) -> DistillConfig<ModelConfig> {
    DistillConfig {
        teacher: "test".into(),
        teacher_model: None,
        teacher_precision: Default::default(),
        loss,
        temperature: 2.0,
        alpha: 0.7,
        chunk_tokens,
        hidden,
        hidden_loss: HiddenLoss::Mse,
        hidden_weight: 0.5,
    }
}

/// A student (d 16, 2 layers), a teacher (d 24, 3 layers) and a distiller over them, the
/// same for every call.
fn setup(cfg: &DistillConfig<ModelConfig>) -> (Transformer, ParamStore, LmDistiller) {
    tch::manual_seed(7);
    let mut tp = ParamStore::new(Device::Cpu);
    let teacher = Transformer::new(&llama(32, 24, 3), &mut tp).expect("teacher");
    let teacher = LmTeacher::new(teacher, tp, "teacher".into());
    let mut sp = ParamStore::new(Device::Cpu);
    let scfg = llama(32, 16, 2);
    let student = Transformer::new(&scfg, &mut sp).expect("student");
    let d = LmDistiller::with_teacher(cfg, teacher, &scfg, &mut sp).expect("distiller");
    (student, sp, d)
}

fn batch() -> (Tensor, Tensor) {
    tch::manual_seed(11);
    let inputs = Tensor::randint(32, [3, 8], (Kind::Int64, Device::Cpu));
    let targets = Tensor::randint(32, [3, 8], (Kind::Int64, Device::Cpu));
    // Some ignored positions, as a padded batch would have.
    let _ = targets.get(1).narrow(0, 5, 3).fill_(IGNORE_INDEX);
    assert_eq!(
        targets.eq(IGNORE_INDEX).sum(Kind::Int64).int64_value(&[]),
        3
    );
    (inputs, targets)
}

fn grads(params: &ParamStore) -> Vec<(String, Tensor)> {
    params
        .trainable()
        .map(|p| (p.name.clone(), p.tensor.grad().copy()))
        .collect()
}

#[test]
fn chunked_equals_unchunked_in_loss_and_gradients() {
    let _rng = rng();
    let hidden = vec![
        HiddenPair {
            student: 1,
            teacher: 2,
        },
        HiddenPair {
            student: 2,
            teacher: 3,
        },
    ];
    let (inputs, targets) = batch();
    for loss in [KdLoss::ForwardKl, KdLoss::Jsd] {
        // The whole batch (24 positions) in one chunk, and in chunks of 5 (the last one short).
        let mut runs = Vec::new();
        for chunk in [1024, 5] {
            let (student, params, d) = setup(&distill_config(loss, chunk, hidden.clone()));
            let l = d
                .backward(
                    &student,
                    &inputs,
                    &targets,
                    0.5,
                    Device::Cpu,
                    Precision::Fp32,
                )
                .expect("backward");
            runs.push((values(&l.loss)[0], values(&l.kd)[0], grads(&params)));
        }
        // And directly: full logits of both models, one loss, one backward.
        let (student, params, d) = setup(&distill_config(loss, 1024, hidden.clone()));
        let t_out = tch::no_grad(|| d.teacher.model.forward_hidden(&inputs, false, &[2, 3]));
        let s_out = student.forward_hidden(&inputs, true, &[1, 2]);
        let s_logits = student.lm_head(&s_out.hidden).view([-1, 32]);
        let t_logits = d.teacher.model.lm_head(&t_out.hidden).view([-1, 32]);
        let y = targets.view([-1]);
        let mask = y.ne(IGNORE_INDEX);
        let kd = divergence_rows(loss, &s_logits, &t_logits, 2.0)
            .masked_select(&mask)
            .mean(Kind::Float);
        let ce = Transformer::loss(&s_logits.view([3, 8, 32]), &targets);
        let proj = |i: usize| {
            params
                .get(&format!("distill.hidden.{i}.proj.weight"))
                .expect("proj")
                .shallow_clone()
        };
        let h = hidden_loss(
            HiddenLoss::Mse,
            &s_out.layers[0].linear(&proj(0), None::<&Tensor>),
            &t_out.layers[0],
        ) + hidden_loss(
            HiddenLoss::Mse,
            &s_out.layers[1].linear(&proj(1), None::<&Tensor>),
            &t_out.layers[1],
        );
        let total = &kd * 0.7 + &ce * 0.3 + &h * 0.5;
        (&total * 0.5).backward();
        runs.push((values(&total)[0], values(&kd)[0], grads(&params)));

        let (loss0, kd0, g0) = &runs[2];
        for (i, (l, kd, g)) in runs[..2].iter().enumerate() {
            close(&format!("{loss:?} run {i} loss"), *l, *loss0);
            close(&format!("{loss:?} run {i} kd"), *kd, *kd0);
            assert_eq!(g.len(), g0.len());
            for ((name, a), (_, b)) in g.iter().zip(g0) {
                assert!(a.defined() && b.defined(), "{name} has no gradient");
                let err = (a - b).abs().max().double_value(&[]);
                let scale = b.abs().max().double_value(&[]);
                assert!(
                    err <= 1e-5 * (1.0 + scale),
                    "{loss:?} run {i} {name}: grad differs by {err}"
                );
            }
        }
    }
}

#[test]
fn gradients_reach_the_student_and_its_projections_but_never_the_teacher() {
    let _rng = rng();
    let cfg = distill_config(
        KdLoss::ForwardKl,
        7,
        vec![HiddenPair {
            student: 2,
            teacher: 1,
        }],
    );
    let (student, params, d) = setup(&cfg);
    let (inputs, targets) = batch();
    d.backward(
        &student,
        &inputs,
        &targets,
        1.0,
        Device::Cpu,
        Precision::Fp32,
    )
    .expect("backward");
    for p in d.teacher.params.iter() {
        assert!(
            !p.tensor.requires_grad(),
            "teacher {} requires grad",
            p.name
        );
        assert!(
            !p.tensor.grad().defined(),
            "teacher {} got a gradient",
            p.name
        );
        assert!(!p.trainable, "teacher {} is trainable", p.name);
    }
    let mut n = 0;
    for (name, g) in grads(&params) {
        assert!(g.defined(), "student {name} got no gradient");
        assert!(
            g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
            "student {name}: zero gradient"
        );
        n += 1;
    }
    assert!(
        params.get("distill.hidden.0.proj.weight").is_some(),
        "projection 16 -> 24"
    );
    assert!(n > 10);
}

#[test]
fn a_teacher_with_another_vocabulary_is_refused_naming_the_key() {
    let _rng = rng();
    let mut tp = ParamStore::new(Device::Cpu);
    let teacher = Transformer::new(&llama(48, 16, 1), &mut tp).expect("teacher");
    let teacher = LmTeacher::new(teacher, tp, "runs/big".into());
    let mut sp = ParamStore::new(Device::Cpu);
    let scfg = llama(32, 16, 1);
    let err = LmDistiller::with_teacher(
        &distill_config(KdLoss::ForwardKl, 8, vec![]),
        teacher,
        &scfg,
        &mut sp,
    )
    .err()
    .expect("vocab mismatch")
    .to_string();
    assert_eq!(
        err,
        "distill.teacher: runs/big has vocab_size 48 but the student's model.vocab_size is 32; \
         the teacher must share the student's vocabulary"
    );
}

#[test]
fn hidden_layers_out_of_range_are_refused_naming_the_key() {
    let _rng = rng();
    let mut tp = ParamStore::new(Device::Cpu);
    let teacher = Transformer::new(&llama(32, 16, 2), &mut tp).expect("teacher");
    let teacher = LmTeacher::new(teacher, tp, "t".into());
    let mut sp = ParamStore::new(Device::Cpu);
    let scfg = llama(32, 16, 1);
    let cfg = distill_config(
        KdLoss::ForwardKl,
        8,
        vec![HiddenPair {
            student: 1,
            teacher: 3,
        }],
    );
    let err = LmDistiller::with_teacher(&cfg, teacher, &scfg, &mut sp)
        .err()
        .expect("error")
        .to_string();
    assert!(
        err.starts_with("distill.hidden: hidden[0].teacher = 3 but the teacher has 2 layers"),
        "{err}"
    );
}

#[test]
fn a_bf16_teacher_gives_nearly_the_fp32_teacher_losses() {
    let _rng = rng();
    let cfg = distill_config(
        KdLoss::ForwardKl,
        7,
        vec![HiddenPair {
            student: 2,
            teacher: 3,
        }],
    );
    let (inputs, targets) = batch();
    let (student, _params, d) = setup(&cfg);
    let fp32 = d
        .backward(
            &student,
            &inputs,
            &targets,
            1.0,
            Device::Cpu,
            Precision::Fp32,
        )
        .expect("fp32 teacher");
    // The same teacher, its weights in bf16 (`teacher_precision = "bf16"`).
    let (student, _params, mut d) = setup(&cfg);
    d.teacher.params.set_kind(Kind::BFloat16);
    let bf16 = d
        .backward(
            &student,
            &inputs,
            &targets,
            1.0,
            Device::Cpu,
            Precision::Fp32,
        )
        .expect("bf16 teacher");
    let (a, b) = (values(&fp32.kd)[0], values(&bf16.kd)[0]);
    // Random tiny models: kd is about 7e-3; bf16's 8-bit mantissa moves it by about 4e-4.
    assert!(
        a > 0.0 && b > 0.0 && (a - b).abs() < 1e-3,
        "kd {a} (fp32) vs {b} (bf16)"
    );
    assert_eq!(
        values(&fp32.ce),
        values(&bf16.ce),
        "the student's CE does not involve the teacher"
    );
}

#[test]
fn an_moe_student_also_minimises_its_router_losses() {
    let _rng = rng();
    // Top-1 routing after a softmax: the router learns only through its aux and z losses, so
    // its gradient is non-zero exactly when they are part of the backward pass.
    let router_grad = |aux: f64| {
        tch::manual_seed(7);
        let mut tp = ParamStore::new(Device::Cpu);
        let teacher = Transformer::new(&llama(32, 24, 1), &mut tp).expect("teacher");
        let teacher = LmTeacher::new(teacher, tp, "teacher".into());
        let mut sp = ParamStore::new(Device::Cpu);
        let moe = trainer::models::moe::MoeConfig {
            n_experts: 2,
            top_k: 1,
            routing: trainer::models::moe::Routing::SoftmaxThenTopK,
            capacity_factor: None,
            aux_loss_coef: aux,
            router_z_loss_coef: aux,
            shared_expert: false,
        };
        let scfg = TransformerConfig {
            moe: Some(moe),
            variant: Default::default(),
            ..llama(32, 16, 1)
        };
        let student = Transformer::new(&scfg, &mut sp).expect("student");
        let cfg = distill_config(KdLoss::ReverseKl, 7, vec![]);
        let d = LmDistiller::with_teacher(&cfg, teacher, &scfg, &mut sp).expect("distiller");
        tch::manual_seed(11);
        let inputs = Tensor::randint(32, [2, 8], (Kind::Int64, Device::Cpu));
        let l = d
            .backward(
                &student,
                &inputs,
                &inputs,
                1.0,
                Device::Cpu,
                Precision::Fp32,
            )
            .expect("backward");
        assert_eq!(l.moe_layers.len(), 1);
        let g = sp
            .get("model.layers.0.mlp.gate.weight")
            .expect("router")
            .grad();
        if g.defined() {
            g.abs().sum(Kind::Float).double_value(&[])
        } else {
            0.0
        }
    };
    // Without the losses, only rounding in the renormalisation of one weight reaches it.
    let (without, with) = (router_grad(0.0), router_grad(0.01));
    assert!(
        without < 1e-8 && with > 1e-5,
        "router gradient {without} vs {with}"
    );
}
