"""Exact top-k over scores sharded across ranks (DESIGN section 2, "Global top-k across ranks").

Under ZeRO-3 every rank owns one contiguous piece of each flattened parameter: the layer's `numel`
elements are padded to a multiple of the world size and rank r owns [r*chunk, (r+1)*chunk) of them,
chunk = ceil(numel / world_size), clipped to [0, numel) (a piece may be partial or empty). FSDP2's
Shard(0) DTensors split whole rows the same way (`contiguous_partition` with the row as its unit).
The selection here equals `global_topk_masks` on the full scores, restricted to this rank's pieces, and
moves no scores or weights:

1. Every score becomes a key whose unsigned bit order is the scores' order: 32 bits when every
   layer's scores are float32, int32 or narrower (counter-based random scores are int32), else
   the 64 bits of `order_preserving_bits`.
2. Radix select from the most significant digit: each round all-reduces ONE histogram of the next
   digit over the still-undecided candidates of all layers, finds the digit of the k-th largest
   key, marks the candidates above it selected and keeps those equal to it. The select stops early
   once the bucket holds exactly the entries still needed.
3. If all key bits get fixed first, the remaining candidates all equal the threshold key T and
   `need` of them are still missing. Ties break by global index, whose order is (group's layer,
   rank, local index): the tied candidates' keys become their global indices within the group,
   reversed (the lowest index the largest key), and further rounds select among them as among
   keys. The indices are distinct, so those rounds end with no tie; a few tied entries take one
   round (a histogram of index digits, its size that of any round: nothing in it grows with the
   ranks). A selection followed by another over the same pieces can leave that round to the
   other's first round (`defer_ties`, `settle`: RigL's drop, then its grow). It can also leave
   its last round (`defer_last_round`): the other's first round carries that round's histogram
   and counts the candidates it leaves apart, and its next call carries the tie round.

Across many GPUs a round costs its latency (about 100 us at 1024 GPUs) more than its bytes, so
the digits are wide: `round_bits` gives each round the widest digit whose histograms fit in
`ROUND_COUNTS` counts (14 bits for one group, 8 for ResNet-50's 54 layers), no wider than the
largest layer's size calls for. Counts are int32 while the model has
fewer than 2^31 elements; a later round's travel in 1 or 2 bytes each, packed into int32 words,
where its groups' candidates (all ranks together, known to every rank) fit them (`_pack`).
A selection of |N(0, 1)| scores then takes 2-4 rounds; the histograms are kilobytes to 64 kB a
round whatever the size of the layers. `ShardedSelection.bytes_sent` reports the payload this rank
handed to the all-reduce.

The first round reads the pieces of all layers as one concatenation where kernel launches cost
more than their work (`layers_at_once`, a GPU: its kernels do not grow with the layers), else layer
by layer; the candidates it leaves undecided (about one in 2^width) go on together, so later
rounds cost what they hold, not what the model holds.

A selection that repeats (the same layers every mask update) can start where the last one
ended: handed the thresholds it found (`ShardedSelection.thresholds`), the first round counts a
window of 2^width buckets of 2^shift keys around each (the keys outside by their fewest top
bits that leave them no more rounds than without a hint), so a threshold that stayed within the
window (a factor of 2 either way for float32 at 8-bit digits) leaves `shift` bits: 16 at 8-bit
digits, two rounds instead of three more. One that left it costs no round, only the first
round's larger histogram. The masks are the same with any hints or none.

A selection that follows another in the same update (RigL's grow after its drop) can start
from the current scores instead: each rank estimates its groups' thresholds from a sample of its
own pieces, a bracket as wide as the ranks' samples leave it (`threshold_estimates`), the
earlier selection's first round carries the brackets' sums (`carry`, extra rows of its
histogram: no call of its own), and the later selection starts from their mean
(`estimated_hints`: a hint with a margin). Its first round counts the window of a factor 2
either way and, where the margin is narrower, a finer window inside it that leaves a round
fewer (across many ranks, where their pieces are alike); a miss of the finer window costs no
round against the plain one, and a miss of both none against no hint. The ranks' mean is no
estimate of the threshold where their pieces differ (rows of a real layer: see
`benchmarks/threshold_drift.py`), and then it misses.

`sharded_topk` runs several independent selections at once, each over a group of layers with its
own k (one group: the global top-k; one group per layer: the per-layer top-k of RigL, SET and
layer-wise GMP). Each round's histogram then has one row per group still searching, and the rounds
stop when every group has found its threshold: the collectives of one selection, for all layers.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from distsparse.sparsity.device_values import device_tensor
from distsparse.sparsity.segmented import segment_counts, segment_ids, signed_order_bits

__all__ = [
    "DeferredTies",
    "ShardPiece",
    "ShardedSelection",
    "Threshold",
    "contiguous_partition",
    "estimated_hints",
    "order_preserving_bits",
    "round_bits",
    "selection_key_bits",
    "sharded_global_topk",
    "sharded_layer_topk",
    "sharded_topk",
    "threshold_estimates",
    "zero3_partition",
]

KEY_BITS = 64
SIGN_BIT = -(2**63)  # int64 with only the sign bit set
NARROW_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int16, torch.int8)
"""Score dtypes exactly ordered by 32-bit keys (float32 or int32 holds them all): 32 bits to
resolve, not 64."""
SPARE_BITS = 2
"""Digit bits beyond the bit length of the largest open group's element count."""
TIE_SPARE_BITS = 4
"""Further digit bits of a round over tied entries' indices, beyond their count's bit length
and `SPARE_BITS`: t tied entries spread over a layer share the cell where the taken ones end
with a chance of about t / 2^width, at most 1/64 (then another round)."""
ROUND_COUNTS = 2**14
"""Histogram counts a round may all-reduce (64 kB of int32): the digit width follows from the
number of groups still searching. At scale a round costs its latency (about 100 us across 1024
GPUs) far more than its bytes, so wide digits and few rounds win until the histograms reach
hundreds of kB."""
WINDOW_FIXED_BITS = 16
"""Key bits a hinted first round's fine buckets fix at most (`_window_shift` leaves the rest in
whole digits): on float32 keys at 8-bit digits, 256 buckets of 2^16 keys cover a factor of 2
either side of the hint and leave 16 bits, two rounds instead of three."""
SPREAD_CELLS = 2**12
"""Cells over which a first round reading all layers at once spreads, by position, the entries it
does not count (a RigL drop's inactive weights: most of them): in one cell a row, a GPU's atomic
adds would queue on one address."""
ESTIMATE_BITS = 32
"""Top key bits of a rank's threshold estimates (`threshold_estimates`), sent as two 16-bit
halves so that each half's sum over 2^15 ranks fits an int32 count: all of a 32-bit key."""
ESTIMATE_Z = 4.0
"""Standard errors of the ranks' mean quantile on either side of an estimate's bracket."""
ESTIMATE_SAMPLE = 4096
"""Scores a rank's estimate reads per layer, at most about: an evenly strided sample of its piece."""
ESTIMATE_MIN = 64
"""Eligible scores a rank's estimate needs in its sample; with fewer it reads the whole sample."""


class ShardPiece(NamedTuple):
    """This rank's piece of one layer: 1-D local scores, offset in the flattened layer, layer numel,
    and the elements of the unit the layer is split by (`contiguous_partition`)."""

    scores: torch.Tensor
    offset: int
    numel: int
    unit: int = 1


class Threshold(NamedTuple):
    """Where a group's k-th largest key was found: its key (`key_bits` wide, unsigned order),
    exact or with its unresolved low bits 0. Handed back as a hint, it lets the next selection of
    the group start near it (`sharded_topk`'s `hints`). `margin` > 0: keys on either side of `key`
    within which the threshold lies with confidence (`estimated_hints`)."""

    key_bits: int
    key: int
    margin: int = 0


@dataclass(frozen=True)
class ShardedSelection:
    """Local masks of this rank's pieces and what the selection sent through the all-reduce."""

    masks: list[torch.Tensor]
    bytes_sent: int  # payload bytes this rank handed to the all-reduce
    all_reduces: int  # collective calls: histogram rounds of keys, then of tied indices
    thresholds: list[Threshold | None]  # per group; None where it selected nothing
    carried: list[int]  # `carry` summed over the ranks (empty without one)
    deferred: DeferredTies | None = None  # `defer_ties`: the round left to a later selection
    settled: list[torch.Tensor] = field(default_factory=list)  # `settle`: that selection's masks


@dataclass(frozen=True)
class DeferredTies:
    """A selection's round, left for a later selection's first round to carry: its tie round
    (`sharded_topk(..., defer_ties=True)`, then `settle=`) or its likely last
    (`defer_last_round`).

    `masks` are the selection's masks without its undecided candidates (flagged in `tied`, over
    the concatenation of the pieces), `table` this rank's histogram of the round, and `take`
    turns the table summed over the ranks into the candidates this rank takes, per layer of
    `tied_layers` its candidates and how many of them all ranks take, and the tie round still
    to go (after a deferred last round whose ties remain; else None). `take` may make calls of
    its own (the deferred selection's further rounds) through the `send` it is handed."""

    masks: list[torch.Tensor]
    tied: torch.Tensor
    tied_layers: list[int]
    table: torch.Tensor
    take: Callable[[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]],
                   tuple[torch.Tensor, torch.Tensor, torch.Tensor, DeferredTies | None]]


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
    return signed_order_bits(scores.reshape(-1).to(torch.float64), torch.int64)


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
    bits_per_round: int | None = None,
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
    bits_per_round: int | None = None,
) -> ShardedSelection:
    """Per layer: exactly `topk_mask(full scores, ks[layer], full eligible)`, all layers batched.

    The layers share every round's all-reduce (one histogram row per layer), so the number of
    collectives is that of one selection, whatever the number of layers.
    """
    return sharded_topk(shards, ks, list(range(len(shards))), all_reduce_sum, rank=rank,
                        world_size=world_size, eligible=eligible, bits_per_round=bits_per_round)


def round_bits(open_groups: int, key_bits: int, most_candidates: int | None = None) -> int:
    """Digit width of a round: the widest (at most 16 bits) whose histograms for `open_groups`
    groups fit in `ROUND_COUNTS` counts; with `most_candidates` (the largest group's elements), no
    wider than its bit length plus `SPARE_BITS` (2^SPARE_BITS buckets an element); never wider
    than the `key_bits` left."""
    width = max(1, min(16, (ROUND_COUNTS // max(open_groups, 1)).bit_length() - 1))
    if most_candidates is not None:
        width = min(width, most_candidates.bit_length() + SPARE_BITS)
    return min(width, key_bits)


def selection_key_bits(scores: Sequence[torch.Tensor]) -> int:
    """Width of the keys a selection over these layers' scores resolves: 32 bits when every
    layer's dtype is float32, int32 or narrower, else 64."""
    return 32 if all(layer.dtype in NARROW_DTYPES for layer in scores) else KEY_BITS


def _key_bits(shards: Sequence[ShardPiece]) -> int:
    return selection_key_bits([piece.scores for piece in shards])


def threshold_estimates(scores: Sequence[torch.Tensor], eligible: Sequence[torch.Tensor | None],
                        fractions: Sequence[float], key_bits: int,
                        world_size: int = 1) -> torch.Tensor:
    """This rank's bracket of each layer's threshold, to be summed over the ranks (`carry`).

    Per layer, from the eligible scores of an evenly strided sample of the local piece (about
    `ESTIMATE_SAMPLE`; the whole sample where fewer than `ESTIMATE_MIN` of it are eligible, as the
    mean over ranks of a quantile read from one or two scores each would be a mean of the
    scores): the keys of the highest p + d and p - d of them, p = `fractions[i]`, d =
    `ESTIMATE_Z` standard errors of the mean of `world_size` ranks' sample quantiles plus one
    sample's share (the h-th highest of n samples lies, in the mean, h / (n + 1) from the top:
    h is that share rounded). Each key's top `ESTIMATE_BITS` bits go as two
    16-bit halves: rows (low high half, low low half, high high half, high low half) of one
    entry a layer, then per layer 1 where this rank estimated (a nonempty piece, p strictly
    between 0 and 1), else 0 (and zeros). The mean over ranks assumes their pieces alike; where
    they are not, the bracket may miss, which costs rounds, never exactness.
    """
    layers = len(scores)
    device = scores[0].device if layers else torch.device("cpu")
    estimates = torch.zeros(5, layers, dtype=torch.int64, device=device)
    strides = [max(1, layer_scores.numel() // ESTIMATE_SAMPLE) for layer_scores in scores]
    picks = [None if allowed is None else allowed.reshape(-1)[::stride]
             for allowed, stride in zip(eligible, strides)]
    counted = [pick for pick in picks if pick is not None]
    picked_counts = iter(segment_counts(torch.cat(counted), [pick.numel() for pick in counted])
                         .tolist() if counted else [])  # one read, all layers
    samples, picked, sizes = [], [], []
    for layer_scores, pick, stride in zip(scores, picks, strides):
        samples.append(layer_scores.reshape(-1)[::stride])
        count = None if pick is None else next(picked_counts)
        filtered = count is not None and count >= ESTIMATE_MIN
        picked.append(pick if filtered else None)
        sizes.append(count if filtered else samples[-1].numel())
    estimating = [layer for layer in range(layers) if sizes[layer] and 0 < fractions[layer] < 1]
    # The layers' samples sorted together, floating and integer scores apart (at most 2 tables):
    # row i's h-th highest eligible sample is entry h - 1 of its row, ineligible entries and the
    # padding being the dtype's lowest value (a tie there is a tie of values).
    for floating in (True, False):
        rows = [layer for layer in estimating if samples[layer].is_floating_point() == floating]
        if not rows:
            continue
        dtype = (torch.float64 if key_bits == KEY_BITS else torch.float32) if floating \
            else torch.int64
        lowest = float("-inf") if floating else torch.iinfo(torch.int64).min
        table = _padded_rows([samples[layer].to(dtype) for layer in rows], lowest)
        if any(picked[layer] is not None for layer in rows):
            whole = torch.ones(max(samples[layer].numel() for layer in rows), dtype=torch.bool,
                               device=device)
            valid = _padded_rows([whole[: samples[layer].numel()] if picked[layer] is None
                                  else picked[layer] for layer in rows], False)
            table = table.masked_fill(~valid, lowest)
        ordered = table.sort(dim=1, descending=True).values
        ranks = []
        for layer in rows:
            size, fraction = sizes[layer], fractions[layer]
            spread = ESTIMATE_Z * math.sqrt(fraction * (1 - fraction) / (size * world_size)) \
                + 1 / (size + 1)
            ranks.append([min(size, max(1, round(share * (size + 1)))) - 1
                          for share in (fraction + spread, fraction - spread)])
        kth = ordered.gather(1, device_tensor(ranks, device))
        keys = (_candidate_keys(kth.reshape(-1), key_bits).to(torch.int64)
                >> (key_bits - ESTIMATE_BITS)) & (2**ESTIMATE_BITS - 1)
        halves = torch.stack([keys >> 16, keys & 0xFFFF], 1).view(len(rows), 4).T
        estimates[:, device_tensor(rows, device)] = torch.cat(
            [halves, torch.ones(1, len(rows), dtype=torch.int64, device=device)])
    return estimates.reshape(-1)


def _padded_rows(parts: Sequence[torch.Tensor], fill: float | bool) -> torch.Tensor:
    """The 1-D `parts` (one dtype) as the rows of one table, each filled out with `fill` to the
    longest: one concatenation and one gather, whatever the number of parts."""
    device, lengths = parts[0].device, [part.numel() for part in parts]
    flat = torch.cat([*parts, torch.full((1,), fill, dtype=parts[0].dtype, device=device)])
    starts = device_tensor([0, *itertools.accumulate(lengths[:-1])], device)
    column = torch.arange(max(lengths), device=device)
    inside = column < device_tensor(lengths, device).unsqueeze(1)
    return flat[torch.where(inside, starts.unsqueeze(1) + column, flat.numel() - 1)]


def estimated_hints(carried: Sequence[int], key_bits: int) -> list[Threshold | None]:
    """Hints from `threshold_estimates` summed over the ranks: per layer, the middle of the mean
    bracket, with half its width (and the estimates' rounding) as the margin; None where no rank
    estimated."""
    layers = len(carried) // 5
    rows = [carried[row * layers : (row + 1) * layers] for row in range(5)]
    unit = key_bits - ESTIMATE_BITS
    hints: list[Threshold | None] = []
    for layer, ranks in enumerate(rows[4]):
        if not ranks:
            hints.append(None)
            continue
        low, high = ((rows[row][layer] * 2**16 + rows[row + 1][layer]) // ranks << unit
                     for row in (0, 2))
        hints.append(Threshold(key_bits, (low + high) // 2, (high - low) // 2 + 2**unit))
    return hints


def _candidate_keys(scores: torch.Tensor, key_bits: int) -> torch.Tensor:
    """Keys whose bit patterns, read unsigned, order as `scores` do (-0.0 as +0.0): int32 for
    32-bit keys, int64 for 64-bit ones. Flipping the sign bit turns the signed order unsigned."""
    if key_bits == KEY_BITS:
        return _keys(scores) ^ SIGN_BIT
    if scores.is_floating_point():
        return signed_order_bits(scores.to(torch.float32), torch.int32) ^ -(2**31)
    return scores.to(torch.int32) ^ -(2**31)


def sharded_topk(
    shards: Sequence[ShardPiece],
    ks: Sequence[int],
    groups: Sequence[int],
    all_reduce_sum: Callable[[torch.Tensor], object],
    *,
    rank: int,
    world_size: int,
    eligible: Sequence[torch.Tensor] | None = None,
    bits_per_round: int | None = None,
    hints: Sequence[Threshold | Sequence[Threshold] | None] | None = None,
    carry: torch.Tensor | None = None,
    defer_ties: bool = False,
    defer_last_round: bool = False,
    settle: DeferredTies | None = None,
    layers_at_once: bool = False,
) -> ShardedSelection:
    """Independent top-k selections over groups of layers, sharing each round's all-reduce.

    Layer `i` belongs to group `groups[i]`; group `g` selects its `ks[g]` highest scores over its
    layers, ties going to the lower global index in (layer, rank, local index) order: one group
    of all layers is the global top-k, one group per layer the per-layer top-k. Each round
    all-reduces one (open groups x (2^bits + 1)) histogram: a group that has found its
    threshold drops out of later rounds, and the rounds end when every group has. `bits_per_round`
    fixes the digit width; by default each round takes `round_bits(open groups)`.

    `hints` (per group one, several or None) are thresholds an earlier selection found
    (`ShardedSelection.thresholds`) or estimates (`estimated_hints`); a group with hints spends
    its first round on a window of keys around each, and around one with a margin also on a
    finer window (see `_window_cells`), which saves rounds when its threshold lies within one
    and none when it does not. The masks never depend on the hints.

    `carry`, a 1-D integer tensor (on every rank the same length), travels with the first round
    as extra histogram rows and comes back summed over the ranks in `ShardedSelection.carried`:
    another selection's `threshold_estimates`, at no extra call. Its sums must fit the counts
    (int32 below 2^31 elements in all layers).

    `defer_ties` leaves the first tie round (by global index), where one is needed, to a later
    selection over the same pieces: the result's `deferred` holds it and its masks lack the tied
    entries. That selection, handed it as `settle`, carries the round in its first round (no
    call of its own; a further tie round, rarely needed, is a call of its own), takes the tied
    entries the earlier selection takes out of its own candidates (RigL: the grow's candidates
    are the entries its drop did not keep; every tied entry must be eligible) and returns the
    earlier selection's masks in `settled`. Until the round arrives, its first
    round counts the tied entries apart; where they could move its k-th largest key to another
    bucket it keeps the run of buckets from the k-th under the fewest of them that join to the
    k-th under the most, and its later rounds resolve the bits below their common prefix.

    `layers_at_once` reads the first round's pieces as one concatenation, with kernels that do
    not grow with the layers (for launch-bound devices: a GPU); else layer by layer.

    `defer_last_round` (one layer a group) also leaves the last histogram round to that
    selection: the first round that is likely its last (`_likely_last`). The later selection's
    first round carries its histogram and counts this selection's candidates apart, as it
    counts tied entries (of a layer's, exactly what its group still needs are kept); `take`
    then finishes this selection (rounds of their own where the deferred one was not its last)
    and hands on its tie round, which the later selection's next call carries. Where a
    tied entry is one the later selection's first round kept or selected on some rank, that
    call's round goes again knowing them (as many calls as deferring the ties alone). The
    thresholds this selection returns lack the deferred round's bits.
    """
    if bits_per_round is not None and not 1 <= bits_per_round <= 16:
        raise ValueError(f"bits_per_round must be 1 to 16, got {bits_per_round}")
    if any(k < 0 for k in ks):
        raise ValueError(f"cannot select {min(ks)} entries")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    if len(groups) != len(shards) or any(not 0 <= g < len(ks) for g in groups):
        raise ValueError(f"{len(groups)} group numbers for {len(shards)} layers and {len(ks)} groups")
    if hints is not None and len(hints) != len(ks):
        raise ValueError(f"{len(hints)} hints for {len(ks)} groups")
    if defer_last_round and len(set(groups)) != len(groups):
        raise ValueError("defer_last_round needs one layer a group")
    for layer, piece in enumerate(shards):
        _check_piece(piece, None if eligible is None else eligible[layer], layer, rank, world_size)
    sizes = [piece.scores.numel() for piece in shards]
    starts = [0, *itertools.accumulate(sizes)]
    if settle is not None:
        if [mask.numel() for mask in settle.masks] != sizes:
            raise ValueError("a settled selection must be over the same pieces")
    if not ks:
        if (carry is not None and carry.numel()) or settle is not None:
            what = "a carry" if settle is None else "a settled selection's round"
            raise ValueError(f"{what} needs a selection's first round to travel with")
        return ShardedSelection([], 0, 0, [], [])
    device = shards[0].scores.device if shards else torch.device("cpu")
    sent = {"bytes": 0, "calls": 0}

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        all_reduce_sum(tensor)
        sent["bytes"] += tensor.numel() * tensor.element_size()
        sent["calls"] += 1
        return tensor

    key_bits = _key_bits(shards)
    # Counts up to the model's size: int32 histograms (half the bytes) when they cannot overflow.
    count_dtype = torch.int32 if sum(piece.numel for piece in shards) < 2**31 else torch.int64
    need, done = list(ks), [False] * len(ks)
    bucket_size = [0] * len(ks)  # candidates of each group's k-th bucket, as of its last round
    tie_keys: dict[int, int] = {}  # groups breaking ties by index: their threshold key
    carried: list[int] = []

    def exchange(counts: torch.Tensor, nans: torch.Tensor, riders: Sequence[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """All-reduce the first round's (groups x buckets) counts, the NaN count and the 1-D
        `riders` (zero-padded whole rows below the histogram); the summed histogram rows (int64),
        NaN count and riders."""
        buckets = counts.shape[1]
        rows = torch.cat([counts, torch.zeros(len(counts), 1, dtype=counts.dtype, device=device)], 1)
        rows[0, buckets] = nans
        lengths = [rider.numel() for rider in riders]
        extra = sum(lengths)
        if extra:
            padded = torch.zeros(-(-extra // (buckets + 1)) * (buckets + 1), dtype=rows.dtype,
                                 device=device)
            padded[:extra] = torch.cat(list(riders)).to(rows.dtype)
            rows = torch.cat([rows, padded.view(-1, buckets + 1)])
        reduce(rows)
        summed = list(rows[len(counts):].reshape(-1)[:extra].to(torch.int64).split(lengths))
        rows = rows[: len(counts)]
        return rows[:, :buckets].to(torch.int64), rows[:, buckets].sum(), summed

    def decide(rows: torch.Tensor, nan_count: torch.Tensor, open_groups: list[int], first: bool,
               reported: torch.Tensor | None = None, need_offset: torch.Tensor | None = None,
               pending: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[torch.Tensor, list[int], list[int], list[int], list[int]]:
        """From the summed (open groups x buckets) counts: update `need` and `done`; return every
        cell's fate (0 drop, 1 select, 2 keep undecided), each open group's cell of its k-th
        largest key, the values of `reported` (read with the rest), the groups whose k-th
        bucket the pending entries leave uncertain, and each open group's lowest cell kept.
        With `pending` (per group their histogram and how many of them are candidates), a
        group keeps the cells from its k-th under the fewest candidates they could add to its
        k-th under the most; else that one cell. `need_offset` (per group) is first taken off
        `need`."""
        buckets = rows.shape[1]
        histogram = torch.zeros(len(ks), buckets, dtype=torch.int64, device=device)
        histogram[open_groups] = rows
        offset = torch.zeros(len(ks), dtype=torch.int64, device=device) \
            if need_offset is None else need_offset
        wanted = (device_tensor(need, device, torch.int64) - offset).unsqueeze(1)
        # Per group on the device, read in one transfer: the digit of its k-th largest key
        # (the highest d with at least `need` candidates at digit >= d), the candidates above
        # that digit and in it, and the group's total.
        at_least = histogram.flip(1).cumsum(1).flip(1)  # candidates with digit >= d
        digit_of_kth = ((at_least >= wanted).sum(1, keepdim=True) - 1).clamp_(min=0)
        lowest = digit_of_kth
        total = histogram.sum(1, keepdim=True)
        unsure = torch.zeros_like(total)
        if pending is not None:
            pending_rows, joining = pending
            joining = joining.unsqueeze(1)
            pending_at_least = pending_rows.flip(1).cumsum(1).flip(1)
            fewest = at_least + (joining - pending_at_least[:, :1] + pending_at_least).clamp(min=0)
            most = at_least + torch.minimum(pending_at_least, joining)
            lowest = ((fewest >= wanted).sum(1, keepdim=True) - 1).clamp_(min=0)
            digit_of_kth = ((most >= wanted).sum(1, keepdim=True) - 1).clamp_(min=0)
            unsure = ((pending_at_least.gather(1, lowest) > 0) & (joining > 0)).to(torch.int64)
            total = total + joining
        above = at_least.gather(1, digit_of_kth) - histogram.gather(1, digit_of_kth)
        in_bucket = at_least.gather(1, lowest) - above
        report = torch.cat([digit_of_kth, above, in_bucket, total, unsure, lowest], 1)
        extra = [] if reported is None else [reported.reshape(-1).to(torch.int64)]
        nan_total, *flat = torch.cat([nan_count.reshape(1).to(torch.int64), offset, *extra,
                                      report.reshape(-1)]).tolist()
        if nan_total:
            raise ValueError("scores contain NaN; top-k selection needs ordered scores")
        for group in range(len(ks)):
            need[group] -= flat[group]
        flat = flat[len(ks):]
        values = flat[: len(flat) - report.numel()]
        per_group = [flat[len(values) + 6 * group : len(values) + 6 * group + 6]
                     for group in range(len(ks))]
        if first:
            for group, (*_, total_of_group, _, _) in enumerate(per_group):
                if ks[group] > total_of_group:
                    where = f"group {group}: " if len(ks) > 1 else ""
                    raise ValueError(f"{where}cannot select {ks[group]} of {total_of_group} eligible entries")
        # An open group selects the digits above its k-th's and keeps the candidates from its
        # lowest digit kept to its k-th's, unless they are exactly what it still needs (it
        # completes: select them too); a group with nothing to select drops all. A group left
        # unsure by pending entries keeps them.
        kth, low, at_kth, live, unsure_groups = [], [], [], [], []
        for group in open_groups:
            digit_value, above_count, in_count, _, unsure_of, lowest_value = per_group[group]
            live.append(need[group] > 0)
            need[group] -= above_count if live[-1] else 0
            kth.append(digit_value)
            low.append(lowest_value)
            complete = need[group] == in_count and not unsure_of
            bucket_size[group] = in_count
            at_kth.append(1 if complete else 2)
            done[group] = not live[-1] or complete
            unsure_groups += [group] if unsure_of and live[-1] else []
        digit = torch.arange(buckets, device=device)
        kth_digit = device_tensor(kth, device, torch.int64).unsqueeze(1)
        low_digit = device_tensor(low, device, torch.int64).unsqueeze(1)
        fate = torch.where(digit > kth_digit, 1, 0) + torch.where(
            (digit >= low_digit) & (digit <= kth_digit),
            device_tensor(at_kth, device, torch.int64).unsqueeze(1), 0)
        fate *= device_tensor(live, device, torch.int64).unsqueeze(1)
        return fate.to(torch.int8), kth, values, unsure_groups, low

    # Digits no wider than the largest open group's elements call for: small layers send small
    # histograms.
    elements = [0] * len(ks)
    for group, piece in zip(groups, shards):
        elements[group] += piece.numel

    def width_of(open_groups: list[int], remaining: int) -> int:
        """A group breaking ties has its tied entries as candidates, not its elements."""
        if bits_per_round is not None:
            return min(bits_per_round, remaining)
        return round_bits(len(open_groups), remaining, max(
            bucket_size[group] << TIE_SPARE_BITS if group in tie_keys else elements[group]
            for group in open_groups))

    # Each group resolves its k-th key from the top: `remaining[g]` low bits still open, `prefix[g]`
    # the bits above them. The first round takes the top `width` bits. A group with hints counts
    # the keys in the cells of `_window_cells` (windows around its hints among top-bit cells, in
    # key order), each cell's lowest key a boundary for `torch.searchsorted`; its k-th cell gives
    # the prefix and the bits left.
    width = width_of(list(range(len(ks))), key_bits)
    usable = [[hint for hint in ((given,) if isinstance(given, Threshold) else given or ())
               if hint.key_bits == key_bits] for given in (hints or [None] * len(ks))]
    windows = [_window_cells(group_hints, width, key_bits) if group_hints else None
               for group_hints in usable]
    buckets = max([2**width] + [len(cells) for cells in windows if cells is not None])
    offset = 2 ** (KEY_BITS - 1) if key_bits == KEY_BITS else 0  # to `_ordered_keys`' values
    boundaries = [None if cells is None else [low - offset for low, _ in cells[1:]]
                  for cells in windows]
    boundary_tensors = [None if lows is None else device_tensor(lows, device, torch.int64)
                        for lows in boundaries]

    # The first round reads the pieces in chunks: every layer at once where `layers_at_once`
    # (one concatenation, each layer a segment of it: kernels that do not grow with the layers),
    # else layer by layer (cheaper where a kernel costs its work: a CPU). Each entry counts in its
    # cell: its group's row of `stride` cells, then its digit. Entries not counted (ineligible,
    # or untied in the pending rows) go to cell `buckets` of their row, or, reading all layers at
    # once, to one of `SPREAD_CELLS` cells after every row, by position. The undecided candidates it
    # leaves (about one in 2^width) go on together: their positions in the concatenation
    # (ascending, so each layer's form one segment), keys and layers. A settled selection's
    # tied entries count apart, in rows of their own.
    stride = buckets + 1
    chunks = [range(len(shards))] if layers_at_once and shards else \
        [range(layer, layer + 1) for layer in range(len(shards))]
    spread = SPREAD_CELLS if layers_at_once else 0
    counts = torch.zeros(len(ks) * stride + spread, dtype=torch.int64, device=device)
    pending_counts = None if settle is None else torch.zeros_like(counts)
    nans = torch.zeros((), dtype=torch.int64, device=device)
    first_cells, untakeable = [], []
    for chunk in chunks:
        keys, nan = _flat_keys([shards[layer] for layer in chunk], key_bits)
        cells, rows = _first_cells(keys, [groups[layer] for layer in chunk],
                                   [sizes[layer] for layer in chunk], stride, boundaries,
                                   boundary_tensors, width, key_bits)
        tied = None if settle is None else settle.tied[starts[chunk.start] : starts[chunk.stop]]
        past = None  # where entries not counted go: past the row, or spread by position
        if (eligible is not None or tied is not None) and spread:
            past = torch.arange(keys.numel(), device=device)
            past.bitwise_and_(spread - 1).add_(len(ks) * stride)
        elif eligible is not None or tied is not None:
            past = rows + buckets
        if eligible is not None:  # ineligible entries are not counted
            flags = _joined([eligible[layer] for layer in chunk])
            if tied is not None and settle.tied_layers:
                untakeable.append((tied & ~flags).any())
            nan, cells = nan & flags, torch.where(flags, cells, past)
        nans += torch.count_nonzero(nan)
        counted = cells
        if tied is not None:
            counted = torch.where(tied, past, cells)
            _tally(pending_counts, torch.where(tied, cells, past))  # untied: not counted
        _tally(counts, counted)
        first_cells.append((keys, cells))
    if untakeable and bool(torch.stack(untakeable).any()):  # one read
        raise ValueError("every entry tied in the settled selection must be eligible")
    counts = counts[: len(ks) * stride].view(len(ks), stride)[:, :buckets]
    if settle is not None:
        pending_counts = pending_counts[: len(ks) * stride].view(len(ks), stride)[:, :buckets]
    riders = [] if carry is None or not carry.numel() else [carry]
    pending = None
    if settle is not None:
        pending_groups = sorted({groups[layer] for layer in settle.tied_layers})
        riders += [settle.table, pending_counts[pending_groups, :buckets].reshape(-1)]
    rows, nan_count, summed = exchange(counts.to(count_dtype), nans, riders)
    follow = None  # the settled selection's ties, still to be exchanged (`defer_last_round`)
    if settle is not None:
        *summed, table, pending_rows = summed
        taken, tied_total, tied_taken, follow = settle.take(table, reduce)
        joining = torch.zeros(len(ks), dtype=torch.int64, device=device).index_add_(
            0, device_tensor([groups[layer] for layer in settle.tied_layers], device),
            tied_total - tied_taken)
        pending = (torch.zeros(len(ks), buckets, dtype=torch.int64, device=device).index_copy_(
            0, device_tensor(pending_groups, device), pending_rows.view(-1, buckets)), joining)
    reported = summed + ([] if pending is None else [pending[1]])
    fate, kth, values, unsure, lowest = decide(
        rows, nan_count, list(range(len(ks))), True, torch.cat(reported) if reported else None,
        pending=pending)
    if pending is not None:  # the pending entries that join may tie too: at most these more
        values, joining_counts = values[: -len(ks)], values[-len(ks):]
        for group, joining_count in enumerate(joining_counts):
            bucket_size[group] += joining_count
    carried.extend(values)
    settled: list[torch.Tensor] = []
    if settle is not None:
        settled = list((torch.cat(settle.masks) | taken).split(sizes))
    # Each group's candidates lie in its kept cells (one, or where pending entries left the
    # k-th uncertain, a run of them): the later rounds resolve the key bits below the prefix
    # all their keys share.
    remaining, prefix = [key_bits - width] * len(ks), list(kth)
    for group, cells in enumerate(windows):
        if cells is None:
            start, stop = lowest[group] << remaining[group], (kth[group] + 1) << remaining[group]
        elif kth[group] < len(cells):
            start = cells[lowest[group]][0] >> cells[lowest[group]][1] << cells[lowest[group]][1]
            stop = ((cells[kth[group]][0] >> cells[kth[group]][1]) + 1) << cells[kth[group]][1]
        else:  # past them: a group selecting none
            continue
        remaining[group] = (start ^ (stop - 1)).bit_length()
        prefix[group] = start >> remaining[group]
    # Every entry's fate (the cells past a row's buckets drop). The settled selection's tied
    # entries it took are no candidates; those it left are, and the groups left unsure learn in
    # the next call how many of them their first round selected.
    fate = torch.cat([fate, torch.zeros(len(ks), 1, dtype=fate.dtype, device=device)], 1).view(-1)
    if spread:
        fate = torch.cat([fate, torch.zeros(spread, dtype=fate.dtype, device=device)])
    relevant, joined, selected, open_ = [], [], [], []
    for chunk, (_, cells) in zip(chunks, first_cells):
        part = slice(starts[chunk.start], starts[chunk.stop])
        fate_of = fate.index_select(0, cells)  # on a CPU 4x a fancy index's speed
        if follow is not None:  # its tied entries not dropped here
            relevant.append(((fate_of != 0) & follow.tied[part]).sum())
        if settle is not None:
            fate_of.masked_fill_(taken[part], 0)
            tied = settle.tied[part] if follow is None else \
                settle.tied[part] & ~follow.tied[part]  # those the ties decide count later
            joined.append(segment_counts(tied & ~taken[part] & (fate_of == 1),
                                         [sizes[layer] for layer in chunk]))
        selected.append(fate_of == 1)
        open_.append(fate_of == 2)
    relevant = None if follow is None else torch.stack(relevant).sum().reshape(1)
    joined_above = torch.zeros(len(ks), dtype=torch.int64, device=device)
    if joined:
        joined_above.index_add_(0, device_tensor(groups, device), torch.cat(joined))
    selected = torch.cat(selected) if selected else torch.zeros(0, dtype=torch.bool, device=device)
    # The open entries, gathered after one read of their counts (none where every group is
    # done: no later round reads them).
    open_counts = [0] * len(chunks) if all(done) or not chunks else \
        torch.stack([torch.count_nonzero(flags) for flags in open_]).tolist()
    positions, keys, layers = [], [], []  # layers: of chunks of one layer (all or none)
    for chunk, (chunk_keys, _), flags, count in zip(chunks, first_cells, open_, open_counts):
        index = torch.nonzero_static(flags, size=count).squeeze(1)
        positions.append(index + starts[chunk.start])
        keys.append(chunk_keys.index_select(0, index))
        if len(chunk) == 1:
            layers.append(torch.full((count,), chunk.start, dtype=torch.int64, device=device))
    del first_cells, open_
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    positions, keys = (torch.cat(parts) if parts else empty for parts in (positions, keys))
    layer_of = torch.cat(layers) if layers else torch.searchsorted(
        device_tensor(starts[1:], device, torch.int64), positions, right=True)
    # An unsure group has bits left (keys of 32 or 64 bits, digits of at most 16): the next
    # round carries its correction.
    correction = joined_above[unsure] if unsure else None
    layer_group = device_tensor(groups, device, keys.dtype)

    def need_offset(summed: torch.Tensor) -> torch.Tensor:
        """The correction summed over the ranks, as an offset per group."""
        return torch.zeros(len(ks), dtype=torch.int64, device=device).index_copy_(
            0, device_tensor(unsure, device), summed)

    def settle_follow(table: torch.Tensor, send: Callable[[torch.Tensor], torch.Tensor]
                      ) -> torch.Tensor:
        """Take the settled selection's tied entries from their summed table: those it keeps
        are neither selected nor candidates here. Per group, how many of those it leaves this
        selection's first round selected."""
        nonlocal follow, settled, positions, keys, layer_of
        kept, *_ = follow.take(table, send)
        joined = follow.tied & ~kept & selected
        selected.logical_and_(~kept)
        candidates = ~kept[positions]
        positions, keys, layer_of = positions[candidates], keys[candidates], layer_of[candidates]
        settled = list((torch.cat(settled) | kept).split(sizes))
        follow = None
        return torch.zeros(len(ks), dtype=torch.int64, device=device).index_add_(
            0, device_tensor(groups, device), segment_counts(joined, sizes))

    # Ties: a group whose key bits are all fixed and which still has more candidates than it
    # needs goes on with their global indices in the group (its layers' sizes before the layer,
    # plus the index in the layer), reversed, as keys: `index_bits` of them.
    in_group = [0] * len(ks)
    reversed_base = []  # per layer: the reversed index of its position 0 in the concatenation
    for layer, piece in enumerate(shards):
        group = groups[layer]
        reversed_base.append(elements[group] - 1 - (in_group[group] + piece.offset - starts[layer]))
        in_group[group] += piece.numel
    index_bits = [max(1, (numel - 1).bit_length()) for numel in elements]

    def order_ties() -> None:
        """Give the candidates of every unfinished group with all key bits fixed their reversed
        global index as key, and the group the index bits to resolve."""
        nonlocal keys, layer_group
        tied = [group for group in range(len(ks)) if not done[group] and not remaining[group]]
        if not tied:
            return
        for group in tied:
            tie_keys[group] = prefix[group]
            prefix[group], remaining[group] = 0, index_bits[group]
        keys, layer_group = keys.to(torch.int64), layer_group.to(torch.int64)
        reversed_index = device_tensor(reversed_base, device, torch.int64).index_select(
            0, layer_of) - positions
        breaking = torch.zeros(len(ks), dtype=torch.bool, device=device)
        breaking[tied] = True
        keys = torch.where(breaking.index_select(0, layer_group.index_select(0, layer_of)),
                           reversed_index, keys)

    def next_round() -> _Round | None:
        """The next round's histogram over the candidates, or None when no group searches.
        Only groups still searching send a row (every rank knows which: `done` and `remaining`
        are global; closed groups have no candidates left). Each candidate counts in the cell
        (its group's row, its group's next digit)."""
        order_ties()
        open_groups = [group for group in range(len(ks)) if not done[group] and remaining[group]]
        if not open_groups:
            return None
        width = width_of(open_groups, max(remaining[group] for group in open_groups))
        digit_bits = {group: min(width, remaining[group]) for group in open_groups}
        cells = _cells(keys, layer_group.index_select(0, layer_of), open_groups, digit_bits,
                       [remaining[group] - digit_bits.get(group, 0) for group in range(len(ks))],
                       width, len(ks))
        counts = _tally(torch.zeros(len(open_groups) * 2**width, dtype=torch.int64, device=device),
                        cells)
        return _Round(open_groups, digit_bits, cells, counts.view(-1, 2**width),
                      _cell_bytes(max(bucket_size[group] for group in open_groups)))

    def apply_round(round_: _Round, rows: torch.Tensor, offset: torch.Tensor | None) -> None:
        """Decide a round from its summed histogram: select above each group's k-th digit,
        keep the candidates at it."""
        nonlocal positions, keys, layer_of
        fate, kth, *_ = decide(rows, torch.zeros((), dtype=torch.int64, device=device),
                               round_.open_groups, False, need_offset=offset)
        for group, digit_value in zip(round_.open_groups, kth):
            remaining[group] -= round_.digit_bits[group]
            prefix[group] = (prefix[group] << round_.digit_bits[group]) | digit_value
        fate_of = fate.reshape(-1).index_select(0, round_.cells)
        selected[positions] = selected[positions] | (fate_of == 1)
        keep = (fate_of == 2).nonzero().squeeze(1)
        positions, keys, layer_of = positions[keep], keys[keep], layer_of[keep]

    def ties_only(round_: _Round) -> bool:
        """Whether a round reads only global indices: the first that breaks ties."""
        return all(group in tie_keys for group in round_.open_groups)

    def run_rounds(send: Callable[[torch.Tensor], torch.Tensor], round_: _Round | None,
                   may_defer: Callable[[_Round], bool] | None = None) -> _Round | None:
        """Exchange and decide rounds until no group searches, the first of them `round_`; stop
        before a round that `may_defer` says to leave to a later selection and return it. The
        first carries the settled selection's ties if still to go; where some rank's first
        round kept or selected one of them (`relevant`), it counted them: the round goes again,
        without those the ties keep and with the correction of those they leave."""
        nonlocal correction
        while round_ is not None:
            if may_defer is not None and correction is None and follow is None \
                    and may_defer(round_):
                return round_
            riders = ([] if correction is None else [correction]) + \
                ([] if follow is None else [follow.table, relevant])
            words = wire(round_)
            payload = torch.cat([words, *(rider.to(count_dtype) for rider in riders)])
            send(payload)
            words, *summed = payload.split([words.numel(), *(rider.numel() for rider in riders)])
            rows, summed = counts_of(round_, words), [rider.to(torch.int64) for rider in summed]
            if follow is not None:
                summed, (table, relevant_sum) = summed[:-2], summed[-2:]
                joined = settle_follow(table, send)
                if int(relevant_sum):  # the round counted entries the ties now decide: again
                    correction = (joined_above + joined)[unsure] if unsure else None
                    round_ = next_round()
                    continue
            apply_round(round_, rows, None if correction is None else need_offset(summed[0]))
            correction = None
            round_ = next_round()
        return None

    def wire(round_: _Round) -> torch.Tensor:
        """A later round's counts as they travel, in `count_dtype`: a count in `cell_bytes`
        (`_pack`) where the groups' candidates, all ranks together, fit fewer than 4."""
        flat = round_.counts.reshape(-1) if round_.cell_bytes == 4 else \
            _pack(round_.counts, round_.cell_bytes)
        return flat.to(count_dtype)

    def counts_of(round_: _Round, summed: torch.Tensor) -> torch.Tensor:
        """The (open groups x 2^width) int64 counts of a round's `wire`, summed over the ranks."""
        counts = summed.to(torch.int64) if round_.cell_bytes == 4 else \
            _unpack(summed, round_.cell_bytes, round_.counts.numel())
        return counts.view(round_.counts.shape)

    def thresholds() -> list[Threshold | None]:
        return [Threshold(key_bits, tie_keys[group]) if group in tie_keys
                else Threshold(key_bits, prefix[group] << remaining[group])
                if ks[group] and remaining[group] < key_bits else None for group in range(len(ks))]

    def defer(round_: _Round, hand_on_ties: bool) -> ShardedSelection:
        """The selection so far, leaving `round_` and the rounds after it to a later selection:
        that selection's first round carries this round's histogram, and `take` finishes the
        selection (any further rounds as calls of their own), with `hand_on_ties` but its first
        tie round, which it hands on for the later selection's next call to carry. The
        candidates left are that selection's pending entries: of a layer's, exactly what its
        group still needs are kept."""
        candidates = torch.zeros_like(selected)
        candidates[positions] = True
        layers = [layer for layer in range(len(shards)) if not done[groups[layer]]]
        totals, kept = (device_tensor([values[groups[layer]] for layer in layers], device,
                                      torch.int64)
                        for values in (bucket_size, need))
        masks = list(selected.clone().split(sizes))

        def take(summed: torch.Tensor, send: Callable[[torch.Tensor], torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, DeferredTies | None]:
            apply_round(round_, counts_of(round_, summed), None)
            ties = run_rounds(send, next_round(), ties_only if hand_on_ties else None)
            handed = None if ties is None else defer(ties, False).deferred
            return selected & candidates, totals, kept, handed

        return ShardedSelection(masks, sent["bytes"], sent["calls"], thresholds(), carried,
                                deferred=DeferredTies(masks, candidates, layers, wire(round_),
                                                      take))

    def leave_for_later(round_: _Round) -> bool:
        return (defer_last_round and settle is None
                and _likely_last(round_, remaining, bucket_size)) or \
            ((defer_ties or defer_last_round) and ties_only(round_))

    last = run_rounds(reduce, next_round(), leave_for_later)
    if last is not None:
        return defer(last, not ties_only(last))
    if follow is not None:  # the rounds ended before the settled selection's ties went
        settle_follow(reduce(follow.table), reduce)
    return ShardedSelection(list(selected.split(sizes)), sent["bytes"], sent["calls"],
                            thresholds(), carried, settled=settled)


class _Round(NamedTuple):
    """A histogram round over the candidates: the groups searching, the digit bits each reads,
    every candidate's cell and this rank's counts. Every candidate belongs to a group searching:
    the others are done and have none."""

    open_groups: list[int]
    digit_bits: dict[int, int]
    cells: torch.Tensor
    counts: torch.Tensor
    cell_bytes: int  # on the wire (`_cell_bytes`)


def _cell_bytes(most: int) -> int:
    """Bytes a count of a later round takes on the wire: 1, 2 or 4, the fewest that hold `most`,
    a group's candidates on all ranks together (no cell's sum over the ranks exceeds it)."""
    return 1 if most < 2**8 else 2 if most < 2**16 else 4


def _pack(counts: torch.Tensor, cell_bytes: int) -> torch.Tensor:
    """Counts of `cell_bytes` bytes each, side by side (little-endian) in int32 words: where each
    count's sum over the ranks fits its bytes, a sum of the words is every count's sum, with no
    carry from one count into the next (and an int32 sum that wraps keeps the bytes)."""
    flat = counts.reshape(-1)
    data = torch.stack([(flat >> 8 * byte) & 0xFF for byte in range(cell_bytes)], 1).reshape(-1)
    words = torch.zeros(-(-data.numel() // 4) * 4, dtype=torch.uint8, device=flat.device)
    words[: data.numel()] = data
    return words.view(torch.int32)


def _unpack(summed: torch.Tensor, cell_bytes: int, count: int) -> torch.Tensor:
    """The first `count` counts (int64) of `_pack`ed words summed over the ranks, in any integer
    dtype: a sum in a wider one keeps the words in its low 32 bits."""
    data = summed.to(torch.int32).view(torch.uint8)[: count * cell_bytes].view(count, cell_bytes)
    counts = data[:, 0].to(torch.int64)
    for byte in range(1, cell_bytes):
        counts += data[:, byte].to(torch.int64) << 8 * byte
    return counts


LIKELY_LAST = 16
"""Buckets a candidate at least, in a round `_likely_last` defers: the k-th bucket then most
likely holds just what its group needs."""


def _likely_last(round_: _Round, remaining: list[int], bucket_size: list[int]) -> bool:
    """Whether a round is likely a selection's last (`defer_last_round`): for every open group
    it fixes the last bits, or spreads the group's candidates (its k-th bucket of the round
    before) over at least `LIKELY_LAST` buckets each."""
    return all(remaining[group] == bits or bucket_size[group] * LIKELY_LAST <= 2**bits
               for group, bits in round_.digit_bits.items())


def _cells(keys: torch.Tensor, group_of: torch.Tensor, open_groups: list[int],
           digit_bits: dict[int, int], remaining: list[int], width: int, groups: int
           ) -> torch.Tensor:
    """Each candidate's histogram cell, in the keys' dtype: its group's row of 2^width (open
    groups in order) plus its group's next digit, `digit_bits` above the `remaining` low bits.
    Where every open group reads the same bits (the usual round), no per-candidate shift."""
    row_of_group = torch.full((groups,), -1, dtype=keys.dtype, device=keys.device)
    row_of_group[open_groups] = torch.arange(0, len(open_groups) * 2**width, 2**width,
                                             dtype=keys.dtype, device=keys.device)
    reads = {(remaining[group], digit_bits[group]) for group in open_groups}
    if len(reads) == 1:
        (shift, bits), = reads
        cells = keys >> shift
        cells &= 2**bits - 1
    else:
        shift_of_group = device_tensor(remaining, keys.device, keys.dtype)
        mask_of_group = device_tensor([2 ** digit_bits.get(group, 0) - 1 for group in range(groups)],
                                      keys.device, keys.dtype)
        cells = keys >> shift_of_group[group_of]
        cells &= mask_of_group[group_of]
    cells += row_of_group[group_of]
    return cells


def _tally(counts: torch.Tensor, cells: torch.Tensor,
           weights: torch.Tensor | None = None) -> torch.Tensor:
    """`counts` (int64) plus, in place, the entries of `cells` that fall in each (each counting
    its `weights` where given, 0 or 1): an index_add_, which reads nothing on the host (bincount
    reads the cells' maximum first) and on a CPU costs less."""
    if weights is None:
        weights = torch.ones((), dtype=counts.dtype, device=counts.device).expand(cells.numel())
    return counts.index_add_(0, cells, weights)


def _flat_keys(shards: Sequence[ShardPiece], key_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys (`_candidate_keys`) of one or more pieces' scores, flattened into one (`_joined`),
    and where the scores are NaN."""
    scores = [piece.scores for piece in shards]
    if len({layer.dtype for layer in scores}) > 1:  # keys of one dtype from scores of several
        return (torch.cat([_candidate_keys(layer.reshape(-1), key_bits) for layer in scores]),
                _joined([torch.isnan(layer) for layer in scores]))
    flat = _joined(scores)
    return _candidate_keys(flat, key_bits), torch.isnan(flat)


def _joined(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors flattened into one: a view of a lone one, else a concatenation."""
    return tensors[0].reshape(-1) if len(tensors) == 1 else \
        torch.cat([tensor.reshape(-1) for tensor in tensors])


def _first_cells(keys: torch.Tensor, groups: Sequence[int], sizes: Sequence[int], stride: int,
                 boundaries: Sequence[list[int] | None],
                 boundary_tensors: Sequence[torch.Tensor | None], width: int, key_bits: int
                 ) -> tuple[torch.Tensor, torch.Tensor | int]:
    """The first-round cell of each of the consecutive layers' `keys` (layer i of `sizes[i]`
    entries in group `groups[i]`), and each entry's row start (one number for one layer): its
    group's row of `stride` cells, then its top `width` key bits or, in a group with window
    cells, the cell holding its key (`boundaries`: per group each cell's lowest key but the
    first's, as `_ordered_keys` values; None without windows; `boundary_tensors` the same on
    the keys' device).

    Over several layers with 32-bit keys, one search over every group's boundaries at once, each
    group's padded to `stride` above its own keys and offset by its row times 2^32: the count of
    boundaries up to an entry's key is then its cell."""
    device = keys.device

    def top_bits() -> torch.Tensor:
        return (keys >> (key_bits - width)) & (2**width - 1)

    if len(groups) == 1:
        row, lows = groups[0] * stride, boundary_tensors[groups[0]]
        if lows is None:
            return top_bits() + row, row
        return torch.searchsorted(lows, _ordered_keys(keys, key_bits), right=True) + row, row
    rows = device_tensor([group * stride for group in groups], device, torch.int64).index_select(
        0, segment_ids(sizes, device))
    if all(lows is None for lows in boundaries):
        return top_bits() + rows, rows
    if key_bits == KEY_BITS:  # 64-bit keys: layer by layer
        top, starts = top_bits(), [0, *itertools.accumulate(sizes)]
        for layer, group in enumerate(groups):
            if boundaries[group] is not None:
                part = slice(starts[layer], starts[layer + 1])
                top[part] = torch.searchsorted(boundary_tensors[group],
                                               _ordered_keys(keys[part], key_bits), right=True)
        return top + rows, rows
    uniform = [digit << (key_bits - width) for digit in range(1, 2**width)]
    table = []
    for group, lows in enumerate(boundaries):
        lows = uniform if lows is None else lows
        table += [(group * stride << key_bits) + low
                  for low in lows + [2**key_bits] * (stride - len(lows))]
    ordered = _ordered_keys(keys, key_bits)
    ordered += rows << key_bits
    return torch.searchsorted(device_tensor(table, device, torch.int64), ordered,
                              right=True), rows


def _ordered_keys(keys: torch.Tensor, key_bits: int) -> torch.Tensor:
    """int64 values whose signed order is the unsigned order of the keys' bit patterns."""
    if key_bits == KEY_BITS:
        return keys ^ SIGN_BIT
    return keys.to(torch.int64) & (2**key_bits - 1)


def _window_cells(hints: Sequence[Threshold], width: int, key_bits: int) -> list[tuple[int, int]]:
    """A hinted group's first-round cells in key order: each cell's lowest key and the key bits
    below its aligned digit, which later rounds resolve.

    A window of 2^width cells of 2^`_window_shift` keys around each hint, among the cells of the
    fewest top bits that leave the keys outside them no more rounds than the top `width` bits
    would (2 bits for 6-bit digits on 32-bit keys: 30 bits left, 5 rounds, as for 26), so a
    threshold outside costs no round against no hint. A hint with a margin (estimates) also gets
    a window of 2^width cells as fine as covers the margin inside its own, whose miss costs no
    round against the plain windows.
    """
    shift = _window_shift(width, key_bits)
    top_bits = key_bits - width * -(-(key_bits - width) // width)
    cells = [(digit << (key_bits - top_bits), key_bits - top_bits) for digit in range(2**top_bits)]
    for hint in hints:
        cells = _nest(cells, hint.key, shift, width, key_bits)
    for hint in hints:
        if hint.margin and width > 1:
            fine = max(0, (-(-hint.margin // (2 ** (width - 1) - 1)) - 1).bit_length())
            fine = width * -(-fine // width)
            if fine < shift:
                cells = _nest(cells, hint.key, fine, width, key_bits)
    return cells


def _nest(cells: list[tuple[int, int]], key: int, shift: int, width: int,
          key_bits: int) -> list[tuple[int, int]]:
    """`cells` with a window of 2^width cells of 2^shift keys around `key` in place of the keys
    it covers; the cell holding the window's end goes on above it."""
    first = min(max((key >> shift) - 2 ** (width - 1), 0), 2 ** (key_bits - shift) - 2**width)
    start, stop = first << shift, (first + 2**width) << shift
    holder = [cell for cell in cells if cell[0] < stop][-1]
    above = [cell for cell in cells if cell[0] >= stop]
    if stop < 2**key_bits and (not above or above[0][0] > stop):
        above.insert(0, (stop, holder[1]))
    return ([cell for cell in cells if cell[0] < start]
            + [((first + cell) << shift, shift) for cell in range(2**width)] + above)


def _window_shift(width: int, key_bits: int) -> int:
    """Bits below a hinted first round's fine buckets: the least multiple of `width` (later
    rounds resolve it in whole digits) of at least `key_bits` - `WINDOW_FIXED_BITS`, or, where
    that leaves no whole digit above it, the largest multiple that does."""
    shift = width * -(-(key_bits - WINDOW_FIXED_BITS) // width)
    return shift if shift <= key_bits - width else width * ((key_bits - width) // width)
