"""One process, one device: the reference backend the others must agree with."""
from __future__ import annotations

import torch
from torch import nn

from distsparse.engine.backends.base import OptimizerFactory
from distsparse.engine.checkpointer import FileCheckpointer
from distsparse.sparsifier.access import PlainAccess

__all__ = ["SingleBackend"]


class SingleBackend:
    """The model itself, stepped by its torch optimizer."""

    rank = 0
    world_size = 1
    input_dtype: torch.dtype | None = None

    def __init__(self, model: nn.Module, optimizer_factory: OptimizerFactory) -> None:
        """The optimizer is `optimizer_factory(model)`."""
        self.model, self.optimizer = model, optimizer_factory(model)
        self.access = PlainAccess(self.optimizer)
        self.checkpointer = FileCheckpointer(self)

    def backward(self, loss: torch.Tensor) -> None:
        """Clear the previous gradients, then backpropagate."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict under canonical names (no DDP `module.` prefix)."""
        return getattr(self.model, "module", self.model).state_dict()
