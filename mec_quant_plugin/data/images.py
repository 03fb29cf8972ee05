"""Image data sets as uint8 tensors: decode once, cache, augment on tensors.

Decoding 50,000 JPEGs (CIFAR-10 as stored on the Hub) with PIL costs far more than a training
step on the CPU, so an image column is decoded ONCE into an (N, C, H, W) uint8 tensor, cached as a
safetensors file keyed by the data set's fingerprint, and every epoch augments that tensor in
batches (`random_crop_flip`): the literature's CIFAR augmentation (random crop after 4-pixel zero
padding, horizontal flip) on whole batches, no per-image Python.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

CACHE_ENV = "MEC_QUANT_CACHE"


def default_cache_dir() -> Path:
    """Where decoded image tensors are cached: `$MEC_QUANT_CACHE`, else ~/.cache/mec_quant_plugin."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "mec_quant_plugin"))


def _to_chw_uint8(image) -> np.ndarray:
    """One image (PIL, HxW / HxWxC array or nested list) as a CxHxW uint8 array."""
    if hasattr(image, "convert"):  # PIL
        image = image.convert("RGB") if image.mode not in ("L", "RGB") else image
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        # integers only: float pixels mean 0..1 (a float 1.0 is white, not 1/255), so they are not decoded here
        if not np.issubdtype(arr.dtype, np.integer) or (arr.size and (arr.min() < 0 or arr.max() > 255)):
            raise ValueError(
                f"decode_images expects integer pixel values in 0..255, got "
                f"{f'values in [{arr.min()}, {arr.max()}] of ' if arr.size else ''}dtype {arr.dtype}; "
                "pass float images through your own collator."
            )
        arr = arr.astype(np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3:
        raise ValueError(f"an image must be HxW or HxWxC, got shape {arr.shape}.")
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_images(dataset, column: str, cache_dir: str | os.PathLike | None = None) -> Tensor:
    """The `column` of a `datasets.Dataset` as one (N, C, H, W) uint8 tensor, cached on disk.

    The cache key is the data set's `_fingerprint` (changes whenever its content or the
    transforms applied to it change) plus the column name; the file is written atomically.

    Example:
        >>> x = decode_images(load_dataset("uoft-cs/cifar10", split="train"), "img")  # (50000, 3, 32, 32)

    Raises:
        ValueError: images of different sizes (resize them first) or values outside 0..255.
    """
    from safetensors.torch import load_file, save_file

    # Only data sets backed by files have a fingerprint that is stable across processes; an
    # in-memory one (Dataset.from_dict) gets a random fingerprint, so caching it would only leak files.
    fingerprint = getattr(dataset, "_fingerprint", None) if getattr(dataset, "cache_files", None) else None
    path = None
    if fingerprint:
        key = hashlib.sha256(f"{fingerprint}:{column}".encode()).hexdigest()[:20]
        path = Path(cache_dir or default_cache_dir()) / f"images-{key}.safetensors"
        if path.exists():
            return load_file(str(path))["images"]
    arrays = [_to_chw_uint8(img) for img in dataset[column]] if len(dataset) else []
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"column {column!r} holds images of several sizes {sorted(shapes)[:4]}; resize them first.")
    images = torch.from_numpy(np.stack(arrays)) if arrays else torch.empty(0, 3, 0, 0, dtype=torch.uint8)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"images": images}, str(tmp))
        os.replace(tmp, path)
    return images


def random_crop_flip(images: Tensor, padding: int = 4, generator: torch.Generator | None = None) -> Tensor:
    """Random crop of each image after `padding` zero pixels on every side, and a random
    horizontal flip (probability 1/2), for a whole (N, C, H, W) batch at once.

    Example:
        >>> random_crop_flip(torch.zeros(8, 3, 32, 32, dtype=torch.uint8)).shape
        torch.Size([8, 3, 32, 32])
    """
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])  # (n, h)
    cols = (dx[:, None] + torch.arange(w)[None, :])  # (n, w)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_n = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_n, rows[:, :, None], cols[:, None, :]]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2).contiguous()


class DecodedImageDataset(torch.utils.data.Dataset):
    """Decoded images (uint8 (N, C, H, W)) and labels as a torch Dataset of
    `{"image": uint8 CxHxW tensor, "labels": int}`, randomly cropped (after `padding` zero pixels)
    and flipped per item when `augment` (training only); the collator turns them into model inputs.

    Example:
        >>> ds = DecodedImageDataset(torch.zeros(4, 3, 32, 32, dtype=torch.uint8), [0, 1, 2, 3], augment=True)
        >>> ds[0]["image"].shape
        torch.Size([3, 32, 32])
    """

    def __init__(self, images: Tensor, labels, *, augment: bool = False, padding: int = 4) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}.")
        self.images, self.labels = images, torch.as_tensor(labels, dtype=torch.long)
        if len(self.labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(self.labels)} labels.")
        self.augment, self.padding = augment, padding

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image = self.images[index]
        if self.augment:
            # torch's global generator: seeded by the Trainer, and distinct in each DataLoader worker
            image = random_crop_flip(image[None], self.padding)[0]
        return {"image": image, "labels": self.labels[index]}
