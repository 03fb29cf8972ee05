"""LSQ / LSQ+ fake quantizers with learnable step sizes, written by hand.

Why not torchao's `FakeQuantizer`: int1 is broken in torchao 0.18 (symmetric int1 zeroes every
weight), asymmetric int2 weight fake-quant is numerically wrong, and it only handles 2-D weights
(no Conv2d). These quantizers cover 1..8 bits for weights (per channel or per group) and
activations (per tensor, unsigned or signed with a learnable offset).

The math runs in fp32 with autocast disabled and casts back to the input dtype. Gradients are
LSQ's (Esser et al. 2020): straight-through inside the clipping range, zero outside; the step
size gets (round(v) - v) inside and the clipped level outside, scaled by 1/sqrt(N * Qp).
A custom autograd Function keeps memory low: it saves only the input, not the chain of
intermediate tensors that plain autograd would keep.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn


def _scaled_sum_to(t: torch.Tensor, shape: torch.Size, g: float) -> torch.Tensor:
    """g * (t summed to `shape`), in the order the original formula used (bit-identical):
    per-tensor parameters scale every element first, then sum; others sum first. `t` must be a
    temporary of this backward: the per-tensor case scales it in place."""
    if len(shape) == 0:
        return t.mul_(g).sum()
    return _sum_to(t, shape) * g


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to the shape of the (broadcast) parameter."""
    if t.shape == shape:
        return t
    dims = [i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


class _LSQ(torch.autograd.Function):
    """y = (clamp(round((x - offset) / s), qmin, qmax)) * s + offset with LSQ/LSQ+ gradients."""

    @staticmethod
    def forward(ctx, x, scale, offset, qmin: float, qmax: float, grad_scale: float, idle=None):
        # `idle`: a parameter this call does not use (the offset of an unsigned quantizer) that
        # gets an explicit zero gradient, so plain DDP (find_unused_parameters=False) does not
        # wait forever for it.
        ctx.idle_shape = None if idle is None else idle.shape
        # One output buffer updated in place: the same ops (and bits) as
        # clamp(round((x - offset) / scale)) * scale + offset without four temporaries.
        if offset is not None:
            y = torch.sub(x, offset).div_(scale)
        else:
            y = torch.div(x, scale)
        y.round_().clamp_(qmin, qmax).mul_(scale)
        if offset is not None:
            y.add_(offset)
        ctx.save_for_backward(x, scale, offset)
        ctx.qrange = (qmin, qmax, grad_scale)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, scale, offset = ctx.saved_tensors
        qmin, qmax, g = ctx.qrange
        v = torch.sub(x, offset).div_(scale) if offset is not None else torch.div(x, scale)
        # clamp(v) == v exactly when qmin <= v <= qmax (NaN: outside, as before); and
        # round(clamp(v)) == clamp(round(v)) because the bounds are integers.
        q = torch.clamp(v, qmin, qmax)
        outside = q != v
        q.round_()
        grad_x = grad_s = grad_o = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y.masked_fill(outside, 0.0)
        if ctx.needs_input_grad[1]:
            # (q - v) inside the range, the clipped level q outside.
            r = q.sub_(v.masked_fill_(outside, 0.0)).mul_(grad_y)
            grad_s = _scaled_sum_to(r, scale.shape, g)
        if offset is not None and ctx.needs_input_grad[2]:
            grad_o = _scaled_sum_to(grad_y * outside, offset.shape, g)
        grad_idle = None if ctx.idle_shape is None else grad_y.new_zeros(ctx.idle_shape)
        return grad_x, grad_s, grad_o, None, None, None, grad_idle


class _Binary(torch.autograd.Function):
    """y = alpha * sign(w) (sign(0) = +1); STE for w inside |w| <= alpha, d/d alpha = sign(w)."""

    @staticmethod
    def forward(ctx, w, alpha, grad_scale: float):
        sign = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
        ctx.save_for_backward(w, alpha)
        ctx.grad_scale = grad_scale
        return sign * alpha

    @staticmethod
    def backward(ctx, grad_y):
        w, alpha = ctx.saved_tensors
        grad_w = grad_y * (w.abs() <= alpha) if ctx.needs_input_grad[0] else None
        grad_a = None
        if ctx.needs_input_grad[1]:
            sign = torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
            grad_a = _sum_to(grad_y * sign, alpha.shape) * ctx.grad_scale
        return grad_w, grad_a, None


def _fp32(fn):
    """Run a quantizer's forward in fp32 with autocast off, returning the input dtype."""

    def wrapper(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            return fn(self, x)  # the common fp32 case: no casts, no autocast context to enter
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = fn(self, x.float())
        return y.to(dtype)

    wrapper.__doc__ = fn.__doc__
    return wrapper


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{what} contains {bad} NaN/inf values; cannot initialize its step size.")


_MIN_STEP = 1e-8


def _positive(scale: torch.Tensor) -> torch.Tensor:
    """|s| floored at 1e-8: Adam moves a parameter by ~lr per step whatever its gradient, so a
    step size of ~0.01 can cross zero within a few dozen steps at lr=1e-3; a negative or zero
    step would flip or divide by zero. Identity (and gradient 1) for every normal positive s."""
    return scale.abs().clamp_min(_MIN_STEP)


def _average_across_ranks(*tensors: torch.Tensor) -> None:
    """Under data parallelism each rank calibrates on its own first batch, after DDP has already
    broadcast the parameters; average so every rank starts from the same step sizes."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t.data, op=dist.ReduceOp.SUM)
            t.data /= dist.get_world_size()


def _any_across_ranks(flag: torch.Tensor) -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)


class WeightFakeQuantizer(nn.Module):
    """Symmetric per-output-channel (or per-group) LSQ fake quantizer for a weight tensor.

    Levels: bits=1 -> {-alpha, +alpha}; ternary -> {-1, 0, 1} * s; bits=b >= 2 -> integers in
    [-2^(b-1), 2^(b-1) - 1] times s. `channel_axis` is the output-channel axis of the weight
    (0 for Linear/Conv2d/Embedding rows, 1 for GPT-2's Conv1D).

    Example:
        >>> wq = WeightFakeQuantizer(torch.randn(8, 16), bits=2)
        >>> wq(torch.randn(8, 16)).shape
        torch.Size([8, 16])

    Raises:
        ValueError: bits outside 1..8, a group size that does not divide the input dimension,
            or NaN/inf weights.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bits: int,
        *,
        channel_axis: int = 0,
        group_size: int | None = None,
        ternary: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"weight bits must be in 1..8, got {bits}.")
        self.bits = bits
        self.ternary = ternary
        self.channel_axis = channel_axis
        self.group_size = group_size
        if ternary:
            self.qmin, self.qmax = -1, 1
        elif bits == 1:
            self.qmin, self.qmax = -1, 0  # binary: stored as q in {-1, 0}, scale 2*alpha, zp -0.5
        else:
            self.qmin, self.qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        _check_finite(weight, "weight")
        w = self._grouped(weight.detach().float())
        self.scale = nn.Parameter(self._init_scale(w))
        per_scale = w[0].numel() if group_size is None else group_size
        qp = 1 if bits == 1 else max(self.qmax, 1)
        self.grad_scale = 1.0 / math.sqrt(per_scale * qp)

    # ---- layout ----------------------------------------------------------------------------
    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        """View the weight as (channels, groups, group_size) or (channels, rest)."""
        w = w.movedim(self.channel_axis, 0)
        if self.group_size is None:
            return w.reshape(w.shape[0], -1)
        if w.shape[1] % self.group_size:
            raise ValueError(
                f"group_size={self.group_size} does not divide the weight's input dimension "
                f"{w.shape[1]} (weight shape {tuple(w.movedim(0, self.channel_axis).shape)}); "
                "use a divisor of it or weight_granularity='per_channel'."
            )
        return w.reshape(w.shape[0], w.shape[1] // self.group_size, -1, *w.shape[2:]).reshape(
            w.shape[0], w.shape[1] // self.group_size, -1
        )

    def _ungrouped(self, w: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        moved = like.movedim(self.channel_axis, 0)
        return w.reshape(moved.shape).movedim(0, self.channel_axis)

    @torch.no_grad()
    def _init_scale(self, w: torch.Tensor) -> torch.Tensor:
        """Per-channel (group) step minimizing the quantization MSE over a grid of clip ratios.

        LSQ's 2*mean|w|/sqrt(Qp) is a rough start at 2 bits; a 40-point search over
        s = r * max|w| / Qp costs a few passes over the weight once and starts QAT closer.
        """
        reduce_dim = -1  # the layout is (channels, rest) or (channels, groups, group_size)
        absw = w.abs()
        if self.bits == 1 and not self.ternary:
            return absw.mean(dim=reduce_dim, keepdim=True).clamp_min(1e-8)  # alpha = mean|w|
        wmax = absw.amax(dim=reduce_dim, keepdim=True).clamp_min(1e-8)
        best_s = wmax / self.qmax
        best_err = torch.full_like(best_s, float("inf"))
        for r in torch.linspace(0.05, 1.0, 40).tolist():
            s = wmax * r / self.qmax
            err = ((torch.clamp(torch.round(w / s), self.qmin, self.qmax) * s - w) ** 2).sum(
                dim=reduce_dim, keepdim=True
            )
            better = err < best_err
            best_s = torch.where(better, s, best_s)
            best_err = torch.where(better, err, best_err)
        return best_s

    @_fp32
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Fake-quantized weight, same shape and dtype as `weight`."""
        w = self._grouped(weight)
        if self.bits == 1 and not self.ternary:
            wq = _Binary.apply(w, _positive(self.scale), self.grad_scale)
        else:
            wq = _LSQ.apply(w, _positive(self.scale), None, float(self.qmin), float(self.qmax), self.grad_scale)
        return self._ungrouped(wq, weight)

    @torch.no_grad()
    def quantized_codes(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes, scale and zero point in torchao's affine form: w ~= (q - zp) * scale.

        Shapes: codes like the grouped weight (channels, groups, group_size) or (channels, rest);
        scale and zero point (channels, groups) or (channels, 1). Binary weights use q in {-1, 0},
        scale 2*alpha and zero point -0.5, which torchao's int1 dtype represents exactly.
        """
        w = self._grouped(weight.detach().float())
        s = _positive(self.scale.detach().float())
        if self.bits == 1 and not self.ternary:
            q = torch.where(w >= 0, 0.0, -1.0)
            return q, (2 * s).squeeze(-1), torch.full_like(s, -0.5).squeeze(-1)
        q = torch.clamp(torch.round(w / s), self.qmin, self.qmax)
        return q, s.squeeze(-1), torch.zeros_like(s).squeeze(-1)

    def extra_repr(self) -> str:
        kind = "ternary" if self.ternary else ("binary" if self.bits == 1 else f"int{self.bits}")
        gran = f"group_size={self.group_size}" if self.group_size else "per_channel"
        return f"{kind}, {gran}, levels=[{self.qmin}, {self.qmax}]"


class ActivationFakeQuantizer(nn.Module):
    """Per-tensor LSQ (unsigned) / LSQ+ (signed, learnable offset) fake quantizer for activations.

    The step size is a Parameter from construction (so an optimizer built afterwards owns it) and
    is initialized from the first batch seen in training, or by an explicit `calibrate(x)`; the
    `initialized` buffer is saved in the state dict so a reloaded checkpoint does not re-initialize.
    With signedness 'auto' the first batch decides: non-negative -> unsigned [0, 2^b - 1],
    otherwise signed [-2^(b-1), 2^(b-1) - 1] plus a learnable offset.

    Raises:
        ValueError: bits outside 1..8, unknown signedness, NaN/inf in the calibration batch.
    """

    def __init__(self, bits: int, signedness: str = "auto") -> None:
        super().__init__()
        if not 1 <= bits <= 8:
            raise ValueError(f"activation bits must be in 1..8, got {bits}.")
        if signedness not in ("auto", "signed", "unsigned"):
            raise ValueError(f"signedness must be 'auto', 'signed' or 'unsigned', got {signedness!r}.")
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
        if self._read_flags()[1]:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2**self.bits - 1

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor) -> None:
        """Initialize the step (and offset) from a batch by minimizing the quantization MSE."""
        x = x.detach().float()
        _check_finite(x, "activation calibration batch")
        if self.signedness == "auto":
            negative = (x.min() < 0).float().reshape(1)
            _any_across_ranks(negative)
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
        _average_across_ranks(self.scale, self.offset)
        self.initialized.fill_(True)
        self._flags = None

    @_fp32
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantized activation (initializes the step on the first training batch)."""
        initialized, signed = self._read_flags()
        if not initialized:
            if not self.training:
                # e.g. Trainer(eval_on_start=True): better a calibrated model than a crash.
                warnings.warn(
                    "ActivationFakeQuantizer was never initialized by a training forward; calibrating it "
                    "from this evaluation batch (call calibrate_activations(model, batch) to choose the data).",
                    stacklevel=2,
                )
            self.calibrate(x)
            signed = self._read_flags()[1]
        qmin, qmax = self.qrange
        g = 1.0 / math.sqrt(max(x[0].numel() if x.dim() > 1 else x.numel(), 1) * max(qmax, 1))
        offset = self.offset if signed else None
        idle = None if signed else self.offset
        return _LSQ.apply(x, _positive(self.scale), offset, float(qmin), float(qmax), g, idle)

    def extra_repr(self) -> str:
        kind = "signed+offset" if bool(self.signed) else "unsigned"
        if not bool(self.initialized) and self.signedness == "auto":
            kind = "auto"
        return f"bits={self.bits}, {kind}"
