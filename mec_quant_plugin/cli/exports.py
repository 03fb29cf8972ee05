"""`mec-quant convert --format gguf|onnx` and `--push-to-hub`: the deployment files beside a saved
(torchao) model folder.

`export_to(folder, fmt, out_dir)` writes `out_dir/model.gguf` (llama.cpp) or `out_dir/model.onnx`
(ONNX Runtime) from the folder's own codes (`mec_quant_plugin.export_gguf` / `export_onnx`). When
`out_dir` is the model folder itself, the file is recorded in `mec_quant_exports.json` (kept apart
from `mec_quant_config.json`, whose fingerprint must not change) and listed in the model card
(README.md). `push_folder` uploads the folder's top-level files (the torchao model, its processor
files, the exported files and the card; never training checkpoints or pickles) to a Hub repo.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from ..integrations.model_card import EXPORTS_FILE, refresh_exports_listing
from .common import CLIError, first_line

FORMATS = ("torchao", "gguf", "onnx")
FILE_NAMES = {"gguf": "model.gguf", "onnx": "model.onnx"}
EXTRAS = {"gguf": ("gguf", "mec-quant-plugin[export]"), "onnx": ("onnx", "mec-quant-plugin[export-onnx]")}
_DECODER_HINTS = ("CausalLM", "Seq2Seq", "ConditionalGeneration")
# Never uploaded: pickles (training_args.bin, optimizer states) and the like.
_NOT_PUSHED = (".bin", ".pt", ".pth", ".pkl", ".tmp")


def _model_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CLIError(f"{path}: {first_line(exc)}; not a saved model folder.") from exc


def check_supported(folder: Path, fmt: str, out_dir: Path | None = None) -> None:
    """Refuse, before loading anything, a format whose exporter or extra is missing for this model,
    or whose file already exists in `out_dir`.

    Raises:
        CLIError: the optional extra is not installed, the architecture has no exporter for `fmt`, or
            `out_dir` already holds the file (nothing is overwritten).
    """
    import importlib.util

    target = out_dir / FILE_NAMES[fmt] if out_dir is not None else None
    if target is not None and target.exists():
        raise CLIError(f"{target} exists: remove it or choose another --output-dir (nothing is overwritten).")

    package, extra = EXTRAS[fmt]
    if importlib.util.find_spec(package) is None:
        raise CLIError(f"--format {fmt} needs the `{package}` package: pip install '{extra}'.")
    cfg = _model_config(folder)
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures") or [str(model_type)]
    if fmt == "gguf":
        from ..export.gguf_layouts import LAYOUTS

        if model_type not in LAYOUTS:
            raise CLIError(f"--format gguf writes model types {sorted(LAYOUTS)} (Llama-family causal LMs and "
                           f"BERT-family encoders), not {model_type!r} ({archs[0]}); --format onnx exports encoders "
                           "and ViT.")
    elif any(hint in arch for arch in archs for hint in _DECODER_HINTS) or cfg.get("is_decoder"):
        raise CLIError(f"--format onnx exports encoders (BERT family) and ViT, not the decoder {archs[0]}; "
                       "--format gguf writes Llama-family causal LMs.")


def read_exports(folder: Path) -> list[dict[str, Any]]:
    """The entries of `folder/mec_quant_exports.json` (empty when there is none)."""
    path = folder / EXPORTS_FILE
    if not path.is_file():
        return []
    try:
        return list(json.loads(path.read_text()).get("files", []))
    except (json.JSONDecodeError, AttributeError):
        return []


def _record(folder: Path, entry: dict[str, Any]) -> None:
    entries = [e for e in read_exports(folder) if e.get("file") != entry["file"]] + [entry]
    tmp = folder / f".{EXPORTS_FILE}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.write_text(json.dumps({"format_version": 1, "files": entries}, indent=2, sort_keys=True))
    os.replace(tmp, folder / EXPORTS_FILE)


def export_to(folder: Path, fmt: str, out_dir: Path) -> tuple[Path, str]:
    """Export the saved model `folder` as `fmt` into `out_dir`; returns (file, summary text).

    Raises:
        CLIError: a missing extra, an unsupported architecture, an existing file, or a layer the
            exporter cannot write exactly (the exporter's message).
    """
    check_supported(folder, fmt, out_dir)
    target = out_dir / FILE_NAMES[fmt]
    model_type = _model_config(folder).get("model_type")
    try:
        if fmt == "gguf":
            from ..export.gguf import export_gguf

            result = export_gguf(str(folder), target)
            entry = {"format": "gguf", "types": result.type_counts(),
                     "runner": "llama-embedding" if model_type == "bert" else "llama-cli"}
        else:
            from ..export.onnx import export_onnx

            result = export_onnx(str(folder), target)
            entry = {"format": "onnx", "inputs": result.input_names,
                     "bits": sorted({layer.bits for layer in result.layers if layer.bits is not None})}
    except (ImportError, ValueError, FileNotFoundError) as exc:
        raise CLIError(f"--format {fmt}: {first_line(exc)}") from exc
    if out_dir.resolve() == folder.resolve():
        _record(folder, {"file": target.name, "bytes": target.stat().st_size, "model_type": model_type, **entry})
        refresh_exports_listing(folder)
    return target, result.summary()


def push_folder(folder: Path, repo_id: str) -> list[str]:
    """Upload the top-level files of the saved model `folder` (torchao files, processor files,
    exported files, model card) to the Hub repo `repo_id` (created if needed); returns their names.
    Sub-folders (training checkpoints) and pickles are left out."""
    from huggingface_hub import HfApi

    names = sorted(p.name for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_NOT_PUSHED))
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=names,
                      commit_message="Upload MEC-Quant model and exported files")
    return names
