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


# ---- what the model receives, for every way images are stored (issue 10: uint8 arrays handed over as
# lists were never divided by 255, the model trained on inputs in [-1, 509]) ------------------------


def _as_int_lists(arrays):  # a plain nested list of ints (datasets infers int64 sequences)
    return Dataset.from_dict({"img": arrays.tolist(), "label": list(range(len(arrays)))})


def _as_float_array(arrays):  # float32 pixels in [0, 1] (Array3D float32)
    return Dataset.from_dict({"img": arrays.astype(np.float32) / 255, "label": list(range(len(arrays)))},
                             features=Features({"img": Array3D(arrays.shape[1:], "float32"), "label": Value("int64")}))


def _as_float_lists(arrays):
    return Dataset.from_dict({"img": (arrays / 255).tolist(), "label": list(range(len(arrays)))})


def _as_sized_int_lists(arrays):  # images of two sizes: the per-image path (no decode-once)
    images = [a.tolist() if i % 2 else np.pad(a, ((0, 2), (0, 2), (0, 0))).tolist() for i, a in enumerate(arrays)]
    return Dataset.from_dict({"img": images, "label": list(range(len(arrays)))})


STORAGES = [_as_pil, _as_uint8_array, _as_int_lists, _as_float_array, _as_float_lists]


def _processor(size: int = 8):
    from transformers import ViTImageProcessor

    return ViTImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _received(ds, processor=None, size=8) -> torch.Tensor:
    """The `pixel_values` the model gets for `ds` through the CLI's image path (either branch)."""
    from transformers import ViTConfig

    from mec_quant_plugin.cli.tasks import image_datasets

    _, evals, collator = image_datasets(ViTConfig(image_size=size, num_channels=3), processor, ds, ds, "img",
                                        "label", None, fashion=False, augment=False)
    return collator([evals[i] for i in range(len(evals))])["pixel_values"]


@pytest.mark.parametrize("with_processor", [False, True], ids=["no-processor", "image-processor"])
@pytest.mark.parametrize("build", STORAGES, ids=["pil", "uint8-array", "int-lists", "float-array", "float-lists"])
def test_every_storage_reaches_the_model_as_pixels_over_255_standardized(build, with_processor):
    arrays = _pixels()
    received = _received(build(arrays), _processor() if with_processor else None)
    expected = (torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    torch.testing.assert_close(received, expected, rtol=0, atol=1e-5)
    assert received.min() >= -1 and received.max() <= 1


@pytest.mark.parametrize("with_processor", [False, True], ids=["no-processor", "image-processor"])
def test_int_lists_of_several_sizes_are_scaled_too(with_processor):
    arrays = _pixels()
    received = _received(_as_sized_int_lists(arrays), _processor(10) if with_processor else None, size=10)
    assert received.shape == (4, 3, 10, 10) and received.min() >= -1 and received.max() <= 1
    assert received.max() > 0.9 and received.min() < -0.9  # the full range, not a sliver of it


def test_float_pixels_0_and_1_are_not_read_as_uint8():
    binary = (_pixels() > 127).astype(np.float32)  # a float image of 0.0 and 1.0: white is 1.0, not 1/255
    ds = Dataset.from_dict({"img": binary, "label": [0, 1, 2, 3]},
                           features=Features({"img": Array3D(binary.shape[1:], "float32"), "label": Value("int64")}))
    received = _received(ds)
    torch.testing.assert_close(received, torch.from_numpy(binary).permute(0, 3, 1, 2) * 2 - 1)


def test_pixels_outside_the_expected_range_are_a_clear_error():
    from mec_quant_plugin.cli.common import CLIError

    ds = Dataset.from_dict({"img": [np.full((4, 4, 3), 300.0).tolist()], "label": [0]})
    with pytest.raises(CLIError, match=r"0\.\.255 .* 0\.\.1"):
        _received(ds, size=4)


def test_train_on_out_of_range_pixels_is_one_usage_line(tmp_path, capsys):
    from transformers import ViTConfig, ViTForImageClassification

    from tests.test_cli import expect_usage_error

    ViTForImageClassification(ViTConfig(image_size=4, patch_size=2, hidden_size=8, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=8, num_labels=2)
                               ).save_pretrained(tmp_path / "vit")
    rows = [{"img": np.full((4, 4, 3), 300.0 if i == 0 else 0.5).tolist(), "label": i % 2} for i in range(4)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "data"))
    expect_usage_error(["train", "--model", tmp_path / "vit", "--dataset", tmp_path / "data", "--task",
                        "image-classification", "--eval-split", "train", "--max-steps", "1", "--output-dir",
                        tmp_path / "run"], capsys, "floats in 0..1")
