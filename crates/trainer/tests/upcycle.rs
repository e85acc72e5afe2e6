//! Sparse upcycling (Komatsuzaki et al. 2023): right after a dense Llama is turned into an MoE,
//! before any training, the MoE computes the dense model's function.

use tch::{Device, Kind, Tensor};
use trainer::load::ModelSource;
use trainer::models::hf;
use trainer::models::params::ParamStore;
use trainer::models::transformer::{Family, Transformer, TransformerConfig};
use trainer::models::{MoeConfig, Routing};

fn dense_config() -> TransformerConfig {
    TransformerConfig {
        family: Family::Llama,
        vocab_size: 256,
        d_model: 32,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: 2,
        head_dim: None,
        d_ff: 48,
        max_seq_len: 16,
        rope_theta: 10000.0,
        norm_eps: 1e-5,
        tie_embeddings: false,
        dropout: 0.0,
        moe: None,
        variant: Default::default(),
    }
}

fn upcycled(routing: Routing, top_k: i64, shared_expert: bool) -> (Tensor, Tensor) {
    tch::manual_seed(3);
    let dense_cfg = dense_config();
    let mut dense_params = ParamStore::new(Device::Cpu);
    let dense = Transformer::new(&dense_cfg, &mut dense_params).expect("dense");
    let dir = tempfile::tempdir().expect("tempdir");
    let hf_dir = dir.path().join("dense");
    hf::export(&dense_cfg, &dense_params, &hf_dir).expect("export");

    let recipe = MoeConfig {
        n_experts: 4,
        top_k,
        routing,
        capacity_factor: None,
        aux_loss_coef: 0.01,
        router_z_loss_coef: 0.0,
        shared_expert,
    };
    let moe_cfg = TransformerConfig {
        moe: Some(recipe),
        variant: Default::default(),
        ..dense_cfg.clone()
    };
    tch::manual_seed(99); // routers get their own fresh initialisation
    let mut moe_params = ParamStore::new(Device::Cpu);
    let moe = Transformer::new(&moe_cfg, &mut moe_params).expect("moe");
    let source = ModelSource::parse(&format!("hf:{}", hf_dir.display())).expect("source");
    source
        .load_upcycled(&dense_cfg, &moe_params, &moe)
        .expect("upcycle");

    let ids = Tensor::randint(256, [2, 16], (Kind::Int64, Device::Cpu));
    tch::no_grad(|| (dense.forward(&ids, false), moe.forward(&ids, false)))
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[])
}

#[test]
fn upcycled_moe_equals_the_dense_model_before_training() {
    for (routing, k) in [
        (Routing::SoftmaxThenTopK, 2),
        (Routing::TopKThenSoftmax, 2),
        (Routing::SoftmaxThenTopK, 1),
    ] {
        let (dense, moe) = upcycled(routing, k, false);
        let err = max_rel_err(&moe, &dense);
        assert!(
            err < 1e-5,
            "{routing:?} top-{k}: upcycled logits differ from dense by {err}"
        );
    }
}

#[test]
fn switch_routing_and_shared_experts_change_the_function_as_documented() {
    // Switch weights are the router probability (< 1), and a shared expert adds its own output:
    // neither preserves the dense function, which is why the identity above needs neither.
    let (dense, moe) = upcycled(Routing::Switch, 1, false);
    assert!(max_rel_err(&moe, &dense) > 1e-3);
    let (dense, moe) = upcycled(Routing::SoftmaxThenTopK, 2, true);
    assert!(max_rel_err(&moe, &dense) > 1e-3);
}

#[test]
fn upcycling_a_source_without_dense_mlp_weights_names_the_missing_tensor() {
    let dense_cfg = dense_config();
    let mut params = ParamStore::new(Device::Cpu);
    let _ = Transformer::new(&dense_cfg, &mut params).expect("dense");
    let dir = tempfile::tempdir().expect("tempdir");
    let hf_dir = dir.path().join("dense");
    hf::export(&dense_cfg, &params, &hf_dir).expect("export");
    // Remove one layer's up_proj from the exported file.
    let path = hf_dir.join("model.safetensors");
    let kept: Vec<(String, Tensor)> = Tensor::read_safetensors(&path)
        .expect("read")
        .into_iter()
        .filter(|(k, _)| k != "model.layers.1.mlp.up_proj.weight")
        .collect();
    Tensor::write_safetensors(&kept, &path).expect("write");

    let recipe = MoeConfig {
        n_experts: 2,
        top_k: 1,
        routing: Routing::SoftmaxThenTopK,
        capacity_factor: None,
        aux_loss_coef: 0.0,
        router_z_loss_coef: 0.0,
        shared_expert: false,
    };
    let moe_cfg = TransformerConfig {
        moe: Some(recipe), // the dense model's widths: d_model 32, d_ff 48
        ..dense_cfg.clone()
    };
    let mut moe_params = ParamStore::new(Device::Cpu);
    let moe = Transformer::new(&moe_cfg, &mut moe_params).expect("moe");
    let source = ModelSource::parse(&format!("hf:{}", hf_dir.display())).expect("source");
    let err = source
        .load_upcycled(&dense_cfg, &moe_params, &moe)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
}
