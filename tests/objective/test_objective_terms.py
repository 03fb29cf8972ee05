"""MECRegularizer with the candidate terms of MEC-Quant v2 on (`mec_layer_weight`,
`mec_label_weight`, `distill_weight`): each adds exactly weight x its pure function, the terms add
up, the teacher gets no gradient, missing inputs are clear errors."""

from __future__ import annotations

import pytest
import torch
from testing_utils import TINY_MODELS, TinyMLP

from mec_quant_plugin import MECQuantConfig, prepare_model
from mec_quant_plugin.objective import (
    LayerwiseCodingLength,
    MECRegularizer,
    center_features,
    coding_length_loss,
    distillation_loss,
    make_teacher,
    rate_reduction_loss,
)
from mec_quant_plugin.objective.capture import subsample_rows

OFF = dict(mec_weight=0.0)  # every test switches on only the terms it names


def _student_and_teacher(**config) -> tuple[TinyMLP, torch.nn.Module, MECRegularizer]:
    """A prepared W2A2 TinyMLP, its frozen float teacher (the student drifts from it), the regularizer."""
    model = TinyMLP()
    teacher = make_teacher(model)
    with torch.no_grad():
        model.body[0].weight.add_(0.3 * torch.randn_like(model.body[0].weight))
    prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2))
    reg = MECRegularizer(model.train(), MECQuantConfig(weight_bits=2, act_bits=2, **config), teacher=teacher)
    return model, teacher, reg


def _check_term_is_weight_times(config: dict, reference) -> None:
    """reg(...) == weight * (reference(model, teacher, x, y, logits) - its lower bound) after one training
    forward (the bound is a constant: see test_objective_offset.py)."""
    model, teacher, reg = _student_and_teacher(**config)
    reg.set_progress(3, 10)
    x, y = torch.randn(16, 6), torch.arange(16) % 3
    logits = model(x)
    term = reg(logits=logits, labels=y)
    weight, expected = reference(model, teacher, x, y, logits)
    (key,) = [k for k, w in reg.weights.items() if w > 0]
    torch.testing.assert_close(term, weight * (expected - reg.lower_bounds[key]))
    assert reg.last_stats["total"] == pytest.approx(float(term.detach()))


def _layer_reference(target: str, experts: int, standardize: bool):
    def reference(model, teacher, x, y, logits):
        ref = LayerwiseCodingLength(model, target, experts=experts, standardize=standardize, seed=0)
        ref.set_step(3)
        model(x)
        return 0.3, ref()
    return reference


@pytest.mark.parametrize("target, experts, standardize", [("activations", 1, False), ("activations", 2, True),
                                                          ("weights", 1, False), ("weights", 2, False)])
def test_layer_term_is_weight_times_the_layerwise_coding_length(target, experts, standardize):
    _check_term_is_weight_times(dict(OFF, mec_layer_weight=0.3, mec_layer_target=target, mec_layer_experts=experts,
                                     mec_layer_standardize=standardize), _layer_reference(target, experts, standardize))


def test_label_term_is_weight_times_the_rate_reduction_of_the_head_features():
    _check_term_is_weight_times(dict(OFF, mec_label_weight=0.7),
                                lambda m, t, x, y, logits: (0.7, rate_reduction_loss(m.body(x), y)))


def test_distill_term_is_weight_times_kd_against_the_teacher_logits():
    _check_term_is_weight_times(dict(OFF, distill_weight=2.0, distill_temperature=3.0),
                                lambda m, t, x, y, logits: (2.0, distillation_loss(logits, t(x), 3.0)))


def test_the_terms_add_up_and_each_is_in_the_stats():
    model, teacher, reg = _student_and_teacher(mec_weight=0.5, mec_layer_weight=0.3, mec_label_weight=0.7,
                                               distill_weight=2.0)
    x, y = torch.randn(16, 6), torch.arange(16) % 3
    logits = model(x)
    total = reg(logits=logits, labels=y)
    stats = reg.stats
    head = coding_length_loss(center_features(model.body(x)), eps2=8.0, target_radius=0.5)[0]
    torch.testing.assert_close(stats.loss, head.detach())
    bound = reg.lower_bounds
    parts = (0.5 * (stats.loss - bound["loss"]) + 0.3 * (stats.layerwise.loss - bound["layer/loss"])
             + 0.7 * (stats.label_loss - bound["label/loss"]) + 2.0 * (stats.distill_loss - bound["distill/loss"]))
    torch.testing.assert_close(total.detach(), parts)
    flat = reg.last_stats
    assert {"loss", "coding_length", "layer/loss", "layer/coding_length", "layer/layers", "label/loss",
            "distill/loss", "total", "teacher_ms"} <= set(flat)
    assert flat["layer/layers"] == 1 and flat["total"] == pytest.approx(float(total.detach()))


def test_gradient_reaches_the_student_and_never_the_teacher():
    model, teacher, reg = _student_and_teacher(mec_layer_weight=0.3, mec_label_weight=0.7, distill_weight=2.0)
    x, y = torch.randn(16, 6), torch.arange(16) % 3
    logits = model(x)
    reg(logits=logits, labels=y).backward()
    layer = model.body[2]
    for p in (layer.weight, layer.bias, layer.weight_fake_quantizer.scale, layer.activation_fake_quantizer.scale):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_plain_reg_call_and_zero_weights_are_unchanged():
    model, _, reg = _student_and_teacher(**OFF)
    model(torch.randn(8, 6))
    assert reg().item() == 0 and reg.stats is None  # plain QAT: nothing computed
    model, _, reg = _student_and_teacher(mec_layer_weight=0.3)
    model(torch.randn(8, 6))
    assert reg().requires_grad  # terms that need neither logits nor labels keep the reg() call
    assert reg().item() == 0  # a second call after the same forward computes nothing


@pytest.mark.parametrize("config, call, match", [
    (dict(distill_weight=1.0), dict(labels=torch.zeros(8, dtype=torch.long)), "distill_weight=1.0 needs the model's logits"),
    (dict(mec_label_weight=0.1), dict(), "mec_label_weight=0.1 needs the batch labels"),
    (dict(mec_label_weight=0.1), dict(labels=torch.zeros(8, 2, dtype=torch.long)), "one class label per sample"),
])
def test_a_term_without_its_inputs_is_a_clear_error(config, call, match):
    model, _, reg = _student_and_teacher(**config)
    model(torch.randn(8, 6))
    with pytest.raises(ValueError, match=match):
        reg(**call)


def test_distillation_without_a_teacher_is_a_clear_error():
    with pytest.raises(ValueError, match="distill_weight > 0 needs teacher=make_teacher"):
        MECRegularizer(TinyMLP(), MECQuantConfig(distill_weight=1.0))
    with pytest.raises(TypeError, match="Cannot find logits in logits"):
        model, _, reg = _student_and_teacher(distill_weight=1.0)
        model(torch.randn(8, 6))
        reg(logits=[1, 2])


def test_labels_are_subsampled_with_the_head_rows():
    model = TinyMLP().train()
    reg = MECRegularizer(model, MECQuantConfig(mec_weight=0.0, mec_label_weight=1.0, mec_max_rows=8))
    reg.set_progress(5, 10)
    x, y = torch.randn(20, 6), torch.arange(20) % 3
    model(x)
    term = reg(labels=y)
    seed = reg.capture.row_seed
    expected = rate_reduction_loss(subsample_rows(model.body(x), 8, seed), subsample_rows(y, 8, seed))
    torch.testing.assert_close(term, expected - reg.lower_bounds["label/loss"])


def test_label_term_codes_the_head_whatever_the_taps_of_the_coding_length():
    model = TinyMLP().train()
    reg = MECRegularizer(model, MECQuantConfig(mec_tap_modules=["body.2"], mec_label_weight=1.0))
    x, y = torch.randn(12, 6), torch.arange(12) % 3
    model(x)
    reg(labels=y)
    torch.testing.assert_close(reg.stats.label_loss, rate_reduction_loss(model.body(x), y).detach())
    assert set(reg.stats.taps) == {"body.2"}


def test_distillation_of_token_logits_leaves_out_padding():
    model, batch = TINY_MODELS["llama"]()
    teacher = make_teacher(model)
    reg = MECRegularizer(model.train(), MECQuantConfig(mec_weight=0.0, distill_weight=1.0, distill_temperature=2.0),
                         teacher=teacher)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    out = model(**batch)
    term = reg(logits=out, labels=batch["labels"])  # a model output is accepted as logits
    keep = batch["attention_mask"] != 0
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(term, distillation_loss(out.logits[keep], t_logits[keep], 2.0))


def test_mi_term_is_weight_times_the_mutual_information_of_the_block_outputs():
    from mec_quant_plugin.objective import mutual_information_loss

    def reference(model, teacher, x, y, logits):
        return 0.4, mutual_information_loss(model.body[:2](x), teacher.body[:2](x))

    _check_term_is_weight_times(dict(OFF, mec_mi_weight=0.4, mec_mi_modules=["body.1"]), reference)


class _Block(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv(x))


class _SequentialBlocksCNN(torch.nn.Module):
    """A CIFAR-ResNet-like CNN: stem, three blocks in an nn.Sequential, pooled Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.layers = torch.nn.Sequential(_Block(4), _Block(4), _Block(4))
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(torch.relu(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("max_rows, rows", [(64, 64), (1024, 2 * 6 * 6)])
def test_mi_term_sees_spatial_positions_as_rows_and_finds_the_blocks_itself(max_rows, rows):
    """Blocks kept in an nn.Sequential are found; each block's (N, C, H, W) output gives N*H*W rows
    (capped by mec_max_rows), the same rows for student and teacher."""
    torch.manual_seed(0)
    model = _SequentialBlocksCNN()
    teacher = make_teacher(model)
    config = MECQuantConfig(weight_bits=2, act_bits=2, mec_weight=0.0, mec_mi_weight=1.0, mec_max_rows=max_rows)
    prepare_model(model, config)
    reg = MECRegularizer(model.train(), config, teacher=teacher)
    seen = {}
    original = reg._mi_term

    def spy(student, teach):
        seen.update({name: (rows.shape, teach[name].shape) for name, rows in student.items()})
        return original(student, teach)

    reg._mi_term = spy
    model(torch.randn(2, 3, 6, 6))
    loss = reg()
    assert set(seen) == {"layers.0", "layers.1", "layers.2"}
    assert all(s == t == (rows, 4) for s, t in seen.values())
    assert float(loss) > 0 and reg.last_stats["mi/loss"] == pytest.approx(float(loss))


def test_mi_term_without_a_teacher_is_a_clear_error():
    model = TinyMLP()
    prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2))
    with pytest.raises(ValueError, match="mec_mi_weight > 0 needs teacher=make_teacher"):
        MECRegularizer(model, MECQuantConfig(weight_bits=2, act_bits=2, mec_mi_weight=1.0, mec_mi_modules=["body.1"]))
