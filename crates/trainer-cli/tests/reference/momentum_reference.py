"""Reference for crates/trainer-cli/tests/momentum.rs: what PyTorch's optimizers do when a
scheduler changes their momentum every step, as `[train] momentum_schedule = "inverse_lr"` does:

    momentum(t) = max - (max - min) * lr(t) / peak_lr

with max the optimizer's own momentum (SGD's `momentum`, Adam's `betas[0]`). This is how
torch.optim.lr_scheduler.OneCycleLR(cycle_momentum=True) drives them: it writes
`group["momentum"]` or `group["betas"] = (beta1, beta2)` before each step, and the optimizer reads
them afresh; Adam's bias correction is then `1 - beta1 ** step` with the current beta1
(torch/optim/adam.py, `_single_tensor_adam`; galore_torch/adamw.py likewise).

Cases: torch.optim.AdamW (two groups, decayed and not), torch.optim.SGD with momentum (plain,
Nesterov, dampening with weight decay), and galore_torch.GaLoreAdamW (a projected weight, a decayed
weight, an undecayed bias). Six steps whose LR warms up to the peak and decays again. Inputs come
from torch.rand (uniform bits, the same on every machine); CPU, float32.

Run from the repository root: `.venv/bin/python crates/trainer-cli/tests/reference/momentum_reference.py`
prints one JSON line: for each case its settings, initial parameters, gradients, LRs, the
momentum of each step, and every parameter after every step. The test runs it through
$TRAINER_PYTHON (torch 2.11.0, galore-torch 1.0) each time.
"""

import json
import logging
import warnings

import torch

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from galore_torch import GaLoreAdamW

SEED = 2468
# LR of each step as a fraction of the peak: warmup to the peak, then decay.
LR_FRACTIONS = [0.25, 0.5, 0.75, 1.0, 0.5, 0.1]
# Gradient scales change from step to step so that the moments and bias corrections matter.
GRAD_SCALES = [1.0, 0.5, 2.0, 0.1, 1.0, 0.7]
# (name, shape, group): group is "decay", "no_decay" or "galore" (projected, and decayed).
PARAMS = [("w", [4, 3], "decay"), ("b", [5], "no_decay"), ("c", [2, 3, 2], "decay")]
GALORE_PARAMS = [("proj.tall", [6, 4], "galore"), ("bias", [5], "no_decay"), ("plain.weight", [3, 2], "decay")]

CASES = [
    {"name": "adamw", "kind": "adamw", "peak_lr": 1e-2, "betas": [0.95, 0.999], "momentum_min": 0.85,
     "eps": 1e-8, "weight_decay": 0.1},
    {"name": "sgd momentum", "kind": "sgd", "peak_lr": 0.1, "momentum": 0.9, "momentum_min": 0.5,
     "dampening": 0.0, "nesterov": False, "weight_decay": 0.0},
    {"name": "sgd nesterov", "kind": "sgd", "peak_lr": 0.1, "momentum": 0.9, "momentum_min": 0.5,
     "dampening": 0.0, "nesterov": True, "weight_decay": 0.0},
    {"name": "sgd dampening", "kind": "sgd", "peak_lr": 0.1, "momentum": 0.9, "momentum_min": 0.5,
     "dampening": 0.1, "nesterov": False, "weight_decay": 0.01},
    {"name": "galore_adamw", "kind": "galore_adamw", "peak_lr": 1e-2, "betas": [0.9, 0.999], "momentum_min": 0.8,
     "eps": 1e-6, "weight_decay": 0.5, "rank": 2, "update_proj_gap": 2, "scale": 0.25, "target": ["proj.*"]},
]


def uniform(gen, shape, scale):
    """Uniform in [-scale, scale), float32."""
    return (torch.rand(shape, generator=gen, dtype=torch.float32) * 2 - 1) * scale


def flat(t):
    return t.detach().reshape(-1).tolist()


def momentum_of(case):
    return case["betas"][0] if "betas" in case else case["momentum"]


def make_optimizer(case, params, spec):
    by_group = lambda g: [p for p, (_, _, group) in zip(params, spec) if group == g]  # noqa: E731
    if case["kind"] == "adamw":
        groups = [{"params": by_group("decay"), "weight_decay": case["weight_decay"]},
                  {"params": by_group("no_decay"), "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=case["peak_lr"], betas=tuple(case["betas"]), eps=case["eps"])
    if case["kind"] == "sgd":
        groups = [{"params": by_group("decay"), "weight_decay": case["weight_decay"]},
                  {"params": by_group("no_decay"), "weight_decay": 0.0}]
        return torch.optim.SGD(groups, lr=case["peak_lr"], momentum=case["momentum"],
                               dampening=case["dampening"], nesterov=case["nesterov"])
    return GaLoreAdamW(
        [{"params": by_group("galore"), "rank": case["rank"], "update_proj_gap": case["update_proj_gap"],
          "scale": case["scale"], "proj_type": "std"},
         {"params": by_group("decay")},
         {"params": by_group("no_decay"), "weight_decay": 0.0}],
        lr=case["peak_lr"], betas=tuple(case["betas"]), eps=case["eps"], weight_decay=case["weight_decay"],
        no_deprecation_warning=True,
    )


def run(case, gen):
    spec = GALORE_PARAMS if case["kind"] == "galore_adamw" else PARAMS
    init = [uniform(gen, shape, 1.0) for _, shape, _ in spec]
    grads = [[uniform(gen, shape, s) for _, shape, _ in spec] for s in GRAD_SCALES]
    params = [t.clone().requires_grad_(True) for t in init]
    opt = make_optimizer(case, params, spec)
    peak, mx, mn = case["peak_lr"], momentum_of(case), case["momentum_min"]
    lrs, momenta, after_step = [], [], []
    for step, fraction in enumerate(LR_FRACTIONS):
        lr = peak * fraction
        # The same expression, in the same order, as MomentumSchedule::momentum.
        m = mx - (mx - mn) * (lr / peak)
        for group in opt.param_groups:
            group["lr"] = lr
            if "betas" in group:
                group["betas"] = (m, group["betas"][1])
            else:
                group["momentum"] = m
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step()
        lrs.append(lr)
        momenta.append(m)
        after_step.append([flat(p) for p in params])
    out = dict(case)
    out.update({
        "params": [{"name": n, "shape": s, "decay": g != "no_decay", "init": flat(t)}
                   for (n, s, g), t in zip(spec, init)],
        "grads": [[flat(g) for g in step] for step in grads],
        "lrs": lrs,
        "momenta": momenta,
        "after_step": after_step,
    })
    return out


def main():
    gen = torch.Generator().manual_seed(SEED)
    cases = [run(case, gen) for case in CASES]
    print(json.dumps({"torch": torch.__version__, "cases": cases}))


if __name__ == "__main__":
    main()
