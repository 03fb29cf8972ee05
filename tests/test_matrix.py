"""Bit settings x tiny models (PEFT style): each test is one line calling a shared body of
tests/testing_utils.py. Configs: testing_utils.MATRIX_CONFIGS (binary, ternary, per-group,
weight-only); models: testing_utils.MATRIX_MODELS (Linear, Conv2d, Embedding and GPT-2's Conv1D
between them)."""

from __future__ import annotations

import pytest
import torch
from testing_utils import (
    MATRIX_CONFIGS,
    MATRIX_MODELS,
    TINY_MODELS,
    _test_convert_matches_fake_quant,
    _test_prepare_forward_backward,
    _test_save_reload_round_trip,
    _test_trainer_two_steps,
)

from mec_quant_plugin import is_supported_layer

# Per-group steps need the group size to divide a layer's input channels: ConvNeXt's depthwise
# convs have one input channel per group, which prepare_model refuses (the test at the end).
REFUSED = {("convnext", "W4A4-group8")}
CASES = [(name, bits) for name in sorted(MATRIX_MODELS) for bits in sorted(MATRIX_CONFIGS) if (name, bits) not in REFUSED]
MATRIX = pytest.mark.parametrize(("name", "bits"), CASES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads; on a busy 2-core machine a second
    spinning thread made these tests 5-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@MATRIX
def test_prepare_forward_backward(name, bits):
    _test_prepare_forward_backward(name, MATRIX_CONFIGS[bits])


@MATRIX
def test_convert_matches_fake_quant(name, bits):
    _test_convert_matches_fake_quant(name, MATRIX_CONFIGS[bits])


@MATRIX
def test_save_reload_round_trip(name, bits, tmp_path):
    _test_save_reload_round_trip(name, MATRIX_CONFIGS[bits], str(tmp_path / "saved"))


@MATRIX
def test_trainer_two_steps(name, bits, tmp_path):
    _test_trainer_two_steps(name, MATRIX_CONFIGS[bits], str(tmp_path))


@pytest.mark.parametrize(("name", "bits"), sorted(REFUSED))
def test_refused_cases_say_what_to_do(name, bits):
    with pytest.raises(ValueError, match="does not divide.*weight_granularity='per_channel'"):
        _test_prepare_forward_backward(name, MATRIX_CONFIGS[bits])


def test_the_models_cover_every_supported_layer_kind():
    found = {}
    for name in MATRIX_MODELS:
        model, _ = TINY_MODELS[name]()
        found[name] = {type(m).__name__ for n, m in model.named_modules() if is_supported_layer(m, n)}
    assert found == {name: set(kinds) for name, kinds in MATRIX_MODELS.items()}
    assert set().union(*found.values()) >= {"Linear", "Conv2d", "Embedding", "Conv1D"}
