"""Import torchao without its import-time noise: the load failures of its optional compiled kernels
(`Failed to load .../torchao/_C_mxfp8...so`, the CUDA-only mxfp8 / cutlass kernels this plugin never
calls) and torch's pytree deprecation warning for torchao's Enum registration. Only these exact
messages, only while torchao is imported; every other log record passes. Imported first by the
package, so `mec-quant --version` prints one line."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

# (logger, a piece of the message) of each record hidden while torchao is imported
IMPORT_NOISE = (
    ("torchao", "Failed to load "),
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
)


class _DropMessages(logging.Filter):
    def __init__(self, needle: str) -> None:
        super().__init__()
        self.needle = needle

    def filter(self, record: logging.LogRecord) -> bool:
        return self.needle not in str(record.msg)


@contextlib.contextmanager
def import_noise_hidden() -> Iterator[None]:
    """Hide the IMPORT_NOISE records for the duration of the block."""
    installed = [(logging.getLogger(name), _DropMessages(needle)) for name, needle in IMPORT_NOISE]
    for logger, flt in installed:
        logger.addFilter(flt)
    try:
        yield
    finally:
        for logger, flt in installed:
            logger.removeFilter(flt)


with import_noise_hidden():
    import torchao.quantization  # noqa: F401  (every torchao module the plugin uses comes after this)
