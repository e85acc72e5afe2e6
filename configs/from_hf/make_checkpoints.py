"""Small checkpoints shaped like today's open models, made locally by transformers (no download):

    python configs/from_hf/make_checkpoints.py [OUT_DIR]   # default runs/hf

- OUT_DIR/llama3.2-tiny: Llama 3.2's shape (tied embeddings, grouped-query attention, rope_theta
  500000 with the "llama3" RoPE scaling, factor 32, original context 8192), at d_model 64;
- OUT_DIR/qwen2.5-tiny: Qwen2.5's shape (q/k/v biases, tied embeddings, rope_theta 1e6, sliding
  window configured but off), at d_model 64.

Both have a byte vocabulary (256), so the built-in corpus trains them as it is. Random weights:
the recipes beside this script show the continual-pretraining path end to end, not a result.
"""
import os
import sys

import torch
import transformers

out = sys.argv[1] if len(sys.argv) > 1 else "runs/hf"
torch.manual_seed(0)
common = dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=True)
llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
    **common, rms_norm_eps=1e-5, head_dim=16,
    rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0,
                         low_freq_factor=1.0, high_freq_factor=4.0,
                         original_max_position_embeddings=8192)))
llama.save_pretrained(os.path.join(out, "llama3.2-tiny"), safe_serialization=True)
qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
    **common, rms_norm_eps=1e-6, rope_theta=1e6, use_sliding_window=False, sliding_window=4096,
    max_window_layers=2))
qwen.save_pretrained(os.path.join(out, "qwen2.5-tiny"), safe_serialization=True)
print(f"wrote {out}/llama3.2-tiny and {out}/qwen2.5-tiny")
