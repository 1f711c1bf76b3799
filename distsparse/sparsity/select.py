"""Exact top-k selection with ties broken by global element index, and RigL's drop/grow step.

`torch.topk` does not specify which of several equal scores it returns; here the order is that of
a stable descending sort: among equal scores the lower flat (global) index is chosen first, NaN
ranks above every number and -0.0 equals +0.0. The result depends only on the scores, never on the
device, thread count or world size.

No sort: a selection finds the k-th largest eligible score v (over the gathered eligible scores
where they are few, else over all with ineligible entries at the dtype's lowest value) and takes
every eligible entry not below v; where that is more than k, v is tied and the surplus entries
equal to v with the highest indices are dropped. v comes from one `torch.topk`, or on tensors of
`SAMPLED_FROM` scores or more from a sample that brackets it and a sort of the few entries inside
the bracket, checked exact in the same device read (a topk where the check fails). Selections over
several tensors (per-layer top-k, drop-and-grow) read all their counts from the device in one
transfer. A drop-and-grow's grow selections start before that read, on the drop selections'
candidates, which the read confirms unless a drop threshold is tied (then a second read); a global
selection's read also gives each layer's selected count. On a device whose kernel launches cost
more than their work (`LAUNCH_BOUND_DEVICES`), per-layer selections and drop-and-grow run instead
as `segmented.segmented_topk` over the concatenated scores, which reads nothing where the
eligible counts are known.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import torch

from distsparse.sparsity.segmented import segment_counts, segmented_topk

__all__ = ["drop_and_grow", "drop_and_grow_masks", "global_topk_counted", "global_topk_masks",
           "topk_mask", "topk_masks"]


COMPACT_BELOW = 0.5
"""Where fewer than this fraction of a tensor's entries are eligible and their count is known,
the threshold comes from a top-k over the gathered eligible scores instead of the whole tensor."""


def _lowest(dtype: torch.dtype) -> float | int:
    return float("-inf") if dtype.is_floating_point else torch.iinfo(dtype).min


def _kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest of a 1-D tensor (NaN largest, as topk and sort rank it), 0-d, no sync."""
    n = values.numel()
    if k <= n - k + 1:
        top = torch.topk(values, k, sorted=False).values
        return torch.topk(top, 1, largest=False).values[0]
    bottom = torch.topk(values, n - k + 1, largest=False, sorted=False).values
    return torch.topk(bottom, 1).values[0]


SAMPLED_FROM = 1 << 18
"""Scores from which the k-th largest is bracketed by a sample before any topk (`_bracketed_kth`)."""
SAMPLE_STRIDE = 64
"""The sample that brackets it: every 64th score (a topk over 1/64 of the scores)."""


def _highest(dtype: torch.dtype) -> float | int:
    return float("inf") if dtype.is_floating_point else torch.iinfo(dtype).max


def _bracketed_kth(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-th largest of a 1-D tensor, exact where the returned flag is true; no sync.

    A strided sample brackets the k-th largest between two of its values, `high` and `low`, 4
    standard deviations of the sample rank apart (the dtype's extremes where the bracket passes
    the sample's ends). Where fewer than k entries rank above `high` (NaN included) and at least k
    not below `low`, the k-th largest is the (k - above)-th of the entries in [low, high], sorted:
    a few percent of the tensor, so the cost is a few comparisons over all entries instead of a
    topk. Otherwise (heavy ties at the bracket, an unlucky sample) the flag is false.
    """
    n = values.numel()
    stride = SAMPLE_STRIDE
    sample = values[::stride]
    m = sample.numel()
    rank = k * m / n
    margin = 4 * math.sqrt(rank * (1 - rank / m)) + 16
    high_rank, low_rank = math.floor(rank - margin), math.ceil(rank + margin)
    bracket = torch.topk(sample, min(m, max(1, low_rank))).values
    high = bracket[high_rank - 1] if high_rank >= 1 else _highest(values.dtype)
    low = bracket[low_rank - 1] if low_rank <= m else _lowest(values.dtype)
    spanned = min(m, low_rank) - max(1, high_rank) + 1
    size = min(n, 2 * math.ceil(n * spanned / m) + 2 * stride + 1024)
    not_above = torch.le(values, high)  # false for NaN, which ranks above every number
    above = n - torch.count_nonzero(not_above)
    inside = not_above.logical_and_(torch.ge(values, low))
    n_inside = torch.count_nonzero(inside)
    index = torch.nonzero_static(inside, size=size).squeeze(1)
    filled = torch.arange(size, device=values.device) < n_inside
    window = torch.where(filled, values[index], _lowest(values.dtype))
    ordered = torch.sort(window, descending=True).values
    kth = ordered[(k - above).clamp(1, size) - 1]
    exact = (above < k) & (above + n_inside >= k) & (n_inside <= size)
    return kth, exact


def _threshold(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(k-th largest, exact flag or None where it is exact by construction)."""
    if values.numel() >= SAMPLED_FROM and 0 < k <= values.numel():
        return _bracketed_kth(values, k)
    return _kth_largest(values, k), None


class _Selection:
    """One top-k over a 1-D tensor, in two halves around the one host read of a batch.

    Candidates are the eligible entries not below the k-th largest eligible score v (NaN counts as
    above every number); when they number k they are the selection. Otherwise v is tied: every
    entry above v, then the first entries equal to v by index, up to k.
    """

    def __init__(self, scores: torch.Tensor, k: int, eligible: torch.Tensor | None = None,
                 excluded: torch.Tensor | None = None, n_eligible: int | None = None) -> None:
        self.k, self.eligible, self.excluded, self.restrict = k, eligible, excluded, None
        device, lowest = scores.device, _lowest(scores.dtype)
        if n_eligible is not None or (eligible is None and excluded is None):
            counted = torch.full((), scores.numel() if n_eligible is None else n_eligible,
                                 dtype=torch.int64, device=device)
        elif eligible is not None:
            counted = torch.count_nonzero(eligible)
        else:
            counted = scores.numel() - torch.count_nonzero(excluded)
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.source = scores
        if k == 0:
            self.counts = torch.stack([counted, zero, zero, zero, zero + 1])
            return
        if eligible is not None and n_eligible is not None \
                and n_eligible < COMPACT_BELOW * scores.numel():
            index = torch.nonzero_static(eligible, size=n_eligible).squeeze(1)
            self.values = scores[index]
            self.restrict = eligible
        else:
            if eligible is not None:
                self.source = torch.where(eligible, scores, lowest)
            elif excluded is not None:
                self.source = torch.where(excluded, lowest, scores)
            self.values = self.source
        self.threshold, exact = _threshold(self.values, k)
        self._count_candidates(counted, zero + 1 if exact is None else exact.to(torch.int64))

    def _count_candidates(self, counted: torch.Tensor, exact: torch.Tensor) -> None:
        self.candidates = torch.lt(self.source, self.threshold).logical_not_()
        if self.restrict is not None:
            self.candidates &= self.restrict
        self.counts = torch.stack([
            counted, torch.count_nonzero(self.candidates),
            torch.isnan(self.threshold).to(torch.int64),
            (self.threshold == _lowest(self.source.dtype)).to(torch.int64), exact])

    def tentative(self) -> torch.Tensor:
        """The selection as it stands before the read: every candidate, which `mask` returns
        unchanged where `confirms` the counts (the k-th largest is exact and untied)."""
        if self.k == 0:
            return torch.zeros(self.source.shape, dtype=torch.bool, device=self.source.device)
        return self.candidates

    def confirms(self, counts: Sequence[int]) -> bool:
        """Whether `tentative()` is the selection, given the counts as read from the device."""
        return bool(counts[4]) and counts[1] == self.k

    def at_threshold(self) -> torch.Tensor:
        """The eligible entries equal to the k-th largest (k > 0)."""
        at = self.source == self.threshold
        if self.restrict is not None:
            at &= self.restrict
        return at

    def drops_last_ties(self, counts: Sequence[int]) -> bool:
        """Whether `mask` is the candidates less the last n_candidates - k of `at_threshold()`,
        given the counts as read (the k-th largest exact, neither NaN nor the fill value)."""
        _, _, nan_threshold, lowest_threshold, exact = counts
        filled = self.restrict is None and (self.eligible is not None or self.excluded is not None)
        return bool(exact) and self.k > 0 and not nan_threshold and not (lowest_threshold and filled)

    def mask(self, counts: Sequence[int]) -> torch.Tensor:
        """The selected entries, given this selection's counts as read from the device."""
        n_eligible, n_candidates, nan_threshold, lowest_threshold, exact = counts
        if self.k > n_eligible:
            raise ValueError(f"cannot select {self.k} of {n_eligible} eligible entries")
        if self.k == 0:
            return torch.zeros(self.source.shape, dtype=torch.bool, device=self.source.device)
        if not exact:  # the sample missed: the k-th largest by topk, and one more read
            self.threshold = _kth_largest(self.values, self.k)
            self._count_candidates(self.counts[0], torch.ones_like(self.counts[0]))
            n_candidates, nan_threshold, lowest_threshold = self.counts[1:4].tolist()
        if n_candidates == self.k:
            return self.candidates
        if not self.drops_last_ties([n_eligible, n_candidates, nan_threshold, lowest_threshold, 1]):
            return self._first_k(bool(nan_threshold))
        # v is tied: drop the last n_candidates - k entries equal to v, in index order.
        at = self.at_threshold()
        last = torch.nonzero_static(at.flip(0), size=n_candidates - self.k).squeeze(1)
        self.candidates[at.numel() - 1 - last] = False
        return self.candidates

    def _first_k(self, nan_threshold: bool) -> torch.Tensor:
        """Where v is NaN or the fill value: entries above v, then the first ones equal to v."""
        if nan_threshold:
            above, at = torch.zeros_like(self.candidates), torch.isnan(self.source)
        else:
            above = torch.le(self.source, self.threshold).logical_not_()
            at = self.source == self.threshold
        allowed = self.restrict
        if allowed is None and self.eligible is not None:
            allowed = self.eligible
        elif allowed is None and self.excluded is not None:
            allowed = ~self.excluded
        if allowed is not None:
            above &= allowed
            at &= allowed
        need = self.k - torch.count_nonzero(above)
        return above | (at & (torch.cumsum(at, 0, dtype=_index_dtype(at)) <= need))


def _index_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.int32 if tensor.numel() < 2**31 else torch.int64


LAUNCH_BOUND_DEVICES = ("cuda",)
"""Device types on which per-layer selections run as one segmented select over all layers: a loop
of a few dozen small kernels per layer costs there its launches, not its arithmetic."""


def launch_bound(device: torch.device) -> bool:
    """Whether work on `device` runs as a fixed number of whole-tensor kernels rather than per layer."""
    return device.type in LAUNCH_BOUND_DEVICES


def _segmented(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether selections over these tensors run as one `segmented_topk`: on a launch-bound
    device, all floating or all integer (their concatenation then widens exactly)."""
    return bool(tensors) and launch_bound(tensors[0].device) \
        and len({tensor.is_floating_point() for tensor in tensors}) == 1 \
        and all(tensor.dtype != torch.bool for tensor in tensors)


def _split_counts(flags: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The True entries of each consecutive part of `sizes` in the 1-D `flags`: a count a part,
    or on a launch-bound device one running sum for all."""
    if launch_bound(flags.device):
        return segment_counts(flags, sizes)
    return torch.stack([part.count_nonzero() for part in flags.split(sizes)])


SEGMENTED_BATCH = 1 << 26
"""Scores one segmented select takes at most (consecutive layers, or one larger layer): its
temporaries, a few bytes a score, stay within a small multiple of this."""
SEGMENTED_LAYERS = 256
"""Layers one segmented select takes at most: its histograms hold 2^16 bins a layer."""


def _batches(sizes: Sequence[int]) -> list[range]:
    """Consecutive runs of at most `SEGMENTED_LAYERS` layers and `SEGMENTED_BATCH` scores
    together (a larger layer alone)."""
    batches, start, total = [], 0, 0
    for index, size in enumerate(sizes):
        if index > start and (total + size > SEGMENTED_BATCH or index - start == SEGMENTED_LAYERS):
            batches.append(range(start, index))
            start, total = index, 0
        total += size
    return batches + [range(start, len(sizes))] if sizes else batches


def _split_like(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """`flat` cut into tensors shaped as `like`, each with storage of its own."""
    return [part.view(tensor.shape).clone()
            for part, tensor in zip(flat.split([t.numel() for t in like]), like)]


def _segmented_topk_masks(flats, ks, allowed, known) -> list[torch.Tensor]:
    """`topk_masks` as segmented selects (`_batches`): one host read where an eligible count is
    unknown."""
    unknown = [i for i, (e, n) in enumerate(zip(allowed, known)) if e is not None and n is None]
    counted = dict(zip(unknown, segment_counts(
        torch.cat([allowed[i].reshape(-1) for i in unknown]),
        [allowed[i].numel() for i in unknown]).tolist())) if unknown else {}
    for i, (flat, k, e, n) in enumerate(zip(flats, ks, allowed, known)):
        n_eligible = flat.numel() if e is None else counted.get(i, n)
        if k > n_eligible:
            raise ValueError(f"cannot select {k} of {n_eligible} eligible entries")
    masks = []
    for batch in _batches([flat.numel() for flat in flats]):
        parts = [flats[i] for i in batch]
        eligible = None if all(allowed[i] is None for i in batch) else torch.cat(
            [torch.ones_like(flats[i], dtype=torch.bool) if allowed[i] is None else allowed[i]
             for i in batch])
        masks += _split_like(segmented_topk(torch.cat(parts), [part.numel() for part in parts],
                                            [ks[i] for i in batch], eligible), parts)
    return masks


def _check_k(scores: torch.Tensor, k: int, eligible: torch.Tensor | None) -> None:
    if not 0 <= k <= scores.numel():
        n = scores.numel() if eligible is None else int(torch.count_nonzero(eligible))
        raise ValueError(f"cannot select {k} of {n} eligible entries")


def _masks_of(selections: Sequence[_Selection]) -> list[torch.Tensor]:
    """Finish a batch of selections with one host read of all their counts."""
    if not selections:
        return []
    counts = torch.stack([selection.counts for selection in selections]).tolist()
    return [selection.mask(count) for selection, count in zip(selections, counts)]


def topk_masks(
    scores: Sequence[torch.Tensor], ks: Sequence[int],
    eligible: Sequence[torch.Tensor | None] | None = None,
    n_eligible: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Per tensor i: `topk_mask(scores[i], ks[i], eligible[i])`, with one host read for all.

    `n_eligible`, the eligible counts if the caller knows them, spares counting them again.
    """
    flats = [s.reshape(-1) for s in scores]
    allowed = [None if eligible is None or e is None else e.reshape(-1)
               for e in (eligible or [None] * len(scores))]
    known = n_eligible or [None] * len(scores)
    for flat, k, e in zip(flats, ks, allowed):
        _check_k(flat, k, e)
    if _segmented(flats):
        masks = _segmented_topk_masks(flats, ks, allowed, known)
        return [mask.view(s.shape) for mask, s in zip(masks, scores)]
    masks = _masks_of([_Selection(flat, k, e, n_eligible=n)
                       for flat, k, e, n in zip(flats, ks, allowed, known)])
    return [mask.view(s.shape) for mask, s in zip(masks, scores)]


def topk_mask(scores: torch.Tensor, k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the `k` highest scores among `eligible` entries; ties go to lower indices."""
    return topk_masks([scores], [k], [eligible])[0]


def _common_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """A dtype in which every tensor's values compare as in float64 (exact widening)."""
    if not all(t.dtype.is_floating_point for t in tensors):
        return torch.float64
    return functools.reduce(torch.promote_types, {tensor.dtype for tensor in tensors})


def global_topk_masks(
    scores: Mapping[str, torch.Tensor],
    k: int,
    eligible: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Top-k over all layers at once; a layer's global indices follow the mapping's order.

    Scores are compared as float64 values; layers all of floating dtypes are compared in their
    promoted dtype, which orders them identically (widening is exact).
    """
    return _global_topk(scores, k, eligible, None, count_layers=False)[0]


def global_topk_counted(
    scores: Mapping[str, torch.Tensor],
    k: int,
    eligible: Mapping[str, torch.Tensor] | None = None,
    n_eligible: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, int] | None]:
    """`global_topk_masks` and each layer's selected count, both from one host read
    (`n_eligible`, the eligible entries if the caller knows them, spares counting them); the
    counts are None only where the k-th largest is NaN, the fill value or missed by the sample."""
    return _global_topk(scores, k, eligible, n_eligible, count_layers=True)


def _global_topk(scores, k, eligible, n_eligible, count_layers: bool):
    names = list(scores)
    if not names:
        if k:
            raise ValueError(f"cannot select {k} of 0 eligible entries")
        return {}, {}
    dtype = _common_dtype([scores[n] for n in names])
    values = torch.cat([scores[n].reshape(-1).to(dtype) for n in names])
    flat_eligible = None if eligible is None else torch.cat([eligible[n].reshape(-1) for n in names])
    if n_eligible is None:
        n_eligible = values.numel() if eligible is None else \
            torch.count_nonzero(flat_eligible).tolist()
    if not 0 <= k <= n_eligible:
        raise ValueError(f"cannot select {k} of {n_eligible} eligible entries")
    numels = [scores[name].numel() for name in names]
    selection = _Selection(values, k, flat_eligible, n_eligible=n_eligible)
    read = [selection.counts]
    if count_layers and k:  # each layer's candidates and entries at the threshold
        read += [_split_counts(flags, numels)
                 for flags in (selection.tentative(), selection.at_threshold())]
    counts = torch.cat(read).tolist()
    selected = selection.mask(counts[:5])
    masks, offset = {}, 0
    for name, numel in zip(names, numels):
        masks[name] = selected[offset : offset + numel].view(scores[name].shape)
        offset += numel
    layer_counts = _layer_counts(selection, counts, len(names)) if count_layers else None
    return masks, None if layer_counts is None else dict(zip(names, layer_counts))


def _layer_counts(selection: _Selection, counts: list[int], layers: int) -> list[int] | None:
    """Each layer's selected count from the read of `_global_topk`: its candidates, less the
    surplus ties the selection drops from the last index back."""
    if selection.k == 0:
        return [0] * layers
    candidates, at = counts[5 : 5 + layers], counts[5 + layers :]
    if selection.confirms(counts[:5]):
        return candidates
    if not selection.drops_last_ties(counts[:5]):
        return None
    surplus = counts[1] - selection.k
    for layer in reversed(range(layers)):
        dropped = min(surplus, at[layer])
        candidates[layer] -= dropped
        surplus -= dropped
    return candidates


def drop_and_grow_masks(
    masks: Sequence[torch.Tensor], drop_scores: Sequence[torch.Tensor],
    grow_scores: Sequence[torch.Tensor], n_swaps: Sequence[int],
    actives: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """`drop_and_grow`'s new mask of every layer, with one host read for all layers (one more
    where the caller does not pass the masks' active counts).

    Each grow selection starts before the read, on the kept entries as its drop selection has
    them then (its candidates); the read confirms them unless a k-th largest drop score is tied or
    missed by the sample, and only those layers select their growth again after a second read.
    """
    if not masks:
        return []
    if actives is None:
        actives = torch.stack([torch.count_nonzero(mask) for mask in masks]).tolist()
    for active, n_swap in zip(actives, n_swaps):
        if not 0 <= n_swap <= active:
            raise ValueError(f"cannot select {active - n_swap} of {active} eligible entries")
    if _segmented(drop_scores) and _segmented(grow_scores):
        new = []
        for batch in _batches([mask.numel() for mask in masks]):
            sizes = [masks[i].numel() for i in batch]
            kept = segmented_topk(torch.cat([drop_scores[i].reshape(-1) for i in batch]), sizes,
                                  [actives[i] - n_swaps[i] for i in batch],
                                  torch.cat([masks[i].reshape(-1) for i in batch]))
            grown = segmented_topk(torch.cat([grow_scores[i].reshape(-1) for i in batch]), sizes,
                                   [n_swaps[i] for i in batch], ~kept)
            new += _split_like(kept | grown, [masks[i] for i in batch])
        return new
    drops = [_Selection(drop.reshape(-1), active - n_swap, mask.reshape(-1), n_eligible=active)
             for mask, drop, active, n_swap in zip(masks, drop_scores, actives, n_swaps)]

    def grow_from(kept: Sequence[torch.Tensor], layers: Sequence[int]) -> list[_Selection]:
        return [_Selection(grow_scores[i].reshape(-1), n_swaps[i], excluded=keep,
                           n_eligible=keep.numel() - actives[i] + n_swaps[i])
                for i, keep in zip(layers, kept)]

    layers = range(len(masks))
    grows = grow_from([drop.tentative() for drop in drops], layers)
    counts = torch.stack([selection.counts for selection in (*drops, *grows)]).tolist()
    kept = [drop.mask(count) for drop, count in zip(drops, counts)]
    again = [i for i in layers if not drops[i].confirms(counts[i])]
    grown = [None if i in again else grows[i].mask(counts[len(masks) + i]) for i in layers]
    for i, mask in zip(again, _masks_of(grow_from([kept[i] for i in again], again))):
        grown[i] = mask
    return [(keep | grow).view(mask.shape) for keep, grow, mask in zip(kept, grown, masks)]


def drop_and_grow(
    mask: torch.Tensor, drop_scores: torch.Tensor, grow_scores: torch.Tensor, n_swap: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One prune-and-regrow step of a layer; returns (new mask, newly grown connections).

    As google-research/rigl `sparse_optimizers_base.py::_get_update_op`: keep the nnz - n_swap
    active entries with the highest drop score, then grow n_swap entries with the highest grow
    score among all entries not kept (a just-dropped entry may be regrown; it then keeps its value,
    as rigl's default `reinit_when_same=False`). The active count is unchanged.
    """
    new = drop_and_grow_masks([mask], [drop_scores], [grow_scores], [n_swap])[0]
    return new, new & ~mask
