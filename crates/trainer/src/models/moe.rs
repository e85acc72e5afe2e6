//! Mixture-of-Experts feed-forward layer: a router picks `top_k` of `n_experts` SwiGLU experts
//! per token and the layer returns their weighted sum (plus an optional always-on shared expert).
//!
//! References:
//! - Mixtral (Jiang et al. 2024, "Mixtral of Experts"); transformers 5.x `modeling_mixtral.py`:
//!   `MixtralTopKRouter` (softmax over all experts in fp32, top-k, renormalise the k weights),
//!   `MixtralExperts` (SwiGLU `down(silu(gate x) * up x)` per expert), `load_balancing_loss_func`.
//! - Switch Transformer (Fedus et al. 2021): top-1 routing weighted by the router probability,
//!   capacity factor with token dropping, the load-balancing loss `E * sum_i f_i * P_i`.
//! - ST-MoE (Zoph et al. 2022): the router z-loss `mean_tokens(logsumexp(logits)^2)`.
//! - GShard (Lepikhin et al. 2020): with top-k and a capacity, first choices of all tokens are
//!   served before second choices.
//! - DeepSeekMoE (Dai et al. 2024) / Qwen-MoE: a shared expert every token passes through.
//!
//! # Parameters and their Hugging Face keys
//!
//! Registered under `prefix`, exactly as transformers 5.24's `MixtralSparseMoeBlock.state_dict()`
//! holds them in memory (prefix `model.layers.{i}.mlp` inside `MixtralForCausalLM`):
//!
//! - `{prefix}.gate.weight` `[E, d_model]`: the router (no bias);
//! - `{prefix}.experts.gate_up_proj` `[E, 2 * d_ff, d_model]`: per expert, the gate projection
//!   (Mixtral's w1) in rows `..d_ff`, then the up projection (w3);
//! - `{prefix}.experts.down_proj` `[E, d_model, d_ff]`: the down projection (w2);
//! - with `shared_expert`: `{prefix}.shared_expert.gate_proj.weight` and `.up_proj.weight`
//!   `[d_ff, d_model]`, `{prefix}.shared_expert.down_proj.weight` `[d_model, d_ff]`.
//!
//! On disk the layout differs. Mixtral checkpoints on the Hub, and what transformers 5.24's own
//! `save_pretrained` writes (it reverses its load-time conversion), are per expert under
//! `model.layers.{i}.block_sparse_moe`:
//! `gate.weight [E, d]`, `experts.{e}.w1.weight [d_ff, d]` (gate), `experts.{e}.w3.weight
//! [d_ff, d]` (up), `experts.{e}.w2.weight [d, d_ff]` (down). transformers maps it on load with
//! `block_sparse_moe -> mlp`, `gate_up_proj = stack_e(cat(w1_e, w3_e))`, `down_proj =
//! stack_e(w2_e)` (`conversion_mapping.py`, "mixtral"); `from_pretrained` accepts the fused
//! layout too. [`fuse_checkpoint_experts`] and [`split_checkpoint_experts`] do the same mapping
//! for our import and export. The shared expert uses Qwen2-MoE's key names, without Qwen's
//! sigmoid `shared_expert_gate` (DeepSeekMoE adds the shared expert as is); Mixtral has none.
//!
//! # What the forward pass computes
//!
//! Routing runs in fp32 whatever the activation dtype. Expert work is batched by expert: the
//! `top_k * tokens` assignments are stably sorted by expert, the tokens are gathered once, each
//! expert runs one matmul pair on its contiguous slice, and one `index_add` scatters the weighted
//! results back. With a capacity (training only), an expert keeps the first `capacity`
//! assignments in slot-major order (every token's first choice, then every second choice, each
//! in token order); a dropped assignment contributes zero, the kept weights are not
//! renormalised, and the residual connection around the layer carries the token on.

use super::params::{Join, ParamStore};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// How router logits become expert choices and combine weights (`routing` in `[model.moe]`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum Routing {
    /// Mixtral: softmax over all experts, keep the top k, renormalise those k to sum to 1. (With `top_k = 1` every weight is 1 and the router learns only through the
    /// aux losses.)
    #[default]
    #[serde(rename = "softmax_top_k")]
    SoftmaxThenTopK,
    /// Top k logits, softmax over those k only (weights sum to 1; same experts as above).
    #[serde(rename = "top_k_softmax")]
    TopKThenSoftmax,
    /// Switch Transformer: top-1, weighted by that expert's probability under the full softmax (not renormalised, so the router gets a gradient). Requires `top_k = 1`.
    #[serde(rename = "switch")]
    Switch,
}

/// `[model.moe]` (and `[init.upcycle]`): every layer's MLP becomes `n_experts` SwiGLU experts of
/// the model's `d_ff` with a router choosing `top_k` per token. One type for the recipe and the
/// layer: `Moe::new` takes the model's widths beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MoeConfig {
    /// Routed experts per layer.
    pub n_experts: i64,
    /// Experts each token is sent to.
    pub top_k: i64,
    #[serde(default)]
    pub routing: Routing,
    /// Per-expert capacity `ceil(capacity_factor * tokens * top_k / n_experts)` in training with
    /// token dropping; absent: no token is dropped. Evaluation never drops (a token's output
    /// must not depend on the rest of the batch).
    #[serde(default)]
    pub capacity_factor: Option<f64>,
    /// Weight of the Switch load-balancing loss added to the training loss
    /// ([`MoeOutput::loss`]).
    #[serde(default = "default_aux_loss_coef")]
    pub aux_loss_coef: f64,
    /// Weight of the ST-MoE router z-loss added to the training loss (`z_loss_coef` in a
    /// recipe).
    #[serde(default, rename = "z_loss_coef")]
    pub router_z_loss_coef: f64,
    /// One always-on SwiGLU expert of size `d_ff` beside the routed ones.
    #[serde(default)]
    pub shared_expert: bool,
}

fn default_aux_loss_coef() -> f64 {
    0.01
}

impl MoeConfig {
    /// Mixtral 8x7B's routing: 8 experts, top-2, softmax-then-top-k, no dropping,
    /// `router_aux_loss_coef = 0.001` (MixtralConfig's default), no z-loss.
    pub fn mixtral() -> MoeConfig {
        MoeConfig {
            n_experts: 8,
            top_k: 2,
            routing: Routing::SoftmaxThenTopK,
            capacity_factor: None,
            aux_loss_coef: 0.001,
            router_z_loss_coef: 0.0,
            shared_expert: false,
        }
    }

    /// Switch Transformer: top-1, capacity factor 1.25, aux coefficient 0.01 (Fedus et al.), and
    /// ST-MoE's z-loss coefficient 0.001.
    pub fn switch(n_experts: i64) -> MoeConfig {
        MoeConfig {
            n_experts,
            top_k: 1,
            routing: Routing::Switch,
            capacity_factor: Some(1.25),
            aux_loss_coef: 0.01,
            router_z_loss_coef: 0.001,
            shared_expert: false,
        }
    }

    /// Checks every range; each message names the field and what was expected.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Recipe(format!("moe: {msg}")));
        if self.n_experts < 1 {
            return bad(format!("n_experts = {} must be at least 1", self.n_experts));
        }
        if self.top_k < 1 || self.top_k > self.n_experts {
            return bad(format!(
                "top_k = {} must be between 1 and n_experts = {}",
                self.top_k, self.n_experts
            ));
        }
        if self.routing == Routing::Switch && self.top_k != 1 {
            return bad(format!(
                "Switch routing is top-1, but top_k = {}",
                self.top_k
            ));
        }
        if let Some(cf) = self.capacity_factor {
            if !(cf.is_finite() && cf > 0.0) {
                return bad(format!("capacity_factor = {cf} must be a positive number"));
            }
        }
        for (name, v) in [
            ("aux_loss_coef", self.aux_loss_coef),
            ("router_z_loss_coef", self.router_z_loss_coef),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(format!("{name} = {v} must be a non-negative number"));
            }
        }
        Ok(())
    }

    /// Slots per expert for `tokens` tokens, or `None` when nothing is dropped.
    pub fn capacity(&self, tokens: i64) -> Option<i64> {
        self.capacity_factor
            .map(|cf| (cf * (tokens * self.top_k) as f64 / self.n_experts as f64).ceil() as i64)
    }
}

/// What one MoE layer returns. The losses are fp32 scalars on the input's device.
pub struct MoeOutput {
    /// `[b, t, d]`, the input's dtype.
    pub out: Tensor,
    /// `aux_loss_coef * aux_loss + router_z_loss_coef * z_loss`: add it to the training loss.
    pub loss: Tensor,
    /// Unweighted Switch load-balancing loss of this layer, `E * sum_i f_i * P_i` with `f_i` the
    /// fraction of tokens whose top k include expert i (before any dropping; `sum_i f_i = k`, as
    /// transformers counts it) and `P_i` the mean router probability. 1 (times k) when balanced.
    pub aux_loss: Tensor,
    /// Unweighted router z-loss, `mean_tokens(logsumexp(logits)^2)`.
    pub z_loss: Tensor,
    /// `[b * t, E]` fp32 router logits, for [`load_balancing_loss`] pooled over layers.
    pub router_logits: Tensor,
    /// `[E]` fp32, detached: the share of the `top_k * tokens` assignments each expert was chosen
    /// for (before dropping); sums to 1.
    pub expert_load: Tensor,
    /// Share of the `top_k * tokens` assignments dropped by the capacity limit (0 without one).
    pub dropped_fraction: f64,
}

/// A dense SwiGLU MLP, `down(silu(gate x) * up x)`; weights `[out, in]` like `torch.nn.Linear`.
struct SwiGlu {
    gate: Tensor, // [d_ff, d]
    up: Tensor,   // [d_ff, d]
    down: Tensor, // [d, d_ff]
}

impl SwiGlu {
    fn forward(&self, x: &Tensor) -> Tensor {
        let no_bias = None::<&Tensor>;
        (x.linear(&self.gate, no_bias).silu() * x.linear(&self.up, no_bias))
            .linear(&self.down, no_bias)
    }
}

pub struct Moe {
    pub config: MoeConfig,
    /// The model's width and each expert's hidden width.
    pub d_model: i64,
    pub d_ff: i64,
    router: Tensor,  // [E, d]
    gate_up: Tensor, // [E, 2 * d_ff, d]
    down: Tensor,    // [E, d, d_ff]
    shared: Option<SwiGlu>,
}

impl Moe {
    /// Validates `config` and registers the layer's parameters in `store` under `prefix` (keys in
    /// the module docs), initialised like transformers' `MixtralPreTrainedModel._init_weights`:
    /// normal(0, 0.02) everywhere. Call `tch::manual_seed` first. `d_model` is the model's width,
    /// `d_ff` each expert's hidden width.
    pub fn new(
        config: &MoeConfig,
        d_model: i64,
        d_ff: i64,
        prefix: &str,
        store: &mut ParamStore,
    ) -> Result<Moe> {
        config.validate()?;
        for (name, v) in [("d_model", d_model), ("d_ff", d_ff)] {
            if v < 1 {
                return Err(Error::Recipe(format!(
                    "moe: {name} = {v} must be at least 1"
                )));
            }
        }
        let (d, f, e) = (d_model, d_ff, config.n_experts);
        let std = 0.02;
        let router = store.normal(&format!("{prefix}.gate.weight"), &[e, d], std);
        let gate_up = store.normal(
            &format!("{prefix}.experts.gate_up_proj"),
            &[e, 2 * f, d],
            std,
        );
        let down = store.normal(&format!("{prefix}.experts.down_proj"), &[e, d, f], std);
        let shared = config.shared_expert.then(|| {
            let p = format!("{prefix}.shared_expert");
            SwiGlu {
                gate: store.normal(&format!("{p}.gate_proj.weight"), &[f, d], std),
                up: store.normal(&format!("{p}.up_proj.weight"), &[f, d], std),
                down: store.normal(&format!("{p}.down_proj.weight"), &[d, f], std),
            }
        });
        Ok(Moe {
            config: config.clone(),
            d_model,
            d_ff,
            router,
            gate_up,
            down,
            shared,
        })
    }

    /// Combine weights `[n, k]` (fp32) and chosen experts `[n, k]` (int64) for fp32 router
    /// `logits` and their softmax `probs`, both `[n, E]`.
    fn route(&self, logits: &Tensor, probs: &Tensor) -> (Tensor, Tensor) {
        let k = self.config.top_k;
        match self.config.routing {
            Routing::SoftmaxThenTopK => {
                let (top, idx) = probs.topk(k, -1, true, true); // [n, k]
                let sum = top.sum_dim_intlist(-1, true, Kind::Float);
                (top / sum, idx)
            }
            Routing::TopKThenSoftmax => {
                let (top, idx) = logits.topk(k, -1, true, true); // [n, k]
                (top.softmax(-1, Kind::Float), idx)
            }
            Routing::Switch => probs.topk(1, -1, true, true), // [n, 1]
        }
    }

    /// `x` is `[b, t, d]` (any leading dims work). `train` enables capacity dropping.
    pub fn forward(&self, x: &Tensor, train: bool) -> MoeOutput {
        let c = &self.config;
        let (d, f, e, k) = (self.d_model, self.d_ff, c.n_experts, c.top_k);
        let (kind, device) = (x.kind(), x.device());
        let xf = x.reshape([-1, d]); // [n, d]
        let n = xf.size()[0];

        // Router, in fp32 (ST-MoE: routing in low precision is unstable).
        let logits = xf
            .linear(&self.router, None::<&Tensor>)
            .to_kind(Kind::Float); // [n, E]
        let probs = logits.softmax(-1, Kind::Float); // [n, E]
        let (weights, experts) = self.route(&logits, &probs); // [n, k], [n, k]

        // Assignments in slot-major order (all first choices, then all second choices, ...):
        // that order is the capacity priority and, after a stable sort, the order inside each
        // expert's group.
        let expert_of = experts.tr().reshape([-1]); // [k*n]
        let weight_of = weights.tr().reshape([-1]); // [k*n]
        let token_of = Tensor::arange(n, (Kind::Int64, device)).repeat([k]); // [k*n]
        let counts = expert_of.bincount(None::<&Tensor>, e); // [E] assignments per expert
        let counts_host = to_vec_i64(&counts);
        let order = expert_of.argsort_stable(true, 0, false); // [k*n], grouped by expert

        let capacity = if train { c.capacity(n) } else { None };
        let (order, kept) = match capacity {
            None => (order, counts_host.clone()),
            Some(cap) => {
                // Position of each sorted assignment inside its expert's group.
                let group_start = counts.cumsum(0, Kind::Int64) - &counts; // [E]
                let sorted_expert = expert_of.index_select(0, &order);
                let pos = Tensor::arange(k * n, (Kind::Int64, device))
                    - group_start.index_select(0, &sorted_expert); // [k*n]
                let keep = pos.lt(cap).nonzero().squeeze_dim(1); // [m]
                let kept = counts_host.iter().map(|&cnt| cnt.min(cap)).collect();
                (order.index_select(0, &keep), kept)
            }
        };
        let assigned: i64 = counts_host.iter().sum();
        let dropped = assigned - kept.iter().sum::<i64>();
        let dropped_fraction = if assigned > 0 {
            dropped as f64 / assigned as f64
        } else {
            0.0
        };

        // One gather, one contiguous slice per expert, one scatter.
        let tokens = token_of.index_select(0, &order); // [m]
        let xs = xf.index_select(0, &tokens); // [m, d], grouped by expert
        let mut ys = Vec::with_capacity(e as usize);
        let mut start = 0;
        for (i, &cnt) in kept.iter().enumerate() {
            if cnt == 0 {
                continue;
            }
            let xe = xs.narrow(0, start, cnt); // [cnt, d]
            let gu = xe.linear(&self.gate_up.get(i as i64), None::<&Tensor>); // [cnt, 2f]
            let h = gu.narrow(1, 0, f).silu() * gu.narrow(1, f, f); // [cnt, f]
            ys.push(h.linear(&self.down.get(i as i64), None::<&Tensor>)); // [cnt, d]
            start += cnt;
        }
        let mut out = Tensor::zeros([n, d], (kind, device));
        if !ys.is_empty() {
            let w = weight_of.index_select(0, &order).to_kind(kind).unsqueeze(1); // [m, 1]
            out = out.index_add(0, &tokens, &(Tensor::cat(&ys, 0) * w));
        }
        let out = match &self.shared {
            Some(shared) => out + shared.forward(&xf), // [n, d]
            None => out,
        };

        // Losses over this layer's tokens, from the router's choices before dropping.
        let frac_tokens = counts.to_kind(Kind::Float) / n as f64; // [E], sums to k
        let mean_prob = probs.mean_dim(0, false, Kind::Float); // [E]
        let aux_loss = (frac_tokens * mean_prob).sum(Kind::Float) * e as f64;
        let z_loss = logits.logsumexp([-1], false).square().mean(Kind::Float);
        let loss = &aux_loss * c.aux_loss_coef + &z_loss * c.router_z_loss_coef;
        let expert_load = counts.to_kind(Kind::Float) / (n * k).max(1) as f64;

        MoeOutput {
            out: out.reshape(x.size()),
            loss,
            aux_loss,
            z_loss,
            router_logits: logits,
            expert_load,
            dropped_fraction,
        }
    }

    /// Sparse upcycling (Komatsuzaki et al. 2023): every expert becomes a copy of a dense SwiGLU
    /// MLP (`gate_proj`/`up_proj` `[d_ff, d]`, `down_proj` `[d, d_ff]`, Llama's `mlp.*.weight`).
    /// The router and shared expert are left as they are. With weights that sum to 1 (every
    /// routing but Switch, no dropping) and no shared expert, the layer then equals the dense MLP.
    pub fn upcycle_from_dense(
        &self,
        gate_proj: &Tensor,
        up_proj: &Tensor,
        down_proj: &Tensor,
        source: &Path,
    ) -> Result<()> {
        let (d, f) = (self.d_model, self.d_ff);
        for (name, t, want) in [
            ("gate_proj", gate_proj, [f, d]),
            ("up_proj", up_proj, [f, d]),
            ("down_proj", down_proj, [d, f]),
        ] {
            if t.size() != want {
                return Err(Error::Checkpoint {
                    path: source.to_path_buf(),
                    msg: format!(
                        "dense mlp {name} has shape {:?} but the MoE experts need {want:?}",
                        t.size()
                    ),
                });
            }
        }
        tch::no_grad(|| -> Result<()> {
            let dev = self.gate_up.device();
            let gate_up = Tensor::f_cat(&[gate_proj, up_proj], 0)?.f_to_device(dev)?; // [2f, d]
            let down = down_proj.f_to_device(dev)?;
            for i in 0..self.config.n_experts {
                self.gate_up.get(i).f_copy_(&gate_up)?;
                self.down.get(i).f_copy_(&down)?;
            }
            Ok(())
        })
    }
}

/// transformers' `load_balancing_loss_func` (Mixtral) for router logits of several layers,
/// each `[tokens, E]`: the token fractions and mean probabilities are pooled over all layers
/// first, then `E * sum_i f_i * P_i`. That is what `MixtralForCausalLM` adds to its loss (times
/// `router_aux_loss_coef`); it is not the mean of the per-layer [`MoeOutput::aux_loss`] (for one
/// layer it is the same).
pub fn load_balancing_loss(router_logits: &[&Tensor], n_experts: i64, top_k: i64) -> Tensor {
    let Some(first) = router_logits.first() else {
        return Tensor::zeros([], (Kind::Float, Device::Cpu));
    };
    let device = first.device();
    let mut counts = Tensor::zeros([n_experts], (Kind::Float, device));
    let mut prob_sum = Tensor::zeros([n_experts], (Kind::Float, device));
    let mut rows = 0;
    for logits in router_logits {
        let probs = logits.to_kind(Kind::Float).softmax(-1, Kind::Float); // [n, E]
        let (_, chosen) = probs.topk(top_k, -1, true, true); // [n, k]
        counts += chosen
            .reshape([-1])
            .bincount(None::<&Tensor>, n_experts)
            .to_kind(Kind::Float);
        prob_sum += probs.sum_dim_intlist(0, false, Kind::Float);
        rows += probs.size()[0];
    }
    let rows = rows.max(1) as f64;
    (counts / rows * (prob_sum / rows)).sum(Kind::Float) * n_experts as f64
}

/// Checkpoint (per-expert, on-disk) layout to ours (fused): takes `{legacy}.gate.weight` and
/// `{legacy}.experts.{e}.w{1,2,3}.weight` for `e < n_experts` out of `tensors` and inserts
/// `{fused}.gate.weight`, `{fused}.experts.gate_up_proj`, `{fused}.experts.down_proj`. For
/// Mixtral, `legacy = model.layers.{i}.block_sparse_moe`, `fused = model.layers.{i}.mlp`.
/// A missing key or inconsistent shape is an error naming it; `path` is the file, for messages.
/// Tensors are joined at once; mapped ones (`mapped::Stored`) become a plan of copies, so that
/// loading fills the fused parameters straight from the files.
pub fn fuse_checkpoint_experts<T: Join>(
    tensors: &mut BTreeMap<String, T>,
    legacy: &str,
    fused: &str,
    n_experts: i64,
    path: &Path,
) -> Result<()> {
    let err = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let mut take = |key: String| {
        tensors
            .remove(&key)
            .ok_or_else(|| err(format!("missing tensor {key}")))
    };
    let router = take(format!("{legacy}.gate.weight"))?;
    let (mut gate_up, mut down) = (Vec::new(), Vec::new());
    let mut first_shapes: Option<(Vec<i64>, Vec<i64>)> = None;
    for e in 0..n_experts {
        let p = format!("{legacy}.experts.{e}");
        let (w1, w3, w2) = (
            take(format!("{p}.w1.weight"))?,
            take(format!("{p}.w3.weight"))?,
            take(format!("{p}.w2.weight"))?,
        );
        let (s1, s3, s2) = (w1.size(), w3.size(), w2.size());
        let consistent = s1.len() == 2 && s1 == s3 && s2 == [s1[1], s1[0]];
        let (want1, want2) = first_shapes
            .get_or_insert_with(|| (s1.clone(), s2.clone()))
            .clone();
        if !consistent || s1 != want1 || s2 != want2 {
            return Err(err(format!(
                "expert {e} under {legacy}: w1 {s1:?}, w3 {s3:?}, w2 {s2:?}; expected w1 = w3 = \
                 [d_ff, d_model] and w2 = [d_model, d_ff], the same for every expert"
            )));
        }
        gate_up.push(T::cat(vec![w1, w3])?); // [2f, d]
        down.push(w2); // [d, f]
    }
    let fused_gate_up = T::stack(gate_up)?; // [E, 2f, d]
    let fused_down = T::stack(down)?; // [E, d, f]
    tensors.insert(format!("{fused}.gate.weight"), router);
    tensors.insert(format!("{fused}.experts.gate_up_proj"), fused_gate_up);
    tensors.insert(format!("{fused}.experts.down_proj"), fused_down);
    Ok(())
}

/// The reverse of [`fuse_checkpoint_experts`], for export: ours (fused) to the per-expert layout
/// transformers' `save_pretrained` writes. `n_experts` and `d_ff` come from the tensors.
pub fn split_checkpoint_experts(
    tensors: &mut BTreeMap<String, Tensor>,
    fused: &str,
    legacy: &str,
    path: &Path,
) -> Result<()> {
    let err = |msg: String| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    };
    let mut take = |key: String| {
        tensors
            .remove(&key)
            .ok_or_else(|| err(format!("missing tensor {key}")))
    };
    let router = take(format!("{fused}.gate.weight"))?;
    let gate_up = take(format!("{fused}.experts.gate_up_proj"))?; // [E, 2f, d]
    let down = take(format!("{fused}.experts.down_proj"))?; // [E, d, f]
    let (gu, dn) = (gate_up.size(), down.size());
    if gu.len() != 3 || dn.len() != 3 || gu[1] % 2 != 0 || dn != [gu[0], gu[2], gu[1] / 2] {
        return Err(err(format!(
            "{fused}.experts: gate_up_proj {gu:?} and down_proj {dn:?} do not fit \
             [E, 2 * d_ff, d_model] and [E, d_model, d_ff]"
        )));
    }
    let f = gu[1] / 2;
    tensors.insert(format!("{legacy}.gate.weight"), router);
    for e in 0..gu[0] {
        let p = format!("{legacy}.experts.{e}");
        let ge = gate_up.get(e);
        tensors.insert(format!("{p}.w1.weight"), ge.narrow(0, 0, f).contiguous());
        tensors.insert(format!("{p}.w3.weight"), ge.narrow(0, f, f).contiguous());
        tensors.insert(format!("{p}.w2.weight"), down.get(e).contiguous());
    }
    Ok(())
}

fn to_vec_i64(t: &Tensor) -> Vec<i64> {
    let t = t.to_device(Device::Cpu).to_kind(Kind::Int64).contiguous();
    let n = t.numel();
    let mut v = vec![0i64; n];
    t.copy_data(&mut v, n);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The widths of every test layer.
    const D_MODEL: i64 = 8;
    const D_FF: i64 = 12;

    fn config(n_experts: i64, top_k: i64, routing: Routing) -> MoeConfig {
        MoeConfig {
            n_experts,
            top_k,
            routing,
            capacity_factor: None,
            aux_loss_coef: 0.01,
            router_z_loss_coef: 0.001,
            shared_expert: false,
        }
    }

    /// A layer with weights large enough that routing is decisive (no near-ties) and outputs are
    /// O(1).
    fn build(c: &MoeConfig, seed: i64) -> (Moe, ParamStore) {
        tch::manual_seed(seed);
        let mut store = ParamStore::new(Device::Cpu);
        let moe = Moe::new(c, D_MODEL, D_FF, "moe", &mut store).expect("valid config");
        tch::no_grad(|| {
            for p in store.iter() {
                let _ = p.tensor.shallow_clone().normal_(0.0, 0.5);
            }
        });
        (moe, store)
    }

    fn input(b: i64, t: i64, d: i64, seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn([b, t, d], (Kind::Float, Device::Cpu))
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    fn swiglu(x: &Tensor, gate: &Tensor, up: &Tensor, down: &Tensor) -> Tensor {
        SwiGlu {
            gate: gate.shallow_clone(),
            up: up.shallow_clone(),
            down: down.shallow_clone(),
        }
        .forward(x)
    }

    /// Loop-per-token reference: out[n] = sum_j w[n, j] * expert_{idx[n, j]}(x[n]).
    fn naive(moe: &Moe, x: &Tensor, keep: impl Fn(i64, i64) -> bool) -> Tensor {
        let c = &moe.config;
        let xf = x.reshape([-1, moe.d_model]);
        let logits = xf.linear(&moe.router, None::<&Tensor>);
        let probs = logits.softmax(-1, Kind::Float);
        let (w, idx) = moe.route(&logits, &probs);
        let f = moe.d_ff;
        let rows: Vec<Tensor> = (0..xf.size()[0])
            .map(|t| {
                let mut acc = Tensor::zeros([moe.d_model], (Kind::Float, Device::Cpu));
                for j in 0..c.top_k {
                    if !keep(t, j) {
                        continue;
                    }
                    let e = idx.int64_value(&[t, j]);
                    let gu = moe.gate_up.get(e);
                    let y = swiglu(
                        &xf.get(t),
                        &gu.narrow(0, 0, f),
                        &gu.narrow(0, f, f),
                        &moe.down.get(e),
                    );
                    acc += y * w.double_value(&[t, j]);
                }
                acc
            })
            .collect();
        Tensor::stack(&rows, 0).reshape(x.size())
    }

    #[test]
    fn validate_rejects_bad_ranges() {
        let msg = |c: MoeConfig| c.validate().expect_err("invalid").to_string();
        assert_eq!(
            msg(MoeConfig {
                top_k: 3,
                ..config(2, 1, Routing::SoftmaxThenTopK)
            }),
            "moe: top_k = 3 must be between 1 and n_experts = 2"
        );
        assert_eq!(
            msg(config(4, 2, Routing::Switch)),
            "moe: Switch routing is top-1, but top_k = 2"
        );
        assert_eq!(
            msg(MoeConfig {
                capacity_factor: Some(0.0),
                ..config(4, 1, Routing::Switch)
            }),
            "moe: capacity_factor = 0 must be a positive number"
        );
        assert_eq!(
            msg(MoeConfig {
                aux_loss_coef: -1.0,
                ..config(4, 1, Routing::Switch)
            }),
            "moe: aux_loss_coef = -1 must be a non-negative number"
        );
        MoeConfig::mixtral().validate().expect("mixtral preset");
        MoeConfig::switch(4).validate().expect("switch preset");
    }

    #[test]
    fn parameter_keys_and_shapes() {
        let c = MoeConfig {
            shared_expert: true,
            ..config(4, 2, Routing::SoftmaxThenTopK)
        };
        let mut store = ParamStore::new(Device::Cpu);
        Moe::new(&c, D_MODEL, D_FF, "model.layers.0.mlp", &mut store).expect("valid");
        let got: Vec<(String, Vec<i64>)> = store
            .iter()
            .map(|p| (p.name.clone(), p.tensor.size()))
            .collect();
        let p = "model.layers.0.mlp";
        let want = vec![
            (format!("{p}.gate.weight"), vec![4, 8]),
            (format!("{p}.experts.gate_up_proj"), vec![4, 24, 8]),
            (format!("{p}.experts.down_proj"), vec![4, 8, 12]),
            (format!("{p}.shared_expert.gate_proj.weight"), vec![12, 8]),
            (format!("{p}.shared_expert.up_proj.weight"), vec![12, 8]),
            (format!("{p}.shared_expert.down_proj.weight"), vec![8, 12]),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn batched_forward_matches_per_token_loop() {
        for (routing, k) in [
            (Routing::SoftmaxThenTopK, 2),
            (Routing::TopKThenSoftmax, 3),
            (Routing::Switch, 1),
        ] {
            let (moe, _s) = build(&config(5, k, routing), 1);
            let x = input(2, 5, 8, 2);
            let out = moe.forward(&x, true).out;
            let want = naive(&moe, &x, |_, _| true);
            assert!(max_abs_diff(&out, &want) < 1e-5, "{routing:?}");
        }
    }

    #[test]
    fn routing_weights() {
        let x = input(2, 5, 8, 3);
        let xf = x.reshape([-1, 8]);
        for (routing, k) in [(Routing::SoftmaxThenTopK, 2), (Routing::TopKThenSoftmax, 3)] {
            let (moe, _s) = build(&config(6, k, routing), 4);
            let logits = xf.linear(&moe.router, None::<&Tensor>);
            let probs = logits.softmax(-1, Kind::Float);
            let (w, idx) = moe.route(&logits, &probs);
            assert_eq!(w.size(), [10, k]);
            let sums = w.sum_dim_intlist(-1, false, Kind::Float);
            assert!(max_abs_diff(&sums, &Tensor::ones([10], (Kind::Float, Device::Cpu))) < 1e-6);
            // The chosen experts are the k largest logits, and the weights are the softmax of
            // those logits (which is also the renormalised top-k probabilities).
            let top = logits.topk(k, -1, true, true);
            assert!(idx.equal(&top.1), "{routing:?}");
            assert!(max_abs_diff(&w, &top.0.softmax(-1, Kind::Float)) < 1e-6);
        }
        // Switch: top-1, weight = the full-softmax probability of the argmax expert.
        let (moe, _s) = build(&config(4, 1, Routing::Switch), 5);
        let logits = xf.linear(&moe.router, None::<&Tensor>);
        let probs = logits.softmax(-1, Kind::Float);
        let (w, idx) = moe.route(&logits, &probs);
        assert!(idx.squeeze_dim(1).equal(&logits.argmax(-1, false)));
        let (pmax, _) = probs.max_dim(-1, false);
        assert!(max_abs_diff(&w.squeeze_dim(1), &pmax) < 1e-7);
        assert!(
            w.lt(1.0).all().int64_value(&[]) == 1,
            "Switch weights are not renormalised"
        );
        let out = moe.forward(&x, false);
        assert!(max_abs_diff(&out.out, &naive(&moe, &x, |_, _| true)) < 1e-5);
    }

    #[test]
    fn capacity_drops_overflow_and_no_drop_keeps_all() {
        // Every token prefers expert 0, then expert 1: with 4 experts, top-2 and capacity
        // factor 1, capacity = ceil(10 * 2 / 4) = 5, so each of experts 0 and 1 keeps 5 of its 10
        // assignments (tokens 0..5, in order) and half of all assignments are dropped.
        let c = MoeConfig {
            capacity_factor: Some(1.0),
            ..config(4, 2, Routing::SoftmaxThenTopK)
        };
        let (moe, _s) = build(&c, 6);
        tch::no_grad(|| {
            let mut r = moe.router.shallow_clone();
            let _ = r.zero_();
            let _ = r.get(0).fill_(1.0);
            let _ = r.get(1).fill_(0.5);
        });
        let x = input(2, 5, 8, 7).abs() + 0.1; // positive, so logit 0 > logit 1 > 0 = the rest
        assert_eq!(c.capacity(10), Some(5));
        let out = moe.forward(&x, true);
        assert_eq!(out.dropped_fraction, 0.5);
        assert!(max_abs_diff(&out.out, &naive(&moe, &x, |t, _| t < 5)) < 1e-5);
        let load = Tensor::from_slice(&[0.5f32, 0.5, 0.0, 0.0]);
        assert!(max_abs_diff(&out.expert_load, &load) < 1e-7);
        // Evaluation and capacity_factor = None keep every token.
        let all = naive(&moe, &x, |_, _| true);
        let eval = moe.forward(&x, false);
        assert_eq!(eval.dropped_fraction, 0.0);
        assert!(max_abs_diff(&eval.out, &all) < 1e-5);
        let no_drop = Moe {
            config: MoeConfig {
                capacity_factor: None,
                ..c.clone()
            },
            ..moe
        };
        let train = no_drop.forward(&x, true);
        assert_eq!(train.dropped_fraction, 0.0);
        assert!(max_abs_diff(&train.out, &all) < 1e-5);

        // Random routing: the dropped fraction is sum_e max(count_e - capacity, 0) / (k * n),
        // and first choices are served before second choices.
        let c = MoeConfig {
            capacity_factor: Some(0.75),
            ..config(4, 2, Routing::SoftmaxThenTopK)
        };
        let (moe, _s) = build(&c, 8);
        let x = input(3, 8, 8, 9);
        let n = 24;
        let cap = c.capacity(n).expect("capacity");
        assert_eq!(cap, 9);
        let xf = x.reshape([-1, 8]);
        let logits = xf.linear(&moe.router, None::<&Tensor>);
        let (_, idx) = moe.route(&logits, &logits.softmax(-1, Kind::Float));
        let mut used = [0i64; 4];
        let mut kept = vec![[false; 2]; n as usize];
        for j in 0..2 {
            for t in 0..n {
                let e = idx.int64_value(&[t, j]) as usize;
                kept[t as usize][j as usize] = used[e] < cap;
                used[e] += 1;
            }
        }
        let dropped: i64 = used.iter().map(|&u| (u - cap).max(0)).sum();
        assert!(dropped > 0, "the test should overflow some expert");
        let out = moe.forward(&x, true);
        assert_eq!(out.dropped_fraction, dropped as f64 / (2 * n) as f64);
        let want = naive(&moe, &x, |t, j| kept[t as usize][j as usize]);
        assert!(max_abs_diff(&out.out, &want) < 1e-5);
    }

    #[test]
    fn aux_and_z_loss_formulas() {
        let c = config(4, 2, Routing::SoftmaxThenTopK);
        let (moe, _s) = build(&c, 10);
        let x = input(2, 5, 8, 11);
        let out = moe.forward(&x, true);
        let logits = x.reshape([-1, 8]).linear(&moe.router, None::<&Tensor>);
        assert!(max_abs_diff(&out.router_logits, &logits) < 1e-6);
        // z-loss: mean over tokens of logsumexp^2, written out with exp and log.
        let lse = logits.exp().sum_dim_intlist(-1, false, Kind::Float).log();
        let z = lse.square().mean(Kind::Float).double_value(&[]);
        assert!((out.z_loss.double_value(&[]) - z).abs() < 1e-6 * z.abs().max(1.0));
        // aux: E * sum_i f_i P_i with f_i counted over all top-k slots.
        let probs = logits.softmax(-1, Kind::Float);
        let (_, idx) = probs.topk(2, -1, true, true);
        let mut f = [0f64; 4];
        for t in 0..10 {
            for j in 0..2 {
                f[idx.int64_value(&[t, j]) as usize] += 0.1;
            }
        }
        let p = probs.mean_dim(0, false, Kind::Float);
        let aux: f64 = (0..4)
            .map(|i| f[i] * p.double_value(&[i as i64]))
            .sum::<f64>()
            * 4.0;
        assert!((out.aux_loss.double_value(&[]) - aux).abs() < 1e-6);
        let loss = 0.01 * aux + 0.001 * z;
        assert!((out.loss.double_value(&[]) - loss).abs() < 1e-7);
        let one_layer = load_balancing_loss(&[&out.router_logits], 4, 2);
        assert!(max_abs_diff(&one_layer, &out.aux_loss) < 1e-7);
        let sum_load = out.expert_load.sum(Kind::Float).double_value(&[]);
        assert!((sum_load - 1.0).abs() < 1e-6);
    }

    #[test]
    fn gradient_reaches_router_and_experts() {
        for routing in [
            Routing::SoftmaxThenTopK,
            Routing::TopKThenSoftmax,
            Routing::Switch,
        ] {
            let k = if routing == Routing::Switch { 1 } else { 2 };
            let c = MoeConfig {
                shared_expert: true,
                ..config(4, k, routing)
            };
            let (moe, store) = build(&c, 12);
            let x = input(2, 5, 8, 13);
            // Output only: the router learns through the combine weights.
            moe.forward(&x, true)
                .out
                .square()
                .sum(Kind::Float)
                .backward();
            for p in store.iter() {
                let g = p.tensor.grad();
                assert!(g.defined(), "{routing:?}: no gradient for {}", p.name);
                assert!(
                    g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                    "{routing:?}: {}",
                    p.name
                );
            }
            // The aux and z losses alone reach the router.
            let mut store = store;
            store.zero_grad();
            moe.forward(&x, true).loss.backward();
            let g = moe.router.grad();
            assert!(
                g.abs().sum(Kind::Float).double_value(&[]) > 0.0,
                "{routing:?}: aux/z"
            );
        }
    }

    #[test]
    fn identical_experts_equal_the_dense_mlp() {
        // Sparse upcycling: with every expert a copy of one dense SwiGLU and combine weights
        // summing to 1, any router gives the dense MLP's output.
        for (routing, k) in [
            (Routing::SoftmaxThenTopK, 2),
            (Routing::TopKThenSoftmax, 3),
            (Routing::SoftmaxThenTopK, 1),
        ] {
            let c = config(6, k, routing);
            let (moe, _s) = build(&c, 14);
            tch::manual_seed(15);
            let gate = Tensor::randn([12, 8], (Kind::Float, Device::Cpu)) * 0.3;
            let up = Tensor::randn([12, 8], (Kind::Float, Device::Cpu)) * 0.3;
            let down = Tensor::randn([8, 12], (Kind::Float, Device::Cpu)) * 0.3;
            moe.upcycle_from_dense(&gate, &up, &down, Path::new("dense"))
                .expect("shapes fit");
            let x = input(2, 5, 8, 16);
            let dense = swiglu(&x, &gate, &up, &down);
            let out = moe.forward(&x, true);
            assert!(max_abs_diff(&out.out, &dense) < 1e-5, "{routing:?} k={k}");
        }
        let (moe, _s) = build(&config(2, 1, Routing::Switch), 17);
        let bad = Tensor::zeros([12, 9], (Kind::Float, Device::Cpu));
        let ok = Tensor::zeros([12, 8], (Kind::Float, Device::Cpu));
        let err = moe
            .upcycle_from_dense(&bad, &ok, &ok.tr(), Path::new("dense.safetensors"))
            .expect_err("wrong shape");
        assert_eq!(
            err.to_string(),
            "checkpoint dense.safetensors: dense mlp gate_proj has shape [12, 9] but the MoE \
             experts need [12, 8]"
        );
    }

    #[test]
    fn shared_expert_is_added_to_every_token() {
        let c = config(4, 2, Routing::SoftmaxThenTopK);
        let (plain, _s1) = build(&c, 18);
        let (with_shared, s2) = build(
            &MoeConfig {
                shared_expert: true,
                ..c
            },
            18,
        );
        // Give both layers the same router and routed experts.
        tch::no_grad(|| {
            for (a, b) in [
                (&with_shared.router, &plain.router),
                (&with_shared.gate_up, &plain.gate_up),
                (&with_shared.down, &plain.down),
            ] {
                a.shallow_clone().copy_(b);
            }
        });
        let x = input(2, 5, 8, 19);
        let get = |n: &str| {
            s2.get(&format!("moe.shared_expert.{n}.weight"))
                .expect("key")
                .shallow_clone()
        };
        let shared = swiglu(&x, &get("gate_proj"), &get("up_proj"), &get("down_proj"));
        let diff = with_shared.forward(&x, true).out - plain.forward(&x, true).out;
        assert!(max_abs_diff(&diff, &shared) < 1e-5);
    }

    #[test]
    fn checkpoint_layout_round_trip() {
        tch::manual_seed(20);
        let mut legacy = BTreeMap::new();
        let lp = "model.layers.0.block_sparse_moe";
        legacy.insert(
            format!("{lp}.gate.weight"),
            Tensor::randn([3, 8], (Kind::Float, Device::Cpu)),
        );
        for e in 0..3 {
            for (w, shape) in [("w1", [12, 8]), ("w3", [12, 8]), ("w2", [8, 12])] {
                let t = Tensor::randn(shape, (Kind::Float, Device::Cpu));
                legacy.insert(format!("{lp}.experts.{e}.{w}.weight"), t);
            }
        }
        let fp = "model.layers.0.mlp";
        let mut tensors: BTreeMap<String, Tensor> = legacy
            .iter()
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        let path = Path::new("model.safetensors");
        fuse_checkpoint_experts(&mut tensors, lp, fp, 3, path).expect("fuse");
        assert_eq!(
            tensors.keys().cloned().collect::<Vec<_>>(),
            [
                ".experts.down_proj",
                ".experts.gate_up_proj",
                ".gate.weight"
            ]
            .map(|s| format!("{fp}{s}"))
        );
        let gu = &tensors[&format!("{fp}.experts.gate_up_proj")];
        assert!(gu
            .get(1)
            .narrow(0, 12, 12)
            .equal(&legacy[&format!("{lp}.experts.1.w3.weight")]));
        split_checkpoint_experts(&mut tensors, fp, lp, path).expect("split");
        assert_eq!(tensors.len(), legacy.len());
        for (k, v) in &legacy {
            assert!(tensors[k].equal(v), "{k}");
        }
        tensors.remove(&format!("{lp}.experts.2.w3.weight"));
        let err = fuse_checkpoint_experts(&mut tensors, lp, fp, 3, path).expect_err("missing");
        assert_eq!(
            err.to_string(),
            "checkpoint model.safetensors: missing tensor \
             model.layers.0.block_sparse_moe.experts.2.w3.weight"
        );
    }
}
