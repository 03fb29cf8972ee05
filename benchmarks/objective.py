"""Speed of the coding-length term, ratios side by side in one run.

1. The term (forward + backward, default settings: head tap, "self" view, order 4, adaptive
   lambda, centered, K = 1) against one QAT training step (forward, backward, optimizer step) of
   small ViT, ResNet and Llama models built from configs. Target: <= 5% of the step.
2. Plain term vs the mixture (K = 8; feature split and magnitude routing) at d in {768, 2048, 4096}
   and m in {256, 1024, 4096}. Target: the feature split >= 4x faster at d = m = 4096.

    python benchmarks/objective.py              # full run, writes benchmarks/results/objective.json
    python benchmarks/objective.py --quick      # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from mec_quant_plugin.config import MECQuantConfig
from mec_quant_plugin.objective import (
    MECRegularizer,
    center_features,
    coding_length_loss,
    mixture_coding_length_loss,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "objective.json"


def _median_ms(*fns: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Median wall time (ms) of each function; interleaved per repeat, so load from other
    processes on the machine hits all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(1000 * (time.perf_counter() - start))
    return [statistics.median(bucket) for bucket in times]


def _models(quick: bool) -> dict[str, tuple[torch.nn.Module, dict]]:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        ResNetConfig,
        ResNetForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    n_img, image = (8, 32) if quick else (32, 64)
    vit = ViTForImageClassification(ViTConfig(
        image_size=image, patch_size=8, hidden_size=192, num_hidden_layers=2 if quick else 6,
        num_attention_heads=3, intermediate_size=768, num_labels=10))
    resnet = ResNetForImageClassification(ResNetConfig(
        embedding_size=32 if quick else 64, hidden_sizes=[32, 64, 128, 256] if quick else [64, 128, 256, 512],
        depths=[1, 1, 1, 1] if quick else [2, 2, 2, 2], layer_type="basic", num_labels=10))
    seq, n_seq = (64, 4) if quick else (128, 8)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=2 if quick else 4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=seq))
    images = {"pixel_values": torch.randn(n_img, 3, image, image), "labels": torch.randint(0, 10, (n_img,))}
    ids = torch.randint(0, 2048, (n_seq, seq))
    mask = torch.ones_like(ids)
    mask[::2, seq * 3 // 4:] = 0  # some padding, as in real batches
    tokens = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    return {"vit": (vit, images), "resnet": (resnet, dict(images)), "llama": (llama, tokens)}


def _train_step(model, batch, optimizer, reg: MECRegularizer, with_term: bool) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    term = reg()  # always pop the capture; only add the term when asked
    (loss + term if with_term else loss).backward()
    optimizer.step()


def _term(z: torch.Tensor, kw: dict) -> None:
    coding_length_loss(center_features(z), **kw)[0].backward()


def _plain(z: torch.Tensor, kw: dict) -> None:
    coding_length_loss(z, **kw)[0].backward()


def _mixture(z: torch.Tensor, kw: dict) -> None:
    mixture_coding_length_loss(z, **kw)[0].backward()


def bench_training_step(quick: bool, repeats: int) -> tuple[dict, str]:
    """Term time vs one training step; QAT when `prepare_model` works, else float (said so)."""
    config = MECQuantConfig()
    results, step_kind = {}, "qat"
    for name, (model, batch) in _models(quick).items():
        try:
            from mec_quant_plugin import calibrate_activations, prepare_model

            prepare_model(model, config)
            calibrate_activations(model, **batch)
        except Exception as exc:  # the QAT step is another part of the package; fall back, say so
            step_kind = f"float (prepare_model failed: {type(exc).__name__}: {exc})"
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4)
        reg = MECRegularizer(model, config)

        plain_ms, with_ms = _median_ms(
            partial(_train_step, model, batch, optimizer, reg, False),
            partial(_train_step, model, batch, optimizer, reg, True),
            repeats=repeats,
        )
        # The term alone: forward + backward on the captured rows (detached, grad-requiring).
        model(**batch)
        rows = reg.capture.pop()
        reg.capture.clear()
        z = next(iter(rows.values())).detach().requires_grad_()
        term_kw = dict(eps2=config.mec_eps2_per_dim * z.shape[1], order=config.mec_order,
                       target_radius=config.mec_target_radius)
        (term_ms,) = _median_ms(partial(_term, z, term_kw), repeats=max(repeats, 10))
        results[name] = {
            "rows_m": z.shape[0], "dim_d": z.shape[1], "step_ms": round(plain_ms, 2),
            "step_with_term_ms": round(with_ms, 2), "term_ms": round(term_ms, 3),
            "term_over_step": round(term_ms / plain_ms, 5),
            "end_to_end_overhead": round(with_ms / plain_ms - 1, 4),
        }
        reg.remove()
        print(f"[step] {name}: {results[name]}", flush=True)
    return results, step_kind


def bench_mixture(dims: list[int], rows: list[int], repeats: int, experts: int) -> dict:
    """Forward + backward of the plain term vs the K-expert mixtures, default lambda (adaptive)."""
    results = {}
    for d in dims:
        for m in rows:
            z = torch.randn(m, d).requires_grad_()
            kw = dict(eps2=float(d), order=4, target_radius=0.5)
            reps = repeats if m * d < 4096 * 2048 else max(2, repeats // 2)
            t_plain, t_feat, t_mag = _median_ms(
                partial(_plain, z, kw),
                partial(_mixture, z, {**kw, "experts": experts, "routing": "features"}),
                partial(_mixture, z, {**kw, "experts": experts, "routing": "magnitude"}),
                repeats=reps,
            )
            key = f"d={d},m={m}"
            results[key] = {
                "plain_ms": round(t_plain, 2), "features_ms": round(t_feat, 2), "magnitude_ms": round(t_mag, 2),
                "speedup_features": round(t_plain / t_feat, 2), "speedup_magnitude": round(t_plain / t_mag, 2),
            }
            print(f"[mixture K={experts}] {key}: {results[key]}", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small models and sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="feature dims d for the mixture table")
    parser.add_argument("--rows", type=int, nargs="+", default=None, help="sample counts m for the mixture table")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--skip-steps", action="store_true", help="only the plain-vs-mixture table")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    warm = torch.randn(512, 512)
    for _ in range(20):  # spin up the thread pool and allocator before the first timing
        warm = torch.tanh(warm @ warm)
    dims = args.dims or ([256, 512] if args.quick else [768, 2048, 4096])
    rows = args.rows or ([256, 512] if args.quick else [256, 1024, 4096])
    started = time.perf_counter()
    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": commit("benchmarks/objective.py"),
        "machine": {**machine(), "device": "cpu"},
        "targets": {"term_over_step": "<= 0.05 (self view, default settings)",
                    "speedup_features_at_d4096_m4096": ">= 4 (K=8)"},
    }
    if not args.skip_steps:
        report["training_step"], report["training_step_kind"] = bench_training_step(args.quick, args.repeats)
    report["mixture"] = bench_mixture(dims, rows, args.repeats, args.experts)
    steps = report.get("training_step", {})
    report["summary"] = {
        "max_term_over_step": max((r["term_over_step"] for r in steps.values()), default=None),
        "speedup_features_at_largest": report["mixture"][f"d={max(dims)},m={max(rows)}"]["speedup_features"],
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    # Other processes share the CPU (timings are medians of interleaved repeats; ratios are what
    # to read): the load average says how busy the machine was.
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, sort_keys=True))
    print(json.dumps(report["summary"], indent=2))
    return report


if __name__ == "__main__":
    main()
