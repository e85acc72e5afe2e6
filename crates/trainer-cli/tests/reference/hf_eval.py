"""Reference side of tests/hf_interop.rs: Hugging Face transformers on the same data as `trainer eval`.

    python hf_eval.py create CASE OUT_DIR       # a random model saved with save_pretrained
    python hf_eval.py create_eval CASE OUT_DIR DATA SEQ_LEN BATCH_SIZE  # create, then eval
    python hf_eval.py compare DIR_A DIR_B DATA SEQ_LEN BATCH_SIZE
        -> {"loss": eval of DIR_B, "max_rel_diff": logits_diff of DIR_A and DIR_B}
    python hf_eval.py cases                     # the CASES names, one per line
    python hf_eval.py field_sweep OUT_DIR DATA SEQ_LEN BATCH_SIZE
        -> OUT_DIR/manifest.json: for each family, one model per config field set to a value
           other than its default (see field_sweep), with transformers' loss on DATA
    python hf_eval.py create llama_tok OUT_DIR   # + a BPE tokenizer.json trained on DATA_FOR_BPE
    python hf_eval.py logits_diff DIR_A DIR_B    # -> {"max_rel_diff": ...} on the same random ids
    python hf_eval.py greedy MODEL_DIR PROMPT N  # -> {"prompt_ids": [...], "ids": [...]}: N greedy tokens
    python hf_eval.py encode MODEL_DIR TEXT OUT  # TEXT through MODEL_DIR/tokenizer.json -> uint16 ids
    python hf_eval.py same_tokenizer DIR_A DIR_B TEXT
        -> {"same": true/false}: AutoTokenizer.from_pretrained(DIR_B) tokenizes TEXT as DIR_A's
           tokenizer.json does
    python hf_eval.py eval MODEL_DIR DATA SEQ_LEN BATCH_SIZE [--tokenizer]
        -> prints {"loss": ..., "tokens": ...}: mean next-token loss over consecutive windows of
           SEQ_LEN + 1 bytes of DATA (window i starts at i * SEQ_LEN), the windows `trainer eval`
           uses, computed with AutoModelForCausalLM.from_pretrained(MODEL_DIR) in fp32.

Exit status 3 when torch or transformers is missing (run scripts/test, which installs them).
"""
import json
import os
import sys

try:
    import torch
    import transformers
except ImportError as e:  # pragma: no cover
    print(f"missing Python package: {e}; run scripts/test (it installs the test requirements)", file=sys.stderr)
    sys.exit(3)


def train_tokenizer(text_path, out):
    """A small byte-level BPE (vocab 300) trained on `text_path`, saved as out/tokenizer.json."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, decoders, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([text_path], trainer)
    os.makedirs(out, exist_ok=True)
    # As transformers saves a tokenizer: tokenizer.json plus tokenizer_config.json.
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(out)
    return tok.get_vocab_size()


# Tiny models of every family and variant the tool reads. Sizes are small, but each variant is
# set so that it changes the loss at SEQ_LEN 32: RoPE scalings with an original context of 16,
# sliding windows of 8, a Qwen3 head_dim other than hidden_size / heads.
T = transformers
SMALL = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
CASES = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=256, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
        rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=20000.0)),
    "llama_bias": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        **SMALL, attention_bias=True, mlp_bias=True)),
    "llama3_rope": lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama_linear_rope": lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "llama_dynamic_rope": lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "llama_yarn_rope": lambda: T.LlamaForCausalLM(T.LlamaConfig(**SMALL, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16))),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**SMALL, sliding_window=8)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL, tie_word_embeddings=False)),
    "qwen2_tied_window": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(
        **SMALL, tie_word_embeddings=True, use_sliding_window=True, sliding_window=8,
        max_window_layers=1)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**SMALL, head_dim=16)),
    "qwen3_bias": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(
        **SMALL, head_dim=8, attention_bias=True, tie_word_embeddings=True)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**SMALL, head_dim=8)),
    "gemma_untied_bias": lambda: T.GemmaForCausalLM(T.GemmaConfig(
        **SMALL, head_dim=16, tie_word_embeddings=False, attention_bias=True)),
    # Gemma 2: soft-caps small enough to bite, layers 0 sliding (window 8) and 1 full.
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(
        **SMALL, head_dim=8, query_pre_attn_scalar=12, attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0, sliding_window=8)),
    "gemma2_untied_bias": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(
        **SMALL, head_dim=16, tie_word_embeddings=False, attention_bias=True,
        attn_logit_softcapping=None, final_logit_softcapping=None,
        layer_types=["full_attention", "full_attention"])),
    # Gemma 3: one RoPE per layer type (the full layers' scaled), a window on layer 0.
    "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(
        **SMALL, head_dim=8, sliding_window=8, query_pre_attn_scalar=16,
        final_logit_softcapping=4.0, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}})),
    # Phi-3: fused projections, RoPE on half of each head, a window of 8.
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(
        **SMALL, sliding_window=8, pad_token_id=0, eos_token_id=1, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "phi3_tied": lambda: T.Phi3ForCausalLM(T.Phi3Config(
        **SMALL, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)),
    "olmo2": lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**SMALL)),
    "olmo2_bias_tied": lambda: T.Olmo2ForCausalLM(T.Olmo2Config(
        **SMALL, attention_bias=True, tie_word_embeddings=True)),
    "granite": lambda: T.GraniteForCausalLM(T.GraniteConfig(
        **SMALL, embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.125,
        logits_scaling=2.0, attention_bias=True, tie_word_embeddings=True)),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(
        vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
        num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
        tie_word_embeddings=False, rope_theta=1e6)),
    # GPT-NeoX: parallel residual, RoPE on a quarter of each 8-wide head (2 dimensions).
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(**NEOX)),
    # Sequential residual, the 4.x rotary names (half of each head, base 500), no attention
    # biases, tied head.
    "gpt_neox_sequential_tied": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        **NEOX, use_parallel_residual=False, rotary_pct=0.5, rotary_emb_base=500.0,
        attention_bias=False, tie_word_embeddings=True)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(**GPT2)),
    "gpt2_unscaled": lambda: T.GPT2LMHeadModel(T.GPT2Config(**GPT2, scale_attn_weights=False)),
    "gpt2_layer_scaled": lambda: T.GPT2LMHeadModel(T.GPT2Config(
        **GPT2, scale_attn_by_inverse_layer_idx=True)),
    "gpt2_untied": lambda: T.GPT2LMHeadModel(T.GPT2Config(**GPT2, tie_word_embeddings=False)),
}
GPT2 = dict(vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
NEOX = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=64)


def create(case, out):
    torch.manual_seed(0)
    if case == "llama_tok":
        vocab = train_tokenizer(os.environ["DATA_FOR_BPE"], out)
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    elif case == "llama_int_weights":  # a bad checkpoint: the embedding stored as int64
        from safetensors.torch import save_file
        model = CASES["llama"]()
        model.save_pretrained(out, safe_serialization=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"].to(torch.int64)
        save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        return
    elif case in CASES:
        model = CASES[case]()
    else:
        raise SystemExit(f"unknown case {case}")
    # Non-trivial norms and biases, and larger weights, so that a mix-up shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.mul_(15.0)
    model.save_pretrained(out, safe_serialization=True)


# The base of each family in the field sweep, and the fields it does not vary: the ones with no
# single "other value" (model_type, dicts and lists; the RoPE dicts and layer_types have their
# own CASES above).
SWEEP_FAMILIES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, SMALL),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, SMALL),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, SMALL),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(SMALL, head_dim=8)),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(SMALL, head_dim=8)),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, dict(SMALL, head_dim=8)),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, dict(SMALL, head_dim=8)),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(SMALL, pad_token_id=0, eos_token_id=1)),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, SMALL),
    "granite": (T.GraniteConfig, T.GraniteForCausalLM, SMALL),
    "mixtral": (T.MixtralConfig, T.MixtralForCausalLM, dict(SMALL, num_local_experts=4,
                                                            num_experts_per_tok=2)),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, GPT2),
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, NEOX),
}
SWEEP_SKIP = {"model_type", "transformers_version", "architectures", "dtype", "id2label",
              "label2id", "rope_parameters", "layer_types", "problem_type"}
# Values for fields whose default gives no obvious "other value".
SWEEP_VALUES = {"hidden_act": "gelu", "activation_function": "relu", "n_inner": 48,
                "head_dim": 16, "sliding_window": 8, "pad_token_id": 0, "summary_type": "mean",
                "summary_activation": "tanh"}


def other_value(name, value):
    """A value of field `name` other than `value`, or None when there is none to try."""
    if name in SWEEP_VALUES and SWEEP_VALUES[name] != value:
        return SWEEP_VALUES[name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value * 2 if value else 1
    if isinstance(value, float):
        return value * 2 if value else 0.1
    return None


def field_sweep(out, data, seq_len, batch_size):
    """Every config field of every family set, one at a time, to a value other than the base's.
    The trainer must give transformers' loss on each, or refuse it naming the field."""
    import dataclasses
    manifest = []
    for family, (config_cls, model_cls, base) in SWEEP_FAMILIES.items():
        defaults = config_cls(**base).to_dict()
        for field in dataclasses.fields(config_cls):
            name = field.name
            if name in SWEEP_SKIP or name.startswith("_") or name not in defaults:
                continue
            value = other_value(name, defaults[name])
            if value is None:
                continue
            try:
                torch.manual_seed(0)
                model = model_cls(config_cls(**dict(base, **{name: value})))
            except Exception:  # transformers itself refuses the value: nothing to compare
                continue
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(15.0) if p.dim() > 1 else p.add_(torch.randn_like(p) * 0.1)
            model_dir = os.path.abspath(os.path.join(out, f"{family}-{name}"))
            model.save_pretrained(model_dir, safe_serialization=True)
            try:
                loss = evaluate(model_dir, data, seq_len, batch_size)["loss"]
            except Exception:  # e.g. return_dict = False: no .logits to compare
                continue
            manifest.append({"family": family, "field": name, "value": value, "dir": model_dir,
                             "loss": loss})
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


def logits_diff(dir_a, dir_b):
    """Max relative difference of two checkpoints' logits on the same random ids (transformers)."""
    a, b = load(dir_a), load(dir_b)
    torch.manual_seed(1)
    ids = torch.randint(0, a.config.vocab_size, (2, 24))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    return float((la - lb).abs().max() / la.abs().max())


def greedy(model_dir, prompt, n):
    """Greedy decoding written out (no generate(): its stopping rules would get in the way)."""
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt_ids = tok.encode(prompt, add_special_tokens=True).ids
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
    print(json.dumps({"prompt_ids": prompt_ids, "ids": ids[len(prompt_ids):]}))


def load(model_dir):
    """The model in fp32; soft-capped attention (Gemma 2/3) through transformers' eager attention,
    the only one that applies the cap."""
    config = transformers.AutoConfig.from_pretrained(model_dir)
    softcap = getattr(config, "attn_logit_softcapping", None) is not None
    return transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, **({"attn_implementation": "eager"} if softcap else {})).eval()


def evaluate(model_dir, data, seq_len, batch_size, use_tokenizer=False):
    model = load(model_dir)
    if use_tokenizer:
        import tokenizers
        tok = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        ids = torch.tensor(tok.encode(open(data, encoding="utf-8").read(), add_special_tokens=False).ids, dtype=torch.long)
    else:
        ids = torch.tensor(list(open(data, "rb").read()), dtype=torch.long)
    n_windows = (len(ids) - 1) // seq_len
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, n_windows, batch_size):
            rows = [ids[i * seq_len: i * seq_len + seq_len + 1] for i in range(start, min(n_windows, start + batch_size))]
            batch = torch.stack(rows)
            logits = model(batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            n = batch[:, 1:].numel()
            total += loss.item() * n
            count += n
    return {"loss": total / count, "tokens": count}


if __name__ == "__main__":
    if sys.argv[1] == "create":
        create(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "create_eval":
        create(sys.argv[2], sys.argv[3])
        print(json.dumps(evaluate(sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))))
    elif sys.argv[1] == "compare":
        out = evaluate(sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
        out["max_rel_diff"] = logits_diff(sys.argv[2], sys.argv[3])
        print(json.dumps(out))
    elif sys.argv[1] == "encode":  # encode MODEL_DIR TEXT OUT: TEXT's ids as a uint16 token file
        import numpy, tokenizers
        tok = tokenizers.Tokenizer.from_file(os.path.join(sys.argv[2], "tokenizer.json"))
        ids = tok.encode(open(sys.argv[3], encoding="utf-8").read(), add_special_tokens=False).ids
        numpy.array(ids, dtype=numpy.uint16).tofile(sys.argv[4])
    elif sys.argv[1] == "field_sweep":
        field_sweep(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    elif sys.argv[1] == "same_tokenizer":
        import tokenizers
        a = tokenizers.Tokenizer.from_file(os.path.join(sys.argv[2], "tokenizer.json"))
        b = transformers.AutoTokenizer.from_pretrained(sys.argv[3])
        text = sys.argv[4]
        ids_a = a.encode(text, add_special_tokens=False).ids
        ids_b = b(text, add_special_tokens=False)["input_ids"]
        print(json.dumps({"same": ids_a == ids_b, "a": ids_a, "b": ids_b}))
    elif sys.argv[1] == "cases":
        print("\n".join(CASES))
    elif sys.argv[1] == "eval":
        print(json.dumps(evaluate(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), "--tokenizer" in sys.argv[6:])))
    elif sys.argv[1] == "logits_diff":
        print(json.dumps({"max_rel_diff": logits_diff(sys.argv[2], sys.argv[3])}))
    elif sys.argv[1] == "greedy":
        greedy(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        raise SystemExit(__doc__)
