"""Issue 10 ("found with a real client"): `Trainer(...)` paused 77-100 s preparing SmolLM2 without a
word (the plugin's INFO lines are invisible by default). A long preparation shows a progress bar
over the layers; a quick one prints nothing; the Hugging Face switches turn it off."""

from __future__ import annotations

import time
import warnings

import pytest
from testing_utils import TinyMLP, make_trainer
from torch import nn
from transformers.utils import logging as hf_logging

from mec_quant_plugin import MECQuantConfig, prepare_model
from mec_quant_plugin import progress as progress_module
from mec_quant_plugin.quantizers import WeightFakeQuantizer

LAYERS = 20
CONFIG = MECQuantConfig(weight_bits=2, act_bits=2)


def _deep_mlp() -> nn.Module:
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(LAYERS)])


@pytest.fixture
def slow_init(monkeypatch):
    """Each weight-step initialization takes 50 ms more: a 20-layer model takes about a second, past
    a 0.2 s delay, the way a 135M-parameter model takes tens of seconds past the default 2 s."""
    library = WeightFakeQuantizer._init_scale

    def slow(self, w):
        time.sleep(0.05)
        return library(self, w)

    monkeypatch.setattr(WeightFakeQuantizer, "_init_scale", slow)
    monkeypatch.setattr(progress_module, "DELAY_S", 0.2)
    monkeypatch.delenv(progress_module.PROGRESS_ENV, raising=False)
    monkeypatch.setattr(hf_logging, "_tqdm_active", True)


def _bar(stderr: str) -> bool:
    return "MEC-Quant: preparing W2A2" in stderr and f"{LAYERS}/{LAYERS}" in stderr


def test_a_long_preparation_shows_a_bar_over_the_layers(slow_init, capsys):
    prepare_model(_deep_mlp(), CONFIG)
    assert _bar(capsys.readouterr().err)


def test_a_quick_preparation_prints_nothing(capsys, monkeypatch):
    monkeypatch.delenv(progress_module.PROGRESS_ENV, raising=False)
    monkeypatch.setattr(hf_logging, "_tqdm_active", True)
    prepare_model(TinyMLP(), CONFIG)  # milliseconds: far below the default delay
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("switch", ["progress=False", "env 0", "transformers disable_progress_bar"])
def test_the_switches_turn_the_bar_off(switch, slow_init, capsys, monkeypatch):
    kwargs = {}
    if switch == "progress=False":
        kwargs["progress"] = False
    elif switch == "env 0":
        monkeypatch.setenv(progress_module.PROGRESS_ENV, "0")
    else:
        monkeypatch.setattr(hf_logging, "_tqdm_active", False)  # what disable_progress_bar() sets
    prepare_model(_deep_mlp(), CONFIG, **kwargs)
    assert capsys.readouterr().err == ""


def test_env_1_shows_the_bar_from_the_first_layer(capsys, monkeypatch):
    monkeypatch.setenv(progress_module.PROGRESS_ENV, "1")
    prepare_model(_deep_mlp(), CONFIG)
    assert _bar(capsys.readouterr().err)


@pytest.mark.parametrize("disable_tqdm", [False, True])
def test_the_trainer_follows_disable_tqdm(disable_tqdm, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(progress_module.PROGRESS_ENV, "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer("llama", str(tmp_path), CONFIG, disable_tqdm=disable_tqdm)
    shown = "MEC-Quant: preparing W2A2" in capsys.readouterr().err
    assert shown is not disable_tqdm
