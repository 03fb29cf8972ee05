"""The data-parallel checks and collectives of the quantizers and the objective, written once.

Every function is a no-op in a single process, so the same code runs with and without
`torch.distributed` (plain scripts, the Trainer, accelerate, torchrun).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when torch.distributed is initialized with more than one rank.

    Example:
        >>> is_distributed()  # a plain process
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_across_ranks_(*tensors: torch.Tensor) -> None:
    """Replace each tensor's data, in place, by its mean over the ranks.

    Why: under data parallelism each rank calibrates a step size on its own first batch, after
    DDP has already broadcast the parameters; averaging makes every rank start from the same one.
    """
    if not is_distributed():
        return
    world = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t.data, op=dist.ReduceOp.SUM)
        t.data /= world


def any_across_ranks_(flag: torch.Tensor) -> None:
    """Replace `flag`, in place, by its maximum over the ranks (a logical OR of 0/1 flags)."""
    if is_distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)


def sharded_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters held as DTensor shards (FSDP2's `fully_shard`, tensor parallelism).

    Example:
        >>> fully_shard(model); sharded_parameter_names(model)[:1]
        ['model.embed_tokens.weight']
    """
    from torch.distributed.tensor import DTensor

    return [name for name, p in model.named_parameters() if isinstance(p, DTensor)]


def sharded_model_message(what: str, names: list[str]) -> str:
    """Why `what` cannot run on a sharded model, and how to get the full one (convert, save)."""
    shown = ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")
    return (
        f"{what} needs full weights, but the model is sharded ({len(names)} DTensor parameter(s): {shown}), "
        "e.g. by FSDP2's fully_shard: converting the shards would give int tensors that hold only this rank's "
        "rows. Gather the full state dict (torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
        "options=StateDictOptions(full_state_dict=True)), or the Trainer's save_model), load it into an "
        "unsharded prepared model (prepare_model with the same config) and convert that one, or convert a "
        "Trainer checkpoint with `mec-quant convert --model CHECKPOINT --output-dir OUT` (convert_checkpoint)."
    )
