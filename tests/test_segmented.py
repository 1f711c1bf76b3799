"""Tests for distsparse.sparsity.segmented: the one-pass per-layer selection of launch-bound devices.

Every expected mask is the stable descending argsort's selection within each segment (the contract
of `sparsity.select`), on the same score regimes as tests/test_select.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from distsparse.sparsity import select
from distsparse.sparsity.device_values import device_tensor
from distsparse.sparsity.scores import random_scores, random_scores_of_ranges
from distsparse.sparsity.segmented import order_keys, segment_counts, segment_ids, segmented_topk
from distsparse.sparsity.select import drop_and_grow_masks, topk_masks
from tests.conftest import count_host_reads
from tests.test_select import CUDA, REGIMES, REGIME_IDS, SPECIAL, _random_scores, \
    _stable_drop_and_grow, _stable_topk_mask

INTEGER_REGIMES = [("integers", torch.int32), ("integers", torch.int16)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_keys_order_as_the_stable_sort_orders_the_values(dtype):
    """NaN of either sign above +inf, -0.0 equal to +0.0, subnormals and extremes in place."""
    g = torch.Generator().manual_seed(1)
    special = SPECIAL + [-float("nan"), torch.finfo(dtype).tiny / 4, -torch.finfo(dtype).max,
                         torch.finfo(dtype).max]
    values = torch.cat([torch.tensor(special, dtype=torch.float64)[torch.randint(
        0, len(special), (500,), generator=g)], torch.randn(500, generator=g, dtype=torch.float64)])
    values = values.to(dtype)
    expected = torch.argsort(values, descending=True, stable=True)
    assert torch.equal(torch.argsort(order_keys(values), descending=True, stable=True), expected)
    assert order_keys(values).dtype == (torch.int64 if dtype == torch.float64 else torch.int32)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64])
def test_integer_keys_are_the_values(dtype):
    info = torch.iinfo(dtype)
    values = torch.tensor([info.max, -1, 0, info.min, 7], dtype=dtype)
    assert order_keys(values).tolist() == values.tolist()


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("regime,dtype", REGIMES + INTEGER_REGIMES,
                         ids=REGIME_IDS + ["integers-int32", "integers-int16"])
def test_each_segment_selects_the_stable_argsorts_top_k(regime, dtype, device):
    """1-7 segments of 1-400 entries, every k from none to all eligible, eligible masks of every
    density or none."""
    g = torch.Generator().manual_seed(len(regime) + dtype.itemsize)
    for trial in range(40):
        sizes = [int(torch.randint(1, 400, (1,), generator=g))
                 for _ in range(int(torch.randint(1, 8, (1,), generator=g)))]
        parts = [_random_scores(g, size, regime, dtype) for size in sizes]
        density = [None, 1.0, 0.5, 0.05][trial % 4]
        eligible = [None if density is None else torch.rand(size, generator=g) < density
                    for size in sizes]
        limits = [size if e is None else int(e.sum()) for size, e in zip(sizes, eligible)]
        ks = [[0, n, n // 2, int(torch.randint(0, n + 1, (1,), generator=g))][(trial + i) % 4]
              for i, n in enumerate(limits)]
        got = segmented_topk(torch.cat(parts).to(device), sizes, ks,
                             None if density is None else torch.cat(eligible).to(device))
        expected = torch.cat([_stable_topk_mask(p, k, e) for p, k, e in zip(parts, ks, eligible)])
        assert torch.equal(got.cpu(), expected), (trial, sizes, ks)


def test_a_long_run_of_equal_scores_crossing_segments_breaks_ties_within_each():
    values = torch.full((3000,), 0.25)
    values[1000:1500] = 1.0
    got = segmented_topk(values, [700, 1100, 1200], [600, 550, 0])
    expected = torch.zeros(3000, dtype=torch.bool)
    expected[:600] = True
    expected[1000:1500] = True  # the segment's 500 ones, then its first 50 quarters
    expected[700:750] = True
    assert torch.equal(got, expected)


def test_segment_counts_are_each_segments_true_entries_empty_segments_included():
    generator = torch.Generator().manual_seed(5)
    sizes = [0, 7, 1, 0, 300, 2, 0]
    flags = torch.rand(sum(sizes), generator=generator) < 0.4
    expected = [int(part.sum()) for part in flags.split(sizes)]
    assert segment_counts(flags, sizes).tolist() == expected
    assert segment_counts(torch.ones(310, dtype=torch.bool), sizes).tolist() == sizes
    assert segment_counts(torch.zeros(0, dtype=torch.bool), [0, 0]).tolist() == [0, 0]


@pytest.mark.parametrize("sizes", [[5], [0, 7, 1, 0, 300, 2, 0], [3, 0, 0, 4], [0, 0], []])
def test_segment_ids_number_every_position_by_its_segment(sizes):
    expected = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.int64))
    for dtype in (torch.int32, torch.int64):
        ids = segment_ids(sizes, "cpu", dtype)
        assert ids.dtype == dtype and torch.equal(ids.long(), expected)


def test_device_tensors_hold_the_values_of_torch_tensor():
    for values, dtype in (([3, -1, 2**40], torch.int64), ([0.5, 2.0], None), ([[1, 2], [3, 4]], torch.int32)):
        got, expected = device_tensor(values, "cpu", dtype), torch.tensor(values, dtype=dtype)
        assert got.dtype == expected.dtype and torch.equal(got, expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_drop_and_grow_and_random_scores_on_a_gpu_never_wait_for_it():
    # set_sync_debug_mode("error") raises at any wait for the device: a value read, a nonzero, a
    # copy from pageable host memory. RigL's and SET's selections over all layers need none.
    shapes = [(64, 3, 7, 7), (256, 64), (1000,), (300, 40), (2, 2)]
    generator = torch.Generator().manual_seed(4)
    masks = [torch.rand(shape, generator=generator) < 0.2 for shape in shapes]
    weights = [torch.randn(shape, generator=generator) * mask for shape, mask in zip(shapes, masks)]
    grads = [torch.randn(shape, generator=generator) for shape in shapes]
    actives = [int(mask.sum()) for mask in masks]
    counts = [active // 3 for active in actives]
    expected = drop_and_grow_masks(masks, [w.abs() for w in weights], [g.abs() for g in grads],
                                   counts, actives)
    ranges = [(f"layer{i}", 0, math.prod(shape)) for i, shape in enumerate(shapes)]
    expected_random = [random_scores(shape, 7, 100, name, "grow").reshape(-1)
                       for shape, (name, _, _) in zip(shapes, ranges)]
    masks, weights, grads = ([t.cuda() for t in ts] for ts in (masks, weights, grads))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = drop_and_grow_masks(masks, [w.abs() for w in weights], [g.abs() for g in grads],
                                  counts, actives)
        got_random = random_scores_of_ranges(7, 100, "grow", ranges, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b.cpu()) for a, b in zip(expected, got))
    assert all(torch.equal(a, b.cpu()) for a, b in zip(expected_random, got_random))


def test_boolean_scores_are_refused():
    with pytest.raises(TypeError, match="bool"):
        segmented_topk(torch.ones(5, dtype=torch.bool), [5], [2])


@pytest.mark.parametrize("batch", [select.SEGMENTED_BATCH, 150])  # all layers at once, or 1-3
def test_layer_selections_on_a_launch_bound_device_read_only_unknown_counts(batch, monkeypatch):
    """Segmented per-layer top-k and drop-and-grow: no host read where the eligible counts are
    known, one where they are not, and the error for k above a layer's eligible count; the same
    masks in batches of layers."""
    monkeypatch.setattr(select, "SEGMENTED_BATCH", batch)
    monkeypatch.setattr(select, "LAUNCH_BOUND_DEVICES", ("cpu",))
    g = torch.Generator().manual_seed(4)
    shapes = [(5 + i, 7) for i in range(9)]
    masks = [torch.rand(s, generator=g) < 0.4 for s in shapes]
    drop = [torch.randint(0, 3, s, generator=g).float() for s in shapes]
    grow = [torch.randint(0, 3, s, generator=g).half() for s in shapes]
    actives = [int(m.sum()) for m in masks]
    swaps = [a // 3 for a in actives]
    reads = count_host_reads(monkeypatch)
    new = drop_and_grow_masks(masks, drop, grow, swaps, actives)
    kept = topk_masks(drop, swaps, masks, actives)
    assert reads == []
    topk_masks(drop, swaps, masks)
    assert reads == [len(shapes)]
    monkeypatch.undo()
    monkeypatch.setattr(select, "SEGMENTED_BATCH", batch)
    monkeypatch.setattr(select, "LAUNCH_BOUND_DEVICES", ("cpu",))
    assert all(torch.equal(a, _stable_drop_and_grow(m, d, gr, n))
               for a, m, d, gr, n in zip(new, masks, drop, grow, swaps))
    assert all(torch.equal(a, _stable_topk_mask(d, n, m)) for a, d, n, m in zip(kept, drop, swaps, masks))
    assert len({mask.untyped_storage().data_ptr() for mask in new}) == len(new)  # own storage each
    with pytest.raises(ValueError, match=f"cannot select {actives[2] + 1} of {actives[2]} eligible"):
        topk_masks(drop, [0, 0, actives[2] + 1] + [0] * 6, masks)


def test_batches_are_consecutive_layers_within_the_cap(monkeypatch):
    monkeypatch.setattr(select, "SEGMENTED_BATCH", 100)
    assert select._batches([40, 50, 20, 300, 10, 90, 1]) == [range(0, 2), range(2, 3), range(3, 4),
                                                              range(4, 6), range(6, 7)]
    assert select._batches([]) == []
    monkeypatch.setattr(select, "SEGMENTED_LAYERS", 2)
    assert select._batches([1, 1, 1, 1, 300]) == [range(0, 2), range(2, 4), range(4, 5)]
