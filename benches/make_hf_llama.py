"""Writes a randomly initialised Llama in the Hugging Face format (config.json and safetensors
shards, as save_pretrained writes them) for benches/mmap_load.sh.

    python benches/make_hf_llama.py OUT_DIR --dtype bf16|fp32 [--shard-size 200MB] [--tiny]

The shape (~134M parameters: vocab 32000, hidden 768, 12 layers, MLP 2048, untied head) is fixed
so that runs compare; `--tiny` (hidden 64, 1 layer, MLP 128: 4.1M parameters, the same vocabulary)
gives the process's memory without the model. Weights are transformers' init from seed 0.
"""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
parser.add_argument("--shard-size", default="200MB")
parser.add_argument("--tiny", action="store_true")
args = parser.parse_args()

torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=32000,
    hidden_size=64 if args.tiny else 768,
    intermediate_size=128 if args.tiny else 2048,
    num_hidden_layers=1 if args.tiny else 12,
    num_attention_heads=4 if args.tiny else 12,
    num_key_value_heads=4 if args.tiny else 12,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
model = LlamaForCausalLM(config)
model = model.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
model.save_pretrained(args.out, max_shard_size=args.shard_size, safe_serialization=True)
print(f"{args.out}: {sum(p.numel() for p in model.parameters())} parameters, {args.dtype}")
