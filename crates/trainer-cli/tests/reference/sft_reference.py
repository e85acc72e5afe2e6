"""Reference side of tests/sft.rs: transformers and peft on what `trainer export --to peft` wrote
for a chat fine-tuning run.

    python sft_reference.py peft_chat_loss BASE_DIR ADAPTER_DIR DATA.jsonl
        -> one JSON object: the mean next-token loss over the tokens of every conversation of
           DATA.jsonl, rendered and tokenized by the base's own tokenizer
           (apply_chat_template(messages, tokenize=True)), in fp32, of
             "base": AutoModelForCausalLM.from_pretrained(BASE_DIR)
             "peft": PeftModel.from_pretrained(that, ADAPTER_DIR)
           and "lora_b_abs_sum" (0 means no adapter weight was loaded).

Exit status 3 when torch, transformers or peft is missing.
"""
import json
import sys

try:
    import torch
    import transformers
    import peft
except ImportError as e:  # pragma: no cover
    print(f"missing Python package: {e}; install scripts/requirements-test.txt", file=sys.stderr)
    sys.exit(3)


def chat_loss(model, tokenizer, conversations):
    total, count = 0.0, 0
    with torch.no_grad():
        for messages in conversations:
            ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
            x = torch.tensor([ids])
            logits = model(x[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(logits[0], x[0, 1:], reduction="sum")
            total += loss.item()
            count += len(ids) - 1
    return total / count


def peft_chat_loss(base_dir, adapter_dir, data):
    tokenizer = transformers.AutoTokenizer.from_pretrained(base_dir)
    conversations = [json.loads(line)["messages"] for line in open(data, encoding="utf-8") if line.strip()]
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    out = {"base": chat_loss(load(), tokenizer, conversations)}
    model = peft.PeftModel.from_pretrained(load(), adapter_dir).eval()
    out["lora_b_abs_sum"] = sum(p.abs().sum().item() for n, p in model.named_parameters() if "lora_B" in n)
    out["peft"] = chat_loss(model, tokenizer, conversations)
    print(json.dumps(out))


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "peft_chat_loss":
        peft_chat_loss(*sys.argv[2:5])
    else:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
