"""A progress bar for long preparations (a 135M-parameter model takes tens of seconds on a CPU).

`prepare_model` runs inside `layer_progress`, and the quantize handler calls `advance()` once per
layer it prepares. The bar (tqdm, on stderr) appears only once preparing has taken longer than
`DELAY_S`, so small models print nothing. It follows the Hugging Face conventions: no bar when
`transformers.utils.logging.disable_progress_bar()` was called or `HF_HUB_DISABLE_PROGRESS_BARS=1`
is set, nor under `TrainingArguments(disable_tqdm=True)` (the callback and mixin pass it on); the
environment variable `MEC_QUANT_PROGRESS` overrides the Hugging Face setting: `0` never shows it,
`1` shows it from the first layer. `prepare_model(..., progress=True/False)` overrides everything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

PROGRESS_ENV = "MEC_QUANT_PROGRESS"
DELAY_S = 2.0  # seconds of preparing before the bar appears (tqdm's `delay`)

_bar: ContextVar[Any] = ContextVar("mec_quant_progress_bar", default=None)


def _hf_progress_enabled() -> bool:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return True
    return hf_logging.is_progress_bar_enabled()


def progress_delay(progress: bool | None) -> float | None:
    """Seconds before the bar appears, or None for no bar.

    Args:
        progress: False never shows it, True shows it from the first layer (an explicit choice
            wins over the environment); None decides from `MEC_QUANT_PROGRESS`, then from the
            Hugging Face progress-bar setting, and waits `DELAY_S` before showing it.

    Example:
        >>> progress_delay(False) is None
        True
    """
    if progress is not None:
        return 0.0 if progress else None
    env = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if env in ("0", "false", "no", "off"):
        return None
    if env in ("1", "true", "yes", "on"):
        return 0.0
    return DELAY_S if _hf_progress_enabled() else None


@contextmanager
def layer_progress(total: int, description: str, progress: bool | None = None) -> Iterator[None]:
    """A tqdm bar over `total` layers while the block runs (see `progress_delay` for when it shows)."""
    delay = progress_delay(progress)
    if delay is None or total <= 0:
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=description, unit="layer", delay=delay, leave=True, dynamic_ncols=True)
    token = _bar.set(bar)
    try:
        yield
    finally:
        _bar.reset(token)
        bar.close()


def advance(layers: int = 1) -> None:
    """Count `layers` more layers prepared on the active bar (no-op without one)."""
    bar = _bar.get()
    if bar is not None:
        bar.update(layers)
