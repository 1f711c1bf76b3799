"""PyTorch DDP: every rank holds full replicas, so masks are computed locally and identically.

DDP averages gradients over ranks, so a method reading `grads()` sees the dense gradient of the
global batch, |mean g| (rigl-torch scores the mean of per-rank |g| instead, which is not the
gradient RigL means). With `backend.sparse_gradients` the all-reduce carries only the entries at
active positions, except on steps where a method needs the dense gradient.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distsparse.dist.comm_hook import register_sparse_allreduce
from distsparse.dist.process_group import DistEnv, all_reduce
from distsparse.engine.backends.single import SingleBackend
from distsparse.sparsity.masks import MaskSet

__all__ = ["DDPBackend"]


class DDPBackend(SingleBackend):
    """Full replicas on every rank; the model is wrapped in DistributedDataParallel."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, masks: MaskSet, env: DistEnv,
        device: torch.device, sparse_gradients: bool,
    ) -> None:
        super().__init__(model, optimizer, masks)
        self.rank, self.world_size = env.rank, env.world_size
        device_ids = [device.index] if device.type == "cuda" else None
        self.model = DistributedDataParallel(model, device_ids=device_ids)
        self.gradient_state = (
            register_sparse_allreduce(self.model, masks) if sparse_gradients else None
        )

    def set_dense_gradients(self, needed: bool) -> None:
        if self.gradient_state is not None:
            self.gradient_state.dense = needed

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce(value) / self.world_size
