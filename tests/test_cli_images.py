"""The CLI's image path: decoded once, augmented for training only, values in the range the model expects."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Array3D, Dataset, Features, Image, Value
from PIL import Image as PILImage
from transformers import ResNetConfig

from mec_quant_plugin.cli.tasks import ImageBatchCollator, _decoded_image_sets


def _pixels(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)


def _as_pil(arrays):
    return Dataset.from_dict({"img": [PILImage.fromarray(a) for a in arrays], "label": list(range(len(arrays)))},
                             features=Features({"img": Image(), "label": Value("int64")}))


def _as_uint8_array(arrays):  # datasets hands Array3D uint8 over as nested int lists
    return Dataset.from_dict({"img": arrays, "label": list(range(len(arrays)))},
                             features=Features({"img": Array3D(arrays.shape[1:], "uint8"), "label": Value("int64")}))


@pytest.mark.parametrize("build", [_as_pil, _as_uint8_array], ids=["pil", "uint8-array"])
def test_model_receives_standardized_pixels_whatever_the_storage(build):
    arrays = _pixels()
    train, evals = _decoded_image_sets(build(arrays), build(arrays), "img", "label", None, augment=False)
    batch = ImageBatchCollator(ResNetConfig(num_channels=3), None, fashion=False)([evals[i] for i in range(4)])
    expected = (torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(batch["pixel_values"], expected)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert batch["labels"].tolist() == [0, 1, 2, 3]


def test_only_the_training_set_is_augmented():
    arrays = _pixels(8)
    torch.manual_seed(0)
    train, evals = _decoded_image_sets(_as_pil(arrays), _as_pil(arrays), "img", "label", None, augment=True)
    assert train.augment and not evals.augment
    reference = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    assert all(torch.equal(evals[i]["image"], reference[i]) for i in range(8))
    assert any(not torch.equal(train[i]["image"], reference[i]) for i in range(8))


def test_float_images_fall_back_to_the_per_image_path():
    ds = Dataset.from_dict({"img": [np.full((4, 4, 3), 0.5).tolist()], "label": [0]})
    assert _decoded_image_sets(ds, ds, "img", "label", None, augment=True) is None


def test_collator_resizes_to_the_model_size_and_matches_its_channels():
    from transformers import ViTConfig

    collate = ImageBatchCollator(ViTConfig(image_size=16, num_channels=3), None, fashion=False)
    gray = {"image": torch.zeros(1, 8, 8, dtype=torch.uint8), "labels": 0}
    assert collate([gray])["pixel_values"].shape == (1, 3, 16, 16)


def _cifar_like_parquet(folder, n: int = 6) -> np.ndarray:
    arrays = _pixels(n)
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        _as_pil(arrays).to_parquet(str(folder / f"{split}.parquet"))
    return arrays


def test_hub_name_reads_the_local_copy_named_by_the_environment(tmp_path, monkeypatch):
    from mec_quant_plugin.cli.data import load_raw_dataset

    arrays = _cifar_like_parquet(tmp_path / "mirror" / "cifar10")
    monkeypatch.setenv("MEC_QUANT_DATASETS_DIR", str(tmp_path / "mirror"))
    raw = load_raw_dataset("uoft-cs/cifar10", "image-classification")
    assert set(raw) == {"train", "test"} and len(raw["train"]) == len(arrays)
    assert np.array_equal(np.asarray(raw["test"][0]["img"]), arrays[0])


def test_hub_name_without_a_local_copy_is_not_substituted(tmp_path, monkeypatch):
    from mec_quant_plugin.cli.data import local_mirror

    monkeypatch.setenv("MEC_QUANT_DATASETS_DIR", str(tmp_path))
    assert local_mirror("uoft-cs/cifar10") is None
    monkeypatch.delenv("MEC_QUANT_DATASETS_DIR")
    assert local_mirror("uoft-cs/cifar10") is None
