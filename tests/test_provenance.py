"""The stamp written beside every measured number: one machine() for the demo and the benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path

from mec_quant_plugin.demo import fashion_mnist, provenance

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402


def test_demo_and_benchmarks_share_one_machine_stamp():
    assert fashion_mnist.machine is provenance.machine is common.machine
    info = provenance.machine()
    assert {"cpu", "cores", "threads", "load_average", "python", "torch", "torchao", "transformers"} <= set(info)
    assert info["cpu"] and info["cores"] >= 1 and info["threads"] >= 1


def test_commit_stamp_is_a_sha_or_unknown():
    stamp = common.commit("benchmarks/common.py")
    sha = stamp.removesuffix("+uncommitted")
    assert sha == "unknown" or (len(sha) == 40 and int(sha, 16) >= 0)
