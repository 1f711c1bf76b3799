"""Pruning at initialization: one mask chosen before training, then trained as a static mask.

`method.name=snip|grasp|synflow|iter_snip|force|magnitude|random`; the criteria, their papers,
reference files and the deliberate differences are in `distsparse.methods.init_masks`.
"""
from __future__ import annotations

from distsparse.config import INIT_CRITERIA
from distsparse.methods.base import SparsityMethod, register

__all__ = ["PRUNING_AT_INIT"]


def _static_method(criterion: str) -> type[SparsityMethod]:
    """A static sparse method whose mask the criterion chooses at step 0."""
    cls = type(f"PruneAtInit_{criterion}", (SparsityMethod,), {
        "__doc__": f"Static mask chosen at initialization by {criterion}.",
        "defaults": {"init": criterion},
    })
    return register(criterion)(cls)


PRUNING_AT_INIT = {criterion: _static_method(criterion) for criterion in INIT_CRITERIA}
