"""Parameter access: the pieces of the masked weights this rank owns, and every copy to mask.

What a Sparsifier needs of whatever wraps the model (DESIGN section 2, role 2): the layout masks
live in, the owned piece of each masked weight and its dense gradient, masking of the weight and
every optimizer-state tensor after a step, and the optimizer step itself (taken, or skipped on
RigL's update steps). A plain module and DistributedDataParallel hold full replicas; the
DeepSpeed engine's access is in `distsparse.sparsifier.deepspeed_access`.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch.nn.parallel import DistributedDataParallel

from distsparse.distributed.comm_hook import SparseGradientState, register_sparse_allreduce
from distsparse.sparsity.layout import FullLayout
from distsparse.sparsity.masks import MaskSet

__all__ = ["DDPAccess", "ParameterAccess", "PlainAccess", "mask_weights_and_state"]


class ParameterAccess(Protocol):
    """What a Sparsifier reads and writes through the model's wrapper."""

    optimizer: torch.optim.Optimizer | None

    def bind(self, masks: MaskSet) -> None:
        """Serve these masks from now on (their parameters are the model's masked weights)."""

    def selection_layout(self, shapes: dict[str, tuple[int, ...]]) -> FullLayout:
        """Where this rank's pieces of the masked weights (full `shapes`) live."""

    def weights(self) -> dict[str, torch.Tensor]:
        """The owned piece of every masked weight (fp32 master where there is one), by name."""

    def grads(self) -> dict[str, torch.Tensor]:
        """The dense gradient of that piece, averaged over ranks; read before the optimizer step."""

    def mask_all_copies(self, masks: MaskSet) -> None:
        """Zero masked-off entries in the weight and every copy: master weights, optimizer state."""

    def step(self) -> None:
        """The optimizer update through the wrapper."""

    def skip_step(self) -> None:
        """End a step without an optimizer update (weights and optimizer state unchanged)."""

    def set_dense_gradients(self, needed: bool) -> None:
        """Whether the next backward must all-reduce dense gradients (growth steps)."""


class PlainAccess:
    """A module on one process: each parameter whole, stepped by a torch optimizer."""

    def __init__(self, optimizer: torch.optim.Optimizer | None) -> None:
        self.optimizer = optimizer
        self.mask_set: MaskSet | None = None

    def bind(self, masks: MaskSet) -> None:
        self.mask_set = masks

    def selection_layout(self, shapes: dict[str, tuple[int, ...]]) -> FullLayout:
        """Full tensors: this rank owns each parameter whole."""
        return FullLayout(shapes)

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.mask_set.params.items()}

    def grads(self) -> dict[str, torch.Tensor]:
        """p.grad, or zeros for a parameter the loss did not reach."""
        return {name: p.grad if p.grad is not None else torch.zeros_like(p)
                for name, p in self.mask_set.params.items()}

    def mask_all_copies(self, masks: MaskSet) -> None:
        mask_weights_and_state(masks, self.optimizer)

    def step(self) -> None:
        """optimizer.step()."""
        self.optimizer.step()

    def skip_step(self) -> None:
        """Nothing to undo: the gradients are cleared by the caller's zero_grad."""

    def set_dense_gradients(self, needed: bool) -> None:
        """Nothing to switch: one process always has the dense gradient."""


class DDPAccess(PlainAccess):
    """DistributedDataParallel: full replicas on every rank, gradients averaged by DDP.

    A method reading `grads()` sees the gradient of the global batch, |mean g| (rigl-torch scores
    the mean of per-rank |g| instead). With `sparse_gradients` the all-reduce carries only the
    entries at active positions, except on steps where the method needs the dense gradient.
    """

    def __init__(self, model: DistributedDataParallel, optimizer: torch.optim.Optimizer | None,
                 sparse_gradients: bool) -> None:
        super().__init__(optimizer)
        self.model, self.sparse_gradients = model, sparse_gradients
        self.gradient_state: SparseGradientState | None = None

    def bind(self, masks: MaskSet) -> None:
        """Serve these masks; with sparse_gradients, register the hook that packs active entries."""
        super().bind(masks)
        if self.sparse_gradients and self.gradient_state is None:
            self.gradient_state = register_sparse_allreduce(self.model, masks)

    def set_dense_gradients(self, needed: bool) -> None:
        if self.gradient_state is not None:
            self.gradient_state.dense = needed


_NO_STATE: dict[str, object] = {}


def mask_weights_and_state(masks: MaskSet, optimizer: torch.optim.Optimizer | None) -> None:
    """Mask each weight and each optimizer-state tensor of its shape (momentum, exp_avg, ...).

    With element-wise optimizers (SGD, AdamW) this after-step masking equals masking the
    gradient, and leaves the dense gradient intact for growth criteria.
    """
    state = optimizer.state if optimizer is not None else {}
    for name, param in masks.params.items():
        masks.zero_off(name, param)
        for value in state.get(param, _NO_STATE).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                masks.zero_off(name, value)
