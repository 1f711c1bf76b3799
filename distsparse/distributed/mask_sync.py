"""Proof that every rank holds the same masks: an all-reduce of per-layer fingerprints."""
from __future__ import annotations

import torch
import torch.distributed as dist

from distsparse.distributed.process_group import all_reduce, is_distributed
from distsparse.errors import DistsparseError
from distsparse.sparsity.masks import MaskSet

__all__ = ["MaskMismatchError", "verify_identical_masks"]


class MaskMismatchError(DistsparseError):
    """Ranks hold different masks: training must stop, never continue silently."""


def verify_identical_masks(masks: MaskSet, device: torch.device, step: int) -> None:
    """Raise MaskMismatchError naming the first layer whose mask differs between ranks.

    Each layer's 63-bit digest is all-reduced with MIN and with MAX; they agree exactly when
    every rank holds the same digest (16 bytes a layer on the wire). Masks held as ZeRO-3 pieces
    are not replicas, so there is nothing to compare: every rank's piece comes from the same
    collective selection, which all ranks leave with the same counts and thresholds.
    """
    if not is_distributed() or masks.sharded:
        return
    names = masks.names
    digests = masks.layer_fingerprints()
    low = torch.tensor([digests[n] for n in names], dtype=torch.int64, device=device)
    high = low.clone()
    all_reduce(low, dist.ReduceOp.MIN)
    all_reduce(high, dist.ReduceOp.MAX)
    differing = (low != high).nonzero()
    if len(differing):
        first = names[int(differing[0])]
        raise MaskMismatchError(
            f"masks differ across ranks at step {step} in layer '{first}' "
            f"({len(differing)} of {len(names)} layers differ)"
        )
