"""Where mask elements live, and every selection that depends on it (DESIGN section 2).

Methods compute scores element-wise and ask a layout for everything else: active counts, per-layer
and global top-k, RigL's drop-and-grow, counter-based random scores and the layers' full shapes.
Two layouts give identical masks:

- `FullLayout`: every rank holds each layer's full tensor (one process, DDP, ZeRO 0-2); selection is
  local (`sparsity.select`) and identical on every rank.
- `PieceLayout`: every rank holds one contiguous 1-D piece of each flattened layer, in rank order
  (`contiguous_partition`): ZeRO-3's `ds_tensor` without its padding, or, with a row as the unit,
  the local shard of FSDP2's Shard(0) DTensor (uneven when rows do not divide). Selections run
  `sharded_select.sharded_topk` (one histogram all-reduce per round for all layers together, 2-4
  rounds a selection; on a launch-bound device each started from the threshold the same
  selection found last time, a run's first drop from the ranks' estimates taken at its first step
  (`expect_drop`), and RigL's grow from the ranks' estimates carried by the drop's first
  round; the drop's last round travels with the grow's first round, and its tie round with
  the grow's next call),
  counts are one all-reduce of one int64 a layer, and no score, weight or gradient leaves its
  rank. Only `full_masks` moves masks: one all-gather of the bit-packed pieces
  (numel / 8 bytes a layer), for checkpoints, fingerprints and persistent parameters, never for a
  selection.

Counts of masks a layout made or counted are remembered while the tensor is unedited: a
drop-and-grow keeps each layer's count, so an update after one counts nothing (no all-reduce on
pieces, no host read on full tensors).
"""
from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch

from distsparse.sparsity.scores import random_scores, random_scores_of_ranges
from distsparse.sparsity.select import drop_and_grow_masks, global_topk_counted, launch_bound, \
    topk_masks
from distsparse.sparsity.sharded_select import (
    ShardedSelection,
    ShardPiece,
    Threshold,
    contiguous_partition,
    estimated_hints,
    selection_key_bits,
    sharded_topk,
    threshold_estimates,
)

__all__ = ["FullLayout", "PieceLayout", "full_layout_of", "pack_bits"]

Masks = dict[str, torch.Tensor]
AllReduceSum = Callable[[torch.Tensor], object]
AllGather = Callable[[torch.Tensor], Sequence[torch.Tensor]]


class FullLayout:
    """Full tensors on every rank: selections are local and need no collective."""

    sharded = False

    def __init__(self, shapes: Mapping[str, Sequence[int]]) -> None:
        self.shapes = {name: tuple(shape) for name, shape in shapes.items()}
        self._known: dict[str, tuple[weakref.ref, int, int]] = {}

    def _recall(self, masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """The counts this layout knows of these very mask tensors, unedited since (`_version`)."""
        known = {}
        for name, mask in masks.items():
            entry = self._known.get(name)
            if entry is not None and entry[0]() is mask and entry[1] == mask._version:
                known[name] = entry[2]
        return known

    def _remember(self, masks: Mapping[str, torch.Tensor], counts: Mapping[str, int]) -> None:
        for name, count in counts.items():
            self._known[name] = (weakref.ref(masks[name]), masks[name]._version, count)

    def active_counts(self, masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Active entries of each given layer's full mask.

        Counts of masks this layout made (`topk_per_layer`, `drop_and_grow`) or counted before are
        remembered while the tensor is unedited, so counting them again costs nothing; the others
        are counted together (`_count`). The decision depends only on what was done to the masks,
        the same on every rank, so ranks always agree on whether a collective runs.
        """
        known = self._recall(masks)
        unknown = {name: mask for name, mask in masks.items() if name not in known}
        if unknown:
            counted = self._count(unknown)
            self._remember(unknown, counted)
            known.update(counted)
        return {name: known[name] for name in masks}

    @property
    def names(self) -> list[str]:
        """Layer names in global-index order."""
        return list(self.shapes)

    def numel(self, name: str) -> int:
        """Elements of a layer's full tensor."""
        return math.prod(self.shapes[name])

    def piece(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a full tensor of the layer (here the tensor itself)."""
        return full

    def _count(self, masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Active entries of each layer's full mask: one host read for all layers."""
        counts = torch.stack([torch.count_nonzero(mask) for mask in masks.values()]).tolist()
        return dict(zip(masks, counts))

    def topk_per_layer(
        self, scores: Mapping[str, torch.Tensor], ks: Mapping[str, int],
        eligible: Mapping[str, torch.Tensor] | None = None,
    ) -> Masks:
        """Per named layer in `ks`: the ks[name] highest scores among eligible entries."""
        names = list(ks)
        masks = dict(zip(names, topk_masks(
            [scores[name] for name in names], [ks[name] for name in names],
            None if eligible is None else [eligible[name] for name in names])))
        self._remember(masks, ks)
        return masks

    def global_topk(
        self, scores: Mapping[str, torch.Tensor], k: int,
        eligible: Mapping[str, torch.Tensor] | None = None,
    ) -> Masks:
        """The k highest scores over all given layers, in the layout's layer order: one host read
        where the eligible masks' counts are known, and then the result's counts are too."""
        names = [name for name in self.names if name in scores]
        allowed = None if eligible is None else {name: eligible[name] for name in names}
        known = {} if allowed is None else self._recall(allowed)
        n_eligible = sum(known.values()) if allowed is not None and len(known) == len(names) \
            else None
        masks, counts = global_topk_counted({name: scores[name] for name in names}, k, allowed,
                                            n_eligible)
        if counts is not None:
            self._remember(masks, counts)
        return masks

    def expect_drop(self, drop_scores: Mapping[str, torch.Tensor],
                    masks: Mapping[str, torch.Tensor], keep: float) -> None:
        """Ready the next `drop_and_grow` for drop scores like these: nothing on full tensors,
        whose selections are local."""

    def drop_and_grow(
        self, masks: Mapping[str, torch.Tensor], drop_scores: Mapping[str, torch.Tensor],
        grow_scores: Mapping[str, torch.Tensor], counts: Mapping[str, int],
        active: Mapping[str, int] | None = None,
    ) -> Masks:
        """`select.drop_and_grow` of every layer with a positive count; new masks of those layers.

        `active`, the masks' `active_counts` if the caller has them, spares counting them again.
        """
        names = [name for name, count in counts.items() if count > 0]
        if active is None:
            active = self.active_counts({name: masks[name] for name in names})
        new = dict(zip(names, drop_and_grow_masks(
            [masks[name] for name in names], [drop_scores[name] for name in names],
            [grow_scores[name] for name in names], [counts[name] for name in names],
            [active[name] for name in names])))
        self._remember(new, {name: active[name] for name in names})  # drop n, grow n
        return new

    def random_scores(self, seed: int, step: int, purpose: str, names: Sequence[str],
                      device: torch.device | str = "cpu") -> Masks:
        """Counter-based scores keyed by (seed, step, layer, global element index): one draw over
        all layers on a launch-bound device."""
        ranges = {name: (0, self.numel(name), self.shapes[name]) for name in names}
        return self._random_scores(seed, step, purpose, ranges, device)

    @staticmethod
    def _random_scores(seed: int, step: int, purpose: str,
                       ranges: Mapping[str, tuple[int, int, tuple[int, ...]]],
                       device: torch.device | str) -> Masks:
        """Scores of each named layer's global indices [start, start + count), shaped as given."""
        if launch_bound(torch.device(device)) and all(start + count <= 2**32
                                                      for start, count, _ in ranges.values()):
            flats = random_scores_of_ranges(seed, step, purpose, [
                (name, start, count) for name, (start, count, _) in ranges.items()], device)
            return {name: flat.view(shape)
                    for (name, (_, _, shape)), flat in zip(ranges.items(), flats)}
        return {name: random_scores(shape, seed, step, name, purpose, device=device, offset=start)
                for name, (start, _, shape) in ranges.items()}

    def full_masks(self, masks: Mapping[str, torch.Tensor]) -> Masks:
        """Full-shape masks of the given layers (here the masks themselves)."""
        return dict(masks)


def full_layout_of(masks: Mapping[str, torch.Tensor]) -> FullLayout:
    """The full layout of masks held whole, shaped as they are."""
    return FullLayout({name: tuple(mask.shape) for name, mask in masks.items()})


class PieceLayout(FullLayout):
    """Pieces: each rank holds [start, stop) of every flattened layer, selections sharded.

    A layer's `units[name]` elements (default 1: ZeRO-3; a row: FSDP2's Shard(0)) are split
    over the ranks as `contiguous_partition` says. `all_reduce_sum` sums an int64 tensor over
    ranks in place; `all_gather` returns every rank's copy of an equal-sized uint8 tensor, in rank
    order. Every method is a collective: all ranks call it with the same layers. `bytes_sent` adds
    up the all-reduce payload of the counts and selections this rank took part in (not the mask
    gathers, counted in `bytes_gathered`).
    """

    sharded = True

    def __init__(self, shapes: Mapping[str, Sequence[int]], rank: int, world_size: int,
                 all_reduce_sum: AllReduceSum, all_gather: AllGather,
                 units: Mapping[str, int] | None = None) -> None:
        super().__init__(shapes)
        self.rank, self.world_size = rank, world_size
        self.all_reduce_sum, self.all_gather = all_reduce_sum, all_gather
        self.units = {name: (units or {}).get(name, 1) for name in shapes}
        self.bounds = {name: self.bounds_of(name, rank) for name in shapes}
        self.bytes_sent, self.bytes_gathered = 0, 0
        self._thresholds: dict[tuple[str, object], Threshold | None] = {}

    def bounds_of(self, name: str, rank: int) -> tuple[int, int]:
        """[start, stop) of the flattened layer that `rank` holds."""
        return contiguous_partition(self.numel(name), rank, self.world_size, self.units[name])

    def piece(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's [start, stop) of the flattened tensor."""
        start, stop = self.bounds[name]
        return full.reshape(-1)[start:stop]

    def _ordered(self, layers: Mapping[str, object]) -> list[str]:
        return [name for name in self.names if name in layers]

    def _count(self, masks: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """Active entries of each layer's full mask: one all-reduce for all layers."""
        names = self._ordered(masks)
        counts = torch.stack([masks[name].sum() for name in names])
        self.all_reduce_sum(counts)
        self.bytes_sent += counts.numel() * counts.element_size()
        return dict(zip(names, counts.tolist()))

    def _select(self, scores: Mapping[str, torch.Tensor], names: list[str], ks: list[int],
                groups: list[int], eligible: Mapping[str, torch.Tensor] | None,
                hint_keys: list[tuple[str, object]],
                hints: list[Threshold | tuple[Threshold, ...] | None] | None = None,
                **options: object) -> ShardedSelection:
        """`sharded_topk` of the named pieces, its groups started from `hints` if given, else from
        the thresholds the last selections with their hint keys found (the same masks; fewer
        rounds where they moved little); `options` go to `sharded_topk` (carry, defer_ties,
        defer_last_round, settle)."""
        shards = [ShardPiece(scores[name].reshape(-1), self.bounds[name][0], self.numel(name),
                             self.units[name]) for name in names]
        hinted = self._hints_pay(scores)
        if hints is None and hinted:
            hints = [self._thresholds.get(key) for key in hint_keys]
        selection = sharded_topk(
            shards, ks, groups, self.all_reduce_sum, rank=self.rank, world_size=self.world_size,
            eligible=None if eligible is None else [eligible[name].reshape(-1) for name in names],
            hints=hints if hinted else None, layers_at_once=hinted, **options)
        self._thresholds.update(zip(hint_keys, selection.thresholds))
        self.bytes_sent += selection.bytes_sent
        return selection

    @staticmethod
    def _hints_pay(scores: Mapping[str, torch.Tensor]) -> bool:
        """Whether selections over these scores start from hints (and read all layers at once):
        on a launch-bound device, where a hinted first round's search over the scores is one
        kernel and the round it saves costs more. On a CPU that search costs more than the
        round (a binary search per score against a loopback all-reduce)."""
        return bool(scores) and launch_bound(next(iter(scores.values())).device)

    def _layer_select(self, scores: Mapping[str, torch.Tensor], ks: Mapping[str, int],
                      eligible: Mapping[str, torch.Tensor] | None, purpose: str,
                      hints: list[Threshold | tuple[Threshold, ...] | None] | None = None,
                      **options: object) -> ShardedSelection:
        names = self._ordered(ks)
        selection = self._select(scores, names, [ks[name] for name in names],
                                 list(range(len(names))), eligible,
                                 [(purpose, name) for name in names], hints, **options)
        if selection.deferred is None:
            self._remember(dict(zip(names, selection.masks)), ks)
        return selection

    def topk_per_layer(
        self, scores: Mapping[str, torch.Tensor], ks: Mapping[str, int],
        eligible: Mapping[str, torch.Tensor] | None = None,
    ) -> Masks:
        """Per named layer in `ks`, batched: every layer shares each round's all-reduce."""
        return dict(zip(self._ordered(ks), self._layer_select(scores, ks, eligible, "layer").masks))

    def global_topk(
        self, scores: Mapping[str, torch.Tensor], k: int,
        eligible: Mapping[str, torch.Tensor] | None = None,
    ) -> Masks:
        """The k highest scores over all given layers' pieces, exactly as over the full tensors."""
        names = self._ordered(scores)
        return dict(zip(names, self._select(scores, names, [k], [0] * len(names), eligible,
                                            [("global", tuple(names))]).masks))

    def expect_drop(self, drop_scores: Mapping[str, torch.Tensor],
                    masks: Mapping[str, torch.Tensor], keep: float) -> None:
        """Start the next `drop_and_grow`'s drop from the ranks' estimates of its thresholds
        over drop scores like these, keeping about `keep` of each layer's active entries (the
        drop's hint, as the thresholds of an earlier drop are; one all-reduce now). Only on a
        launch-bound device, where the next drop starts from hints at all: a run's first update
        then starts as warm as the later ones (its weights moved by its first steps, the window
        around the estimate a factor 2 either way of it, its miss costing no round)."""
        names = self._ordered(masks)
        if not names or not self._hints_pay(drop_scores):
            return
        scores = [drop_scores[name].reshape(-1) for name in names]
        key_bits = selection_key_bits(scores)
        estimates = threshold_estimates(scores, [masks[name].reshape(-1) for name in names],
                                        [keep] * len(names), key_bits, self.world_size)
        self.all_reduce_sum(estimates)
        self.bytes_sent += estimates.numel() * estimates.element_size()
        for name, hint in zip(names, estimated_hints(estimates.tolist(), key_bits)):
            self._thresholds[("drop", name)] = hint

    def drop_and_grow(
        self, masks: Mapping[str, torch.Tensor], drop_scores: Mapping[str, torch.Tensor],
        grow_scores: Mapping[str, torch.Tensor], counts: Mapping[str, int],
        active: Mapping[str, int] | None = None,
    ) -> Masks:
        """`select.drop_and_grow` of every layer with a positive count: two batched selections
        (and one all-reduce of the active counts unless `active` gives them).

        On a launch-bound device the grow selection starts from the ranks' estimates of its
        thresholds (over the entries inactive now: the grow's candidates but the dropped), which
        the drop's first round carries, and from the thresholds it found the update before (the
        estimates miss where the ranks' pieces differ, as rows of a real layer do). Its first
        round carries the drop's last round, its next call the drop's tie round. The masks
        depend on none of them.
        """
        swapping = {name: count for name, count in counts.items() if count > 0}
        if not swapping:
            return {}
        if active is None:
            active = self.active_counts({name: masks[name] for name in swapping})
        names = self._ordered(swapping)
        grow_bits = selection_key_bits([grow_scores[name] for name in names])
        estimates = threshold_estimates(
            [grow_scores[name] for name in names], [~masks[name] for name in names],
            [swapping[name] / (self.numel(name) - active[name] + swapping[name]) for name in names],
            grow_bits, self.world_size) if self._hints_pay(grow_scores) else None
        drop = self._layer_select(
            drop_scores, {name: active[name] - count for name, count in swapping.items()}, masks,
            "drop", carry=estimates, defer_last_round=True)
        hints = None if estimates is None else [
            tuple(hint for hint in (estimate, self._thresholds.get(("grow", name))) if hint)
            for estimate, name in zip(estimated_hints(drop.carried, grow_bits), names)]
        not_kept = (~torch.cat(drop.masks)).split([kept.numel() for kept in drop.masks])
        grow = self._layer_select(grow_scores, swapping, dict(zip(names, not_kept)), "grow",
                                  hints=hints, settle=drop.deferred)
        kept = grow.settled or drop.masks
        new = {name: kept_of | grown for name, kept_of, grown in zip(names, kept, grow.masks)}
        self._remember(new, {name: active[name] for name in swapping})  # drop n, grow n
        return new

    def random_scores(self, seed: int, step: int, purpose: str, names: Sequence[str],
                      device: torch.device | str = "cpu") -> Masks:
        """Counter-based scores of this rank's pieces, keyed by the global element index."""
        pieces = {name: self.bounds[name] for name in names}
        ranges = {name: (start, stop - start, (stop - start,))
                  for name, (start, stop) in pieces.items()}
        return self._random_scores(seed, step, purpose, ranges, device)

    def full_masks(self, masks: Mapping[str, torch.Tensor]) -> Masks:
        """Full-shape masks from every rank's piece: one all-gather of the largest piece's bits a layer."""
        names = self._ordered(masks)
        if not names:
            return {}
        chunks = [self.bounds_of(name, 0)[1] for name in names]  # rank 0's piece is the largest
        device = masks[names[0]].device
        bits = torch.zeros(-(-sum(chunks) // 8) * 8, dtype=torch.bool, device=device)
        offset = 0
        for name, chunk in zip(names, chunks):
            piece = masks[name].reshape(-1)
            bits[offset : offset + piece.numel()] = piece
            offset += chunk
        packed = pack_bits(bits)
        gathered = [_unpack_bits(part) for part in self.all_gather(packed)]
        self.bytes_gathered += packed.numel()
        full, offset = {}, 0
        for name, chunk in zip(names, chunks):
            parts = []
            for rank, bits_of_rank in enumerate(gathered):
                start, stop = self.bounds_of(name, rank)
                parts.append(bits_of_rank[offset : offset + stop - start])
            full[name] = torch.cat(parts).view(self.shapes[name])
            offset += chunk
        return full


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_GATHER_BITS = 0x8040201008040201 - 2**64
"""As an int64: times a word of eight 0/1 bytes, it moves byte j's bit to bit 63 - j, and no
partial product carries into the top byte (checked for all 256 patterns in the tests)."""


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Eight booleans a byte (length a multiple of 8), most significant bit first, on their device.

    One multiply per eight booleans, read as a little-endian int64 word (x86-64, AArch64, GPUs).
    """
    words = bits.reshape(-1).to(torch.uint8).view(torch.int64)
    return ((words * _GATHER_BITS) >> 56 & 0xFF).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor) -> torch.Tensor:
    weights = _BIT_WEIGHTS.to(packed.device)
    return (packed.unsqueeze(1) & weights).ne(0).reshape(-1)
