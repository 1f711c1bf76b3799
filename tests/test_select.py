"""Tests for distsparse.sparsity.select: exact top-k with ties to the lowest flat index.

Every expected mask is computed by a brute-force Python reference: sort the eligible flat indices
by the key (-score, index) and take the first k (DESIGN invariant 2: counts exact, ties broken
deterministically by global index). drop_and_grow is checked against google-research/rigl
`sparse_optimizers_base.py::_get_update_op`: keep the nnz - n highest drop scores among active
entries, grow n by grow score among every entry not kept.
"""
from __future__ import annotations

import pytest
import torch

from distsparse.sparsity.select import drop_and_grow, global_topk_masks, topk_mask


def _ref_topk(scores: list, k: int, eligible: list[bool] | None = None) -> set[int]:
    candidates = [i for i in range(len(scores)) if eligible is None or eligible[i]]
    return set(sorted(candidates, key=lambda i: (-scores[i], i))[:k])


def _indices(mask: torch.Tensor) -> set[int]:
    return set(mask.reshape(-1).nonzero().squeeze(1).tolist())


def test_exact_count_and_shape():
    scores = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(0))
    for k in (0, 1, 7, 59, 60):
        mask = topk_mask(scores, k)
        assert mask.dtype == torch.bool
        assert mask.shape == scores.shape
        assert int(mask.sum()) == k


def test_all_equal_scores_pick_the_first_k_indices():
    mask = topk_mask(torch.full((3, 4), 2.5), 5)
    assert mask.reshape(-1).tolist() == [True] * 5 + [False] * 7


def test_all_equal_scores_with_eligible_pick_the_first_k_eligible():
    eligible = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    mask = topk_mask(torch.zeros(10), 3, eligible=eligible)
    assert _indices(mask) == {1, 3, 4}
    assert not bool((mask & ~eligible).any())


def test_higher_scores_win_over_lower_indices():
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0, 0.5, 3.0])
    assert _indices(topk_mask(scores, 2)) == {1, 3}
    assert _indices(topk_mask(scores, 4)) == {1, 3, 5, 2}


@pytest.mark.parametrize("trial", range(20))
def test_agrees_with_sorted_reference_on_random_floats_with_ties(trial):
    g = torch.Generator().manual_seed(trial)
    numel = int(torch.randint(1, 400, (1,), generator=g))
    # Few distinct values: many ties, including negative ones and zeros.
    values = torch.tensor([-1.5, -0.0, 0.0, 0.25, 0.25 + 2**-20, 3.0])
    scores = values[torch.randint(0, len(values), (numel,), generator=g)]
    eligible = torch.rand(numel, generator=g) < 0.6
    n_eligible = int(eligible.sum())
    for k in sorted({0, n_eligible // 3, n_eligible // 2, n_eligible}):
        expected = _ref_topk(scores.tolist(), k, eligible.tolist())
        assert _indices(topk_mask(scores, k, eligible=eligible)) == expected
    k = numel // 2
    assert _indices(topk_mask(scores, k)) == _ref_topk(scores.tolist(), k)


@pytest.mark.parametrize("trial", range(10))
def test_agrees_with_sorted_reference_on_integer_scores(trial):
    g = torch.Generator().manual_seed(100 + trial)
    scores = torch.randint(-3, 4, (7, 11), generator=g)
    eligible = torch.rand(7, 11, generator=g) < 0.5
    flat = scores.reshape(-1).tolist()
    for k in (1, 10, 30):
        assert _indices(topk_mask(scores, k)) == _ref_topk(flat, k)
    k = int(eligible.sum()) // 2
    assert _indices(topk_mask(scores, k, eligible)) == _ref_topk(flat, k, eligible.reshape(-1).tolist())


def test_large_tensor_ties_go_to_lowest_indices():
    # Enough elements that an unstable sort would be free to reorder equal keys.
    scores = torch.zeros(100_000)
    scores[50_000:] = 1.0
    mask = topk_mask(scores, 50_010)
    assert _indices(mask) == set(range(50_000, 100_000)) | set(range(10))


def test_k_above_eligible_raises():
    with pytest.raises(ValueError):
        topk_mask(torch.randn(10), 11)
    with pytest.raises(ValueError):
        topk_mask(torch.randn(10), 5, eligible=torch.arange(10) % 3 == 0)  # 4 eligible
    with pytest.raises(ValueError):
        topk_mask(torch.randn(10), -1)


def test_global_topk_equals_topk_on_the_concatenation():
    g = torch.Generator().manual_seed(3)
    scores = {
        "a": torch.randint(0, 5, (4, 3), generator=g).float(),
        "b": torch.randint(0, 5, (2, 2, 2), generator=g).float(),
        "c": torch.randint(0, 5, (9,), generator=g).float(),
    }
    eligible = {name: torch.rand(s.shape, generator=g) < 0.7 for name, s in scores.items()}
    flat = torch.cat([s.reshape(-1) for s in scores.values()]).tolist()
    flat_eligible = torch.cat([e.reshape(-1) for e in eligible.values()]).tolist()
    offsets = {"a": 0, "b": 12, "c": 20}
    for k in (0, 5, 11, sum(flat_eligible)):
        masks = global_topk_masks(scores, k, eligible)
        assert list(masks) == ["a", "b", "c"]
        got = set()
        for name, mask in masks.items():
            assert mask.shape == scores[name].shape
            got |= {offsets[name] + i for i in _indices(mask)}
        assert got == _ref_topk(flat, k, flat_eligible)
    masks = global_topk_masks(scores, 15)
    got = set()
    for name, mask in masks.items():
        got |= {offsets[name] + i for i in _indices(mask)}
    assert got == _ref_topk(flat, 15)


def test_global_ties_across_layers_go_to_the_earlier_layer():
    scores = {"first": torch.ones(2, 2), "second": torch.ones(3), "third": torch.full((2,), 5.0)}
    masks = global_topk_masks(scores, 5)
    assert masks["third"].tolist() == [True, True]
    assert masks["first"].reshape(-1).tolist() == [True, True, True, False]
    assert masks["second"].tolist() == [False, False, False]
    # The mapping's order, not the names, defines the global index.
    reordered = global_topk_masks({"second": scores["second"], "first": scores["first"]}, 2)
    assert reordered["second"].tolist() == [True, True, False]
    assert not bool(reordered["first"].any())


def test_global_topk_k_above_eligible_raises():
    with pytest.raises(ValueError):
        global_topk_masks({"a": torch.ones(3), "b": torch.ones(2)}, 6)


def _ref_drop_and_grow(mask, drop, grow, n):
    flat_mask = mask.reshape(-1).tolist()
    nnz = sum(flat_mask)
    kept = _ref_topk(drop.reshape(-1).tolist(), nnz - n, flat_mask)
    not_kept = [i not in kept for i in range(len(flat_mask))]
    grown = _ref_topk(grow.reshape(-1).tolist(), n, not_kept)
    return kept | grown, {i for i in grown if not flat_mask[i]}


@pytest.mark.parametrize("trial", range(10))
def test_drop_and_grow_matches_reference_and_keeps_count(trial):
    g = torch.Generator().manual_seed(500 + trial)
    mask = torch.rand(6, 7, generator=g) < 0.4
    weights = torch.randn(6, 7, generator=g) * mask
    drop = weights.abs()
    # Integer-valued grow scores: many ties, which must go to the lowest index.
    grow = torch.randint(0, 4, (6, 7), generator=g).float()
    nnz = int(mask.sum())
    for n in (0, 1, nnz // 3, nnz):
        new, grown = drop_and_grow(mask, drop, grow, n)
        expected_new, expected_grown = _ref_drop_and_grow(mask, drop, grow, n)
        assert _indices(new) == expected_new
        assert _indices(grown) == expected_grown
        assert int(new.sum()) == nnz
        kept = _ref_topk(drop.reshape(-1).tolist(), nnz - n, mask.reshape(-1).tolist())
        assert kept <= _indices(mask)
        assert kept <= _indices(new)
        assert not (_indices(grown) & _indices(mask))
        assert _indices(grown) <= _indices(new)


def test_drop_and_grow_can_regrow_a_just_dropped_entry():
    mask = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    drop = torch.tensor([0.1, 0.9, 0.8, 0.0, 0.0, 0.0])  # entry 0 has the lowest |w|: dropped
    grow = torch.tensor([9.0, 1.0, 1.0, 2.0, 3.0, 0.5])  # ... and the highest grow score
    new, grown = drop_and_grow(mask, drop, grow, 2)
    # nnz 3, n 2: keep {1}; grow 2 among not kept {0, 2, 3, 4, 5} by grow score: {0, 4}.
    assert new.tolist() == [True, True, False, False, True, False]
    # Entry 0 was active before: it is not a new connection (rigl reinit_when_same=False).
    assert grown.tolist() == [False, False, False, False, True, False]


def test_drop_and_grow_never_grows_a_kept_entry():
    mask = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    drop = torch.tensor([0.5, 0.7, 0.0, 0.0])
    grow = torch.tensor([10.0, 10.0, 1.0, 2.0])  # kept entry 1 has the top grow score
    new, grown = drop_and_grow(mask, drop, grow, 1)
    assert new.tolist() == [True, True, False, False]  # entry 0 dropped then regrown
    assert grown.tolist() == [False, False, False, False]


def test_drop_and_grow_zero_swap_returns_the_same_mask():
    g = torch.Generator().manual_seed(9)
    mask = torch.rand(5, 5, generator=g) < 0.3
    new, grown = drop_and_grow(mask, torch.randn(5, 5, generator=g), torch.randn(5, 5, generator=g), 0)
    assert torch.equal(new, mask)
    assert not bool(grown.any())
