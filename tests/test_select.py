"""Tests for distsparse.sparsity.select: exact top-k with ties to the lowest flat index.

Every expected mask is computed by a brute-force Python reference: sort the eligible flat indices
by the key (-score, index) and take the first k (DESIGN invariant 2: counts exact, ties broken
deterministically by global index). drop_and_grow is checked against google-research/rigl
`sparse_optimizers_base.py::_get_update_op`: keep the nnz - n highest drop scores among active
entries, grow n by grow score among every entry not kept.
"""
from __future__ import annotations

import hashlib

import pytest
import torch

from distsparse.config import MethodConfig
from distsparse.methods import build_method, init_masks
from distsparse.sparsity import select
from distsparse.sparsity.layout import FullLayout, PieceLayout, pack_bits
from distsparse.sparsity.select import drop_and_grow, drop_and_grow_masks, global_topk_counted, \
    global_topk_masks, topk_mask, topk_masks
from tests.conftest import count_host_reads
from tests.test_methods import CONTEXT as METHOD_CONTEXT
from tests.test_methods import SCHEDULE as METHOD_SCHEDULE
from tests.test_methods import SETTINGS as METHOD_SETTINGS
from tests.test_methods import SHAPES as METHOD_SHAPES


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


# --- equality with the sort-based selection these functions replaced ------------------------------

def _stable_topk_mask(scores: torch.Tensor, k: int,
                      eligible: torch.Tensor | None = None) -> torch.Tensor:
    """The previous implementation: a stable descending argsort of the eligible scores."""
    flat = scores.reshape(-1)
    candidates = (torch.arange(flat.numel()) if eligible is None
                  else eligible.reshape(-1).nonzero().squeeze(1))
    order = torch.argsort(flat[candidates], descending=True, stable=True)
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[candidates[order[:k]]] = True
    return mask.view(scores.shape)


def _stable_topk_masks(scores, ks, eligible=None, n_eligible=None):
    return [_stable_topk_mask(s, k, None if eligible is None else e)
            for s, k, e in zip(scores, ks, eligible or [None] * len(scores))]


def _stable_global(scores, k, eligible=None):
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1).to(torch.float64) for n in names])
    flat_eligible = None if eligible is None else torch.cat([eligible[n].reshape(-1) for n in names])
    selected, masks, offset = _stable_topk_mask(flat, k, flat_eligible), {}, 0
    for name in names:
        masks[name] = selected[offset : offset + scores[name].numel()].view(scores[name].shape)
        offset += scores[name].numel()
    return masks


def _stable_drop_and_grow(mask, drop, grow, n_swap):
    kept = _stable_topk_mask(drop, int(mask.sum()) - n_swap, mask)
    return kept | _stable_topk_mask(grow, n_swap, ~kept)


SPECIAL = [float("nan"), float("-inf"), float("inf"), -0.0, 0.0, 1.0, -1.0, 2.0**-30]


def _random_scores(g: torch.Generator, numel: int, regime: str, dtype: torch.dtype) -> torch.Tensor:
    if regime == "equal":
        return torch.full((numel,), 0.5, dtype=dtype)
    if regime == "ties":
        return (torch.randint(-3, 4, (numel,), generator=g) / 4).to(dtype)
    if regime == "special":
        values = torch.tensor(SPECIAL, dtype=torch.float64)
        return values[torch.randint(0, len(SPECIAL), (numel,), generator=g)].to(dtype)
    if regime == "integers":
        return torch.randint(-5, 6, (numel,), generator=g, dtype=dtype)
    return torch.randn(numel, generator=g, dtype=torch.float64).to(dtype)


REGIMES = [("continuous", torch.float32), ("continuous", torch.float64), ("ties", torch.float32),
           ("ties", torch.float16), ("equal", torch.float32), ("special", torch.float32),
           ("special", torch.float64), ("integers", torch.int64)]


REGIME_IDS = [f"{r}-{d}".replace("torch.", "") for r, d in REGIMES]

# Every selection runs where its scores are: the CUDA runs must give the CPU reference's masks.
# "cpu-segmented" runs the CPU through the segmented select that launch-bound devices take.
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                     reason="needs a CUDA device"))
DEVICES = ["cpu", "cpu-segmented", CUDA]


def _select_on(device: str, monkeypatch) -> str:
    """The torch device of a DEVICES entry, with the segmented select on for "cpu-segmented"."""
    if device == "cpu-segmented":
        monkeypatch.setattr(select, "LAUNCH_BOUND_DEVICES", ("cpu",))
        return "cpu"
    return device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("regime,dtype", REGIMES, ids=REGIME_IDS)
def test_selections_equal_the_stable_argsort(regime, dtype, device, monkeypatch):
    _selections_agree_with_the_stable_argsort(regime, dtype, _select_on(device, monkeypatch))


def _sample_small_tensors(monkeypatch) -> None:
    """Bracket the k-th largest by a sample from 64 scores on, every 4th score sampled."""
    monkeypatch.setattr(select, "SAMPLED_FROM", 64)
    monkeypatch.setattr(select, "SAMPLE_STRIDE", 4)


@pytest.mark.parametrize("device", ["cpu", CUDA])  # the segmented select takes no sample
@pytest.mark.parametrize("regime,dtype", REGIMES, ids=REGIME_IDS)
def test_sampled_selections_equal_the_stable_argsort(regime, dtype, device, monkeypatch):
    """The same table with the sample bracket on every tensor of 64 scores or more."""
    _sample_small_tensors(monkeypatch)
    _selections_agree_with_the_stable_argsort(regime, dtype, device)


def _selections_agree_with_the_stable_argsort(regime, dtype, device):
    """The reference runs on the CPU; the selections on `device`."""
    g = torch.Generator().manual_seed(len(regime) * 7 + dtype.itemsize)
    for trial in range(12):
        numel = int(torch.randint(1, 3000, (1,), generator=g))
        scores = _random_scores(g, numel, regime, dtype).view(-1, 1) if trial % 2 else \
            _random_scores(g, numel, regime, dtype)
        # Densities on both sides of COMPACT_BELOW, and none.
        density = [None, 0.05, 0.3, 0.6, 0.97][trial % 5]
        eligible = None if density is None else (torch.rand(scores.shape, generator=g) < density)
        n = numel if eligible is None else int(eligible.sum())
        ks = sorted({0, 1, n // 3, n // 2, n - 1, n} & set(range(n + 1)))
        on_device, allowed = scores.to(device), None if eligible is None else eligible.to(device)
        batched = topk_masks([on_device] * len(ks), ks, None if eligible is None else [allowed] * len(ks),
                             None if eligible is None else [n] * len(ks))
        for k, mask in zip(ks, batched):
            expected = _stable_topk_mask(scores, k, eligible)
            assert torch.equal(topk_mask(on_device, k, allowed).cpu(), expected), (trial, k)
            assert torch.equal(mask.cpu(), expected), (trial, k)
        if eligible is not None:
            active = int(eligible.sum())
            for n_swap in sorted({0, 1, active // 3, active}):
                grow = _random_scores(g, numel, regime, dtype).view(scores.shape)
                new, _ = drop_and_grow(allowed, on_device, grow.to(device), n_swap)
                assert torch.equal(new.cpu(), _stable_drop_and_grow(eligible, scores, grow, n_swap))


@pytest.mark.parametrize("device", ["cpu", CUDA])  # one selection: never segmented
@pytest.mark.parametrize("regime,dtype", REGIMES[:6], ids=REGIME_IDS[:6])
def test_global_selection_equals_the_stable_argsort_of_the_float64_concatenation(regime, dtype,
                                                                                 device):
    _global_selections_agree_with_the_stable_argsort(regime, dtype, device)


@pytest.mark.parametrize("device", ["cpu", CUDA])  # one selection: never segmented
@pytest.mark.parametrize("regime,dtype", REGIMES[:6], ids=REGIME_IDS[:6])
def test_sampled_global_selection_equals_the_stable_argsort(regime, dtype, device, monkeypatch):
    _sample_small_tensors(monkeypatch)
    _global_selections_agree_with_the_stable_argsort(regime, dtype, device)


def _global_selections_agree_with_the_stable_argsort(regime, dtype, device):
    g = torch.Generator().manual_seed(11 + dtype.itemsize)
    for trial in range(6):
        scores = {f"l{i}": _random_scores(g, int(torch.randint(1, 700, (1,), generator=g)), regime,
                                          dtype) for i in range(4)}
        eligible = None if trial % 2 else {n: torch.rand(s.shape, generator=g) < 0.5
                                            for n, s in scores.items()}
        n = sum(s.numel() for s in scores.values()) if eligible is None else \
            sum(int(e.sum()) for e in eligible.values())
        on_device = {name: s.to(device) for name, s in scores.items()}
        allowed = None if eligible is None else {name: e.to(device) for name, e in eligible.items()}
        for k in sorted({0, 1, n // 4, n // 2, n}):
            got, expected = global_topk_masks(on_device, k, allowed), _stable_global(scores, k, eligible)
            assert all(torch.equal(got[name].cpu(), expected[name]) for name in scores), (trial, k)


def test_global_selection_of_mixed_dtypes_compares_in_float64():
    scores = {"a": torch.tensor([2**53 + 1, 3], dtype=torch.int64),
              "b": torch.tensor([float(2**53), 1.0], dtype=torch.float32)}
    # In float64, 2**53 + 1 rounds to 2**53: it ties with b[0], and the lower index wins.
    masks = global_topk_masks(scores, 1)
    assert masks["a"].tolist() == [True, False] and masks["b"].tolist() == [False, False]
    half = {"h": torch.tensor([1.0, 0.5], dtype=torch.float16),
            "f": torch.tensor([1.0, 0.75], dtype=torch.bfloat16)}
    assert [m.tolist() for m in global_topk_masks(half, 3).values()] == [[True, False], [True, True]]


def test_nan_ranks_above_every_number_as_in_the_stable_sort():
    scores = torch.tensor([1.0, float("nan"), 3.0, float("nan"), float("inf")])
    assert _indices(topk_mask(scores, 1)) == {1}
    assert _indices(topk_mask(scores, 3)) == {1, 3, 4}
    eligible = torch.tensor([True, False, True, True, True])
    assert _indices(topk_mask(scores, 2, eligible)) == {3, 4}


def test_negative_zero_ties_with_zero_by_index():
    scores = torch.tensor([0.0, -0.0, 0.0, -0.0, -1.0])
    assert _indices(topk_mask(scores, 3)) == {0, 1, 2}
    assert _indices(topk_mask(scores, 2, scores.signbit())) == {1, 3}


# --- every method's masks: the same fingerprint as with the sort-based selection ------------------

class _StableLayout(FullLayout):
    """Full tensors, every selection by the stable argsort reference."""

    def topk_per_layer(self, scores, ks, eligible=None):
        return {n: _stable_topk_mask(scores[n], k, None if eligible is None else eligible[n])
                for n, k in ks.items()}

    def global_topk(self, scores, k, eligible=None):
        names = [n for n in self.names if n in scores]
        return _stable_global({n: scores[n] for n in names}, k,
                              None if eligible is None else {n: eligible[n] for n in names})

    def drop_and_grow(self, masks, drop_scores, grow_scores, counts, active=None):
        assert active is None or active == {n: int(m.sum()) for n, m in masks.items()}
        return {n: _stable_drop_and_grow(masks[n], drop_scores[n], grow_scores[n], c)
                for n, c in counts.items() if c > 0}


def _layouts():
    def identity(tensor):
        return tensor

    return {"stable": _StableLayout(METHOD_SHAPES), "full": FullLayout(METHOD_SHAPES),
            "pieces": PieceLayout(METHOD_SHAPES, 0, 1, identity, lambda tensor: [tensor])}


def _fingerprint(masks: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(masks):
        bits = masks[name].reshape(-1).cpu()
        padded = torch.cat([bits, torch.zeros(-bits.numel() % 8, dtype=torch.bool)])
        digest.update(name.encode() + pack_bits(padded).numpy().tobytes())
    return digest.hexdigest()


def _regime_tensor(g: torch.Generator, shape, regime: str) -> torch.Tensor:
    if regime == "equal":
        return torch.ones(shape)
    if regime == "ties":
        return torch.randint(-2, 3, shape, generator=g) / 2
    return torch.randn(shape, generator=g)


def _trajectory(name: str, layout_name: str, regime: str, device: str = "cpu") -> list[str]:
    """Mask fingerprints at every update; weights and gradients drawn on the CPU, used on `device`."""
    method = build_method(MethodConfig(name=name, sparsity=0.9, update_interval=100),
                          METHOD_SCHEDULE, 17)
    layout = _layouts()[layout_name]
    method.layout = layout
    masks = method.initial_masks(METHOD_SHAPES, METHOD_CONTEXT)
    masks = {n: layout.piece(n, m).to(device) for n, m in masks.items()}
    g = torch.Generator().manual_seed(5)
    prints = [_fingerprint(layout.full_masks(masks))]
    for step in range(METHOD_SCHEDULE.total_steps):
        if not method.is_update_step(step):
            continue
        weights = {n: layout.piece(n, _regime_tensor(g, s, regime)).to(device) * masks[n]
                   for n, s in METHOD_SHAPES.items()}
        grads = {n: layout.piece(n, _regime_tensor(g, s, regime)).to(device)
                 for n, s in METHOD_SHAPES.items()}
        masks = {**masks, **method.update(step, masks, weights, grads)}
        prints.append(_fingerprint(layout.full_masks(masks)))
    return prints


UPDATING = ("swap", "prune")
METHOD_REGIMES = [(name, regime) for name in sorted(METHOD_SETTINGS)
                  for regime in ("continuous", "ties", "equal")
                  if regime == "continuous" or METHOD_SETTINGS[name]["family"] in UPDATING]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,regime", METHOD_REGIMES)
def test_every_method_selects_the_masks_of_the_stable_argsort(name, regime, device, monkeypatch):
    """Weights and gradients continuous, in five levels, or all equal, at every update step."""
    device = _select_on(device, monkeypatch)
    expected = _trajectory(name, "stable", regime)
    assert _trajectory(name, "full", regime, device) == expected
    assert _trajectory(name, "pieces", regime, device) == expected


@pytest.mark.parametrize("name,regime", METHOD_REGIMES)
def test_every_method_with_sampled_selections_selects_the_masks_of_the_stable_argsort(
        name, regime, monkeypatch):
    """The same trajectories with the sample bracket on every layer and the global selection."""
    expected = _trajectory(name, "stable", regime)
    _sample_small_tensors(monkeypatch)
    assert _trajectory(name, "full", regime) == expected


def test_the_sample_bracket_is_exact_or_says_it_is_not():
    """Continuous scores: exact from the bracket (no topk); all equal or five levels: flagged."""
    g = torch.Generator().manual_seed(8)
    values = torch.randn(1 << 19, generator=g)
    ordered = torch.sort(values, descending=True).values
    for k in (1, 2, 1000, 1 << 16, 1 << 18, (1 << 19) - 1):
        kth, exact = select._bracketed_kth(values, k)
        assert bool(exact) and kth.item() == ordered[k - 1].item(), k
    for tied in (torch.ones(1 << 19), torch.randint(0, 5, (1 << 19,), generator=g).float()):
        assert not bool(select._bracketed_kth(tied, 1 << 17)[1])
        assert torch.equal(topk_mask(tied, 1 << 17), _stable_topk_mask(tied, 1 << 17))


@pytest.mark.parametrize("device", DEVICES)
def test_large_selections_at_the_default_sample_equal_the_stable_argsort(device, monkeypatch):
    device = _select_on(device, monkeypatch)
    g = torch.Generator().manual_seed(9)
    scores = torch.randn(600, 1000, generator=g).abs()
    eligible = torch.rand(scores.shape, generator=g) < 0.7
    on_device = scores.to(device)
    for k, allowed in [(60_000, None), (7, None), (1000, eligible), (400_000, eligible)]:
        got = topk_mask(on_device, k, None if allowed is None else allowed.to(device))
        assert torch.equal(got.cpu(), _stable_topk_mask(scores, k, allowed)), k
    masks = {"a": scores[:200], "b": scores[200:]}
    assert all(torch.equal(got.cpu(), expected) for got, expected in zip(
        global_topk_masks({n: m.to(device) for n, m in masks.items()}, 123_457).values(),
        _stable_global(masks, 123_457).values()))


def _initial_prints(scope: str, iterations: int | None) -> dict[str, str]:
    """Fingerprints of the initial masks of the static (random ERK) and pruning-at-init methods."""
    names = [n for n, row in METHOD_SETTINGS.items() if row["family"] in ("static", "pai")]
    return {name: _fingerprint(build_method(
        MethodConfig(name=name, sparsity=0.9, prune_scope=scope, pai_iterations=iterations),
        METHOD_SCHEDULE, 17,
    ).initial_masks(METHOD_SHAPES, METHOD_CONTEXT)) for name in names}


@pytest.mark.parametrize("scope,iterations", [("global", None), ("layer", 6)])
def test_pruning_at_init_selects_the_masks_of_the_stable_argsort(monkeypatch, scope, iterations):
    """Every iteration of FORCE, Iter-SNIP and SynFlow (their default counts on the global scope)."""
    new = _initial_prints(scope, iterations)
    monkeypatch.setattr(init_masks, "topk_masks", _stable_topk_masks)
    monkeypatch.setattr(init_masks, "global_topk_masks", _stable_global)
    assert new == _initial_prints(scope, iterations)


# --- host reads: one per batch of selections, whatever the number of layers ----------------------

def test_layer_selections_read_the_device_once_per_batch(monkeypatch):
    g = torch.Generator().manual_seed(2)
    shapes = {f"l{i}": (5 + i, 7) for i in range(12)}
    layout = FullLayout(shapes)
    masks = {n: torch.rand(s, generator=g) < 0.4 for n, s in shapes.items()}
    drop = {n: torch.randint(0, 3, s, generator=g).float() for n, s in shapes.items()}
    grow = {n: torch.randint(0, 3, s, generator=g).float() for n, s in shapes.items()}
    counts = {n: int(m.sum()) // 3 for n, m in masks.items()}
    expected = {n: _stable_drop_and_grow(masks[n], drop[n], grow[n], c) for n, c in counts.items()}
    active = {n: int(m.sum()) for n, m in masks.items()}
    reads = count_host_reads(monkeypatch)
    new = layout.drop_and_grow(masks, drop, grow, counts)
    assert len(reads) == 3 and reads[0] == len(shapes)  # all counts, the drop, the grow selection
    assert layout.active_counts(new) == active  # made by drop-and-grow: known without a read
    assert len(reads) == 3
    layout.topk_per_layer(drop, counts, masks)
    assert len(reads) == 4
    layout.global_topk(drop, 40, masks)
    assert len(reads) == 6  # the eligible count, the selection
    known = layout.drop_and_grow(masks, drop, grow, counts, active)
    assert len(reads) == 8  # active counts given: the two selections
    layout.active_counts(masks)
    layout.active_counts(masks)
    assert len(reads) == 9  # one layer's mask at a time is remembered: the latest made or counted
    monkeypatch.undo()
    assert all(torch.equal(new[n], expected[n]) and torch.equal(known[n], expected[n]) for n in shapes)


@pytest.mark.parametrize("numel", [600, 300_000])  # under and over SAMPLED_FROM (a bracket)
def test_drop_and_grow_reads_once_unless_a_drop_threshold_is_tied(numel, monkeypatch):
    """The grow selections start on the drop selections' candidates; one read confirms them. A
    layer whose k-th largest drop score is tied selects its growth again, after a second read."""
    g = torch.Generator().manual_seed(5)
    masks = [torch.rand(numel, generator=g) < 0.3 for _ in range(3)]
    drop = [torch.rand(numel, generator=g) for _ in range(3)]
    grow = [torch.rand(numel, generator=g) for _ in range(3)]
    actives = [int(m.sum()) for m in masks]
    swaps = [a // 4 for a in actives]
    tied = [d.clone() for d in drop]
    kth = torch.topk(tied[1][masks[1]], actives[1] - swaps[1]).values[-1]
    tied[1][masks[1] & (tied[1] < kth)] = kth  # layer 1: every dropped entry ties with the k-th
    for scores, expected_reads in ((drop, 1), (tied, 2)):
        expected = [_stable_drop_and_grow(m, d, gr, n)
                    for m, d, gr, n in zip(masks, scores, grow, swaps)]
        reads = count_host_reads(monkeypatch)
        got = drop_and_grow_masks(masks, scores, grow, swaps, actives)
        assert len(reads) == expected_reads
        monkeypatch.undo()
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
        assert [int(m.sum()) for m in got] == actives


@pytest.mark.parametrize("device", ["cpu", "cpu-segmented"])  # layer counts: one sum for all
@pytest.mark.parametrize("regime,dtype", REGIMES)
@pytest.mark.parametrize("numel", [50, 300_000])  # under and over SAMPLED_FROM (a bracket)
def test_global_selection_reads_each_layers_count_with_its_own(regime, dtype, numel, device,
                                                               monkeypatch):
    """One read gives the selection and every layer's selected count, ties at the threshold
    included (surplus ties leave from the last layer back); None only where NaN or the fill
    value is the k-th largest."""
    g = torch.Generator().manual_seed(numel)
    sizes = {"a": numel // 5, "b": numel // 2, "c": numel - numel // 5 - numel // 2}
    for trial in range(4):
        scores = {n: _random_scores(g, size, regime, dtype) for n, size in sizes.items()}
        eligible = None if trial % 2 else {n: torch.rand(size, generator=g) < 0.3 + 0.4 * (trial > 1)
                                           for n, size in sizes.items()}
        n_eligible = numel if eligible is None else sum(int(e.sum()) for e in eligible.values())
        for k in (0, 1, n_eligible // 3, n_eligible):
            _select_on(device, monkeypatch)
            reads = count_host_reads(monkeypatch)
            masks, counts = global_topk_counted(scores, k, eligible, n_eligible)
            monkeypatch.undo()
            actual = {n: int(m.sum()) for n, m in masks.items()}
            assert sum(actual.values()) == k
            if len(reads) == 2:  # the sample missed the k-th largest: a topk, then counts unknown
                assert counts is None
                continue
            assert len(reads) == 1
            assert counts == actual or (counts is None and regime == "special")  # NaN or -inf


def test_remembered_counts_follow_edits_and_new_tensors():
    layout = FullLayout({"a": (4, 5), "b": (6,)})
    masks = {"a": torch.ones(4, 5, dtype=torch.bool), "b": torch.zeros(6, dtype=torch.bool)}
    assert layout.active_counts(masks) == {"a": 20, "b": 0}
    masks["a"][0] = False  # an in-place edit is seen (the tensor's version moved)
    assert layout.active_counts(masks) == {"a": 15, "b": 0}
    masks["b"] = torch.ones(6, dtype=torch.bool)  # another tensor under the same name
    assert layout.active_counts(masks) == {"a": 15, "b": 6}
    kept = layout.topk_per_layer({"a": torch.arange(20.0).view(4, 5)}, {"a": 7})
    assert layout.active_counts(kept) == {"a": 7} and int(kept["a"].sum()) == 7
