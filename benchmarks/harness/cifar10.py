"""CIFAR-10 for the ResNet-20 benchmark: data as uint8 tensors, the ResNet-20 model, batches.

The data come from the local parquet copy (`../shared/data/cifar10/` from the project root, or
the folder in `$MEC_QUANT_CIFAR10`) through `datasets`, exactly as the Hub copy `uoft-cs/cifar10`
loads; without a local copy the Hub id is used. Images are decoded once and cached
(`mec_quant_plugin.data.images`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mec_quant_plugin.data.images import decode_images, random_crop_flip

ROOT = Path(__file__).resolve().parents[2]
HUB_ID = "uoft-cs/cifar10"
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def local_folder() -> Path | None:
    """The offline parquet copy, if present: `$MEC_QUANT_CIFAR10` or ../shared/data/cifar10."""
    for candidate in (os.environ.get("MEC_QUANT_CIFAR10"), ROOT.parent / "shared" / "data" / "cifar10"):
        if candidate and (Path(candidate) / "train.parquet").exists():
            return Path(candidate)
    return None


def load_cifar10() -> dict[str, tuple[Tensor, Tensor]]:
    """{"train": (x, y), "test": (x, y)} with x (N, 3, 32, 32) uint8 and y (N,) int64."""
    from datasets import load_dataset

    folder = local_folder()
    if folder is not None:
        ds = load_dataset("parquet", data_files={s: str(folder / f"{s}.parquet") for s in ("train", "test")})
    else:
        ds = load_dataset(HUB_ID)
    return {split: (decode_images(ds[split], "img"), torch.tensor(ds[split]["label"], dtype=torch.long))
            for split in ("train", "test")}


def normalize(x: Tensor) -> Tensor:
    """uint8 (N, 3, H, W) -> standardized float32, channels_last (faster convolutions on CPU)."""
    return ((x.float() / 255.0 - MEAN) / STD).contiguous(memory_format=torch.channels_last)


def epoch_batches(x: Tensor, y: Tensor, *, batch_size: int, seed: int, epoch: int, augment: bool = True):
    """The batches of one epoch: a permutation and augmentation fixed by (seed, epoch), so every
    method sees the same data order and a resumed run continues with the same batches."""
    g = torch.Generator().manual_seed(1_000_003 * seed + epoch)
    order = torch.randperm(len(x), generator=g)
    for start in range(0, len(x) - batch_size + 1, batch_size):  # drop the last partial batch
        idx = order[start:start + batch_size]
        xb = random_crop_flip(x[idx], 4, generator=g) if augment else x[idx]
        yield normalize(xb), y[idx]


class BasicBlock(nn.Module):
    """He et al. (2016) CIFAR basic block; shortcut option A (parameter-free: subsample + zero channels)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, cout - cin

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR (16-32-64 channels, 3x3 basic blocks, 0.27M parameters)."""

    def __init__(self, num_classes: int = 10, depth: int = 20) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy of `model` (eval mode) on uint8 images `x`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = sum(int((model(normalize(xb).to(device)).argmax(1).cpu() == yb).sum())
                  for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    model.train(was_training)
    return correct / len(x)
