"""Where a measured number came from: the machine stamp written beside the demo's and the
benchmarks' results (the benchmarks add the commit, see benchmarks/common.py).

Example:
    >>> sorted(machine())[:3]
    ['cores', 'cpu', 'load_average']
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows, else 'unknown'."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """The machine and software a result was measured on: CPU model, the cores this process may
    use, torch threads, the 1/5/15-minute load average (other processes share the CPU), the
    Python/torch/torchao/transformers versions, and the GPU when one is visible."""
    import torchao
    import transformers

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": cores,
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
