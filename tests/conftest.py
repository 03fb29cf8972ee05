"""Shared fixtures: tiny models built from configs (offline), deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running (examples, real data); not in the default suite")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
