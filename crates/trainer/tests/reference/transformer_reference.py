#!/usr/bin/env python3
"""Reference logits and loss from Hugging Face transformers for tests/transformer_parity.rs.

Usage: transformer_reference.py OUT_DIR CASE

Builds a tiny randomly initialised model of one family from a config object (nothing is
downloaded), in fp32, eval mode, eager attention (an implementation independent of the
scaled_dot_product_attention our model uses), no dropout, seed 0, and writes to OUT_DIR:

- model.safetensors: the model's state dict as `save_pretrained` would write it: non-persistent
  buffers (rotary `inv_freq`) are not in `state_dict()`, and a tied `lm_head.weight` (same
  storage as the token embedding) is dropped. These keys are exactly our parameter names.
- state_dict.json: every `state_dict()` key in order with its shape and, for a tied key, the key
  whose storage it shares: what a Hugging Face import maps from.
- case.json: the config in our `TransformerConfig` field names, derived from the Hugging Face
  config object, plus provenance (library versions, seed).
- reference.safetensors:
    input_ids [2, T] int64, uniform over the vocabulary;
    logits    [2, T, vocab] fp32: `model(input_ids).logits`;
    loss      [1] fp32: the model's own causal-LM loss, `model(input_ids, labels=input_ids).loss`,
              which transformers computes as the mean cross-entropy of logits[:, :-1] against
              input_ids[:, 1:] (it pads the labels with -100 and shifts them left by one).
              The script checks that this equals F.cross_entropy on those slices.

Exit status 3 with a message on stderr when torch, transformers or safetensors is missing.
"""

import json
import os
import sys

try:
    import torch
    import torch.nn.functional as F
    import transformers
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
except ImportError as e:
    print(f"missing Python package: {e}. Run scripts/test, which installs them.", file=sys.stderr)
    sys.exit(3)

SEED = 0
BATCH, SEQ = 2, 12

# Each case: family, Hugging Face config kwargs. Sizes are tiny so that the test runs in seconds
# on two cores; head_dim stays even (RoPE rotates halves).
CASES = {
    # Multi-head attention (n_kv_heads == n_heads), separate lm_head.
    "llama_mha_untied": (
        "llama",
        dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=32,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
             rms_norm_eps=1e-5, tie_word_embeddings=False),
    ),
    # Grouped-query attention, 2 query heads per key/value head, lm_head tied to the embedding.
    "llama_gqa_tied": (
        "llama",
        dict(vocab_size=96, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
             rms_norm_eps=1e-6, tie_word_embeddings=True),
    ),
    # 3 query heads per key/value head, 6 heads of 8 dims, Llama 3's rope_theta.
    "llama_gqa3_theta500k": (
        "llama",
        dict(vocab_size=80, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=24,
             rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
             rms_norm_eps=1e-5, tie_word_embeddings=False),
    ),
    # GPT-2: 2 layers, d_ff defaults to 4 * n_embd, gelu_new (tanh approximation).
    "gpt2_2layer": (
        "gpt2",
        dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32, n_inner=None,
             activation_function="gelu_new", layer_norm_epsilon=1e-5,
             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
             bos_token_id=0, eos_token_id=0, tie_word_embeddings=True),
    ),
}


def build(family, kwargs):
    if family == "llama":
        cfg = LlamaConfig(**kwargs, attention_dropout=0.0, bos_token_id=0, eos_token_id=0)
        cfg._attn_implementation = "eager"
        return LlamaForCausalLM(cfg), cfg
    cfg = GPT2Config(**kwargs)
    cfg._attn_implementation = "eager"
    return GPT2LMHeadModel(cfg), cfg


def ours(family, cfg):
    """The config in our TransformerConfig field names, read from the Hugging Face config."""
    if family == "llama":
        return dict(family="llama", vocab_size=cfg.vocab_size, d_model=cfg.hidden_size,
                    n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
                    n_kv_heads=cfg.num_key_value_heads, d_ff=cfg.intermediate_size,
                    max_seq_len=cfg.max_position_embeddings,
                    rope_theta=float(cfg.rope_parameters["rope_theta"]),
                    norm_eps=cfg.rms_norm_eps, tie_embeddings=bool(cfg.tie_word_embeddings),
                    head_dim=cfg.head_dim)
    return dict(family="gpt2", vocab_size=cfg.vocab_size, d_model=cfg.n_embd,
                n_layers=cfg.n_layer, n_heads=cfg.n_head, n_kv_heads=cfg.n_head,
                d_ff=cfg.n_inner if cfg.n_inner is not None else 4 * cfg.n_embd,
                max_seq_len=cfg.n_positions, rope_theta=0.0, norm_eps=cfg.layer_norm_epsilon,
                tie_embeddings=bool(cfg.tie_word_embeddings), head_dim=cfg.n_embd // cfg.n_head)


@torch.no_grad()
def randomise(model):
    """Replaces transformers' init (ones/zeros norms and biases, std 0.02 weights) by values that
    make every parameter matter: norm weights 1 + N(0, 0.2), biases N(0, 0.1), matrices N(0, 0.15)
    so attention is far from uniform. Tied tensors are drawn once (shared storage)."""
    seen = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if p.dim() == 1 and name.endswith(".weight"):
            p.copy_(1.0 + 0.2 * torch.randn_like(p))
        elif p.dim() == 1:
            p.copy_(0.1 * torch.randn_like(p))
        else:
            p.copy_(0.15 * torch.randn_like(p))


def main():
    if len(sys.argv) != 3 or sys.argv[2] not in CASES:
        print(f"usage: {sys.argv[0]} OUT_DIR CASE, CASE one of {', '.join(CASES)}", file=sys.stderr)
        sys.exit(2)
    out, case = sys.argv[1], sys.argv[2]
    family, kwargs = CASES[case]
    torch.manual_seed(SEED)
    model, cfg = build(family, kwargs)
    model.eval()
    randomise(model)

    state = model.state_dict()
    ptr_to_key = {}
    listing, kept = [], {}
    for key, t in state.items():
        tied_to = ptr_to_key.get(t.data_ptr())
        listing.append({"name": key, "shape": list(t.shape), "tied_to": tied_to})
        if tied_to is None:
            ptr_to_key[t.data_ptr()] = key
            kept[key] = t.detach().contiguous().clone()
    if cfg.tie_word_embeddings:
        assert "lm_head.weight" not in kept, "tied lm_head should share the embedding's storage"
    save_file(kept, os.path.join(out, "model.safetensors"))

    vocab = cfg.vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ), dtype=torch.int64)
    with torch.no_grad():
        logits = model(ids).logits.float()  # [b, t, vocab]
        loss = model(ids, labels=ids).loss.float()
        explicit = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids[:, 1:].reshape(-1))
    assert torch.allclose(loss, explicit, rtol=1e-6, atol=0), (loss.item(), explicit.item())
    save_file(
        {"input_ids": ids.contiguous(), "logits": logits.contiguous(), "loss": loss.reshape(1)},
        os.path.join(out, "reference.safetensors"),
    )

    with open(os.path.join(out, "state_dict.json"), "w") as f:
        json.dump(listing, f, indent=1)
    info = {
        "case": case,
        "config": ours(family, cfg),
        "provenance": {"transformers": transformers.__version__, "torch": torch.__version__,
                       "seed": SEED, "attn_implementation": "eager", "dtype": "float32"},
    }
    with open(os.path.join(out, "case.json"), "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
