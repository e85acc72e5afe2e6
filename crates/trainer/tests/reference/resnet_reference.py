#!/usr/bin/env python3
"""Reference outputs from torchvision's ResNets for tests/resnet_parity.rs.

Usage: resnet_reference.py OUT_DIR NAME...    NAME a key of CASES, or `layouts`

Each NAME is written to OUT_DIR/NAME/ (one Python start for all: importing torch and
torchvision takes seconds on a small machine).

A CASE builds one torchvision model with random weights (`weights=None`: nothing is
downloaded), seed 0 (reset per case), fp32, on the CPU, and makes its BatchNorms non-trivial so
that eval mode tests something: BN weight U(0.5, 1.5), bias N(0, 0.2); running statistics set
from one train-mode pass over a calibration batch (momentum 1 for that pass only, so they are
realistic and the eval-mode activations keep a sane scale), then perturbed (mean + N(0, 0.2),
var * U(0.5, 2)), and num_batches_tracked set to random counts. It writes:

- model.safetensors: that state dict (weights and buffers, torchvision's key names), the state
  before any of the passes below.
- reference.safetensors:
    input        [2, 3, 64, 64] fp32, N(0, 1)
    labels       [2] int64
    logits_eval  [2, classes]: `model.eval(); model(input)` (uses the running statistics)
    logits_train [2, classes]: then `model.train(); model(input)` (batch statistics; this pass
                 updates the running statistics with momentum 0.1 and increments
                 num_batches_tracked)
    loss_train   [1]: F.cross_entropy(logits_train, labels)
    grad.NAME    the gradient of loss_train for a few parameters (GRADS)
- after_train.safetensors: every buffer (running_mean, running_var, num_batches_tracked) after
  the train-mode pass.
- case.json: the torchvision constructor and kwargs, the architecture read off the model (block
  type, blocks per stage, bottleneck width), and provenance (versions, seed).

`layouts` writes layouts.json: for each torchvision ImageNet ResNet (resnet18 ... 152,
wide_resnet50_2, wide_resnet101_2, 1000 classes) its state-dict keys in order with shape and
dtype. The models are built on the meta device, so this allocates nothing and takes a second.

Exit status 3 with a message on stderr when torch, torchvision or safetensors is missing.
"""

import json
import os
import sys

try:
    import torch
    import torch.nn.functional as F
    import torchvision
    from safetensors.torch import save_file
    from torchvision.models import resnet
except ImportError as e:
    print(f"missing Python package: {e}. Run scripts/test, which installs them.", file=sys.stderr)
    sys.exit(3)

SEED = 0
BATCH, CHANNELS, SIZE = 2, 3, 64

# name -> (torchvision constructor, kwargs). Fewer classes where 1000 would only make files big.
CASES = {
    "resnet18": ("resnet18", dict()),
    "resnet50": ("resnet50", dict(num_classes=10)),
    "wide_resnet50_2": ("wide_resnet50_2", dict(num_classes=10)),
}

LAYOUTS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
           "wide_resnet50_2", "wide_resnet101_2"]

# Gradients compared: the stem, a BN affine pair, a first block, a projection shortcut, the head.
GRADS = ["conv1.weight", "bn1.weight", "bn1.bias", "layer1.0.conv1.weight",
         "layer2.0.downsample.0.weight", "layer4.0.downsample.1.weight", "fc.weight", "fc.bias"]


def architecture(model):
    """What our ResNetConfig must say, read off the torchvision module (not from our presets)."""
    block = model.layer1[0]
    bottleneck = isinstance(block, resnet.Bottleneck)
    return dict(
        block="bottleneck" if bottleneck else "basic",
        stage_blocks=[len(getattr(model, f"layer{i}")) for i in range(1, 5)],
        # torchvision's bottleneck inner width is planes * base_width / 64; layer1 has planes 64.
        bottleneck_width_layer1=block.conv1.out_channels if bottleneck else None,
        num_classes=model.fc.out_features,
    )


@torch.no_grad()
def randomise_batchnorm(model):
    gen_input = torch.randn(4, CHANNELS, SIZE, SIZE)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.2)
        bn.momentum = 1.0
    model.train()
    model(gen_input)
    for bn in bns:
        bn.momentum = 0.1
        bn.running_mean.add_(0.2 * torch.randn_like(bn.running_mean))
        bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.5, 2.0))
        bn.num_batches_tracked.fill_(int(torch.randint(0, 1000, ())))


def case(out, name):
    ctor, kwargs = CASES[name]
    torch.manual_seed(SEED)
    model = getattr(torchvision.models, ctor)(weights=None, **kwargs)
    randomise_batchnorm(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(out, "model.safetensors"))

    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE)
    labels = torch.randint(0, model.fc.out_features, (BATCH,))
    model.eval()
    with torch.no_grad():
        logits_eval = model(x)
    model.train()
    model.zero_grad()
    logits_train = model(x)
    loss = F.cross_entropy(logits_train, labels)
    loss.backward()
    params = dict(model.named_parameters())
    refs = {"input": x, "labels": labels, "logits_eval": logits_eval,
            "logits_train": logits_train.detach(), "loss_train": loss.detach().reshape(1)}
    for g in GRADS:
        refs[f"grad.{g}"] = params[g].grad
    save_file({k: v.contiguous() for k, v in refs.items()}, os.path.join(out, "reference.safetensors"))
    save_file({k: v.contiguous() for k, v in model.named_buffers()},
              os.path.join(out, "after_train.safetensors"))

    info = {
        "case": name,
        "constructor": f"torchvision.models.{ctor}",
        "kwargs": kwargs,
        "architecture": architecture(model),
        "provenance": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                       "seed": SEED, "weights": None, "dtype": "float32"},
    }
    with open(os.path.join(out, "case.json"), "w") as f:
        json.dump(info, f, indent=1)


def layouts(out):
    listing = {}
    for ctor in LAYOUTS:
        with torch.device("meta"):
            model = getattr(torchvision.models, ctor)(weights=None)
        listing[ctor] = [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                         for k, v in model.state_dict().items()]
    with open(os.path.join(out, "layouts.json"), "w") as f:
        json.dump({"torchvision": torchvision.__version__, "models": listing}, f)


def main():
    names = sys.argv[2:]
    if not names or any(n not in CASES and n != "layouts" for n in names):
        print(f"usage: {sys.argv[0]} OUT_DIR NAME..., NAME one of {', '.join(CASES)}, layouts",
              file=sys.stderr)
        sys.exit(2)
    for name in names:
        out = os.path.join(sys.argv[1], name)
        os.makedirs(out, exist_ok=True)
        if name == "layouts":
            layouts(out)
        else:
            case(out, name)


if __name__ == "__main__":
    main()
