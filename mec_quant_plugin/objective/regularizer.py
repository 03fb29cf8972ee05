"""`MECRegularizer`: every term of the MEC-Quant objective as one weighted loss.

The terms, each on when its weight in `MECQuantConfig` is > 0:
- `mec_weight`: the coding length of the captured features (head / blocks, self or teacher view,
  plain or mixture), the original term;
- `mec_layer_weight`: the per-layer coding length of every low-bit layer (`layerwise.py`);
- `mec_label_weight`: the label-aware rate reduction of the head features (`class_coding.py`),
  needs the batch `labels`;
- `mec_mi_weight`: the mutual information (coding lengths) between the student's and the frozen
  teacher's block outputs (`mutual_information.py`), needs `teacher=make_teacher(...)`;
- `distill_weight`: logit distillation from the frozen full-precision teacher (`distill.py`),
  needs the model's `logits` and `teacher=make_teacher(...)`.

Usage in a training loop (the Trainer callback and mixin do the same):

    teacher = make_teacher(model)                  # only for distill_weight > 0 / mec_view="teacher"
    prepare_model(model, config)
    reg = MECRegularizer(model, config, teacher=teacher)   # hooks the model; gate params in reg.parameters()
    for step, (x, y) in enumerate(loader):
        reg.set_progress(step, total_steps)        # lambda warm-up, sub-sampling seed
        logits = model(x)
        loss = F.cross_entropy(logits, y) + reg(logits=logits, labels=y)  # the terms of the LAST forward
        loss.backward()

`reg()` without arguments is enough when only `mec_weight` / `mec_layer_weight` are on.

Each term is added as `weight * (loss - lower bound)`: the coding-length losses are negative by
construction (their first-order part is minus a mean cosine), so a plain sum would drive the
training loss below the task loss (a final `train_loss` of 0.0008 beside an eval loss of 0.118).
The bounds (`term_lower_bounds`) are constants, so no gradient changes; every logged `*loss`
statistic is the weighted, non-negative amount that term adds to the training loss.
"""

from __future__ import annotations

import copy
import math
import re
import time
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..config import MECQuantConfig
from ..distributed import is_distributed
from .capture import FeatureCapture, find_blocks, resolve_taps, subsample_rows
from .class_coding import rate_reduction_loss
from .coding_length import coding_length_loss
from .conditioning import center_features, warmup_lambda_scale
from .distill import distillation_loss
from .distributed import gather_rows
from .layerwise import LayerwiseCodingLength
from .mixture import mixture_coding_length_loss
from .mutual_information import MI_EPS2, mutual_information_loss, mutual_information_lower_bound
from .stats import LayerwiseStats, MECStats, TapStats, TermStats

LABEL_EPS2 = 0.5  # the eps^2 of the label-aware term (`rate_reduction_loss`'s default)


def term_lower_bounds(config: MECQuantConfig, balance_weight: float = 0.01) -> dict[str, float]:
    """A lower bound of each unweighted term, by log key: what `MECRegularizer` subtracts before
    weighting, so every term it adds is >= 0 (a constant: gradients are unchanged).

    - `loss` (head term), `layer/loss`: `-S / (m lambda) >= -1`. With eigenvalues x_i of
      C = lambda Z1 Z2^T and S = sum_i S_n(x_i) (S_n the series truncated at even order n, or log):
      self view, C is PSD and S_n(x) <= log(1 + x) <= x for x >= 0, so S <= tr C = lambda m (rows
      have norm <= 1); teacher view, Re S_n(x) <= |x| on the unit disk and sum |x_i| <= ||C||_* <=
      lambda ||Z1||_F ||Z2||_F <= lambda m, which holds while the series converges (spectral bound
      < 1; the adaptive lambda keeps it there) and always for the exact log det. Mixtures mix
      experts with weights summing to <= 1 (gate rows scaled by sqrt(p) <= 1); the gate's balance
      term `K sum_e f_e P_e - 1 >= 1/K - 1` (a routed sample's top probability is >= 1/K) adds
      `-balance_weight (1 - 1/K)`.
    - `label/loss`: `-(R(Z) - sum_j m_j/m R(Z_j)) / d >= -R(Z)/d >= -log(1 + 1/eps^2) / 2` (the
      eigenvalues of (d/(m eps^2)) Z^T Z sum to <= d/eps^2; log det is largest when they are equal).
    - `mi/loss`: `-I(Zq; Zfp) / d >= -log(1 + 1/eps^2) / 2` (`mutual_information_loss`).
    - `distill/loss`: a KL divergence, >= 0.

    Example:
        >>> term_lower_bounds(MECQuantConfig())["loss"]
        -1.0
    """
    head = -1.0
    if config.mec_routing == "gate" and config.mec_experts > 1:
        head -= balance_weight * (1.0 - 1.0 / config.mec_experts)
    return {"loss": head, "layer/loss": -1.0, "label/loss": -0.5 * math.log1p(1.0 / LABEL_EPS2),
            "mi/loss": mutual_information_lower_bound(MI_EPS2), "distill/loss": 0.0}


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


def _logits_of(output: Any, whose: str) -> Tensor:
    """The logits in a model's output: the tensor itself, or the `logits` of a model output."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    raise TypeError(
        f"Cannot find logits in {whose} ({type(output).__name__}): pass a tensor or a model output "
        "with a `logits` field."
    )


class MECRegularizer(nn.Module):
    """The MEC-Quant objective: the weighted sum of its enabled terms on the model's last forward.

    Args:
        model: the (quantized) model being trained; hooks are registered on it.
        config: the weights of the terms (`mec_weight`, `mec_layer_weight`, `mec_label_weight`,
            `mec_mi_weight`, `distill_weight`) and their settings (view, taps, order, lambda,
            conditioning, experts, gather, `mec_layer_*`, `mec_mi_modules`, `distill_temperature`).
        teacher: frozen float copy from `make_teacher`, required when `config.teacher_needs()`
            names a setting (`mec_view="teacher"`, `mec_mi_weight > 0`, `distill_weight > 0`).
        gate: routing module for `mec_routing="gate"` ((m, d) -> (m, K) logits), shared by all
            taps; by default one `nn.Linear(d, K)` per tap is built here (d read from the tap).
        balance_weight: weight of the gate's load-balancing term.
        seed: base seed of token-row sub-sampling.

    It returns `sum_t weight_t * (loss_t - lower_bound_t)` (`term_lower_bounds`: constants, so
    the gradients are those of the weighted losses), >= 0 so the training loss stays >= the task
    loss. `stats` is the `MECStats` of the last call (None when it computed nothing): each term's
    unweighted loss, per-tap `TermStats`, the warm-up factor, the teacher's cost, the total. `last_stats` is the same as floats by log key (`MECStats.to_dict`), `{}` when nothing
    was computed.

    Example:
        >>> reg = MECRegularizer(model, MECQuantConfig(distill_weight=1.0), teacher=teacher)
        >>> out = model(x); loss = F.cross_entropy(out, y) + reg(logits=out, labels=y)

    Raises:
        ValueError: teacher view, mutual information or distillation without teacher; taps or
            blocks not found; gate dimension unknown; `mec_layer_weight > 0` on a model that is not prepared.
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
        needs = config.teacher_needs()
        if needs and teacher is None:
            raise ValueError(
                f"{' and '.join(needs)} needs teacher=make_teacher(model), made before quantization "
                "(the Trainer callback and mixin make it themselves)."
            )
        # The label-aware term codes the head features whatever `mec_taps` the coding length uses.
        self.head_name: str | None = None
        captured = list(self.taps)
        if config.mec_label_weight > 0:
            self.head_name = resolve_taps(model, "head")[0][0]
            if (self.head_name, "input") not in captured:
                captured.append((self.head_name, "input"))
        self.capture = FeatureCapture(model, captured, max_rows=config.mec_max_rows, seed=seed)
        self.layer_term: LayerwiseCodingLength | None = None
        if config.mec_layer_weight > 0:
            self.layer_term = LayerwiseCodingLength(
                model, config.mec_layer_target, experts=config.mec_layer_experts, max_rows=config.mec_max_rows,
                standardize=config.mec_layer_standardize, seed=seed,
            )
        self.teacher_capture: FeatureCapture | None = None
        if config.mec_view == "teacher":
            self.teacher_capture = FeatureCapture(
                teacher, self.taps, max_rows=config.mec_max_rows, training_only=False, require_grad=False, seed=seed
            )
        # The mutual-information term: block outputs of student and teacher, spatial positions as
        # rows, the same rows in both (same step seed, same shapes).
        self.mi_capture: FeatureCapture | None = None
        self.mi_teacher_capture: FeatureCapture | None = None
        if config.mec_mi_weight > 0:
            mi_taps = [(name, "output") for name in (config.mec_mi_modules or find_blocks(model))]
            self.mi_capture = FeatureCapture(model, mi_taps, max_rows=config.mec_max_rows, seed=seed, positions=True)
            self.mi_teacher_capture = FeatureCapture(
                teacher, mi_taps, max_rows=config.mec_max_rows, training_only=False, require_grad=False, seed=seed,
                positions=True,
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
        self.lower_bounds = term_lower_bounds(config, balance_weight)
        self.weights = {"loss": config.mec_weight, "layer/loss": config.mec_layer_weight,
                        "label/loss": config.mec_label_weight, "mi/loss": config.mec_mi_weight,
                        "distill/loss": config.distill_weight}
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
        for capture in (self.teacher_capture, self.mi_capture, self.mi_teacher_capture):
            if capture is not None:
                capture.set_step(step)
        if self.layer_term is not None:
            self.layer_term.set_step(step)

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen full-precision teacher (None without one); kept out of the module tree."""
        return self.__dict__["_teacher"]

    @property
    def last_stats(self) -> dict[str, float]:
        """`stats.to_dict()`: every statistic of the last call as a float by log key, `{}` when it
        computed nothing (converted on access, with one device sync: none in the training step).

        Example:
            >>> loss = task_loss + reg(); print(reg.last_stats.get("loss", 0.0))
        """
        return {} if self.stats is None else self.stats.to_dict()

    def _run_teacher(
        self, inputs: tuple[tuple[Any, ...], dict[str, Any]]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Any, float, float]:
        """The teacher on the student's last inputs: its features (teacher view), its block outputs
        (mutual-information term), its output, its forward time (ms) and its size (MB)."""
        teacher = self.__dict__["_teacher"]
        args, kwargs = inputs
        kwargs = {k: v for k, v in kwargs.items() if k != "labels"}  # the teacher's loss is not needed
        device = next((a.device for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if device is not None and _param_device(teacher) != device:
            teacher.to(device)
        start = time.perf_counter()
        with torch.no_grad():
            output = teacher(*args, **kwargs)
        elapsed_ms = 1000 * (time.perf_counter() - start)
        size_mb = sum(t.numel() * t.element_size() for t in teacher.state_dict().values()) / 2**20
        features = self.teacher_capture.pop() if self.teacher_capture is not None else {}
        blocks = self.mi_teacher_capture.pop() if self.mi_teacher_capture is not None else {}
        return features, blocks, output, elapsed_ms, size_mb

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

    def forward(self, logits: Any = None, labels: Tensor | None = None) -> Tensor:
        """The weighted sum of the enabled terms on the last training forward; clears its features.

        Args:
            logits: the model's output of that forward (a tensor, or a model output with
                `logits`); needed when `distill_weight > 0`.
            labels: the batch's class labels, one per sample; needed when `mec_label_weight > 0`.

        Returns `sum_t weight_t * (loss_t - lower_bound_t)` over the enabled terms (>= 0), a zero
        tensor (no error) when every weight is 0 or no training forward was
        captured (eval forward, or a second call after the same forward).

        Raises:
            ValueError: a term that needs `logits` or `labels` did not get them; labels that are
                not one class per head-feature row.
        """
        cfg = self.config
        if cfg.distill_weight > 0 and logits is None:
            raise ValueError(
                f"distill_weight={cfg.distill_weight} needs the model's logits: call reg(logits=model_output, ...)."
            )
        if cfg.mec_label_weight > 0 and labels is None:
            raise ValueError(f"mec_label_weight={cfg.mec_label_weight} needs the batch labels: call reg(labels=y, ...).")
        features = self.capture.pop()
        inputs = self.capture.inputs
        self.capture.clear()
        blocks = {}
        if self.mi_capture is not None:
            blocks = self.mi_capture.pop()
            self.mi_capture.clear()
        self.stats = None
        device = _param_device(self.__dict__["_model"])
        if inputs is None:
            return torch.zeros((), device=device)
        teacher_features, teacher_blocks, teacher_output, teacher_ms, teacher_mb = {}, {}, None, None, None
        head_on = cfg.mec_weight > 0 and any(name in features for name, _ in self.taps)
        if (head_on and self.teacher_capture is not None) or cfg.distill_weight > 0 or blocks:
            teacher_features, teacher_blocks, teacher_output, teacher_ms, teacher_mb = self._run_teacher(inputs)

        weighted: list[Tensor] = []
        head_loss, taps = None, {}
        if head_on:
            head_loss, taps = self._head_term(features, teacher_features)
            if head_loss is not None:
                weighted.append(self._added('loss', head_loss))
        layerwise = None
        if self.layer_term is not None:
            layer_loss = self.layer_term()
            layer_stats = self.layer_term.last_stats
            if layer_stats:  # empty when no layer had enough rows
                layerwise = LayerwiseStats(loss=layer_loss.detach(), coding_length=layer_stats["coding_length"],
                                           layers=int(layer_stats["layers"]))
                weighted.append(self._added('layer/loss', layer_loss))
        label_loss = None
        if cfg.mec_label_weight > 0 and self.head_name in features:
            z = features[self.head_name]
            if z.shape[0] >= 2:
                label_loss = rate_reduction_loss(z, self._labels_for(z, labels), eps2=LABEL_EPS2)
                weighted.append(self._added('label/loss', label_loss))
        mi_loss = self._mi_term(blocks, teacher_blocks) if blocks else None
        if mi_loss is not None:
            weighted.append(self._added('mi/loss', mi_loss))
        distill_loss = None
        if cfg.distill_weight > 0:
            mask = inputs[1].get("attention_mask")
            student = self._logit_rows(_logits_of(logits, "logits"), mask)
            teacher = self._logit_rows(_logits_of(teacher_output, "the teacher's output"), mask)
            distill_loss = distillation_loss(student, teacher, cfg.distill_temperature)
            weighted.append(self._added('distill/loss', distill_loss))

        if not weighted:
            return torch.zeros((), device=device)
        total = weighted[0]
        for part in weighted[1:]:
            total = total + part
        self.stats = MECStats(
            loss=None if head_loss is None else head_loss.detach(), lambda_scale=self.lambda_scale, taps=taps,
            teacher_ms=teacher_ms, teacher_param_mb=teacher_mb, layerwise=layerwise,
            label_loss=None if label_loss is None else label_loss.detach(),
            mi_loss=None if mi_loss is None else mi_loss.detach(),
            distill_loss=None if distill_loss is None else distill_loss.detach(), total=total.detach(),
            weights=self.weights, lower_bounds=self.lower_bounds,
        )
        return total

    def _added(self, key: str, loss: Tensor) -> Tensor:
        """What the term logged as `key` adds to the training loss: weight x (loss - its lower bound)."""
        return self.weights[key] * (loss - self.lower_bounds[key])

    def _head_term(
        self, features: dict[str, Tensor], teacher_features: dict[str, Tensor]
    ) -> tuple[Tensor | None, dict[str, TapStats]]:
        """The coding-length term of the taps (unweighted, mean over taps) and each tap's stats."""
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
        # Normalized by the number of taps, so adding block taps does not rescale beta.
        return (torch.stack(losses).mean() if losses else None), taps

    @staticmethod
    def _mi_term(student: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor | None:
        """`mutual_information_loss` of each block's student and teacher rows, averaged over blocks
        (so its weight does not grow with depth); None when no block had 2 rows."""
        losses = [mutual_information_loss(rows, teacher[name]) for name, rows in student.items()
                  if rows.shape[0] >= 2 and name in teacher and teacher[name].shape[0] == rows.shape[0]]
        return torch.stack(losses).mean() if losses else None

    def _labels_for(self, rows: Tensor, labels: Tensor) -> Tensor:
        """The labels of the head rows (sub-sampled like the rows when the batch exceeds mec_max_rows)."""
        labels = torch.as_tensor(labels, device=rows.device)
        m = rows.shape[0]
        if labels.dim() == 1 and labels.shape[0] > m == self.capture.max_rows:
            labels = subsample_rows(labels, self.capture.max_rows, self.capture.row_seed)
        if labels.shape != (m,):
            raise ValueError(
                f"mec_label_weight needs one class label per sample of the head features (classification): "
                f"got labels of shape {tuple(labels.shape)} for {m} rows at {self.head_name!r}."
            )
        return labels

    @staticmethod
    def _logit_rows(logits: Tensor, attention_mask: Any) -> Tensor:
        """Token logits without the padded positions; other logits as they are."""
        if (
            logits.dim() == 3
            and isinstance(attention_mask, Tensor)
            and attention_mask.shape == logits.shape[:2]
        ):
            return logits[attention_mask.to(logits.device) != 0]
        return logits

    def remove(self) -> None:
        """Remove every hook registered on the model (and teacher)."""
        self.capture.remove()
        for capture in (self.teacher_capture, self.mi_capture, self.mi_teacher_capture):
            if capture is not None:
                capture.remove()
        if self.layer_term is not None:
            self.layer_term.remove()
