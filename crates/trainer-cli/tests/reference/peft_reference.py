"""Reference side of tests/lora.rs: Hugging Face peft and transformers on what `trainer export` wrote.

    python peft_reference.py eval BASE_DIR ADAPTER_DIR MERGED_DIR DATA SEQ_LEN BATCH_SIZE
        -> prints one JSON object with the mean next-token loss over consecutive windows of
           SEQ_LEN + 1 bytes of DATA (window i starts at i * SEQ_LEN, the windows `trainer eval`
           uses), in fp32, of:
             "peft":   PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_DIR), ADAPTER_DIR)
             "peft_merged": the same after peft's merge_and_unload()
             "merged": AutoModelForCausalLM.from_pretrained(MERGED_DIR) (`trainer export --merged`)
             "base":   AutoModelForCausalLM.from_pretrained(BASE_DIR) alone
           and "lora_b_abs_sum": the sum of |B| over the loaded adapters (0 means nothing loaded).

    python peft_reference.py make_adapter VARIANT BASE_DIR ADAPTER_DIR DATA SEQ_LEN BATCH_SIZE
        -> a tiny Llama made by transformers in BASE_DIR, a LoRA adapter made by peft in
           ADAPTER_DIR (VARIANT: one of ADAPTER_VARIANTS, B drawn at random so that it matters),
           and prints {"peft": loss of the adapted model, "base": loss of the base}.

Exit status 3 when torch, transformers or peft is missing (scripts/test installs them from
scripts/requirements-test.txt).
"""
import json
import sys

try:
    import torch
    import transformers
    import peft
except ImportError as e:  # pragma: no cover
    print(f"missing Python package: {e}; install scripts/requirements-test.txt (scripts/test does)", file=sys.stderr)
    sys.exit(3)


def mean_loss(model, data, seq_len, batch_size):
    ids = torch.tensor(list(open(data, "rb").read()), dtype=torch.long)
    n_windows = (len(ids) - 1) // seq_len
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n_windows, batch_size):
            rows = [ids[i * seq_len: i * seq_len + seq_len + 1] for i in range(start, min(n_windows, start + batch_size))]
            batch = torch.stack(rows)
            logits = model(batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1))
            n = batch[:, 1:].numel()
            total += loss.item() * n
            count += n
    return total / count


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def evaluate(base_dir, adapter_dir, merged_dir, data, seq_len, batch_size):
    out = {"base": mean_loss(load(base_dir), data, seq_len, batch_size)}
    model = peft.PeftModel.from_pretrained(load(base_dir), adapter_dir).eval()
    out["lora_b_abs_sum"] = sum(p.abs().sum().item() for n, p in model.named_parameters() if "lora_B" in n)
    out["lora_modules"] = sorted({n.split(".lora_")[0].removeprefix("base_model.model.") for n, _ in model.named_parameters() if "lora_A" in n})
    out["peft"] = mean_loss(model, data, seq_len, batch_size)
    out["peft_merged"] = mean_loss(model.merge_and_unload(), data, seq_len, batch_size)
    out["merged"] = mean_loss(load(merged_dir), data, seq_len, batch_size)
    print(json.dumps(out))


ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The base model of a variant: its prefix names the family (Llama without one).
BASES = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
         "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
         "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
         "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM),
         "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
         "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
         "neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM),
         "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
         "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
         "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM),
         "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM)}
# Config fields a family's tiny base needs beyond the sizes (Gemma's head_dim defaults to 256,
# Phi-3's pad token to 32000).
BASE_EXTRA = {transformers.GemmaConfig: dict(head_dim=8), transformers.Gemma2Config: dict(head_dim=8),
              transformers.Qwen3Config: dict(head_dim=8),
              transformers.GraniteConfig: dict(embedding_multiplier=2.0, residual_multiplier=0.5,
                                               attention_multiplier=0.2, logits_scaling=2.0),
              transformers.MixtralConfig: dict(num_local_experts=4, num_experts_per_tok=2),
              transformers.Gemma3TextConfig: dict(head_dim=8),
              transformers.Phi3Config: dict(pad_token_id=0, eos_token_id=1)}
# peft's LoraConfig of each variant that tests/lora.rs loads (or expects refused).
ADAPTER_VARIANTS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 32}),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    # Other families: every projection, under the names peft gives them there.
    "qwen2_all": dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"down_proj": 16}, target_modules=ALL_PROJECTIONS),
    "gemma_all": dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"down_proj": 16}, target_modules=ALL_PROJECTIONS),
    "olmo2_all": dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"down_proj": 16}, target_modules=ALL_PROJECTIONS),
    "gemma2_all": dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"down_proj": 16}, target_modules=ALL_PROJECTIONS),
    "gemma3_all": dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"down_proj": 16}, target_modules=ALL_PROJECTIONS),
    # Phi-3's fused projections, as peft names them.
    "phi3_all": dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"down_proj": 16}, target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "mistral_all": dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"down_proj": 16}, target_modules=ALL_PROJECTIONS),
    "qwen3_all": dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"down_proj": 16}, target_modules=ALL_PROJECTIONS),
    "granite_all": dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"down_proj": 16}, target_modules=ALL_PROJECTIONS),
    # Mixtral: the attention projections (the experts are not Linear modules).
    "mixtral_attention": dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"o_proj": 16}, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    # GPT-NeoX's projections, as peft names them.
    "neox_all": dict(r=4, lora_alpha=8, use_rslora=True, alpha_pattern={"dense_4h_to_h": 16},
                     target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]),
}


def make_adapter(variant, base_dir, adapter_dir, data, seq_len, batch_size):
    torch.manual_seed(0)
    config_cls, model_cls = BASES.get(variant.split("_")[0],
                                      (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    sizes = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
    if config_cls is transformers.GPTNeoXConfig:  # no grouped-query attention
        del sizes["num_key_value_heads"]
    base = model_cls(config_cls(**sizes, **BASE_EXTRA.get(config_cls, {})))
    with torch.no_grad():
        for p in base.parameters():
            p.mul_(10.0) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
    base.save_pretrained(base_dir, safe_serialization=True)
    out = {"base": mean_loss(base.eval(), data, seq_len, batch_size)}
    model = peft.get_peft_model(base, peft.LoraConfig(**ADAPTER_VARIANTS[variant]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.5)
    model.save_pretrained(adapter_dir)
    out["peft"] = mean_loss(model.eval(), data, seq_len, batch_size)
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "eval":
        evaluate(*sys.argv[2:6], int(sys.argv[6]), int(sys.argv[7]))
    elif len(sys.argv) == 8 and sys.argv[1] == "make_adapter":
        make_adapter(*sys.argv[2:6], int(sys.argv[6]), int(sys.argv[7]))
    else:
        raise SystemExit(__doc__)
