"""distsparse: distributed training of sparse neural networks.

`distsparse.Sparsifier` applies any of its sparsity methods to any model from your own loop;
`distsparse.export_model` writes a model and its masks as sparse safetensors (read back with
`distsparse.load_sparse`), dense safetensors or ONNX.
"""
from typing import Any

__version__ = "0.1.0"
__all__ = ["Sparsifier", "__version__", "export_model", "load_sparse"]


def __getattr__(name: str) -> Any:
    """Import the API on first use, so that `import distsparse` stays light."""
    if name == "Sparsifier":
        from distsparse.sparsifier import Sparsifier

        return Sparsifier
    if name in ("export_model", "load_sparse"):
        from distsparse import export

        return getattr(export, name)
    raise AttributeError(f"module 'distsparse' has no attribute {name!r}")
