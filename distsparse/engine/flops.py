"""Training FLOPs relative to dense, counted as RigL (arXiv 1911.11134, appendix H) counts them.

A step costs f_S forward and 2 f_S backward, where f_S counts the multiply-adds of the active
weights of every weight matrix: Conv2d and Linear layers, Hugging Face's Conv1D and the
projections of nn.MultiheadAttention; each weight counts once per output position (a conv) or per
input row (a token of a sequence, a sample). A step that needs the dense gradient (RigL/GraNet
growth) costs f_S + f_D backward instead. Dense training costs 3 f_D a step. Weightless layers
(BN, pooling, softmax, attention's score and value products) are left out, as in the paper's
accounting, which counts the layers sparsity acts on.
"""
from __future__ import annotations

import torch
from torch import nn

from distsparse.sparsity.masks import ATTENTION_PROJECTIONS, MaskSet, canonical_name, is_hf_conv1d

__all__ = ["FlopCounter"]


class FlopCounter:
    """Accumulates the training FLOPs of each step as a fraction of dense training."""

    def __init__(self, model: nn.Module, sample: torch.Tensor) -> None:
        self.uses_per_weight: dict[str, int] = {}
        self.numel: dict[str, int] = {}
        hooks = [module.register_forward_hook(self._recorder(name, module))
                 for name, module in model.named_modules() if _weight_names(module)]
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
        prefix = f"{name}." if name else ""

        def record(_module, _inputs, output: torch.Tensor | tuple[torch.Tensor, ...]) -> None:
            if isinstance(output, tuple):  # MultiheadAttention: (output, attention weights)
                output = output[0]
            # The sample is one example: a conv's (1, C, H, W) output holds H * W positions, any
            # other output (1, features), (1, tokens, features) or (tokens, 1, features) its rows.
            features = output.shape[1] if isinstance(module, nn.Conv2d) else output.shape[-1]
            uses = output.numel() // features
            for weight_name, weight in _weight_names(module).items():
                key = canonical_name(prefix + weight_name)
                self.uses_per_weight[key] = uses
                self.numel[key] = weight.numel()

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


def _weight_names(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weight matrices of `module` itself whose multiply-adds are counted, by local name."""
    if isinstance(module, (nn.Conv2d, nn.Linear)) or is_hf_conv1d(module):
        return {"weight": module.weight}
    if isinstance(module, nn.MultiheadAttention):  # its forward reads out_proj.weight directly
        found = {key: getattr(module, key) for key in ATTENTION_PROJECTIONS
                 if getattr(module, key) is not None}
        return {**found, "out_proj.weight": module.out_proj.weight}
    return {}
