"""Per-layer top-k of many layers in one pass: an exact radix select over their concatenated scores.

Where a kernel launch costs more than the arithmetic it does (a GPU), a Python loop of per-layer
selections is launch-bound: ResNet-50's 54 layers make thousands of small kernels per RigL update.
Here each layer is a segment of one flat tensor, and a selection is a fixed number of kernels over
the whole of it, whatever the number of layers:

1. the scores become integer keys in the same order (NaN above every number, -0.0 equal to +0.0),
   32 bits for float32, float16 and bfloat16 scores, 64 bits for float64; integer scores are
   their own keys (int64 stays 64 bits, narrower ones widen to 32);
2. each pass resolves the next 16 bits of every segment's k-th largest eligible key from one
   histogram of (segment, digit) over the eligible entries that match the bits resolved so far;
3. every eligible entry above the k-th largest key is selected, and of those equal to it the first
   by index, up to k.

The selection is that of a stable descending argsort of each segment's eligible scores (the
contract of `sparsity.select`), and it needs no host read: every count is exact by construction.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from distsparse.sparsity.device_values import device_tensor

__all__ = ["order_keys", "segment_counts", "segment_ids", "segmented_topk", "signed_order_bits"]

DIGIT_BITS = 16
"""Bits of the k-th largest key resolved per pass: 2 passes for 32-bit keys, 4 for 64-bit."""


def signed_order_bits(values: torch.Tensor, bits_dtype: torch.dtype) -> torch.Tensor:
    """The float `values` as integers of `bits_dtype` (as wide) whose signed order is the float
    order of the numbers: adding +0.0 turns -0.0 into +0.0; negative floats flip every bit but the
    sign, so a larger magnitude sorts lower."""
    bits = (values + 0.0).view(bits_dtype)
    width = torch.iinfo(bits_dtype).bits
    return bits ^ ((bits >> (width - 1)) & (2 ** (width - 1) - 1))


def order_keys(values: torch.Tensor) -> torch.Tensor:
    """Signed integer keys ordered as the values, with NaN (any sign or payload) above +inf and
    -0.0 equal to +0.0: int32 keys, or int64 for float64 and int64 values."""
    if not values.dtype.is_floating_point:
        return values.to(torch.int64 if values.element_size() > 4 else torch.int32)
    if values.dtype == torch.float64:
        bits_dtype = torch.int64
    else:
        values, bits_dtype = values.float(), torch.int32
    # Every NaN becomes the one positive NaN, whose bits order above +inf's.
    return signed_order_bits(torch.where(torch.isnan(values), float("nan"), values), bits_dtype)


def segmented_topk(
    values: torch.Tensor, sizes: Sequence[int], ks: Sequence[int],
    eligible: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask over the 1-D `values` (real numbers, not bool), split into consecutive
    segments of `sizes`: in segment i, its ks[i] highest eligible scores, ties to the lower index.

    The caller guarantees 0 <= ks[i] <= the eligible entries of segment i (it knows the counts);
    nothing here reads the device.
    """
    if values.dtype == torch.bool or values.is_complex():
        raise TypeError(f"segmented_topk takes real-number scores, not {values.dtype}")
    device, n_segments, digits = values.device, len(sizes), 1 << DIGIT_BITS
    keys = order_keys(values)
    width = keys.element_size() * 8
    # Segment ids, bins and tie ranks in 32 bits where they fit: half the memory traffic.
    small = max(2 * n_segments * digits, values.numel()) < 2**31
    index_dtype = torch.int32 if small else torch.int64
    segment = segment_ids(sizes, device, index_dtype)
    need = device_tensor(list(ks), device, torch.int64)
    prefix = torch.zeros(n_segments, dtype=torch.int64, device=device)
    ones = torch.ones((), dtype=torch.int32, device=device).expand(values.numel())
    # Entries left out count in bins of their own, spread by position: never one hot bin (the
    # zeros of inactive weights), whose atomic adds would queue on one address.
    spread = torch.arange(values.numel(), dtype=index_dtype, device=device)
    spread &= digits - 1
    spread += n_segments * digits
    for shift in range(width - DIGIT_BITS, -1, -DIGIT_BITS):
        high = keys >> shift  # arithmetic shift: the signed key's bits from `shift` up
        if shift == width - DIGIT_BITS:
            digit, matching = high.to(index_dtype) + digits // 2, eligible  # signed top digit, from 0
        else:
            digit = (high & (digits - 1)).to(index_dtype)
            same = (high >> DIGIT_BITS) == prefix.to(keys.dtype).index_select(0, segment)
            matching = same if eligible is None else same & eligible
        bins = segment * digits + digit
        if matching is not None:
            bins = torch.where(matching, bins, spread)
        histogram = torch.zeros((n_segments + 1) * digits, dtype=torch.int32, device=device)
        histogram.index_add_(0, bins, ones)
        # descending[:, j]: matching entries whose digit is at least digits - 1 - j.
        descending = histogram[: n_segments * digits].view(n_segments, digits).flip(1).cumsum(1)
        reached = (descending < need[:, None]).sum(1)  # the first j with descending >= need
        above = descending.gather(1, (reached - 1).clamp(min=0)[:, None]).squeeze(1)
        need = need - torch.where(reached > 0, above, 0)
        digit_of_kth = digits - 1 - reached
        prefix = digit_of_kth - digits // 2 if shift == width - DIGIT_BITS \
            else (prefix << DIGIT_BITS) | digit_of_kth
    # prefix: each segment's k-th largest key; need: how many entries equal to it are selected.
    kth = prefix.to(keys.dtype).index_select(0, segment)
    above = keys > kth
    at = keys == kth
    if eligible is not None:
        above &= eligible
        at &= eligible
    rank = torch.cumsum(at, 0, dtype=index_dtype)
    starts = device_tensor([0, *itertools.accumulate(sizes)][:-1], device, torch.int64)
    before = torch.cat([rank.new_zeros(1), rank])[starts]  # ties counted in earlier segments
    rank -= before.index_select(0, segment)
    return above | (at & (rank <= need.to(index_dtype).index_select(0, segment)))


def segment_counts(flags: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """The True entries (int64) of each consecutive segment of `sizes` in the 1-D boolean `flags`:
    one running sum, read at the segments' bounds, whatever the number of segments."""
    bounds = device_tensor([0, *itertools.accumulate(sizes)], flags.device, torch.int64)
    running = torch.cat([torch.zeros(1, dtype=torch.int64, device=flags.device),
                         flags.cumsum(0)])
    return running[bounds[1:]] - running[bounds[:-1]]


def segment_ids(sizes: Sequence[int], device: torch.device | str,
                dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Each position's segment among consecutive segments of `sizes` (empty ones own no
    position): a running sum of the segments' starts. `repeat_interleave` gives the same on
    CUDA with a thread per segment, each writing its whole segment."""
    total = sum(sizes)
    starts = list(itertools.accumulate(sizes))[:-1]
    marks = torch.zeros(total, dtype=dtype, device=device)
    inside = [start for start in starts if start < total]
    if inside:
        marks.index_add_(0, device_tensor(inside, device, torch.int64),
                         torch.ones((), dtype=dtype, device=device).expand(len(inside)))
    return marks.cumsum(0, dtype=dtype)
