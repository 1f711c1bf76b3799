"""Training FLOPs relative to dense, counted as RigL (arXiv 1911.11134, appendix H) counts them.

A step costs f_S forward and 2 f_S backward, where f_S counts the multiply-adds of the active
weights of every Conv2d and Linear layer; a step that needs the dense gradient (RigL/GraNet
growth) costs f_S + f_D backward instead. Dense training costs 3 f_D a step. Other layers (BN,
pooling) are left out, as in the paper's accounting.
"""
from __future__ import annotations

import torch
from torch import nn

from distsparse.sparsity.masks import MaskSet, canonical_name

__all__ = ["FlopCounter"]


class FlopCounter:
    """Accumulates the training FLOPs of each step as a fraction of dense training."""

    def __init__(self, model: nn.Module, sample: torch.Tensor) -> None:
        self.uses_per_weight: dict[str, int] = {}
        self.numel: dict[str, int] = {}
        hooks = [
            module.register_forward_hook(self._recorder(canonical_name(f"{name}.weight"), module))
            for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear))
        ]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(sample[:1])
        model.train(was_training)
        for hook in hooks:
            hook.remove()
        self.dense_forward = sum(self.numel[n] * self.uses_per_weight[n] for n in self.numel)
        self.sparse_forward = self.dense_forward
        self.total = 0.0
        self.steps = 0

    def _recorder(self, name: str, module: nn.Module):
        def record(_module, _inputs, output: torch.Tensor) -> None:
            # A conv weight is used once per output position; a linear weight once per row.
            self.uses_per_weight[name] = output[0].numel() // output.shape[1] if output.dim() > 2 \
                else output[0].numel() // output.shape[-1]
            self.numel[name] = module.weight.numel()

        return record

    def set_masks(self, masks: MaskSet) -> None:
        """Recompute f_S after a mask change."""
        active = masks.active_counts()
        self.sparse_forward = sum(
            active.get(name, self.numel[name]) * self.uses_per_weight[name] for name in self.numel
        )

    def add_step(self, dense_gradient: bool) -> None:
        """Count one training step."""
        backward = self.sparse_forward + (self.dense_forward if dense_gradient else self.sparse_forward)
        self.total += (self.sparse_forward + backward) / (3.0 * self.dense_forward)
        self.steps += 1

    def ratio(self) -> float:
        """Training FLOPs so far relative to the same steps of dense training."""
        return self.total / self.steps if self.steps else 1.0

    def state_dict(self) -> dict[str, float]:
        """Accumulated totals (for resume)."""
        return {"total": self.total, "steps": self.steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore accumulated totals."""
        self.total, self.steps = float(state["total"]), int(state["steps"])
