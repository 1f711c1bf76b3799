"""Parameter access: the pieces of the masked weights this rank owns, and every copy to mask.

What a Sparsifier needs of whatever wraps the model (DESIGN section 2, role 2): the layout masks
live in, the owned piece of each masked weight and its dense gradient, masking of the weight and
every optimizer-state tensor after a step, and the optimizer step itself (taken, or skipped on
RigL's update steps). A plain module and DistributedDataParallel hold full replicas; the
DeepSpeed engine's access is in `distsparse.sparsifier.deepspeed_access`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch.nn.parallel import DistributedDataParallel

from distsparse.distributed.comm_hook import SparseGradientState, register_sparse_allreduce
from distsparse.sparsity.layout import FullLayout
from distsparse.sparsity.masks import MaskSet

__all__ = ["DDPAccess", "ParameterAccess", "PlainAccess", "StepCopies"]


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
        self.copies = StepCopies(optimizer)

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
        self.copies.mask(masks)

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


class StepCopies:
    """Every tensor masked after a step: each masked weight and each optimizer-state tensor of its
    shape (momentum, exp_avg, ...), itself or as `view` shows it (the local shard under FSDP2).

    The list is made again only when it may have changed: the optimizer's first step creates its
    state, `load_state_dict` replaces it, a step may add or replace a tensor, and a view may
    come to show other storage. Checking costs a lookup a tensor; masking the list is
    `MaskSet.zero_off_all`, one AND a tensor on the CPU (which also follows a weight whose
    storage was replaced). With element-wise optimizers (SGD, AdamW) this after-step masking
    equals masking the gradient, and leaves the dense gradient intact for growth criteria.
    """

    def __init__(self, optimizer: torch.optim.Optimizer | None,
                 view: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 state_type: type = torch.Tensor) -> None:
        self.optimizer, self.view, self.state_type = optimizer, view, state_type
        self._state: object = None
        self._state_size = 0
        self._params: dict[str, torch.Tensor] = {}
        self._watched: list[tuple[dict, int, list[tuple[str, torch.Tensor]]]] = []
        self._copies: list[tuple[str, torch.Tensor]] = []
        self._sources: list[torch.Tensor] = []

    def mask(self, masks: MaskSet) -> None:
        """Zero masked-off entries in every copy of every masked weight."""
        state = self.optimizer.state if self.optimizer is not None else None
        same = state is self._state and masks.params is self._params \
            and (state is None or len(state) == self._state_size)
        if same:  # inline, not a call: this runs every step
            for param_state, size, items in self._watched:
                same = len(param_state) == size
                for key, value in items:
                    same = same and param_state.get(key) is value
                if not same:
                    break
        if not same or (self.view is not None and self._views_moved()):
            self._list(masks, state)
        masks.zero_off_all(self._copies)

    def _views_moved(self) -> bool:
        """Whether a listed view no longer shows its tensor's storage (FSDP2 may swap it)."""
        return any(self.view(source).data_ptr() != shown.data_ptr()
                   for source, (_, shown) in zip(self._sources, self._copies))

    def _list(self, masks: MaskSet, state: dict | None) -> None:
        self._state, self._params = state, masks.params
        self._state_size = len(state) if state is not None else 0
        self._watched, sources = [], []
        for name, param in masks.params.items():
            sources.append((name, param))
            param_state = state.get(param) if state is not None else None
            if param_state is None:
                continue
            items = [(key, value) for key, value in param_state.items()
                     if isinstance(value, self.state_type) and value.shape == param.shape]
            self._watched.append((param_state, len(param_state), items))
            sources += [(name, value) for _, value in items]
        self._sources = [tensor for _, tensor in sources]
        self._copies = sources if self.view is None else [(name, self.view(tensor))
                                                          for name, tensor in sources]
