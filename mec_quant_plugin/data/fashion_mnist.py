"""Fashion-MNIST (Zalando, MIT): the local IDX files of Debian's `dataset-fashion-mnist`, else the Hub.

Why a hand-written IDX reader: the Debian package ships the original gzip IDX files, which
`datasets` has no builder for; the format is a 16-byte (images) / 8-byte (labels) header followed
by raw uint8, so a few lines suffice.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import torch

DEFAULT_DIRS = ("/usr/share/datasets/fashion-mnist",)
HUB_NAME = "zalando-datasets/fashion_mnist"
ENV_DIR = "MEC_QUANT_FASHION_MNIST_DIR"
# Per-pixel statistics of the training split, used to standardize inputs.
MEAN, STD = 0.2860, 0.3530

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class FashionMNISTNotFound(FileNotFoundError):
    """Neither the local files nor the Hub copy could be read."""


def _read_idx(path: Path, header: int) -> torch.Tensor:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)


def _local_dir() -> Path | None:
    candidates = [os.environ[ENV_DIR]] if os.environ.get(ENV_DIR) else []
    for d in [*candidates, *DEFAULT_DIRS]:
        if (Path(d) / "train-images-idx3-ubyte.gz").exists():
            return Path(d)
    return None


def _from_hub(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    from datasets import load_dataset

    ds = load_dataset(HUB_NAME, split=split)
    images = torch.from_numpy(np.stack([np.asarray(im, dtype=np.uint8) for im in ds["image"]]))
    return images, torch.tensor(ds["label"], dtype=torch.long)


def load_fashion_mnist(
    split: str = "train", *, limit: int | None = None, normalize: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 1, 28, 28) and labels (N,) of Fashion-MNIST's 'train' (60k) or 'test' (10k) split.

    Looks in $MEC_QUANT_FASHION_MNIST_DIR, then /usr/share/datasets/fashion-mnist (Debian package
    `dataset-fashion-mnist`), then downloads `zalando-datasets/fashion_mnist` from the Hub.
    `normalize` returns float images standardized with the training statistics, else uint8.

    Example:
        >>> x, y = load_fashion_mnist("test", limit=256)
        >>> x.shape, y.shape
        (torch.Size([256, 1, 28, 28]), torch.Size([256]))

    Raises:
        ValueError: split is not 'train' or 'test'.
        FashionMNISTNotFound: no local copy and the Hub is unreachable (says how to get it).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    local = _local_dir()
    if local is not None:
        prefix = "train" if split == "train" else "t10k"
        images = _read_idx(local / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _read_idx(local / f"{prefix}-labels-idx1-ubyte.gz", 8).long()
    else:
        try:
            images, labels = _from_hub(split)
        except Exception as exc:  # offline, DNS failure, missing cache: all end the same way
            raise FashionMNISTNotFound(
                "Fashion-MNIST is not on this machine and could not be downloaded from the Hub "
                f"({HUB_NAME}: {type(exc).__name__}). Get it with `sudo apt-get install -y "
                "dataset-fashion-mnist` (Debian/Ubuntu, puts the files in "
                f"{DEFAULT_DIRS[0]}), or download the four *-ubyte.gz files from "
                f"https://github.com/zalandoresearch/fashion-mnist and set {ENV_DIR} to their folder."
            ) from exc
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    images = images.unsqueeze(1)
    if normalize:
        images = (images.float() / 255.0 - MEAN) / STD
    return images, labels
