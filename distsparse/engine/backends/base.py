"""The wrapping seam: how the trainer builds, steps through and checkpoints the model's wrapper.

A backend wraps the model (nothing, DDP, a DeepSpeed engine, FSDP2's `fully_shard`) and builds the
optimizer from a factory at the moment its wrapper needs it (FSDP2 replaces the parameters by
sharded ones, so its optimizer comes after wrapping; the others' before), backpropagates through
the wrapper, reads the full model state and checkpoints in the wrapper's format (its
`checkpointer`). What masks need of the wrapper (the owned pieces of the weights, every copy to
mask, the optimizer step) is its `access`, which the trainer hands to its Sparsifier, as a user
hands a wrapped model to theirs.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from distsparse.engine.checkpointer import Checkpointer
from distsparse.sparsifier.access import ParameterAccess

__all__ = ["Backend", "OptimizerFactory"]

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]
"""Builds the optimizer over a module's parameters (the bare model's, or the sharded ones)."""


class Backend(Protocol):
    """What every backend (single process, DDP, DeepSpeed, FSDP2) provides to the trainer."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    """The torch optimizer the backend built with the trainer's factory."""
    access: ParameterAccess
    checkpointer: Checkpointer
    """Writes the run's checkpoints in this wrapper's format (and loads its own format)."""
    rank: int
    world_size: int
    input_dtype: torch.dtype | None
    """The dtype the model takes its inputs in when the backend casts it (DeepSpeed bf16/fp16)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Clear the previous step's gradients and backpropagate the loss (reduced over ranks)."""

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model state dict under canonical names (a collective where state is sharded)."""
