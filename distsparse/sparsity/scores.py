"""Scores that rank connections: larger means more worth keeping (drop) or adding (grow).

The data-dependent scores of pruning at initialization (SNIP, GraSP) average the gradient of the
GLOBAL batch: each rank sums its part of the loss, divides by the global batch size, and
`reduce_sum` (an all-reduce in a process group, the identity in one process) adds the ranks'
gradients. One or N workers then select from the same scores, up to the order of float additions.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distsparse.sparsity.counter_rng import random_bits_range, random_bits_ranges

__all__ = [
    "GRASP_TEMPERATURE",
    "grasp_scores",
    "gradient_scores",
    "magnitude_scores",
    "mean_gradients",
    "random_scores",
    "random_scores_of_ranges",
    "snip_scores",
    "synflow_scores",
]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]
ReduceSum = Callable[[torch.Tensor], torch.Tensor]

GRASP_TEMPERATURE = 200.0
"""Softmax temperature of GraSP's loss (alecwangcq/GraSP pruner/GraSP.py, `T=200`)."""


def magnitude_scores(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|w| of every named weight: magnitude pruning's criterion."""
    return _magnitudes(weights)


def gradient_scores(grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|g| of every named dense gradient: RigL's and GraNet's growth criterion."""
    return _magnitudes(grads)


def _magnitudes(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|t| of every tensor in one foreach call: on a GPU a few kernels for all layers, not one a
    layer."""
    names = list(tensors)
    if not names:
        return {}
    return dict(zip(names, torch._foreach_abs([tensors[name].detach() for name in names])))


def random_scores(
    shape: torch.Size | tuple[int, ...],
    seed: int,
    step: int,
    layer: str,
    purpose: str,
    device: torch.device | str = "cpu",
    offset: int = 0,
) -> torch.Tensor:
    """Counter-based uniform scores for a layer (global indices offset .. offset + numel - 1):
    the 32-bit draws shifted by -2^31 into int32 (the same order; selections then work on 32-bit
    keys)."""
    numel = 1
    for dim in shape:
        numel *= dim
    bits = random_bits_range(seed, step, layer, purpose, offset, numel, device)
    return bits.sub_(2**31).to(torch.int32).view(shape)


def random_scores_of_ranges(
    seed: int, step: int, purpose: str, ranges: Sequence[tuple[str, int, int]],
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """`random_scores` of every (layer, offset, count), 1-D, from one draw over all of them."""
    bits = random_bits_ranges(seed, step, purpose, ranges, device).sub_(2**31).to(torch.int32)
    return list(bits.split([count for _, _, count in ranges]))


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _reduce_all(tensors: list[torch.Tensor], reduce_sum: ReduceSum) -> list[torch.Tensor]:
    """Sum a list of tensors over ranks with one collective."""
    flat = reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def _global_batch_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, global_batch: int,
                       temperature: float) -> torch.Tensor:
    """This rank's share of the cross-entropy averaged over the global batch."""
    return F.cross_entropy(model(x) / temperature, y, reduction="sum") / global_batch


def mean_gradients(
    model: nn.Module, params: Mapping[str, torch.Tensor], batches: Batches, global_batch: int,
    reduce_sum: ReduceSum = _identity, temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """dL/dw of the cross-entropy on logits / temperature, averaged over the global batches."""
    names, weights = list(params), list(params.values())
    total = [torch.zeros_like(w) for w in weights]
    count = 0
    for x, y in batches:
        loss = _global_batch_loss(model, x, y, global_batch, temperature)
        for acc, grad in zip(total, torch.autograd.grad(loss, weights)):
            acc += grad
        count += 1
    if count == 0:
        raise ValueError("no batches to compute gradients on")
    return {n: g / count for n, g in zip(names, _reduce_all(total, reduce_sum))}


def snip_scores(weights: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """|w * dL/dw|: SNIP's connection sensitivity (Lee et al. 2019, arXiv 1810.02340, eq. 6)."""
    return {name: (w.detach() * grads[name]).abs() for name, w in weights.items()}


def grasp_scores(
    model: nn.Module, params: Mapping[str, torch.Tensor], batches: Batches, global_batch: int,
    reduce_sum: ReduceSum = _identity, temperature: float = GRASP_TEMPERATURE,
) -> dict[str, torch.Tensor]:
    """w * Hg, larger kept (Wang et al. 2020, arXiv 2002.07376; alecwangcq/GraSP pruner/GraSP.py).

    GraSP removes the largest -w * Hg, i.e. keeps the largest w * Hg. g is the mean gradient of
    the global batches, H the Hessian of the same loss; both use logits / temperature. Under a
    process group g is all-reduced before the Hessian-vector product, which is then summed too.
    The reference draws a class-balanced sample; here the batches are the training loader's.
    """
    batches = list(batches)
    names, weights = list(params), list(params.values())
    g = mean_gradients(model, params, batches, global_batch, reduce_sum, temperature)
    hg = [torch.zeros_like(w) for w in weights]
    for x, y in batches:
        loss = _global_batch_loss(model, x, y, global_batch, temperature)
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        z = sum((g[n] * grad).sum() for n, grad in zip(names, grads))
        for acc, part in zip(hg, torch.autograd.grad(z, weights)):
            acc += part
    hg = _reduce_all(hg, reduce_sum)
    return {n: w.detach() * h / len(batches) for n, w, h in zip(names, weights, hg)}


def synflow_scores(model: nn.Module, params: Mapping[str, torch.Tensor],
                   input_shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """|w * dR/dw| with R = sum(f_|theta|(1)): SynFlow (Tanaka et al. 2020, arXiv 2006.05467).

    As ganguli-lab/Synaptic-Flow `Pruners.py::SynFlow.score`: every parameter and buffer is
    replaced by its absolute value, the input is a single all-ones sample, the model is in eval
    mode. Data-free. `model` must be a throwaway copy (its state is made non-negative); computing
    it in float64 keeps R finite on deep networks where float32 overflows.
    """
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.abs_()
    model.eval()
    weights = list(params.values())
    first = weights[0]
    ones = torch.ones((1, *input_shape), dtype=first.dtype, device=first.device)
    grads = torch.autograd.grad(model(ones).sum(), weights)
    return {n: (w.detach() * g).abs() for n, w, g in zip(params, weights, grads)}
