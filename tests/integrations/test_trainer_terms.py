"""The candidate terms of MEC-Quant v2 through the Trainer: the callback and the mixin make the
teacher, find logits and labels themselves, and give the loss of the custom-loop API."""

from __future__ import annotations

import warnings

import pytest
import torch
from testing_utils import TINY_MODELS, dataset_like, training_arguments
from transformers import Trainer

from mec_quant_plugin import MECQuantCallback, MECQuantConfig, MECQuantTrainerMixin, MECRegularizer, prepare_model
from mec_quant_plugin.objective import make_teacher

ALL_TERMS = MECQuantConfig(weight_bits=2, act_bits=4, mec_weight=0.5, mec_layer_weight=0.3, mec_label_weight=0.2,
                           mec_mi_weight=0.6, distill_weight=1.0, distill_temperature=2.0)
NEW_KEYS = {"mec/layer/loss", "mec/layer/coding_length", "mec/layer/layers", "mec/label/loss", "mec/mi/loss",
            "mec/distill/loss", "mec/total"}


class MECTrainer(MECQuantTrainerMixin, Trainer):
    pass


def _float_model_and_data(name: str):
    torch.manual_seed(0)
    model, batch = TINY_MODELS[name]()
    with torch.no_grad():  # the student will drift from the teacher: distillation is not zero
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ds = dataset_like(batch, rows=8)
    return model, ds, {k: v for k, v in ds[:8].items()}


def _trainer(kind: str, model, ds, out_dir: str, config: MECQuantConfig, **overrides):
    args = training_arguments(out_dir, **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "callback":
            cb = MECQuantCallback(config)
            return Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]), cb
        trainer = MECTrainer(model=model, args=args, train_dataset=ds, mec_config=config)
        return trainer, trainer.mec_term


def _first_step_loss(kind: str, model, ds, batch, out_dir: str, config: MECQuantConfig):
    """The training loss of one forward on `batch` at step 0, and the regularizer that added the terms."""
    if kind == "custom loop":
        teacher = make_teacher(model)
        prepare_model(model, config)
        reg = MECRegularizer(model.train(), config, teacher=teacher)
        reg.set_progress(0, 1)
        out = model(**batch)
        return out.loss + reg(logits=out, labels=batch["labels"]), reg
    trainer, owner = _trainer(kind, model, ds, out_dir, config)
    model = trainer.model.train()
    if kind == "callback":
        owner.on_step_begin(trainer.args, trainer.state, trainer.control)
        return model(**batch).loss, owner.regularizer
    return trainer.compute_loss(model, batch), trainer.mec_regularizer


RECOMMENDED = MECQuantConfig.recommended(weight_bits=2, act_bits=2)


@pytest.mark.parametrize("name, config", [("resnet", ALL_TERMS), ("vit", ALL_TERMS), ("resnet", RECOMMENDED),
                                          ("vit", RECOMMENDED)], ids=["resnet-all", "vit-all", "resnet-recommended",
                                                                      "vit-recommended"])
def test_callback_and_mixin_give_the_loss_of_the_custom_loop(name, config, tmp_path):
    losses = {}
    for kind in ("custom loop", "callback", "mixin"):
        model, ds, batch = _float_model_and_data(name)
        loss, reg = _first_step_loss(kind, model, ds, batch, str(tmp_path / kind.replace(" ", "_")), config)
        stats = reg.stats
        assert reg.teacher is not None and not any(p.requires_grad for p in reg.teacher.parameters())
        terms = (stats.loss, stats.layerwise, stats.label_loss, stats.mi_loss, stats.distill_loss)
        expected = (config.mec_weight, config.mec_layer_weight, config.mec_label_weight, config.mec_mi_weight,
                    config.distill_weight)
        assert [v is not None for v in terms] == [w > 0 for w in expected]
        assert float(stats.distill_loss) > 0 and float(stats.mi_loss) < 0
        losses[kind] = loss.detach()
    torch.testing.assert_close(losses["callback"], losses["custom loop"])
    torch.testing.assert_close(losses["mixin"], losses["custom loop"])


@pytest.mark.parametrize("kind", ["callback", "mixin"])
def test_every_term_reaches_the_logs_and_the_teacher_never_trains(kind, tmp_path):
    model, ds, _ = _float_model_and_data("resnet")
    trainer, _ = _trainer(kind, model, ds, str(tmp_path), ALL_TERMS)
    teacher = (trainer.mec_regularizer if kind == "mixin" else trainer.callback_handler.callbacks[0].regularizer).teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs and all(NEW_KEYS | {"mec/loss"} <= set(e) for e in logs)
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in optimized for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_distillation_on_an_already_prepared_model_is_a_clear_error(tmp_path):
    model, ds, _ = _float_model_and_data("resnet")
    prepare_model(model, ALL_TERMS)
    with pytest.raises(ValueError, match="distill_weight > 0 needs the full-precision model"):
        _trainer("callback", model, ds, str(tmp_path), MECQuantConfig(distill_weight=1.0))


def test_mi_term_on_an_already_prepared_model_is_a_clear_error(tmp_path):
    model, ds, _ = _float_model_and_data("resnet")
    prepare_model(model, ALL_TERMS)
    with pytest.raises(ValueError, match="mec_mi_weight > 0 needs the full-precision model"):
        _trainer("mixin", model, ds, str(tmp_path), MECQuantConfig(mec_mi_weight=1.0))
