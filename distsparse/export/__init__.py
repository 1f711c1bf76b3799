"""Export trained sparse models: a compact safetensors layout (`load_sparse` reads it with only
safetensors and torch), a dense safetensors state dict, or ONNX checked against onnxruntime.

`export_model(model, masks, out, format=...)` writes a model you hold; `export_run` (in
`distsparse.export.runs`) a run directory. Attributes are imported on first use, so that the
command line can build its parser without torch.
"""
from typing import Any

__all__ = ["ExportError", "export_model", "export_run", "load_sparse"]

_HOMES = {"ExportError": "files", "export_model": "writer", "export_run": "runs",
          "load_sparse": "sparse_format"}


def __getattr__(name: str) -> Any:
    """Import `name` from its module on first use."""
    if name not in _HOMES:
        raise AttributeError(f"module 'distsparse.export' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"distsparse.export.{_HOMES[name]}"), name)
