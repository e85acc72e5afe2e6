"""Wanda (Sun et al. 2024) on a Hugging Face Llama, written from the paper and the reference
implementation's semantics (locuslab/wanda, prune_wanda): blocks pruned in order, each block's
linear layers scored from the same calibration pass through the already pruned earlier blocks,
score |W| * ||X_j||_2, per-output-row comparison groups; unstructured (each row loses
int(in * sparsity) lowest scores) or N:M (N kept of every M consecutive inputs).

    python wanda_reference.py HF_DIR CALIB_TEXT SEQ_LEN BATCH BATCHES (SPARSITY|N:M) OUT.safetensors

Calibration windows are consecutive, from the start of the file's bytes: batch b, row i covers
bytes [(b * BATCH + i) * SEQ_LEN, ... + SEQ_LEN), as `trainer prune --calib` reads them.
Writes the pruned-weight masks (bool, True = pruned) under the Hugging Face weight names.
"""
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main():
    hf_dir, calib, seq_len, batch, batches, sparsity, out = sys.argv[1:8]
    seq_len, batch, batches = int(seq_len), int(batch), int(batches)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    data = list(open(calib, "rb").read())
    inputs = []
    for b in range(batches):
        rows = [data[(b * batch + i) * seq_len:(b * batch + i + 1) * seq_len] for i in range(batch)]
        inputs.append(torch.tensor(rows, dtype=torch.long))
    masks = {}
    for li, layer in enumerate(model.model.layers):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        sq = {n: torch.zeros(m.in_features) for n, m in linears.items()}
        hooks = []
        for n, m in linears.items():
            def hook(_mod, args, n=n):
                x = args[0].detach().float()
                sq[n] += x.reshape(-1, x.shape[-1]).pow(2).sum(0)
            hooks.append(m.register_forward_pre_hook(hook))
        with torch.no_grad():
            for x in inputs:
                model(x)
        for h in hooks:
            h.remove()
        for n, m in linears.items():
            w = m.weight.data
            score = w.abs().float() * sq[n].sqrt().unsqueeze(0)
            mask = torch.zeros_like(w, dtype=torch.bool)
            if ":" in sparsity:
                keep, group = map(int, sparsity.split(":"))
                for start in range(0, w.shape[1], group):
                    block = score[:, start:start + group]
                    low = torch.topk(block, group - keep, dim=1, largest=False)[1]
                    mask.scatter_(1, start + low, True)
            else:
                k = int(w.shape[1] * float(sparsity))
                order = torch.sort(score, dim=-1, stable=True)[1]
                mask.scatter_(1, order[:, :k], True)
            w[mask] = 0
            masks[f"model.layers.{li}.{n}.weight"] = mask
    save_file(masks, out)


if __name__ == "__main__":
    main()
