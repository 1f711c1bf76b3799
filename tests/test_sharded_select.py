"""Sharded top-k (ZeRO-3 pieces), global and per layer, equals the single-process selection."""
from __future__ import annotations

import dataclasses
import math
import os
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distsparse.sparsity import select
from distsparse.sparsity.layout import FullLayout, PieceLayout
from distsparse.sparsity.select import global_topk_masks, topk_mask
from distsparse.sparsity.sharded_select import (
    NARROW_DTYPES,
    ROUND_COUNTS,
    SPARE_BITS,
    TIE_SPARE_BITS,
    ESTIMATE_BITS,
    ESTIMATE_MIN,
    ESTIMATE_SAMPLE,
    ESTIMATE_Z,
    ShardedSelection,
    ShardPiece,
    Threshold,
    _candidate_keys,
    _cell_bytes,
    _pack,
    _unpack,
    _window_cells,
    _window_shift,
    estimated_hints,
    order_preserving_bits,
    round_bits,
    sharded_global_topk,
    sharded_layer_topk,
    sharded_topk,
    threshold_estimates,
    zero3_partition,
)
from tests.conftest import HiddenSyncs, KernelCalls, count_host_reads, free_port

NUMELS = [7, 13, 1, 100, 2]  # none divisible by 3 or 4; the 1- and 2-element layers leave ranks empty


@pytest.fixture(params=["layer by layer", "layers at once"], autouse=True)
def first_round(request, monkeypatch):
    """Every test twice: the first round reading the pieces layer by layer (a CPU), and all
    layers at once, as on a launch-bound device (a layout then selects as on a GPU too)."""
    if request.param == "layers at once":
        monkeypatch.setitem(sharded_topk.__kwdefaults__, "layers_at_once", True)
        monkeypatch.setattr(select, "LAUNCH_BOUND_DEVICES", ("cpu",))
    return request.param


def _row_bytes(width: int) -> int:
    """One group's first-round histogram row: 2^width counts and the NaN count, int32 (fewer
    than 2^31 scores in all layers together)."""
    return (2**width + 1) * 4


def _later_bytes(groups: int, width: int, candidates: int) -> int:
    """A later round's histograms: 2^width counts a group, each in as few bytes as hold the
    candidates of the largest group (1 below 2^8, 2 below 2^16, else 4), in whole int32 words."""
    count_bytes = 1 if candidates < 2**8 else 2 if candidates < 2**16 else 4
    return -(-groups * 2**width * count_bytes // 4) * 4


def _max_rounds(full: list[torch.Tensor], bits_per_round: int | None) -> int:
    """Histogram rounds at most: 32-bit keys for float32 and narrower scores, 64-bit otherwise,
    then, where ties remain, the bits of the global index; the default width for one group of
    all elements is `round_bits(1, key_bits, elements)`."""
    key_bits = 32 if all(s.dtype in NARROW_DTYPES for s in full) else 64
    elements = sum(s.numel() for s in full)
    width = bits_per_round or round_bits(1, key_bits, elements)
    tie_width = min(width, 1 + SPARE_BITS + TIE_SPARE_BITS)  # at least, for a tied entry or two
    return math.ceil(key_bits / width) + math.ceil((elements - 1).bit_length() / tie_width)


def _pieces(full: list[torch.Tensor], rank: int, world: int) -> list[ShardPiece]:
    pieces = []
    for scores in full:
        start, stop = zero3_partition(scores.numel(), rank, world)
        pieces.append(ShardPiece(scores.reshape(-1)[start:stop], start, scores.numel()))
    return pieces


def _local(full: list[torch.Tensor], rank: int, world: int) -> list[torch.Tensor]:
    return [piece.scores for piece in _pieces(full, rank, world)]


def _run_ranks(world: int, select) -> list[ShardedSelection | BaseException]:
    """Run `select(rank, all_reduce_sum)` for every rank in its own thread; the all-reduce sums
    the ranks' tensors behind a barrier.

    A rank that raises leaves the others to time out at the barrier, as a real collective would.
    """
    barrier = threading.Barrier(world, timeout=10)
    slots: list[torch.Tensor | None] = [None] * world
    results: list[ShardedSelection | BaseException | None] = [None] * world

    def run(rank: int) -> None:
        def all_reduce_sum(tensor: torch.Tensor) -> None:
            slots[rank] = tensor.clone()
            barrier.wait()
            total = sum(slots[1:], slots[0].clone())
            barrier.wait()  # nobody overwrites a slot before every rank has summed
            tensor.copy_(total)

        try:
            results[rank] = select(rank, all_reduce_sum)
        except Exception as error:  # noqa: BLE001 - handed to the test to assert on
            results[rank] = error

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _simulate(
    full: list[torch.Tensor],
    k: int,
    world: int,
    eligible: list[torch.Tensor] | None = None,
    bits_per_round: int | None = None,
) -> list[ShardedSelection | BaseException]:
    """`sharded_global_topk` on every rank's pieces of `full`, in threads."""
    return _run_ranks(world, lambda rank, all_reduce_sum: sharded_global_topk(
        _pieces(full, rank, world), k, all_reduce_sum, rank=rank, world_size=world,
        eligible=None if eligible is None else _local(eligible, rank, world),
        bits_per_round=bits_per_round,
    ))


def _assert_matches_single_process(
    full: list[torch.Tensor],
    k: int,
    world: int,
    eligible: list[torch.Tensor] | None = None,
    bits_per_round: int | None = None,
) -> list[ShardedSelection]:
    results = _simulate(full, k, world, eligible, bits_per_round)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    names = [f"layer{i}" for i in range(len(full))]
    expected = global_topk_masks(
        dict(zip(names, full)), k, None if eligible is None else dict(zip(names, eligible))
    )
    for layer, name in enumerate(names):
        union = torch.cat([result.masks[layer] for result in results])
        assert torch.equal(union, expected[name].reshape(-1)), f"world {world}, k {k}, {name}"
    assert sum(int(mask.sum()) for result in results for mask in result.masks) == k
    for result in results:  # every rank took part in the same collectives
        assert (result.bytes_sent, result.all_reduces) == (results[0].bytes_sent, results[0].all_reduces)
        assert result.all_reduces <= _max_rounds(full, bits_per_round)
    return results


def _layers(kind: str, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for numel in NUMELS:
        if kind == "random":
            values = torch.randn(numel, generator=gen, dtype=torch.float64)
        elif kind == "ties":
            values = torch.randint(0, 3, (numel,), generator=gen).double() / 2  # {0, 0.5, 1}
        elif kind == "equal":
            values = torch.full((numel,), 0.25, dtype=torch.float64)
        else:  # signed: negatives, +0.0 and -0.0 mixed, a few repeats
            values = torch.randint(-4, 3, (numel,), generator=gen).double() / 4
            values[torch.rand(numel, generator=gen) < 0.3] = -0.0
        layers.append(values.to(dtype))
    return layers


TOTAL = sum(NUMELS)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["random", "ties", "equal", "signed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_single_process_selection(world, kind, dtype):
    full = _layers(kind, dtype, seed=world)
    gen = torch.Generator().manual_seed(world)
    ks = {0, 1, TOTAL - 1, TOTAL, *torch.randint(2, TOTAL - 1, (4,), generator=gen).tolist()}
    for k in sorted(ks):
        _assert_matches_single_process(full, k, world)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["random", "ties", "signed"])
def test_eligible_restricts_candidates_as_single_process(world, kind):
    full = _layers(kind, torch.float32, seed=10 + world)
    gen = torch.Generator().manual_seed(world)
    eligible = [torch.rand(n, generator=gen) < 0.6 for n in NUMELS]
    eligible[2][:] = False  # a layer with nothing eligible
    count = sum(int(e.sum()) for e in eligible)
    for k in sorted({0, 1, count // 3, count // 2, count}):
        _assert_matches_single_process(full, k, world, eligible)


@pytest.mark.parametrize("bits_per_round", [1, 4, 16])
def test_other_digit_widths_select_the_same(bits_per_round):
    for kind in ("random", "ties"):
        full = _layers(kind, torch.float32, seed=3)
        for k in (1, 40, TOTAL):
            _assert_matches_single_process(full, k, 3, bits_per_round=bits_per_round)


def test_half_precision_scores_are_exact():
    dtypes = [torch.float16, torch.bfloat16, torch.float32]
    mixed = [layer.to(dtypes[i % 3]) for i, layer in enumerate(_layers("random", torch.float64, 4))]
    for dtype in (torch.float16, torch.bfloat16, None):  # None: layers of all three dtypes
        full = mixed if dtype is None else \
            [layer.to(dtype) for layer in _layers("random", torch.float64, seed=4)]
        for k in (1, 17, 60):
            _assert_matches_single_process(full, k, 3)


def test_int32_scores_are_exact():
    # Counter-based random scores are int32 over the whole range, heavy ties included.
    gen = torch.Generator().manual_seed(8)
    full = [torch.randint(-2**31, 2**31 - 1, (n,), generator=gen, dtype=torch.int32) for n in NUMELS]
    full[3][::3] = 5
    for k in (1, 17, 60, TOTAL):
        _assert_matches_single_process(full, k, 3)


def test_mixed_precision_layers_select_on_64_bit_keys():
    full = _layers("signed", torch.float64, seed=6)
    full = [layer.float() if i % 2 else layer for i, layer in enumerate(full)]
    for k in (1, 40, TOTAL - 3):
        _assert_matches_single_process(full, k, 3, bits_per_round=16)
        _assert_matches_single_process(full, k, 3)


@pytest.mark.parametrize("cell_bytes", [1, 2])
def test_packed_counts_sum_over_ranks_without_a_carry(cell_bytes):
    # Counts of a later round share int32 words, `cell_bytes` bytes each, where the candidates
    # on all ranks together fit them: 255 or 65,535, the largest a count may reach, split over
    # 3 ranks in every cell (one cell all on one rank), so that every summed word has all its
    # bits set (a negative int32, reached by an overflow). Summed in int32 (wrapping) or in
    # int64, the words unpack to the counts' sums.
    most = 2 ** (8 * cell_bytes) - 1
    assert _cell_bytes(most) == cell_bytes and _cell_bytes(most + 1) == 2 * cell_bytes
    gen = torch.Generator().manual_seed(cell_bytes)
    first = torch.randint(0, most + 1, (2, 9), generator=gen)
    second = torch.randint(0, most + 1, (2, 9), generator=gen) % (most + 1 - first)
    ranks = [first, second, most - first - second]
    ranks[2][0, 0], ranks[0][0, 0], ranks[1][0, 0] = most, 0, 0
    words = [_pack(counts, cell_bytes) for counts in ranks]
    assert {word.dtype for word in words} == {torch.int32}
    assert all(word.numel() == -(-18 * cell_bytes // 4) for word in words)
    assert bool((sum(words) < 0).any())  # wrapped in int32
    for summed in (words[0] + words[1] + words[2], sum(word.to(torch.int64) for word in words)):
        assert torch.equal(_unpack(summed, cell_bytes, 18).view(2, 9), torch.full((2, 9), most))


def test_counts_are_int64_once_the_model_reaches_2_31_elements():
    # Rank 0 of 2^20 ranks owns 2,048 elements of a 2^31-element layer; the all-reduce records
    # the dtype of every count it is handed (the other ranks contribute nothing here).
    numel, world = 2**31, 2**20
    assert zero3_partition(numel, 0, world) == (0, 2048)
    scores = torch.randn(2048, generator=torch.Generator().manual_seed(0))
    dtypes = []
    selection = sharded_global_topk([ShardPiece(scores, 0, numel)], 10,
                                    lambda tensor: dtypes.append(tensor.dtype), rank=0, world_size=world)
    assert dtypes and set(dtypes) == {torch.int64}
    assert torch.equal(selection.masks[0], topk_mask(scores, 10))


def test_ties_across_layers_and_ranks_follow_global_index():
    # Every score equal: the selection is exactly the k lowest global indices, which interleave
    # layers and ranks as (layer, rank, local index).
    full = _layers("equal", torch.float32, seed=0)
    results = _assert_matches_single_process(full, 30, 4)
    union = torch.cat([torch.cat([r.masks[layer] for r in results]) for layer in range(len(NUMELS))])
    assert torch.equal(union, torch.arange(TOTAL) < 30)
    # float32 keys have 32 bits, in digits as wide as 123 elements call for (their 7 bits and
    # SPARE_BITS, under the 14 bits one group's histogram may have); all 32 bits get fixed, then
    # one round over the 7 bits of the global indices, which are distinct: it ends the selection.
    width = TOTAL.bit_length() + SPARE_BITS
    assert ROUND_COUNTS == 2**14 and round_bits(1, 32) == 14 and round_bits(1, 32, TOTAL) == width == 9
    widths = [width, width, width, 32 - 3 * width, (TOTAL - 1).bit_length()]
    assert results[0].all_reduces == len(widths)
    # The later rounds' candidates (all 123 tied) fit a byte a count.
    assert results[0].bytes_sent == _row_bytes(width) + sum(2**w for w in widths[1:])
    assert _later_bytes(1, width, TOTAL) == 2**width
    # Nothing grows with the ranks: the same calls and bytes on 2 and 3 ranks.
    for world in (2, 3):
        again = _assert_matches_single_process(full, 30, world)
        assert (again[0].all_reduces, again[0].bytes_sent) == (len(widths), results[0].bytes_sent)
    # Fixed 8-bit digits: four rounds for 32-bit keys, eight for float64 scores, then the 7
    # index bits.
    for dtype, rounds in ((torch.float32, 4), (torch.float64, 8)):
        results = _assert_matches_single_process(_layers("equal", dtype, seed=0), 30, 4, bits_per_round=8)
        assert results[0].all_reduces == rounds + 1
        assert results[0].bytes_sent == _row_bytes(8) + (rounds - 1) * 2**8 + 2**7
    # 307 tied entries, 9 index bits in 8-bit digits: the first index round reads the top 8 of
    # the keys 306 - index, pairs of keys. The 101 lowest indices are the keys 206-306, whole
    # pairs, so it ends the selection; the 100 lowest leave key 206 out of the pair (206, 207),
    # and a second round reads the last bit. 307 candidates take 2 bytes a count, the last
    # round's 2 one byte (its 2 counts in one padded word).
    tied = [torch.full((300,), 0.5), torch.full((7,), 0.5)]
    results = _assert_matches_single_process(tied, 101, 3, bits_per_round=8)
    assert results[0].all_reduces == 5
    assert results[0].bytes_sent == _row_bytes(8) + 4 * _later_bytes(1, 8, 307) == 1028 + 4 * 512
    results = _assert_matches_single_process(tied, 100, 3, bits_per_round=8)
    assert results[0].all_reduces == 6
    assert results[0].bytes_sent == _row_bytes(8) + 4 * 512 + _later_bytes(1, 1, 2) == 3076 + 4


def test_distinct_threshold_stops_before_a_tie_round():
    full = [torch.arange(50, dtype=torch.float32)]
    results = _assert_matches_single_process(full, 10, 2)
    # 8-bit digits (50 elements): the first (sign and 7 exponent bits) leaves 2.0-49.0 in the
    # k-th's bucket, the second (the last exponent bit and 7 mantissa bits) isolates 40.0.
    assert round_bits(1, 32, 50) == 8
    # The second round's 48 candidates (2.0-49.0) fit a byte a count.
    assert results[0].all_reduces == 2
    assert results[0].bytes_sent == _row_bytes(8) + _later_bytes(1, 8, 48) == 1028 + 256


def test_impossible_k_and_nan_raise_on_every_rank():
    full = _layers("random", torch.float32, seed=5)
    for error in _simulate(full, TOTAL + 1, 3):
        assert isinstance(error, ValueError) and f"cannot select {TOTAL + 1} of {TOTAL}" in str(error)
    full[3][90] = math.nan  # owned by the last of 3 ranks only
    for error in _simulate(full, 5, 3):
        assert isinstance(error, ValueError) and "NaN" in str(error)
    ineligible = [torch.ones(n, dtype=torch.bool) for n in NUMELS]
    ineligible[3][90] = False  # a NaN nobody may select is no obstacle
    _assert_matches_single_process(
        [torch.nan_to_num(x, nan=7.0) for x in full], 5, 3, ineligible
    )
    results = _simulate(full, 5, 3, ineligible)
    assert all(isinstance(result, ShardedSelection) for result in results)


def test_pieces_must_follow_the_zero3_layout():
    scores = torch.arange(10.0)
    identity = lambda tensor: tensor  # noqa: E731
    with pytest.raises(ValueError, match=r"rank 1 of 2 owns \[5, 10\)"):
        sharded_global_topk([ShardPiece(scores[:5], 0, 10)], 1, identity, rank=1, world_size=2)
    with pytest.raises(ValueError, match="rank 1 of 2 owns"):
        sharded_global_topk([ShardPiece(scores[:4], 5, 10)], 1, identity, rank=1, world_size=2)
    with pytest.raises(ValueError, match="eligibility flags"):
        sharded_global_topk([ShardPiece(scores[5:], 5, 10)], 1, identity, rank=1, world_size=2,
                            eligible=[torch.ones(4, dtype=torch.bool)])
    assert zero3_partition(7, 3, 4) == (6, 7) and zero3_partition(1, 2, 4) == (1, 1)


def test_order_preserving_bits_is_monotone():
    tiny = torch.finfo(torch.float64).tiny
    values = torch.tensor(
        [-math.inf, -1e308, -1.5, -tiny, -5e-324, -0.0, 0.0, 5e-324, 1e-320, tiny, 1.0, 1e308, math.inf],
        dtype=torch.float64,
    )
    keys = order_preserving_bits(values)
    assert keys.dtype == torch.int64
    steps = keys[1:] - keys[:-1]
    assert (steps[:5] > 0).all() and steps[5] == 0 and (steps[6:] > 0).all()  # -0.0 == +0.0
    float32 = torch.tensor([-math.inf, -3e38, -1e-45, 0.0, 1e-45, 1e-38, 3e38, math.inf])
    assert (order_preserving_bits(float32).diff() > 0).all()  # float32 subnormals widen exactly
    gen = torch.Generator().manual_seed(0)
    mixed = torch.randint(-3, 4, (1000,), generator=gen) * torch.randn(1000, generator=gen)
    assert torch.equal(
        torch.argsort(order_preserving_bits(mixed), descending=True, stable=True),
        torch.argsort(mixed, descending=True, stable=True),
    )
    with pytest.raises(ValueError, match="NaN"):
        order_preserving_bits(torch.tensor([1.0, math.nan]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int8])
def test_32_bit_keys_keep_the_scores_order(dtype):
    # float32, int32 and narrower scores select on 32-bit keys whose bit patterns, read unsigned,
    # order as the float64 keys do (float32 or int32 holds every such value exactly), -0.0 equal
    # to +0.0.
    gen = torch.Generator().manual_seed(1)
    if dtype.is_floating_point:
        info = torch.finfo(dtype)
        edges = torch.tensor([-math.inf, info.min, -1.0, -info.tiny, -0.0, 0.0, info.tiny, 1.0,
                              info.max, math.inf], dtype=dtype)
        values = torch.cat([edges, (torch.randn(2000, generator=gen) * 10).to(dtype)])
    else:
        info = torch.iinfo(dtype)
        edges = torch.tensor([info.min, info.min + 1, -1, 0, 1, info.max - 1, info.max], dtype=dtype)
        values = torch.cat([edges, torch.randint(info.min, info.max, (2000,), generator=gen, dtype=dtype)])
    keys = _candidate_keys(values, 32)
    assert keys.dtype == torch.int32
    keys = keys.to(torch.int64) & (2**32 - 1)  # the bit patterns read unsigned
    wide = order_preserving_bits(values)
    for compare in (torch.gt, torch.eq):
        assert torch.equal(compare(keys[:, None], keys[None, :]), compare(wide[:, None], wide[None, :]))


# --- two real processes over gloo, ResNet-50's weight layers -------------------------------------

WORLD = 2
SMALL = [7, 13, 1]  # odd sizes in front of ResNet-50's (mostly even) layers
SCALE = 8  # ResNet-50's 54 weight layers at 1/8 of their size: the same collectives, in seconds


def _resnet50_numels() -> list[int]:
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = torchvision.models.resnet50()
    return [p.numel() // SCALE + 1 for p in model.parameters() if p.dim() > 1]


def _full_scores(numels: list[int], kind: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    if kind == "magnitude":  # float32 |N(0, 1)|: millions of draws hold repeated values
        return [torch.randn(n, generator=gen).abs() for n in numels]
    return [torch.randint(-8, 8, (n,), generator=gen).float() / 8 for n in numels]  # heavy ties


def _worker(rank: int, port: int, numels: list[int], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    results = {}
    for kind in ("magnitude", "ties"):
        pieces = _pieces(_full_scores(numels, kind), rank, WORLD)
        selection = sharded_global_topk(
            pieces, sum(numels) // 10, dist.all_reduce, rank=rank, world_size=WORLD
        )
        per_layer = sharded_layer_topk(
            pieces, [numel // 10 for numel in numels], dist.all_reduce, rank=rank, world_size=WORLD
        )
        results[kind] = {
            "masks": selection.masks,
            "bytes": selection.bytes_sent,
            "all_reduces": selection.all_reduces,
            "layer_masks": per_layer.masks,
            "layer_bytes": per_layer.bytes_sent,
            "layer_all_reduces": per_layer.all_reduces,
        }
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()



@pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)
@pytest.mark.parametrize("first_round", ["layer by layer"], indirect=True)  # processes: a CPU
def test_two_gloo_processes_on_resnet50_layers(tmp_path):
    numels = SMALL + _resnet50_numels()
    mp.spawn(_worker, args=(free_port(), numels, str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    k = sum(numels) // 10
    for kind in ("magnitude", "ties"):
        full = _full_scores(numels, kind)
        expected = global_topk_masks({str(i): s for i, s in enumerate(full)}, k)
        for layer in range(len(numels)):
            union = torch.cat([ranks[r][kind]["masks"][layer] for r in range(WORLD)])
            assert torch.equal(union, expected[str(layer)]), f"{kind}, layer {layer}"
            union = torch.cat([ranks[r][kind]["layer_masks"][layer] for r in range(WORLD)])
            assert torch.equal(union, topk_mask(full[layer], numels[layer] // 10)), f"{kind} {layer}"
        layer_sent, layer_calls = ranks[0][kind]["layer_bytes"], ranks[0][kind]["layer_all_reduces"]
        # float32 keys: 32 bits in digits at least as wide as the first round's (all layers open),
        # then, where ties remain, the bits of the largest layer's indices; each round at most
        # ROUND_COUNTS counts and a count per open layer.
        width = round_bits(len(numels), 32, max(numels))
        layer_rounds = math.ceil(32 / width) + math.ceil(
            (max(numels) - 1).bit_length() / min(width, 1 + SPARE_BITS + TIE_SPARE_BITS))
        assert layer_calls <= layer_rounds
        assert layer_sent <= layer_rounds * (ROUND_COUNTS + 2 * len(numels)) * 4
        sent, calls = ranks[0][kind]["bytes"], ranks[0][kind]["all_reduces"]
        assert (sent, calls) == (ranks[1][kind]["bytes"], ranks[1][kind]["all_reduces"])
        # The payload depends on the number of layers and rounds only, never on the layers' sizes
        # or the ranks: at most 3 histograms of 14-bit digits, then rounds over the indices'
        # bits, digits at least 1 + SPARE_BITS + TIE_SPARE_BITS wide; also for the full-size
        # model, a fraction of a percent of its scores.
        index_rounds = math.ceil((sum(numels) - 1).bit_length() / (1 + SPARE_BITS + TIE_SPARE_BITS))
        worst = (3 + index_rounds) * _row_bytes(14)
        full_size_scores = SCALE * sum(numels) * 4
        assert sent <= worst < full_size_scores / 200
        print(
            f"\n{kind}: {len(numels)} layers, {sum(numels)} scores, {calls} all-reduces, {sent} bytes "
            f"per selection on each rank (at most {worst}); gathering full-size ResNet-50's float32 "
            f"scores: ~{full_size_scores} bytes; per-layer top-k of every layer at once: "
            f"{layer_calls} all-reduces, {layer_sent} bytes"
        )


# --- per-layer selections batched into one histogram a round -------------------------------------


def _simulate_layers(full, ks, world, eligible=None):
    """As `_simulate`, for `sharded_layer_topk` with one k per layer."""
    return _run_ranks(world, lambda rank, all_reduce_sum: sharded_layer_topk(
        _pieces(full, rank, world), ks, all_reduce_sum, rank=rank, world_size=world,
        eligible=None if eligible is None else _local(eligible, rank, world)))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["random", "ties", "equal", "signed"])
def test_layer_topk_equals_topk_mask_of_every_layer(world, kind):
    full = _layers(kind, torch.float32, seed=20 + world)
    gen = torch.Generator().manual_seed(world)
    eligible = [torch.rand(n, generator=gen) < 0.7 for n in NUMELS]
    for restrict in (None, eligible):
        counts = NUMELS if restrict is None else [int(e.sum()) for e in restrict]
        for ks in ([0] * len(NUMELS), list(counts), [c // 2 for c in counts],
                   [0 if i % 2 else c for i, c in enumerate(counts)]):
            results = _simulate_layers(full, ks, world, restrict)
            for result in results:
                assert isinstance(result, ShardedSelection), result
            for layer, k in enumerate(ks):
                expected = topk_mask(full[layer], k, None if restrict is None else restrict[layer])
                union = torch.cat([result.masks[layer] for result in results])
                assert torch.equal(union, expected), f"world {world}, ks {ks}, layer {layer}"
            calls = {(r.bytes_sent, r.all_reduces) for r in results}
            rounds = math.ceil(32 / round_bits(len(NUMELS), 32, max(NUMELS)))
            assert len(calls) == 1 and results[0].all_reduces <= rounds + 1


def test_layer_topk_shares_each_round_between_layers():
    # All scores equal in every layer: each layer needs all 32 bits of its float32 keys and a
    # round over its indices, and still the layers together make one collective a round, each
    # round one (open layers x (2^width + 1)) histogram, the digits as wide as the 100-element
    # layer calls for. The 1-element layer (k = 0) is decided by the first round and sends no
    # row after it. The index round reads every layer's index bits at once (7 for 100
    # elements, rows of 2^7 for each tied layer) and ends every selection.
    full = _layers("equal", torch.float32, seed=0)
    ks = [n // 2 for n in NUMELS]
    assert ks.count(0) == 1
    results = _simulate_layers(full, ks, 3)
    widths = [round_bits(len(NUMELS), 32, max(NUMELS)), round_bits(len(NUMELS) - 1, 32, max(NUMELS))]
    assert widths[:2] == [9, 9]
    widths = [9, 9, 9, 5, (max(NUMELS) - 1).bit_length()]
    assert results[0].all_reduces == len(widths)
    # Later rounds: the 100-element layer's candidates, the most, fit a byte a count.
    rows = len(NUMELS) * _row_bytes(widths[0]) + sum(_later_bytes(len(NUMELS) - 1, w, max(NUMELS))
                                                      for w in widths[1:])
    assert results[0].bytes_sent == rows
    for layer, k in enumerate(ks):
        assert torch.equal(torch.cat([r.masks[layer] for r in results]),
                           torch.arange(NUMELS[layer]) < k)


def test_layer_topk_names_the_group_that_cannot_select():
    full = _layers("random", torch.float32, seed=1)
    ks = [0, NUMELS[1] + 1, 0, 0, 0]
    for error in _simulate_layers(full, ks, 2):
        assert isinstance(error, ValueError) and f"group 1: cannot select {NUMELS[1] + 1}" in str(error)


@pytest.mark.parametrize("kind", ["random", "ties", "equal"])
def test_local_work_reads_the_device_once_per_round_and_waits_for_it_nowhere_else(kind, monkeypatch):
    # One rank: the all-reduce is the identity. Every round decides all layers from one transfer
    # of (digit, above, in bucket, total) per group; no count is read layer by layer. The first
    # round's open candidates are gathered after one read of all layers' counts; each later
    # round keeps its own with one nonzero. Ties (all scores equal: 4 rounds of key bits, then
    # one of index bits) go on in rounds like any other. Nothing else waits for the device
    # (boolean-mask indexing, item, nonzero per layer), whatever the number of layers.
    full = _layers(kind, torch.float32, seed=4)
    ks = [n // 3 for n in NUMELS]
    reads = count_host_reads(monkeypatch)
    with HiddenSyncs() as hidden:
        selection = sharded_layer_topk(_pieces(full, 0, 1), ks, lambda tensor: None, rank=0,
                                       world_size=1)
    monkeypatch.undo()
    rounds = selection.all_reduces
    assert rounds > 1
    if kind == "equal":
        assert rounds == 5
    assert len(reads) == rounds + 1
    assert hidden.ops == ["aten.nonzero"] * (rounds - 1)
    for layer, k in enumerate(ks):
        assert torch.equal(selection.masks[layer], topk_mask(full[layer], k))


@pytest.mark.parametrize("kind", ["random", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_selection_makes_as_many_aten_calls_over_many_layers_as_over_few(kind, dtype):
    # The first round reads all pieces as one concatenation; later rounds (ties' too)
    # take the candidates of all layers together. So the aten calls that are not views (a GPU's
    # kernel launches) of a per-layer selection with eligibility, plain or hinted (32-bit keys;
    # 64-bit hints search layer by layer), are the same for 6 copies of the layers as for one.
    base = _layers(kind, dtype, seed=7)
    gen = torch.Generator().manual_seed(8)
    allowed = [torch.rand(n, generator=gen) < 0.8 for n in NUMELS]
    calls = {}
    for copies in (1, 6):
        full, eligible = base * copies, allowed * copies
        ks = [int(flags.sum()) // 2 for flags in eligible]

        def select(hints=None):
            return sharded_topk(_pieces(full, 0, 1), ks, list(range(len(full))),
                                lambda tensor: None, rank=0, world_size=1, eligible=eligible,
                                bits_per_round=4, layers_at_once=True) \
                if hints is None else sharded_topk(
                    _pieces(full, 0, 1), ks, list(range(len(full))), lambda tensor: None, rank=0,
                    world_size=1, eligible=eligible, bits_per_round=4, hints=hints,
                    layers_at_once=True)

        plain = select()
        for layer, k in enumerate(ks):
            assert torch.equal(plain.masks[layer], topk_mask(full[layer], k, eligible[layer]))
        variants = [None] + ([plain.thresholds] if dtype == torch.float32 else [])
        for variant, hints in enumerate(variants):
            with KernelCalls() as counted:
                selection = select(hints)
            assert [mask.tolist() for mask in selection.masks] == \
                [mask.tolist() for mask in plain.masks]
            calls[copies, variant] = (counted.count, selection.all_reduces)
    assert calls[1, 0][1] > 2  # rounds: the later rounds count too
    for (copies, variant), count in calls.items():
        assert count == calls[1, variant], (copies, variant)


# --- hints: a first round centred on an earlier threshold -----------------------------------------


def _hinted(full, ks, groups, world, hints, eligible=None):
    return _run_ranks(world, lambda rank, all_reduce_sum: sharded_topk(
        _pieces(full, rank, world), ks, groups, all_reduce_sum, rank=rank, world_size=world,
        eligible=None if eligible is None else _local(eligible, rank, world), hints=hints))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["random", "ties", "equal", "signed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hints_never_change_the_masks(world, kind, dtype):
    # Global and per-layer selections, with and without eligibility, against the single-process
    # masks; hints: the thresholds of the same selection, of other scores, the lowest and the
    # highest key, another key width (ignored), and none for some groups.
    full, other = _layers(kind, dtype, seed=30 + world), _layers("random", dtype, seed=40 + world)
    gen = torch.Generator().manual_seed(world)
    eligible = [torch.rand(n, generator=gen) < 0.7 for n in NUMELS]
    key_bits = 32 if dtype == torch.float32 else 64
    layer_groups, global_groups = list(range(len(NUMELS))), [0] * len(NUMELS)
    for groups in (layer_groups, global_groups):
        for restrict in (None, eligible):
            sizes = NUMELS if restrict is None else [int(e.sum()) for e in restrict]
            if groups is global_groups:
                ks = [sum(sizes) // 3]
                expected = global_topk_masks(
                    {f"l{i}": s for i, s in enumerate(full)}, ks[0],
                    None if restrict is None else {f"l{i}": e for i, e in enumerate(restrict)})
                expected = [expected[f"l{i}"].reshape(-1) for i in range(len(full))]
            else:
                ks = [size // 2 for size in sizes]
                expected = [topk_mask(s, k, None if restrict is None else restrict[i]).reshape(-1)
                            for i, (s, k) in enumerate(zip(full, ks))]
            plain = _hinted(full, ks, groups, world, None, restrict)[0]
            elsewhere = _hinted(other, ks, groups, world, None, restrict)[0]
            assert len(plain.thresholds) == len(ks)
            hint_sets = [plain.thresholds, elsewhere.thresholds,
                         [Threshold(key_bits, 0)] * len(ks),
                         [Threshold(key_bits, 2**key_bits - 1)] * len(ks),
                         [Threshold(96 - key_bits, 5)] * len(ks),
                         [None if g % 2 else Threshold(key_bits, 2**key_bits - 1) for g in range(len(ks))]]
            hint_sets += [[None if t is None else Threshold(t.key_bits, t.key, margin) for t in ts]
                          for ts in (plain.thresholds, elsewhere.thresholds)
                          for margin in (1, 2**10, 2**40)]
            hint_sets += [[Threshold(key_bits, key, 2**10)] * len(ks) for key in (0, 2**key_bits - 1)]
            hint_sets += [[(Threshold(key_bits, 0, 2**10), t or Threshold(key_bits, 1),
                            Threshold(key_bits, 2**key_bits - 1))[: 1 + g % 3]
                           for g, t in enumerate(ts)] for ts in (plain.thresholds, elsewhere.thresholds)]
            for hints in hint_sets:
                results = _hinted(full, ks, groups, world, hints, restrict)
                for result in results:
                    assert isinstance(result, ShardedSelection), result
                    assert (result.bytes_sent, result.all_reduces) == \
                        (results[0].bytes_sent, results[0].all_reduces)
                for layer, mask in enumerate(expected):
                    assert torch.equal(torch.cat([r.masks[layer] for r in results]), mask), \
                        (groups is global_groups, restrict is None, hints, layer)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["random", "ties", "signed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pieces_on_a_gpu_select_as_on_the_cpu(kind, dtype):
    # Global and per-layer, eligible or not, plain, hinted and estimated (a margin): the same
    # masks, bytes and rounds on CUDA as on the CPU, over the small layers and a few large ones.
    gen = torch.Generator().manual_seed(3)
    full = _layers(kind, dtype, seed=50) + [torch.randn(n, generator=gen, dtype=dtype)
                                            for n in (70_001, 3_000, 250_000)]
    other = [torch.randn(t.numel(), generator=gen, dtype=dtype) for t in full]
    eligible = [torch.rand(t.numel(), generator=gen) < 0.7 for t in full]
    world = 3
    for groups in (list(range(len(full))), [0] * len(full)):
        for restrict in (None, eligible):
            sizes = [t.numel() if restrict is None else int(restrict[i].sum())
                     for i, t in enumerate(full)]
            ks = [max(sizes) // 3] if groups[-1] == 0 else [size // 2 for size in sizes]
            found = _hinted(other, ks, groups, world, None, restrict)[0].thresholds
            margins = [None if t is None else Threshold(t.key_bits, t.key, 2**12) for t in found]
            for hints in (None, found, margins):
                on_cpu = _hinted(full, ks, groups, world, hints, restrict)
                on_gpu = _hinted([t.cuda() for t in full], ks, groups, world, hints,
                                 None if restrict is None else [e.cuda() for e in restrict])
                for cpu, gpu in zip(on_cpu, on_gpu):
                    assert isinstance(gpu, ShardedSelection), gpu
                    assert (gpu.bytes_sent, gpu.all_reduces) == (cpu.bytes_sent, cpu.all_reduces)
                    for a, b in zip(cpu.masks, gpu.masks):
                        assert b.is_cuda and torch.equal(a, b.cpu())


def test_a_hint_near_the_threshold_saves_a_round_and_a_far_one_costs_none():
    # Six layers of 20,000 |N(0, 1)| float32 scores, 10 % of each: 11-bit digits, 3 rounds.
    # The thresholds of another draw of the same distribution put each group's k-th key in its
    # window of 2^11 buckets of 2^11 keys: one round resolves the last 11 bits. Hints at the
    # ends of the key space leave the k-th key outside the window, counted by its top 10 bits
    # (the fewest that leave two 11-bit rounds, as the cold selection's 21 bits do).
    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(20_000, generator=gen).abs() for _ in range(6)]

    ks, groups = [2_000] * 6, list(range(6))
    scores = draw(1)
    assert round_bits(6, 32, 20_000) == 11
    plain = _hinted(scores, ks, groups, 2, None)
    assert plain[0].all_reduces == 3
    earlier = _hinted(draw(2), ks, groups, 2, None)[0].thresholds
    near = _hinted(scores, ks, groups, 2, earlier)
    assert near[0].all_reduces == 2
    kth_keys = [int(_candidate_keys(layer, 32).to(torch.int64).bitwise_and(2**32 - 1)
                    .sort(descending=True).values[k - 1]) for layer, k in zip(scores, ks)]
    # Each threshold is the k-th key with the bits no round resolved as 0: within its window
    # bucket (2^11 keys), or exact.
    assert all(threshold.key_bits == 32 and 0 <= key - threshold.key < 2**11
               for threshold, key in zip(near[0].thresholds, kth_keys))
    for far in (Threshold(32, 0), Threshold(32, 2**32 - 1)):
        away = _hinted(scores, ks, groups, 2, [far] * 6)[0]
        assert away.all_reduces == 3
        assert all(threshold.key_bits == 32 and 0 <= key - threshold.key < 2**11
                   for threshold, key in zip(away.thresholds, kth_keys))
        assert all(torch.equal(a, b) for a, b in zip(away.masks, plain[0].masks))
    for result, reference in zip(near, plain):
        assert all(torch.equal(a, b) for a, b in zip(result.masks, reference.masks))


def test_a_margin_nests_a_window_as_fine_as_it_and_its_miss_costs_no_round():
    # 48 layers of 2^14 |N(0, 1)| float32 scores, 3 % of each: 8-bit digits, 4 rounds cold. A
    # plain hint at each threshold: a window of 256 buckets of 2^16 keys, 2 rounds more. A hint
    # with a margin of 1,000 keys: inside that window one of 256 buckets of 2^8 keys (127
    # buckets either side cover the margin), 1 round more. The same margin 2^20 keys off the
    # threshold misses the fine window and lands in the plain one: 2 rounds more, as the plain
    # hint. Off by a quarter of the key space, it lands among the cells of the top 8 bits
    # outside the plain window: 3 rounds more, as without a hint. The masks are those without a
    # hint every time.
    gen = torch.Generator().manual_seed(3)
    scores = [torch.randn(2**14, generator=gen).abs() for _ in range(48)]
    ks, groups = [500] * 48, list(range(48))
    assert round_bits(48, 32, 2**14) == 8
    plain = _hinted(scores, ks, groups, 2, None)
    kth_keys = [int(_candidate_keys(layer, 32).to(torch.int64).bitwise_and(2**32 - 1)
                    .sort(descending=True).values[k - 1]) for layer, k in zip(scores, ks)]

    def rounds(hints):
        results = _hinted(scores, ks, groups, 2, hints)
        for result, reference in zip(results, plain):
            assert all(torch.equal(a, b) for a, b in zip(result.masks, reference.masks)), hints[0]
        assert results[0].all_reduces == results[1].all_reduces
        return results[0].all_reduces

    assert plain[0].all_reduces == 4
    assert rounds([Threshold(32, key) for key in kth_keys]) == 3
    assert rounds([Threshold(32, key, 1_000) for key in kth_keys]) == 2
    assert rounds([Threshold(32, key + 2**20, 1_000) for key in kth_keys]) == 3
    assert rounds([Threshold(32, key - 2**30, 1_000) for key in kth_keys]) == 4
    # Two hints, a window around each: the threshold in either saves what that window saves.
    assert rounds([(Threshold(32, key - 2**30, 1_000), Threshold(32, key)) for key in kth_keys]) == 3
    assert rounds([(Threshold(32, key - 2**30), Threshold(32, key, 1_000)) for key in kth_keys]) == 2
    assert rounds([(Threshold(32, key + 2**25), Threshold(32, key - 2**25)) for key in kth_keys]) == 4


@pytest.mark.parametrize("width", [1, 2, 6, 8])
@pytest.mark.parametrize("key_bits", [32, 64])
def test_a_hinted_first_round_splits_the_keys_into_aligned_cells(width, key_bits):
    # Whatever the hints (one, or two anywhere): cells in key order from key 0, each inside the
    # aligned range of its digit (the range later rounds refine), at most 2^width top cells and
    # 2^(width + 1) + 2 a hint; with one hint whose margin the plain window can hold, every key
    # within the margin falls in cells of one width.
    top = 2**key_bits - 1
    keys = (0, 1, 2**20 + 12_345, top // 3, top - 5, top)
    for key in keys:
        for margin in (0, 1, 300, 2**25):
            for others in [()] + [(Threshold(key_bits, other),) for other in keys[::2]]:
                hints = (Threshold(key_bits, key, margin), *others)
                cells = _window_cells(hints, width, key_bits)
                lows = [low for low, _ in cells]
                assert lows[0] == 0 and lows == sorted(set(lows))
                assert len(cells) <= 2**width + len(hints) * (2 ** (width + 1) + 2)
                for (low, shift), high in zip(cells, lows[1:] + [2**key_bits]):
                    assert 0 <= shift <= key_bits and (low >> shift) == ((high - 1) >> shift)
                if not others and width > 1 and \
                        0 < margin <= (2 ** (width - 1) - 1) << _window_shift(width, key_bits):
                    near = {shift for (low, shift), high in zip(cells, lows[1:] + [2**key_bits])
                            if low <= key + margin and high > key - margin}
                    assert len(near) == 1, (key, margin, near)


def test_estimates_bracket_the_threshold_and_narrow_with_the_ranks():
    # One layer of 2^20 |N(0, 1)| scores, 90 % eligible, 3 % of those to select, in 4 and in 64
    # ranks' pieces (4,096-score samples each): the mean bracket of the ranks' estimates holds
    # the k-th key in each of five draws, and is narrower at 64 ranks. A rank's own estimate
    # with a larger `world_size` is narrower too. No estimate where nothing or everything is
    # selected.
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        scores = torch.randn(2**20, generator=gen).abs()
        eligible = torch.rand(2**20, generator=gen) < 0.9
        k = int(0.03 * int(eligible.sum()))
        kth = int(_candidate_keys(scores[eligible], 32).to(torch.int64).bitwise_and(2**32 - 1)
                  .sort(descending=True).values[k - 1])
        margins = []
        for world in (4, 64):
            total = sum(threshold_estimates(
                [scores[slice(*zero3_partition(2**20, rank, world))]],
                [eligible[slice(*zero3_partition(2**20, rank, world))]],
                [k / int(eligible.sum())], 32, world) for rank in range(world))
            hint, = estimated_hints(total.tolist(), 32)
            assert abs(hint.key - kth) <= hint.margin, (seed, world)
            margins.append(hint.margin)
        assert margins[1] < margins[0] / 2
    one = [estimated_hints(threshold_estimates([scores], [eligible], [0.03], 32, world).tolist(), 32)[0]
           for world in (1, 64)]
    assert one[1].margin < one[0].margin
    assert estimated_hints(threshold_estimates(
        [scores, scores[:0], scores], [None] * 3, [0.0, 0.5, 1.0], 32).tolist(), 32) == [None] * 3


def _reference_estimates(scores, eligible, fractions, key_bits, world):
    """`threshold_estimates` as its docstring defines it, a layer at a time with kthvalue."""
    rows = torch.zeros(5, len(scores), dtype=torch.int64)
    for layer, (layer_scores, allowed, p) in enumerate(zip(scores, eligible, fractions)):
        stride = max(1, layer_scores.numel() // ESTIMATE_SAMPLE)
        sample = layer_scores.reshape(-1)[::stride]
        if allowed is not None and int(allowed[::stride].sum()) >= ESTIMATE_MIN:
            sample = sample[allowed[::stride]]
        n = sample.numel()
        if not n or not 0 < p < 1:
            continue
        sample = sample.double() if sample.is_floating_point() else sample.long()
        spread = ESTIMATE_Z * math.sqrt(p * (1 - p) / (n * world)) + 1 / (n + 1)
        for row, share in enumerate((p + spread, p - spread)):
            higher = min(n, max(1, round(share * (n + 1))))
            kth = sample.kthvalue(n - higher + 1).values.reshape(1)
            key = int(_candidate_keys(kth, key_bits).to(torch.int64)[0]) >> (key_bits - ESTIMATE_BITS) \
                & (2**ESTIMATE_BITS - 1)
            rows[2 * row, layer], rows[2 * row + 1, layer] = key >> 16, key & 0xFFFF
        rows[4, layer] = 1
    return rows.reshape(-1)


def test_estimates_make_as_many_aten_calls_over_many_layers_as_over_few():
    # The picks are counted in one running sum and the samples laid out in one gather.
    gen = torch.Generator().manual_seed(9)
    sizes = [7, 13, 100, 5000, 20000]
    scores = [torch.randn(n, generator=gen).abs() for n in sizes]
    eligible = [torch.rand(n, generator=gen) < 0.5 for n in sizes]
    calls, estimates = [], []
    for copies in (1, 6):
        with KernelCalls() as counted:
            estimates.append(threshold_estimates(scores * copies, eligible * copies,
                                                 [0.3] * len(sizes) * copies, 32, 4))
        calls.append(counted.count)
    assert calls[0] == calls[1]
    assert estimates[1].view(5, -1).tolist() == estimates[0].view(5, -1).repeat(1, 6).tolist()


@pytest.mark.parametrize("kind", ["random", "ties", "nan", "int32", "mixed"])
def test_estimates_are_each_layers_own_sample_quantiles(kind):
    # All layers' samples sorted in one padded table give each layer's quantiles as its own
    # kthvalue would: NaN and -inf, random int32 scores, float16 beside float64 (64-bit keys),
    # eligible samples under and over ESTIMATE_MIN, empty layers, fractions 0 and 1, 1-4 ranks.
    gen = torch.Generator().manual_seed(len(kind))
    for trial in range(8):
        scores, eligible = [], []
        for layer in range(5):
            numel = int(torch.randint(0, 20_000 if trial % 4 else 60, (1,), generator=gen))
            if kind == "int32":
                layer_scores = torch.randint(-2**31, 2**31 - 1, (numel,), generator=gen,
                                             dtype=torch.int64).to(torch.int32)
            elif kind == "ties":
                layer_scores = torch.randint(-3, 4, (numel,), generator=gen) / 4
            elif kind == "mixed":
                layer_scores = torch.randn(numel, generator=gen, dtype=torch.float64) if layer % 2 \
                    else torch.randn(numel, generator=gen).half()
            else:
                layer_scores = torch.randn(numel, generator=gen)
            if kind == "nan":
                layer_scores[::7], layer_scores[::5] = float("nan"), float("-inf")
            scores.append(layer_scores)
            eligible.append(None if (trial + layer) % 3 == 0 else
                            torch.rand(numel, generator=gen) < (0.5, 0.01, 0.9)[(trial + layer) % 3])
        fractions = [(0.3, 0.0, 1.0, 0.9, 0.01, 0.5)[(trial * 3 + layer) % 6] for layer in range(5)]
        key_bits = 64 if kind == "mixed" else 32
        world = 1 + trial % 4
        assert torch.equal(threshold_estimates(scores, eligible, fractions, key_bits, world),
                           _reference_estimates(scores, eligible, fractions, key_bits, world)), trial


def test_a_carry_travels_with_the_first_round_and_changes_nothing_else():
    # Every rank's carry comes back summed, on every rank; the calls, bytes and masks are those
    # of the same selection without it (the carry fills whole zero-padded histogram rows).
    full = _layers("random", torch.float32, seed=50)
    ks, groups = [n // 2 for n in NUMELS], list(range(len(NUMELS)))
    plain = _hinted(full, ks, groups, 3, None)
    carried = _run_ranks(3, lambda rank, all_reduce_sum: sharded_topk(
        _pieces(full, rank, 3), ks, groups, all_reduce_sum, rank=rank, world_size=3,
        carry=torch.tensor([rank + 1, 10 * rank, 2**16 - 1])))
    for result, reference in zip(carried, plain):
        assert isinstance(result, ShardedSelection), result
        assert result.carried == [6, 30, 3 * (2**16 - 1)] and reference.carried == []
        assert result.all_reduces == reference.all_reduces
        assert all(torch.equal(a, b) for a, b in zip(result.masks, reference.masks))
    with pytest.raises(ValueError, match="carry"):
        sharded_topk([], [], [], lambda t: None, rank=0, world_size=1, carry=torch.ones(2))


def _rigl_case(seed: int, drop_step: float | None = None):
    """RigL's update: 40 layers of 1,024-8,192 elements at 10 % density, |N(0, 1)| drop and grow
    scores (the drop's rounded to multiples of `drop_step` if given), 30 % swapped: shapes,
    masks, drop, grow, active counts, swap counts."""
    shapes = {f"l{i}": (1_024 * (1 + i % 8),) for i in range(40)}
    gen = torch.Generator().manual_seed(seed)
    masks = {name: torch.rand(shape, generator=gen) < 0.1 for name, shape in shapes.items()}
    drop, grow = ({name: torch.randn(shape, generator=gen).abs() for name, shape in shapes.items()}
                  for _ in range(2))
    if drop_step is not None:
        drop = {name: (scores / drop_step).round() * drop_step for name, scores in drop.items()}
    active = {name: int(mask.sum()) for name, mask in masks.items()}
    counts = {name: int(0.3 * count) for name, count in active.items()}
    return shapes, masks, drop, grow, active, counts


@pytest.mark.parametrize("first_round", ["layer by layer"], indirect=True)  # a CPU
def test_a_layout_on_a_cpu_starts_no_selection_from_hints_or_estimates(monkeypatch):
    # Two RigL updates and a global selection on pieces: no estimates carried, no hints, the
    # thresholds found not handed back (on a CPU a hinted first round's search over the scores
    # costs more than the round it saves); the masks of the full tensors.
    from distsparse.sparsity import layout as layout_module

    seen = []

    def recording(*args, **kwargs):
        seen.append((kwargs.get("hints"), kwargs.get("carry"), kwargs.get("layers_at_once")))
        return sharded_topk(*args, **kwargs)

    monkeypatch.setattr(layout_module, "sharded_topk", recording)
    shapes, masks, drop, grow, active, counts = _rigl_case(seed=5)
    expected = FullLayout(shapes).drop_and_grow(masks, drop, grow, counts, active)
    layout = PieceLayout(shapes, 0, 1, lambda tensor: None, None)
    for _ in range(2):
        new = layout.drop_and_grow(masks, drop, grow, counts, active)
        assert all(torch.equal(new[name], expected[name]) for name in shapes)
    assert torch.equal(torch.cat(list(layout.global_topk(grow, 5_000).values())),
                       torch.cat(list(FullLayout(shapes).global_topk(grow, 5_000).values())))
    assert len(seen) == 5 and all(call == (None, None, False) for call in seen), seen


def _layout_updates(shapes, masks, drop, grow, counts, active, world, expected=None):
    """`PieceLayout.drop_and_grow` on every rank's pieces of the full tensors, in threads: per
    rank the new masks and the element counts of its all-reduce calls. `expected`: (drop
    scores, keep) the layout expects the drop from first (`expect_drop`, one call, not listed)."""

    def update(rank, all_reduce_sum):
        calls = []

        def counted(tensor):
            calls.append(tensor.numel())
            all_reduce_sum(tensor)

        layout = PieceLayout(shapes, rank, world, counted, None)
        pieces = [{name: layout.piece(name, value) for name, value in scores.items()}
                  for scores in (masks, drop, grow)]
        if expected is not None:
            scores, keep = expected
            layout.expect_drop({name: layout.piece(name, value) for name, value in scores.items()},
                               pieces[0], keep)
            if len(calls) != 1:
                raise AssertionError(f"expecting the drop took {len(calls)} calls, not 1")
            calls.clear()
        return layout.drop_and_grow(*pieces, counts, active), calls

    return _run_ranks(world, update)


@pytest.mark.parametrize("first_round", ["layers at once"], indirect=True)  # hints: launch-bound
@pytest.mark.parametrize("world", [4, 16])
def test_rigl_grow_starts_from_the_estimates_its_drop_carried(world):
    # RigL's update on pieces: 40 layers of 1,024-8,192 |N(0, 1)| scores at 10 % density, 30 %
    # swapped (8-bit digits for 40 groups; at 16 ranks a piece holds 64 to 512 scores). Cold, the
    # drop and the grow each take 3 rounds here (8 bits, 8, then wider digits for the groups
    # left). The grow starts from the ranks' estimates of its thresholds, which the drop's first
    # round carried (no call of its own): its window of 256 buckets of 2^16 keys holds each
    # threshold and fixes 16 bits, and it takes one round fewer. Its first round also carries
    # the drop's last (the 9 groups left spread their few candidates over 1,024 buckets): a call
    # fewer again. Masks: those of the full tensors, with every rank's calls the same.
    shapes, masks, drop, grow, active, counts = _rigl_case(seed=7)
    names = list(shapes)
    expected = FullLayout(shapes).drop_and_grow(masks, drop, grow, counts, active)
    kept = {name: topk_mask(drop[name], active[name] - counts[name], masks[name]) for name in names}

    def cold(scores, ks, eligible):
        full = [scores[name] for name in names]
        return _hinted(full, [ks[name] for name in names], list(range(len(names))), world, None,
                       [eligible[name] for name in names])[0].all_reduces

    drop_rounds = cold(drop, {name: active[name] - counts[name] for name in names}, masks)
    grow_rounds = cold(grow, counts, {name: ~kept[name] for name in names})

    results = _layout_updates(shapes, masks, drop, grow, counts, active, world)
    assert round_bits(len(names), 32, 8_192) == 8 and drop_rounds == grow_rounds == 3
    for new, calls in results:
        assert calls == results[0][1]
        assert len(calls) == drop_rounds + grow_rounds - 2, (drop_rounds, grow_rounds, calls)
    for name in names:
        assert torch.equal(torch.cat([new[name] for new, _ in results]), expected[name]), name


@pytest.mark.parametrize("first_round", ["layers at once"], indirect=True)  # hints: launch-bound
@pytest.mark.parametrize("world", [4, 16])
def test_a_first_drop_expected_at_setup_starts_from_the_ranks_estimates(world):
    # A run's first update, as above, and the same after the layout expected its drop at setup
    # from weights that moved since (every drop score 1.25 times what it is at the update): one
    # all-reduce of the ranks' estimates then, and the drop's first round counts a window
    # around each, which holds the threshold: a call fewer in the update, the same on every
    # rank, and the masks of the full tensors.
    shapes, masks, drop, grow, active, counts = _rigl_case(seed=7)
    expected = FullLayout(shapes).drop_and_grow(masks, drop, grow, counts, active)
    setup = {name: 1.25 * scores for name, scores in drop.items()}
    cold = _layout_updates(shapes, masks, drop, grow, counts, active, world)
    warm = _layout_updates(shapes, masks, drop, grow, counts, active, world, (setup, 0.7))
    for new, calls in warm:
        assert calls == warm[0][1]
        assert len(calls) == len(cold[0][1]) - 1, (calls, cold[0][1])
    for name in shapes:
        assert torch.equal(torch.cat([new[name] for new, _ in warm]), expected[name]), name


@pytest.mark.parametrize("first_round", ["layers at once"], indirect=True)  # hints: launch-bound
def test_the_next_grow_also_starts_from_the_thresholds_it_found():
    # Two RigL updates on one layout of 2 ranks, the grow scores of rank 0's half of every layer
    # scaled by 2^8 and rank 1's by 2^-8 (pieces unlike, as rows of a real layer): the mean of
    # the ranks' estimates lies binades below the threshold, outside every window. The next
    # update's grow also counts around the thresholds the first found, which hold its own: a
    # call fewer than the same update with those thresholds forgotten. The masks are those of
    # the full tensors both times.
    shapes, masks, drop, grow, active, counts = _rigl_case(seed=10)
    for name, scores in grow.items():
        half = scores.numel() // 2
        scores[:half] *= 2.0**8
        scores[half:] *= 2.0**-8

    def updates(forget: bool):
        def update(rank, all_reduce_sum):
            calls = []

            def counted(tensor):
                calls.append(tensor.numel())
                all_reduce_sum(tensor)

            layout = PieceLayout(shapes, rank, 2, counted, None)
            pieces = [{name: layout.piece(name, value) for name, value in scores.items()}
                      for scores in (masks, drop, grow)]
            updated = []
            for _ in range(2):
                calls.clear()
                updated.append(layout.drop_and_grow(*pieces, counts, active))
                pieces[0] = updated[-1]
                if forget:
                    layout._thresholds = {key: threshold for key, threshold
                                          in layout._thresholds.items() if key[0] != "grow"}
            return updated, len(calls)

        return _run_ranks(2, update)

    remembered, forgotten = updates(False), updates(True)
    expected, full = [], FullLayout(shapes)
    current = masks
    for _ in range(2):
        current = full.drop_and_grow(current, drop, grow, counts, active)
        expected.append(current)
    for results in (remembered, forgotten):
        assert not any(isinstance(result, BaseException) for result in results), results
        assert results[0][1] == results[1][1]
        for which in range(2):
            for name in shapes:
                assert torch.equal(torch.cat([r[0][which][name] for r in results]),
                                   expected[which][name])
    assert remembered[0][1] == forgotten[0][1] - 1, (remembered[0][1], forgotten[0][1])


# --- a tie round deferred to the next selection's first round -------------------------------------


def _drop_then_grow(drop, grow, masks, counts, world, bits_per_round=None, defer="ties",
                    taken=None):
    """The drop (keep the active - count highest `drop` among `masks`) and the grow (the count
    highest `grow` among the entries not kept) of every layer, on every rank's pieces, the grow
    carrying the drop's tie round (`defer` "ties"), also its last round ("last"), or neither
    (None); per rank (kept, grown, calls). `taken`, a list, gets what each deferred selection's
    `take` returned."""
    groups = list(range(len(drop)))
    keeps = [int(mask.sum()) - count for mask, count in zip(masks, counts)]

    def update(rank, all_reduce_sum):
        kept = sharded_topk(_pieces(drop, rank, world), keeps, groups, all_reduce_sum, rank=rank,
                            world_size=world, eligible=_local(masks, rank, world),
                            bits_per_round=bits_per_round, defer_ties=defer == "ties",
                            defer_last_round=defer == "last")
        deferred = kept.deferred
        if deferred is not None and taken is not None:
            def recorded(*args, take=deferred.take):
                taken.append(take(*args))
                return taken[-1]
            deferred = dataclasses.replace(deferred, take=recorded)
        grown = sharded_topk(_pieces(grow, rank, world), counts, groups, all_reduce_sum,
                             rank=rank, world_size=world, eligible=[~mask for mask in kept.masks],
                             bits_per_round=bits_per_round, settle=deferred)
        assert bool(grown.settled) == (kept.deferred is not None)
        return grown.settled or kept.masks, grown.masks, kept.all_reduces + grown.all_reduces

    return _run_ranks(world, update)


def _assert_drop_then_grow_exact(drop, grow, masks, counts, world, bits_per_round=None,
                                 defer="ties", taken=None):
    results = _drop_then_grow(drop, grow, masks, counts, world, bits_per_round, defer, taken)
    for result in results:
        if isinstance(result, BaseException):
            raise result
        assert result[2] == results[0][2]
    for layer, (mask, count) in enumerate(zip(masks, counts)):
        kept = topk_mask(drop[layer], int(mask.sum()) - count, mask)
        grown = topk_mask(grow[layer], count, ~kept)
        assert torch.equal(torch.cat([r[0][layer] for r in results]), kept), layer
        assert torch.equal(torch.cat([r[1][layer] for r in results]), grown), layer
    return results


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("bits_per_round", [1, 2, None])
@pytest.mark.parametrize("defer", ["ties", "last"])
def test_a_deferred_tie_round_or_last_round_gives_the_masks_of_the_full_tensors(
        world, bits_per_round, defer, monkeypatch):
    # Heavily tied drop and grow scores (3 and 2 levels, or a few more) on uneven pieces: the
    # drop's ties are taken in the grow's first round. The grow's k-th bucket is unaffected by
    # the tied entries, or left unsure by them (the next round carries how many of them it
    # selected), or, at the default width here, moved by them in some trials: it keeps the run
    # of buckets from the k-th under the fewest of them to the k-th under the most.
    # Deferring its last round too ("last"), the drop's candidates count apart in the grow's
    # first round, `take` finishes the drop (with rounds of its own where the deferred one was
    # not its last) and hands on its tie round, which the grow's next call carries; where a
    # tied entry mattered to the grow (some rank's first round kept or selected one), that
    # call's round goes again knowing them. No selection starts over (the module's own call
    # would count here); the masks are always exact.
    import distsparse.sparsity.sharded_select as module

    restarts = []
    select = module.sharded_topk
    monkeypatch.setattr(module, "sharded_topk",
                        lambda *args, **kwargs: restarts.append(1) or select(*args, **kwargs))
    taken = []
    for trial in range(12):
        gen = torch.Generator().manual_seed(100 * world + trial)
        more = 0 if defer == "ties" else trial
        masks = [torch.rand(n, generator=gen) < 0.6 for n in NUMELS]
        drop = [torch.randint(0, 3 + more, (n,), generator=gen).float() for n in NUMELS]
        grow = [torch.randint(0, 2 + more, (n,), generator=gen).float() / 2 for n in NUMELS]
        counts = [int(mask.sum()) // 2 for mask in masks]
        _assert_drop_then_grow_exact(drop, grow, masks, counts, world, bits_per_round, defer,
                                     taken)
    assert not restarts
    assert defer == "ties" or any(follow is not None for *_, follow in taken)


@pytest.mark.parametrize("first_round", ["layers at once"], indirect=True)  # hints: launch-bound
@pytest.mark.parametrize("world", [4, 16])
def test_rigl_update_carries_its_drops_tie_round_in_the_grows_first_round(world):
    # RigL on pieces as above, the drop's |N(0, 1)| scores rounded to multiples of 2^-8 so that
    # several layers tie at their drop threshold: a cold drop takes its rounds and a tie
    # round. In the update the drop's first round carries the grow's estimates, the grow's
    # first round the drop's last round (20 groups left, then a round of the drop's own) and
    # its second round the drop's tie round. Tied entries lie in the grow's first k-th
    # buckets here, so that round goes again knowing them: two calls fewer than the two cold
    # selections, as many as deferring the ties alone, the same on every rank, and the masks
    # of the full tensors.
    shapes, masks, drop, grow, active, counts = _rigl_case(seed=8, drop_step=2**-8)
    names = list(shapes)
    expected = FullLayout(shapes).drop_and_grow(masks, drop, grow, counts, active)
    keeps = [active[name] - counts[name] for name in names]
    kept = {name: topk_mask(drop[name], active[name] - counts[name], masks[name]) for name in names}
    groups = list(range(len(names)))

    def cold(scores, ks, eligible, defer=False):
        return _run_ranks(world, lambda rank, all_reduce_sum: sharded_topk(
            _pieces([scores[name] for name in names], rank, world), ks, groups, all_reduce_sum,
            rank=rank, world_size=world, eligible=_local([eligible[name] for name in names], rank,
                                                         world), defer_ties=defer))[0]

    drop_calls = cold(drop, keeps, masks).all_reduces
    deferred = cold(drop, keeps, masks, defer=True)
    grow_calls = cold(grow, [counts[name] for name in names],
                      {name: ~kept[name] for name in names}).all_reduces

    results = _layout_updates(shapes, masks, drop, grow, counts, active, world)
    assert deferred.deferred is not None and len(deferred.deferred.tied_layers) >= 5
    assert deferred.all_reduces == drop_calls - 1
    for new, calls in results:
        assert calls == results[0][1]
        assert len(calls) == drop_calls + grow_calls - 2, (drop_calls, grow_calls, calls)
    for name in names:
        assert torch.equal(torch.cat([new[name] for new, _ in results]), expected[name]), name


def test_a_deferred_drops_ties_go_with_the_grows_own_call_when_its_first_round_ends_it():
    # 2 ranks, one layer of 64: 48 active, the drop keeps 40 of them, 36 above 1.0 and 4 of the
    # 12 at 1.0 (ties). At 16-bit digits the drop's second round is likely its last (12
    # candidates, 2^16 buckets) and goes with the grow's first round; the grow's scores of
    # those 12 are the lowest, so its first round ends it (the 8 of 16 inactive entries with
    # the highest scores, each alone in its bucket). The drop's tie round then takes a call
    # of its own: 3 calls, the masks those of the full tensors.
    drop = torch.cat([2 + torch.arange(36) / 8, torch.ones(12), torch.zeros(16)])
    mask = torch.arange(64) < 48
    grow = torch.cat([torch.full((36,), 0.5), torch.arange(12) / 100, 10 + torch.arange(16.0)])
    taken = []
    results = _assert_drop_then_grow_exact([drop], [grow], [mask], [8], 2, 16, "last", taken)
    assert all(result[2] == 3 for result in results)
    assert len(taken) == 2 and all(follow is not None for *_, follow in taken)
    with pytest.raises(ValueError, match="one layer a group"):
        sharded_topk(_pieces([drop, grow], 0, 1), [3], [0, 0], lambda t: None, rank=0,
                     world_size=1, defer_last_round=True)


@pytest.mark.parametrize("world", [1, 3])
def test_an_update_of_equal_scores_corrects_the_grows_need_before_its_tie_round(world):
    # All drop and grow scores equal: the drop's deferred round and its own last round leave
    # every candidate tied; the grow's estimates pin its threshold to one key, so its first
    # round leaves no bits to resolve while the drop's tied entries are still pending in its
    # k-th bucket. The drop's tie round then goes first, and the grow's carries the count
    # of them that joined above: the masks of the full tensors.
    shapes = {"a": (300,), "b": (500,), "c": (1_200,)}
    gen = torch.Generator().manual_seed(0)
    masks = {name: torch.rand(shape, generator=gen) < 0.1 for name, shape in shapes.items()}
    active = {name: int(mask.sum()) for name, mask in masks.items()}
    counts = {name: int(0.3 * count) for name, count in active.items()}
    drop = {name: masks[name].float() for name in shapes}
    grow = {name: torch.ones(shape) for name, shape in shapes.items()}
    expected = FullLayout(shapes).drop_and_grow(masks, drop, grow, counts, active)
    results = _layout_updates(shapes, masks, drop, grow, counts, active, world)
    for new, calls in results:
        assert calls == results[0][1]
    for name in shapes:
        assert torch.equal(torch.cat([new[name] for new, _ in results]), expected[name]), name


@pytest.mark.parametrize("world", [2, 4, 8])
def test_a_deferred_tie_round_sends_what_one_rank_would(world):
    # One layer of 1,000: distinct scores above 0.5, then 250 of 0.5 (200 active) and 50
    # inactive entries. The drop keeps 800: 50 of the 200 tied, the lowest indices, which lie
    # on whichever ranks hold them. The tie round the drop leaves to the grow is a histogram of
    # index digits, the same size on any number of ranks; taken from the sum, every rank takes
    # exactly its tied entries among the 50 lowest, and the masks alone or carried by the
    # grow's first round are those of the full tensors.
    scores = torch.cat([1 + torch.arange(750) / 1000, torch.full((250,), 0.5)])
    mask = torch.ones(1000, dtype=torch.bool)
    mask[950:] = False
    grow = torch.randn(1000, generator=torch.Generator().manual_seed(3)).abs()
    _assert_drop_then_grow_exact([scores], [grow], [mask], [150], world)

    def drop(ranks):
        return _run_ranks(ranks, lambda rank, all_reduce_sum: sharded_topk(
            _pieces([scores], rank, ranks), [800], [0], all_reduce_sum, rank=rank,
            world_size=ranks, eligible=_local([mask], rank, ranks), defer_ties=True).deferred)

    deferred, alone = drop(world), drop(1)
    assert {ties.table.numel() for ties in deferred} == {alone[0].table.numel()}
    summed = sum(ties.table.to(torch.int64) for ties in deferred)
    assert torch.equal(summed, alone[0].table.to(torch.int64))
    taken = []
    for rank, ties in enumerate(deferred):
        took, tied, kept, follow = ties.take(summed, lambda tensor: None)
        assert follow is None and tied.tolist() == [200] and kept.tolist() == [50]
        taken.append(took)
    expected = torch.arange(1000) < 800
    assert torch.equal(torch.cat(taken) | torch.cat([torch.cat(ties.masks) for ties in deferred]),
                       expected)


def test_a_settled_selection_whose_tied_entries_are_not_all_eligible_is_refused():
    # The drop ties 4 entries of 0.5 and defers their round; a grow that may not take one of
    # them (its eligibility leaves out entry 9) cannot settle it: an error, before any call.
    scores = torch.cat([torch.arange(6) + 1.0, torch.full((4,), 0.5)])
    drop = sharded_topk(_pieces([scores], 0, 1), [8], [0], lambda tensor: None, rank=0,
                        world_size=1, defer_ties=True)
    assert drop.deferred is not None and drop.deferred.tied.tolist() == [False] * 6 + [True] * 4
    eligible = torch.ones(10, dtype=torch.bool)
    eligible[9] = False
    calls = []
    with pytest.raises(ValueError, match="every entry tied in the settled selection must be eligible"):
        sharded_topk(_pieces([torch.rand(10)], 0, 1), [2], [0], calls.append, rank=0,
                     world_size=1, eligible=[eligible], settle=drop.deferred)
    assert calls == []
