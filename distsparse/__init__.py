"""distsparse: distributed training of sparse neural networks.

`distsparse.Sparsifier` applies any of its sparsity methods to any model from your own loop.
"""
from typing import Any

__version__ = "0.1.0"
__all__ = ["Sparsifier", "__version__"]


def __getattr__(name: str) -> Any:
    """Import the API on first use, so that `import distsparse` stays light."""
    if name == "Sparsifier":
        from distsparse.sparsifier import Sparsifier

        return Sparsifier
    raise AttributeError(f"module 'distsparse' has no attribute {name!r}")
