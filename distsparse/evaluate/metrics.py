"""Measures beyond test accuracy: agreement with the dense net, excess error, prune potential.

After "Lost in Pruning" (Liebenwein et al., MLSys 2021, arXiv 2103.03014; code lucaslie/torchprune).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from distsparse.data.bundle import model_input

__all__ = ["agreement", "excess_error", "predict", "prune_potential"]


@torch.no_grad()
def predict(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Top-1 class of every input (of every position of a sequence model's output), inputs on the
    model's device and, where they are floating point (not tokens), in its parameter dtype."""
    parameter = next(model.parameters())
    return model(model_input(inputs, parameter.device, parameter.dtype)).argmax(-1)


def agreement(model_a: torch.nn.Module, model_b: torch.nn.Module,
              batches: Iterable[torch.Tensor]) -> float:
    """Fraction of inputs on which both models predict the same top-1 class (the paper's
    functional similarity; torchprune `paper/lost/script/eps_ball.py` measures it under noise)."""
    same = total = 0
    for inputs in batches:
        same += int((predict(model_a, inputs).cpu() == predict(model_b, inputs).cpu()).sum())
        total += len(inputs)
    if total == 0:
        raise ValueError("agreement needs at least one input")
    return same / total


def excess_error(top1: float, dense_top1: float) -> float:
    """Error of a run minus error of the dense run on the same test distribution.

    The paper's excess error on a shifted distribution D' is this quantity on D' minus the same on
    the training distribution D (torchprune `paper/lost/script/generalization.py`,
    `extract_excess_error`); both terms are reported per distribution, so it is one subtraction.
    """
    return (1.0 - top1) - (1.0 - dense_top1)


def prune_potential(points: Sequence[tuple[float, float]], dense_error: float, delta: float) -> float:
    """The largest prune ratio whose error is at most dense_error + delta; 0.0 if none.

    points are (prune_ratio, error) pairs of one method on one test distribution, errors and delta
    as fractions (delta = 0.005 is the paper's 0.5 percentage points). As torchprune's
    `Logger.compute_stats` (`src/experiment/experiment/logger.py`), used by
    `paper/lost/script/generalization.py`: start from the unpruned network (ratio 0) and take every
    point with `dense_error + delta >= error` whose ratio is at least the best so far, so the
    result is the largest qualifying ratio overall, even when a smaller ratio fails (non-monotone
    sweeps).
    """
    best = 0.0
    for ratio, error in points:
        if dense_error + delta >= error and ratio >= best:
            best = ratio
    return best
