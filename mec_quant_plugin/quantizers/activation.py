"""`ActivationFakeQuantizer`: per-tensor LSQ (unsigned) / LSQ+ (signed with offset) for activations."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..distributed import any_across_ranks_, average_across_ranks_
from ..options import ACT_SIGNEDNESS, check_bits, check_choice
from .autograd import LSQFakeQuantize
from .numerics import KeepsFloat32, degenerate_batch, positive_step, run_in_fp32


class ActivationFakeQuantizer(KeepsFloat32):
    """Per-tensor LSQ (unsigned) / LSQ+ (signed, learnable offset) fake quantizer for activations.

    The step size is a Parameter from construction (so an optimizer built afterwards owns it) and
    is initialized from the first batch seen in training, or by an explicit `calibrate(x)`; the
    `initialized` buffer is saved in the state dict so a reloaded checkpoint does not re-initialize.
    With signedness 'auto' the first batch decides: non-negative -> unsigned [0, 2^b - 1],
    otherwise signed [-2^(b-1), 2^(b-1) - 1] plus a learnable offset. A degenerate batch (every
    value equal, e.g. all zero, or any NaN/inf) holds no range: the forward passes it through
    unquantized with a warning and calibrates on the next batch.

    Example:
        >>> aq = ActivationFakeQuantizer(bits=2)
        >>> aq.calibrate(torch.rand(64, 16)); aq.qrange
        (0, 3)

    Raises:
        ValueError: bits outside 1..8, unknown signedness; `calibrate` on a degenerate batch.
    """

    def __init__(self, bits: int, signedness: str = "auto") -> None:
        super().__init__()
        check_bits("activation bits", bits)
        check_choice("signedness", signedness, ACT_SIGNEDNESS)
        self.bits = bits
        self.signedness = signedness
        self.scale = nn.Parameter(torch.ones(()))
        self.offset = nn.Parameter(torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        # 1 = signed, 0 = unsigned; a buffer so the choice made on the first batch survives reload.
        self.register_buffer("signed", torch.tensor(signedness == "signed"))
        # Python-side copy of the two flags: reading a buffer with bool() every forward would
        # synchronize an accelerator; refreshed after calibrate() and load_state_dict().
        self._flags: tuple[bool, bool] | None = None

    def _load_from_state_dict(self, *args, **kwargs):
        self._flags = None
        super()._load_from_state_dict(*args, **kwargs)

    def _read_flags(self) -> tuple[bool, bool]:
        if self._flags is None:
            self._flags = (bool(self.initialized), bool(self.signed))
        return self._flags

    @property
    def qrange(self) -> tuple[int, int]:
        """The integer levels (qmin, qmax): signed or unsigned as decided at calibration."""
        if self._read_flags()[1]:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Initialize the step (and offset) from a batch by minimizing the quantization MSE.

        Under data parallelism every rank ends with the same step (averaged) and signedness.

        Raises:
            ValueError: `x` is degenerate on some rank: NaN/inf, or constant (e.g. all zero),
                which would freeze the step at its floor and the signedness at unsigned.
        """
        x = x.detach().float()
        reason = degenerate_batch(x)
        if _any_rank_degenerate(reason is not None, x.device):
            raise ValueError(
                f"activation calibration batch is {reason or 'degenerate on another rank'}: it has no range "
                "to calibrate a step size from; calibrate on a batch of real inputs."
            )
        if self.signedness == "auto":
            negative = (x.min() < 0).float().reshape(1)
            any_across_ranks_(negative)
            self.signed.fill_(bool(negative.item() > 0))
        self._flags = None
        qmin, qmax = self.qrange
        flat = x.flatten()
        if flat.numel() > 1_000_000:  # a strided subset is plenty for a scalar statistic
            flat = flat[:: flat.numel() // 1_000_000 + 1]
        best = (float("inf"), 1.0, 0.0)
        if bool(self.signed):
            lo, hi = flat.min().item(), flat.max().item()
        else:
            lo, hi = 0.0, flat.max().clamp_min(1e-8).item()
        for r in torch.linspace(0.05, 1.0, 40).tolist():
            a, b = lo * r, hi * r
            s = max((b - a) / (qmax - qmin), 1e-8)
            off = a - s * qmin if bool(self.signed) else 0.0
            xq = torch.clamp(torch.round((flat - off) / s), qmin, qmax) * s + off
            err = ((xq - flat) ** 2).mean().item()
            if err < best[0]:
                best = (err, s, off)
        self.scale.fill_(best[1])
        self.offset.fill_(best[2])
        average_across_ranks_(self.scale, self.offset)
        self.initialized.fill_(True)
        self._flags = None

    @run_in_fp32
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized activation (initializes the step on the first training batch)."""
        flags = self._flags
        if flags is None or not flags[0]:
            return self._first_forward(x)
        # The steady state: plain tensor ops that torch.compile traces without a break (the flags
        # are Python constants it guards on, so a calibration or a reload recompiles once).
        return self._quantize(x, flags[1])

    def _quantize(self, x: torch.Tensor, signed: bool) -> torch.Tensor:
        qmin, qmax = self.qrange
        per_sample = math.prod(x.shape[1:]) if x.dim() > 1 else x.numel()  # no tensor op (x[0] was one)
        g = 1.0 / math.sqrt(max(per_sample, 1) * max(qmax, 1))
        offset = self.offset if signed else None
        idle = None if signed else self.offset
        return LSQFakeQuantize.apply(x, positive_step(self.scale), offset, float(qmin), float(qmax), g, idle)

    @torch.compiler.disable
    def _first_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The forward until the step is initialized: reads the flags from the buffers and
        calibrates on the first usable batch. Data-dependent (`.item()`, collectives, warnings),
        so it runs eagerly even inside a compiled model: one graph break, on the first step only."""
        initialized, signed = self._read_flags()
        if not initialized:
            reason = degenerate_batch(x)
            if _any_rank_degenerate(reason is not None, x.device):
                warnings.warn(
                    f"ActivationFakeQuantizer: skipped calibration on a degenerate batch ({reason or 'on another rank'}); "
                    "this input passes unquantized and the next batch calibrates the step size.",
                    stacklevel=3,
                )
                # Zero-gradient use of the step and offset: DDP expects every parameter in the graph.
                return x + 0.0 * (self.scale + self.offset)
            if not self.training:
                # e.g. Trainer(eval_on_start=True): better a calibrated model than a crash.
                warnings.warn(
                    "ActivationFakeQuantizer was never initialized by a training forward; calibrating it "
                    "from this evaluation batch (call calibrate_activations(model, batch) to choose the data).",
                    stacklevel=3,
                )
            self.calibrate(x)
            signed = self._read_flags()[1]
        return self._quantize(x, signed)

    def extra_repr(self) -> str:
        kind = "signed+offset" if bool(self.signed) else "unsigned"
        if not bool(self.initialized) and self.signedness == "auto":
            kind = "auto"
        return f"bits={self.bits}, {kind}"


def _any_rank_degenerate(local: bool, device: torch.device) -> bool:
    """True when the batch is degenerate on this rank or any other, so all ranks skip together
    (calibration runs collectives: one rank calibrating alone would hang the others)."""
    flag = torch.tensor([float(local)], device=device)
    any_across_ranks_(flag)
    return bool(flag.item() > 0)
