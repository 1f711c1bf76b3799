"""PyTorch DDP: every rank holds full replicas, so masks are computed locally and identically."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distsparse.distributed.process_group import DistEnv
from distsparse.engine.backends.base import OptimizerFactory
from distsparse.engine.backends.single import SingleBackend
from distsparse.sparsifier.access import DDPAccess

__all__ = ["DDPBackend"]


class DDPBackend(SingleBackend):
    """Full replicas on every rank; the model is wrapped in DistributedDataParallel.

    With `sparse_gradients` the gradient all-reduce carries only the entries at active positions
    (the access registers the hook), except on steps where a method needs the dense gradient.
    """

    def __init__(
        self, model: nn.Module, optimizer_factory: OptimizerFactory, env: DistEnv,
        device: torch.device, sparse_gradients: bool,
    ) -> None:
        """The optimizer is built over the bare model's parameters, which DDP keeps."""
        super().__init__(model, optimizer_factory)
        self.rank, self.world_size = env.rank, env.world_size
        device_ids = [device.index] if device.type == "cuda" else None
        self.model = DistributedDataParallel(model, device_ids=device_ids)
        self.access = DDPAccess(self.model, self.optimizer, sparse_gradients)
