"""Shared fixtures: tiny models built from configs (offline), deterministic seeds, and the skip of
`data` tests on a machine without the real data."""

from __future__ import annotations

import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@functools.cache
def fashion_mnist_missing() -> str | None:
    """Why real Fashion-MNIST cannot be loaded here (the local files, else the Hub cache), or None."""
    from mec_quant_plugin.data.fashion_mnist import FashionMNISTNotFound, load_fashion_mnist

    try:
        load_fashion_mnist("test", limit=1)
    except FashionMNISTNotFound:
        return ("needs real Fashion-MNIST, not on this machine: `make data` installs it as root "
                "(apt-get install dataset-fashion-mnist), or set MEC_QUANT_FASHION_MNIST_DIR")
    return None


def pytest_runtest_setup(item):
    if item.get_closest_marker("data") is not None and (reason := fashion_mnist_missing()) is not None:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
