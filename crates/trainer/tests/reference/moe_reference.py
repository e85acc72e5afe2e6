#!/usr/bin/env python3
"""Reference outputs of transformers' Mixtral MoE block for tests/moe_parity.rs.

Usage: moe_reference.py OUT_DIR

For each case in CASES, builds a one-layer `MixtralForCausalLM` from a `MixtralConfig` (nothing
is downloaded), fp32, eval mode, router_jitter_noise 0, and takes its MoE block
`model.model.layers[0].mlp` (a `MixtralSparseMoeBlock`: `MixtralTopKRouter` + `MixtralExperts`).
The block's weights are redrawn from N(0, 0.3^2) (seed 0) so that routing is decisive: the
script checks that the k-th and (k+1)-th router probabilities of every token differ by more than
1e-4, so float rounding cannot flip an expert choice. Writes to OUT_DIR/CASE/:

- moe.safetensors: the block's parameters as `MixtralForCausalLM.state_dict()` holds them in
  memory, under `model.layers.0.mlp.` (transformers 5.x fused layout: `gate.weight`,
  `experts.gate_up_proj`, `experts.down_proj`).
- checkpoint.safetensors: the same block as `save_pretrained` writes it to disk (transformers
  reverses its load-time conversion: `model.layers.0.block_sparse_moe.experts.{e}.w{1,2,3}.weight`),
  taken from a real `save_pretrained` of the one-layer model.
- case.json: the config in our `MoeConfig` field names, the state-dict keys with shapes, and
  provenance (versions, seed).
- reference.safetensors:
    x              [2, 5, d]  fp32 input, N(0, 1)
    out            [2, 5, d]  `block(x)`
    router_logits  [10, E]    `block.gate(x.view(-1, d))[0]`
    aux_loss       []         `mixtral.load_balancing_loss_func((router_logits,), E, k)`
    x2, router_logits2        a second input and its router logits
    aux_loss_pooled []        `load_balancing_loss_func((router_logits, router_logits2), E, k)`,
                              what `MixtralForCausalLM` computes over two layers
    z_loss         []         `switch_transformers.router_z_loss_func(router_logits[None])`
    switch_aux_loss []        `switch_transformers.load_balancing_loss_func(
                                  softmax(router_logits)[None], argmax(router_logits)[None])`:
                              the top-1 (Switch) loss on the same logits, one group

Exit status 3 with a message on stderr when torch, transformers or safetensors is missing.
"""

import json
import os
import sys
import tempfile

try:
    import safetensors
    import torch
    import transformers
    from safetensors.torch import load_file, save_file
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.models.mixtral import modeling_mixtral
    from transformers.models.switch_transformers import modeling_switch_transformers
except ImportError as e:
    print(f"missing Python package: {e}. Run scripts/test, which installs them.", file=sys.stderr)
    sys.exit(3)

SEED = 0
BATCH, SEQ = 2, 5
WEIGHT_STD = 0.3

# name: (d_model, d_ff, n_experts, top_k); mirrored by `config()` in tests/moe_parity.rs.
CASES = {
    "e4_k2": (16, 24, 4, 2),
    "e6_k3": (24, 20, 6, 3),
}


def run_case(out_dir, name, d, f, e, k):
    torch.manual_seed(SEED)
    cfg = MixtralConfig(
        vocab_size=16, hidden_size=d, intermediate_size=f, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=e,
        num_experts_per_tok=k, router_jitter_noise=0.0, output_router_logits=False,
    )
    model = MixtralForCausalLM(cfg).float().eval()
    block = model.model.layers[0].mlp
    assert type(block).__name__ == "MixtralSparseMoeBlock", type(block)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, WEIGHT_STD)

    x = torch.randn(BATCH, SEQ, d)
    x2 = torch.randn(BATCH, SEQ, d)
    with torch.no_grad():
        out = block(x)
        logits = block.gate(x.reshape(-1, d))[0]
        logits2 = block.gate(x2.reshape(-1, d))[0]
    for lg in (logits, logits2):
        top = torch.softmax(lg.float(), -1).topk(k + 1 if k < e else k, dim=-1).values
        if k < e:
            gap = (top[:, k - 1] - top[:, k]).min().item()
            assert gap > 1e-4, f"{name}: near-tie in routing (gap {gap}); change the seed"

    aux = modeling_mixtral.load_balancing_loss_func((logits,), e, k)
    aux_pooled = modeling_mixtral.load_balancing_loss_func((logits, logits2), e, k)
    z = modeling_switch_transformers.router_z_loss_func(logits[None])
    switch_aux = modeling_switch_transformers.load_balancing_loss_func(
        torch.softmax(logits, -1)[None], logits.argmax(-1)[None])

    case_dir = os.path.join(out_dir, name)
    os.makedirs(case_dir, exist_ok=True)
    prefix = "model.layers.0.mlp."
    sd = {key: v.detach().contiguous()
          for key, v in model.state_dict().items() if key.startswith(prefix)}
    save_file(sd, os.path.join(case_dir, "moe.safetensors"))

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        on_disk = load_file(os.path.join(tmp, "model.safetensors"))
    legacy = "model.layers.0.block_sparse_moe."
    ckpt = {key: v.contiguous() for key, v in on_disk.items() if key.startswith(legacy)}
    assert ckpt, f"save_pretrained wrote no {legacy}* keys: {sorted(on_disk)}"
    save_file(ckpt, os.path.join(case_dir, "checkpoint.safetensors"))

    save_file(
        {
            "x": x, "out": out.contiguous(), "router_logits": logits.contiguous(),
            "x2": x2, "router_logits2": logits2.contiguous(),
            "aux_loss": aux.reshape([]).float(), "aux_loss_pooled": aux_pooled.reshape([]).float(),
            "z_loss": z.reshape([]).float(), "switch_aux_loss": switch_aux.reshape([]).float(),
        },
        os.path.join(case_dir, "reference.safetensors"),
    )
    info = {
        "config": {
            "d_model": cfg.hidden_size, "d_ff": cfg.intermediate_size,
            "n_experts": cfg.num_local_experts, "top_k": cfg.num_experts_per_tok,
        },
        "state_dict": [[key, list(v.shape)] for key, v in sd.items()],
        "checkpoint_keys": sorted(ckpt),
        "provenance": {
            "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "seed": SEED, "weight_std": WEIGHT_STD,
            "block": f"{type(block).__module__}.{type(block).__name__}",
        },
    }
    with open(os.path.join(case_dir, "case.json"), "w") as fh:
        json.dump(info, fh, indent=1)


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    for name, (d, f, e, k) in CASES.items():
        run_case(sys.argv[1], name, d, f, e, k)


if __name__ == "__main__":
    main()
