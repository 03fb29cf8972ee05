"""A custom `accelerate` training loop with MEC-Quant: gradient accumulation, any number of processes.

    python examples/accelerate_loop.py --max-steps 20                                        # one process
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_loop.py --max-steps 20  # 2 processes
    torchrun --nproc_per_node 2 examples/accelerate_loop.py --max-steps 20                     # the same

On a machine without GPUs the 2 processes run on CPU with gloo (the script then sets
`Accelerator(cpu=True)`). Note: `accelerate launch --cpu --num_processes 2` starts ONE process in
accelerate 1.15 (its plain launcher; multi-CPU there means MPI), so use one of the lines above.

Measured here (2 shared CPU cores): 16 s for `accelerate launch --multi_gpu --num_processes 2 ... --max-steps 20`
(2 CPU processes, gloo; CPU shared with another job).

What matters: `prepare_model` BEFORE the optimizer (it must own the learnable step sizes) and before
`accelerator.prepare` (DDP must see the final parameters); the regularizer hooks the unwrapped
model, and `reg()` is added to the loss inside `accelerator.accumulate(model)`. Under DDP the
activation steps calibrated on the first batch are averaged across ranks.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mec_quant_plugin import MECQuantConfig, MECRegularizer, convert_model, prepare_model
from mec_quant_plugin.data import load_fashion_mnist


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.BatchNorm2d(64),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weight-bits", type=int, default=2)
    p.add_argument("--act-bits", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64, help="per process and micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu", action="store_true", help="force CPU (gloo when several processes)")
    args = p.parse_args()
    start = time.perf_counter()

    # accelerate only picks gloo for several CPU processes when told it runs on CPU
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = args.cpu or (several and not torch.cuda.is_available())
    # find_unused_parameters: an activation quantizer that turns out unsigned (after a ReLU) keeps an
    # offset parameter that gets no gradient; plain DDP refuses that (the Trainer sets it by default).
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(gradient_accumulation_steps=args.grad_accum, cpu=cpu, kwargs_handlers=[ddp])
    set_seed(args.seed)
    per_step = args.batch_size * args.grad_accum * accelerator.num_processes
    x, y = load_fashion_mnist("train", limit=per_step * args.max_steps)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True, drop_last=True)

    config = MECQuantConfig(weight_bits=args.weight_bits, act_bits=args.act_bits)
    model = prepare_model(small_cnn(), config)  # first and last layer stay W8A8 (edge_layers="8bit")
    mec = MECRegularizer(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    step = 0
    model.train()
    for xb, yb in loader:
        with accelerator.accumulate(model):
            mec.set_progress(step, args.max_steps)
            loss = nn.functional.cross_entropy(model(xb), yb) + mec()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            step += 1
            if step % 10 == 0 or step == args.max_steps:
                mean_loss = accelerator.gather(loss.detach()[None]).mean().item()
                accelerator.print(f"step {step:4d}  loss {mean_loss:.3f}  mec {mec.last_stats.get('loss', 0.0):.3f}")
            if step >= args.max_steps:
                break

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        mec.remove()
        model = convert_model(accelerator.unwrap_model(model).eval())
        xt, yt = load_fashion_mnist("test", limit=args.eval_samples)
        with torch.no_grad():
            acc = (torch.cat([model(b).argmax(1) for b in xt.split(500)]) == yt).float().mean().item()
        print(f"W{args.weight_bits}A{args.act_bits}, {accelerator.num_processes} process(es), grad accumulation "
              f"{args.grad_accum}: test accuracy {acc:.3f} on {len(yt)} images; {time.perf_counter() - start:.0f} s")
    accelerator.end_training()


if __name__ == "__main__":
    main()
