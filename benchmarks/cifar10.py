"""CIFAR-10 ResNet-20 benchmark: FP start, then FP / PTQ / plain LSQ / KD / MEC-Quant variants.

Protocol (benchmarks/README.md, "CIFAR-10 ResNet-20"): one FP ResNet-20 trained once with the
standard recipe (SGD momentum 0.9 Nesterov, lr 0.1 cosine, weight decay 5e-4, batch 128, random
crop with 4-pixel padding + horizontal flip) and cached; every method then trains the same number
of steps from that start with the same data order (fixed by the seed), stem conv and classifier
at W8A8, and is scored as the CONVERTED int model on the 10,000 test images. The FP model
fine-tuned for the same steps is the fair reference. Runs are resumable at two levels: a finished
run is appended to the results JSON at once (and skipped when the command is repeated), and a
run in progress checkpoints every `--checkpoint-every` steps (safetensors + JSON, written
atomically) and continues from there.

    python benchmarks/cifar10.py fp-start --epochs 20
    python benchmarks/cifar10.py run --bits W2A2 --seeds 0 --methods fp ptq plain kd mec
    python benchmarks/cifar10.py run --bits W2A2 --seeds 0 --methods "mec:mec_taps=layers"
    python benchmarks/cifar10.py diagnose --bits W2A2

A method is `fp`, `ptq`, `plain` (mec_weight=0), `kd` (distill_weight=1 from the FP start, no
term) or `mec[:field=value,...]` with MECQuantConfig fields (e.g. mec_layer_weight, distill_weight).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import commit, machine, parse_bits  # noqa: E402
from harness.cifar10 import ResNet20, accuracy, epoch_batches, load_cifar10, normalize  # noqa: E402

from mec_quant_plugin import (  # noqa: E402
    MECQuantConfig,
    MECRegularizer,
    calibrate_activations,
    convert_model,
    make_teacher,
    prepare_model,
)

WORK = Path(os.environ.get("MEC_QUANT_BENCH_DIR", "outputs/bench-cifar10"))  # FP start, run checkpoints
RESULTS = Path(__file__).resolve().parent / "results"


def _atomic_save(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    tmp_json = path.with_suffix(".json.tmp")
    tmp_json.write_text(json.dumps(meta, indent=2))
    os.replace(tmp_json, path.with_suffix(".json"))


def _optimizer_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[f"momentum::{names[id(p)]}"] = buf
    return out


def _load_optimizer_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for key, buf in tensors.items():
        if key.startswith("momentum::"):
            opt.state[params[key.split("::", 1)[1]]]["momentum_buffer"] = buf.clone()


def _resume(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, sched, device: str, key: str,
            steps_per_unit: int) -> int:
    """Load a progress checkpoint (weights, momentum buffers) if there is one, fast-forward the
    schedule, and return how many units (`key` in its JSON: epochs or steps) were done."""
    if not ckpt.exists():
        return 0
    tensors = load_file(str(ckpt))
    model.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("momentum::")})
    _load_optimizer_tensors(model, opt, {k: v.to(device) for k, v in tensors.items()})
    done = json.loads(ckpt.with_suffix(".json").read_text())[key]
    with warnings.catch_warnings():  # fast-forwarding the schedule, no optimizer step is owed
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done * steps_per_unit):
            sched.step()
    return done


def fp_start(args: argparse.Namespace) -> None:
    """Train (or resume) the FP ResNet-20 and cache it as WORK/fp-start.safetensors (+ .json)."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    final = WORK / "fp-start.safetensors"
    if final.exists():
        print(f"FP start already cached: {final} ({json.loads(final.with_suffix('.json').read_text())})")
        return
    data = load_cifar10()
    xtr, ytr = data["train"]
    torch.manual_seed(args.seed)
    model = ResNet20().to(args.device, memory_format=torch.channels_last)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                          lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(xtr) // args.batch_size
    total = max(steps_per_epoch * args.epochs, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    ckpt = WORK / "fp-start-progress.safetensors"
    epoch0 = _resume(ckpt, model, opt, sched, args.device, "epochs_done", steps_per_epoch)
    if epoch0:
        print(f"resuming the FP start after epoch {epoch0}", flush=True)
    start = time.perf_counter()
    for epoch in range(epoch0, args.epochs):
        model.train()
        t0, running = time.perf_counter(), 0.0
        for xb, yb in epoch_batches(xtr, ytr, batch_size=args.batch_size, seed=args.seed, epoch=epoch):
            xb, yb = xb.to(args.device, non_blocking=True), yb.to(args.device, non_blocking=True)
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
        acc = accuracy(model, *data["test"])
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {running / steps_per_epoch:.3f}, test {100 * acc:.2f}% "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        _atomic_save({**model.state_dict(), **_optimizer_tensors(model, opt)}, {"epochs_done": epoch + 1}, ckpt)
    acc = accuracy(model, *data["test"])
    meta = {"test_accuracy": acc, "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay,
            "batch_size": args.batch_size, "seed": args.seed, "seconds_this_session": round(time.perf_counter() - start),
            "recipe": "SGD momentum 0.9 Nesterov, cosine, crop(pad 4)+flip, batch 128"}
    _atomic_save(model.state_dict(), meta, final)
    print(f"FP start: {100 * acc:.2f}% after {args.epochs} epochs -> {final}")


METHODS = ("fp", "ptq", "plain", "kd", "mec")


def parse_method(text: str) -> tuple[str, dict]:
    """'mec:mec_weight=1.0,mec_view=teacher' -> ('mec', {...}); values are JSON or bare words."""
    name, _, rest = text.partition(":")
    if name not in METHODS:
        raise SystemExit(f"unknown method {text!r}: use one of {', '.join(METHODS)}[:field=value,...]")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def _load_fp_start(device: str = "cpu") -> torch.nn.Module:
    final = WORK / "fp-start.safetensors"
    if not final.exists():
        raise SystemExit(f"no FP start at {final}: run `python benchmarks/cifar10.py fp-start` first.")
    model = ResNet20()
    model.load_state_dict(load_file(str(final)))
    return model.to(device, memory_format=torch.channels_last)


def method_config(method: str, overrides: dict, bits: tuple[int, int | None]) -> MECQuantConfig | None:
    """The run's MECQuantConfig (None for `fp`): `plain` turns the term off, `kd` is logit
    distillation from the FP start (distill_weight 1, T 1 unless overridden) without the term."""
    if method == "fp":
        return None
    cfg = MECQuantConfig(weight_bits=bits[0], act_bits=bits[1])
    if method == "plain":
        cfg = cfg.replace(mec_weight=0.0)
    elif method == "kd":
        cfg = cfg.replace(mec_weight=0.0, distill_weight=1.0)
    return cfg.replace(**overrides)


def start_method(cfg: MECQuantConfig | None, calibration: torch.Tensor, device: str = "cpu", seed: int = 0):
    """The FP start as every method begins: its frozen teacher copy when a term needs one, prepared
    with `cfg` and activation steps calibrated on `calibration` (nothing of this for `fp`, cfg None),
    and the regularizer of its terms. Returns (model, regularizer or None)."""
    model = _load_fp_start(device)
    if cfg is None:
        return model, None
    teacher = make_teacher(model) if cfg.teacher_needs() else None
    model = prepare_model(model, cfg)
    with torch.no_grad():
        calibrate_activations(model, calibration.to(device))
    return model, MECRegularizer(model, cfg, teacher=teacher, seed=seed)


def train_method(method: str, overrides: dict, bits, seed: int, data, args, run_dir: Path) -> dict:
    """Train one method from the FP start for `args.qat_epochs` epochs; returns the result entry."""
    xtr, ytr = data["train"]
    cfg = method_config(method, overrides, bits)
    first = next(epoch_batches(xtr, ytr, batch_size=args.batch_size, seed=seed, epoch=0))
    model, reg = start_method(cfg, first[0], args.device, seed)
    if method == "ptq":
        reg.remove()
        return {"model": convert_model(model.eval()), "steps": 0, "step_seconds": None, "config": cfg.to_dict()}
    quant_params = [p for n, p in model.named_parameters() if "fake_quantizer" in n]
    ids = {id(p) for p in quant_params}
    decay = [p for p in model.parameters() if p.dim() > 1 and id(p) not in ids]
    no_decay = [p for p in model.parameters() if p.dim() <= 1 and id(p) not in ids] + quant_params
    opt = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = len(xtr) // args.batch_size
    total = args.steps or steps_per_epoch * args.qat_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    ckpt = run_dir / "progress.safetensors"
    done = _resume(ckpt, model, opt, sched, args.device, "steps_done", 1)
    if done:
        print(f"  resuming after step {done}", flush=True)
    model.train()
    step, times, log = 0, [], []
    for epoch in range(math.ceil(total / steps_per_epoch)):
        for xb, yb in epoch_batches(xtr, ytr, batch_size=args.batch_size, seed=seed, epoch=epoch):
            if step >= total:
                break
            if step < done:
                step += 1
                continue
            t0 = time.perf_counter()
            xb, yb = xb.to(args.device, non_blocking=True), yb.to(args.device, non_blocking=True)
            if reg is not None:
                reg.set_progress(step, total)
            logits = model(xb)
            task = torch.nn.functional.cross_entropy(logits, yb)
            loss = task
            if reg is not None:
                loss = loss + reg(logits=logits, labels=yb)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss at step {step}: {reg.last_stats if reg is not None else {}}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if args.device != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            step += 1
            if step % 50 == 0:
                parts = {k: v for k, v in (reg.last_stats if reg is not None else {}).items()
                         if k in ("total", "loss", "layer/loss", "label/loss", "mi/loss", "distill/loss")}
                log.append({"step": step, "task": round(float(task.detach()), 4), **{k: round(v, 4) for k, v in parts.items()}})
                print(f"  step {step}/{total} task {float(task.detach()):.3f} " + " ".join(f"{k} {v:.4f}" for k, v in parts.items()),
                      flush=True)
            if step % args.checkpoint_every == 0 and step < total:
                _atomic_save({**model.state_dict(), **_optimizer_tensors(model, opt)}, {"steps_done": step}, ckpt)
    # The trained (fake-quantized) state, for `diagnose`; written before conversion.
    _atomic_save(model.state_dict(), {"method": method, "overrides": overrides, "steps_done": total},
                 run_dir / "final.safetensors")
    if cfg is not None:
        model = convert_model(model.eval())
    return {"model": model, "steps": total, "step_seconds": round(statistics.median(times), 4) if times else None,
            "config": None if cfg is None else cfg.to_dict(), "log": log}


def _append_run(out: Path, header: dict, entry: dict) -> dict:
    """Append `entry` to the results file under an exclusive lock, re-reading it first, so that
    several benchmark processes can share one results file; written atomically."""
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(out.read_text()) if out.exists() else {"runs": []}
        results.update({k: v for k, v in header.items() if k != "runs"})
        results["runs"].append(entry)
        tmp = out.with_suffix(f".json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, out)
    return results


def run(args: argparse.Namespace) -> None:
    """Train and score every (seed, bits, method); append each finished run to the results JSON."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    data = load_cifar10()
    split = "test"
    if args.holdout:
        data, split = holdout_split(data, args.holdout), f"holdout-{args.holdout}"
    out = Path(args.out or RESULTS / ("cifar10_resnet20_holdout.json" if args.holdout else "cifar10_resnet20.json"))
    results = json.loads(out.read_text()) if out.exists() else {"runs": []}
    fp_meta = json.loads((WORK / "fp-start.json").read_text()) if (WORK / "fp-start.json").exists() else None
    results.update(protocol={"qat_epochs": args.qat_epochs, "steps": args.steps, "lr": args.lr, "weight_decay": args.weight_decay,
                             "batch_size": args.batch_size, "model": "ResNet-20 (He et al. 2016, option-A shortcuts)",
                             "optimizer": "SGD momentum 0.9 Nesterov, cosine to 0, no decay on BN/step sizes",
                             "edge_layers": "stem conv and classifier W8A8", "fp_start": fp_meta})
    # A fixed random subset of the training images (the parquet is sorted by class) for train accuracy.
    subset = torch.randperm(len(data["train"][1]), generator=torch.Generator().manual_seed(0))[:args.train_eval_images]
    train_eval = (data["train"][0][subset], data["train"][1][subset])
    test = (data["test"][0][:args.test_images], data["test"][1][:args.test_images])
    for seed in args.seeds:
        for bits_text in args.bits:
            for spec in args.methods:
                method, overrides = parse_method(spec)
                label_bits = "FP" if method == "fp" else bits_text
                if any((r["bits"], r["method"], r["seed"], r.get("qat_epochs", 1), r.get("split", "test"))
                       == (label_bits, spec, seed, args.qat_epochs, split) for r in results["runs"]):
                    print(f"{label_bits:>5} {spec:<50} seed {seed}: already in {out.name}, skipped", flush=True)
                    continue
                run_dir = _run_dir(label_bits, spec, seed, args.qat_epochs, split)
                print(f"{label_bits:>5} {spec} seed {seed} ...", flush=True)
                start = time.perf_counter()
                res = train_method(method, overrides, parse_bits(bits_text), seed, data, args, run_dir)
                model = res.pop("model")
                entry = {"bits": label_bits, "method": spec, "seed": seed, "qat_epochs": args.qat_epochs,
                         **({} if split == "test" else {"split": split}),
                         "accuracy": accuracy(model, *test), "test_images": len(test[1]), "train_accuracy": accuracy(model, *train_eval),
                         **res, "seconds": round(time.perf_counter() - start, 1),
                         "command": " ".join(["python benchmarks/cifar10.py", *(sys.argv[1:] if argv_is_cli() else [])]),
                         "commit": commit(), "machine": machine()}
                results = _append_run(out, results, entry)
                print(f"{label_bits:>5} {spec:<50} seed {seed}: test {100 * entry['accuracy']:.2f}% "
                      f"train {100 * entry['train_accuracy']:.2f}% ({entry['seconds']:.0f} s)", flush=True)


def _run_dir(label_bits: str, spec: str, seed: int, qat_epochs: int = 1, split: str = "test") -> Path:
    """One folder per run; runs of another schedule length or data split never resume from each other."""
    epochs = "" if qat_epochs == 1 else f"-e{qat_epochs}"
    held = "" if split == "test" else f"-{split}"
    return WORK / "runs" / f"{label_bits}-{spec.replace(':', '_').replace(',', '_')}-s{seed}{epochs}{held}"


HOLDOUT_SEED = 20261202  # fixed: every held-out run scores the same images


def holdout_split(data: dict, images: int) -> dict:
    """The training set split in two for tuning (KD's temperature and weight, a term's weight):
    `images` fixed random training images become the "test" split, the rest the training split;
    the real test set is not touched. (The FP start saw the held-out images during its own
    training: they are unseen by QAT only.)"""
    x, y = data["train"]
    if not 0 < images < len(y):
        raise SystemExit(f"--holdout must be between 1 and {len(y) - 1} training images, got {images}.")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    held, kept = order[:images], order[images:].sort().values
    return {"train": (x[kept], y[kept]), "test": (x[held], y[held])}


@torch.no_grad()
def _float_ranks(model: torch.nn.Module, images: torch.Tensor, names: list[str], max_rows: int = 4096) -> dict[str, float]:
    """Effective rank of the float inputs of the named layers of a float model."""
    from harness.diagnostics import effective_rank

    seen, handles = {}, []
    for name in names:
        handles.append(model.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, name=name: seen.__setitem__(name, args[0])))
    model.eval()(images)
    for h in handles:
        h.remove()
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, x in seen.items():
        rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
        out[name] = round(effective_rank(rows[torch.randperm(rows.shape[0], generator=gen)[:max_rows]]), 3)
    return out


def diagnose(args: argparse.Namespace) -> None:
    """Per-layer collapse statistics: FP (fine-tuned reference), PTQ and the given trained methods."""
    from harness.diagnostics import layer_statistics

    torch.set_num_threads(args.threads or torch.get_num_threads())
    data = load_cifar10()
    images = normalize(data["test"][0][: args.images])
    bits = parse_bits(args.bits)
    cfg = MECQuantConfig(weight_bits=bits[0], act_bits=bits[1])
    fp_state = _run_dir("FP", "fp", args.seed) / "final.safetensors"
    fp = _load_fp_start()
    if fp_state.exists():
        fp.load_state_dict(load_file(str(fp_state)))
    ptq = prepare_model(_load_fp_start(), cfg)
    first = next(epoch_batches(*data["train"], batch_size=128, seed=args.seed, epoch=0))
    calibrate_activations(ptq, first[0])
    report = {"bits": args.bits, "images": args.images, "fp_state": str(fp_state if fp_state.exists() else "fp start"),
              "models": {}}
    report["models"]["ptq"] = layer_statistics(ptq, images)
    names = [row["layer"] for row in report["models"]["ptq"]]
    report["fp_eff_rank"] = _float_ranks(fp, images, names)
    for spec in args.methods:
        state = _run_dir(args.bits, spec, args.seed) / "final.safetensors"
        if not state.exists():
            print(f"no trained state for {spec} (seed {args.seed}) at {state}: run it first; skipped")
            continue
        method, overrides = parse_method(spec)
        run_cfg = method_config(method, overrides, bits)
        model = prepare_model(ResNet20().to(memory_format=torch.channels_last), run_cfg)
        model.load_state_dict(load_file(str(state)))
        report["models"][spec] = layer_statistics(model, images)
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=2))
    print("| layer | ch | FP eff. rank | " + " | ".join(f"{k} eff. rank (q) / code H / dead / unused" for k in report["models"]) + " |")
    for i, name in enumerate(names):
        cells = [f"{m[i]['eff_rank_quant']:.1f} / {m[i]['code_entropy']:.2f} / {m[i]['dead_channels']:.2f} / "
                 f"{m[i]['unused_levels']:.2f}" for m in report["models"].values()]
        print(f"| {name} | {report['models']['ptq'][i]['channels']} | {report['fp_eff_rank'][name]:.1f} | " + " | ".join(cells) + " |")
    if args.plot:
        _plot_diagnostic(report, Path(args.plot))


def _plot_diagnostic(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["fp_eff_rank"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = range(len(names))
    axes[0].plot(x, [report["fp_eff_rank"][n] for n in names], "k-o", label="FP (float input)")
    for label, rows in report["models"].items():
        axes[0].plot(x, [r["eff_rank_quant"] for r in rows], "-o", label=f"{label} (quantized input)")
        axes[1].plot(x, [r["code_entropy"] for r in rows], "-o", label=label)
        axes[2].plot(x, [r["weight_code_entropy"] for r in rows], "-o", label=label)
    for ax, title in zip(axes, ("effective rank of layer inputs", f"activation code entropy (bits, max {report['bits'][-1]})",
                                "weight code entropy (bits)")):
        ax.set_title(title)
        ax.set_xlabel("quantized layer (depth order)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


def argv_is_cli() -> bool:
    return Path(sys.argv[0]).name == "cifar10.py"


def grad_share(args: argparse.Namespace) -> None:
    """How hard each method's added terms pull, against the cross-entropy: on the first `--batches`
    batches of seed 0, the gradient norm w.r.t. the conv/linear weights of the task loss and of
    what the regularizer adds, for the W2A2 model prepared and calibrated from the FP start (how the
    weights of the terms are set before screening)."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    xtr, ytr = load_cifar10()["train"]
    rows = []
    for spec in args.methods:
        method, overrides = parse_method(spec)
        batches = epoch_batches(xtr, ytr, batch_size=128, seed=0, epoch=0)
        first = next(batches)
        model, reg = start_method(method_config(method, overrides, parse_bits(args.bits)), first[0])
        model.train()
        weights = [p for n, p in model.named_parameters() if p.dim() > 1 and "fake_quantizer" not in n]
        task_norms, term_norms = [], []
        for step, (xb, yb) in enumerate([first, *(next(batches) for _ in range(args.batches - 1))]):
            reg.set_progress(step, 390)
            logits = model(xb)
            task = torch.nn.functional.cross_entropy(logits, yb)
            term = reg(logits=logits, labels=yb)
            for value, norms in ((task, task_norms), (term, term_norms)):
                if not value.requires_grad:  # no term on (plain): nothing pulls
                    norms.append(0.0)
                    continue
                grads = torch.autograd.grad(value, weights, retain_graph=True, allow_unused=True)
                norms.append(float(torch.sqrt(sum((g.pow(2).sum() for g in grads if g is not None), torch.zeros(())))))
        task_med, term_med = statistics.median(task_norms), statistics.median(term_norms)
        rows.append((spec, task_med, term_med))
        print(f"{spec:<60} |grad CE| {task_med:.3f}  |grad terms| {term_med:.3f}  ratio {term_med / task_med:.3f}", flush=True)


def step_time(args: argparse.Namespace) -> None:
    """Side-by-side training-step time of methods (the cost of a term): every method's model is
    built as `run` builds it, then the methods take turns, one step each, for `--steps` rounds after
    `--warmup` rounds, so they share the machine's noise; medians and ratios to the first method."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    xtr, ytr = load_cifar10()["train"]
    batches = epoch_batches(xtr, ytr, batch_size=128, seed=0, epoch=0)
    data = [next(batches) for _ in range(args.warmup + args.steps)]
    setups = []
    for spec in args.methods:
        method, overrides = parse_method(spec)
        model, reg = start_method(method_config(method, overrides, parse_bits(args.bits)), data[0][0])
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        setups.append((spec, model.train(), reg, opt, []))
    for i, (xb, yb) in enumerate(data):
        for _spec, model, reg, opt, times in setups:
            t0 = time.perf_counter()
            if reg is not None:
                reg.set_progress(i, len(data))
            logits = model(xb)
            loss = torch.nn.functional.cross_entropy(logits, yb)
            if reg is not None:
                loss = loss + reg(logits=logits, labels=yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    base = statistics.median(setups[0][4])
    rows = []
    for spec, _, _, _, times in setups:
        med = statistics.median(times)
        rows.append({"method": spec, "median_step_s": round(med, 4), f"vs_{setups[0][0]}": round(med / base, 3)})
        print(f"{spec:<75} {1000 * med:7.1f} ms  x{med / base:.3f}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"bits": args.bits, "steps": args.steps, "warmup": args.warmup,
                                              "rows": rows, "command": " ".join(["python benchmarks/cifar10.py", *sys.argv[1:]]),
                                              "commit": commit(), "machine": machine()}, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fp-start", help="train the FP ResNet-20 once (cached, resumable)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.set_defaults(func=fp_start)
    p = sub.add_parser("run", help="train and score methods from the FP start (resumable)")
    p.add_argument("--bits", nargs="+", default=["W2A2"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--methods", nargs="+", default=["fp", "ptq", "plain", "kd", "mec"])
    p.add_argument("--qat-epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="override the steps of every run (smoke tests)")
    p.add_argument("--test-images", type=int, default=10000, help="fewer only for smoke tests")
    p.add_argument("--train-eval-images", type=int, default=2000, help="training images scored for train accuracy")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--holdout", type=int, default=0,
                   help="tune on the training set: score on this many held-out training images, train on the rest "
                        "(results go to cifar10_resnet20_holdout.json unless --out says otherwise)")
    p.add_argument("--out", default=None, help="results JSON (default: results/cifar10_resnet20.json)")
    p.set_defaults(func=run)
    p = sub.add_parser("diagnose", help="per-layer collapse statistics of FP, PTQ and trained runs")
    p.add_argument("--bits", default="W2A2")
    p.add_argument("--methods", nargs="+", default=["plain"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cifar10_diagnostic.json"))
    p.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "docs" / "cifar10_diagnostic.png"))
    p.set_defaults(func=diagnose)
    p = sub.add_parser("grad-share", help="gradient norm of the added terms against the cross-entropy's")
    p.add_argument("--bits", default="W2A2")
    p.add_argument("--methods", nargs="+", default=["kd"])
    p.add_argument("--batches", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=grad_share)
    p = sub.add_parser("step-time", help="side-by-side training-step time of methods (the cost of a term)")
    p.add_argument("--bits", default="W2A2")
    p.add_argument("--methods", nargs="+", default=["plain", "kd"])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the medians to this JSON")
    p.set_defaults(func=step_time)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
