"""Every option vocabulary of MEC-Quant, written once.

`MECQuantConfig` validates against these tuples, the quantizers and the objective check their own
arguments against them, and error messages and `--help` texts list them from here, so a new
routing or tap is added in one place.

Example:
    >>> check_choice("mec_routing", "gate", ROUTINGS)
    >>> bits_label(2, None)
    'W2Afloat'
"""

from __future__ import annotations

from typing import Any

MIN_BITS, MAX_BITS = 1, 8
WEIGHT_GRANULARITIES = ("per_channel", "per_group")
EDGE_LAYER_POLICIES = ("8bit", "float", "same")
ACT_SIGNEDNESS = ("auto", "signed", "unsigned")
STEPS = ("prepare", "convert")
VIEWS = ("self", "teacher")
TAPS = ("head", "blocks", "head+blocks")
TAP_SIDES = ("input", "output")
LAMBDA_MODES = ("fixed", "adaptive")
ROUTINGS = ("magnitude", "gate", "features")
LAYER_TARGETS = ("activations", "weights")  # what the per-layer coding length codes (objective/layerwise.py)
NONFINITE_POLICIES = ("stop", "skip")  # a training step with NaN/inf gradients (integrations/trainer.py)


def check_bits(name: str, value: Any, allow_none: bool = False) -> None:
    """Validate a bit-width: an int in 1..8 (or None when `allow_none`).

    Raises:
        TypeError: not an int (bool included).
        ValueError: outside 1..8.
    """
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        allowed = f"an int in {MIN_BITS}..{MAX_BITS}" + (" or None (not quantized)" if allow_none else "")
        raise TypeError(f"{name} must be {allowed}, got {value!r} ({type(value).__name__}).")
    if not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"{name} must be in {MIN_BITS}..{MAX_BITS}, got {value}.")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """Validate a value against its vocabulary.

    Raises:
        ValueError: `value` not in `allowed` (the message names both).
    """
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}.")


def check_order(order: Any, name: str = "order") -> None:
    """Validate a Taylor order of log det: an even int >= 2, or None for the exact log det.

    Raises:
        ValueError: odd (an odd truncation rewards collapse), non-int or < 2.
    """
    if order is None:
        return
    if isinstance(order, bool) or not isinstance(order, int) or order < 2:
        raise ValueError(f"{name} must be an even int >= 2 or None (exact log det), got {order!r}.")
    if order % 2:
        raise ValueError(
            f"{name} must be even, got {order}: an odd truncation of log det is hugely positive at "
            "collapse (all rows equal), so maximizing it would reward collapse instead of penalizing it."
        )


def bits_label(weight: int | str | None, act: int | None, *, ternary: bool = False) -> str:
    """The `W{w}A{a}` label of a bit setting, "float" for an unquantized side.

    Example:
        >>> bits_label(2, 2), bits_label(None, 4), bits_label(2, None, ternary=True)
        ('W2A2', 'WfloatA4', 'WternaryAfloat')
    """
    w = "ternary" if ternary else ("float" if weight is None else weight)
    return f"W{w}A{'float' if act is None else act}"
