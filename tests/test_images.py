"""Images decoded once to uint8 tensors (cached) and augmented on tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from mec_quant_plugin.data.images import DecodedImageDataset, decode_images, random_crop_flip


def _image_dataset(n: int = 6) -> tuple[Dataset, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    ds = Dataset.from_dict({"img": [PILImage.fromarray(a) for a in arrays], "label": list(range(n))},
                           features=Features({"img": Image(), "label": Value("int64")}))
    return ds, arrays


def test_decode_images_gives_chw_uint8_equal_to_the_pixels_and_caches_file_backed_sets(tmp_path):
    ds, arrays = _image_dataset()
    ds.save_to_disk(str(tmp_path / "ds"))
    ds = Dataset.load_from_disk(str(tmp_path / "ds"))  # backed by Arrow files: a stable fingerprint
    x = decode_images(ds, "img", cache_dir=tmp_path / "cache")
    assert x.dtype == torch.uint8 and x.shape == (6, 3, 8, 8)
    assert torch.equal(x, torch.from_numpy(arrays).permute(0, 3, 1, 2))  # PNG: lossless
    cached = list((tmp_path / "cache").glob("images-*.safetensors"))
    assert len(cached) == 1
    from safetensors.torch import save_file

    save_file({"images": torch.zeros_like(x)}, str(cached[0]))  # a second call reads the cache
    assert int(decode_images(ds, "img", cache_dir=tmp_path / "cache").max()) == 0


def test_decode_images_does_not_cache_in_memory_sets(tmp_path):
    ds, arrays = _image_dataset()
    x = decode_images(ds, "img", cache_dir=tmp_path)
    assert torch.equal(x, torch.from_numpy(arrays).permute(0, 3, 1, 2))
    assert list(tmp_path.iterdir()) == []


def test_decode_images_reads_uint8_arrays_given_as_lists(tmp_path):
    arrays = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    ds = Dataset.from_dict({"image": arrays.tolist()})  # datasets hands uint8 arrays over as int lists
    x = decode_images(ds, "image", cache_dir=tmp_path)
    assert x.shape == (2, 1, 4, 4) and int(x.max()) == 31


def test_decode_images_refuses_values_outside_uint8(tmp_path):
    ds = Dataset.from_dict({"image": [[[0.0, 300.0]]]})
    with pytest.raises(ValueError, match="0..255"):
        decode_images(ds, "image", cache_dir=tmp_path)


def test_random_crop_flip_takes_each_image_from_its_padded_copy():
    x = torch.randint(0, 256, (16, 3, 10, 10), dtype=torch.uint8)
    out = random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    flips = 0
    for i in range(len(x)):
        windows = [padded[i, :, dy:dy + 10, dx:dx + 10] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(out[i], w) for w in windows)
        flipped = any(torch.equal(out[i], w.flip(-1)) for w in windows)
        assert plain or flipped
        flips += flipped and not plain
    assert 0 < flips < len(x)  # both orientations occur


def test_random_crop_flip_is_reproducible_from_the_generator():
    x = torch.randint(0, 256, (8, 3, 6, 6), dtype=torch.uint8)
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(3))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.dtype == torch.uint8


def test_image_tensor_dataset_augments_only_when_asked():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(2, 3, 8, 8)
    plain = DecodedImageDataset(x, [0, 1])
    assert torch.equal(plain[1]["image"], x[1]) and int(plain[1]["labels"]) == 1
    torch.manual_seed(0)
    augmented = DecodedImageDataset(x, [0, 1], augment=True)
    assert any(not torch.equal(augmented[0]["image"], x[0]) for _ in range(10))
    with pytest.raises(ValueError, match="uint8"):
        DecodedImageDataset(x.float(), [0, 1])
