"""PyTorch DDP: every rank holds full replicas, so masks are computed locally and identically."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distsparse.distributed.process_group import DistEnv
from distsparse.engine.backends.base import OptimizerFactory
from distsparse.engine.backends.single import SingleBackend
from distsparse.sparsifier.access import DDPAccess

__all__ = ["DDPBackend", "fix_bucket_layout"]


def fix_bucket_layout(ddp: DistributedDataParallel) -> None:
    """Build DDP's gradient buckets once, now, so that every start of a run reduces in one layout.

    DDP starts with one bucket in parameter order and, before its second forward, rebuilds the
    buckets in the order the first backward made gradients ready (`Reducer::rebuild_buckets`,
    torch/csrc/distributed/c10d/reducer.cpp). A restarted run therefore reduces its first step in
    the initial layout where an uninterrupted run uses the rebuilt one; with 3 or more ranks the
    ring all-reduce then sums an element's terms in another order and the runs part in the last
    bits. Here the rebuild runs at construction, in parameter order (what DDP's join hook pushes,
    `_push_all_rebuilt_params`), with DDP's own bucket caps, and no later rebuild happens.
    Buckets stay in parameter order, so a model of several buckets reduces them after the whole
    backward (torch's rebuilt order overlaps them with it); a model under DDP's 1 MiB first-bucket
    cap has one bucket either way. Does nothing with `find_unused_parameters` (DDP never rebuilds
    then).
    """
    if ddp.find_unused_parameters:
        return
    ddp.reducer._push_all_rebuilt_params()
    if not ddp.reducer._rebuild_buckets():
        raise RuntimeError("DistributedDataParallel did not rebuild its gradient buckets")


class DDPBackend(SingleBackend):
    """Full replicas on every rank; the model is wrapped in DistributedDataParallel.

    On the CPU the gradient buckets are fixed at construction (`fix_bucket_layout`), so a resumed
    run equals an uninterrupted one bit for bit at any world size. On accelerators DDP keeps
    torch's rebuilt layout, whose buckets start reducing during the backward; there a resume on 3
    or more ranks may differ from an uninterrupted run in the last bits. With `sparse_gradients`
    the gradient all-reduce carries only the entries at active positions (the access registers the
    hook), except on steps where a method needs the dense gradient.
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
        if device.type == "cpu":
            fix_bucket_layout(self.model)
        self.access = DDPAccess(self.model, self.optimizer, sparse_gradients)
