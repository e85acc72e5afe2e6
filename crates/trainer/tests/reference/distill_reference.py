"""Reference values for crates/trainer/tests/distill_reference.rs: the distillation losses of
crates/trainer/src/distill/losses.rs as torch.nn.functional computes them.

Regenerate (torch==2.11.0, CPU), from the repository root:

    .venv/bin/python crates/trainer/tests/reference/distill_reference.py

which rewrites crates/trainer/tests/reference/distill_reference.json next to this file. With
`--out PATH` it writes PATH instead; the Rust test does that when TRAINER_PYTHON is set and
checks that the committed JSON still matches a fresh run.

Inputs are float32 values from torch.rand (exact on every CPU), written exactly into the JSON;
the losses are computed from them in float64, so the reference carries no float32 rounding.

The formulas (p = softmax(logits / T), every divergence times T^2):
  forward_kl   = F.kl_div(log p_s, log p_t, log_target=True, reduction="batchmean") * T^2
  reverse_kl   = F.kl_div(log p_t, log p_s, log_target=True, reduction="batchmean") * T^2
  symmetric_kl = forward_kl + reverse_kl
  jsd          = (0.5 KL(p_t || m) + 0.5 KL(p_s || m)) * T^2, m = 0.5 p_t + 0.5 p_s
A classifier reduces over all rows (batchmean). A language model reduces over the positions
whose target is not -100 (batchmean over those rows: a per-token mean), the same positions
F.cross_entropy(ignore_index=-100) averages over; the mixed loss is
alpha * kd + (1 - alpha) * ce. Hidden states: F.mse_loss(h_s @ W.T, h_t) and
(1 - F.cosine_similarity(h_s @ W.T, h_t, dim=-1)).mean().
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

SEED = 4321
ROWS, VOCAB = 10, 7
TEMPERATURES = [1.0, 2.0, 4.0]
ALPHA = 0.3
KINDS = ["forward_kl", "reverse_kl", "symmetric_kl", "jsd"]
# Targets of the language-model rows; -100 rows are ignored.
TARGETS = [3, 0, -100, 6, 2, -100, 1, 5, 4, 0]
# Hidden states: student width 5, teacher width 4, [batch 2, time 3].
HS, HT = 5, 4


def uniform(gen, shape, scale):
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * scale


def divergence(kind, s, t, temperature):
    """Per-row divergence [n], times T^2."""
    ls = F.log_softmax(s / temperature, dim=-1)
    lt = F.log_softmax(t / temperature, dim=-1)

    def kl(log_p, log_q):  # KL(p || q) per row
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)

    if kind == "forward_kl":
        d = kl(lt, ls)
    elif kind == "reverse_kl":
        d = kl(ls, lt)
    elif kind == "symmetric_kl":
        d = kl(lt, ls) + kl(ls, lt)
    else:
        lm = torch.logsumexp(torch.stack([lt + math.log(0.5), ls + math.log(0.5)]), 0)
        d = 0.5 * kl(lt, lm) + 0.5 * kl(ls, lm)
    return d * temperature * temperature


def batchmean(kind, s, t, temperature):
    """The reduction="batchmean" form, as a cross-check of `divergence(...).mean()`."""
    ls = F.log_softmax(s / temperature, dim=-1)
    lt = F.log_softmax(t / temperature, dim=-1)
    fwd = F.kl_div(ls, lt, log_target=True, reduction="batchmean")
    rev = F.kl_div(lt, ls, log_target=True, reduction="batchmean")
    if kind == "forward_kl":
        v = fwd
    elif kind == "reverse_kl":
        v = rev
    elif kind == "symmetric_kl":
        v = fwd + rev
    else:
        lm = torch.logsumexp(torch.stack([lt + math.log(0.5), ls + math.log(0.5)]), 0)
        v = 0.5 * F.kl_div(lm, lt, log_target=True, reduction="batchmean") + 0.5 * F.kl_div(
            lm, ls, log_target=True, reduction="batchmean"
        )
    return v * temperature * temperature


def flat(t):
    return [float(x) for x in t.detach().reshape(-1).tolist()]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    out = parser.parse_args().out

    gen = torch.Generator().manual_seed(SEED)
    student32 = uniform(gen, [ROWS, VOCAB], 3.0)
    teacher32 = uniform(gen, [ROWS, VOCAB], 3.0)
    hs32 = uniform(gen, [2, 3, HS], 1.0)
    ht32 = uniform(gen, [2, 3, HT], 1.0)
    w32 = uniform(gen, [HT, HS], 0.5)
    student, teacher = student32.double(), teacher32.double()
    targets = torch.tensor(TARGETS)
    counted = targets != -100

    cases = []
    for kind in KINDS:
        for temperature in TEMPERATURES:
            s = student.clone().requires_grad_(True)
            classifier = divergence(kind, s, teacher, temperature).mean()
            check = batchmean(kind, student, teacher, temperature)
            assert torch.allclose(classifier, check, rtol=1e-12, atol=1e-12), (kind, temperature)
            (grad,) = torch.autograd.grad(classifier, s)
            # Language model: per-token mean over the counted positions, mixed with the CE.
            s = student.clone().requires_grad_(True)
            kd = divergence(kind, s[counted], teacher[counted], temperature).mean()
            ce = F.cross_entropy(s, targets, ignore_index=-100)
            mixed = ALPHA * kd + (1 - ALPHA) * ce
            (lm_grad,) = torch.autograd.grad(mixed, s)
            cases.append(
                {
                    "kind": kind,
                    "temperature": temperature,
                    "classifier_kd": classifier.item(),
                    "classifier_grad": flat(grad),
                    "lm_kd": kd.item(),
                    "lm_ce": ce.item(),
                    "lm_mixed": mixed.item(),
                    "lm_grad": flat(lm_grad),
                }
            )

    proj = hs32.double() @ w32.double().T
    ht = ht32.double()
    hidden = {
        "mse": float(F.mse_loss(proj, ht)),
        "cosine": float((1 - F.cosine_similarity(proj, ht, dim=-1, eps=1e-8)).mean()),
    }
    doc = {
        "torch": torch.__version__,
        "rows": ROWS,
        "vocab": VOCAB,
        "alpha": ALPHA,
        "student": flat(student32),
        "teacher": flat(teacher32),
        "targets": TARGETS,
        "cases": cases,
        "hidden_student": flat(hs32),
        "hidden_teacher": flat(ht32),
        "hidden_proj": flat(w32),
        "hidden_shape": [2, 3],
        "hidden_widths": [HS, HT],
        "hidden": hidden,
    }
    out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
