"""`MECRegularizer`: capture + view + (mixture) coding length as one weighted loss term.

Usage in a training loop (the Trainer callback does the same):

    reg = MECRegularizer(model, config)            # hooks the model; gate params in reg.parameters()
    for step, batch in enumerate(loader):
        reg.set_progress(step, total_steps)        # lambda warm-up, sub-sampling seed
        loss = model(**batch).loss + reg()         # reg() = beta * term on the LAST forward
        loss.backward()
"""

from __future__ import annotations

import copy
import re
import time
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from ..config import MECQuantConfig
from ..distributed import is_distributed
from .capture import FeatureCapture, resolve_taps
from .coding_length import coding_length_loss
from .conditioning import center_features, warmup_lambda_scale
from .distributed import gather_rows
from .mixture import mixture_coding_length_loss
from .stats import MECStats, TapStats, TermStats


def make_teacher(model: nn.Module) -> nn.Module:
    """A frozen full-precision copy of `model` for the "teacher" view: eval mode, no grad.

    Make it BEFORE quantizing the model (and before building the regularizer, so the copy carries
    no capture hooks).

    Example:
        >>> teacher = make_teacher(model); prepare_model(model, config)
        >>> reg = MECRegularizer(model, config.replace(mec_view="teacher"), teacher=teacher)

    Raises:
        ValueError: the model already holds fake-quantized layers (the teacher must be float).
    """
    from ..modules.registry import is_fake_quantized

    if any(is_fake_quantized(mod) for mod in model.modules()):
        raise ValueError(
            "make_teacher(model) got an already quantized model; call it before prepare_model/quantize_ "
            "so the teacher is the full-precision network."
        )
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def _param_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


class MECRegularizer(nn.Module):
    """The MEC-Quant term, `beta * loss`, computed on the features of the model's last forward.

    Args:
        model: the (quantized) model being trained; hooks are registered on it.
        config: the `mec_*` fields set view, taps, order, lambda, conditioning, experts, gather.
        teacher: frozen float copy from `make_teacher`, required by `mec_view="teacher"`.
        gate: routing module for `mec_routing="gate"` ((m, d) -> (m, K) logits), shared by all
            taps; by default one `nn.Linear(d, K)` per tap is built here (d read from the tap).
        balance_weight: weight of the gate's load-balancing term.
        seed: base seed of token-row sub-sampling.

    `stats` is the `MECStats` of the last call (None when it computed nothing): the unweighted
    loss, per-tap `TermStats`, the warm-up factor, the teacher's cost. `last_stats` is the same
    as floats by log key (`MECStats.to_dict`), `{}` when nothing was computed.

    Raises:
        ValueError: teacher view without teacher; taps not found; gate dimension unknown.
    """

    def __init__(
        self,
        model: nn.Module,
        config: MECQuantConfig,
        *,
        teacher: nn.Module | None = None,
        gate: nn.Module | None = None,
        balance_weight: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.config = config
        self.balance_weight = balance_weight
        self.taps = resolve_taps(model, config.mec_taps, config.mec_tap_modules)
        # Kept out of the module tree: the student's parameters belong to the task optimizer and
        # the teacher must never reach an optimizer nor a state dict of this term.
        self.__dict__["_model"] = model
        self.__dict__["_teacher"] = teacher
        self.capture = FeatureCapture(model, self.taps, max_rows=config.mec_max_rows, seed=seed)
        self.teacher_capture: FeatureCapture | None = None
        if config.mec_view == "teacher":
            if teacher is None:
                raise ValueError(
                    "mec_view='teacher' needs teacher=make_teacher(model), made before quantization."
                )
            self.teacher_capture = FeatureCapture(
                teacher, self.taps, max_rows=config.mec_max_rows, training_only=False, require_grad=False, seed=seed
            )
        self.gates = nn.ModuleDict()
        self.shared_gate = gate
        if config.mec_routing == "gate" and config.mec_experts > 1 and gate is None:
            for name, side in self.taps:
                dim = self._tap_dim(model.get_submodule(name), side)
                if dim is None:
                    raise ValueError(
                        f"Cannot tell the feature dimension of tap {name!r} ({side}) to build the gate; "
                        "pass gate=nn.Linear(d, mec_experts) to MECRegularizer."
                    )
                self.gates[self._key(name)] = nn.Linear(dim, config.mec_experts).to(_param_device(model))
        self.lambda_scale = 1.0
        self.stats: MECStats | None = None
        self._warned_small = False

    @staticmethod
    def _key(name: str) -> str:
        return re.sub(r"\W", "_", name) or "model"

    @staticmethod
    def _tap_dim(module: nn.Module, side: str) -> int | None:
        if side == "input":
            for attr in ("in_features", "in_channels", "nx"):  # Linear, Conv2d, transformers Conv1D
                if isinstance(getattr(module, attr, None), int):
                    return getattr(module, attr)
        return None

    def set_progress(self, step: int, total_steps: int) -> None:
        """Drive MEC's lambda warm-up (over `mec_warmup_fraction` of training) and the row seed."""
        self.lambda_scale = warmup_lambda_scale(step, total_steps, self.config.mec_warmup_fraction)
        self.capture.set_step(step)
        if self.teacher_capture is not None:
            self.teacher_capture.set_step(step)

    @property
    def last_stats(self) -> dict[str, float]:
        """`stats.to_dict()`: every statistic of the last call as a float by log key, `{}` when it
        computed nothing (converted on access, with one device sync: none in the training step).

        Example:
            >>> loss = task_loss + reg(); print(reg.last_stats.get("loss", 0.0))
        """
        return {} if self.stats is None else self.stats.to_dict()

    def _teacher_features(self) -> tuple[dict[str, Tensor], float, float]:
        """The teacher's features of the student's last inputs, its forward time (ms), its size (MB)."""
        teacher, capture = self.__dict__["_teacher"], self.teacher_capture
        args, kwargs = self.capture.inputs
        kwargs = {k: v for k, v in kwargs.items() if k != "labels"}  # the teacher's loss is not needed
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if device is not None and _param_device(teacher) != device:
            teacher.to(device)
        start = time.perf_counter()
        with torch.no_grad():
            teacher(*args, **kwargs)
        elapsed_ms = 1000 * (time.perf_counter() - start)
        size_mb = sum(t.numel() * t.element_size() for t in teacher.state_dict().values()) / 2**20
        return capture.pop(), elapsed_ms, size_mb

    def _term(self, name: str, student: Tensor, teacher: Tensor | None) -> tuple[Tensor, TermStats] | None:
        cfg = self.config
        if cfg.mec_gather and is_distributed():
            student = gather_rows(student)
            teacher = None if teacher is None else gather_rows(teacher)
        z2 = student.float()
        z1 = None if teacher is None else teacher.float()
        if cfg.mec_center or cfg.mec_standardize:
            z2 = center_features(z2, standardize=cfg.mec_standardize)
            z1 = None if z1 is None else center_features(z1, standardize=cfg.mec_standardize)
        if z1 is None:  # self view: Z1 = Z2 = the quantized features
            z1, z2 = z2, None
        m, d = z1.shape
        needed = 2 * cfg.mec_experts if cfg.mec_experts > 1 and cfg.mec_routing != "features" else 2
        if m < needed:  # e.g. a last batch of one sample: skip this step's term rather than fail
            if not self._warned_small:
                self._warned_small = True
                warnings.warn(
                    f"Tap {name!r} gave {m} rows, fewer than the {needed} the term needs "
                    f"(mec_experts={cfg.mec_experts}, routing={cfg.mec_routing!r}); the term is skipped "
                    "for such batches.",
                    stacklevel=3,
                )
            return None
        kwargs: dict[str, Any] = dict(
            eps2=cfg.mec_eps2_per_dim * d,
            order=cfg.mec_order,
            target_radius=cfg.mec_target_radius if cfg.mec_lambda_mode == "adaptive" else None,
            lam_scale=self.lambda_scale,
        )
        if cfg.mec_experts == 1:
            return coding_length_loss(z1, z2, **kwargs)
        gate = self.shared_gate if self.shared_gate is not None else self.gates[self._key(name)] if self.gates else None
        if gate is not None:
            gate.to(z1.device)
        return mixture_coding_length_loss(
            z1, z2, experts=cfg.mec_experts, routing=cfg.mec_routing, gate=gate,
            balance_weight=self.balance_weight, **kwargs,
        )

    def forward(self) -> Tensor:
        """`beta * term` on the features of the last training forward; clears them.

        Returns a zero tensor (no error) when beta is 0 or nothing was captured (eval forward).
        """
        features = self.capture.pop()
        self.stats = None
        device = _param_device(self.__dict__["_model"])
        beta = self.config.mec_weight
        if beta == 0 or not features or self.capture.inputs is None:
            self.capture.clear()
            return torch.zeros((), device=device)
        teacher_features, teacher_ms, teacher_mb = {}, None, None
        if self.teacher_capture is not None:
            teacher_features, teacher_ms, teacher_mb = self._teacher_features()
        self.capture.clear()
        losses, taps = [], {}
        for name, _ in self.taps:
            if name not in features:
                continue
            result = self._term(name, features[name], teacher_features.get(name))
            if result is None:
                continue
            loss, term = result
            losses.append(loss)
            taps[name] = TapStats(loss=loss.detach(), rows=features[name].shape[0], term=term)
        if not losses:
            return torch.zeros((), device=device)
        # Normalized by the number of taps, so adding block taps does not rescale beta.
        loss = torch.stack(losses).mean()
        self.stats = MECStats(
            loss=loss.detach(), lambda_scale=self.lambda_scale, taps=taps,
            teacher_ms=teacher_ms, teacher_param_mb=teacher_mb,
        )
        return beta * loss

    def remove(self) -> None:
        """Remove every hook registered on the model (and teacher)."""
        self.capture.remove()
        if self.teacher_capture is not None:
            self.teacher_capture.remove()
