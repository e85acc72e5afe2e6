"""Reference values for crates/trainer/tests/optim_reference.rs: what PyTorch's own optimizers do
with a fixed set of parameters and gradients, so that our Rust AdamW, SGD and clip_grad_norm can
be checked against them step by step.

Regenerate (torch==2.11.0, the version DESIGN.md pins; CPU, float32), from the repository root:

    .venv/bin/python crates/trainer/tests/reference/optim_reference.py

which rewrites crates/trainer/tests/reference/optim_reference.json next to this file. With
`--out PATH` it writes PATH instead; the Rust test does that when TRAINER_PYTHON is set (as
scripts/test sets it) and checks that the committed JSON still matches a fresh run.

Inputs come from torch.rand (uniform bits, exact float arithmetic) rather than torch.randn, whose
vectorised Box-Muller can differ in the last bit between CPUs: the inputs are then the same on
every machine. Every float in the JSON is a float32 value written exactly (as a Python float).
"""

import argparse
import json
from pathlib import Path

import torch

SEED = 1234
STEPS = 5
# (name, shape, decayed?) in the order the Rust optimizers receive them.
PARAMS = [("w", [4, 3], True), ("b", [5], False), ("c", [2, 3, 2], True)]
# Learning rate of each step, changing every step as a schedule would.
ADAMW_LRS = [1e-2, 2e-2, 1.5e-2, 5e-3, 1e-3]
SGD_LRS = [0.1, 0.08, 0.06, 0.04, 0.02]
ADAMW = {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
SGD_CASES = [
    {"name": "plain", "momentum": 0.0, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    {"name": "momentum", "momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    {"name": "nesterov", "momentum": 0.9, "dampening": 0.0, "nesterov": True, "weight_decay": 0.0},
    {"name": "dampening", "momentum": 0.9, "dampening": 0.1, "nesterov": False, "weight_decay": 0.0},
    {"name": "weight_decay", "momentum": 0.9, "dampening": 0.0, "nesterov": False, "weight_decay": 0.01},
]
# The first is below the global norm of the step-0 gradients (about 3.07), the second above it.
CLIP_MAX_NORMS = [0.5, 100.0]


def uniform(gen, shape, scale):
    """Uniform in [-scale, scale), float32."""
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * scale


def flat(t):
    return t.detach().reshape(-1).tolist()


def fresh_params(init):
    return [t.clone().requires_grad_(True) for t in init]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def groups(params, weight_decay):
    """Two groups as the Rust optimizers see them: decayed parameters, and the rest."""
    decayed = [p for p, (_, _, d) in zip(params, PARAMS) if d]
    rest = [p for p, (_, _, d) in zip(params, PARAMS) if not d]
    return [{"params": decayed, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def run(make_opt, lrs, init, grads):
    params = fresh_params(init)
    opt = make_opt(params)
    after = []
    for step, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        set_grads(params, grads[step])
        opt.step()
        after.append([flat(p) for p in params])
    return after


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    out = parser.parse_args().out

    gen = torch.Generator().manual_seed(SEED)
    init = [uniform(gen, shape, 1.0) for _, shape, _ in PARAMS]
    # Gradient scales change from step to step so that Adam's moments and bias corrections matter.
    grad_scales = [1.0, 0.5, 2.0, 0.1, 1.0]
    grads = [[uniform(gen, shape, s) for _, shape, _ in PARAMS] for s in grad_scales]

    adamw = dict(ADAMW)
    adamw["lrs"] = ADAMW_LRS
    adamw["after_step"] = run(
        lambda ps: torch.optim.AdamW(
            groups(ps, ADAMW["weight_decay"]), lr=ADAMW_LRS[0], betas=tuple(ADAMW["betas"]), eps=ADAMW["eps"]
        ),
        ADAMW_LRS,
        init,
        grads,
    )

    sgd = []
    for case in SGD_CASES:
        case = dict(case)
        case["lrs"] = SGD_LRS
        case["after_step"] = run(
            lambda ps, c=case: torch.optim.SGD(
                groups(ps, c["weight_decay"]),
                lr=SGD_LRS[0],
                momentum=c["momentum"],
                dampening=c["dampening"],
                nesterov=c["nesterov"],
            ),
            SGD_LRS,
            init,
            grads,
        )
        sgd.append(case)

    clip = []
    for max_norm in CLIP_MAX_NORMS:
        params = fresh_params(init)
        set_grads(params, grads[0])
        total = torch.nn.utils.clip_grad_norm_(params, max_norm)
        clip.append({"max_norm": max_norm, "total_norm": total.item(), "clipped": [flat(p.grad) for p in params]})

    doc = {
        "provenance": {
            "script": "crates/trainer/tests/reference/optim_reference.py",
            "torch": torch.__version__,
            "seed": SEED,
        },
        "params": [{"name": n, "shape": s, "decay": d, "init": flat(t)} for (n, s, d), t in zip(PARAMS, init)],
        "grads": [[flat(g) for g in step] for step in grads],
        "adamw": adamw,
        "sgd": sgd,
        "clip": clip,
    }
    out.write_text(dumps(doc) + "\n")


def dumps(o, indent=0):
    """JSON with each list of numbers on one line, so that diffs stay readable."""
    pad = " " * (indent + 1)
    if isinstance(o, dict):
        items = [f"{pad}{json.dumps(k)}: {dumps(v, indent + 1)}" for k, v in o.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(o, list) and any(isinstance(x, (list, dict)) for x in o):
        return "[\n" + ",\n".join(pad + dumps(x, indent + 1) for x in o) + "\n" + " " * indent + "]"
    return json.dumps(o)


if __name__ == "__main__":
    main()
