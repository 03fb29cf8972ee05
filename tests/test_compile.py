"""torch.compile of a prepared model (issue 13 §1): the same loss and gradients as eager, and no
graph break nor recompilation once the activation steps are initialized (the first step calibrates
eagerly, the second recompiles once on the now-known flags; from the third on, nothing).

The numerics tests use the `aot_eager` backend (dynamo + AOTAutograd, the graphs inductor would
receive, without the C++ compile that takes minutes on a loaded CPU); one inductor test and the
Trainer test are marked slow.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from testing_utils import check_trained_with_the_term, make_trainer
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from transformers import TrainerCallback

from mec_quant_plugin import MECQuantConfig, prepare_model
from mec_quant_plugin.quantizers import ActivationFakeQuantizer, WeightFakeQuantizer

WARM_UP = 2  # step 1: eager calibration (one break per activation quantizer); step 2: one recompile


class _Linear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


class _Embedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(ids).mean(dim=1))


_INPUTS: dict[type[nn.Module], Callable[[], torch.Tensor]] = {
    _Linear: lambda: torch.randn(6, 8),
    _Conv: lambda: torch.randn(2, 4, 6, 6),
    _Embedding: lambda: torch.randint(0, 32, (4, 5)),
}


def _config(weight_bits: int, act_bits: int | None, signedness: str = "auto", group: int | None = None,
            **extra) -> MECQuantConfig:
    granularity = {"weight_granularity": "per_group", "group_size": group} if group else {}
    return MECQuantConfig(weight_bits=weight_bits, act_bits=act_bits, act_signedness=signedness,
                          edge_layers="same", **granularity, **extra)


# "auto" gives a signed step (with offset) on the raw input and unsigned ones after each ReLU.
CASES = {
    "linear-W2A2-auto-per-channel": (_Linear, _config(2, 2)),
    "linear-W4A4-signed-group4": (_Linear, _config(4, 4, "signed", group=4)),
    "linear-W1A2-unsigned": (_Linear, _config(1, 2, "unsigned")),
    "conv-W2A2-auto-per-channel": (_Conv, _config(2, 2)),
    "conv-W1A4-signed-group4": (_Conv, _config(1, 4, "signed", group=4)),
    "conv-W4A2-ternary-unsigned": (_Conv, _config(2, 2, "unsigned", ternary=True)),
    "embedding-W4-group4-A2-signed": (_Embedding, _config(4, 2, "signed", group=4)),
    "embedding-W1-A2-auto": (_Embedding, _config(1, 2)),
}


def _pair(model_cls: type[nn.Module], config: MECQuantConfig) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    eager = model_cls()
    compiled = copy.deepcopy(eager)
    for m in (eager, compiled):
        prepare_model(m, config)
        m.train()
    return eager, compiled


def _step(model: nn.Module, x: torch.Tensor, target: torch.Tensor, lr: float = 0.05) -> tuple[torch.Tensor, dict]:
    """Loss and gradients of one step, then a plain SGD update (identical arithmetic on both sides)."""
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), target)
    loss.backward()
    named = getattr(model, "_orig_mod", model).named_parameters()
    grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)
    return loss.detach(), grads


def _run_side_by_side(eager: nn.Module, compiled: nn.Module, backend: str, steps: int,
                      tol: dict[str, float]) -> CompileCounterWithBackend:
    """Eager and compiled models step by step on the same batches; asserts equal loss and gradients
    every step, no graph break from the second step on (the recompile there traces the whole model
    as one graph) and nothing compiled after the warm-up."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    fn = torch.compile(compiled, backend=counter)
    make_input = _INPUTS[type(eager)]
    torch.manual_seed(1)
    batches = [(make_input(), torch.randint(0, 3, (len(make_input()),))) for _ in range(steps)]
    frames_after_warm_up = None
    for i, (x, y) in enumerate(batches):
        if i == 1:
            counters.clear()
        if i == WARM_UP:
            frames_after_warm_up = counter.frame_count
        loss_e, grads_e = _step(eager, x, y)
        loss_c, grads_c = _step(fn, x, y)
        torch.testing.assert_close(loss_c, loss_e, **tol, msg=lambda m, i=i: f"step {i} loss: {m}")
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], **tol,
                                       msg=lambda m, name=name, i=i: f"step {i} grad of {name}: {m}")
    breaks = dict(counters["graph_break"])
    assert not breaks, f"graph breaks after the first step: {list(breaks)}"
    assert counter.frame_count == frames_after_warm_up, (
        f"{counter.frame_count - frames_after_warm_up} frames recompiled after the warm-up"
    )
    return counter


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_matches_eager_without_graph_breaks(case: str) -> None:
    model_cls, config = CASES[case]
    eager, compiled = _pair(model_cls, config)
    kinds = {type(m) for m in eager.modules()}
    assert WeightFakeQuantizer in kinds and ActivationFakeQuantizer in kinds
    counter = _run_side_by_side(eager, compiled, "aot_eager", steps=WARM_UP + 1, tol={"rtol": 1e-5, "atol": 1e-6})
    assert counter.frame_count >= 1  # it was compiled, not silently run eagerly


def test_signedness_cases_cover_both_ranges() -> None:
    """The cases above exercise signed (with offset) and unsigned activation steps."""
    eager, _ = _pair(*CASES["linear-W2A2-auto-per-channel"])
    eager(_INPUTS[_Linear]())
    signed = [bool(m.signed) for m in eager.modules() if isinstance(m, ActivationFakeQuantizer)]
    assert True in signed and False in signed


@pytest.mark.parametrize("case", ["linear-W2A2-auto-per-channel", "conv-W1A4-signed-group4", "embedding-W4-group4-A2-signed"])
def test_initialized_model_is_one_graph(case: str) -> None:
    """Once the steps are initialized the whole forward of a prepared model is one graph: the
    quantizers' calibration path (a `torch.compiler.disable` function) is no longer called."""
    model_cls, config = CASES[case]
    eager, _ = _pair(model_cls, config)
    eager(_INPUTS[model_cls]()).sum().backward()
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(eager)(_INPUTS[model_cls]())
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_inductor_matches_eager() -> None:
    """The fused (inductor, C++) kernels: same loss and gradients to float tolerance."""
    eager, compiled = _pair(_Linear, _config(2, 4))
    _run_side_by_side(eager, compiled, "inductor", steps=WARM_UP + 1, tol={"rtol": 1e-4, "atol": 1e-5})


@pytest.mark.slow
def test_trainer_torch_compile_with_callback() -> None:
    """`Trainer(torch_compile=True)` with MECQuantCallback: the same losses as the eager Trainer,
    the coding-length term logged, and neither a graph break nor a recompilation in step 3."""

    class SteadyState(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == WARM_UP:
                counters.clear()

    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        torch._dynamo.reset()
        with tempfile.TemporaryDirectory() as out:
            extra = {"torch_compile": True, "torch_compile_backend": "aot_eager"} if compiled else {}
            trainer, _, _ = make_trainer("bert", out, max_steps=WARM_UP + 1, **extra)
            trainer.add_callback(SteadyState())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.train()
            losses[compiled] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
            check_trained_with_the_term(trainer)
            if compiled:
                assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)
                assert not dict(counters["graph_break"]), list(counters["graph_break"])
                assert not counters["stats"]["unique_graphs"], "recompiled in the steady state"
    assert len(losses[True]) == WARM_UP + 1
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)


def _graph_calls_per_step(initialize_first: bool, steps: int = 3) -> list[int]:
    """Compiled graphs run per training step of a 12-layer W2A2 MLP (one graph = whole forward)."""
    calls = [0]

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        def run(*args):
            calls[0] += 1
            return gm.forward(*args)
        return run

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(12) for m in (nn.Linear(16, 16), nn.ReLU())])
    prepare_model(model, _config(2, 2))
    x = torch.randn(4, 16)
    if initialize_first:
        model(x).sum().backward()
    compiled = torch.compile(model, backend=backend)
    per_step = []
    for _ in range(steps):
        calls[0] = 0
        compiled(x).sum().backward()
        per_step.append(calls[0])
    return per_step


def test_initialized_deep_model_runs_one_graph_per_step() -> None:
    """Compiled after the steps are initialized: one forward graph per step."""
    assert _graph_calls_per_step(initialize_first=True) == [1, 1, 1]


@pytest.mark.xfail(strict=True, reason=(
    "known defect (issue 13 §1, open): compiled BEFORE the activation steps are initialized, the "
    "first step's eager calibration breaks the graph inside every layer; dynamo then compiles each "
    "layer's frames separately and keeps those pieces (36 graphs per step for 12 layers, and past 8 "
    "layers the recompile limit sends frames back to eager) instead of recompiling the whole model. "
    "Workaround: calibrate_activations(model, batch) (or one eager step) before torch.compile."))
def test_deep_model_compiled_before_initialization_runs_one_graph_per_step() -> None:
    assert _graph_calls_per_step(initialize_first=False)[-1] == 1


def test_trainer_compiles_only_after_the_eager_calibration_step() -> None:
    """`Trainer(torch_compile=True)` compiles the model before the first batch; compiled while the
    activation steps are still uncalibrated, the calibration step split the model into per-layer
    graphs that stayed (test_deep_model_compiled_before_initialization_runs_one_graph_per_step).
    The callback runs the first step eagerly, so dynamo first sees the calibrated model: no graph
    is compiled during step 1, and the losses equal the eager Trainer's."""

    compiled_in_step: dict[int, int] = {}

    class CountGraphs(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self._before = counters["stats"]["unique_graphs"]

        def on_step_end(self, args, state, control, **kwargs):
            compiled_in_step[state.global_step] = counters["stats"]["unique_graphs"] - self._before

    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        torch._dynamo.reset()
        counters.clear()
        with tempfile.TemporaryDirectory() as out:
            extra = {"torch_compile": True, "torch_compile_backend": "aot_eager"} if compiled else {}
            trainer, _, _ = make_trainer("llama", out, max_steps=2, **extra)
            trainer.add_callback(CountGraphs())
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer.train()
            losses[compiled] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert compiled_in_step[1] == 0, compiled_in_step  # step 1 ran eagerly (it calibrated)
    assert compiled_in_step[2] >= 1, compiled_in_step  # compiled from step 2 on
    torch.testing.assert_close(losses[True], losses[False], rtol=1e-5, atol=1e-6)
