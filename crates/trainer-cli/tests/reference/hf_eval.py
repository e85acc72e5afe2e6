"""Reference side of tests/hf_interop.rs: Hugging Face transformers on the same data as `trainer eval`.

    python hf_eval.py create CASE OUT_DIR       # a random model saved with save_pretrained
    python hf_eval.py create llama_tok OUT_DIR   # + a BPE tokenizer.json trained on DATA_FOR_BPE
    python hf_eval.py logits_diff DIR_A DIR_B    # -> {"max_rel_diff": ...} on the same random ids
    python hf_eval.py greedy MODEL_DIR PROMPT N  # -> {"prompt_ids": [...], "ids": [...]}: N greedy tokens
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
    tok.save(os.path.join(out, "tokenizer.json"))
    return tok.get_vocab_size()


def create(case, out):
    torch.manual_seed(0)
    if case == "llama_tok":
        vocab = train_tokenizer(os.environ["DATA_FOR_BPE"], out)
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64)
        model = transformers.LlamaForCausalLM(cfg)
    elif case == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=256, hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64,
            rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=20000.0)
        model = transformers.LlamaForCausalLM(cfg)
    elif case == "mixtral":
        cfg = transformers.MixtralConfig(
            vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
            num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5,
            tie_word_embeddings=False, rope_theta=1e6)
        model = transformers.MixtralForCausalLM(cfg)
    elif case == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=64,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        raise SystemExit(f"unknown case {case}")
    # Non-trivial norms and biases so that a mix-up shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out, safe_serialization=True)


def logits_diff(dir_a, dir_b):
    """Max relative difference of two checkpoints' logits on the same random ids (transformers)."""
    a = transformers.AutoModelForCausalLM.from_pretrained(dir_a, dtype=torch.float32).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(dir_b, dtype=torch.float32).eval()
    torch.manual_seed(1)
    ids = torch.randint(0, a.config.vocab_size, (2, 24))
    with torch.no_grad():
        la, lb = a(ids).logits, b(ids).logits
    print(json.dumps({"max_rel_diff": float((la - lb).abs().max() / la.abs().max())}))


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


def evaluate(model_dir, data, seq_len, batch_size, use_tokenizer=False):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
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
    print(json.dumps({"loss": total / count, "tokens": count}))


if __name__ == "__main__":
    if sys.argv[1] == "create":
        create(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "eval":
        evaluate(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), "--tokenizer" in sys.argv[6:])
    elif sys.argv[1] == "logits_diff":
        logits_diff(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "greedy":
        greedy(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        raise SystemExit(__doc__)
