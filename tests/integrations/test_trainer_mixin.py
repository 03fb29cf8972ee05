"""MECQuantTrainerMixin (a `compute_loss` override, PEFT's way) trains exactly like the callback:
same term, same logs, same weight-decay groups, same gradient-accumulation semantics."""

from __future__ import annotations

import warnings

import pytest
import torch
from testing_utils import TINY_MODELS, check_trained_with_the_term, dataset_like, make_trainer, training_arguments
from transformers import Trainer

from mec_quant_plugin import MECQuantConfig, MECQuantTrainerMixin
from mec_quant_plugin.modules import FakeQuantizedModule


class MECTrainer(MECQuantTrainerMixin, Trainer):
    pass


def make_mixin_trainer(name: str, out_dir: str, config: MECQuantConfig | None = None, *, rows: int = 16,
                       convert: bool = True, **overrides) -> tuple[MECTrainer, object]:
    """The mixin twin of testing_utils.make_trainer (same model, data and arguments)."""
    model, batch = TINY_MODELS[name]()
    ds = dataset_like(batch, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = MECTrainer(model=model, args=training_arguments(out_dir, **overrides), train_dataset=ds,
                             eval_dataset=ds, mec_config=config or MECQuantConfig(weight_bits=2, act_bits=4),
                             mec_convert_on_train_end=convert)
    return trainer, ds


@pytest.mark.parametrize("name", ["llama", "vit", "resnet"])
def test_mixin_flow(name, tmp_path):
    trainer, ds = make_mixin_trainer(name, str(tmp_path), weight_decay=0.1)
    model = trainer.model
    assert any(isinstance(m, FakeQuantizedModule) for m in model.modules())
    batch = {k: v[:4] for k, v in ds[:4].items()}
    model.train()
    task = model(**batch).loss.detach()
    trainer.mec_regularizer()  # drop the features of that forward
    with_term = trainer.compute_loss(model, batch)
    assert not torch.allclose(task, with_term)
    assert trainer.mec_regularizer.last_stats["loss"] != 0
    trainer.train()
    check_trained_with_the_term(trainer)


@pytest.mark.parametrize("name", ["llama", "resnet"])  # passes num_items_in_batch / drops it
@pytest.mark.parametrize("accum", [1, 2])
def test_mixin_trains_exactly_like_the_callback(name, accum, tmp_path):
    overrides = dict(rows=8, per_device_train_batch_size=8 // accum, gradient_accumulation_steps=accum,
                     max_steps=2, learning_rate=1e-2, weight_decay=0.01)
    config = MECQuantConfig(weight_bits=2, act_bits=4, mec_weight=0.5)
    torch.manual_seed(0)  # the same tiny model and data for both
    by_callback, cb, _ = make_trainer(name, str(tmp_path / "callback"), config, **overrides)
    cb.convert_on_train_end = False
    by_callback.train()
    torch.manual_seed(0)
    by_mixin, _ = make_mixin_trainer(name, str(tmp_path / "mixin"), config, convert=False, **overrides)
    by_mixin.train()

    def logged(trainer):
        return [{k: v for k, v in e.items() if k == "loss" or k.startswith("mec/")}
                for e in trainer.state.log_history if "loss" in e]

    for a, b in zip(logged(by_callback), logged(by_mixin), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    mixin_params = dict(by_mixin.model.named_parameters())
    for key, value in by_callback.model.named_parameters():
        assert torch.allclose(value, mixin_params[key], atol=1e-6), key


def test_mixin_eval_loss_is_the_task_loss(tmp_path):
    trainer, ds = make_mixin_trainer("llama", str(tmp_path))
    metrics = trainer.evaluate()
    model = trainer.model.eval()
    with torch.no_grad():
        losses = [model(**{k: v for k, v in ds[i : i + 4].items()}).loss for i in range(0, 16, 4)]
    assert metrics["eval_loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


def test_mixin_with_model_init_is_a_clear_error(tmp_path):
    _, batch = TINY_MODELS["vit"]()
    with warnings.catch_warnings(), pytest.raises(ValueError, match="MECQuantTrainerMixin.*model_init"):
        warnings.simplefilter("ignore")
        MECTrainer(model_init=lambda: TINY_MODELS["vit"]()[0], args=training_arguments(str(tmp_path)),
                   train_dataset=dataset_like(batch))


def test_mixin_without_a_trainer_is_a_clear_error():
    class NotATrainer(MECQuantTrainerMixin):
        pass

    with pytest.raises(TypeError, match=r"class MyTrainer\(MECQuantTrainerMixin, Trainer\)"):
        NotATrainer()
