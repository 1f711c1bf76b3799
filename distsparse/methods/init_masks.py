"""Initial masks: random by layer distribution, or chosen by a pruning-at-initialization criterion.

Every criterion is usable as the mask of a static sparse run (`method.name=snip`, ...) or as the
starting mask of any masked method (`method.init=force` for RigL, GraNet-ST, ...).

- SNIP: Lee et al. 2019, arXiv 1810.02340 — one shot, |w * dL/dw|.
- GraSP: Wang et al. 2020, arXiv 2002.07376; alecwangcq/GraSP `pruner/GraSP.py` — one shot, w * Hg,
  scored (as its default `reinit=True`) on a copy whose nn.Linear weights are redrawn
  xavier-normal; `method.grasp_reinit=false` scores the model's own initialization.
- SynFlow: Tanaka et al. 2020, arXiv 2006.05467; ganguli-lab/Synaptic-Flow `Pruners.py`,
  `prune.py::prune_loop` — data-free, iterative with an exponential schedule, pruned weights stay
  pruned.
- Iterative SNIP and FORCE: de Jorge et al. 2021, arXiv 2006.09081; naver/force
  `pruning/pruning_algos.py::iterative_pruning` — exponential schedule, saliency |w0 * g| with the
  gradient taken at the current sparse network; Iter-SNIP never re-selects a pruned weight, FORCE
  scores every weight with its original value, so pruned weights can come back.

Deliberate differences from the references:
- the loss is cross-entropy on logits; naver/force applies `F.nll_loss` to raw logits
  (i.e. -logit[y]) although its models output logits;
- gradients average the first `method.pai_batches` GLOBAL batches of epoch 0, each rank summing its
  share and all-reducing, so every rank (and every world size) scores the same batches; the
  references draw `next(iter(loader))` from a shuffled loader on one process;
- every selection keeps exactly the target count (ties to the lower global index); the references
  keep every score >= the k-th, which can keep more on ties;
- SynFlow runs on a float64 copy of the model;
- GraSP's xavier-normal redraw comes from a CPU generator per layer seeded by (seed, layer name)
  (`reinit_linear_xavier`), so every rank and world size scores the same weights; the reference
  draws from the global RNG.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from distsparse.config import INIT_CRITERIA, MethodConfig
from distsparse.sparsity.allocation import active_count, layer_densities
from distsparse.sparsity.counter_rng import stream_key
from distsparse.sparsity.masks import sparsifiable_parameters
from distsparse.sparsity.schedules import iterative_densities
from distsparse.sparsity.scores import (
    grasp_scores,
    magnitude_scores,
    mean_gradients,
    random_scores,
    snip_scores,
    synflow_scores,
)
from distsparse.sparsity.select import global_topk_masks, topk_masks

__all__ = ["DEFAULT_ITERATIONS", "INIT_CRITERIA", "InitContext", "initial_masks",
           "reinit_linear_xavier"]

Masks = dict[str, torch.Tensor]

DEFAULT_ITERATIONS = {"synflow": 100, "iter_snip": 60, "force": 60}
"""SynFlow's paper uses 100 iterations; FORCE's README runs Iter-SNIP and FORCE with 60 steps."""


@dataclass
class InitContext:
    """What data-dependent criteria need from the trainer; the model itself is never modified."""

    model: nn.Module
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    """This rank's part of the scoring batches, on the model's device and dtype."""
    global_batch: int
    input_shape: tuple[int, ...]
    reduce_sum: Callable[[torch.Tensor], torch.Tensor]
    progress: bool = False


def initial_masks(
    config: MethodConfig, shapes: Mapping[str, tuple[int, ...]], density: float, seed: int,
    context: InitContext | None = None,
) -> Masks:
    """Masks at overall `density` by `config.init`; all criteria but random need a context."""
    criterion = config.init or "random"
    if criterion == "random":
        densities = layer_densities(config.distribution, shapes, density)
        names = list(shapes)
        masks = topk_masks([random_scores(shapes[name], seed, 0, name, "init") for name in names],
                           [active_count(math.prod(shapes[name]), densities[name]) for name in names])
        return dict(zip(names, masks))
    if context is None:
        raise ValueError(f"method.init={criterion!r} needs the model and training batches")
    work = copy.deepcopy(context.model)
    params = sparsifiable_parameters(work, config.dense_first_layer, config.dense_last_layer,
                                     config.include, config.exclude)
    if list(params) != list(shapes):
        raise ValueError("the model's sparsifiable layers do not match the masks")
    original = {name: p.detach().clone() for name, p in params.items()}
    work.train()
    if criterion == "magnitude":
        return _select(magnitude_scores(original), density, config)
    if criterion == "snip":
        return _select(snip_scores(original, _gradients(work, params, context)), density, config)
    if criterion == "grasp":
        if config.grasp_reinit:
            reinit_linear_xavier(work, seed)
        scores = grasp_scores(work, params, list(context.batches()), context.global_batch,
                              context.reduce_sum)
        return _select(scores, density, config)
    iterations = config.pai_iterations or DEFAULT_ITERATIONS[criterion]
    steps = iterative_densities(density, iterations, config.pai_schedule)
    masks: Masks | None = None
    for step_density in tqdm(steps, desc=f"{criterion} pruning", unit="iter",
                             disable=not context.progress):
        _set_masked(params, original, masks)
        if criterion == "synflow":
            scores = _synflow(work, config, context)
        else:
            scores = snip_scores(original, _gradients(work, params, context))
        eligible = None if criterion == "force" else masks
        masks = _select(scores, step_density, config, eligible)
    return masks


@torch.no_grad()
def reinit_linear_xavier(model: nn.Module, seed: int) -> None:
    """Redraw every nn.Linear weight of `model` (a throwaway copy) xavier-normal in place.

    As alecwangcq/GraSP `pruner/GraSP.py` with `reinit=True` (`nn.init.xavier_normal`); each
    layer's draw comes from a CPU generator seeded by `stream_key(seed, 0, name, "grasp_reinit")`,
    so it is the same on every rank, world size and device and the global RNG is untouched.
    """
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            name = f"{module_name}.weight" if module_name else "weight"
            generator = torch.Generator().manual_seed(stream_key(seed, 0, name, "grasp_reinit"))
            draw = torch.empty(module.weight.shape, dtype=module.weight.dtype)
            module.weight.copy_(nn.init.xavier_normal_(draw, generator=generator))


def _gradients(model: nn.Module, params: Mapping[str, torch.Tensor], context: InitContext) -> Masks:
    return mean_gradients(model, params, context.batches(), context.global_batch, context.reduce_sum)


def _synflow(model: nn.Module, config: MethodConfig, context: InitContext) -> Masks:
    """SynFlow scores of the current (masked) weights on a float64 copy."""
    linear = copy.deepcopy(model).double()
    params = sparsifiable_parameters(linear, config.dense_first_layer, config.dense_last_layer,
                                     config.include, config.exclude)
    return synflow_scores(linear, params, context.input_shape)


@torch.no_grad()
def _set_masked(params: Mapping[str, torch.Tensor], original: Masks, masks: Masks | None) -> None:
    """Weights of the working copy := original weights times the current mask (dense if none)."""
    for name, param in params.items():
        param.copy_(original[name] if masks is None else original[name] * masks[name])


def _select(scores: Masks, density: float, config: MethodConfig, eligible: Masks | None = None) -> Masks:
    """Keep the highest scores: globally (the references' scope) or per layer by distribution,
    every layer's selection batched into one host read."""
    shapes = {name: tuple(s.shape) for name, s in scores.items()}
    if config.prune_scope == "global":
        total = sum(math.prod(shape) for shape in shapes.values())
        return global_topk_masks(scores, active_count(total, density), eligible)
    densities = layer_densities(config.distribution, shapes, density)
    names = list(scores)
    masks = topk_masks([scores[name] for name in names],
                       [active_count(scores[name].numel(), densities[name]) for name in names],
                       None if eligible is None else [eligible[name] for name in names])
    return dict(zip(names, masks))
