"""Save, reload and push converted models through the standard Hugging Face APIs.

What a saved folder holds:
- `model.safetensors` + `config.json` written by transformers, whose `quantization_config` is a
  STANDARD torchao config (`IntxWeightOnlyConfig`), so plain `transformers` + `torchao` reload the
  int weights in a process that never imports this plugin (weight-only);
- `mec_quant_config.json`: our settings (MECQuantConfig) and, per layer, the activation bits and
  signedness needed to rebuild the activation quantizers, whose learned steps are in
  `mec_quant_activations.safetensors`; `from_pretrained` below reads both; plus the run facts the
  model card is written from, so a reloaded model saves again with the same card;
- `README.md`: a model card generated from the run.

A model whose weights all stayed float (weight_bits=None and float edge layers) gets no torchao
`quantization_config`: it is a plain transformers model plus our activation files. Otherwise the
advertised config names bits that some stored int weights really have (the body's).

A save is atomic as a whole: everything is written into a temporary sibling folder, which then
replaces the target (files of the target that are not part of a model, such as checkpoints, are
moved over); an interrupted or failed save (a full disk included) leaves the previous folder as it
was. `mec_quant_config.json` (format_version 2) holds a fingerprint: sha256 digests of the weights
files, of the activations file and of the canonical JSON of the quantization settings it was saved
with; `from_pretrained` refuses a folder whose files do not belong together or whose settings were
edited by hand (they would silently change the outputs), and a format_version it does not know.
The fingerprint guards against accidents (mixed saves, hand edits), not against someone who
recomputes it. Folders saved before fingerprints (format_version 1) still load. Non-finite weights
are never saved.

Why a wrapper around `save_pretrained` (set on the instance, so `Trainer.save_model` and
`push_to_hub`, which both call `model.save_pretrained`, write our files too): transformers'
tied-weight deduplication identifies tensors by storage pointer, which torchao's wrapper tensors
do not share, so a tied lm_head would be written twice and fail plain reload (`aten.equal` is not
implemented for `IntxUnpackedToInt8Tensor`); we drop the duplicate key ourselves. Both touches
of transformers internals live in `transformers_internals.py`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import MECQuantConfig
from ..modules.base import LEVELS_ATTR, FakeQuantizedModule
from ..modules.registry import fake_quantized_class_for
from ..quantized_embedding import use_gathering_embeddings
from ..quantizers import ActivationFakeQuantizer
from .model_card import EXPORTS_FILE, update_model_card, write_model_card
from .transformers_internals import (
    attach_torchao_quantizer,
    before_hub_upload,
    forget_load_only_conversions,
    wrap_save_pretrained,
)

logger = logging.getLogger("mec_quant_plugin")

MEC_CONFIG_FILE = "mec_quant_config.json"
ACTIVATIONS_FILE = "mec_quant_activations.safetensors"
FORMAT_VERSION = 2
# 1: no fingerprint, or `weights_fingerprint` (the weights files only); 2: `fingerprint` below.
SUPPORTED_FORMAT_VERSIONS = (1, 2)
_ACT_KEY = ".activation_fake_quantizer."


def standard_torchao_config(config: MECQuantConfig, bits: int | None = None) -> Any:
    """The `TorchAoConfig(IntxWeightOnlyConfig(...))` advertised in config.json.

    torchao's allowlist only reloads its own config classes, so we advertise the standard
    weight-only config at `bits` (default: the body's `config.weight_bits`); each tensor carries
    its own bits and block size.

    Raises:
        ValueError: no bits to advertise (`bits` and `config.weight_bits` both None): a model with
            float weights gets no torchao config (see `stored_weight_bits`).
    """
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup
    from transformers import TorchAoConfig

    bits = bits or config.weight_bits
    if bits is None:
        raise ValueError("standard_torchao_config needs int weight bits: weight_bits=None stores float weights, "
                         "which need no torchao config.")
    dtype = torch.int8 if bits == 8 else getattr(torch, f"int{bits}")
    per_group = config.weight_granularity == "per_group" and bits == config.weight_bits
    granularity = PerGroup(config.group_size) if per_group else PerAxis(0)
    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity))


def stored_weight_bits(model: nn.Module) -> Counter[int]:
    """How many layers store torchao int weights, per bit-width (empty: every weight is float)."""
    from torchao.utils import TorchAOBaseTensor

    found: Counter[int] = Counter()
    for mod in model.modules():
        weight = getattr(mod, "weight", None)
        if isinstance(weight, TorchAOBaseTensor):
            match = re.search(r"int(\d+)", str(getattr(weight, "target_dtype", "")))
            match = match or re.search(r"Int(\d+)", type(weight).__name__)
            if match:
                found[int(match.group(1))] += 1
    return found


def _advertised_bits(model: nn.Module, config: MECQuantConfig) -> int | None:
    """The body's bits when some layer stores them, else the most common stored bits, else None."""
    stored = stored_weight_bits(model)
    if not stored:
        return None
    return config.weight_bits if config.weight_bits in stored else stored.most_common(1)[0][0]


def activation_layout(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Per layer with an activation quantizer: its bits and requested signedness."""
    return {
        name: {"bits": mod.activation_fake_quantizer.bits, "signedness": mod.activation_fake_quantizer.signedness}
        for name, mod in model.named_modules()
        if isinstance(mod, FakeQuantizedModule) and mod.activation_fake_quantizer is not None
    }


def make_saveable(
    model: nn.Module, config: MECQuantConfig, *, run_info: dict[str, Any] | None = None
) -> nn.Module:
    """Attach the torchao quantizer transformers needs to save a converted model (none when every
    weight stayed float), and make its `save_pretrained` also write `mec_quant_config.json` and the
    model card (which `push_to_hub` keeps, merged into the repo's card).

    `run_info` feeds the model card: e.g. {"base_model": ..., "task": ..., "metrics": {...},
    "dataset": ...}. Call after `convert_model`. A plain nn.Module without `save_pretrained`
    (e.g. the EfficientNet-Lite0 recipe's) only gets the config attached; save it with
    `torch.save(model.state_dict(), ...)` plus `write_mec_files(model, folder)`.

    Raises:
        ValueError: the model still holds weight fake quantizers (convert it first).
    """
    if any(isinstance(m, FakeQuantizedModule) and m.weight_fake_quantizer is not None for m in model.modules()):
        raise ValueError("make_saveable needs a converted model: call convert_model(model) first.")
    if hasattr(model, "config"):
        bits = _advertised_bits(model, config)
        if bits is not None:
            attach_torchao_quantizer(model, standard_torchao_config(config, bits), _TiedFreeView)
        forget_load_only_conversions(model)
    model.__dict__["_mec_quant_config"] = config
    model.__dict__["_mec_quant_run_info"] = dict(run_info or {})
    if hasattr(model, "save_pretrained"):
        wrap_save_pretrained(model, save_atomically)
    if hasattr(model, "push_to_hub"):  # it writes the repo's card (or a template) over ours: merge ours in
        before_hub_upload(model, lambda folder: update_model_card(model, Path(folder) / "README.md"))
    return model


class _TiedFreeView:
    """Stands in for the model where torchao's saver calls `model.state_dict()`: the same dict
    without the second name of a tied weight (transformers re-ties it on load)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        # Activation steps live in their own file (see write_mec_files), keyed by OUR module
        # names: transformers may rename keys to a checkpoint's original format on save.
        state = {k: v for k, v in self._model.state_dict().items() if _ACT_KEY not in k}
        owner: dict[int, str] = {}
        for name, param in self._model.named_parameters(remove_duplicate=False):
            if id(param) in owner and name in state:
                del state[name]
            owner.setdefault(id(param), name)
        return state


# What a save writes: left out when the other files of a folder saved over are moved over.
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json", "README.md")


def _is_model_file(name: str) -> bool:
    return name in _MODEL_FILES or name in (MEC_CONFIG_FILE, ACTIVATIONS_FILE) or (
        name.startswith("model") and name.endswith(".safetensors"))


def _exported_files(folder: Path) -> set[str]:
    """The files `mec-quant convert --format` exported from this folder's weights (listed in
    mec_quant_exports.json), with that record: they belong to the weights, not to the folder."""
    record = folder / EXPORTS_FILE
    if not record.is_file():
        return set()
    try:
        entries = json.loads(record.read_text()).get("files", [])
        names = {Path(str(e["file"])).name for e in entries if isinstance(e, dict) and "file" in e}
    except (json.JSONDecodeError, AttributeError):
        names = set()
    return {EXPORTS_FILE} | {n for n in names if (folder / n).is_file()}


def _non_finite(model: nn.Module) -> list[str]:
    """Names of state-dict entries holding NaN/inf (the inner tensors of torchao tensors included)."""
    bad = []
    for name, value in model.state_dict().items():
        parts = [value]
        if hasattr(value, "__tensor_flatten__"):
            parts = [getattr(value, attr) for attr in value.__tensor_flatten__()[0]]
        if any(p.is_floating_point() and not bool(torch.isfinite(p).all()) for p in parts if isinstance(p, torch.Tensor)):
            bad.append(name)
    return bad


def _files_digest(files: list[Path]) -> str | None:
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with file.open("rb") as f:
            digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def weights_fingerprint(folder: str | os.PathLike) -> str | None:
    """sha256 over the folder's `model*.safetensors` files (names and bytes); None when there are none."""
    return _files_digest(sorted(p for p in Path(folder).glob("model*.safetensors") if p.is_file()))


# The parts of mec_quant_config.json that decide the model's outputs (run_info only feeds the card).
_SETTINGS_KEYS = ("format_version", "mec_quant_config", "activation_quantizers", "float_weight_levels")


def fingerprint(folder: str | os.PathLike, meta: dict[str, Any]) -> dict[str, str | None]:
    """The digests format_version 2 stores: `weights` (see `weights_fingerprint`), `activations`
    (mec_quant_activations.safetensors) and `settings` (sha256 of the canonical JSON, sorted keys
    and no spaces, of `meta`'s format_version, mec_quant_config, activation_quantizers and
    float_weight_levels)."""
    settings = json.dumps({k: meta.get(k) for k in _SETTINGS_KEYS}, sort_keys=True, separators=(",", ":"))
    activations = Path(folder) / ACTIVATIONS_FILE
    return {
        "weights": weights_fingerprint(folder),
        "activations": _files_digest([activations] if activations.is_file() else []),
        "settings": hashlib.sha256(settings.encode()).hexdigest(),
    }


def save_atomically(model: nn.Module, write_weights: Callable[[str | os.PathLike], Any],
                    save_directory: str | os.PathLike) -> Any:
    """Save a whole model folder or nothing: `write_weights(tmp)` (transformers' save) and our files
    go into a temporary sibling folder, which then takes the target's place; the target's files that
    belong to no model (checkpoints, the CLI's run files, notes) are moved into the new folder.

    Raises:
        ValueError: non-finite weights or step sizes (checked before anything is written).
        OSError: errno ENOSPC with a message saying the disk is full and nothing was changed.
    """
    bad = _non_finite(model)
    if bad:
        raise ValueError(f"refusing to save non-finite (NaN/inf) weights or step sizes: {', '.join(bad[:5])}"
                         f"{' ...' if len(bad) > 5 else ''}; nothing was written.")
    target = Path(save_directory).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.mec-saving-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        result = write_weights(tmp)
        write_mec_files(model, tmp, name=target.name)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the device while saving to {target}: nothing was changed "
                          "(the partial copy was removed); free some space and save again.") from exc
        raise
    if not target.exists():
        os.replace(tmp, target)
        return result
    old = target.parent / f".{target.name}.mec-replaced-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    os.replace(tmp, target)  # between these two renames the complete old folder is `old`
    stale = _exported_files(old)
    if stale:
        logger.warning("%s: dropped %s, exported from the weights this save replaces; export the new weights again "
                       "(mec-quant convert --format ...).", target, ", ".join(sorted(stale - {EXPORTS_FILE})))
    for item in old.iterdir():
        if not _is_model_file(item.name) and item.name not in stale and not (target / item.name).exists():
            os.replace(item, target / item.name)
    shutil.rmtree(old, ignore_errors=True)
    return result


def write_mec_files(model: nn.Module, save_directory: str | os.PathLike, *, name: str | None = None) -> None:
    """Write `mec_quant_activations.safetensors`, `mec_quant_config.json` (with the fingerprint of
    the weights files already in the folder, if any) and README.md (titled `name`, default the
    folder's name)."""
    config: MECQuantConfig = model.__dict__.get("_mec_quant_config") or MECQuantConfig()
    run_info = model.__dict__.get("_mec_quant_run_info", {})
    path = Path(save_directory)
    path.mkdir(parents=True, exist_ok=True)
    act_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if _ACT_KEY in k}
    # Each file is written under a temporary name and renamed: a killed save leaves the previous
    # file or none, never half a file.
    tmp = path / (ACTIVATIONS_FILE + ".tmp")
    save_file(act_state, str(tmp))
    os.replace(tmp, path / ACTIVATIONS_FILE)
    payload: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "mec_quant_config": config.to_dict(),
        "activation_quantizers": activation_layout(model),
        # layers whose converted weight stays float holding the levels (GPT-2's Conv1D), for the report
        "float_weight_levels": {n: m.__dict__[LEVELS_ATTR] for n, m in model.named_modules() if LEVELS_ATTR in m.__dict__},
        "run_info": json.loads(json.dumps(run_info, default=str)),
    }
    payload["fingerprint"] = fingerprint(path, payload)
    tmp = path / (MEC_CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    os.replace(tmp, path / MEC_CONFIG_FILE)
    write_model_card(model, config, run_info, path, name=name)


def restore_activation_quantizers(model: nn.Module, folder: str | os.PathLike) -> int:
    """Rebuild the activation quantizers listed in `mec_quant_config.json` and load their learned
    steps from the safetensors files; returns how many layers were restored.

    Raises:
        FileNotFoundError: the folder has no mec_quant_config.json (not saved by this plugin).
        ValueError: an unknown format_version, files that do not belong together or edited
            settings (see `read_mec_metadata`); a listed layer is missing from the model or of an
            unsupported type.
    """
    return _restore_activation_quantizers(model, Path(folder), read_mec_metadata(folder))


def _restore_activation_quantizers(model: nn.Module, folder: Path, meta: dict[str, Any]) -> int:
    layout: dict[str, dict[str, Any]] = meta.get("activation_quantizers", {})
    tensors = load_file(str(folder / ACTIVATIONS_FILE)) if layout else {}
    for name, spec in layout.items():
        try:
            layer = model.get_submodule(name)
        except AttributeError as exc:
            raise ValueError(f"Saved activation quantizer for {name!r}, but the model has no such layer.") from exc
        if not isinstance(layer, FakeQuantizedModule):
            fq_cls = fake_quantized_class_for(layer)
            if fq_cls is None:
                raise ValueError(f"Layer {name!r} ({type(layer).__name__}) cannot carry an activation quantizer.")
            layer = fq_cls.from_float(layer, weight_bits=None, act_bits=spec["bits"], act_signedness=spec["signedness"])
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        afq: ActivationFakeQuantizer = layer.activation_fake_quantizer
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".activation_fake_quantizer.")}
        afq.load_state_dict(state)
    for name, levels in meta.get("float_weight_levels", {}).items():
        model.get_submodule(name).__dict__[LEVELS_ATTR] = levels
    return len(layout)


def model_class_from_config(folder: str | os.PathLike) -> type[nn.Module]:
    """The transformers model class named by `architectures` in the folder's config.json.

    Example:
        >>> model_class_from_config("out/checkpoint-500")
        <class 'transformers.models.resnet.modeling_resnet.ResNetForImageClassification'>

    Raises:
        FileNotFoundError: the folder has no config.json.
        ValueError: config.json names no architecture transformers knows.
    """
    import transformers

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a Hugging Face model folder.")
    archs = json.loads(path.read_text()).get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ValueError(f"config.json of {folder} names architectures={archs}; expected a transformers model class.")
    return cls


def read_mec_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """`mec_quant_config.json` of a saved folder, once its format_version is known and its
    fingerprint matches the folder's files and its own settings.

    Raises:
        FileNotFoundError: the folder has no mec_quant_config.json (not saved by this plugin).
        ValueError: a format_version this plugin does not read; a fingerprint that does not match
            (files of two saves mixed, or settings edited by hand after saving).
    """
    meta_path = Path(folder) / MEC_CONFIG_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: the folder was not saved by mec_quant_plugin.")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path} is not valid JSON ({exc}): it was damaged or edited by hand; save the "
                         "model again.") from exc
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:
        raise ValueError(
            f"{meta_path} has format_version {version!r}; this mec_quant_plugin reads format_version "
            f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}. A newer plugin may have saved it: upgrade "
            "mec-quant-plugin.")
    mixed = (f"do not belong to the weights (model*.safetensors) next to them in {folder}: the folder mixes two "
             "saves; save the model again.")
    if version == 1:
        expected = meta.get("weights_fingerprint")
        if expected is not None and weights_fingerprint(folder) != expected:
            raise ValueError(f"{MEC_CONFIG_FILE} and {ACTIVATIONS_FILE} {mixed}")
        if expected is None:
            logger.info("%s was saved before fingerprints (format_version 1): its files cannot be checked.", meta_path)
        return meta
    expected = meta.get("fingerprint")
    if not isinstance(expected, dict):
        raise ValueError(f"{meta_path} (format_version {version}) has no fingerprint: it was edited by hand; "
                         "save the model again.")
    actual = fingerprint(folder, meta)
    if actual["settings"] != expected.get("settings"):
        raise ValueError(
            f"The quantization settings in {meta_path} (mec_quant_config, activation_quantizers) were changed after "
            "saving: they no longer match their fingerprint. The weights and activation steps were trained with the "
            "saved settings, so edited ones would silently change the outputs. Restore the file; to change the bits, "
            "prepare and train the model again.")
    if actual["activations"] != expected.get("activations"):
        raise ValueError(f"{ACTIVATIONS_FILE} {mixed}")
    if actual["weights"] != expected.get("weights"):
        raise ValueError(f"{MEC_CONFIG_FILE} and {ACTIVATIONS_FILE} {mixed}")
    return meta


def check_fingerprint(folder: str | os.PathLike) -> None:
    """Raise ValueError when the folder's plugin files do not belong together or to the weights,
    when its settings were edited after saving, or when its format_version is unknown (see
    `read_mec_metadata`); a folder without `mec_quant_config.json` passes (not the plugin's)."""
    if (Path(folder) / MEC_CONFIG_FILE).is_file():
        read_mec_metadata(folder)


def from_pretrained(path_or_repo_id: str, **kwargs: Any) -> nn.Module:
    """Load a model saved by this plugin, restoring the learned activation quantizers too.

    The model class comes from config.json (`architectures`), like the Auto classes; the folder
    may be local or a Hub repo id (downloaded with huggingface_hub). `trust_remote_code` stays
    off unless passed.

    Example:
        >>> model = mec_quant_plugin.from_pretrained("user/resnet-w2a2-mec")

    The model comes back ready to save again (`make_saveable` with the saved settings and run
    facts): `save_pretrained` writes the same kind of folder.

    Raises:
        FileNotFoundError: the folder has no mec_quant_config.json (not saved by this plugin).
        ValueError: config.json names no architecture transformers knows; the plugin's files do
            not belong together, their settings were edited after saving, or their format_version
            is unknown (see `read_mec_metadata`). Checked before any weight is loaded.
    """
    folder = Path(path_or_repo_id)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path_or_repo_id, allow_patterns=["*.json", "*.safetensors", "*.md"]))
        # only safetensors and JSON are fetched: nothing is ever unpickled
    cls = model_class_from_config(folder)
    meta = read_mec_metadata(folder)
    kwargs.setdefault("trust_remote_code", False)
    model = cls.from_pretrained(str(folder), **kwargs)
    _restore_activation_quantizers(model, folder, meta)
    use_gathering_embeddings(model)  # quantized embeddings dequantize only the rows they look up
    make_saveable(model, MECQuantConfig.from_dict(meta["mec_quant_config"]), run_info=meta.get("run_info"))
    return model.eval()
