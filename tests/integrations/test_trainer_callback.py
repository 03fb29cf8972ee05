"""MECQuantCallback in a standard Trainer: the term in the training loss only, logging,
weight-decay groups, gradient accumulation semantics, and the errors where it cannot act."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from testing_utils import TINY_MODELS, check_trained_with_the_term, dataset_like, make_trainer, training_arguments
from transformers import Trainer, TrainingArguments

from mec_quant_plugin import MECQuantCallback, MECQuantConfig, prepare_model
from mec_quant_plugin.modules import FakeQuantizedModule


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_callback_only_flow(name, tmp_path):
    trainer, cb, ds = make_trainer(name, str(tmp_path), weight_decay=0.1)
    model = trainer.model
    assert any(isinstance(m, FakeQuantizedModule) for m in model.modules())
    # the term is in the TRAINING loss: a training forward's loss differs from the task loss
    batch = {k: v[:4] for k, v in ds[:4].items()}
    model.train()
    with torch.no_grad():  # no grad -> hook off -> pure task loss
        task = model(**batch).loss
    with_term = model(**batch).loss
    assert not torch.allclose(task, with_term)
    assert cb.regularizer.last_stats["loss"] != 0
    trainer.train()
    check_trained_with_the_term(trainer)


def test_every_regularizer_statistic_reaches_the_logs(tmp_path):
    # teacher view, two taps, gate-routed experts: per-tap losses, the gate balance, the teacher's cost
    config = MECQuantConfig(weight_bits=2, act_bits=4, mec_view="teacher", mec_experts=2, mec_routing="gate",
                            mec_tap_modules=["classifier", "vit.layers.1.mlp.fc1"])
    trainer, cb, _ = make_trainer("vit", str(tmp_path), config)
    cb.convert_on_train_end = False
    trainer.train()
    logged = {key for entry in trainer.state.log_history if "loss" in entry for key in entry if key.startswith("mec/")}
    computed = {f"mec/{key}" for key in cb.regularizer.last_stats}
    assert computed and computed <= logged, computed - logged
    assert {"mec/teacher_ms", "mec/rows", "mec/classifier/loss", "mec/classifier/balance"} <= logged


def test_eval_loss_is_the_task_loss(tmp_path):
    # Against an UNHOOKED copy: recomputing with the hooked model itself would show a term leaking
    # into the eval loss on both sides.
    model, batch = TINY_MODELS["llama"]()
    reference = copy.deepcopy(model)
    ds = dataset_like(batch)
    config = MECQuantConfig(weight_bits=2, act_bits=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=training_arguments(str(tmp_path)), train_dataset=ds, eval_dataset=ds,
                          callbacks=[MECQuantCallback(config)])
        metrics = trainer.evaluate()  # calibrates the activation steps on the first eval batch
    prepare_model(reference, config)
    reference.load_state_dict(model.state_dict())
    reference.eval()
    with torch.no_grad():
        losses = [reference(**{k: v for k, v in ds[i : i + 4].items()}).loss for i in range(0, 16, 4)]
    assert metrics["eval_loss"] == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


@pytest.mark.parametrize("name", ["llama", "resnet", "bert"])
def test_gradient_accumulation_step_term_is_the_mean_of_micro_batch_terms(name, tmp_path):
    # learning rate 0: the weights never move, so every logged step loss must equal the mean over
    # its micro-batches of (task loss + term), computed by hand on the same model.
    results = {}
    for accum in (1, 2, 4):
        trainer, cb, ds = make_trainer(name, str(tmp_path / str(accum)), rows=8, learning_rate=0.0,
                                       per_device_train_batch_size=8 // accum, gradient_accumulation_steps=accum,
                                       max_steps=1, lr_scheduler_type="constant")
        cb.convert_on_train_end = False
        trainer.train()
        logged = next(e["loss"] for e in trainer.state.log_history if "loss" in e)
        model = trainer.model
        model.train()
        manual = []
        loader = trainer.get_train_dataloader()
        for i, micro in enumerate(loader):
            if i == accum:
                break
            cb.regularizer.set_progress(0, 1)
            manual.append(model(**micro).loss.item())
        expected = sum(manual) / accum
        assert logged == pytest.approx(expected, abs=2e-3), (accum, logged, manual)
        results[accum] = logged
    # the term's scale does not grow with accumulation: losses stay on one scale
    assert max(results.values()) - min(results.values()) < 0.5 * abs(results[1])


def test_no_labels_warns_once_and_trains_without_term(tmp_path):
    model, batch = TINY_MODELS["llama"]()
    ds = dataset_like({k: v for k, v in batch.items() if k != "labels"})
    args = TrainingArguments(str(tmp_path), max_steps=1, report_to=[], use_cpu=True, disable_tqdm=True,
                             per_device_train_batch_size=4, save_strategy="no")
    cb = MECQuantCallback(MECQuantConfig())
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    with pytest.warns(UserWarning, match="WITHOUT the coding-length term"):
        model.train()
        out = model(**{k: v[:2] for k, v in ds[:2].items()})
    assert out.loss is None
    assert cb.regularizer.capture.pop() == {}  # this forward's features were dropped, not kept
    del trainer


def test_non_finite_term_is_skipped(tmp_path):
    trainer, cb, ds = make_trainer("vit", str(tmp_path))
    model = trainer.model
    cb.regularizer.forward = lambda **inputs: torch.tensor(float("nan"))  # a broken term (gets logits, labels)
    model.train()
    batch = {k: v[:4] for k, v in ds[:4].items()}
    with pytest.warns(UserWarning, match="non-finite"):
        loss = model(**batch).loss
    assert torch.isfinite(loss)


def test_optimizers_given_without_prepare_is_a_clear_error(tmp_path):
    model, batch = TINY_MODELS["vit"]()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match="prepare_model.*BEFORE building the optimizer"):
        Trainer(model=model, args=args, train_dataset=dataset_like(batch), optimizers=(opt, None),
                callbacks=[MECQuantCallback(MECQuantConfig())])


def test_model_init_without_prepare_is_a_clear_error(tmp_path):
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, max_steps=1)
    _, batch = TINY_MODELS["vit"]()
    with warnings.catch_warnings(), pytest.raises(ValueError, match="model_init"):
        warnings.simplefilter("ignore")
        Trainer(model_init=lambda: TINY_MODELS["vit"]()[0], args=args, train_dataset=dataset_like(batch),
                callbacks=[MECQuantCallback(MECQuantConfig())])


def test_prepared_model_with_own_optimizer_works(tmp_path):
    model, batch = TINY_MODELS["vit"]()
    cfg = MECQuantConfig(weight_bits=2, act_bits=2)
    prepare_model(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True, max_steps=2, per_device_train_batch_size=4,
                             disable_tqdm=True, save_strategy="no", logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=dataset_like(batch), optimizers=(opt, None),
                      callbacks=[MECQuantCallback(cfg)])
    trainer.train()
    assert "mec/loss" in trainer.state.log_history[0]


def test_head_not_found_names_the_option():
    from mec_quant_plugin import MECRegularizer

    model = torch.nn.Sequential(torch.nn.ReLU())
    with pytest.raises(ValueError, match="mec_tap_modules"):
        MECRegularizer(model, MECQuantConfig())
