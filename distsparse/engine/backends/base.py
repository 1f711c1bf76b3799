"""The backend seam: how the trainer reads and masks the pieces of weights this rank owns."""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from distsparse.sparsity.layout import FullLayout
from distsparse.sparsity.masks import MaskSet

__all__ = ["Backend"]


class Backend(Protocol):
    """What every backend (single process, DDP, DeepSpeed) provides to the trainer."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    rank: int
    world_size: int
    input_dtype: torch.dtype | None
    """The dtype the model takes its inputs in when the backend casts it (DeepSpeed bf16/fp16)."""

    def backward(self, loss: torch.Tensor) -> None:
        """Clear the previous step's gradients and backpropagate the loss (reduced over ranks)."""

    def step(self) -> None:
        """Apply the optimizer update."""

    def skip_step(self) -> None:
        """End a step without an optimizer update (gradients are dropped, state unchanged)."""

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model state dict under canonical names (a collective where state is sharded)."""

    def optimizer_state_dict(self) -> dict:
        """The optimizer state in the single-process layout (a collective where it is sharded)."""

    def selection_layout(self, shapes: dict[str, tuple[int, ...]]) -> FullLayout:
        """Where this rank's pieces of the masked weights (full `shapes`) live, for masks and selection."""

    def weights(self) -> dict[str, torch.Tensor]:
        """The owned piece of every masked weight, by canonical name."""

    def grads(self) -> dict[str, torch.Tensor]:
        """The dense gradient of that piece (averaged over ranks where data is split)."""

    def mask_all_copies(self, masks: MaskSet) -> None:
        """Zero masked-off entries in the weight and every copy: master weights, optimizer state."""

    def set_dense_gradients(self, needed: bool) -> None:
        """Ask for the dense gradient in the next backward (growth steps); else active entries suffice."""

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over ranks (the identity in one process)."""
