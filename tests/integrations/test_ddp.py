"""Two gloo processes with the global-batch option train exactly like one process on the
concatenated batch (same coding-length term, same final weights)."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, world: int, port: int, out_dir: str, per_device: int) -> None:
    sys.path.insert(0, str(HERE))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    from testing_utils import make_trainer

    from mec_quant_plugin import MECQuantConfig

    # act_bits=None: activation steps calibrate per rank then average, which is not the same
    # number as calibrating on the concatenated batch; weights init identically everywhere.
    config = MECQuantConfig(weight_bits=2, act_bits=None, mec_gather=True, mec_weight=1.0)
    trainer, cb, _ = make_trainer("llama", out_dir, config, rows=8, per_device_train_batch_size=per_device,
                                  max_steps=2, learning_rate=1e-2, optim="sgd", ddp_backend="gloo" if world > 1 else None)
    cb.convert_on_train_end = False
    trainer.train()
    if rank == 0:
        mec = [e["mec/loss"] for e in trainer.state.log_history if "mec/loss" in e]
        torch.save({"params": {k: v.detach() for k, v in trainer.model.named_parameters()}, "mec": mec,
                    "rows": cb.regularizer.last_stats.get("rows")}, os.path.join(out_dir, "result.pt"))
    if world > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    mp.spawn(_train, args=(1, _free_port(), str(one), 4), nprocs=1, join=True)
    mp.spawn(_train, args=(2, _free_port(), str(two), 2), nprocs=2, join=True)
    a = torch.load(one / "result.pt", weights_only=True)
    b = torch.load(two / "result.pt", weights_only=True)
    # two logged steps with a real term on both sides (two empty lists would compare equal)
    assert len(a["mec"]) == len(b["mec"]) == 2 and all(v != 0 and v == v for v in a["mec"] + b["mec"])
    assert b["rows"] > 0 and a["rows"] == 2 * b["rows"]  # each process captured half of the rows ...
    assert a["mec"] == pytest.approx(b["mec"], rel=1e-5)  # ... and coded the global batch
    diffs = {k: (v - b["params"][k]).abs().max().item() for k, v in a["params"].items()}
    assert max(diffs.values()) < 1e-5, sorted(diffs.items(), key=lambda kv: -kv[1])[:3]
