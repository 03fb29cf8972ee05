"""MECRegularizer: capture + view + (mixture) coding length as one weighted term."""

from __future__ import annotations

import pytest
import torch
from testing_utils import TINY_MODELS, TinyMLP

from mec_quant_plugin.config import MECQuantConfig
from mec_quant_plugin.objective import (
    MECRegularizer,
    MECStats,
    TermStats,
    center_features,
    coding_length_loss,
    make_teacher,
)


def _config(**changes) -> MECQuantConfig:
    return MECQuantConfig(**{"mec_weight": 0.5, **changes})


def _head_input(model: TinyMLP, x: torch.Tensor) -> torch.Tensor:
    return model.body(x)


def test_self_view_term_is_beta_times_the_centered_adaptive_loss():
    model = TinyMLP().train()
    reg = MECRegularizer(model, _config())
    x = torch.randn(16, 6)
    model(x)
    term = reg()
    assert term.requires_grad
    expected, _ = coding_length_loss(center_features(_head_input(model, x)), eps2=8.0, target_radius=0.5)
    torch.testing.assert_close(term, 0.5 * (expected + 1.0))  # the term adds weight x (loss - its bound -1)
    term.backward()
    assert model.body[0].weight.grad.abs().sum() > 0  # the term trains the model
    stats = reg.last_stats
    assert {"loss", "coding_length", "spectral_bound", "lambda", "lambda_scale"} <= set(stats)
    assert all(isinstance(v, float) for v in stats.values())
    assert stats["spectral_bound"] == pytest.approx(0.5, rel=0.3)
    assert reg() == 0 and reg.last_stats == {}  # features were cleared by the first call


def test_zero_beta_eval_and_removed_hooks_give_zero_without_error():
    model = TinyMLP()
    reg = MECRegularizer(model, _config(mec_weight=0.0))
    model.train()(torch.randn(8, 6))
    assert reg().item() == 0 and reg.last_stats == {}
    reg = MECRegularizer(model, _config())
    model.eval()(torch.randn(8, 6))
    assert reg().item() == 0
    reg.remove()
    model.train()(torch.randn(8, 6))
    assert reg().item() == 0


def test_a_one_sample_batch_skips_the_term_with_a_warning():
    model = TinyMLP().train()
    reg = MECRegularizer(model, _config())
    model(torch.randn(1, 6))
    with pytest.warns(UserWarning, match="fewer than the 2"):
        assert reg().item() == 0
    assert reg.last_stats == {}
    model(torch.randn(4, 6))
    assert reg().requires_grad


def test_warmup_scales_lambda_from_one_eighth():
    model = TinyMLP().train()
    reg = MECRegularizer(model, _config(mec_lambda_mode="fixed", mec_eps2_per_dim=2.0, mec_warmup_fraction=0.5))
    lambdas = []
    for step in (0, 25, 50, 90):
        reg.set_progress(step, 100)
        model(torch.randn(10, 6))
        reg()
        lambdas.append(reg.last_stats["lambda"])
    full = 8 / (10 * 2.0 * 8)  # d / (m * eps2) with eps2 = 2 d
    assert lambdas == pytest.approx([full / 8, full / 4.5, full, full])


def test_teacher_view_runs_a_frozen_copy_on_the_same_batch():
    model = TinyMLP()
    teacher = make_teacher(model)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        model.body[0].weight.add_(0.3 * torch.randn_like(model.body[0].weight))  # the student drifts
    reg = MECRegularizer(model.train(), _config(mec_view="teacher"), teacher=teacher)
    assert not any(p is q for p in reg.parameters() for q in teacher.parameters())
    x = torch.randn(16, 6)
    model(x)
    term = reg()
    z1 = center_features(teacher.body(x))
    z2 = center_features(model.body(x))
    expected, _ = coding_length_loss(z1, z2, eps2=8.0, target_radius=0.5)
    torch.testing.assert_close(term, 0.5 * (expected + 1.0))  # the term adds weight x (loss - its bound -1)
    term.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert reg.last_stats["teacher_ms"] > 0 and reg.last_stats["teacher_param_mb"] > 0
    with pytest.raises(ValueError, match="make_teacher"):
        MECRegularizer(model, _config(mec_view="teacher"))


def test_teacher_token_rows_line_up_with_the_student_rows():
    model, batch = TINY_MODELS["llama"]()
    teacher = make_teacher(model)  # identical weights: Z1 must equal Z2 row for row
    cfg = _config(mec_max_rows=6)
    reg_teacher = MECRegularizer(model.train(), cfg.replace(mec_view="teacher"), teacher=teacher)
    reg_self = MECRegularizer(model, cfg)
    for reg in (reg_teacher, reg_self):
        reg.set_progress(7, 100)
    model(**batch)
    teacher_term, self_term = reg_teacher(), reg_self()
    torch.testing.assert_close(teacher_term, self_term)
    assert reg_self.last_stats["rows"] == 6


@pytest.mark.parametrize("routing", ["magnitude", "gate", "features"])
def test_mixture_config_reports_expert_shares(routing):
    model = TinyMLP().train()
    reg = MECRegularizer(model, _config(mec_experts=2, mec_routing=routing))
    gate_params = list(reg.parameters())
    assert len(gate_params) == (2 if routing == "gate" else 0)
    model(torch.randn(20, 6))
    term = reg()
    term.backward()
    stats = reg.last_stats
    assert stats["expert_share/0"] + stats["expert_share/1"] == pytest.approx(1.0)
    assert ("balance" in stats) == (routing == "gate")
    assert reg.stats.taps["head"].term.routing == routing
    for p in gate_params:
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_stats_are_typed_and_flatten_to_every_log_key():
    model = TinyMLP().train()
    reg = MECRegularizer(model, _config(mec_tap_modules=["body.2", "head"], mec_experts=2, mec_routing="gate"))
    model(torch.randn(20, 6))
    reg()
    stats = reg.stats
    assert isinstance(stats, MECStats) and set(stats.taps) == {"body.2", "head"}
    for tap in stats.taps.values():
        assert isinstance(tap.term, TermStats) and tap.term.balance is not None and len(tap.term.expert_share) == 2
    flat = reg.last_stats
    assert flat == stats.to_dict() and all(isinstance(v, float) for v in flat.values())
    assert flat["rows"] == stats.rows == 40 and flat["loss"] == pytest.approx(float(stats.total))
    for name in ("body.2", "head"):  # each tap's own numbers, under its name
        assert {f"{name}/{key}" for key in ("loss", "coding_length", "spectral_bound", "lambda", "balance",
                                            "expert_share/1", "expert_lambda/0")} <= set(flat)


def test_block_taps_with_activation_checkpointing():
    model, batch = TINY_MODELS["llama"]()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    reg = MECRegularizer(model.train(), _config(mec_taps="head+blocks"))
    out = model(**batch)
    term = reg()
    (out.loss + term).backward()
    assert {"model.layers.0/loss", "lm_head/loss"} <= set(reg.last_stats)
    assert reg.last_stats["rows"] == 3 * int(batch["attention_mask"].sum())
    assert reg() == 0  # the recomputation during backward captured nothing


def test_make_teacher_refuses_a_quantized_model():
    prepare_model = pytest.importorskip("mec_quant_plugin.api").prepare_model
    model = TinyMLP()
    prepare_model(model, MECQuantConfig())
    with pytest.raises(ValueError, match="before prepare_model"):
        make_teacher(model)
