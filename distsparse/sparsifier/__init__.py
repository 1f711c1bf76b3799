"""The library API: `Sparsifier` makes any model sparse from the user's own training loop."""
from distsparse.sparsifier.core import MaskUpdate, Sparsifier

__all__ = ["MaskUpdate", "Sparsifier"]
