"""Ordinary mistakes on the command line end in one usage line and exit 2, never a traceback (issue 10)."""

from __future__ import annotations

import pytest

from mec_quant_plugin.cli import main

BASE = ["train", "--model", "./no-model-here", "--dataset", "./no-data-here", "--task", "image-classification"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--per-device-train-batch-size", "0"], "--per-device-train-batch-size must be >= 1"),
        (["--gradient-accumulation-steps", "0"], "--gradient-accumulation-steps must be >= 1"),
        (["--learning-rate", "-0.001"], "--learning-rate must be a positive number"),
        (["--resume-from-checkpoint", "./no-such-checkpoint"], "no such folder"),
    ],
    ids=["batch-size-0", "accumulation-0", "negative-lr", "missing-resume-folder"],
)
def test_bad_training_options_are_one_usage_line(extra, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*BASE, *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
