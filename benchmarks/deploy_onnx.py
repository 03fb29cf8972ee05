"""Deployment benchmark for `export_onnx` (issue 12): a MiniLM-sized BERT encoder (hidden 384, 12
layers, 12 heads, FFN 1536, vocabulary 30522; built from its config, random weights: speed and
size do not depend on training) quantized weight-only per channel at each `--bits` (edge layers,
i.e. the embeddings, at 8 bits), converted, exported with `export_onnx`, and timed at 1 thread
beside the torch FP model, batch 1 at each `--tokens` length.

Timing: every variant runs once per round, rounds interleaved (so load on a shared machine hits
every variant alike); the median per variant is reported, and its ratio to torch FP. Variants:
torch FP; ONNX FP (the same exporter with no quantized layer: ONNX Runtime's own speed-up);
ONNX W{b} as exported with default session options (float activations, equal to the torch
converted model), W2 also with the session option `mlas.use_lut_gemm=1` (its fast LUT kernel, which
quantizes activations) and W4 also with `accuracy_level=4` (int8 activations inside ONNX Runtime:
faster, no longer equal to torch). Agreement: max |ONNX - torch converted| on the last hidden state
at each length. Size: file bytes.

    pip install -e '.[export-onnx]'
    python benchmarks/deploy_onnx.py --bits W4 W2 --tokens 16 128

Writes benchmarks/results/deploy_onnx.json (command, commit, machine, sizes, medians, ratios).
Target (issue 12): W4 ONNX <= 0.6x torch FP time at 16 tokens.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mec_quant_plugin import MECQuantConfig, convert_model, export_onnx, prepare_model

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import commit, machine, parse_bits  # noqa: E402


def minilm_sized() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=1536, max_position_embeddings=512)
    return BertModel(cfg).eval()


def session(path: Path, *, lut: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    if lut:
        options.add_session_config_entry("mlas.use_lut_gemm", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(sess: Any, feed: dict[str, np.ndarray]) -> Callable[[], np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    return lambda: sess.run(None, {n: feed[n] for n in names})[0]


def torch_runner(model: torch.nn.Module, feed: dict[str, torch.Tensor]) -> Callable[[], np.ndarray]:
    def run() -> np.ndarray:
        with torch.inference_mode():
            return model(**feed).last_hidden_state.numpy()

    return run


def interleaved_medians(runners: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median ms per runner, one call of each per round after one warm-up call."""
    for run in runners.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", nargs="+", default=["W4", "W2"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[16, 128])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "deploy_onnx.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    out_dir = Path(tempfile.mkdtemp(prefix="deploy_onnx_"))

    fp = minilm_sized()
    files = {"onnx FP": export_onnx(fp, out_dir / "fp.onnx")}
    converted = {}
    for label in args.bits:
        wbits, abits = parse_bits(label)
        if abits is not None:
            raise SystemExit(f"{label}: weight-only bits (W2, W4, W8) only; ONNX Runtime runs float/int8 activations.")
        model = convert_model(prepare_model(minilm_sized(), MECQuantConfig(weight_bits=wbits, act_bits=None), progress=False))
        converted[label] = model
        files[f"onnx {label}"] = export_onnx(model, out_dir / f"{label}.onnx")
        if wbits == 4:
            files[f"onnx {label} int8-act"] = export_onnx(model, out_dir / f"{label}_acc4.onnx", accuracy_level=4)
        print(files[f"onnx {label}"].summary(), flush=True)

    sizes = {name: f.file_size for name, f in files.items()}
    rows = []
    for tokens in args.tokens:
        gen = torch.Generator().manual_seed(tokens)
        ids = torch.randint(1000, 30000, (1, tokens), generator=gen)
        feed_t = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        feed_n = {k: v.numpy() for k, v in feed_t.items()}
        runners: dict[str, Callable[[], Any]] = {"torch FP": torch_runner(fp, feed_t)}
        agreement = {}
        for name, f in files.items():
            label = name.split()[1]
            reference = torch_runner(converted[label], feed_t)() if label in converted else runners["torch FP"]()
            variants = {name: False, f"{name} lut": True} if name.endswith("W2") else {name: False}
            for variant, lut in variants.items():
                runners[variant] = ort_runner(session(f.path, lut=lut), feed_n)
                agreement[variant] = float(np.abs(runners[variant]() - reference).max())
        medians = interleaved_medians(runners, args.rounds)
        row = {
            "tokens": tokens,
            "median_ms": {k: round(v, 3) for k, v in medians.items()},
            "ratio_to_torch_fp": {k: round(v / medians["torch FP"], 3) for k, v in medians.items()},
            "max_abs_diff_vs_torch": agreement,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    results = {
        "model": "BERT, MiniLM-sized (hidden 384, 12 layers, vocab 30522), random weights, batch 1",
        "threads": 1,
        "rounds": args.rounds,
        "file_bytes": sizes,
        "layers": {name: f.summary().splitlines()[1:] for name, f in files.items()},
        "rows": rows,
        "target": "W4 ONNX <= 0.6x torch FP at 16 tokens",
        "command": " ".join(sys.argv),
        "commit": commit("benchmarks/deploy_onnx.py"),
        "machine": machine(),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
