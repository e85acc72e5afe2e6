//! Structured pruning of a transformer into a smaller dense one, in the spirit of Minitron
//! (Muralidharan et al., 2024, "Compact Language Models via Pruning and Knowledge
//! Distillation"): importances from one calibration pass of the dense model, then
//!
//! - width: the MLP channels of every layer ranked by their activation's L2 norm over the
//!   calibration tokens (the input of `down_proj` / GPT-2's `mlp.c_proj`); each layer keeps its
//!   `d_ff` most important channels;
//! - depth: whole layers ranked by Block Importance (Men et al., 2024, ShortGPT), 1 minus the mean
//!   cosine similarity between a block's input and output residual streams; the least important
//!   layers are dropped.
//!
//! The result is a new, smaller model (fewer layers, narrower MLPs) with the kept weights copied;
//! it usually needs recovery training (distillation from the dense model: `[distill]`).
//! Llama attention heads are pruned too (`n_heads`): ranked by the L2 norm of their outputs (the
//! input of `o_proj`), in whole key/value groups so that grouped-query attention keeps its shape;
//! the heads keep their width, which the smaller model's config records as `head_dim`. GPT-2's
//! fused attention is not head-pruned.

use crate::error::{Error, Result};
use crate::models::params::{copy_named, ParamStore};
use crate::models::transformer::{Family, Transformer, TransformerConfig};
use crate::models::ModelConfig;
use tch::{Kind, Tensor};

/// What the smaller model keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// MLP channels per layer; None: all.
    pub d_ff: Option<i64>,
    /// Layers; None: all.
    pub n_layers: Option<i64>,
    /// Query heads per layer, a multiple of n_heads / n_kv_heads (Llama); None: all.
    pub n_heads: Option<i64>,
}

/// Importances measured on calibration batches.
#[derive(Debug)]
pub struct Importance {
    /// Per layer, per MLP channel: the L2 norm of its activation over the calibration tokens.
    pub channels: Vec<Tensor>,
    /// Per layer: 1 - mean cosine(input, output) of the block over the calibration tokens.
    pub blocks: Vec<f64>,
    /// Per layer, per key/value group: the L2 norm of its query heads' outputs.
    pub groups: Vec<Tensor>,
}

fn torch_err(e: tch::TchError) -> Error {
    Error::Torch(format!("structured pruning: {e}"))
}

fn is_mlp_out(path: &str) -> bool {
    path.ends_with("mlp.down_proj")
        || path.ends_with("mlp.c_proj")
        || path.ends_with("mlp.dense_4h_to_h")
}

fn is_attn_out(path: &str) -> bool {
    path.ends_with("self_attn.o_proj")
        || path.ends_with("attn.c_proj")
        || path.ends_with("attention.dense")
}

/// What the smaller model keeps of the source layers.
pub struct Selection {
    /// The source layers kept, in order.
    pub layers: Vec<i64>,
    /// Per kept layer: its MLP channels kept (ascending).
    pub channels: Vec<Tensor>,
    /// Per kept layer: its key/value groups kept (ascending); all of them without head pruning.
    pub groups: Vec<Tensor>,
}

/// One pass over `calibration` collecting channel, head and block importances.
pub fn importance(model: &Transformer, calibration: &[Tensor]) -> Result<Importance> {
    if model.config.moe.is_some() {
        return Err(Error::Recipe(
            "--method structured: MoE models are not supported (prune experts' MLPs by hand)"
                .into(),
        ));
    }
    let blocks = model.block_projections();
    let find = |is: fn(&str) -> bool| -> Vec<_> {
        blocks
            .iter()
            .map(|b| {
                b.iter()
                    .copied()
                    .find(|l| is(&l.path))
                    .expect("every dense block has an attention and an MLP output")
            })
            .collect()
    };
    let (mlp_out, attn_out) = (find(is_mlp_out), find(is_attn_out));
    for l in mlp_out.iter().chain(&attn_out) {
        let (fan_in, _) = l.in_out();
        *l.input_sq.borrow_mut() = Some(Tensor::zeros([fan_in], (Kind::Float, l.weight.device())));
    }
    let n = model.config.n_layers;
    let all_layers: Vec<i64> = (0..=n).collect();
    let mut cos_sum = vec![0.0f64; n as usize];
    let mut tokens = 0i64;
    tch::no_grad(|| -> Result<()> {
        for batch in calibration {
            let out = model.forward_hidden(batch, false, &all_layers);
            for i in 0..n as usize {
                let (a, b) = (&out.layers[i], &out.layers[i + 1]);
                let cos = Tensor::f_cosine_similarity(
                    &a.to_kind(Kind::Float),
                    &b.to_kind(Kind::Float),
                    -1,
                    1e-8,
                )
                .map_err(torch_err)?;
                cos_sum[i] += cos.sum(Kind::Double).double_value(&[]);
            }
            tokens += batch.numel() as i64;
        }
        Ok(())
    })?;
    let take =
        |l: &crate::models::transformer::Linear| l.input_sq.borrow_mut().take().expect("set above");
    let channels = mlp_out.iter().map(|l| take(l).sqrt()).collect();
    let kv = model.config.n_kv_heads;
    // o_proj's input is [n_heads * head_dim], the heads of a key/value group side by side.
    let groups = attn_out
        .iter()
        .map(|l| {
            take(l)
                .view([kv, -1])
                .sum_dim_intlist(1, false, Kind::Float)
                .sqrt()
        })
        .collect();
    Ok(Importance {
        channels,
        blocks: cos_sum
            .iter()
            .map(|c| 1.0 - c / tokens.max(1) as f64)
            .collect(),
        groups,
    })
}

/// The `k` highest scores' indices, ascending.
fn top(scores: &Tensor, k: i64) -> Result<Tensor> {
    let (_, idx) = scores.f_sort_stable(true, 0, true).map_err(torch_err)?;
    let (kept, _) = idx.narrow(0, 0, k).f_sort(0, false).map_err(torch_err)?;
    Ok(kept)
}

/// The layers kept (in order) and, per kept layer, the MLP channels and key/value groups kept.
pub fn selection(imp: &Importance, config: &TransformerConfig, shape: Shape) -> Result<Selection> {
    let n = config.n_layers;
    let keep_layers = shape.n_layers.unwrap_or(n);
    if keep_layers < 1 || keep_layers > n {
        return Err(Error::Recipe(format!(
            "--layers: expected 1..={n} (the model's n_layers), got {keep_layers}"
        )));
    }
    let d_ff = shape.d_ff.unwrap_or(config.d_ff);
    if d_ff < 1 || d_ff > config.d_ff {
        return Err(Error::Recipe(format!(
            "--d-ff: expected 1..={} (the model's d_ff), got {d_ff}",
            config.d_ff
        )));
    }
    let group = config.n_heads / config.n_kv_heads; // query heads per key/value head
    let heads = shape.n_heads.unwrap_or(config.n_heads);
    if config.variant.family.fused_projections() && (heads != config.n_heads || d_ff != config.d_ff)
    {
        return Err(Error::Recipe(format!(
            "--heads / --d-ff: {} stores q/k/v and gate/up as fused projections, which \
             structured pruning does not slice; prune --layers only",
            config.variant.family.model_type()
        )));
    }
    if heads != config.n_heads && config.family != Family::Llama {
        return Err(Error::Recipe(
            "--heads: head pruning is for Llama-family models".into(),
        ));
    }
    if heads < group || heads > config.n_heads || heads % group != 0 {
        return Err(Error::Recipe(format!(
            "--heads: expected a multiple of {group} (query heads per key/value head) in {group}..={}, got {heads}",
            config.n_heads
        )));
    }
    // Most important blocks first; ties by position.
    let mut order: Vec<usize> = (0..n as usize).collect();
    order.sort_by(|&a, &b| {
        imp.blocks[b]
            .partial_cmp(&imp.blocks[a])
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.cmp(&b))
    });
    let mut layers: Vec<i64> = order[..keep_layers as usize]
        .iter()
        .map(|&i| i as i64)
        .collect();
    layers.sort();
    let channels = layers
        .iter()
        .map(|&l| top(&imp.channels[l as usize], d_ff))
        .collect::<Result<_>>()?;
    let groups = layers
        .iter()
        .map(|&l| top(&imp.groups[l as usize], heads / group))
        .collect::<Result<_>>()?;
    Ok(Selection {
        layers,
        channels,
        groups,
    })
}

/// The indices `u * width .. (u + 1) * width` of every unit `u` of `units`, in order.
fn units_index(units: &Tensor, width: i64) -> Tensor {
    let offsets = Tensor::arange(width, (Kind::Int64, units.device()));
    (units.unsqueeze(1) * width + offsets.unsqueeze(0)).flatten(0, -1)
}

/// The recipe's model section with the new depth, MLP width and heads (`old`: the source).
/// `layers`: the source layers kept, in order (their `layer_types` entries go with them).
pub fn smaller_model_config(
    cfg: &ModelConfig,
    old: &TransformerConfig,
    layers: &[i64],
    d_ff: i64,
    n_heads: i64,
) -> ModelConfig {
    let mut out = cfg.clone();
    let n_layers = layers.len() as i64;
    match &mut out {
        ModelConfig::Llama(c) => {
            c.n_layers = n_layers;
            if let Some(types) = &mut c.layer_types {
                *types = layers.iter().map(|&l| types[l as usize]).collect();
            }
            c.d_ff = d_ff;
            if n_heads != old.n_heads {
                c.n_heads = n_heads;
                c.n_kv_heads = Some(n_heads / (old.n_heads / old.n_kv_heads));
                // The heads keep their width, no longer d_model / n_heads.
                c.head_dim = Some(old.head_dim());
            }
        }
        ModelConfig::Gpt2(c) => {
            c.n_layers = n_layers;
            c.d_ff = Some(d_ff);
        }
        ModelConfig::GptNeox(c) => {
            c.n_layers = n_layers;
            c.d_ff = d_ff;
        }
    }
    out
}

/// Builds the smaller model and copies the kept weights into it.
pub fn shrink(
    old: &ParamStore,
    config: &TransformerConfig,
    sel: &Selection,
    new_config: &TransformerConfig,
) -> Result<(ParamStore, Transformer)> {
    let prefix = match config.family {
        Family::Llama => "model.layers.",
        Family::Gpt2 => "transformer.h.",
        Family::GptNeox => "gpt_neox.layers.",
    };
    let hd = config.head_dim();
    let group = config.n_heads / config.n_kv_heads;
    // Qwen3 and Gemma 3 norm each head over head_dim (kept whole); OLMo 2 over all heads.
    let per_head_norm = config.variant.qk_norm();
    let mut tensors = Vec::new();
    for p in old.iter() {
        let name = &p.name;
        let Some(rest) = name.strip_prefix(prefix) else {
            tensors.push((name.clone(), p.tensor.detach().shallow_clone()));
            continue;
        };
        let (index, field) = rest.split_once('.').unwrap_or((rest, ""));
        let old_layer: i64 = index
            .parse()
            .map_err(|_| Error::Recipe(format!("unexpected tensor name {name}")))?;
        let Some(new_layer) = sel.layers.iter().position(|&l| l == old_layer) else {
            continue; // a dropped layer
        };
        let channels = &sel.channels[new_layer];
        let groups = &sel.groups[new_layer];
        // The query heads of the kept groups (query head h belongs to group h / group).
        let q_heads = units_index(groups, group);
        let t = p.tensor.detach();
        // Which dimension of this tensor indexes kept units, and which indices it keeps.
        let (dim, keep) = match (config.family, field) {
            (
                Family::Llama,
                "mlp.gate_proj.weight"
                | "mlp.up_proj.weight"
                | "mlp.gate_proj.bias"
                | "mlp.up_proj.bias",
            ) => (0, channels.shallow_clone()),
            (Family::Llama, "mlp.down_proj.weight") => (1, channels.shallow_clone()),
            // q's rows (and bias, and OLMo 2's norm over the whole q) are per query head.
            (
                Family::Llama,
                "self_attn.q_proj.weight" | "self_attn.q_proj.bias" | "self_attn.q_norm.weight",
            ) if !per_head_norm || !field.contains("norm") => (0, units_index(&q_heads, hd)),
            (
                Family::Llama,
                "self_attn.k_proj.weight"
                | "self_attn.v_proj.weight"
                | "self_attn.k_proj.bias"
                | "self_attn.v_proj.bias"
                | "self_attn.k_norm.weight",
            ) if !per_head_norm || !field.contains("norm") => (0, units_index(groups, hd)),
            (Family::Llama, "self_attn.o_proj.weight") => (1, units_index(&q_heads, hd)),
            // GPT-2's Conv1D stores [in, out].
            (Family::Gpt2, "mlp.c_fc.weight") => (1, channels.shallow_clone()),
            (Family::Gpt2, "mlp.c_fc.bias") => (0, channels.shallow_clone()),
            (Family::Gpt2, "mlp.c_proj.weight") => (0, channels.shallow_clone()),
            (Family::GptNeox, "mlp.dense_h_to_4h.weight" | "mlp.dense_h_to_4h.bias") => {
                (0, channels.shallow_clone())
            }
            (Family::GptNeox, "mlp.dense_4h_to_h.weight") => (1, channels.shallow_clone()),
            _ => {
                tensors.push((format!("{prefix}{new_layer}.{field}"), t));
                continue;
            }
        };
        let t = t
            .f_index_select(dim, &keep.to_device(t.device()))
            .map_err(torch_err)?;
        tensors.push((format!("{prefix}{new_layer}.{field}"), t));
    }
    let mut store = ParamStore::new(old.device());
    let model = Transformer::new(new_config, &mut store)?;
    copy_named(
        &mut store.iter().map(|p| (p.name.as_str(), &p.tensor)),
        tensors,
        std::path::Path::new("(structured pruning)"),
    )?;
    Ok((store, model))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::transformer::TransformerConfig;
    use tch::Device;

    fn llama(n_layers: i64, d_ff: i64) -> TransformerConfig {
        TransformerConfig::from_recipe(&ModelConfig::Llama(llama_recipe(n_layers, d_ff)))
    }

    fn llama_recipe(n_layers: i64, d_ff: i64) -> crate::models::LlamaConfig {
        crate::models::LlamaConfig {
            vocab_size: 64,
            d_model: 16,
            n_layers,
            n_heads: 4,
            n_kv_heads: Some(2),
            head_dim: None,
            d_ff,
            max_seq_len: 16,
            rope_theta: 10000.0,
            norm_eps: 1e-6,
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
        }
    }

    /// Zeroing the dropped channels and heads of the dense model gives the same function as the
    /// smaller model: the copy puts every kept weight where it belongs. Plain Llama, and Qwen2
    /// with MLP biases (q/k/v and gate/up biases sliced with their rows).
    #[test]
    fn the_smaller_model_computes_what_the_dense_one_does_without_the_dropped_units() {
        let qwen2 = crate::models::LlamaConfig {
            family: crate::models::config::DecoderFamily::Qwen2,
            mlp_bias: true,
            ..llama_recipe(2, 24)
        };
        for recipe in [llama_recipe(2, 24), qwen2] {
            check_smaller_model(recipe);
        }
    }

    fn check_smaller_model(recipe: crate::models::LlamaConfig) {
        tch::manual_seed(1);
        let cfg = TransformerConfig::from_recipe(&ModelConfig::Llama(recipe.clone()));
        let mut store = ParamStore::new(Device::Cpu);
        let dense = Transformer::new(&cfg, &mut store).unwrap();
        let batch = Tensor::randint(64, [2, 8], (Kind::Int64, Device::Cpu));
        let imp = importance(&dense, &[batch.shallow_clone()]).unwrap();
        assert_eq!(imp.channels.len(), 2);
        assert_eq!(imp.blocks.len(), 2);
        assert_eq!(imp.groups[0].size(), vec![2]);
        // 4 heads in 2 key/value groups: keep 2 heads (one group), 10 of 24 channels.
        let shape = Shape {
            d_ff: Some(10),
            n_layers: None,
            n_heads: Some(2),
        };
        let sel = selection(&imp, &cfg, shape).unwrap();
        assert_eq!(sel.layers, vec![0, 1]);
        // The kept units are the most important ones.
        for (l, kept) in sel.channels.iter().enumerate() {
            let all = &imp.channels[l];
            let min_kept = all.index_select(0, kept).min().double_value(&[]);
            let mask = Tensor::ones([24], (Kind::Bool, Device::Cpu)).index_fill(0, kept, 0);
            let max_dropped = all.masked_select(&mask).max().double_value(&[]);
            assert!(min_kept >= max_dropped);
            let g = &imp.groups[l];
            let kept_group = sel.groups[l].int64_value(&[0]);
            assert!(g.double_value(&[kept_group]) >= g.double_value(&[1 - kept_group]));
        }
        let model_cfg = smaller_model_config(&ModelConfig::Llama(recipe), &cfg, &sel.layers, 10, 2);
        let small_cfg = TransformerConfig::from_recipe(&model_cfg);
        assert_eq!(
            (
                small_cfg.n_heads,
                small_cfg.n_kv_heads,
                small_cfg.head_dim()
            ),
            (2, 1, 4)
        );
        let (_, small) = shrink(&store, &cfg, &sel, &small_cfg).unwrap();
        // Zero the dropped channels' down_proj columns and the dropped heads' o_proj columns.
        tch::no_grad(|| {
            for l in 0..2usize {
                let down = store
                    .get(&format!("model.layers.{l}.mlp.down_proj.weight"))
                    .unwrap();
                let mask = Tensor::ones([24], (Kind::Bool, Device::Cpu)).index_fill(
                    0,
                    &sel.channels[l],
                    0,
                );
                let _ = down.shallow_clone().masked_fill_(&mask.unsqueeze(0), 0.0);
                // Group g holds query heads 2g, 2g + 1, each 4 wide: o_proj columns 8g..8g + 8.
                let o = store
                    .get(&format!("model.layers.{l}.self_attn.o_proj.weight"))
                    .unwrap();
                let dropped = 1 - sel.groups[l].int64_value(&[0]);
                let _ = o.narrow(1, 8 * dropped, 8).shallow_clone().zero_();
            }
        });
        let a = dense.forward(&batch, false);
        let b = small.forward(&batch, false);
        assert!(a.allclose(&b, 1e-5, 1e-6, false));
        // Heads that do not fill whole key/value groups are refused.
        let bad = Shape {
            d_ff: None,
            n_layers: None,
            n_heads: Some(3),
        };
        let err = selection(&imp, &cfg, bad).err().unwrap().to_string();
        assert!(
            err.contains("--heads") && err.contains("multiple of 2"),
            "{err}"
        );
    }

    #[test]
    fn depth_pruning_drops_the_least_important_layers_and_renumbers() {
        tch::manual_seed(2);
        let cfg = llama(3, 24);
        let mut store = ParamStore::new(Device::Cpu);
        let _dense = Transformer::new(&cfg, &mut store).unwrap();
        let imp = Importance {
            channels: (0..3)
                .map(|_| Tensor::ones([24], (Kind::Float, Device::Cpu)))
                .collect(),
            blocks: vec![0.3, 0.1, 0.2],
            groups: (0..3)
                .map(|_| Tensor::ones([2], (Kind::Float, Device::Cpu)))
                .collect(),
        };
        let sel = selection(
            &imp,
            &cfg,
            Shape {
                d_ff: None,
                n_layers: Some(2),
                n_heads: None,
            },
        )
        .unwrap();
        assert_eq!(sel.layers, vec![0, 2]);
        let small_cfg = TransformerConfig {
            n_layers: 2,
            ..cfg.clone()
        };
        let (small, _) = shrink(&store, &cfg, &sel, &small_cfg).unwrap();
        let same = |a: &str, b: &str| store.get(a).unwrap().equal(small.get(b).unwrap());
        assert!(same(
            "model.layers.2.self_attn.q_proj.weight",
            "model.layers.1.self_attn.q_proj.weight"
        ));
        assert!(same(
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.0.mlp.up_proj.weight"
        ));
        assert!(same(
            "model.embed_tokens.weight",
            "model.embed_tokens.weight"
        ));
        let err = selection(
            &imp,
            &cfg,
            Shape {
                d_ff: None,
                n_layers: Some(4),
                n_heads: None,
            },
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("--layers"), "{err}");
        // Each kept layer keeps its attention type (a sliding layer stays sliding).
        use crate::models::config::LayerType::{FullAttention, SlidingAttention};
        let windowed = crate::models::LlamaConfig {
            sliding_window: Some(4),
            layer_types: Some(vec![FullAttention, SlidingAttention, SlidingAttention]),
            ..llama_recipe(3, 24)
        };
        let smaller = smaller_model_config(&ModelConfig::Llama(windowed), &cfg, &[0, 2], 24, 4);
        let ModelConfig::Llama(smaller) = smaller else {
            panic!("llama")
        };
        assert_eq!(
            smaller.layer_types,
            Some(vec![FullAttention, SlidingAttention])
        );
    }
}
