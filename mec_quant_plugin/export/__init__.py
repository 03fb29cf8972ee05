"""Deployment exports written from the trained integer codes (no re-quantization).

`export_gguf` writes a GGUF file for llama.cpp (needs the `export` extra: `gguf`).
`export_onnx` writes an ONNX file for ONNX Runtime (needs the `export-onnx` extra: `onnx`, `onnxruntime`).
"""

from .codes import LayerCodes, quantized_weights
from .gguf import ExportedTensor, GGUFExport, GGUFExportError, export_gguf
from .onnx import ExportedLayer, ONNXExport, ONNXExportError, export_onnx

__all__ = [
    "ExportedLayer",
    "ExportedTensor",
    "GGUFExport",
    "GGUFExportError",
    "LayerCodes",
    "ONNXExport",
    "ONNXExportError",
    "export_gguf",
    "export_onnx",
    "quantized_weights",
]
