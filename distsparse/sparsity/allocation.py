"""Layer-wise density allocation for sparse training (uniform, ER, ERK).

Implements the sparsity distributions of RigL: "Rigging the Lottery: Making All
Tickets Winners", Evci et al., ICML 2020 (arXiv:1911.11134), Section 3
("Sparsity Distribution"). The arithmetic follows the reference implementation
in google-research/rigl, ``rigl/sparse_utils.py`` (``get_n_zeros``,
``get_mask_random_numpy``, ``get_sparsities_uniform``,
``get_sparsities_erdos_renyi``), restated in terms of *density* (fraction of
weights kept, ``1 - sparsity``).

Shapes are PyTorch weight layouts: Conv2d ``(out, in, kh, kw)``, Linear
``(out, in)``. Every function here is pure: it maps layer names to shapes and
returns layer names to densities, in the input order.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

__all__ = [
    "DISTRIBUTIONS",
    "active_count",
    "uniform_densities",
    "erdos_renyi_densities",
    "layer_densities",
]

DISTRIBUTIONS: tuple[str, ...] = ("uniform", "er", "erk")

# Absolute slack added before flooring ``sparsity * numel``, so that products
# that are integers in exact arithmetic (e.g. 0.9 * 10) are not floored one
# below by float error. A relative term covers float error growing with numel.
_FLOOR_ABS_TOL = 1e-9
_FLOOR_REL_TOL = 1e-12


def active_count(numel: int, density: float) -> int:
    """Number of ones in a ``numel``-element mask at ``density`` (rigl ``get_mask_random_numpy``)."""
    # rigl: n_zeros = int(np.floor(sparsity * size)); the mask keeps size - n_zeros.
    numel = int(numel)
    if numel <= 0:
        return 0
    scaled = (1.0 - float(density)) * numel
    n_zeros = math.floor(scaled + _FLOOR_ABS_TOL + _FLOOR_REL_TOL * numel)
    return min(max(numel - n_zeros, 0), numel)


def _check_density(density: float) -> float:
    try:
        value = float(density)
    except (TypeError, ValueError):
        raise ValueError(f"density must be a number in (0, 1], got {density!r}") from None
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return value


def _check_shapes(shapes: Mapping[str, Sequence[int]], min_dims: int = 1) -> dict[str, tuple[int, ...]]:
    checked: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        dims = tuple(int(d) for d in shape)
        if len(dims) < min_dims or any(d <= 0 for d in dims):
            raise ValueError(
                f"layer {name!r} has shape {tuple(shape)!r}; expected at least "
                f"{min_dims} dimension(s), all positive"
            )
        checked[name] = dims
    return checked


def _check_dense_layers(shapes: Mapping[str, object], dense_layers: Collection[str]) -> frozenset[str]:
    # Mirrors rigl get_sparsities: custom_sparsity_map keys without a mask are an error.
    dense = frozenset(dense_layers)
    unknown = sorted(dense.difference(shapes))
    if unknown:
        raise ValueError(f"dense_layers names not found in shapes: {unknown}")
    return dense


def uniform_densities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    dense_layers: Collection[str] = (),
) -> dict[str, float]:
    """Every layer gets ``density``; layers in ``dense_layers`` get 1.0 (rigl ``get_sparsities_uniform``)."""
    value = _check_density(density)
    _check_shapes(shapes)
    dense = _check_dense_layers(shapes, dense_layers)
    return {name: 1.0 if name in dense else value for name in shapes}


def erdos_renyi_densities(
    shapes: Mapping[str, Sequence[int]],
    density: float,
    dense_layers: Collection[str] = (),
    kernel: bool = True,
    power_scale: float = 1.0,
) -> dict[str, float]:
    """Erdos-Renyi(-Kernel) densities keeping rigl's parameter budget (rigl ``get_sparsities_erdos_renyi``).

    ``kernel=True`` (ERK) scores a layer ``(sum(shape) / prod(shape)) ** power_scale``;
    ``kernel=False`` (ER) scores it ``(n_in + n_out) / (n_in * n_out)`` from
    ``shape[:2]`` and ignores ``power_scale``, as rigl does. Layers in
    ``dense_layers`` are left out of the budget and get 1.0; layers whose scaled
    score exceeds 1 are made dense and the rest rescaled until none does.
    """
    value = _check_density(density)
    dims_by_name = _check_shapes(shapes, min_dims=1 if kernel else 2)
    excluded = _check_dense_layers(shapes, dense_layers)

    # Raw Erdos-Renyi score and parameter count per candidate layer, input order.
    raw: dict[str, float] = {}
    numel: dict[str, int] = {}
    for name, dims in dims_by_name.items():
        numel[name] = math.prod(dims)
        if name in excluded:
            continue
        if kernel:
            raw[name] = (sum(dims) / numel[name]) ** power_scale
        else:
            n_out, n_in = dims[0], dims[1]  # rigl: n_in, n_out = shape_list[-2:] in TF layout
            raw[name] = (n_in + n_out) / (n_in * n_out)

    # rigl's loop. With D the layers forced dense so far and S the others:
    #   eps * sum_{i in S} raw_i * N_i = sum_{i in S} n_ones_i - sum_{j in D} n_zeros_j
    # so that sum over S of eps*raw_i*N_i plus the full N_j of D equals the
    # uniform budget sum_i n_ones_i. rhs and divisor are re-accumulated from
    # scratch each pass, in input order, as in the reference.
    forced_dense: set[str] = set()
    eps = 0.0
    while raw:
        rhs = 0
        divisor = 0.0
        for name in dims_by_name:
            if name in excluded:
                continue  # rigl: custom_sparsity_map layers are ignored ("pass")
            n_param = numel[name]
            n_ones = active_count(n_param, value)
            if name in forced_dense:
                rhs -= n_param - n_ones  # rigl: rhs -= n_zeros
            else:
                rhs += n_ones
                divisor += raw[name] * n_param
        eps = rhs / divisor
        max_raw = max(raw[name] for name in raw if name not in forced_dense)
        if max_raw * eps > 1.0:
            # rigl compares raw probabilities by exact equality: ties all go dense.
            forced_dense.update(
                name for name in raw if name not in forced_dense and raw[name] == max_raw
            )
        else:
            break

    densities: dict[str, float] = {}
    for name in dims_by_name:
        if name in excluded or name in forced_dense:
            densities[name] = 1.0
        else:
            densities[name] = eps * raw[name]
    return densities


def layer_densities(
    distribution: str,
    shapes: Mapping[str, Sequence[int]],
    density: float,
    dense_layers: Collection[str] = (),
) -> dict[str, float]:
    """Dispatch to the ``"uniform"``, ``"er"`` or ``"erk"`` allocation (rigl ``get_sparsities``)."""
    if distribution == "uniform":
        return uniform_densities(shapes, density, dense_layers)
    if distribution == "er":
        return erdos_renyi_densities(shapes, density, dense_layers, kernel=False)
    if distribution == "erk":
        return erdos_renyi_densities(shapes, density, dense_layers, kernel=True)
    raise ValueError(
        f"unknown layer distribution {distribution!r}; expected one of {', '.join(DISTRIBUTIONS)}"
    )
