"""Reference values for crates/trainer/tests/galore_reference.rs: what the official GaLore
optimizer, galore_torch.GaLoreAdamW (galore-torch 1.0, PyPI), does with a fixed set of parameters
and gradients, so that our Rust GaloreAdamW can be checked against it step by step.

Regenerate (torch==2.11.0, galore-torch==1.0; CPU, float32), from the repository root:

    .venv/bin/python crates/trainer/tests/reference/galore_reference.py

which rewrites crates/trainer/tests/reference/galore_reference.json next to this file. With
`--out PATH` it writes PATH instead; the Rust test does that when TRAINER_PYTHON is set (as
scripts/test sets it) and checks that the committed JSON still matches a fresh run.

Three parameter groups, as our optimizer splits the parameters it is given: the projected 2-D
weights (rank 2, a new SVD projector every 2 steps, so steps 1, 3 and 5 refresh it, scale 0.25;
one taller than wide, one square, one wider than tall, to cover both projection sides), a 2-D
weight that is not projected but decayed, and 1-D parameters with no decay. Six steps with a
changing learning rate. Inputs come from torch.rand (uniform bits) so that they are the same on
every machine. After every step the JSON has each parameter, and for each projected weight its
low-rank moments and its projection matrix. Every float is a float32 value written exactly.
"""

import argparse
import json
import logging
import warnings
from importlib.metadata import version
from pathlib import Path

import torch

# galore_torch's __init__ imports bitsandbytes (for its 8-bit AdamW, unused here), which logs and
# warns about missing CPU kernels on import.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import galore_torch
    from galore_torch import GaLoreAdamW

SEED = 4321
# (name, shape, group, gradient scale) in the order the Rust optimizer receives them; group is
# "galore", "decay" or "no_decay". The norm's gradients are tiny, so that sqrt(v) is comparable to
# eps and where eps enters the update matters.
PARAMS = [
    ("proj.tall", [6, 4], "galore", 1.0),
    ("bias", [5], "no_decay", 1.0),
    ("proj.square", [4, 4], "galore", 1.0),
    ("plain.weight", [3, 2], "decay", 1.0),
    ("proj.wide", [3, 5], "galore", 1.0),
    ("norm.weight", [4], "no_decay", 1e-4),
]
LRS = [1e-2, 2e-2, 1.5e-2, 5e-3, 1e-3, 1e-2]
# Gradient scales change from step to step so that the moments and bias corrections matter.
GRAD_SCALES = [1.0, 0.5, 2.0, 0.1, 1.0, 0.7]
GALORE = {
    "betas": [0.9, 0.999],
    "eps": 1e-6,
    # Large, so that applying it after the update (the reference) or before (torch's AdamW) differs
    # clearly.
    "weight_decay": 0.5,
    "rank": 2,
    "update_proj_gap": 2,
    "scale": 0.25,
    # The patterns our optimizer gets to select the same weights as the "galore" group.
    "target": ["proj.*"],
}


def uniform(gen, shape, scale):
    """Uniform in [-scale, scale), float32."""
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * scale


def flat(t):
    return t.detach().reshape(-1).tolist()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    out = parser.parse_args().out

    gen = torch.Generator().manual_seed(SEED)
    init = [uniform(gen, shape, 1.0) for _, shape, _, _ in PARAMS]
    grads = [[uniform(gen, shape, s * gs) for _, shape, _, gs in PARAMS] for s in GRAD_SCALES]

    params = [t.clone().requires_grad_(True) for t in init]
    by_group = lambda g: [p for p, (_, _, group, _) in zip(params, PARAMS) if group == g]  # noqa: E731
    opt = GaLoreAdamW(
        [
            {
                "params": by_group("galore"),
                "rank": GALORE["rank"],
                "update_proj_gap": GALORE["update_proj_gap"],
                "scale": GALORE["scale"],
                "proj_type": "std",
            },
            {"params": by_group("decay")},
            {"params": by_group("no_decay"), "weight_decay": 0.0},
        ],
        lr=LRS[0],
        betas=tuple(GALORE["betas"]),
        eps=GALORE["eps"],
        weight_decay=GALORE["weight_decay"],
        no_deprecation_warning=True,
    )

    after_step = []
    for step, lr in enumerate(LRS):
        for group in opt.param_groups:
            group["lr"] = lr
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step()
        state = {}
        for p, (name, _, group, _) in zip(params, PARAMS):
            if group == "galore":
                s = opt.state[p]
                state[name] = {
                    "exp_avg": flat(s["exp_avg"]),
                    "exp_avg_sq": flat(s["exp_avg_sq"]),
                    "ortho": flat(s["projector"].ortho_matrix),
                    "ortho_shape": list(s["projector"].ortho_matrix.shape),
                }
        after_step.append({"params": [flat(p) for p in params], "state": state})

    doc = {
        "provenance": {
            "script": "crates/trainer/tests/reference/galore_reference.py",
            "torch": torch.__version__,
            "galore_torch": version("galore-torch"),
            "module": galore_torch.__name__ + ".GaLoreAdamW",
            "seed": SEED,
        },
        "params": [
            {"name": n, "shape": s, "group": g, "init": flat(t)} for (n, s, g, _), t in zip(PARAMS, init)
        ],
        "grads": [[flat(g) for g in step] for step in grads],
        "galore": GALORE,
        "lrs": LRS,
        "after_step": after_step,
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
