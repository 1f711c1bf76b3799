"""Schedules as pure functions of training progress: GMP's cubic sparsity, drop-fraction decay."""
from __future__ import annotations

import math

__all__ = ["cosine_decay", "cubic_sparsity", "is_update_step", "iterative_densities"]


def cubic_sparsity(progress: float, initial: float, final: float) -> float:
    """Zhu & Gupta (arXiv 1710.01878) s_t = s_f + (s_i - s_f)(1 - t)^3, t clamped to [0, 1].

    Written as a convex combination so both ends are exact in floating point.
    """
    remaining = (1.0 - min(max(progress, 0.0), 1.0)) ** 3
    return initial * remaining + final * (1.0 - remaining)


def cosine_decay(step: int, total_steps: int, initial: float, minimum: float = 0.0) -> float:
    """minimum + (initial - minimum)(1 + cos(pi t)) / 2 with t = step / total_steps clamped to 1.

    RigL's cosine drop fraction (minimum 0, `tf.train.cosine_decay`) and GraNet's `CosineDecay`
    of the prune rate (minimum 0.005) are both this function.
    """
    t = min(step / total_steps, 1.0) if total_steps > 0 else 1.0
    return minimum + (initial - minimum) * 0.5 * (1.0 + math.cos(math.pi * t))


def is_update_step(step: int, interval: int, begin: int, end: int) -> bool:
    """True every `interval` steps in [begin, end] (step 0 excluded): rigl's `is_mask_update_iter`."""
    return step > 0 and begin <= step <= end and step % interval == 0


def iterative_densities(final_density: float, iterations: int, mode: str = "exp") -> list[float]:
    """Densities of iterative pruning's steps k = 1..n, ending exactly at `final_density`.

    exp: d^(k/n) (FORCE's default and SynFlow's exponential schedule); linear: 1 - k(1 - d)/n.
    As naver/force `pruning/pruning_algos.py::iterative_pruning`.
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if mode == "exp":
        steps = [final_density ** (k / iterations) for k in range(1, iterations)]
    elif mode == "linear":
        steps = [1.0 - k * (1.0 - final_density) / iterations for k in range(1, iterations)]
    else:
        raise ValueError(f"unknown iterative schedule {mode!r}; expected exp or linear")
    return [*steps, final_density]
