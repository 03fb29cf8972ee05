"""The pure torchao flow: `quantize_` prepare -> plain PyTorch loop with the MEC term -> `quantize_` convert.

    python examples/torchao_quantize.py                  # W2A2 on 12,800 Fashion-MNIST images
    python examples/torchao_quantize.py --max-steps 30   # shortest (used by tests/test_examples.py)

Measured here (2 shared CPU cores): 36 s with `--max-steps 30` (CPU shared with another job).

Note: `quantize_` applies the config's bits to EVERY selected layer (here also the first conv and
the classifier); `prepare_model` / `convert_model` apply the 8-bit edge-layer policy instead.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torchao.quantization import quantize_

from mec_quant_plugin import MECQuantConfig, MECRegularizer, is_fake_quantized, is_supported_layer
from mec_quant_plugin.data import load_fashion_mnist


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 2, 1), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xb).argmax(1) for xb in x.split(500)])
    model.train()
    return (pred == y).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weight-bits", type=int, default=2)
    p.add_argument("--act-bits", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=100, help="training steps (batch 128)")
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.perf_counter()
    torch.manual_seed(args.seed)

    x, y = load_fashion_mnist("train", limit=128 * args.max_steps)
    xt, yt = load_fashion_mnist("test", limit=args.eval_samples)
    model = small_cnn()
    config = MECQuantConfig(weight_bits=args.weight_bits, act_bits=args.act_bits)

    # 1. prepare: swap Linear / Conv2d for fake-quantized versions (learnable LSQ step sizes)
    quantize_(model, config.replace(step="prepare"), filter_fn=is_supported_layer)
    # 2. the coding-length term; the optimizer is built AFTER prepare so it owns the step sizes
    mec = MECRegularizer(model, config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps = len(x) // 128
    for step, (xb, yb) in enumerate(zip(x.split(128), y.split(128))):
        mec.set_progress(step, steps)
        loss = nn.functional.cross_entropy(model(xb), yb) + mec()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {mec.last_stats}")
    mec.remove()  # drop the capture hooks before converting
    fake_quant_acc = accuracy(model, xt, yt)

    # 3. convert: torchao int weights (IntxUnpackedToInt8Tensor) with the learned scales
    quantize_(model, config.replace(step="convert"), filter_fn=is_fake_quantized)
    acc = accuracy(model, xt, yt)
    print(f"W{args.weight_bits}A{args.act_bits}: test accuracy {acc:.3f} after convert "
          f"({fake_quant_acc:.3f} fake-quantized) on {len(yt)} images; {time.perf_counter() - start:.0f} s")
    print(f"conv weight after convert: {type(model[2].weight).__name__}")


if __name__ == "__main__":
    main()
