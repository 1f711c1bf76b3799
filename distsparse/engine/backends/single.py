"""One process, one device: the reference backend the others must agree with."""
from __future__ import annotations

import torch
from torch import nn

from distsparse.sparsity.layout import FullLayout
from distsparse.sparsity.masks import MaskSet

__all__ = ["SingleBackend"]


class SingleBackend:
    """The full tensor of every parameter is owned by this (only) rank."""

    rank = 0
    world_size = 1
    input_dtype: torch.dtype | None = None

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, masks: MaskSet) -> None:
        self.model, self.optimizer, self.mask_set = model, optimizer, masks

    def backward(self, loss: torch.Tensor) -> None:
        """Clear the previous gradients, then backpropagate."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()

    def step(self) -> None:
        """The optimizer update."""
        self.optimizer.step()

    def skip_step(self) -> None:
        """Nothing to do: the next backward clears the gradients."""

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict under canonical names (no DDP `module.` prefix)."""
        return getattr(self.model, "module", self.model).state_dict()

    def optimizer_state_dict(self) -> dict:
        """The torch optimizer's state dict."""
        return self.optimizer.state_dict()

    def selection_layout(self, shapes: dict[str, tuple[int, ...]]) -> FullLayout:
        """Full tensors: every rank (here the only one) owns each parameter whole."""
        return FullLayout(shapes)

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.mask_set.params.items()}

    def grads(self) -> dict[str, torch.Tensor]:
        return {name: p.grad for name, p in self.mask_set.params.items()}

    @torch.no_grad()
    def mask_all_copies(self, masks: MaskSet) -> None:
        """Mask the weight and each optimizer-state tensor of its shape (momentum, exp_avg, ...).

        With element-wise optimizers (SGD, AdamW) this after-step masking equals masking the
        gradient, and leaves the dense gradient intact for growth criteria.
        """
        masks.apply()
        for name, param in masks.params.items():
            for value in self.optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    masks.apply({name: value})

    def set_dense_gradients(self, needed: bool) -> None:
        """Nothing to switch: one process always has the dense gradient."""

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return value
