"""Export and engines: ONNX export + verification (``onnx_export``, ``verify``), fp16 variants
(``fp16``), the TensorRT builder (``tensorrt``), ONNX Runtime sessions (``ort``), engine cache
keys and manifests (``cache``), and ``mar-rt build-engines`` (``build``).

Importing this package imports neither onnx, onnxruntime nor tensorrt; each module imports
them inside the functions that need them.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EngineKey": "mar_rt.export.cache",
    "EngineSet": "mar_rt.export.cache",
    "find_engine_set": "mar_rt.export.cache",
    "read_engine_set": "mar_rt.export.cache",
    "ExportOptions": "mar_rt.export.onnx_export",
    "export_bundle": "mar_rt.export.onnx_export",
    "export_graph": "mar_rt.export.onnx_export",
    "VerifyReport": "mar_rt.export.verify",
    "verify_graph": "mar_rt.export.verify",
    "Fp16Policy": "mar_rt.export.fp16",
    "convert_graph_to_fp16": "mar_rt.export.fp16",
    "export_fp16": "mar_rt.export.fp16",
    "TrtBuildOptions": "mar_rt.export.tensorrt",
    "build_plan": "mar_rt.export.tensorrt",
    "build_engine": "mar_rt.export.tensorrt",
    "BuildSummary": "mar_rt.export.build",
    "build_engines": "mar_rt.export.build",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mar_rt.export' has no attribute {name!r}")
