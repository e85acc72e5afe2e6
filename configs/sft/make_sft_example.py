"""A small chat fine-tuning example made locally (no download), for configs/sft_chat.toml:

    python configs/sft/make_sft_example.py [OUT_DIR]   # default runs/sft-example

- OUT_DIR/train.jsonl, OUT_DIR/valid.jsonl: generated chat records ({"messages": [{"role",
  "content"}, ...]}): arithmetic, reversed words and a few facts, some with a system message,
  some over two turns;
- OUT_DIR/model: a tiny Qwen2-shaped Hugging Face checkpoint (random weights) with its own
  byte-level BPE tokenizer trained on that text (tokenizer.json) and a ChatML chat template
  (<|im_start|>role ... <|im_end|>, as Qwen2.5 writes turns), as transformers saves them.

Everything is drawn from fixed seeds: the same files on every machine.
"""
import json
import os
import random
import sys

import tokenizers
import torch
import transformers

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = ["apple", "river", "stone", "cloud", "garden", "silver", "window", "forest", "candle",
         "bridge", "marble", "winter", "pepper", "harbor", "meadow", "lantern"]
FACTS = [("What colour is the sky on a clear day?", "The sky is blue."),
         ("What colour is fresh grass?", "Fresh grass is green."),
         ("How many legs does a spider have?", "A spider has eight legs."),
         ("What do bees make?", "Bees make honey."),
         ("Which planet do we live on?", "We live on Earth.")]
SYSTEMS = ["You are a helpful assistant.", "Answer briefly.", "You are a careful tutor."]


def exchange(rng):
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randrange(2, 50), rng.randrange(2, 50)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        w = rng.choice(WORDS)
        return f"Spell {w} backwards.", f"{w} backwards is {w[::-1]}."
    return rng.choice(FACTS)


def record(rng):
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    for _ in range(1 + (rng.random() < 0.3)):
        q, a = exchange(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return {"messages": messages}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/sft-example"
    os.makedirs(out, exist_ok=True)
    rng = random.Random(0)
    sets = {"train": [record(rng) for _ in range(600)], "valid": [record(rng) for _ in range(60)]}
    for name, records in sets.items():
        with open(os.path.join(out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    # A byte-level BPE over the conversations' text, with ChatML's special tokens.
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=512, special_tokens=special,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    texts = [m["content"] for r in sets["train"] for m in r["messages"]]
    tok.train_from_iterator(texts + ["user", "assistant", "system"], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    model_dir = os.path.join(out, "model")
    fast.save_pretrained(model_dir)
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=len(fast), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1e6,
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None)
    transformers.Qwen2ForCausalLM(config).save_pretrained(model_dir, safe_serialization=True)
    print(f"wrote {out}/train.jsonl, {out}/valid.jsonl and {model_dir} (vocab {len(fast)})")


if __name__ == "__main__":
    main()
