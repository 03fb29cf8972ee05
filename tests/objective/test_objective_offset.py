"""Issue 10 ("found with a real client"): the MEC-Quant terms never pull the training loss below the
task loss. Each term is added as weight x (loss - a constant lower bound): the value is >= 0, the
gradients are those of the former weight x loss, and every logged `*loss` is the weighted amount
the term adds."""

from __future__ import annotations

import math

import pytest
import torch
from testing_utils import TinyMLP

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

CONFIGS = {
    "self adaptive": dict(mec_weight=0.5),
    "self fixed order 2": dict(mec_weight=0.5, mec_lambda_mode="fixed", mec_order=2),
    "self exact": dict(mec_weight=0.5, mec_order=None),
    "teacher view": dict(mec_weight=0.5, mec_view="teacher"),
    "magnitude experts": dict(mec_weight=0.5, mec_experts=2, mec_routing="magnitude"),
    "feature experts": dict(mec_weight=0.5, mec_experts=2, mec_routing="features"),
    "gate experts": dict(mec_weight=0.5, mec_experts=2, mec_routing="gate"),
    "every term": dict(mec_weight=0.5, mec_layer_weight=0.3, mec_label_weight=0.7, distill_weight=2.0),
}
LOSS_KEYS = ("loss", "layer/loss", "label/loss", "distill/loss")


def _setup(**config) -> tuple[TinyMLP, MECRegularizer]:
    """A prepared W2A2 TinyMLP (its float teacher drifted from it) and the regularizer."""
    torch.manual_seed(0)
    model = TinyMLP(hidden=16)
    teacher = make_teacher(model)
    with torch.no_grad():
        model.body[0].weight.add_(0.3 * torch.randn_like(model.body[0].weight))
    prepare_model(model, MECQuantConfig(weight_bits=2, act_bits=2))
    reg = MECRegularizer(model.train(), MECQuantConfig(weight_bits=2, act_bits=2, **config), teacher=teacher)
    return model, reg


def _inputs(kind: str) -> torch.Tensor:
    x = torch.randn(24, 6, generator=torch.Generator().manual_seed(1))
    if kind == "collapsed":  # every sample the same but for a tiny jitter: the lowest-entropy features
        x = x[:1] + 1e-3 * x
    elif kind == "wide":  # large inputs: large features, the adaptive / fixed lambda at its extremes
        x = 50 * x
    return x


@pytest.mark.parametrize("kind", ["random", "collapsed", "wide"])
@pytest.mark.parametrize("name", CONFIGS)
def test_term_and_every_logged_loss_are_non_negative_and_add_up(name, kind):
    model, reg = _setup(**CONFIGS[name])
    x = _inputs(kind)
    y = torch.arange(x.shape[0]) % 3
    term = reg(logits=model(x), labels=y)
    flat = reg.last_stats
    term = float(term.detach())
    assert term >= 0.0 and flat["total"] == pytest.approx(term, abs=1e-6)
    logged = {k: flat[k] for k in LOSS_KEYS if k in flat}
    assert logged and all(v >= 0.0 for v in logged.values()), logged
    assert sum(logged.values()) == pytest.approx(term, rel=1e-5, abs=1e-6)


def test_logged_loss_is_weight_times_the_term_it_adds():
    model, reg = _setup(mec_weight=0.5, mec_tap_modules=["body.2", "head"])
    x = _inputs("random")
    model(x)
    term = reg()
    stats, flat = reg.stats, reg.last_stats
    # The head term's loss is -S/(m lambda) >= -1: the term adds 0.5 x (loss + 1).
    assert flat["loss"] == pytest.approx(0.5 * (float(stats.loss) + 1.0), rel=1e-6)
    assert flat["loss"] == pytest.approx(float(term), rel=1e-6)
    for name, tap in stats.taps.items():
        assert flat[f"{name}/loss"] == pytest.approx(0.5 * (float(tap.loss) + 1.0), rel=1e-6)


def test_gradients_and_differences_equal_the_former_weighted_sum():
    """The new term minus the former `sum_t weight_t * loss_t` (computed from the pure functions) is
    the constant sum_t weight_t * bound_t, and the gradients of the two are equal."""
    model, reg = _setup(mec_weight=0.5, mec_layer_weight=0.3, mec_label_weight=0.7, distill_weight=2.0)
    teacher = reg.teacher
    reg.set_progress(3, 10)
    x, y = _inputs("random"), torch.arange(24) % 3
    params = [p for p in model.parameters() if p.requires_grad]

    logits = model(x)
    new = reg(logits=logits, labels=y)
    new_grads = torch.autograd.grad(new, params, allow_unused=True)

    layer = LayerwiseCodingLength(model, "activations", seed=0)
    layer.set_step(3)
    logits = model(x)
    head = coding_length_loss(center_features(model.body(x)), eps2=0.5 * 16, target_radius=0.5, lam_scale=reg.lambda_scale)[0]
    old = (0.5 * head + 0.3 * layer() + 0.7 * rate_reduction_loss(model.body(x), y)
           + 2.0 * distillation_loss(logits, teacher(x)))
    old_grads = torch.autograd.grad(old, params, allow_unused=True)
    layer.remove()

    offset = 0.5 * 1.0 + 0.3 * 1.0 + 0.7 * 0.5 * math.log1p(1 / 0.5) + 2.0 * 0.0
    assert float(new) == pytest.approx(float(old) + offset, abs=1e-5)
    assert float(old) < 0 <= float(new)  # the former sum went negative on this batch
    for g_new, g_old in zip(new_grads, old_grads, strict=True):
        assert (g_new is None) == (g_old is None)
        if g_new is not None:
            torch.testing.assert_close(g_new, g_old)
