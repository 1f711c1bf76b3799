"""Exact top-k over scores sharded across ranks (DESIGN section 2, "Global top-k across ranks").

Under ZeRO-3 every rank owns one contiguous piece of each flattened parameter: the layer's `numel`
elements are padded to a multiple of the world size and rank r owns [r*chunk, (r+1)*chunk) of them,
chunk = ceil(numel / world_size), clipped to [0, numel) (a piece may be partial or empty). FSDP2's
Shard(0) DTensors split whole rows the same way (`contiguous_partition` with the row as its unit).
The selection here equals `global_topk_masks` on the full scores, restricted to this rank's pieces, and
moves no scores or weights:

1. Every score becomes a 64-bit key whose integer order is the float order (`order_preserving_bits`).
2. Radix select from the most significant digit: each round all-reduces ONE histogram of the current
   `bits_per_round`-bit digit over the still-undecided candidates of all layers, finds the digit of
   the k-th largest key, marks the candidates above it selected and keeps those equal to it. The
   select stops early once the bucket holds exactly the entries still needed.
3. If all 64 bits get fixed first, the remaining candidates all equal the threshold key T and `need`
   of them are still missing. Ties break by global index, whose order is (layer, rank, local index):
   one all-reduce of the (num_layers x world_size) tie counts, an exclusive prefix sum over them in
   that order, and each rank takes its lowest-index ties up to what is left for its piece.

Each histogram is 2^bits_per_round int64 counts plus one NaN count (2,056 bytes at the default 8
bits); at most 64 / bits_per_round rounds plus one tie exchange: kilobytes per update whatever the
size of the model. `ShardedSelection.bytes_sent` reports the payload this rank handed to the
all-reduce.

`sharded_topk` runs several independent selections at once, each over a group of layers with its
own k (one group: the global top-k; one group per layer: the per-layer top-k of RigL, SET and
layer-wise GMP). Each round's histogram then has one row per group still searching, and the rounds
stop when every group has found its threshold: the collectives of one selection, for all layers.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "ShardPiece",
    "ShardedSelection",
    "contiguous_partition",
    "order_preserving_bits",
    "sharded_global_topk",
    "sharded_layer_topk",
    "sharded_topk",
    "zero3_partition",
]

KEY_BITS = 64
SIGN_BIT = -(2**63)  # int64 with only the sign bit set
LOW_BITS = 2**63 - 1  # int64 with every bit but the sign bit set


class ShardPiece(NamedTuple):
    """This rank's piece of one layer: 1-D local scores, offset in the flattened layer, layer numel,
    and the elements of the unit the layer is split by (`contiguous_partition`)."""

    scores: torch.Tensor
    offset: int
    numel: int
    unit: int = 1


@dataclass(frozen=True)
class ShardedSelection:
    """Local masks of this rank's pieces and what the selection sent through the all-reduce."""

    masks: list[torch.Tensor]
    bytes_sent: int  # payload bytes this rank handed to the all-reduce
    all_reduces: int  # collective calls (histogram rounds plus the tie-count exchange)


def contiguous_partition(numel: int, rank: int, world_size: int, unit: int = 1) -> tuple[int, int]:
    """[start, stop) of the flattened layer that `rank` owns when its units of `unit` elements are
    split as `torch.chunk` splits them: ceil(units / world_size) units a rank, the last ranks short
    or empty. unit 1 is ZeRO-3's `ds_tensor`; the row size is FSDP2's Shard(0) local shard."""
    units = numel // unit
    chunk = -(-units // world_size) * unit
    return min(rank * chunk, numel), min((rank + 1) * chunk, numel)


def zero3_partition(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of the flattened layer that `rank` owns under ZeRO-3 (DeepSpeed `ds_tensor`)."""
    return contiguous_partition(numel, rank, world_size)


def _keys(scores: torch.Tensor) -> torch.Tensor:
    values = scores.reshape(-1).to(torch.float64)
    values = torch.where(values == 0, torch.zeros_like(values), values)  # -0.0 ties with +0.0
    bits = values.view(torch.int64)
    return torch.where(bits < 0, bits ^ LOW_BITS, bits)


def order_preserving_bits(scores: torch.Tensor) -> torch.Tensor:
    """Flat int64 keys whose signed order is the float order of `scores`; NaN raises ValueError.

    Scores of any float dtype are widened to float64 (exact, and what `global_topk_masks` compares).
    Non-negative floats keep their bit pattern; negative ones flip every bit but the sign, so a larger
    magnitude gives a smaller key. -0.0 maps to the key of +0.0, as the stable sort sees them equal.
    """
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; top-k selection needs ordered scores")
    return _keys(scores)


def _check_piece(
    piece: ShardPiece, eligible: torch.Tensor | None, layer: int, rank: int, world_size: int
) -> None:
    if piece.unit < 1 or piece.numel % piece.unit:
        raise ValueError(f"layer {layer}: {piece.numel} elements do not split into units of {piece.unit}")
    start, stop = contiguous_partition(piece.numel, rank, world_size, piece.unit)
    size = piece.scores.numel()
    if piece.scores.dim() != 1 or size != stop - start or (size and piece.offset != start):
        raise ValueError(
            f"layer {layer}: rank {rank} of {world_size} owns [{start}, {stop}) of {piece.numel} "
            f"elements, got {size} scores of shape {tuple(piece.scores.shape)} at offset {piece.offset}"
        )
    if eligible is not None and eligible.numel() != size:
        raise ValueError(f"layer {layer}: {eligible.numel()} eligibility flags for {size} scores")


def sharded_global_topk(
    shards: Sequence[ShardPiece],
    k: int,
    all_reduce_sum: Callable[[torch.Tensor], object],
    *,
    rank: int,
    world_size: int,
    eligible: Sequence[torch.Tensor] | None = None,
    bits_per_round: int = 8,
) -> ShardedSelection:
    """Masks of this rank's pieces: exactly `global_topk_masks(full scores, k, full eligible)`.

    `shards` lists this rank's piece of every layer in the order shared by all ranks (the order of
    `global_topk_masks`'s mapping), laid out as `contiguous_partition(numel, rank, world_size, unit)`
    (checked: the tie order relies on it); `eligible` optionally restricts candidates with one local boolean
    tensor per piece. `all_reduce_sum` sums an int64 tensor over all ranks in place
    (`torch.distributed.all_reduce` fits). Every rank must call this with the same k. Returns one
    1-D boolean mask per piece.
    """
    return sharded_topk(shards, [k], [0] * len(shards), all_reduce_sum, rank=rank,
                        world_size=world_size, eligible=eligible, bits_per_round=bits_per_round)


def sharded_layer_topk(
    shards: Sequence[ShardPiece],
    ks: Sequence[int],
    all_reduce_sum: Callable[[torch.Tensor], object],
    *,
    rank: int,
    world_size: int,
    eligible: Sequence[torch.Tensor] | None = None,
    bits_per_round: int = 8,
) -> ShardedSelection:
    """Per layer: exactly `topk_mask(full scores, ks[layer], full eligible)`, all layers batched.

    The layers share every round's all-reduce (one histogram row per layer), so the number of
    collectives is that of one selection, whatever the number of layers.
    """
    return sharded_topk(shards, ks, list(range(len(shards))), all_reduce_sum, rank=rank,
                        world_size=world_size, eligible=eligible, bits_per_round=bits_per_round)


def sharded_topk(
    shards: Sequence[ShardPiece],
    ks: Sequence[int],
    groups: Sequence[int],
    all_reduce_sum: Callable[[torch.Tensor], object],
    *,
    rank: int,
    world_size: int,
    eligible: Sequence[torch.Tensor] | None = None,
    bits_per_round: int = 8,
) -> ShardedSelection:
    """Independent top-k selections over groups of layers, sharing each round's all-reduce.

    Layer `i` belongs to group `groups[i]`; group `g` selects its `ks[g]` highest scores over its
    layers, ties going to the lower global index in (layer, rank, local index) order: one group
    of all layers is the global top-k, one group per layer the per-layer top-k. Each round
    all-reduces one (open groups x (2^bits_per_round + 1)) histogram: a group that has found its
    threshold drops out of later rounds, and the rounds end when every group has.
    """
    if KEY_BITS % bits_per_round or not 1 <= bits_per_round <= 16:
        raise ValueError(f"bits_per_round must divide 64 and be at most 16, got {bits_per_round}")
    if any(k < 0 for k in ks):
        raise ValueError(f"cannot select {min(ks)} entries")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if len(groups) != len(shards) or any(not 0 <= g < len(ks) for g in groups):
        raise ValueError(f"{len(groups)} group numbers for {len(shards)} layers and {len(ks)} groups")
    for layer, piece in enumerate(shards):
        _check_piece(piece, None if eligible is None else eligible[layer], layer, rank, world_size)
    if not ks:
        return ShardedSelection([], 0, 0)
    device = shards[0].scores.device if shards else torch.device("cpu")
    sent = {"bytes": 0, "calls": 0}

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        all_reduce_sum(tensor)
        sent["bytes"] += tensor.numel() * tensor.element_size()
        sent["calls"] += 1
        return tensor

    def finished() -> ShardedSelection:
        return ShardedSelection(masks, sent["bytes"], sent["calls"])

    # Per layer: local indices of the undecided candidates and their unsigned-order keys.
    indices, keys = [], []
    for layer, piece in enumerate(shards):
        if eligible is None:
            index = torch.arange(piece.scores.numel(), device=device)
        else:
            index = eligible[layer].reshape(-1).nonzero().squeeze(1)
        indices.append(index)
        keys.append(piece.scores[index])
    masks = [torch.zeros(piece.scores.numel(), dtype=torch.bool, device=device) for piece in shards]
    empty = torch.zeros(0, dtype=torch.int64, device=device)

    # Each rank adds its count of eligible NaNs in one more slot, so that all ranks raise together
    # rather than one leaving the others waiting in the collective.
    nans = torch.zeros((), dtype=torch.int64, device=device)
    for key in keys:
        nans += torch.isnan(key).sum()
    keys = [_keys(key) ^ SIGN_BIT for key in keys]  # int64 bit patterns in unsigned order
    buckets, first_shift = 2**bits_per_round, KEY_BITS - bits_per_round
    need, done = list(ks), [False] * len(ks)
    for shift in range(first_shift, -1, -bits_per_round):
        digits = [(key >> shift) & (buckets - 1) for key in keys]
        # Only groups still searching send a row (every rank knows which: `done` is global).
        open_groups = [group for group, finished_group in enumerate(done) if not finished_group]
        row = {group: position for position, group in enumerate(open_groups)}
        rows = torch.zeros(len(open_groups), buckets + 1, dtype=torch.int64, device=device)
        rows[0, buckets] = nans
        for group, digit in zip(groups, digits):
            if group in row:
                rows[row[group], :buckets] += torch.bincount(digit, minlength=buckets)
        reduce(rows)
        histogram = torch.zeros(len(ks), buckets, dtype=torch.int64, device=device)
        histogram[open_groups] = rows[:, :buckets]
        # Per group on the device, read in one transfer: the digit of its k-th largest key
        # (the highest d with at least `need` candidates at digit >= d), the candidates above
        # that digit and in it, and the group's total.
        at_least = histogram.flip(1).cumsum(1).flip(1)  # candidates with digit >= d
        wanted = torch.tensor(need, dtype=torch.int64, device=device).unsqueeze(1)
        digit_of_kth = ((at_least >= wanted).sum(1, keepdim=True) - 1).clamp_(min=0)
        in_bucket = histogram.gather(1, digit_of_kth)
        above = at_least.gather(1, digit_of_kth) - in_bucket
        report = torch.cat([digit_of_kth, above, in_bucket, histogram.sum(1, keepdim=True)], 1)
        nan_count, *flat = torch.cat([rows[:, buckets].sum().reshape(1), report.reshape(-1)]).tolist()
        if nan_count:
            raise ValueError("scores contain NaN; top-k selection needs ordered scores")
        per_group = [flat[4 * group : 4 * group + 4] for group in range(len(ks))]
        if shift == first_shift:
            for group, (*_, total) in enumerate(per_group):
                if ks[group] > total:
                    where = f"group {group}: " if len(ks) > 1 else ""
                    raise ValueError(f"{where}cannot select {ks[group]} of {total} eligible entries")
                done[group] = ks[group] == 0
        bucket, complete = [0] * len(ks), [False] * len(ks)
        for group, (digit_value, above_count, in_count, _) in enumerate(per_group):
            if done[group]:
                continue
            bucket[group] = digit_value
            need[group] -= above_count
            complete[group] = need[group] == in_count
        for layer, (group, digit) in enumerate(zip(groups, digits)):
            if done[group]:
                indices[layer], keys[layer] = empty, empty
                continue
            masks[layer][indices[layer][digit > bucket[group]]] = True
            keep = digit == bucket[group]
            indices[layer], keys[layer] = indices[layer][keep], keys[layer][keep]
            if complete[group]:
                masks[layer][indices[layer]] = True
                indices[layer], keys[layer] = empty, empty
        done = [was or now for was, now in zip(done, complete)]
        if all(done):
            return finished()

    # Every remaining candidate of an unfinished group has its threshold key; take what the group
    # still needs by global index.
    ties = torch.zeros(len(shards), world_size, dtype=torch.int64, device=device)
    ties[:, rank] = torch.tensor([index.numel() for index in indices], dtype=torch.int64, device=device)
    ties = reduce(ties.reshape(-1)).view(len(shards), world_size).tolist()
    earlier_layers = [0] * len(ks)
    for layer, (group, index) in enumerate(zip(groups, indices)):
        before = earlier_layers[group] + sum(ties[layer][:rank])
        masks[layer][index[: max(0, need[group] - before)]] = True
        earlier_layers[group] += sum(ties[layer])
    return finished()
