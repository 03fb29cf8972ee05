"""Deployment exports written from the trained integer codes (no re-quantization).

`export_gguf` writes a GGUF file for llama.cpp (needs the `export` extra: `gguf`).
"""

from .codes import LayerCodes, quantized_weights
from .gguf import ExportedTensor, GGUFExport, GGUFExportError, export_gguf

__all__ = ["ExportedTensor", "GGUFExport", "GGUFExportError", "LayerCodes", "export_gguf", "quantized_weights"]
