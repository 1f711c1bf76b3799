"""Scores that rank connections: larger means more worth keeping (drop) or adding (grow)."""
from __future__ import annotations

import torch

from distsparse.sparsity.counter_rng import random_bits

__all__ = ["gradient_scores", "magnitude_scores", "random_scores"]


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|w|: magnitude pruning's criterion."""
    return weight.detach().abs()


def gradient_scores(grad: torch.Tensor) -> torch.Tensor:
    """|g| of the dense gradient: RigL's and GraNet's growth criterion."""
    return grad.detach().abs()


def random_scores(
    shape: torch.Size | tuple[int, ...],
    seed: int,
    step: int,
    layer: str,
    purpose: str,
    device: torch.device | str = "cpu",
    offset: int = 0,
) -> torch.Tensor:
    """Counter-based uniform scores for a layer (global indices offset .. offset + numel - 1)."""
    numel = 1
    for dim in shape:
        numel *= dim
    indices = torch.arange(offset, offset + numel, device=device, dtype=torch.int64)
    return random_bits(seed, step, layer, purpose, indices).view(shape)
