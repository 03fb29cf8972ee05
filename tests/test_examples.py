"""Each example, run as a user would with its shortest flags (slow: `pytest -m slow tests/test_examples.py`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.slow


def run(cmd: list[str], tmp_path: Path, timeout: int = 600, **extra_env: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **extra_env}
    proc = subprocess.run([str(c) for c in cmd], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.data
def test_vision_trainer(tmp_path):
    out = run([sys.executable, EXAMPLES / "vision_trainer.py", "--fp-steps", "20", "--max-steps", "20",
               "--output-dir", tmp_path / "out"], tmp_path)
    assert "W2A2 MEC-Quant: test accuracy" in out
    assert (tmp_path / "out" / "final" / "mec_quant_config.json").is_file()


def test_causal_lm_trainer_tiny(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from harness.austen import AustenNotFound, load_austen_novels

    try:
        load_austen_novels()
    except AustenNotFound:
        pytest.skip("Austen novels not installed (see benchmarks/harness/austen.py)")
    out = run([sys.executable, EXAMPLES / "causal_lm_trainer.py", "--tiny", "--max-steps", "20", "--eval-blocks", "8",
               "--output-dir", tmp_path / "out"], tmp_path)
    assert "held-out perplexity" in out and "W4A8 MEC-Quant after 20 steps" in out


@pytest.mark.data
def test_torchao_quantize(tmp_path):
    out = run([sys.executable, EXAMPLES / "torchao_quantize.py", "--max-steps", "30"], tmp_path)
    assert "W2A2: test accuracy" in out and "IntxUnpackedToInt8Tensor" in out


@pytest.mark.data
@pytest.mark.distributed
def test_accelerate_loop_two_cpu_processes(tmp_path):
    # `--cpu --num_processes 2` would start ONE process (accelerate 1.15); --multi_gpu on a machine
    # with no visible GPU starts 2 processes that the script puts on CPU / gloo.
    out = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               EXAMPLES / "accelerate_loop.py", "--max-steps", "20"], tmp_path, CUDA_VISIBLE_DEVICES="")
    assert "2 process(es), grad accumulation 2: test accuracy" in out
