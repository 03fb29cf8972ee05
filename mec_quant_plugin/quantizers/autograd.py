"""The two autograd Functions behind the fake quantizers (LSQ / LSQ+ and binary sign).

Gradients are LSQ's (Esser et al. 2020): straight-through inside the clipping range, zero
outside; the step size gets (round(v) - v) inside and the clipped level outside, scaled by
`grad_scale` = 1/sqrt(N * Qp). A custom Function keeps memory low: it saves only its inputs,
not the chain of intermediate tensors that plain autograd would keep.
"""

from __future__ import annotations

import torch


def sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient back to the shape of the (broadcast) parameter."""
    if t.shape == shape:
        return t
    dims = [i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _scaled_sum_to(t: torch.Tensor, shape: torch.Size, g: float) -> torch.Tensor:
    """g * (t summed to `shape`), in the order the original formula used (bit-identical):
    per-tensor parameters scale every element first, then sum; others sum first. `t` must be a
    temporary of this backward: the per-tensor case scales it in place."""
    if len(shape) == 0:
        return t.mul_(g).sum()
    return sum_to(t, shape) * g


class LSQFakeQuantize(torch.autograd.Function):
    """y = clamp(round((x - offset) / s), qmin, qmax) * s + offset with LSQ/LSQ+ gradients.

    Example:
        >>> LSQFakeQuantize.apply(x, scale, None, -2.0, 1.0, grad_scale)  # 2-bit signed, no offset
    """

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


class BinaryFakeQuantize(torch.autograd.Function):
    """y = alpha * sign(w) (sign(0) = +1); STE for w inside |w| <= alpha, d/d alpha = sign(w)."""

    @staticmethod
    def forward(ctx, w, alpha, grad_scale: float):
        ctx.save_for_backward(w, alpha)
        ctx.grad_scale = grad_scale
        # One pass selecting +-alpha (exactly sign * alpha, without the sign tensor and the product).
        return torch.where(w >= 0, alpha, -alpha)

    @staticmethod
    def backward(ctx, grad_y):
        w, alpha = ctx.saved_tensors
        grad_w = grad_y * (w.abs() <= alpha) if ctx.needs_input_grad[0] else None
        grad_a = None
        if ctx.needs_input_grad[1]:
            grad_a = sum_to(torch.where(w >= 0, grad_y, -grad_y), alpha.shape) * ctx.grad_scale
        return grad_w, grad_a, None
