"""The README's quickstart is executed as written (real Fashion-MNIST, a few hundred steps)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart() -> str:
    text = README.read_text()
    match = re.search(r"<!-- quickstart -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README lost its quickstart block"
    return match.group(1)


@pytest.mark.data
def test_quickstart_is_short_and_runs(capsys):
    code = _quickstart()
    assert len(code.strip().splitlines()) <= 15
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    acc = float(re.search(r"test accuracy ([0-9.]+)", out).group(1))
    # 2-bit weights AND activations, a few hundred steps from scratch: clearly above chance (10%)
    assert acc > 0.5, out
