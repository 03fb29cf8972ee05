"""The built-in default job (make demo / `mec-quant train`), in its quick form on real data."""

from __future__ import annotations

import json

import pytest
import torch

import mec_quant_plugin
from mec_quant_plugin.demo.fashion_mnist import collate, fashion_mnist_datasets, run_default


@pytest.mark.data
def test_default_job_quick_runs_end_to_end_and_saves_a_reloadable_model(tmp_path, capsys):
    results = run_default(str(tmp_path), quick=True)
    out = capsys.readouterr().out
    assert "plain LSQ QAT W2A2" in out and "MEC-Quant W2A2" in out
    # Real Fashion-MNIST, 10 classes: a model that did not learn scores ~0.10 +- 0.02 on these 256
    # test images; the quick job (4 steps each) measured 0.50 (FP), 0.30 (plain), 0.25 (MEC-Quant),
    # so 0.15 (2.5 standard deviations above chance) fails a run that learned nothing.
    for key in ("fp_start", "fp_finetuned", "plain_qat", "mec_quant"):
        assert results[key] > 0.15, (key, results[key])
    assert results["mec_quant_bytes"] < results["fp_bytes"] / 3  # int8 codes + scales vs fp32
    assert json.loads((tmp_path / "results.json").read_text())["mec_quant"] == results["mec_quant"]
    model = mec_quant_plugin.from_pretrained(str(tmp_path / "mec-quant"))
    _, test = fashion_mnist_datasets(train_limit=1, test_limit=256)
    batch = collate([test[i] for i in range(256)])
    with torch.no_grad():
        acc = (model(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).float().mean()
    assert abs(acc.item() - results["mec_quant"]) < 1e-9  # the reloaded model IS the trained one
