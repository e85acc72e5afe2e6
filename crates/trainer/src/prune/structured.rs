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
//! Attention heads are not pruned: the model's head width is d_model / n_heads, so removing heads
//! would need a separate head_dim setting, which the model config does not have yet.

use crate::error::{Error, Result};
use crate::models::params::{copy_named, ParamStore};
use crate::models::transformer::{Family, Transformer, TransformerConfig};
use crate::recipe::ModelConfig;
use tch::{Kind, Tensor};

/// What the smaller model keeps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// MLP channels per layer; None: all.
    pub d_ff: Option<i64>,
    /// Layers; None: all.
    pub n_layers: Option<i64>,
}

/// Importances measured on calibration batches.
#[derive(Debug)]
pub struct Importance {
    /// Per layer, per MLP channel: the L2 norm of its activation over the calibration tokens.
    pub channels: Vec<Tensor>,
    /// Per layer: 1 - mean cosine(input, output) of the block over the calibration tokens.
    pub blocks: Vec<f64>,
}

fn torch_err(e: tch::TchError) -> Error {
    Error::Torch(format!("structured pruning: {e}"))
}

fn is_mlp_out(path: &str) -> bool {
    path.ends_with("mlp.down_proj") || path.ends_with("mlp.c_proj")
}

/// One pass over `calibration` collecting channel and block importances.
pub fn importance(model: &Transformer, calibration: &[Tensor]) -> Result<Importance> {
    if model.config.moe.is_some() {
        return Err(Error::Recipe(
            "--method structured: MoE models are not supported (prune experts' MLPs by hand)"
                .into(),
        ));
    }
    let blocks = model.block_projections();
    let mlp_out: Vec<_> = blocks
        .iter()
        .map(|b| {
            b.iter()
                .copied()
                .find(|l| is_mlp_out(&l.path))
                .expect("every dense block has an MLP output")
        })
        .collect();
    for l in &mlp_out {
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
    let channels = mlp_out
        .iter()
        .map(|l| l.input_sq.borrow_mut().take().expect("set above").sqrt())
        .collect();
    Ok(Importance {
        channels,
        blocks: cos_sum
            .iter()
            .map(|c| 1.0 - c / tokens.max(1) as f64)
            .collect(),
    })
}

/// The layers kept (in order) and, per kept layer, the MLP channels kept (ascending).
pub fn selection(
    imp: &Importance,
    config: &TransformerConfig,
    shape: Shape,
) -> Result<(Vec<i64>, Vec<Tensor>)> {
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
        .map(|&l| {
            let (_, idx) = imp.channels[l as usize]
                .f_sort_stable(true, 0, true)
                .map_err(torch_err)?;
            let (kept, _) = idx.narrow(0, 0, d_ff).f_sort(0, false).map_err(torch_err)?;
            Ok(kept)
        })
        .collect::<Result<_>>()?;
    Ok((layers, channels))
}

/// The recipe's model section with the new depth and MLP width.
pub fn smaller_model_config(cfg: &ModelConfig, n_layers: i64, d_ff: i64) -> ModelConfig {
    let mut out = cfg.clone();
    match &mut out {
        ModelConfig::Llama {
            n_layers: l,
            d_ff: f,
            ..
        } => {
            *l = n_layers;
            *f = d_ff;
        }
        ModelConfig::Gpt2 {
            n_layers: l,
            d_ff: f,
            ..
        } => {
            *l = n_layers;
            *f = Some(d_ff);
        }
    }
    out
}

/// Builds the smaller model and copies the kept weights into it.
pub fn shrink(
    old: &ParamStore,
    config: &TransformerConfig,
    layers: &[i64],
    channels: &[Tensor],
    new_config: &TransformerConfig,
) -> Result<(ParamStore, Transformer)> {
    let prefix = match config.family {
        Family::Llama => "model.layers.",
        Family::Gpt2 => "transformer.h.",
    };
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
        let Some(new_layer) = layers.iter().position(|&l| l == old_layer) else {
            continue; // a dropped layer
        };
        let keep = &channels[new_layer];
        let t = p.tensor.detach();
        // Which dimension of this tensor indexes the MLP channels, if any.
        let channel_dim = match (config.family, field) {
            (Family::Llama, "mlp.gate_proj.weight" | "mlp.up_proj.weight") => Some(0),
            (Family::Llama, "mlp.down_proj.weight") => Some(1),
            // GPT-2's Conv1D stores [in, out].
            (Family::Gpt2, "mlp.c_fc.weight") => Some(1),
            (Family::Gpt2, "mlp.c_fc.bias") => Some(0),
            (Family::Gpt2, "mlp.c_proj.weight") => Some(0),
            _ => None,
        };
        let t = match channel_dim {
            Some(dim) => t
                .f_index_select(dim, &keep.to_device(t.device()))
                .map_err(torch_err)?,
            None => t.shallow_clone(),
        };
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
        TransformerConfig::from_recipe(&ModelConfig::Llama {
            vocab_size: 64,
            d_model: 16,
            n_layers,
            n_heads: 4,
            n_kv_heads: Some(2),
            d_ff,
            max_seq_len: 16,
            rope_theta: 10000.0,
            norm_eps: 1e-6,
            tie_embeddings: false,
            moe: None,
        })
    }

    /// Zeroing the dropped channels of the dense model gives the same function as the smaller
    /// model: the copy puts every kept weight where it belongs.
    #[test]
    fn the_smaller_model_computes_what_the_dense_one_does_without_the_dropped_channels() {
        tch::manual_seed(1);
        let cfg = llama(2, 24);
        let mut store = ParamStore::new(Device::Cpu);
        let dense = Transformer::new(&cfg, &mut store).unwrap();
        let batch = Tensor::randint(64, [2, 8], (Kind::Int64, Device::Cpu));
        let imp = importance(&dense, &[batch.shallow_clone()]).unwrap();
        assert_eq!(imp.channels.len(), 2);
        assert_eq!(imp.blocks.len(), 2);
        let (layers, channels) = selection(
            &imp,
            &cfg,
            Shape {
                d_ff: Some(10),
                n_layers: None,
            },
        )
        .unwrap();
        assert_eq!(layers, vec![0, 1]);
        // The kept channels are the most important ones.
        for (l, kept) in channels.iter().enumerate() {
            let all = &imp.channels[l];
            let min_kept = all.index_select(0, kept).min().double_value(&[]);
            let mask = Tensor::ones([24], (Kind::Bool, Device::Cpu)).index_fill(0, kept, 0);
            let max_dropped = all.masked_select(&mask).max().double_value(&[]);
            assert!(min_kept >= max_dropped);
        }
        let small_cfg = TransformerConfig {
            d_ff: 10,
            ..cfg.clone()
        };
        let (_, small) = shrink(&store, &cfg, &layers, &channels, &small_cfg).unwrap();
        // Zero the dropped channels' down_proj columns in the dense model.
        tch::no_grad(|| {
            for (l, kept) in channels.iter().enumerate() {
                let w = store
                    .get(&format!("model.layers.{l}.mlp.down_proj.weight"))
                    .unwrap();
                let mask = Tensor::ones([24], (Kind::Bool, Device::Cpu)).index_fill(0, kept, 0);
                let _ = w.shallow_clone().masked_fill_(&mask.unsqueeze(0), 0.0);
            }
        });
        let a = dense.forward(&batch, false);
        let b = small.forward(&batch, false);
        assert!(a.allclose(&b, 1e-5, 1e-6, false));
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
        };
        let (layers, channels) = selection(
            &imp,
            &cfg,
            Shape {
                d_ff: None,
                n_layers: Some(2),
            },
        )
        .unwrap();
        assert_eq!(layers, vec![0, 2]);
        let small_cfg = TransformerConfig {
            n_layers: 2,
            ..cfg.clone()
        };
        let (small, _) = shrink(&store, &cfg, &layers, &channels, &small_cfg).unwrap();
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
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("--layers"), "{err}");
    }
}
