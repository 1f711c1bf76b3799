"""The dense baseline: no mask, the same loop, for step-time and accuracy comparisons."""
from __future__ import annotations

from distsparse.methods.base import SparsityMethod, register

__all__ = ["Dense"]


@register("dense")
class Dense(SparsityMethod):
    """Trains every weight; reports sparsity 0."""

    uses_masks = False

    def initial_density(self) -> float:
        return 1.0
