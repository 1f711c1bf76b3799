"""A DDP communication hook that all-reduces only the gradient entries at active mask positions.

Every rank holds the same mask, so the active entries of a bucket can be packed into one flat
vector in mask order, averaged with a single all-reduce and scattered back without sending any
indices: all-reduce bytes scale with density. Inactive positions come back as exact zeros.
Parameters outside the MaskSet (biases, normalization, layers kept dense) always travel whole,
and the whole bucket travels dense while `state.dense` is set (RigL/GraNet growth steps).
"""
# No `from __future__ import annotations`: DDP checks the hook's annotations as real objects.

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from distsparse.sparsity.masks import MaskSet

__all__ = ["SparseGradientState", "register_sparse_allreduce", "sparse_allreduce_hook"]


class SparseGradientState:
    """State of the hook: process group, masks by parameter, dense switch, byte counters."""

    def __init__(self, masks: MaskSet, process_group: dist.ProcessGroup | None = None) -> None:
        self.process_group = process_group
        self.masks = masks
        # DDP hands the hook parameter tensors, not names; identity is the stable link. The name
        # (not the mask) is stored because MaskSet.update replaces mask tensors after this point.
        self.names_by_id = {id(param): name for name, param in masks.params.items()}
        self.dense = False
        self.bytes_sent = 0
        self.calls = 0

    def reset_counters(self) -> None:
        """Zero the byte and call counters."""
        self.bytes_sent = 0
        self.calls = 0

    def _all_reduce_mean(self, tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
        # Divide before summing (as DDP's default hook does) so low precision cannot overflow.
        tensor.div_(dist.get_world_size(self.process_group))
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self.calls += 1
        work = dist.all_reduce(tensor, group=self.process_group, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])


def sparse_allreduce_hook(
    state: SparseGradientState, bucket: dist.GradBucket
) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket's gradients over ranks, sending only active entries of masked params."""
    if state.dense:
        return state._all_reduce_mean(bucket.buffer())

    grads = bucket.gradients()
    masks: list[torch.Tensor | None] = []
    for param in bucket.parameters():
        name = state.names_by_id.get(id(param))
        masks.append(None if name is None else state.masks.masks[name])
    pieces = [grad.reshape(-1) if mask is None else grad[mask] for grad, mask in zip(grads, masks)]
    sizes = [piece.numel() for piece in pieces]

    def unpack(fut: torch.futures.Future[torch.Tensor]) -> torch.Tensor:
        # The gradients are views into the bucket buffer, so writing them fills the buffer.
        for grad, mask, chunk in zip(grads, masks, fut.value().split(sizes)):
            if mask is None:
                grad.copy_(chunk.view_as(grad))
            else:
                grad.zero_().masked_scatter_(mask, chunk)
        return bucket.buffer()

    return state._all_reduce_mean(torch.cat(pieces)).then(unpack)


def register_sparse_allreduce(
    ddp_model: DistributedDataParallel, masks: MaskSet
) -> SparseGradientState:
    """Register the sparse all-reduce hook on a DDP model and return its state."""
    state = SparseGradientState(masks, ddp_model.process_group)
    ddp_model.register_comm_hook(state, sparse_allreduce_hook)
    return state
