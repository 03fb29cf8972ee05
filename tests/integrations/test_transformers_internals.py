"""The transformers internals the plugin relies on fail loudly, naming the internal, the version
they were checked with and the way out, instead of being skipped."""

from __future__ import annotations

import types

import pytest
import torch

from mec_quant_plugin.integrations import transformers_internals as internals
from mec_quant_plugin.integrations.transformers_internals import TransformersInternalsError


def test_no_trainer_on_the_stack():
    with pytest.raises(TransformersInternalsError, match=r"Trainer.__init__.*5\.24.*MECQuantTrainerMixin"):
        internals.calling_trainer()


@pytest.mark.parametrize("call", [
    lambda t: internals.exclude_from_weight_decay(t, lambda m: set()),
    lambda t: internals.run_callback_first(t, object()),
    lambda t: internals.check_trainer_builds_nothing(t),
    lambda t: internals.stop_passing_loss_kwargs(t, torch.nn.Linear(1, 1)),
])
def test_a_missing_trainer_internal_is_named(call):
    trainer_without_internals = types.SimpleNamespace()
    with pytest.raises(TransformersInternalsError, match=r"Trainer\.\w+.*checked with transformers 5\.24"):
        call(trainer_without_internals)


def test_loss_kwargs_detection_reads_the_forward_source():
    from testing_utils import TINY_MODELS

    assert not internals.model_drops_loss_kwargs(TINY_MODELS["llama"]()[0])  # loss_function(..., **kwargs)
    assert internals.model_drops_loss_kwargs(TINY_MODELS["resnet"]()[0])  # loss_function without kwargs
