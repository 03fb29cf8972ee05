"""Numerics shared by the quantizers: fp32 math under autocast, positive steps, usable inputs."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

MIN_STEP = 1e-8

CLIP_RATIOS = 40  # candidate clipping ratios r of the weight-step search: linspace(0.05, 1, 40)
# Elements of one (rows, ratios, width) block of that search: 1 MiB fp32 stays in a CPU core's cache;
# a GPU wants few large launches instead (256 MiB).
SEARCH_CHUNK_ELEMENTS = {"cpu": 1 << 18, "other": 1 << 26}


class KeepsFloat32(torch.nn.Module):
    """Base of the quantizers: `model.half()`, `.bfloat16()`, `.to(dtype)` move their step sizes
    and offsets to the new device but leave them float32.

    Why: a step size is a precision-critical scalar (fp16 flushes the 1e-8 floor and small steps
    to 0, and rounds every other step); the quantizer math runs in fp32 anyway (`run_in_fp32`),
    so only the weights and activations take the model's dtype.
    """

    def _apply(self, fn, recurse=True):
        def move_without_cast(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype != t.dtype:
                return t.to(device=out.device)
            return out

        return super()._apply(move_without_cast, recurse)


def run_in_fp32(fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]):
    """Decorator: run a quantizer's forward in fp32 with autocast off, returning the input dtype.

    Why: rounding to a 2-bit grid in bf16/fp16 moves values across level boundaries; the
    quantizer math must not depend on the training precision.
    """

    @functools.wraps(fn)
    def wrapper(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type):
            return fn(self, x)  # the common fp32 case: no casts, no autocast context to enter
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = fn(self, x.float())
        return y.to(dtype)

    return wrapper


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raises ValueError naming `what` and the count of NaN/inf values, if any."""
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).sum().item()
        raise ValueError(f"{what} contains {bad} NaN/inf values; cannot initialize its step size.")


def degenerate_batch(x: torch.Tensor) -> str | None:
    """Why `x` cannot calibrate an activation step (NaN/inf, or every value equal), or None.

    Example:
        >>> degenerate_batch(torch.zeros(4, 8))
        'constant (every value 0)'
    """
    if x.numel() == 0:
        return "empty"
    finite = torch.isfinite(x)
    if not finite.all():
        return f"non-finite ({(~finite).sum().item()} NaN/inf values)"
    lo, hi = torch.aminmax(x)
    if lo.item() == hi.item():
        return f"constant (every value {lo.item():g})"
    return None


def positive_step(scale: torch.Tensor) -> torch.Tensor:
    """|s| floored at 1e-8: Adam moves a parameter by ~lr per step whatever its gradient, so a
    step size of ~0.01 can cross zero within a few dozen steps at lr=1e-3; a negative or zero
    step would flip or divide by zero. Identity (and gradient 1) for every normal positive s."""
    return scale.abs().clamp_min(MIN_STEP)


@torch.no_grad()
def mse_step_search(
    w: torch.Tensor, qmin: int, qmax: int, *, chunk_elements: int | None = None
) -> torch.Tensor:
    """Per row of `w` (..., n), the step `s = r * max|w| / qmax` over `CLIP_RATIOS` clipping ratios
    r in [0.05, 1] that minimizes `sum((clamp(round(w / s), qmin, qmax) * s - w)^2)` over the row;
    the first such r on a tie. Returns a (..., 1) float32 tensor.

    All rows and ratios of a block are computed in one batch of elementwise ops (rows x ratios x n),
    blocks of about `chunk_elements` elements (default `SEARCH_CHUNK_ELEMENTS` of the device: 1 MiB
    on CPU, cache-sized) so memory stays bounded whatever the weight. Same float32 operations in the same order as a loop over the ratios, so the
    result is bit-identical to it (tested), a few times faster on CPU.

    Example:
        >>> mse_step_search(torch.randn(8, 16), -2, 1).shape
        torch.Size([8, 1])
    """
    if chunk_elements is None:
        chunk_elements = SEARCH_CHUNK_ELEMENTS["cpu" if w.device.type == "cpu" else "other"]
    shape = w.shape
    rows = w.detach().float().reshape(-1, shape[-1])
    ratios = torch.linspace(0.05, 1.0, CLIP_RATIOS, device=w.device)
    wmax = rows.abs().amax(dim=-1, keepdim=True).clamp_min(MIN_STEP)
    candidates = wmax * ratios / qmax  # (rows, ratios)
    best = torch.empty_like(wmax)
    step = max(1, chunk_elements // (CLIP_RATIOS * max(shape[-1], 1)))
    threads = torch.get_num_threads()
    if w.device.type == "cpu" and threads > 1:
        # Thousands of 1 MiB blocks, each a few ops: splitting every op across threads costs a thread
        # sync per op, which on a loaded CPU outweighs the work (measured: 2 threads several times
        # slower than 1 on this project's shared 2-core machine), so the blocks run on one thread.
        torch.set_num_threads(1)
    try:
        for start in range(0, rows.shape[0], step):
            wc = rows[start : start + step, None, :]  # (b, 1, n)
            sc = candidates[start : start + step, :, None]  # (b, R, 1)
            x = wc / sc
            x.round_().clamp_(qmin, qmax).mul_(sc).sub_(wc)
            err = x.square_().sum(dim=-1)  # (b, R)
            best[start : start + step] = candidates[start : start + step].gather(1, err.argmin(dim=-1, keepdim=True))
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return best.reshape(*shape[:-1], 1)
