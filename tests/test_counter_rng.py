"""Tests for distsparse.sparsity.counter_rng: draws are a pure function of their key.

DESIGN invariant 5: randomness in methods is keyed by (seed, step, layer, global element index),
so the same element draws the same number on every rank, world size and sharding. The reference
below re-implements the generator with Python integers (lowbias32, crc32 layer keys) so that the
values are pinned independently of torch's integer arithmetic and of Python's salted hash().
"""
from __future__ import annotations

import random
import zlib

import pytest
import torch

from distsparse.sparsity import counter_rng
from distsparse.sparsity import select
from distsparse.sparsity.counter_rng import _MUL1, _MUL2, _mul32_, random_bits, random_bits_range, \
    random_bits_ranges
from distsparse.sparsity.layout import FullLayout, PieceLayout
from distsparse.sparsity.scores import random_scores

M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """The in-place multiply on a copy, its scratch tensor filled with garbage first."""
    return _mul32_(x.clone(), c, torch.full_like(x, -1))


def _ref_hash32(x: int) -> int:
    """lowbias32 (Chris Wellons) on Python ints."""
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _ref_stream_key(seed: int, step: int, layer: str, purpose: str) -> int:
    key = _ref_hash32(seed & M32)
    parts = (seed >> 32, step & M32, step >> 32, zlib.crc32(layer.encode()), zlib.crc32(purpose.encode()))
    for part in parts:
        key = _ref_hash32(key ^ (part & M32))
    return key


def _ref_random_bits(seed: int, step: int, layer: str, purpose: str, index: int) -> int:
    key = _ref_stream_key(seed, step, layer, purpose)
    bits = _ref_hash32((index & M32) ^ key)
    return _ref_hash32(bits ^ (index >> 32) ^ 0x846CA68B)


def _bits(seed=7, step=3, layer="layer1.0.conv1.weight", purpose="grow", n=10_000, start=0):
    return random_bits(seed, step, layer, purpose, torch.arange(start, start + n, dtype=torch.int64))


def test_matches_python_integer_reference():
    indices = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 3 * 2**40 + 17]
    for seed, step, layer, purpose in [
        (0, 0, "conv1.weight", "init"),
        (17, 4000, "layer4.2.conv3.weight", "grow"),
        (2**33 + 9, 2**35 + 1, "fc.weight", "drop"),
    ]:
        got = random_bits(seed, step, layer, purpose, torch.tensor(indices, dtype=torch.int64))
        expected = [_ref_random_bits(seed, step, layer, purpose, i) for i in indices]
        assert got.tolist() == expected


def test_same_inputs_are_bitwise_equal():
    a = _bits()
    b = _bits()
    assert a.dtype == torch.int64
    assert torch.equal(a, b)


def test_slice_of_indices_equals_full_range_sliced():
    full = _bits(n=5000)
    for a, b in [(0, 1), (0, 2500), (1234, 4321), (4999, 5000), (2500, 5000)]:
        part = random_bits(7, 3, "layer1.0.conv1.weight", "grow", torch.arange(a, b))
        assert torch.equal(part, full[a:b])
    # Shards in any order and any split cover the same values.
    shards = [torch.arange(0, 1700), torch.arange(1700, 3333), torch.arange(3333, 5000)]
    joined = torch.cat([random_bits(7, 3, "layer1.0.conv1.weight", "grow", s) for s in shards])
    assert torch.equal(joined, full)
    permuted = torch.randperm(5000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(random_bits(7, 3, "layer1.0.conv1.weight", "grow", permuted), full[permuted])


def test_int32_indices_give_the_same_values():
    assert torch.equal(
        random_bits(7, 3, "l", "p", torch.arange(1000, dtype=torch.int32)),
        random_bits(7, 3, "l", "p", torch.arange(1000, dtype=torch.int64)),
    )


def test_values_are_32_bit():
    bits = torch.cat([_bits(n=50_000), _bits(n=1000, start=2**32 - 500), _bits(n=1000, start=2**40)])
    assert int(bits.min()) >= 0
    assert int(bits.max()) < 2**32
    # The full range is used: the top bit is set in about half of the draws.
    top = int((bits >> 31).sum())
    assert 0.45 * bits.numel() < top < 0.55 * bits.numel()


@pytest.mark.parametrize(
    "changed",
    [
        dict(seed=8),
        dict(seed=7 + 2**32),
        dict(step=4),
        dict(step=3 + 2**32),
        dict(layer="layer1.0.conv2.weight"),
        dict(purpose="drop"),
    ],
    ids=["seed", "seed_high_word", "step", "step_high_word", "layer", "purpose"],
)
def test_changing_any_key_changes_most_values(changed):
    base = _bits()
    other = _bits(**changed)
    differ = int((base != other).sum())
    assert differ >= 0.999 * base.numel()


def test_indices_beyond_32_bits_differ_from_their_low_word():
    low = _bits(n=10_000)
    high = _bits(n=10_000, start=2**32)
    assert int((low != high).sum()) >= 9990


def test_does_not_touch_torch_global_rng():
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    _bits(n=100_000)
    random_bits(1, 2, "x", "y", torch.arange(10))
    assert torch.equal(torch.get_rng_state(), state)
    after = torch.rand(5)
    torch.manual_seed(1234)
    assert torch.equal(torch.rand(5), after)


def test_draws_are_not_affected_by_torch_global_seed():
    torch.manual_seed(0)
    a = _bits(n=1000)
    torch.manual_seed(99)
    torch.rand(100)
    b = _bits(n=1000)
    assert torch.equal(a, b)


@pytest.mark.parametrize("which", ["high", "low"])
def test_16_buckets_are_within_5_percent_of_uniform(which):
    bits = _bits(seed=2024, step=100, layer="fc.weight", purpose="init", n=100_000)
    buckets = (bits >> 28) if which == "high" else (bits & 0xF)
    counts = torch.bincount(buckets, minlength=16)
    assert counts.numel() == 16
    assert int(counts.sum()) == 100_000
    expected = 100_000 / 16
    for count in counts.tolist():
        assert abs(count - expected) <= 0.05 * expected
    chi2 = sum((c - expected) ** 2 / expected for c in counts.tolist())
    assert chi2 < 37.7  # 99.9th percentile of chi-square with 15 degrees of freedom


@pytest.mark.parametrize("constant", [_MUL1, _MUL2, 1, 0xFFFF, 0x10000, M32])
def test_mul32_matches_python_integers(constant):
    rng = random.Random(constant)
    xs = [0, 1, 0xFFFF, 0x10000, M32, 2**31] + [rng.getrandbits(32) for _ in range(5000)]
    got = _mul32(torch.tensor(xs, dtype=torch.int64), constant)
    assert got.tolist() == [(x * constant) % 2**32 for x in xs]


def test_mul32_matches_python_integers_for_random_constants():
    rng = random.Random(5)
    xs = [rng.getrandbits(32) for _ in range(1000)]
    x = torch.tensor(xs, dtype=torch.int64)
    for _ in range(20):
        c = rng.getrandbits(32)
        assert _mul32(x, c).tolist() == [(v * c) % 2**32 for v in xs]


# --- the in-place, chunked draw: the same values as the Python reference -------------------------

@pytest.mark.parametrize("start,count", [(0, 0), (0, 1), (5, 2500), (2**32 - 700, 1500),
                                         (2**32 + 3, 900), (3 * 2**40 + 17, 40)])
def test_range_draw_equals_the_reference_on_every_index(start, count, monkeypatch):
    """Chunks of 256 (the boundary 2**32 inside a chunk and between chunks) and one chunk."""
    expected = [_ref_random_bits(9, 21, "fc.weight", "grow", i) for i in range(start, start + count)]
    for chunk in (256, 1 << 20):
        monkeypatch.setattr(counter_rng, "CPU_CHUNK", chunk)
        got = random_bits_range(9, 21, "fc.weight", "grow", start, count)
        assert got.dtype == torch.int64 and got.tolist() == expected, chunk
        indices = torch.arange(start, start + count).view(-1, 1)
        assert random_bits(9, 21, "fc.weight", "grow", indices).view(-1).tolist() == expected


def test_chunked_draw_of_arbitrary_indices_equals_one_chunk(monkeypatch):
    g = torch.Generator().manual_seed(3)
    indices = torch.randint(0, 2**40, (5, 301), generator=g)
    whole = random_bits(1, 2, "a", "b", indices)
    monkeypatch.setattr(counter_rng, "CPU_CHUNK", 64)
    assert torch.equal(random_bits(1, 2, "a", "b", indices), whole)
    assert whole.shape == indices.shape
    assert whole.view(-1)[:50].tolist() == [_ref_random_bits(1, 2, "a", "b", i)
                                            for i in indices.view(-1)[:50].tolist()]


def test_layer_scores_of_a_piece_are_its_slice_of_the_full_layer(monkeypatch):
    """`random_scores` of [offset, offset + n) is that slice of the whole layer's draw (pieces)."""
    monkeypatch.setattr(counter_rng, "CPU_CHUNK", 128)
    full = random_scores((37, 29), 4, 8, "conv.weight", "grow")
    assert full.shape == (37, 29)
    for offset, n in [(0, 500), (500, 573), (1000, 73)]:
        piece = random_scores((n,), 4, 8, "conv.weight", "grow", offset=offset)
        assert torch.equal(piece, full.view(-1)[offset : offset + n])


def test_one_draw_over_many_ranges_equals_each_ranges_own_draw():
    """Layers of one draw keep their own keys and global indices (pieces' offsets, indices up to
    2**32 - 1); indices at or beyond 2**32 are refused."""
    ranges = [("conv.weight", 0, 700), ("fc.weight", 2**32 - 300, 300), ("empty", 9, 0),
              ("fc.bias", 55, 1)]
    got = random_bits_ranges(4, 8, "grow", ranges)
    expected = torch.cat([random_bits_range(4, 8, layer, "grow", start, count)
                          for layer, start, count in ranges])
    assert torch.equal(got, expected)
    assert got[700:1000].tolist() == [_ref_random_bits(4, 8, "fc.weight", "grow", i)
                                      for i in range(2**32 - 300, 2**32)]
    with pytest.raises(ValueError, match="below 2\\*\\*32"):
        random_bits_ranges(4, 8, "grow", [("fc.weight", 2**32 - 3, 4)])


def test_layouts_draw_every_layer_at_once_on_a_launch_bound_device(monkeypatch):
    """Full tensors and pieces: the same scores whether drawn layer by layer or in one draw."""
    shapes = {"a": (37, 29), "b": (5,), "c": (3, 4, 5)}
    pieces = PieceLayout(shapes, 1, 3, lambda tensor: tensor, lambda tensor: [tensor])
    for layout in (FullLayout(shapes), pieces):
        by_layer = layout.random_scores(3, 100, "grow", list(shapes))
        monkeypatch.setattr(select, "LAUNCH_BOUND_DEVICES", ("cpu",))
        at_once = layout.random_scores(3, 100, "grow", list(shapes))
        monkeypatch.undo()
        assert by_layer.keys() == at_once.keys()
        assert all(torch.equal(by_layer[n], at_once[n]) and at_once[n].dtype == torch.int32
                   for n in shapes)
    assert pieces.random_scores(3, 100, "grow", ["a"])["a"].shape == (pieces.bounds["a"][1]
                                                                        - pieces.bounds["a"][0],)
