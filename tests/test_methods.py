"""The DESIGN invariants at method level, for every registered sparsity method.

No engine: a fake training loop keeps a dict of (masked) weights, draws fake dense gradients from
a seeded generator, calls `is_update_step` / `update` for steps 0..999 and multiplies the weights
by the returned masks. Expected values are computed here, by hand or by brute-force Python
references (sorted() with the key (-score, flat index)), never by the code under test.

Like composer's `algorithm_settings.py`, every name in `METHODS` must have a row in `SETTINGS`:
a new method without one fails these tests.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import pytest
import torch

from distsparse.config import MethodConfig
from distsparse.errors import ConfigError
from distsparse.methods import METHODS, TrainingSchedule, build_method, resolve_method_config
from distsparse.methods.init_masks import InitContext
from distsparse.sparsity.allocation import active_count, erdos_renyi_densities
from distsparse.sparsity.counter_rng import random_bits

SHAPES = {"conv1.weight": (8, 3, 3, 3), "conv2.weight": (16, 8, 3, 3), "fc.weight": (10, 64)}
NUMEL = {name: math.prod(shape) for name, shape in SHAPES.items()}
TOTAL = sum(NUMEL.values())  # 216 + 1152 + 640 = 2008
SCHEDULE = TrainingSchedule(total_steps=1000, steps_per_epoch=100)
SEED = 17
OFFSETS = {"conv1.weight": 0, "conv2.weight": 216, "fc.weight": 216 + 1152}
# Target active count at sparsity 0.9, in integers: total - floor(0.9 * total).
TARGET_ACTIVE = TOTAL - (9 * TOTAL) // 10  # 2008 - 1807 = 201

DST_UPDATES = [100, 200, 300, 400, 500, 600, 700]  # every 100 steps up to 0.75 * 1000
PRUNE_UPDATES = [100, 200, 300, 400, 500, 600, 700, 800, 900]  # every 100 steps to the end

# family: dense (never masks), static (fixed mask), swap (constant count drop/grow),
# prune (gradual magnitude pruning to the target, optionally with regrowth), pai (a static mask
# chosen at step 0 by a pruning-at-init criterion: global top-k, so only the total count is fixed,
# and a function of the weights and data rather than of the seed, except random which is ERK and
# GraSP, which scores Linear weights redrawn from the seed as its reference's reinit=True).
PAI_ROW = dict(family="pai", init_density=0.1, updates=[], dense_grad=False, scope="global",
               seeded=False)
SETTINGS: dict[str, dict] = {
    "dense": dict(family="dense", init_density=1.0, updates=[], dense_grad=False),
    "static": dict(family="static", init_density=0.1, updates=[], dense_grad=False),
    "set": dict(family="swap", init_density=0.1, updates=DST_UPDATES, dense_grad=False),
    "rigl": dict(family="swap", init_density=0.1, updates=DST_UPDATES, dense_grad=True),
    "gmp": dict(family="prune", init_density=1.0, updates=PRUNE_UPDATES, dense_grad=False,
                regrow=False),
    "granet": dict(family="prune", init_density=1.0, updates=PRUNE_UPDATES, dense_grad=True,
                   regrow=True),
    "granet_st": dict(family="prune", init_density=0.5, updates=PRUNE_UPDATES, dense_grad=True,
                      regrow=True),
    "random": dict(PAI_ROW, scope="layer", seeded=True),
    "grasp": dict(PAI_ROW, seeded=True),
    **{name: PAI_ROW for name in ("magnitude", "snip", "synflow", "iter_snip", "force")},
}


class _TinyNet(torch.nn.Module):
    """The layers of SHAPES (conv1, conv2, fc) as a network, for the data-dependent criteria."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.fc = torch.nn.Linear(64, 10, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


def _init_context() -> InitContext:
    g = torch.Generator().manual_seed(4321)
    model = _TinyNet()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    batches = [(torch.randn(8, 3, 6, 6, generator=g), torch.randint(0, 10, (8,), generator=g))
               for _ in range(2)]
    return InitContext(model, lambda: iter(batches), 8, (3, 6, 6), lambda t: t)


CONTEXT = _init_context()

ALL = sorted(METHODS)


def _settings(name: str) -> dict:
    assert name in SETTINGS, f"method {name!r} is registered but has no row in SETTINGS"
    return SETTINGS[name]


def _names(family: str | tuple[str, ...]) -> list[str]:
    # Collection must not fail on an unlisted method: the tests over ALL fail for it instead.
    families = (family,) if isinstance(family, str) else family
    return [n for n in ALL if SETTINGS.get(n, {}).get("family") in families]


def _config(name: str, **overrides) -> MethodConfig:
    return MethodConfig(name=name, sparsity=0.9, update_interval=100, **overrides)


def _method(name: str, seed: int = SEED, **overrides):
    return build_method(_config(name, **overrides), SCHEDULE, seed)


# --- brute-force references ---------------------------------------------------------------------

def _ref_topk(scores: list[float], k: int, eligible: list[bool]) -> set[int]:
    candidates = [i for i in range(len(scores)) if eligible[i]]
    return set(sorted(candidates, key=lambda i: (-scores[i], i))[:k])


def _flat(t: torch.Tensor) -> list:
    return t.reshape(-1).tolist()


def _index_set(mask: torch.Tensor) -> set[int]:
    return set(mask.reshape(-1).nonzero().squeeze(1).tolist())


def _ref_swap(mask, drop_scores, grow_scores, n) -> set[int]:
    """rigl `_get_update_op`: keep nnz - n by drop score among active, grow n among not kept."""
    active = _flat(mask)
    kept = _ref_topk(_flat(drop_scores), sum(active) - n, active)
    not_kept = [i not in kept for i in range(len(active))]
    return kept | _ref_topk(_flat(grow_scores), n, not_kept)


def _floor_guarded(x: float, numel: int) -> int:
    """floor with allocation.active_count's guard against float error (1e-9 + 1e-12 * numel)."""
    return math.floor(x + 1e-9 + 1e-12 * numel)


def _rigl_drop_fraction(step: int) -> float:
    # rigl cosine_decay(0.3, step, decay_steps=end_step - begin_step = 750 - 0), alpha 0
    return 0.3 * 0.5 * (1 + math.cos(math.pi * min(step, 750) / 750))


def _granet_rate(step: int) -> float:
    # GraNet CosineDecay(0.5, T_max = total steps, eta_min = 0.005)
    return 0.005 + (0.5 - 0.005) * 0.5 * (1 + math.cos(math.pi * step / 1000))


def _cubic_target_active(step: int, initial_sparsity: float) -> int:
    """Global active count of the cubic schedule from step 0 to prune_end (0.3 -> step 300)."""
    t = min(step / 300, 1.0)
    sparsity = 0.9 + (initial_sparsity - 0.9) * (1 - t) ** 3
    return TOTAL - _floor_guarded(sparsity * TOTAL, TOTAL)


def _initial_counts(name: str) -> dict[str, int]:
    """Per-layer counts of the initial masks (a global top-k fixes only their sum: see below)."""
    density = _settings(name)["init_density"]
    if density >= 1.0:
        return dict(NUMEL)
    erk = erdos_renyi_densities(SHAPES, density)
    return {n: active_count(NUMEL[n], erk[n]) for n in SHAPES}


def _initial_masks(method):
    return method.initial_masks(SHAPES, CONTEXT)


# --- the fake training loop ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Update:
    step: int
    before: dict  # masks passed in
    after: dict  # masks after applying the returned ones
    weights: dict  # weights passed in
    grads: dict | None
    returned: frozenset


def _clone(d):
    return None if d is None else {k: v.clone() for k, v in d.items()}


def _simulate(name: str, seed: int = SEED, global_seed: int = 0, **overrides):
    torch.manual_seed(global_seed)
    method = _method(name, seed, **overrides)
    masks = _initial_masks(method)
    initial = _clone(masks)
    g = torch.Generator().manual_seed(1234)
    weights = {n: torch.randn(s, generator=g) * masks[n] for n, s in SHAPES.items()}
    updates, dense_grad_steps = [], []
    for step in range(SCHEDULE.total_steps):
        if method.needs_dense_grad(step):
            dense_grad_steps.append(step)
        if method.is_update_step(step):
            grads = (
                {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
                if method.needs_dense_grad(step) else None
            )
            before_masks, before_weights, before_grads = _clone(masks), _clone(weights), _clone(grads)
            new = method.update(step, masks, weights, grads)
            # update is a pure function of its inputs: it changes none of them.
            for n in SHAPES:
                assert torch.equal(masks[n], before_masks[n]), (name, step, n)
                assert torch.equal(weights[n], before_weights[n]), (name, step, n)
            for n, m in new.items():
                assert m.dtype == torch.bool and m.shape == SHAPES[n], (name, step, n)
            masks = {**masks, **{n: m.clone() for n, m in new.items()}}
            updates.append(Update(step, before_masks, _clone(masks), before_weights, before_grads,
                                  frozenset(new)))
            for n in SHAPES:
                weights[n] *= masks[n]
        # An optimizer step: active weights move, masked-off ones stay 0.
        for n, s in SHAPES.items():
            weights[n] += 0.05 * torch.randn(s, generator=g) * masks[n]
    return initial, updates, masks, dense_grad_steps


@functools.lru_cache(maxsize=None)
def _run(name: str):
    return _simulate(name)


def _counts(masks) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in masks.items()}


# --- registry and configuration ------------------------------------------------------------------

def test_settings_table_lists_every_registered_method():
    assert sorted(SETTINGS) == ALL


@pytest.mark.parametrize("name", ALL)
def test_build_method_uses_the_resolved_config(name):
    _settings(name)
    resolved = resolve_method_config(_config(name))
    assert resolved.name == name
    method = _method(name)
    assert method.config == resolved


def test_resolve_fills_rigl_and_set_defaults():
    for name in ("rigl", "set"):
        resolved = resolve_method_config(_config(name))
        assert resolved.drop_fraction == 0.3
        assert resolved.update_end == 0.75


def test_resolve_fills_granet_defaults():
    granet = resolve_method_config(_config("granet"))
    assert (granet.init_density, granet.drop_fraction, granet.update_end) == (1.0, 0.5, 1.0)
    granet_st = resolve_method_config(_config("granet_st"))
    assert granet_st.init_density == 0.5
    gmp = resolve_method_config(_config("gmp"))
    assert gmp.init_density == 1.0


def test_resolve_keeps_explicit_values():
    resolved = resolve_method_config(_config("rigl", drop_fraction=0.5, update_end=0.5))
    assert (resolved.drop_fraction, resolved.update_end) == (0.5, 0.5)
    original = _config("rigl")
    resolve_method_config(original)
    assert original.drop_fraction is None  # a copy, not changed in place


def test_unknown_method_name_raises_config_error_naming_the_key():
    with pytest.raises(ConfigError, match=re.escape("method.name")):
        resolve_method_config(_config("not_a_method"))
    with pytest.raises(ConfigError, match=re.escape("method.name")):
        build_method(_config("not_a_method"), SCHEDULE, 0)


@pytest.mark.parametrize("name", _names("prune"))
def test_prune_end_with_no_update_before_the_end_raises(name):
    # prune_end 0.95 -> step 950; the next update step would be 1000 = the end of training.
    with pytest.raises(ConfigError, match=re.escape("method.prune_end")):
        _method(name, prune_end=0.95)
    with pytest.raises(ConfigError, match=re.escape("method.prune_end")):
        _method(name, prune_end=0.91)
    _method(name, prune_end=0.9)  # the update at step 900 reaches the target


def test_gmp_with_prune_end_at_the_last_update_reaches_the_target_there():
    _, updates, final, _ = _simulate("gmp", prune_end=0.9)
    assert [u.step for u in updates] == PRUNE_UPDATES
    assert sum(_counts(updates[-1].after).values()) == TARGET_ACTIVE
    assert sum(_counts(updates[-2].after).values()) > TARGET_ACTIVE
    assert sum(_counts(final).values()) == TARGET_ACTIVE


@pytest.mark.parametrize("name", _names("prune"))
def test_pruning_that_starts_and_ends_on_the_same_step_reaches_the_target(name):
    # A short run: prune_start 0 and prune_end 0.04 both round to step 0 of 10.
    schedule = TrainingSchedule(total_steps=10, steps_per_epoch=5)
    config = MethodConfig(name=name, sparsity=0.9, update_interval=1, prune_end=0.04)
    method = build_method(config, schedule, 0)
    shapes = {"w": (10, 10)}
    masks = method.initial_masks(shapes)
    weights = {"w": torch.arange(100, dtype=torch.float32).reshape(10, 10) * masks["w"]}
    grads = {"w": torch.ones(10, 10)}
    assert method.is_update_step(1)
    masks = {**masks, **method.update(1, masks, weights, grads)}
    assert int(masks["w"].sum()) == 10


# --- initial masks ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_initial_masks_have_exact_per_layer_counts(name):
    expected = _initial_counts(name)
    masks = _initial_masks(_method(name))
    assert list(masks) == list(SHAPES)
    for n, m in masks.items():
        assert m.dtype == torch.bool
        assert tuple(m.shape) == SHAPES[n]
    if _settings(name).get("scope") == "global":
        assert sum(_counts(masks).values()) == TOTAL - (9 * TOTAL) // 10
    else:
        assert _counts(masks) == expected
    if _settings(name)["init_density"] >= 1.0:
        assert all(bool(m.all()) for m in masks.values())


def test_initial_erk_counts_by_hand():
    # ERK at density 0.1 for these shapes, from rigl's formula by hand:
    # raw = (sum shape / prod shape): 17/216, 30/1152, 74/640; rhs = 22 + 116 + 64 = 202;
    # divisor = 17 + 30 + 74 = 121; eps = 202/121; density_i = eps * raw_i.
    eps = 202 / 121
    by_hand = {
        "conv1.weight": 216 - math.floor((1 - eps * 17 / 216) * 216 + 1e-9),
        "conv2.weight": 1152 - math.floor((1 - eps * 30 / 1152) * 1152 + 1e-9),
        "fc.weight": 640 - math.floor((1 - eps * 74 / 640) * 640 + 1e-9),
    }
    # zeros: floor(187.62) = 187, floor(1101.92) = 1101, floor(516.46) = 516
    assert by_hand == {"conv1.weight": 29, "conv2.weight": 51, "fc.weight": 124}
    assert _initial_counts("rigl") == by_hand


@pytest.mark.parametrize("name", ALL)
def test_initial_masks_depend_only_on_the_seed(name):
    torch.manual_seed(1)
    a = _initial_masks(_method(name, seed=5))
    torch.manual_seed(2)
    torch.rand(1000)
    b = _initial_masks(_method(name, seed=5))
    state = torch.get_rng_state()
    c = _initial_masks(_method(name, seed=6))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not used
    for n in SHAPES:
        assert torch.equal(a[n], b[n])
    if _settings(name)["init_density"] < 1.0 and _settings(name).get("seeded", True):
        for n in SHAPES:
            assert not torch.equal(a[n], c[n]), n
            if _settings(name).get("scope") != "global":
                assert int(a[n].sum()) == int(c[n].sum())
        assert sum(_counts(a).values()) == sum(_counts(c).values())
    else:
        assert all(torch.equal(a[n], c[n]) for n in SHAPES)


@pytest.mark.parametrize("name", ALL)
def test_whole_trajectory_is_independent_of_the_global_torch_seed(name):
    _settings(name)
    _, updates_a, final_a, _ = _run(name)
    _, updates_b, final_b, _ = _simulate(name, global_seed=99)
    assert [u.step for u in updates_a] == [u.step for u in updates_b]
    for n in SHAPES:
        assert torch.equal(final_a[n], final_b[n])


# --- update schedule ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_updates_happen_exactly_at_the_scheduled_steps(name):
    _, updates, _, dense_grad_steps = _run(name)
    expected = _settings(name)["updates"]
    assert [u.step for u in updates] == expected
    assert dense_grad_steps == (expected if _settings(name)["dense_grad"] else [])


@pytest.mark.parametrize("name", _names(("dense", "static", "pai")))
def test_dense_and_static_masks_never_change(name):
    initial, updates, final, _ = _run(name)
    assert updates == []
    for n in SHAPES:
        assert torch.equal(final[n], initial[n])


# --- sparse-to-sparse: SET and RigL -------------------------------------------------------------

@pytest.mark.parametrize("name", _names("swap"))
def test_swap_keeps_per_layer_counts_and_changes_the_mask(name):
    initial, updates, final, _ = _run(name)
    expected = _initial_counts(name)
    for u in updates:
        assert _counts(u.after) == expected, u.step
        changed = any(not torch.equal(u.after[n], u.before[n]) for n in SHAPES)
        # Up to step 600 some layer drops at least one weight; at 700 every layer drops 0.
        assert changed == (u.step <= 600), u.step
    assert _counts(final) == expected
    assert any(not torch.equal(final[n], initial[n]) for n in SHAPES)


@pytest.mark.parametrize("name", _names("swap"))
def test_swap_drops_floor_of_nnz_times_cosine_drop_fraction_lowest_magnitudes(name):
    for u in _run(name)[1]:
        for n in SHAPES:
            nnz = int(u.before[n].sum())
            n_drop = math.floor(nnz * _rigl_drop_fraction(u.step))
            active = _flat(u.before[n])
            kept = _ref_topk(_flat(u.weights[n].abs()), nnz - n_drop, active)
            after = _index_set(u.after[n])
            assert kept <= after, (u.step, n)
            assert len(after - kept) == n_drop, (u.step, n)
            if n_drop == 0:
                assert torch.equal(u.after[n], u.before[n])


def test_drop_counts_by_hand():
    # floor(nnz * 0.3 * (1 + cos(pi * step / 750)) / 2) for the ERK counts 29, 51, 124;
    # e.g. step 500: cos(2 pi / 3) = -1/2, fraction 0.075: 29 * 0.075 = 2.175, 51 * 0.075 = 3.825.
    assert [math.floor(29 * _rigl_drop_fraction(s)) for s in DST_UPDATES] == [8, 7, 5, 3, 2, 0, 0]
    assert [math.floor(51 * _rigl_drop_fraction(s)) for s in DST_UPDATES] == [14, 12, 10, 6, 3, 1, 0]
    assert [math.floor(124 * _rigl_drop_fraction(s)) for s in DST_UPDATES] == [35, 31, 24, 16, 9, 3, 0]
    # At step 700 no layer drops anything: the mask does not change.


class _ExpectingLayout:
    """A layout that records what a method readies it for (`expect_drop`)."""

    def __init__(self) -> None:
        self.expected: list[tuple[dict, float]] = []

    def expect_drop(self, drop_scores, masks, keep) -> None:
        self.expected.append((drop_scores, keep))


@pytest.mark.parametrize("name", _names("swap"))
def test_a_swap_readies_its_layout_for_its_next_drop(name):
    # At setup (step 0) or on resuming (step 250), the layout expects the first drop from then
    # on: |w| of the weights it starts from, keeping 1 - the drop fraction of that update (step
    # 100 or 300). Past the last update (step 750) nothing is expected.
    method = _method(name)
    method.layout = layout = _ExpectingLayout()
    masks = method.initial_masks(SHAPES)
    weights = {n: torch.randn(SHAPES[n], generator=torch.Generator().manual_seed(1)) for n in SHAPES}
    for step, update in ((0, 100), (250, 300), (300, 300)):
        method.prepare(step, masks, weights)
        scores, keep = layout.expected.pop()
        assert keep == pytest.approx(1 - _rigl_drop_fraction(update))
        assert all(torch.equal(scores[n], weights[n].abs()) for n in SHAPES)
    method.prepare(751, masks, weights)
    assert layout.expected == []


def test_rigl_grows_the_largest_dense_gradients_among_entries_not_kept():
    updates = _run("rigl")[1]
    for u in updates:
        for n in SHAPES:
            nnz = int(u.before[n].sum())
            n_swap = math.floor(nnz * _rigl_drop_fraction(u.step))
            expected = _ref_swap(u.before[n], u.weights[n].abs(), u.grads[n].abs(), n_swap)
            assert _index_set(u.after[n]) == expected, (u.step, n)


def test_rigl_regrows_a_just_dropped_entry_with_the_largest_gradient():
    method = _method("rigl")
    masks = {n: torch.zeros(s, dtype=torch.bool) for n, s in SHAPES.items()}
    masks["fc.weight"].view(-1)[:100] = True
    masks["conv1.weight"].view(-1)[:10] = True
    masks["conv2.weight"].view(-1)[:10] = True
    weights = {n: (torch.arange(NUMEL[n], dtype=torch.float32).reshape(s) + 1) * masks[n]
               for n, s in SHAPES.items()}
    grads = {n: torch.zeros(s) for n, s in SHAPES.items()}
    grads["fc.weight"].view(-1)[0] = 5.0  # the smallest |w| active entry: dropped first
    grads["fc.weight"].view(-1)[500] = 4.0
    new = method.update(100, masks, weights, grads)
    n_swap = math.floor(100 * _rigl_drop_fraction(100))
    assert n_swap == 28  # 100 * 0.15 * (1 + cos(pi / 7.5)) = 28.70
    # Dropped: 0..27 (smallest |w|). Grown: 0 (|g| 5), 500 (|g| 4), then ties at |g| 0 go to
    # the lowest indices not kept: 1..26. Entry 27 stays out.
    expected = {0, 500} | set(range(1, 27)) | set(range(28, 100))
    assert _index_set(new["fc.weight"]) == expected


def test_set_grows_by_counter_based_random_scores():
    # SET's growth is the counter-based draw keyed by (seed, step, layer, element): the same on
    # every rank and world size (DESIGN invariant 5).
    for u in _run("set")[1]:
        for n in SHAPES:
            nnz = int(u.before[n].sum())
            n_swap = math.floor(nnz * _rigl_drop_fraction(u.step))
            draws = random_bits(SEED, u.step, n, "grow", torch.arange(NUMEL[n])).reshape(SHAPES[n])
            expected = _ref_swap(u.before[n], u.weights[n].abs(), draws, n_swap)
            assert _index_set(u.after[n]) == expected, (u.step, n)


def test_only_rigl_replaces_the_optimizer_step_on_update_steps():
    # google-research/rigl: SparseRigLOptimizerBase.apply_gradients runs the mask update instead of
    # the step; SparseSETOptimizerBase.apply_gradients (SET, static) steps, then updates the mask.
    assert [n for n in ALL if METHODS[n].update_replaces_optimizer_step] == ["rigl"]


def test_set_and_rigl_differ_only_in_growth():
    set_updates, rigl_updates = _run("set")[1], _run("rigl")[1]
    first_set, first_rigl = set_updates[0], rigl_updates[0]
    # Same initial mask and weights at the first update; different grown connections.
    for n in SHAPES:
        assert torch.equal(first_set.before[n], first_rigl.before[n])
    assert any(not torch.equal(first_set.after[n], first_rigl.after[n]) for n in SHAPES)


# --- dense-to-sparse: GMP, GraNet, GraNet-ST ----------------------------------------------------

@pytest.mark.parametrize("name", _names("prune"))
def test_prune_reaches_the_exact_target_count_and_sparsity_never_decreases(name):
    initial, updates, final, _ = _run(name)
    totals = [sum(_counts(initial).values())] + [sum(_counts(u.after).values()) for u in updates]
    assert totals == sorted(totals, reverse=True)  # active count non-increasing
    assert sum(_counts(final).values()) == TARGET_ACTIVE
    initial_sparsity = 1.0 - _settings(name)["init_density"]
    for u in updates:
        expected = _cubic_target_active(u.step, initial_sparsity)
        assert sum(_counts(u.after).values()) == expected, u.step
        if u.step >= 300:
            assert expected == TARGET_ACTIVE


@pytest.mark.parametrize("name", [n for n in _names("prune") if not SETTINGS[n]["regrow"]])
def test_pruning_without_regrowth_only_removes_connections(name):
    for u in _run(name)[1]:
        for n in SHAPES:
            assert _index_set(u.after[n]) <= _index_set(u.before[n]), (u.step, n)


def test_gmp_masks_do_not_change_after_prune_end():
    for u in _run("gmp")[1]:
        if u.step > 300:
            assert u.returned == frozenset() or all(
                torch.equal(u.after[n], u.before[n]) for n in SHAPES
            )


@pytest.mark.parametrize("name", [n for n in _names("prune") if SETTINGS[n]["regrow"]])
def test_granet_keeps_regrowing_after_prune_end_at_constant_counts(name):
    updates = _run(name)[1]
    late = [u for u in updates if u.step > 300]
    assert [u.step for u in late] == [400, 500, 600, 700, 800, 900]
    at_prune_end = _counts(next(u for u in updates if u.step == 300).after)
    for u in late:
        assert _counts(u.after) == at_prune_end, u.step
        assert sum(_counts(u.after).values()) == TARGET_ACTIVE
        changed = [n for n in SHAPES if not torch.equal(u.after[n], u.before[n])]
        assert changed, u.step
        for n in changed:
            grown = _index_set(u.after[n]) - _index_set(u.before[n])
            assert grown, (u.step, n)


def _ref_global_prune(before, weights, keep: int) -> dict[str, set[int]]:
    flat_scores, flat_eligible = [], []
    for n in SHAPES:
        flat_scores += _flat(weights[n].abs())
        flat_eligible += _flat(before[n])
    chosen = _ref_topk(flat_scores, keep, flat_eligible)
    return {
        n: {i - OFFSETS[n] for i in chosen if OFFSETS[n] <= i < OFFSETS[n] + NUMEL[n]}
        for n in SHAPES
    }


@pytest.mark.parametrize("step", [100, 200, 300])
def test_gmp_keeps_exactly_the_globally_largest_magnitudes(step):
    u = next(u for u in _run("gmp")[1] if u.step == step)
    keep = _cubic_target_active(step, 0.0)
    expected = _ref_global_prune(u.before, u.weights, keep)
    for n in SHAPES:
        assert _index_set(u.after[n]) == expected[n], n


def test_gmp_global_ties_go_to_the_lowest_global_index():
    method = _method("gmp")
    masks = {n: torch.ones(s, dtype=torch.bool) for n, s in SHAPES.items()}
    weights = {n: torch.ones(s) for n, s in SHAPES.items()}  # all tied
    new = method.update(300, masks, weights, None)
    # Keep 201 of 2008: the first 201 global indices, all in conv1 (216 entries).
    assert _counts(new) == {"conv1.weight": 201, "conv2.weight": 0, "fc.weight": 0}
    assert _index_set(new["conv1.weight"]) == set(range(201))


@pytest.mark.parametrize("name", _names("prune"))
def test_global_pruning_keeps_only_active_entries_when_active_weights_are_zero(name):
    # Just-regrown weights are exactly 0, like every masked-off weight: a tie that must still
    # be resolved among the active entries only (rigl scores |mask * w|; here eligibility).
    method = _method(name)
    masks = {n: torch.zeros(s, dtype=torch.bool) for n, s in SHAPES.items()}
    masks["conv2.weight"].view(-1)[:300] = True  # 300 active; target keeps 201
    weights = {n: torch.zeros(s) for n, s in SHAPES.items()}
    weights["conv2.weight"].view(-1)[100:300] = torch.arange(200, 0, -1, dtype=torch.float32)
    grads = {n: torch.zeros(s) for n, s in SHAPES.items()}
    new = {**masks, **method.update(300, masks, weights, grads)}
    assert sum(_counts(new).values()) == TARGET_ACTIVE
    if not _settings(name)["regrow"]:
        # The 200 non-zero weights (100..299) plus the zero one at the lowest index (0).
        assert _counts(new) == {"conv1.weight": 0, "conv2.weight": 201, "fc.weight": 0}
        assert _index_set(new["conv2.weight"]) == {0} | set(range(100, 300))


@pytest.mark.parametrize("name", [n for n in _names("prune") if SETTINGS[n]["regrow"]])
@pytest.mark.parametrize("step", [200, 300, 600])
def test_granet_update_matches_prune_then_per_layer_drop_and_grow(name, step):
    u = next(u for u in _run(name)[1] if u.step == step)
    _assert_granet_update(name, u, _granet_rate(step))


@pytest.mark.parametrize("name", [n for n in _names("prune") if SETTINGS[n]["regrow"]])
def test_granet_constant_anneal_keeps_the_drop_fraction(name):
    # method.drop_fraction_anneal=constant: every update drops and regrows ceil(0.5 * nnz).
    updates = _simulate(name, drop_fraction_anneal="constant")[1]
    assert [u.step for u in updates] == PRUNE_UPDATES
    for u in updates:
        _assert_granet_update(name, u, 0.5)


def _assert_granet_update(name: str, u: Update, rate: float) -> None:
    """Global prune to the cubic target, then per layer ceil(rate * nnz) dropped and regrown."""
    keep = _cubic_target_active(u.step, 1.0 - _settings(name)["init_density"])
    before_total = sum(_counts(u.before).values())
    if keep < before_total:
        pruned = _ref_global_prune(u.before, u.weights, keep)
    else:
        pruned = {n: _index_set(u.before[n]) for n in SHAPES}
    for n in SHAPES:
        pruned_mask = torch.zeros(NUMEL[n], dtype=torch.bool)
        pruned_mask[sorted(pruned[n])] = True
        nnz = len(pruned[n])
        # GraNet funcs.magnitude_prune: ceil(prune_rate * nnz), regrown by |dense gradient|.
        n_swap = math.ceil(rate * nnz)
        expected = _ref_swap(pruned_mask, u.weights[n].abs(), u.grads[n].abs(), n_swap)
        assert _index_set(u.after[n]) == expected, (u.step, n)


def test_granet_rate_by_hand():
    assert _granet_rate(0) == pytest.approx(0.5)
    assert _granet_rate(500) == pytest.approx(0.2525)
    assert _granet_rate(1000) == pytest.approx(0.005)


@pytest.mark.parametrize("name", _names("prune"))
def test_layerwise_pruning_reaches_the_erk_count_of_every_layer(name):
    initial, updates, final, _ = _simulate(name, prune_scope="layer")
    final_counts = _initial_counts("rigl")  # ERK at density 0.1: 29, 51, 124
    assert _counts(final) == final_counts
    previous = _counts(initial)
    for u in updates:
        counts = _counts(u.after)
        for n in SHAPES:
            assert counts[n] <= previous[n], (u.step, n)  # per-layer sparsity never decreases
        if u.step >= 300:
            assert counts == final_counts, u.step
        previous = counts


# --- host reads: a mask update reads the device once (twice where a prune precedes a swap) ------

READS_PER_UPDATE = {"granet": 2, "granet_st": 2}
"""GraNet's per-layer swap counts follow from its global prune's result: a second read."""


def _updating_method(name: str):
    from distsparse.config import load_config

    config = load_config(None, [f"method.name={name}", "method.sparsity=0.8",
                                "method.update_interval=4", "method.prune_end=0.5"])
    return build_method(config.method, TrainingSchedule(total_steps=100, steps_per_epoch=10), 3)


@pytest.mark.parametrize("name", [n for n in sorted(METHODS) if _updating_method(n).uses_masks
                                  and _updating_method(n).is_update_step(4)])
def test_an_update_reads_the_device_once(name, monkeypatch):
    """Full tensors, untied scores: after `MaskSet.use_layout`, every update of every method that
    changes masks (from the registry) makes one host read (GraNet two), whatever the layers."""
    from distsparse.sparsity.layout import FullLayout
    from distsparse.sparsity.masks import MaskSet
    from tests.conftest import count_host_reads

    method = _updating_method(name)
    g = torch.Generator().manual_seed(0)
    shapes = {f"layer{i}": (40 + i, 50) for i in range(8)}
    weights = {n: torch.randn(shape, generator=g) for n, shape in shapes.items()}
    grads = {n: torch.randn(shape, generator=g) for n, shape in shapes.items()}
    mask_set = MaskSet(weights)
    mask_set.update(method.initial_masks(mask_set.shapes()))
    mask_set.use_layout(FullLayout(shapes))
    method.layout = mask_set.layout
    per_update = []
    for step in (4, 8, 12):
        assert method.is_update_step(step)
        reads = count_host_reads(monkeypatch)
        changed = method.update(step, mask_set.masks, weights, grads)
        mask_set.update(changed)
        per_update.append(len(reads))
        monkeypatch.undo()
        assert changed
    assert per_update == [READS_PER_UPDATE.get(name, 1)] * 3
