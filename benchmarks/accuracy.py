"""Accuracy benchmark on real Fashion-MNIST: FP reference, PTQ, plain LSQ QAT and MEC-Quant variants.

Protocol (benchmarks/README.md): one converged FP model (trained here once, cached); every method
then trains for the same number of steps from that same start with the same data order (the
Trainer's seed), per seed; the FP model fine-tuned for the same steps is the fair reference.
Each finished run is appended to the results JSON at once (an interrupted benchmark keeps what
it measured), with the command, commit, machine and seconds.

    python benchmarks/accuracy.py --bits W2A2 --seeds 0 1 2 --methods fp plain mec
    python benchmarks/accuracy.py --bits W2A2 --seeds 0 --methods "mec:mec_weight=1.0" "mec:mec_view=teacher"

A method is `fp`, `ptq`, `plain` (mec_weight=0) or `mec[:field=value,...]` where the fields are
MECQuantConfig fields (e.g. mec_weight, mec_view, mec_lambda_mode, mec_eps2_per_dim, mec_center).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mec_quant_plugin import MECQuantConfig, calibrate_activations, convert_model, prepare_model
from mec_quant_plugin.demo.fashion_mnist import accuracy, collate, fashion_mnist_datasets, model_bytes, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, commit, machine, parse_bits, parse_method, torchao_prepare  # noqa: E402
from harness.fashion_mnist import ARCHITECTURES, pretrain_fp  # noqa: E402

MODEL_DESCRIPTIONS = {
    "resnet": "ResNet (16-32-64, basic blocks), transformers config",
    "vit": "ViT (4x4 patches, width 64, 4 layers, 4 heads), transformers config",
    "efficientnet-lite0": "EfficientNet-Lite0, ImageNet-pretrained, new head, 28x28 upsampled to 32x32",
}


def run_one(method: str, overrides: dict[str, Any], bits: tuple[int, int | None], seed: int, fp, train_ds, test_ds,
            work: Path, steps: int, lr: float) -> dict[str, Any]:
    wbits, abits = bits
    start = time.perf_counter()
    if method == "fp":
        model, _ = train(copy.deepcopy(fp), train_ds, str(work / "fp-ft"), max_steps=steps, lr=lr, seed=seed)
    elif method == "ptq":  # round to nearest with MSE-initialized steps, activations calibrated on one batch
        model = prepare_model(copy.deepcopy(fp), MECQuantConfig(weight_bits=wbits, act_bits=abits))
        torch.manual_seed(seed)
        idx = torch.randperm(len(train_ds))[:128].tolist()
        calibrate_activations(model, pixel_values=collate([train_ds[i] for i in idx])["pixel_values"])
        model = convert_model(model)
    elif method == "torchao":  # torchao's QATConfig on the Linear layers; evaluated fake-quantized
        model, _ = train(torchao_prepare(copy.deepcopy(fp), wbits, abits), train_ds, str(work / "torchao"),
                         max_steps=steps, lr=lr, seed=seed)
        return {"accuracy": accuracy(model, test_ds), "bytes": None,
                "seconds": round(time.perf_counter() - start, 1)}
    else:
        cfg = MECQuantConfig(weight_bits=wbits, act_bits=abits)
        cfg = cfg.replace(mec_weight=0.0) if method == "plain" else cfg.replace(**overrides)
        model, _ = train(copy.deepcopy(fp), train_ds, str(work / "qat"), max_steps=steps, lr=lr, seed=seed, config=cfg)
    return {"accuracy": accuracy(model, test_ds), "bytes": model_bytes(model),
            "seconds": round(time.perf_counter() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="resnet",
                        help="resnet (transformers ResNet 16-32-64), vit (4 layers, width 64, 4x4 patches) or "
                        "efficientnet-lite0 (pretrained; the FP start fine-tunes it, lr 1e-3)")
    parser.add_argument("--bits", nargs="+", default=["W2A2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["fp", "ptq", "plain", "mec"])
    parser.add_argument("--fp-steps", type=int, default=1407, help="FP pre-training steps (3 epochs at batch 128)")
    parser.add_argument("--qat-steps", type=int, default=235, help="steps of every method after the FP start")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", default=None,
                        help="results JSON (default: results/fashion_mnist.json, results/fashion_mnist_<arch>.json for other archs)")
    parser.add_argument("--work-dir", default="outputs/bench-fashion-mnist")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    methods = [(m, *parse_method(m)) for m in args.methods]
    train_ds, test_ds = fashion_mnist_datasets()
    work = Path(args.work_dir)
    fp = pretrain_fp(str(work), train_ds, steps=args.fp_steps, seed=0, arch=args.arch)
    out = Path(args.out or ROOT / "results" / ("fashion_mnist.json" if args.arch == "resnet"
                                               else f"fashion_mnist_{args.arch}.json"))
    results = json.loads(out.read_text()) if out.exists() else {"runs": []}  # appended to, resumable
    results.update(protocol={"fp_steps": args.fp_steps, "qat_steps": args.qat_steps, "lr": args.lr,
                             "batch_size": 128, "model": MODEL_DESCRIPTIONS[args.arch],
                             "edge_layers": "8bit (first layer and classifier W8A8)"},
                   fp_start_accuracy=accuracy(fp, test_ds))
    # Seed-major order: an interrupted run still leaves a complete table for the first seeds.
    for seed in args.seeds:
        for bits in args.bits:
            for label, method, overrides in methods:
                if method == "ptq" and seed != args.seeds[0]:
                    continue  # deterministic: one run is enough
                if method == "fp" and bits != args.bits[0]:
                    continue  # the FP reference does not depend on the bits
                label_bits = bits if method != "fp" else "FP"
                if any((r["bits"], r["method"], r["seed"]) == (label_bits, label, seed) for r in results["runs"]):
                    print(f"{label_bits:>5} {label:<40} seed {seed}: already in {out.name}, skipped", flush=True)
                    continue  # resuming an interrupted benchmark
                res = run_one(method, overrides, parse_bits(bits) if method != "fp" else (32, 32), seed, fp,
                              train_ds, test_ds, work, args.qat_steps, args.lr)
                entry = {"bits": bits if method != "fp" else "FP", "method": label, "seed": seed, **res,
                         "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
                         "commit": commit("benchmarks/accuracy.py"), "machine": machine()}
                results["runs"].append(entry)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=2))
                print(f"{entry['bits']:>5} {label:<40} seed {seed}: {100 * res['accuracy']:.2f}% "
                      f"({res['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
