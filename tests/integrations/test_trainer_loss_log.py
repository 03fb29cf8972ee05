"""Issue 10 ("found with a real client"): the Trainer's logged training loss is the task loss plus
the MEC-Quant terms, never below the task loss, and `mec/loss` is the weighted amount the term
adds (a negative term once logged `train_loss` 0.0008 beside an eval loss of 0.118)."""

from __future__ import annotations

import warnings

import pytest
import torch
from testing_utils import TINY_MODELS, dataset_like, make_trainer, training_arguments
from transformers import Trainer

from mec_quant_plugin import MECQuantConfig, MECQuantTrainerMixin

CONFIG = MECQuantConfig(weight_bits=2, act_bits=4, mec_weight=0.5)


class _MixinTrainer(MECQuantTrainerMixin, Trainer):
    pass


def _trained(how: str, out_dir: str) -> Trainer:
    """Three steps at learning rate 0 on one batch of 4 rows (every step sees the same rows)."""
    overrides = dict(learning_rate=0.0, max_steps=3, lr_scheduler_type="constant")
    torch.manual_seed(0)
    if how == "callback":
        trainer, cb, _ = make_trainer("llama", out_dir, CONFIG, rows=4, **overrides)
        cb.convert_on_train_end = False
    else:
        model, batch = TINY_MODELS["llama"]()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = _MixinTrainer(model=model, args=training_arguments(out_dir, **overrides),
                                    train_dataset=dataset_like(batch, 4), mec_config=CONFIG,
                                    mec_convert_on_train_end=False)
    trainer.train()
    return trainer


@pytest.mark.parametrize("how", ["callback", "mixin"])
def test_logged_loss_is_the_task_loss_plus_the_non_negative_term(how, tmp_path):
    trainer = _trained(how, str(tmp_path))
    model = trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():  # no grad: the term is not added; the weights never moved (lr 0)
        task = model(**batch).loss.item()
    logs = [e for e in trainer.state.log_history if "loss" in e and "mec/loss" in e]
    assert len(logs) == 3
    for entry in logs:
        assert entry["mec/loss"] > 0 and entry["mec/total"] == pytest.approx(entry["mec/loss"], abs=1e-5)
        assert entry["loss"] >= task
        assert entry["loss"] == pytest.approx(task + entry["mec/total"], abs=2e-3)
    final = trainer.state.log_history[-1]["train_loss"]
    assert final >= task
