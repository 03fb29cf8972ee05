"""What the callback and the mixin refuse to do silently: apply a NaN/inf update, or train again a
model they converted at the end of the previous `train()`."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from testing_utils import TINY_MODELS, dataset_like, make_trainer, training_arguments
from transformers import Trainer, TrainerCallback

from mec_quant_plugin import MECQuantConfig, MECQuantTrainerMixin


class MECTrainer(MECQuantTrainerMixin, Trainer):
    pass


def _trainer(kind: str, out_dir: str, config: MECQuantConfig, *, convert: bool = False, **overrides) -> Trainer:
    """A tiny ViT Trainer with MEC-Quant through the callback or the mixin."""
    if kind == "callback":
        trainer, cb, _ = make_trainer("vit", out_dir, config, **overrides)
        cb.convert_on_train_end = convert
        return trainer
    model, batch = TINY_MODELS["vit"]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MECTrainer(model=model, args=training_arguments(out_dir, **overrides), train_dataset=dataset_like(batch),
                          mec_config=config, mec_convert_on_train_end=convert)


def _poison_training_forward(model: torch.nn.Module, at: int) -> None:
    """The `at`-th training forward sees NaN pixels."""
    calls = [0]

    def hook(module, args, kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return None
        calls[0] += 1
        if calls[0] == at:
            kwargs = {**kwargs, "pixel_values": torch.full_like(kwargs["pixel_values"], float("nan"))}
        return args, kwargs

    model.register_forward_pre_hook(hook, with_kwargs=True)


class _ParametersAfterEachStep(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.detach().clone() for n, p in model.named_parameters()})


@pytest.mark.parametrize("kind", ["callback", "mixin"])
def test_a_nan_batch_stops_training_before_the_update_by_default(kind, tmp_path):
    # It used to log loss 0.0 and go on with NaN weights and step sizes.
    trainer = _trainer(kind, str(tmp_path), MECQuantConfig(weight_bits=2, act_bits=4), max_steps=3)
    _poison_training_forward(trainer.model, at=2)
    with pytest.raises(FloatingPointError, match=r"step 2: non-finite gradients .*on_nonfinite=.skip."):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("kind", ["callback", "mixin"])
def test_a_nan_batch_is_skipped_when_asked(kind, tmp_path, caplog):
    config = MECQuantConfig(weight_bits=2, act_bits=4, on_nonfinite="skip")
    trainer = _trainer(kind, str(tmp_path), config, max_steps=3)
    after = _ParametersAfterEachStep()
    trainer.add_callback(after)
    _poison_training_forward(trainer.model, at=2)
    with caplog.at_level(logging.WARNING, logger="mec_quant_plugin"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert "skipped step 2" in caplog.text
    first, skipped, third = after.steps
    assert all(torch.equal(first[n], skipped[n]) for n in first)  # the NaN step changed nothing
    assert any(not torch.equal(skipped[n], third[n]) for n in first)  # and training went on
    assert all(torch.isfinite(p).all() for p in third.values())


@pytest.mark.parametrize("kind", ["callback", "mixin"])
def test_a_second_train_after_the_conversion_is_refused(kind, tmp_path):
    # It used to train only the norms and the activation steps of the converted model, silently.
    trainer = _trainer(kind, str(tmp_path), MECQuantConfig(weight_bits=2, act_bits=4), convert=True, max_steps=1)
    trainer.train()
    with pytest.raises(RuntimeError, match="converted .* at the end of the previous train"):
        trainer.train()


@pytest.mark.parametrize("kind", ["callback", "mixin"])
def test_a_second_train_without_the_conversion_trains(kind, tmp_path):
    trainer = _trainer(kind, str(tmp_path), MECQuantConfig(weight_bits=2, act_bits=4), convert=False, max_steps=1)
    trainer.train()
    trainer.train()
