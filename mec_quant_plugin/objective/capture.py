"""Feature capture: forward hooks that record the representation the coding length sees.

A tap is a module name plus which side of it is the representation: its `"input"` (the input of
the task head: pooled features of a classifier, final hidden states entering an LM head) or its
`"output"` (a block's output). Captured tensors become rows (m, d):
- (N, C, H, W) spatial maps are average-pooled to (N, C);
- (N, T, D) token sequences become token rows, padding excluded via the `attention_mask` of the
  top-level call, sub-sampled to `max_rows` with a generator seeded from the training step (the
  same step and shapes give the same rows, so a teacher and a student line up and resume works);
- (N, D) rows are kept as they are.

Only the LAST top-level forward is kept: a forward pre-hook on the model clears the previous
features, and a forward hook on the model closes capture when that forward returns. So
activation checkpointing, which re-runs block forwards during backward, cannot double count,
and nothing accumulates across steps. Hooks only keep references; rows are made in `pop`, outside
any checkpointed region (an op inside one would change what it saves and break recomputation).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..options import TAP_SIDES, TAPS, check_choice


def _available(model: nn.Module, limit: int = 12) -> str:
    names = [n for n, _ in model.named_modules() if n]
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def to_rows(x: Tensor, attention_mask: Tensor | None = None, *, positions: bool = False) -> Tensor:
    """A captured tensor as (m, d) rows: pooled spatial maps (`positions=True`: every spatial
    position a row), unpadded token rows, or as is.

    Example:
        >>> to_rows(torch.randn(2, 8, 4, 4)).shape, to_rows(torch.randn(2, 8, 4, 4), positions=True).shape
        (torch.Size([2, 8]), torch.Size([32, 8]))

    Raises:
        ValueError: a shape other than (N, D), (N, T, D) or (N, C, H, W).
    """
    if x.dim() == 2:
        return x
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if positions else x.mean(dim=(2, 3))
    if x.dim() == 3:
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape == x.shape[:2]:
            return x[attention_mask.to(device=x.device) != 0]
        return x.reshape(-1, x.shape[-1])
    raise ValueError(
        f"Cannot turn a captured tensor of shape {tuple(x.shape)} into samples: supported are (N, D), "
        "(N, T, D) token sequences and (N, C, H, W) spatial maps. Tap another module."
    )


def subsample_rows(rows: Tensor, max_rows: int, seed: int) -> Tensor:
    """At most `max_rows` rows, chosen by a CPU generator seeded with `seed` (order preserved)."""
    if rows.shape[0] <= max_rows:
        return rows
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(rows.shape[0], generator=generator)[:max_rows].sort().values
    return rows[keep.to(rows.device)]


def _largest_homogeneous(model: nn.Module, kind: type[nn.Module]) -> str | None:
    best, best_size = None, -1
    for name, mod in model.named_modules():
        if isinstance(mod, kind) and len(mod) >= 2 and len({type(c) for c in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = name, size
    return best


def find_blocks(model: nn.Module) -> list[str]:
    """Names of the model's repeated blocks: the children of its largest homogeneous ModuleList
    (of its largest homogeneous nn.Sequential when it has no such ModuleList).

    Transformers keep their layers in one `nn.ModuleList` of identical blocks (ViT/BERT
    `encoder.layer`, Llama `model.layers`), Hugging Face CNNs their stages (ResNet
    `encoder.stages`); torchvision-style CNNs chain theirs in an `nn.Sequential` (a CIFAR ResNet's
    residual blocks). Choosing by structure (most parameters) avoids guessing names.

    Raises:
        ValueError: no ModuleList or Sequential of >= 2 same-type modules exists.
    """
    best = _largest_homogeneous(model, nn.ModuleList)
    if best is None:
        best = _largest_homogeneous(model, nn.Sequential)
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.ModuleList or nn.Sequential of repeated blocks to tap; "
            "name the modules with MECQuantConfig(mec_tap_modules=[...]) (mec_mi_modules=[...] for the "
            "mutual-information term)."
        )
    return [f"{best}.{i}" for i in range(len(model.get_submodule(best)))]


def resolve_taps(model: nn.Module, taps: str = "head", tap_modules: list[str] | None = None) -> list[tuple[str, str]]:
    """(module name, side) pairs for `MECQuantConfig.mec_taps` / `mec_tap_modules`.

    "head": the input of the task head (`layer_policy.find_head_layer`: the output embedding of
    LMs via `get_output_embeddings()`, else the last quantizable layer, i.e. the classifier);
    "blocks": the output of every block (`find_blocks`); "head+blocks": both. Explicit
    `tap_modules` name modules whose input is the representation and override `taps`.

    Example:
        >>> resolve_taps(vit_for_image_classification)
        [('classifier', 'input')]

    Raises:
        ValueError: an unknown `taps` value, or no head / blocks found.
    """
    if tap_modules:
        return [(name, "input") for name in tap_modules]
    check_choice("taps", taps, TAPS)
    from ..layer_policy import find_head_layer  # the policy's module registry loads lazily

    found: list[tuple[str, str]] = []
    if "blocks" in taps:
        found += [(name, "output") for name in find_blocks(model)]
    if "head" in taps:
        found.append((find_head_layer(model), "input"))
    return found


class FeatureCapture:
    """Records, through forward hooks, the rows at the chosen taps during the last forward.

    Args:
        model: the module whose top-level forward delimits one capture.
        taps: (module name, "input" | "output") pairs; "" names the model itself.
        max_rows: cap on rows per tap (token rows are sub-sampled to it).
        training_only: ignore forwards run in eval mode (the student); False for a frozen teacher.
        require_grad: ignore tap calls made with grad disabled while the model trains (reentrant
            activation checkpointing runs blocks under no_grad: such features could not train).
        seed: base seed of the sub-sampling; the step from `set_step` is added.
        positions: rows of (N, C, H, W) maps are the spatial positions (N*H*W rows), not the
            pooled images.

    Example:
        >>> cap = FeatureCapture(model, [("classifier", "input")])
        >>> _ = model(pixel_values); rows = cap.pop()["classifier"]  # (N, hidden)
        >>> cap.remove()

    Raises:
        ValueError: an unknown module name or side (the message lists names that exist).
    """

    def __init__(
        self,
        model: nn.Module,
        taps: Iterable[tuple[str, str]],
        *,
        max_rows: int = 1024,
        training_only: bool = True,
        require_grad: bool = True,
        seed: int = 0,
        positions: bool = False,
    ) -> None:
        self.model = model
        self.positions = positions
        self.taps = list(taps)
        if not self.taps:
            raise ValueError("FeatureCapture needs at least one (module name, side) tap.")
        self.max_rows = max_rows
        self.training_only = training_only
        self.require_grad = require_grad
        self.seed = seed
        self.step = 0
        self.features: dict[str, Tensor] = {}
        self.inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._open = False
        self._warned = False
        modules = dict(model.named_modules())
        self._handles = [
            model.register_forward_pre_hook(self._start, with_kwargs=True),
            model.register_forward_hook(self._stop, always_call=True),
        ]
        for name, side in self.taps:
            check_choice(f"the side of tap {name!r}", side, TAP_SIDES)
            if name not in modules:
                raise ValueError(f"No module named {name!r} in {type(model).__name__}; modules: {_available(model)}.")
            self._handles.append(modules[name].register_forward_hook(self._make_hook(name, side)))

    def set_step(self, step: int) -> None:
        """The training step, which seeds the row sub-sampling."""
        self.step = int(step)

    def _start(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # A nested call of the model inside its own forward must not reset the outer capture.
        if self._open:
            return
        self.features = {}
        self.inputs = None
        if self.training_only and not module.training:
            return
        if self.require_grad and not torch.is_grad_enabled():
            return  # a whole forward without grad (calibration, a no_grad check) is no training step
        self.inputs = (args, kwargs)
        self._open = True

    def _stop(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._open = False

    def _attention_mask(self) -> Tensor | None:
        if self.inputs is None:
            return None
        mask = self.inputs[1].get("attention_mask")
        return mask if isinstance(mask, Tensor) else None

    def _make_hook(self, name: str, side: str):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self._open:
                return  # eval forward, or a checkpoint recomputation after the forward returned
            if self.require_grad and not torch.is_grad_enabled():
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"Tap {name!r} ran with grad disabled during a training forward (reentrant "
                        "activation checkpointing?); its features cannot train and are ignored. "
                        "Use gradient_checkpointing_kwargs={'use_reentrant': False} or tap the head.",
                        stacklevel=2,
                    )
                return
            value = (args[0] if args else None) if side == "input" else output
            if isinstance(value, (tuple, list)):
                value = value[0] if value else None
            if not isinstance(value, Tensor):
                raise ValueError(f"Tap {name!r} ({side}) is not a tensor but {type(value).__name__}; tap another module.")
            # Keep the tensor as is: any op here would run inside a checkpointed region and change
            # the number of tensors it saves (checkpoint then fails on recomputation), so rows are
            # made in `pop`. Overwrite, never append: a module called twice keeps its last call.
            self.features[name] = value

        return hook

    @property
    def row_seed(self) -> int:
        """The seed of this step's row sub-sampling: `subsample_rows(t, max_rows, row_seed)` keeps
        the same rows of any tensor with as many rows (e.g. the batch labels)."""
        return self.seed + 1_000_003 * self.step

    def pop(self) -> dict[str, Tensor]:
        """The rows captured in the last forward, by tap name, as (m, d); capture is then empty.

        Raises:
            ValueError: a captured tensor whose shape cannot be turned into rows.
        """
        raw, self.features = self.features, {}
        mask = self._attention_mask()
        return {name: subsample_rows(to_rows(value, mask, positions=self.positions), self.max_rows, self.row_seed)
                for name, value in raw.items()}

    def clear(self) -> None:
        """Drop captured features and recorded inputs."""
        self.features = {}
        self.inputs = None

    def remove(self) -> None:
        """Remove every hook this capture registered."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()
