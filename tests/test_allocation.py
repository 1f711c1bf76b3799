"""Tests for distsparse.sparsity.allocation (uniform / ER / ERK layer densities).

The ERK values are checked against an independent numpy transcription of
google-research/rigl ``rigl/sparse_utils.py::get_sparsities_erdos_renyi``,
run on TensorFlow-layout shapes, plus a few hard-coded numbers from one run of
that transcription.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from distsparse.sparsity.allocation import (
    active_count,
    erdos_renyi_densities,
    layer_densities,
    uniform_densities,
)

REL = 1e-12


def _resnet50_shapes() -> dict[str, tuple[int, ...]]:
    """The 54 sparsifiable weights of torchvision resnet50, PyTorch layout, written out."""
    return {
        "conv1": (64, 3, 7, 7),
        # layer1
        "layer1.0.conv1": (64, 64, 1, 1),
        "layer1.0.conv2": (64, 64, 3, 3),
        "layer1.0.conv3": (256, 64, 1, 1),
        "layer1.0.downsample.0": (256, 64, 1, 1),
        "layer1.1.conv1": (64, 256, 1, 1),
        "layer1.1.conv2": (64, 64, 3, 3),
        "layer1.1.conv3": (256, 64, 1, 1),
        "layer1.2.conv1": (64, 256, 1, 1),
        "layer1.2.conv2": (64, 64, 3, 3),
        "layer1.2.conv3": (256, 64, 1, 1),
        # layer2
        "layer2.0.conv1": (128, 256, 1, 1),
        "layer2.0.conv2": (128, 128, 3, 3),
        "layer2.0.conv3": (512, 128, 1, 1),
        "layer2.0.downsample.0": (512, 256, 1, 1),
        "layer2.1.conv1": (128, 512, 1, 1),
        "layer2.1.conv2": (128, 128, 3, 3),
        "layer2.1.conv3": (512, 128, 1, 1),
        "layer2.2.conv1": (128, 512, 1, 1),
        "layer2.2.conv2": (128, 128, 3, 3),
        "layer2.2.conv3": (512, 128, 1, 1),
        "layer2.3.conv1": (128, 512, 1, 1),
        "layer2.3.conv2": (128, 128, 3, 3),
        "layer2.3.conv3": (512, 128, 1, 1),
        # layer3
        "layer3.0.conv1": (256, 512, 1, 1),
        "layer3.0.conv2": (256, 256, 3, 3),
        "layer3.0.conv3": (1024, 256, 1, 1),
        "layer3.0.downsample.0": (1024, 512, 1, 1),
        "layer3.1.conv1": (256, 1024, 1, 1),
        "layer3.1.conv2": (256, 256, 3, 3),
        "layer3.1.conv3": (1024, 256, 1, 1),
        "layer3.2.conv1": (256, 1024, 1, 1),
        "layer3.2.conv2": (256, 256, 3, 3),
        "layer3.2.conv3": (1024, 256, 1, 1),
        "layer3.3.conv1": (256, 1024, 1, 1),
        "layer3.3.conv2": (256, 256, 3, 3),
        "layer3.3.conv3": (1024, 256, 1, 1),
        "layer3.4.conv1": (256, 1024, 1, 1),
        "layer3.4.conv2": (256, 256, 3, 3),
        "layer3.4.conv3": (1024, 256, 1, 1),
        "layer3.5.conv1": (256, 1024, 1, 1),
        "layer3.5.conv2": (256, 256, 3, 3),
        "layer3.5.conv3": (1024, 256, 1, 1),
        # layer4
        "layer4.0.conv1": (512, 1024, 1, 1),
        "layer4.0.conv2": (512, 512, 3, 3),
        "layer4.0.conv3": (2048, 512, 1, 1),
        "layer4.0.downsample.0": (2048, 1024, 1, 1),
        "layer4.1.conv1": (512, 2048, 1, 1),
        "layer4.1.conv2": (512, 512, 3, 3),
        "layer4.1.conv3": (2048, 512, 1, 1),
        "layer4.2.conv1": (512, 2048, 1, 1),
        "layer4.2.conv2": (512, 512, 3, 3),
        "layer4.2.conv3": (2048, 512, 1, 1),
        "fc": (1000, 2048),
    }


RESNET50 = _resnet50_shapes()


def _to_tf_layout(shape: tuple[int, ...]) -> list[int]:
    """PyTorch (out, in, kh, kw) -> TF (kh, kw, in, out); (out, in) -> (in, out)."""
    if len(shape) == 4:
        out_c, in_c, kh, kw = shape
        return [kh, kw, in_c, out_c]
    out_f, in_f = shape
    return [in_f, out_f]


def _rigl_erdos_renyi(shapes, default_sparsity, custom_sparsity_map, include_kernel, erk_power_scale=1.0):
    """Line-by-line numpy transcription of rigl get_sparsities_erdos_renyi, TF layout.

    Returns (sparsities, dense_layers) keyed by layer name.
    """
    tf_shapes = {name: _to_tf_layout(shape) for name, shape in shapes.items()}

    def get_n_zeros(size, sparsity):
        return int(np.floor(sparsity * size))

    is_eps_valid = False
    dense_layers = set()
    while not is_eps_valid:
        divisor = 0
        rhs = 0
        raw_probabilities = {}
        for var_name, shape_list in tf_shapes.items():
            n_param = np.prod(shape_list)
            n_zeros = get_n_zeros(n_param, default_sparsity)
            if var_name in dense_layers:
                rhs -= n_zeros
            elif var_name in custom_sparsity_map:
                pass
            else:
                n_ones = n_param - n_zeros
                rhs += n_ones
                if include_kernel:
                    raw_probabilities[var_name] = (np.sum(shape_list) / np.prod(shape_list)) ** erk_power_scale
                else:
                    n_in, n_out = shape_list[-2:]
                    raw_probabilities[var_name] = (n_in + n_out) / (n_in * n_out)
                divisor += raw_probabilities[var_name] * n_param
        eps = rhs / divisor
        max_prob = np.max(list(raw_probabilities.values()))
        max_prob_one = max_prob * eps
        if max_prob_one > 1:
            is_eps_valid = False
            for var_name, mask_raw_prob in raw_probabilities.items():
                if mask_raw_prob == max_prob:
                    dense_layers.add(var_name)
        else:
            is_eps_valid = True

    sparsities = {}
    for var_name, shape_list in tf_shapes.items():
        if var_name in custom_sparsity_map:
            sparsities[var_name] = custom_sparsity_map[var_name]
        elif var_name in dense_layers:
            sparsities[var_name] = 0.0
        else:
            probability_one = eps * raw_probabilities[var_name]
            sparsities[var_name] = 1.0 - probability_one
    return sparsities, dense_layers


def _numel(shape) -> int:
    return math.prod(shape)


def test_resnet50_has_54_sparsifiable_layers():
    assert len(RESNET50) == 54
    assert sum(_numel(s) for s in RESNET50.values()) == 25_502_912


# ---------------------------------------------------------------------------
# ERK vs the rigl transcription
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.2, 0.1])
@pytest.mark.parametrize("kernel", [True, False])
def test_erdos_renyi_matches_rigl_transcription(density, kernel):
    ours = erdos_renyi_densities(RESNET50, density, kernel=kernel)
    ref, _ = _rigl_erdos_renyi(RESNET50, 1.0 - density, {}, include_kernel=kernel)
    assert list(ours) == list(RESNET50)
    for name in RESNET50:
        assert ours[name] == pytest.approx(1.0 - ref[name], rel=REL, abs=0), name


@pytest.mark.parametrize("density", [0.2, 0.1])
def test_erk_with_dense_first_and_last_matches_rigl(density):
    dense = {"conv1", "fc"}
    ours = erdos_renyi_densities(RESNET50, density, dense_layers=dense)
    ref, _ = _rigl_erdos_renyi(RESNET50, 1.0 - density, {"conv1": 0.0, "fc": 0.0}, include_kernel=True)
    assert ours["conv1"] == 1.0 and ours["fc"] == 1.0
    for name in RESNET50:
        assert ours[name] == pytest.approx(1.0 - ref[name], rel=REL, abs=0), name


# Numbers below were produced once by _rigl_erdos_renyi above (TF layout, numpy).
ERK_EXPECTED = {
    0.2: {
        "conv1": 0.8571954716510548,
        "fc": 0.14817576166901425,
        "layer4.0.conv2": 0.04346572733232534,
    },
    0.1: {
        "conv1": 0.42003778360801114,
        "fc": 0.07260819798312923,
        "layer4.0.conv2": 0.021298815002387506,
    },
}
# Layers the epsilon loop forces dense (density exactly 1.0).
ERK_EXPECTED_DENSE_LAYERS = {
    0.2: {
        "layer1.0.conv1",
        "layer1.0.conv3",
        "layer1.0.downsample.0",
        "layer1.1.conv1",
        "layer1.1.conv3",
        "layer1.2.conv1",
        "layer1.2.conv3",
        "layer2.0.conv1",
    },
    0.1: {"layer1.0.conv1"},
}
# Same, with dense_layers={"conv1", "fc"} (rigl custom_sparsity_map {conv1: 0, fc: 0}).
ERK_EXPECTED_DENSE_FIRST_LAST = {
    0.2: {"layer4.0.conv2": 0.04253219981921397},
    0.1: {"layer4.0.conv2": 0.02082642204438756, "layer2.0.conv1": 0.5619494383083681},
}


@pytest.mark.parametrize("density", [0.2, 0.1])
def test_erk_hard_coded_resnet50_values(density):
    ours = erdos_renyi_densities(RESNET50, density)
    for name, expected in ERK_EXPECTED[density].items():
        assert ours[name] == pytest.approx(expected, rel=REL, abs=0), name
    dense = {name for name, d in ours.items() if d == 1.0}
    assert dense == ERK_EXPECTED_DENSE_LAYERS[density]


@pytest.mark.parametrize("density", [0.2, 0.1])
def test_erk_hard_coded_resnet50_values_dense_first_last(density):
    ours = erdos_renyi_densities(RESNET50, density, dense_layers=("conv1", "fc"))
    for name, expected in ERK_EXPECTED_DENSE_FIRST_LAST[density].items():
        assert ours[name] == pytest.approx(expected, rel=REL, abs=0), name
    dense = {name for name, d in ours.items() if d == 1.0}
    assert dense == ERK_EXPECTED_DENSE_LAYERS[density] | {"conv1", "fc"}


# ---------------------------------------------------------------------------
# Parameter budget
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("density", [0.5, 0.2, 0.1, 0.05, 0.01])
def test_budget_matches_uniform_active_count(distribution, density):
    dens = layer_densities(distribution, RESNET50, density)
    total = sum(_numel(s) for s in RESNET50.values())
    kept = sum(dens[n] * _numel(s) for n, s in RESNET50.items())
    if distribution == "uniform":
        assert abs(kept / total - density) < 1e-9
    else:
        # rigl budgets the integer per-layer counts numel - floor(sparsity * numel),
        # so ER/ERK keep exactly sum(active_count) parameters ...
        budget = sum(active_count(_numel(s), density) for s in RESNET50.values())
        assert kept == pytest.approx(budget, rel=1e-12, abs=0)
        # ... which is density * total up to < 1 parameter of floor rounding per layer.
        assert abs(kept - density * total) < len(RESNET50)
        assert abs(kept / total - density) < 1e-5


@pytest.mark.parametrize("distribution", ["er", "erk"])
def test_budget_excludes_user_dense_layers(distribution):
    density = 0.1
    dense = {"conv1", "fc"}
    dens = layer_densities(distribution, RESNET50, density, dense_layers=dense)
    rest = {n: s for n, s in RESNET50.items() if n not in dense}
    kept = sum(dens[n] * _numel(s) for n, s in rest.items())
    budget = sum(active_count(_numel(s), density) for s in rest.values())
    assert kept == pytest.approx(budget, rel=1e-12, abs=0)
    assert abs(kept / sum(_numel(s) for s in rest.values()) - density) < 1e-5


# ---------------------------------------------------------------------------
# Layers forced dense by the epsilon loop
# ---------------------------------------------------------------------------


def test_erk_forces_dense_layers_at_high_density_and_rescales():
    density = 0.5
    ours = erdos_renyi_densities(RESNET50, density)
    ref, ref_dense = _rigl_erdos_renyi(RESNET50, 0.5, {}, include_kernel=True)
    assert ref_dense == ERK_DENSE_AT_HALF
    assert {n for n, d in ours.items() if d == 1.0} == ref_dense
    for name in RESNET50:
        assert ours[name] == pytest.approx(1.0 - ref[name], rel=REL, abs=0), name
        assert 0.0 < ours[name] <= 1.0

    # One-pass eps would push the highest-scoring layer above 1 ...
    raw = {n: sum(s) / _numel(s) for n, s in RESNET50.items()}
    naive_eps = sum(active_count(_numel(s), density) for s in RESNET50.values()) / sum(
        raw[n] * _numel(s) for n, s in RESNET50.items()
    )
    assert naive_eps * max(raw.values()) > 1.0
    # ... so those layers go dense and the rest share the remaining budget with
    # one common, larger eps (a dense layer's share exceeded its size).
    sparse_names = [n for n in RESNET50 if n not in ref_dense]
    eps = ours[sparse_names[0]] / raw[sparse_names[0]]
    assert eps > naive_eps
    for name in sparse_names:
        assert ours[name] == pytest.approx(eps * raw[name], rel=1e-12)
    assert eps * max(raw[n] for n in sparse_names) <= 1.0
    # Ties (same raw score) go dense together.
    for name in ref_dense:
        assert all(n in ref_dense for n in RESNET50 if raw[n] == raw[name])
    # Budget: forced-dense layers in full + eps-scaled rest == uniform active count.
    budget = sum(active_count(_numel(s), density) for s in RESNET50.values())
    dense_part = sum(_numel(RESNET50[n]) for n in ref_dense)
    sparse_part = sum(ours[n] * _numel(RESNET50[n]) for n in sparse_names)
    assert dense_part + sparse_part == pytest.approx(budget, rel=1e-12)


# Produced once by _rigl_erdos_renyi at sparsity 0.5: 31 layers end up dense.
ERK_DENSE_AT_HALF = {
    "conv1",
    "layer1.0.conv1",
    "layer1.0.conv2",
    "layer1.0.conv3",
    "layer1.0.downsample.0",
    "layer1.1.conv1",
    "layer1.1.conv2",
    "layer1.1.conv3",
    "layer1.2.conv1",
    "layer1.2.conv2",
    "layer1.2.conv3",
    "layer2.0.conv1",
    "layer2.0.conv3",
    "layer2.0.downsample.0",
    "layer2.1.conv1",
    "layer2.1.conv3",
    "layer2.2.conv1",
    "layer2.2.conv3",
    "layer2.3.conv1",
    "layer2.3.conv3",
    "layer3.0.conv1",
    "layer3.0.conv3",
    "layer3.1.conv1",
    "layer3.1.conv3",
    "layer3.2.conv1",
    "layer3.2.conv3",
    "layer3.3.conv1",
    "layer3.3.conv3",
    "layer3.4.conv1",
    "layer3.4.conv3",
    "layer3.5.conv1",
    "layer3.5.conv3",
}


def test_two_layer_forced_dense_by_hand():
    # a: raw = 3/2 = 1.5, b: raw = 101/100 = 1.01 ; budget 0.9 * (2 + 10000) -> 1 + 9002 ones.
    shapes = {"a": (1, 2), "b": (100, 100)}
    ours = erdos_renyi_densities(shapes, 0.9)
    # First pass: eps = (2 - 0 + 10000 - 1000) / (1.5*2 + 1.01*10000) = 9002/10103; 1.5*eps > 1
    # -> a dense. Second pass: rhs = (10000 - 1000) - 0 (a has floor(0.1*2)=0 zeros) = 9000.
    eps = 9000 / (1.01 * 10000)
    assert ours["a"] == 1.0
    assert ours["b"] == pytest.approx(eps * 1.01, rel=1e-12)
    assert ours["b"] == pytest.approx(0.9, rel=1e-12)


# ---------------------------------------------------------------------------
# ER vs ERK
# ---------------------------------------------------------------------------


def test_er_equals_erk_for_linear_layers_by_hand():
    shapes = {"a": (10, 20), "b": (30, 40)}
    # raw(a) = (10+20)/200 = 0.15, raw(b) = (30+40)/1200 = 7/120, for ER and ERK alike.
    er = erdos_renyi_densities(shapes, 0.2, kernel=False)
    erk = erdos_renyi_densities(shapes, 0.2, kernel=True)
    # density 0.2: ones = 40 + 240; divisor = 0.15*200 + (7/120)*1200 = 30 + 70.
    eps = (40 + 240) / (30 + 70)  # 2.8; 2.8 * 0.15 = 0.42 <= 1, no layer forced dense
    for got in (er, erk):
        assert got["a"] == pytest.approx(eps * 0.15, rel=1e-12)
        assert got["b"] == pytest.approx(eps * 7 / 120, rel=1e-12)
    assert erk["a"] == pytest.approx(0.42, rel=1e-12)

    # density 0.5: first pass eps = (100 + 600) / 100 = 7, 7 * 0.15 = 1.05 > 1 -> a dense.
    # Second pass (rigl): rhs = 600 ones of b - 100 zeros of a = 500, divisor = 70.
    er = erdos_renyi_densities(shapes, 0.5, kernel=False)
    erk = erdos_renyi_densities(shapes, 0.5, kernel=True)
    eps = 500 / 70
    for got in (er, erk):
        assert got["a"] == 1.0
        assert got["b"] == pytest.approx(eps * 7 / 120, rel=1e-12)
        assert got["b"] == pytest.approx(5 / 12, rel=1e-12)  # 200 + 500 = 700 = 0.5 * 1400 kept
    assert layer_densities("er", shapes, 0.5) == er
    assert layer_densities("erk", shapes, 0.5) == erk


def test_er_differs_from_erk_for_conv_layers():
    shapes = {"c1": (16, 8, 3, 3), "c2": (32, 16, 5, 5), "fc": (10, 32)}
    density = 0.05
    er = erdos_renyi_densities(shapes, density, kernel=False)
    erk = erdos_renyi_densities(shapes, density, kernel=True)
    # ER ignores the kernel: c1 raw = (16+8)/(16*8) over its 1152 params.
    raw_er = {"c1": 24 / 128, "c2": 48 / 512, "fc": 42 / 320}
    raw_erk = {"c1": 30 / 1152, "c2": 58 / 12800, "fc": 42 / 320}
    budget = 58 + 640 + 16  # numel - floor(0.95 * numel) for 1152, 12800, 320
    assert budget == sum(active_count(_numel(s), density) for s in shapes.values())
    eps_er = budget / (216 + 1200 + 42)
    eps_erk = budget / (30 + 58 + 42)
    for name in shapes:
        assert er[name] == pytest.approx(eps_er * raw_er[name], rel=1e-12)
        assert erk[name] == pytest.approx(eps_erk * raw_erk[name], rel=1e-12)
        assert er[name] < 1.0 and erk[name] < 1.0
    assert er["c1"] != pytest.approx(erk["c1"], rel=1e-3)
    assert er["c2"] != pytest.approx(erk["c2"], rel=1e-3)
    # Linear layer: same raw score, differs only through the common eps.
    assert er["fc"] / erk["fc"] == pytest.approx(eps_er / eps_erk, rel=1e-12)


def test_erk_power_scale():
    shapes = {"a": (10, 20), "b": (30, 40)}
    soft = erdos_renyi_densities(shapes, 0.5, power_scale=0.5)
    raw = {"a": 0.15**0.5, "b": (70 / 1200) ** 0.5}
    eps = 700 / (raw["a"] * 200 + raw["b"] * 1200)
    for name in shapes:
        assert soft[name] == pytest.approx(eps * raw[name], rel=1e-12)
    # ER ignores power_scale, as rigl does.
    assert erdos_renyi_densities(shapes, 0.5, kernel=False, power_scale=0.5) == erdos_renyi_densities(
        shapes, 0.5, kernel=False
    )


# ---------------------------------------------------------------------------
# Uniform, ordering, dense layers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.1, 1e-3])
def test_uniform_every_layer_gets_density(density):
    dens = uniform_densities(RESNET50, density)
    assert list(dens) == list(RESNET50)
    assert all(d == density for d in dens.values())
    assert layer_densities("uniform", RESNET50, density) == dens


def test_uniform_dense_layers():
    dens = uniform_densities(RESNET50, 0.1, dense_layers=("conv1", "fc"))
    assert dens["conv1"] == 1.0 and dens["fc"] == 1.0
    assert all(d == 0.1 for n, d in dens.items() if n not in ("conv1", "fc"))


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
def test_output_keeps_input_order_and_range(distribution):
    shapes = dict(reversed(list(RESNET50.items())))
    dens = layer_densities(distribution, shapes, 0.1, dense_layers=["fc"])
    assert list(dens) == list(shapes)
    assert all(isinstance(d, float) and 0.0 < d <= 1.0 for d in dens.values())


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
def test_density_one_is_all_dense(distribution):
    dens = layer_densities(distribution, RESNET50, 1.0)
    assert all(d == pytest.approx(1.0, rel=1e-12) for d in dens.values())


def test_all_layers_user_dense():
    shapes = {"a": (4, 4), "b": (8, 4)}
    assert erdos_renyi_densities(shapes, 0.1, dense_layers=shapes) == {"a": 1.0, "b": 1.0}


# ---------------------------------------------------------------------------
# active_count
# ---------------------------------------------------------------------------


def test_active_count_exact_values():
    assert active_count(10, 0.1) == 1
    assert active_count(100, 0.2) == 20
    assert active_count(9408, 0.2) == 9408 - math.floor(0.8 * 9408) == 1882
    assert active_count(10, 0.3) == 3  # (1 - 0.3) * 10 = 7.0
    # Float guard: (1 - 0.9) * 10 = 0.9999999999999998 and (1 - 0.8) * 5 = 0.9999999999999998
    # would floor to 0 zeros without it.
    assert active_count(10, 0.9) == 9
    assert active_count(5, 0.8) == 4
    assert active_count(25, 0.56) == 14  # 0.44 * 25 = 10.999999999999998 in floats
    assert active_count(7, 0.5) == 4  # floor(3.5) = 3 zeros, as rigl
    assert active_count(2_048_000, 0.1) == 204_800
    assert active_count(0, 0.5) == 0
    for n in (1, 2, 3, 9408, 2_359_296):
        assert active_count(n, 1.0) == n


def test_active_count_sweep_in_range():
    densities = [i / 97 for i in range(0, 98)] + [1e-12, 0.999999, 0.1, 0.2, 0.3, 0.7, 0.9]
    for n in list(range(0, 200)) + [1000, 4096, 9408, 65536, 1_048_576, 2_359_296]:
        for d in densities:
            k = active_count(n, d)
            assert isinstance(k, int)
            assert 0 <= k <= n
            # within one of the exact product (floor of zeros, plus float guard)
            assert abs(k - d * n) < 1.0 + 1e-6


def test_active_count_matches_rigl_mask():
    rng = np.random.RandomState(0)
    for n, d in [(9408, 0.2), (4096, 0.1), (1000, 0.05), (37, 0.3)]:
        # rigl get_mask_random_numpy
        flat = np.ones(n)
        flat[: int(np.floor((1.0 - d) * n))] = 0
        rng.shuffle(flat)
        assert int(flat.sum()) == active_count(n, d)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1, float("nan")])
def test_bad_density_raises(distribution, bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        layer_densities(distribution, RESNET50, bad)


def test_unknown_distribution_raises():
    with pytest.raises(ValueError) as info:
        layer_densities("snip", RESNET50, 0.1)
    assert str(info.value) == "unknown layer distribution 'snip'; expected one of uniform, er, erk"


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
def test_unknown_dense_layer_raises(distribution):
    with pytest.raises(ValueError, match="layer9.conv1") as info:
        layer_densities(distribution, RESNET50, 0.1, dense_layers={"conv1", "layer9.conv1", "head"})
    assert "head" in str(info.value)
    assert "'conv1'" not in str(info.value)


def test_bad_shape_raises():
    with pytest.raises(ValueError, match="'w'"):
        erdos_renyi_densities({"w": (4, 0)}, 0.5)
    with pytest.raises(ValueError, match="'bias'"):
        erdos_renyi_densities({"bias": (4,)}, 0.5, kernel=False)

