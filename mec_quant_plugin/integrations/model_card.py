"""The model card (README.md of a saved folder), generated from the run.

The YAML header is written by huggingface_hub's `ModelCardData` (a YAML library quotes every
string, so a base model or dataset name holding ": " or a newline cannot break it). The plugin's
part of the body sits between `SECTION_START` and `SECTION_END`, so `update_model_card` can merge
it into a card someone else wrote, e.g. the one `Trainer.create_model_card()` writes over ours
(`Trainer.push_to_hub()` calls it before uploading).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from torch import nn

from ..config import MECQuantConfig
from ..options import bits_label
from ..report import FLOAT, LayerGroup, quantization_groups

SECTION_START = "<!-- mec-quant-plugin: start (written by mec_quant_plugin; regenerated on save) -->"
SECTION_END = "<!-- mec-quant-plugin: end -->"
TAGS = ("mec-quant", "torchao", "qat")
_PACKAGE = "mec-quant-plugin"
# Deployment files exported beside the saved model (`mec-quant convert --format gguf|onnx`), listed in the card.
EXPORTS_FILE = "mec_quant_exports.json"
EXPORTS_HEADING = "### Exported files (deployment)"


def project_url() -> str | None:
    """The package's own page as declared in its metadata (`[project.urls]` of pyproject.toml:
    Repository, Source or Homepage first), or None when it declares none: the card links only to
    a page that exists."""
    try:
        meta = metadata.metadata(_PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    urls = {}
    for entry in meta.get_all("Project-URL") or []:
        label, _, url = entry.partition(",")
        urls[label.strip().lower()] = url.strip()
    for label in ("repository", "source", "homepage", "home"):
        if urls.get(label, "").startswith("https://"):
            return urls[label]
    home = meta.get("Home-page") or ""
    return home if home.startswith("https://") else None


def _inline(text: Any) -> str:
    """`text` on one Markdown line: whitespace runs (newlines included) become one space and
    backticks quotes, so it can neither start a line of its own nor close a code span."""
    return " ".join(str(text).split()).replace("`", "'")


def _cell(text: Any) -> str:
    return _inline(text).replace("|", "\\|")


def _fenced(lang: str, text: str) -> list[str]:
    """A fenced code block longer than any backtick run inside `text` (which cannot close it)."""
    fence = "`" * max(3, 1 + max((len(run) for run in re.findall(r"`+", text)), default=0))
    return [fence + lang, text, fence]


def _python_str(text: Any) -> str:
    """A Python string literal of `text` (JSON's escapes are valid Python; backticks escaped too)."""
    return json.dumps(str(text)).replace("`", "\\u0060")


def _has_low_bit_activations(groups: list[LayerGroup]) -> bool:
    return any(g.bits != FLOAT and not g.bits.endswith("Afloat") for g in groups)


def quantization_section(model: nn.Module, config: MECQuantConfig, run_info: dict[str, Any], name: str) -> str:
    """The plugin's part of the card (between the markers): per layer group what is stored and
    how (the lines of `quantization_report`), the settings, metrics, and how to load the model."""
    base = run_info.get("base_model")
    task = run_info.get("task")
    metrics = run_info.get("metrics") or {}
    repo = run_info.get("repo_id") or name
    groups = quantization_groups(model)
    url = project_url()
    plugin = f"[{_PACKAGE}]({url})" if url else f"`{_PACKAGE}`"
    lines = [
        SECTION_START,
        f"## MEC-Quant quantization: {bits_label(config.weight_bits, config.act_bits, ternary=config.ternary)}",
        "",
        f"Quantization-aware trained with {plugin}"
        + (f" from `{_inline(base)}`" if base else "")
        + (f" for {_inline(task)}" if task else "")
        + ".",
        "",
        "### What each layer group stores",
        "",
        "| bits | layers | stored as | examples |",
        "|---|---|---|---|",
    ]
    for g in groups:
        shown = ", ".join(g.names[:3]) + (" ..." if len(g.names) > 3 else "")
        lines.append(f"| {g.bits} | {len(g.names)} | {_cell(g.storage)} | {_cell(shown)} |")
    lines.append("")
    if any("holding the" in g.storage for g in groups):
        lines += [
            "Layers without a torchao int kernel (e.g. GPT-2's `Conv1D`) keep float weights that hold exactly the",
            "quantized levels: they reproduce the quantized model but take float space on disk and in memory.",
            "",
        ]
    lines += ["### Method and objective settings", "", *_fenced("json", config.to_json()), ""]
    if metrics:
        lines += ["### Metrics (from the Trainer)", "", "| metric | value |", "|---|---|"]
        for k, v in sorted(metrics.items()):
            lines.append(f"| {_cell(k)} | {v:.4f} |" if isinstance(v, float) else f"| {_cell(k)} | {_cell(v)} |")
        lines.append("")
    int_weights = any(g.storage.startswith("int") for g in groups)
    lines += [
        "### How to load",
        "",
        "With the plugin (int weights AND the learned low-bit activation quantizers, reproducing the",
        "trained model's outputs):",
        "",
        *_fenced("python", f"import mec_quant_plugin\nmodel = mec_quant_plugin.from_pretrained({_python_str(repo)})"),
        "",
        "Without the plugin (plain transformers" + (" + torchao" if int_weights else "") + "):",
        "",
        *_fenced("python", "from transformers import AutoModel  # or the task's Auto class\n"
                 f"model = AutoModel.from_pretrained({_python_str(repo)})"),
        "",
    ]
    if _has_low_bit_activations(groups):
        lines += [
            "> **Warning:** this model was trained with low-bit activations. Loaded without the plugin it",
            "> runs WEIGHT-ONLY (activations in float), which is not the trained model: its accuracy can",
            "> differ. Load it with `mec_quant_plugin.from_pretrained` to reproduce the trained numerics.",
            "",
        ]
    extra = {k: v for k, v in run_info.items() if k != "metrics"}
    if extra:
        lines += ["### Run", "", *_fenced("json", json.dumps(extra, indent=2, sort_keys=True, default=str)), ""]
    lines.append(SECTION_END)
    return "\n".join(lines)


def _exports_lines(folder: Path) -> list[str]:
    """The card's listing of the files in `folder/mec_quant_exports.json` that exist: file, format,
    size and how to run each (empty when there are none)."""
    try:
        entries = json.loads((folder / EXPORTS_FILE).read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return []
    entries = [e for e in entries if isinstance(e, dict) and (folder / str(e.get("file", ""))).is_file()]
    if not entries:
        return []
    lines = [EXPORTS_HEADING, "", "| file | format | size | runs with |", "|---|---|---|---|"]
    for e in entries:
        runner = "llama.cpp" if e.get("format") == "gguf" else "ONNX Runtime"
        size = (folder / e["file"]).stat().st_size
        lines.append(f"| `{_cell(e['file'])}` | {_cell(e.get('format'))} | {size / 1e6:.2f} MB | {runner} |")
    lines += ["", "Written from the trained integer codes (no re-quantization). Runtimes execute the weights with",
              "their own 8-bit or float activations, not the trained low-bit activation quantizers.", ""]
    for e in entries:
        name = str(e["file"])
        if e.get("format") == "gguf":
            tool = "llama-embedding" if e.get("runner") == "llama-embedding" else "llama-cli"
            lines += [f"`{_inline(name)}` with llama.cpp:", "",
                      *_fenced("sh", f'{tool} -m {name} -p "Once upon a time"'), ""]
        elif e.get("format") == "onnx":
            inputs = [str(i) for i in e.get("inputs") or ["input_ids", "attention_mask"]]
            feeds = ", ".join(f"{json.dumps(i)}: {i}" for i in inputs)
            lut = ('so.add_session_config_entry("mlas.use_lut_gemm", "1")  # fast 2-bit kernel; it quantizes the '
                   "activations (omit it for outputs equal to torch's)\n") if 2 in (e.get("bits") or []) else ""
            code = ("import onnxruntime\nso = onnxruntime.SessionOptions()\n" + lut
                    + f"session = onnxruntime.InferenceSession({_python_str(name)}, so, "
                    + 'providers=["CPUExecutionProvider"])\n'
                    + f"output = session.run(None, {{{feeds}}})[0]  # numpy arrays: int64 ids / float32 pixels")
            lines += [f"`{_inline(name)}` with ONNX Runtime:", "", *_fenced("python", code), ""]
    return lines


def _with_exports(section: str, folder: Path) -> str:
    """`section` with its exported-files listing (replaced, or inserted before `SECTION_END`)."""
    head = section.partition(EXPORTS_HEADING)[0] if EXPORTS_HEADING in section else section.partition(SECTION_END)[0]
    listing = _exports_lines(folder)
    return head.rstrip("\n") + "\n\n" + ("\n".join(listing) + "\n" if listing else "") + SECTION_END


def refresh_exports_listing(folder: str | os.PathLike) -> None:
    """Rewrite the exported-files listing in the plugin's section of `folder/README.md` from
    `folder/mec_quant_exports.json`, keeping the rest of the card; a card without the plugin's
    section gets none added (nothing to attach it to)."""
    folder = Path(folder)
    path = folder / "README.md"
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    if SECTION_START not in text or SECTION_END not in text:
        return
    before, _, rest = text.partition(SECTION_START)
    section, _, after = rest.partition(SECTION_END)
    _write_atomically(path, before + _with_exports(SECTION_START + section + SECTION_END, folder) + after)


def _card_data(run_info: dict[str, Any], existing: dict[str, Any] | None = None) -> Any:
    """The YAML header's data: `existing` (another writer's header) kept, our tags added, and
    base model / task / dataset filled in where it names none."""
    from huggingface_hub import ModelCardData

    data = dict(existing or {})
    data["tags"] = list(dict.fromkeys([*(data.get("tags") or []), *TAGS]))
    data.setdefault("library_name", "transformers")
    if run_info.get("base_model") and not data.get("base_model"):
        data["base_model"] = str(run_info["base_model"])
    if run_info.get("task") and not data.get("pipeline_tag"):
        data["pipeline_tag"] = str(run_info["task"])
    dataset = run_info.get("dataset")
    if dataset and not data.get("datasets"):
        data["datasets"] = [str(d) for d in dataset] if isinstance(dataset, (list, tuple)) else [str(dataset)]
    return ModelCardData(**data)


def _card_text(data: Any, body: str) -> str:
    return f"---\n{data.to_yaml()}\n---\n\n{body.strip()}\n"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_model_card(model: nn.Module, config: MECQuantConfig, run_info: dict[str, Any], folder: Path,
                     *, name: str | None = None) -> None:
    """Write `folder/README.md`: the YAML header (tags, base model, task, dataset) and the plugin's
    section; `name` (default: the folder's) titles it and stands for the repo id in the examples."""
    name = name or folder.name or "model"
    title = f"# {_inline(name)}"
    body = f"{title}\n\n{_with_exports(quantization_section(model, config, run_info, name), folder)}"
    _write_atomically(folder / "README.md", _card_text(_card_data(run_info), body))


def update_model_card(model: nn.Module, readme: str | os.PathLike) -> None:
    """Put the plugin's section and tags into the card at `readme`, keeping what another writer
    put there (`Trainer.create_model_card()` writes its card over ours); the section replaces an
    earlier one, goes before the card's first `## ` heading, or at the end. A model that
    `make_saveable` has not prepared for saving leaves the card alone; a missing card is created.
    """
    from huggingface_hub import ModelCard

    config: MECQuantConfig | None = model.__dict__.get("_mec_quant_config")
    if config is None:
        return
    run_info = model.__dict__.get("_mec_quant_run_info", {})
    path = Path(readme)
    body, existing = "", {}
    if path.is_file():
        card = ModelCard(path.read_text(encoding="utf-8"), ignore_metadata_errors=True)
        body, existing = card.text, card.data.to_dict()
    section = _with_exports(quantization_section(model, config, run_info, run_info.get("repo_id") or path.parent.name),
                            path.parent)
    if SECTION_START in body and SECTION_END in body:
        head, _, rest = body.partition(SECTION_START)
        body = head + section + rest.partition(SECTION_END)[2]
    else:
        match = re.search(r"^## ", body, flags=re.M)
        at = match.start() if match else len(body)
        body = body[:at].rstrip() + "\n\n" + section + "\n\n" + body[at:].lstrip()
    _write_atomically(path, _card_text(_card_data(run_info, existing), body))
