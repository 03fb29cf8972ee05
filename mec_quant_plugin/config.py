"""`MECQuantConfig`: the one configuration object of MEC-Quant.

It holds the quantization settings (what `quantize_` / `prepare_model` do to the layers) and the
settings of the coding-length objective (what the regularizer and the Trainer callback add to the
loss). Every field carries `metadata={"help": ...}` so `transformers.HfArgumentParser` turns the
dataclass into a command line, and `__post_init__` validates with errors that name the bad value
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from torchao.core.config import AOBaseConfig

from .options import (
    ACT_SIGNEDNESS,
    EDGE_LAYER_POLICIES,
    LAMBDA_MODES,
    LAYER_TARGETS,
    NONFINITE_POLICIES,
    ROUTINGS,
    STEPS,
    TAPS,
    VIEWS,
    WEIGHT_GRANULARITIES,
    check_bits,
    check_choice,
    check_order,
)


def _check_positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value}.")


RECOMMENDED_RECIPE: dict[str, Any] = {  # MECQuantConfig.recommended(); measured in docs/ablation.md round 7
    "mec_weight": 0.0,
    "mec_mi_weight": 20.0,
    "distill_weight": 1.0,
    "distill_temperature": 4.0,
}


@dataclass
class MECQuantConfig(AOBaseConfig):
    """Settings of MEC-Quant quantization-aware training.

    Use it like torchao's `QATConfig`: `quantize_(model, MECQuantConfig(step="prepare"),
    filter_fn=is_supported_layer)`, train, then `quantize_(model, MECQuantConfig(step="convert"),
    filter_fn=is_fake_quantized)`; or with the layer policy applied for you:
    `prepare_model(model, config)` / `convert_model(model)`.

    Example:
        >>> cfg = MECQuantConfig(weight_bits=2, act_bits=2)
        >>> MECQuantConfig.from_json(cfg.to_json()) == cfg
        True

    Raises:
        TypeError / ValueError: a field outside its allowed values (the message names both).
    """

    # ---- quantization ----------------------------------------------------------------------
    weight_bits: int | None = field(
        default=2,
        metadata={"help": "Weight bit-width, 1..8 (1 = sign(w)*alpha per channel); None keeps weights float."},
    )
    act_bits: int | None = field(
        default=2,
        metadata={"help": "Bit-width of the inputs of Linear/Conv layers, 1..8; None = not quantized."},
    )
    weight_granularity: str = field(
        default="per_channel",
        metadata={"help": f"Weight step sizes: one of {list(WEIGHT_GRANULARITIES)}."},
    )
    group_size: int | None = field(
        default=None,
        metadata={"help": "Group size along the input dimension when weight_granularity='per_group'."},
    )
    ternary: bool = field(
        default=False,
        metadata={"help": "Ternary weights {-1,0,1}*s (needs weight_bits=2)."},
    )
    act_signedness: str = field(
        default="auto",
        metadata={
            "help": "Activation range: 'auto' (unsigned if the first batch is non-negative, else signed "
            "with a learnable offset, LSQ+), 'signed' or 'unsigned'."
        },
    )
    edge_layers: str | None = field(
        default=None,
        metadata={
            "help": "First layers taking the raw input (stem / patch / token embeddings) and the last "
            "layer (classifier / lm_head): None (default: 8 bits for what the body quantizes, the "
            "literature's W8A8, and float where the body is float, so weight_bits=None, act_bits=None "
            "quantizes nothing), '8bit' (W8, plus A8 when act_bits is set, whatever the body does), "
            "'float' (left unquantized) or 'same' (quantized like the rest)."
        },
    )
    on_nonfinite: str = field(
        default="stop",
        metadata={
            "help": "A Trainer step whose gradients are NaN/inf (the callback and the mixin check before the "
            "optimizer step): 'stop' raises FloatingPointError naming the step and the parameters, before "
            "anything is updated; 'skip' drops that update (weights, step sizes and optimizer state unchanged) "
            "with a warning. Under fp16 mixed precision the GradScaler skips such steps itself."
        },
    )
    step: str = field(
        default="prepare",
        metadata={"help": "torchao QAT step: 'prepare' (insert fake quantizers) or 'convert'."},
    )

    # ---- coding-length objective (MEC) -----------------------------------------------------
    mec_weight: float = field(
        default=0.1,
        metadata={"help": "beta: weight of the coding-length term against the task loss; 0 = plain QAT."},
    )
    mec_view: str = field(
        default="self",
        metadata={
            "help": "Second view of the term: 'self' (quantized features only) or 'teacher' (frozen "
            "full-precision copy, one extra forward without grad)."
        },
    )
    mec_taps: str = field(
        default="head",
        metadata={"help": f"Which representation the term sees: one of {list(TAPS)}."},
    )
    mec_tap_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Explicit module names whose INPUT is the representation (overrides mec_taps)."},
    )
    mec_order: int | None = field(
        default=4,
        metadata={"help": "Even Taylor order of log det; None = exact log det (fp64)."},
    )
    mec_eps2_per_dim: float = field(
        default=1.0,
        metadata={"help": "Distortion eps^2/d (MEC uses 1/32); used when mec_lambda_mode='fixed'."},
    )
    mec_lambda_mode: str = field(
        default="adaptive",
        metadata={
            "help": "'fixed' (lambda = d/(m*eps^2)) or 'adaptive' (lambda set each step so the spectral "
            "radius of C equals mec_target_radius, keeping the series convergent)."
        },
    )
    mec_target_radius: float = field(
        default=0.5,
        metadata={"help": "Target spectral radius of C for the adaptive lambda, in (0, 1)."},
    )
    mec_center: bool = field(
        default=True, metadata={"help": "Center captured features over the batch before normalizing."}
    )
    mec_standardize: bool = field(
        default=False, metadata={"help": "Also divide each feature by its batch std (MEC's BN projector)."}
    )
    mec_experts: int = field(
        default=1, metadata={"help": "Number of experts K of the mixture reformulation (1 = plain term)."}
    )
    mec_routing: str = field(
        default="magnitude",
        metadata={"help": f"Mixture routing: one of {list(ROUTINGS)}."},
    )
    mec_warmup_fraction: float = field(
        default=0.1,
        metadata={"help": "Fraction of training over which 1/lambda goes from 8/lambda to 1/lambda."},
    )
    mec_max_rows: int = field(
        default=1024,
        metadata={
            "help": "Cap on samples (token rows for sequences) per step, per tap and per layer of the per-layer "
            "term; excess rows are sub-sampled."
        },
    )
    mec_gather: bool = field(
        default=False,
        metadata={"help": "Gather features from all ranks (gradient-preserving) so m is the global batch."},
    )

    # ---- candidate terms of MEC-Quant v2 (measured in docs/ablation.md round 5; off by default)
    mec_layer_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the per-layer coding length of every low-bit layer (exact log det, "
            "eps^2/d = 1/32, at most mec_max_rows rows per layer); 0 = off."
        },
    )
    mec_layer_target: str = field(
        default="activations",
        metadata={
            "help": f"What the per-layer term codes: one of {list(LAYER_TARGETS)} ('activations': the quantized "
            "inputs, positions as rows; 'weights': the fake-quantized filters as rows)."
        },
    )
    mec_layer_experts: int = field(
        default=1,
        metadata={"help": "Experts of the per-layer term, rows routed by magnitude quantiles (1 = plain term)."},
    )
    mec_layer_standardize: bool = field(
        default=False,
        metadata={"help": "Per-layer term: divide each channel by its batch std after centering."},
    )
    mec_label_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the label-aware rate reduction (MCR^2) on the head features with the batch "
            "labels (classification); 0 = off."
        },
    )
    mec_mi_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the mutual information (in coding lengths) between the student's and the frozen "
            "full-precision teacher's block outputs, I = R(Zq) + R(Zfp) - R([Zq|Zfp]) on standardized features, "
            "spatial positions / tokens as rows; 0 = off. The Trainer callback / mixin make the teacher."
        },
    )
    mec_mi_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules whose OUTPUTS the mutual-information term compares (default: the model's repeated "
            "blocks, as mec_taps='blocks' finds them)."
        },
    )
    distill_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of logit distillation from the frozen full-precision teacher (T^2 KL); 0 = off. "
            "The Trainer callback / mixin make the teacher before quantizing."
        },
    )
    distill_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature T of the logit distillation, > 0."},
    )

    def __post_init__(self) -> None:
        check_bits("weight_bits", self.weight_bits, allow_none=True)
        check_bits("act_bits", self.act_bits, allow_none=True)
        check_choice("weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES)
        if self.weight_granularity == "per_group":
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(
                    f"weight_granularity='per_group' needs a positive int group_size, got {self.group_size!r}."
                )
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size} is only used with weight_granularity='per_group'; "
                f"got weight_granularity={self.weight_granularity!r}."
            )
        if self.ternary and self.weight_bits != 2:
            raise ValueError(f"ternary=True needs weight_bits=2 (3 levels fit in 2 bits), got {self.weight_bits}.")
        check_choice("act_signedness", self.act_signedness, ACT_SIGNEDNESS)
        if self.edge_layers is not None and self.edge_layers not in EDGE_LAYER_POLICIES:
            raise ValueError(
                f"edge_layers must be None (8 bits for what the body quantizes) or one of "
                f"{list(EDGE_LAYER_POLICIES)}, got {self.edge_layers!r}."
            )
        check_choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)
        check_choice("step", self.step, STEPS)
        _check_positive("mec_weight", self.mec_weight, allow_zero=True)
        check_choice("mec_view", self.mec_view, VIEWS)
        check_choice("mec_taps", self.mec_taps, TAPS)
        if self.mec_tap_modules is not None and (
            not isinstance(self.mec_tap_modules, (list, tuple))
            or not all(isinstance(n, str) for n in self.mec_tap_modules)
        ):
            raise TypeError(f"mec_tap_modules must be a list of module names, got {self.mec_tap_modules!r}.")
        check_order(self.mec_order, "mec_order")
        _check_positive("mec_eps2_per_dim", self.mec_eps2_per_dim)
        check_choice("mec_lambda_mode", self.mec_lambda_mode, LAMBDA_MODES)
        _check_positive("mec_target_radius", self.mec_target_radius)
        if not self.mec_target_radius < 1:
            raise ValueError(f"mec_target_radius must be in (0, 1) for the series to converge, got {self.mec_target_radius}.")
        if isinstance(self.mec_experts, bool) or not isinstance(self.mec_experts, int) or self.mec_experts < 1:
            raise ValueError(f"mec_experts must be an int >= 1, got {self.mec_experts!r}.")
        check_choice("mec_routing", self.mec_routing, ROUTINGS)
        _check_positive("mec_warmup_fraction", self.mec_warmup_fraction, allow_zero=True)
        if self.mec_warmup_fraction > 1:
            raise ValueError(f"mec_warmup_fraction must be in [0, 1], got {self.mec_warmup_fraction}.")
        if isinstance(self.mec_max_rows, bool) or not isinstance(self.mec_max_rows, int) or self.mec_max_rows < 2:
            raise ValueError(f"mec_max_rows must be an int >= 2, got {self.mec_max_rows!r}.")
        _check_positive("mec_layer_weight", self.mec_layer_weight, allow_zero=True)
        check_choice("mec_layer_target", self.mec_layer_target, LAYER_TARGETS)
        if (
            isinstance(self.mec_layer_experts, bool)
            or not isinstance(self.mec_layer_experts, int)
            or self.mec_layer_experts < 1
        ):
            raise ValueError(f"mec_layer_experts must be an int >= 1, got {self.mec_layer_experts!r}.")
        if not isinstance(self.mec_layer_standardize, bool):
            raise TypeError(f"mec_layer_standardize must be True or False, got {self.mec_layer_standardize!r}.")
        _check_positive("mec_label_weight", self.mec_label_weight, allow_zero=True)
        _check_positive("mec_mi_weight", self.mec_mi_weight, allow_zero=True)
        if self.mec_mi_modules is not None and (
            not isinstance(self.mec_mi_modules, (list, tuple))
            or not self.mec_mi_modules
            or not all(isinstance(n, str) for n in self.mec_mi_modules)
        ):
            raise TypeError(f"mec_mi_modules must be a non-empty list of module names, got {self.mec_mi_modules!r}.")
        _check_positive("distill_weight", self.distill_weight, allow_zero=True)
        _check_positive("distill_temperature", self.distill_temperature)

    @classmethod
    def recommended(cls, **fields: Any) -> MECQuantConfig:
        """The most accurate recipe measured so far (docs/ablation.md, round 7: CIFAR-10 ResNet-20
        W2A2): the mutual-information term on the block outputs (`mec_mi_weight=20`) plus logit
        distillation at T = 4 (`distill_weight=1`, `distill_temperature=4`), head term off; both
        weights picked on held-out training images. `fields` set anything else (bits, ...).

        It needs the frozen full-precision teacher: the Trainer callback / mixin make it from the
        float model they are given; a custom loop passes `teacher=make_teacher(model)` made before
        `prepare_model`. (The field defaults stay teacher-free so the prepared-model path and
        saved configs keep their meaning.)

        Example:
            >>> cfg = MECQuantConfig.recommended(weight_bits=2, act_bits=2)
            >>> cfg.teacher_needs()
            ['mec_mi_weight > 0', 'distill_weight > 0']
        """
        return cls(**{**RECOMMENDED_RECIPE, **fields})

    def teacher_needs(self) -> list[str]:
        """Why this config needs the frozen full-precision teacher (`make_teacher`): the settings
        that use it, empty when none does.

        Example:
            >>> MECQuantConfig(distill_weight=1.0).teacher_needs()
            ['distill_weight > 0']
        """
        uses = ((self.mec_view == "teacher", "mec_view='teacher'"),
                (self.mec_mi_weight > 0, "mec_mi_weight > 0"),
                (self.distill_weight > 0, "distill_weight > 0"))
        return [what for on, what in uses if on]

    # ---- serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (JSON-serializable)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        """JSON text, `indent=2, sort_keys=True`, that `from_json` reads back to an equal config."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MECQuantConfig:
        """Build a config from `to_dict` output; unknown keys are an error naming them, missing keys
        take their defaults (a config saved before a field existed still loads)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown MECQuantConfig fields {unknown}; allowed: {sorted(names)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MECQuantConfig:
        """Inverse of `to_json`."""
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> MECQuantConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
