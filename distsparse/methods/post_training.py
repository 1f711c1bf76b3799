"""Post-training sparsity: one-shot magnitude masks and the pieces of UniPTS.

UniPTS: "Towards Unified Post-Training Sparsity", arXiv 2405.18810; reference github
xjjxmu/UniPTS, `main.py` (`DistillKL`, `get_sparisity`, `genetic_algorithm`, `crossover`,
`mutation`) and `utils/conv_type.py` (`GetWeightSubnet`), settings from `configs/resnet50.yaml`.
Everything here is a pure function of weights, logits and a seed; the runner that loads a run,
draws the calibration set, trains and writes the run directory is `distsparse.engine.post_training`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from distsparse.sparsity.allocation import active_count, layer_densities
from distsparse.sparsity.scores import magnitude_scores
from distsparse.sparsity.select import global_topk_masks, topk_mask, topk_masks

__all__ = [
    "ONESHOT_DISTRIBUTIONS",
    "STE_DECAY",
    "SearchResult",
    "SearchSettings",
    "distillation_loss",
    "kd_temperature",
    "layer_topk_masks",
    "oneshot_masks",
    "regrow_layer_counts",
    "round_to_total",
    "search_layer_counts",
    "ste_sparse_weight",
]

ONESHOT_DISTRIBUTIONS: tuple[str, ...] = ("global", "uniform", "erk")
STE_DECAY = 5e-5
"""Decay on pruned weights in the STE gradient (reference `GetWeightSubnet.forward`, decay=0.00005)."""


def layer_topk_masks(
    weights: Mapping[str, torch.Tensor], counts: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """Per layer, keep the `counts[name]` largest |w| (ties to the lower flat index); one host read."""
    names = list(weights)
    scores = magnitude_scores(weights)
    masks = topk_masks([scores[name] for name in names], [counts[name] for name in names])
    return dict(zip(names, masks))


def oneshot_masks(
    weights: Mapping[str, torch.Tensor], sparsity: float, distribution: str = "global"
) -> dict[str, torch.Tensor]:
    """One-shot magnitude pruning: a global top-|w|, or per layer by uniform / ERK densities.

    `global` keeps exactly N - floor(sparsity * N) (rigl's count) weights over all N; `uniform` and `erk` keep
    `active_count(numel, density)` per layer, rigl's integer budget (the counts a trained static or
    RigL mask of that distribution has), whose sum may differ from the global count by less than
    one weight per layer.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if distribution == "global":
        total = sum(w.numel() for w in weights.values())
        scores = magnitude_scores(weights)
        return global_topk_masks(scores, active_count(total, 1.0 - sparsity))
    if distribution not in ONESHOT_DISTRIBUTIONS:
        raise ValueError(
            f"unknown distribution {distribution!r}; expected one of {', '.join(ONESHOT_DISTRIBUTIONS)}"
        )
    shapes = {name: tuple(w.shape) for name, w in weights.items()}
    densities = layer_densities(distribution, shapes, 1.0 - sparsity)
    counts = {name: active_count(w.numel(), densities[name]) for name, w in weights.items()}
    return layer_topk_masks(weights, counts)


def round_to_total(targets: Sequence[float], caps: Sequence[int], total: int) -> list[int]:
    """Integers in [0, cap] near the real `targets` that sum to `total` exactly (largest remainder).

    Floors first, then adds one to the layers with the largest fractional parts (or removes one
    from those with the smallest), ties to the lower layer index, until the sum is `total`.
    """
    if not 0 <= total <= sum(caps):
        raise ValueError(f"cannot place {total} active weights in layers of {sum(caps)}")
    counts = [min(max(math.floor(t), 0), cap) for t, cap in zip(targets, caps)]
    fractions = [t - math.floor(t) for t in targets]
    while sum(counts) != total:
        grow = sum(counts) < total
        order = sorted(range(len(counts)), key=lambda i: (-fractions[i] if grow else fractions[i], i))
        for i in order:
            if sum(counts) == total:
                break
            if grow and counts[i] < caps[i]:
                counts[i] += 1
            elif not grow and counts[i] > 0:
                counts[i] -= 1
    return counts


def regrow_layer_counts(
    logits: torch.Tensor, numels: Sequence[int], sparsity: float, margin: float = 0.05
) -> list[int]:
    """Reduce-regrow allocation (reference `get_sparisity`): active weights per layer, exact total.

    The reference sets layer sparsity max(0, P + margin - margin * N * softmax(v)_l / n_l): every
    layer is reduced to sparsity P + margin, then margin * N weights are regrown in proportion to
    softmax(v). Unclamped, the total is exactly (1 - P) * N; where a layer would regrow past dense
    (or, for P + margin > 1, fall below empty) the reference loses that budget. Here the clamped
    density targets get one uniform density shift, found by bisection, so they sum to
    N - floor(P * N) (rigl's count), then `round_to_total` makes the integer counts sum to it exactly.
    """
    n = torch.tensor([float(x) for x in numels], dtype=torch.float64)
    share = torch.softmax(logits.to(torch.float64), dim=0)
    base = n * (1.0 - sparsity - margin) + margin * n.sum() * share
    total = active_count(int(n.sum()), 1.0 - sparsity)
    low, high = float((-base / n).min()), float(((n - base) / n).max())
    for _ in range(200):
        shift = 0.5 * (low + high)
        placed = float(torch.minimum(torch.clamp(base + shift * n, min=0.0), n).sum())
        if placed < total:
            low = shift
        else:
            high = shift
    targets = torch.minimum(torch.clamp(base + high * n, min=0.0), n)
    return round_to_total(targets.tolist(), [int(x) for x in numels], total)


@dataclass(frozen=True)
class SearchSettings:
    """The evolutionary search of layer-wise sparsity (reference `genetic_algorithm`).

    The reference runs population 25, 25 generations, 10 parents, mutation rate 0.1, crossover
    rate 1 and a 5 % regrow margin; the defaults here are small enough for Fashion-MNIST in seconds.
    """

    population: int = 8
    generations: int = 4
    parents: int = 4
    mutation_rate: float = 0.1
    crossover_rate: float = 1.0
    margin: float = 0.05

    def check(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        if self.population < 2:
            raise ValueError(f"population must be at least 2, got {self.population}")
        if self.generations < 0:
            raise ValueError(f"generations must be at least 0, got {self.generations}")
        if not 2 <= self.parents <= self.population:
            raise ValueError(f"parents must be in [2, population={self.population}], got {self.parents}")
        for name in ("mutation_rate", "crossover_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.0 < self.margin <= 1.0:
            raise ValueError(f"margin must be in (0, 1], got {self.margin}")


@dataclass
class SearchResult:
    """The best allocation found: active weights per layer, its logits and calibration fitness."""

    counts: dict[str, int]
    logits: list[float]
    fitness: float
    evaluations: int
    history: list[dict[str, float]] = field(default_factory=list)


def _crossover(
    parents: torch.Tensor, constant: torch.Tensor, size: int, rate: float, generator: torch.Generator
) -> list[torch.Tensor]:
    """Reference `crossover`: the constant vector, then uniform crossovers of two distinct parents."""
    children = [constant.clone()]
    while len(children) < size:
        first, second = torch.randperm(len(parents), generator=generator)[:2].tolist()
        if float(torch.rand((), generator=generator, dtype=torch.float64)) < rate:
            pick = torch.randint(0, 2, constant.shape, generator=generator).to(torch.float64)
            children.append(parents[first] * pick + parents[second] * (1.0 - pick))
        else:
            children.append(parents[first].clone())
    return children


def _mutation(
    parents: torch.Tensor, size: int, rate: float, generator: torch.Generator
) -> list[torch.Tensor]:
    """Reference `mutation`: a gene mutates with probability `rate` to gene * (1 + N(0, 1))."""
    chosen = parents[torch.randint(0, len(parents), (size,), generator=generator)]
    mutate = torch.rand(chosen.shape, generator=generator, dtype=torch.float64) < rate
    noise = torch.randn(chosen.shape, generator=generator, dtype=torch.float64)
    return list(torch.where(mutate, (1.0 + noise) * chosen, chosen))


def search_layer_counts(
    numels: Mapping[str, int],
    sparsity: float,
    fitness: Callable[[dict[str, int]], float],
    settings: SearchSettings = SearchSettings(),
    seed: int = 0,
    on_generation: Callable[[int, list[float]], None] | None = None,
) -> SearchResult:
    """UniPTS's reducing-regrowing search of layer-wise sparsity as the reference's genetic algorithm.

    A candidate is a logit vector v; its allocation is `regrow_layer_counts(v)`; `fitness` (the
    reference: calibration top-1 after BN recalibration) scores it. Population 0 is the constant
    vector P (uniform softmax) and `population - 1` uniform [0, 1) vectors; each generation keeps
    the `parents` fittest, breeds population // 2 crossover children (the first is the constant
    vector again) and population // 2 mutants, and fills up with new random vectors. Differences
    from the reference: randomness comes from one seeded torch.Generator (deterministic); the random
    fill-up is kept (the reference overwrites it); allocations are exact (`regrow_layer_counts`)
    and evaluated once each (cached); the best candidate over all generations is returned (the
    reference re-evaluates the last population only).
    """
    settings.check()
    names, sizes = list(numels), [int(numels[n]) for n in numels]
    generator = torch.Generator().manual_seed(seed)
    constant = torch.full((len(names),), float(sparsity), dtype=torch.float64)

    def random_vectors(count: int) -> list[torch.Tensor]:
        return list(torch.rand((count, len(names)), generator=generator, dtype=torch.float64))

    cache: dict[tuple[int, ...], float] = {}

    def score(vector: torch.Tensor) -> float:
        counts = tuple(regrow_layer_counts(vector, sizes, sparsity, settings.margin))
        if counts not in cache:
            cache[counts] = float(fitness(dict(zip(names, counts))))
        return cache[counts]

    population = [constant.clone(), *random_vectors(settings.population - 1)]
    best_vector, best_fitness, history = population[0], -math.inf, []
    for generation in range(settings.generations + 1):
        scores = [score(vector) for vector in population]
        for vector, value in zip(population, scores):
            if value > best_fitness:
                best_vector, best_fitness = vector, value
        history.append({"generation": generation, "best": max(scores),
                        "mean": sum(scores) / len(scores)})
        if on_generation is not None:
            on_generation(generation, scores)
        if generation == settings.generations:
            break
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        parents = torch.stack([population[i] for i in order[: settings.parents]])
        half = settings.population // 2
        population = [
            *_crossover(parents, constant, half, settings.crossover_rate, generator),
            *_mutation(parents, half, settings.mutation_rate, generator),
        ]
        population += random_vectors(settings.population - len(population))
    counts = regrow_layer_counts(best_vector, sizes, sparsity, settings.margin)
    return SearchResult(dict(zip(names, counts)), best_vector.tolist(), best_fitness, len(cache),
                        history)


def kd_temperature(epoch: int) -> float:
    """The decaying base of UniPTS's objective, tau_e = 8 * 0.99^epoch (reference `DistillKL`)."""
    return 8.0 * 0.99**epoch


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, epoch: int, temperature: float = 4.0
) -> torch.Tensor:
    """Base-decayed KD loss, as the reference's `DistillKL.forward` (main.py), T = 4 (`args.T`).

    KL_sum(softmax(y_t / T) || log_softmax(y_s) / tau_e) * T^2 / B: the student's log-probabilities
    are divided by tau_e (not its logits by T), as in the reference.
    """
    log_student = F.log_softmax(student_logits, dim=1) / kd_temperature(epoch)
    teacher = F.softmax(teacher_logits / temperature, dim=1)
    kl = F.kl_div(log_student, teacher, reduction="sum")
    return kl * temperature**2 / student_logits.shape[0]


class _MagnitudeSTE(torch.autograd.Function):
    """Reference `GetWeightSubnet`: forward w * top-|w| mask, backward g + decay * (1 - mask) * w."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, active: int, decay: float) -> torch.Tensor:
        mask = topk_mask(weight.detach().abs(), active)
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight.masked_fill(~mask, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight, mask = ctx.saved_tensors
        return grad + ctx.decay * (~mask).to(weight.dtype) * weight, None, None


def ste_sparse_weight(weight: torch.Tensor, active: int, decay: float = STE_DECAY) -> torch.Tensor:
    """The weight with all but its `active` largest |w| zeroed, through UniPTS's straight-through estimator.

    The mask is recomputed from the current weight at every call (dynamic sparse training). The
    gradient reaching `weight` is the masked weight's gradient, unmasked, plus decay * w at pruned
    positions (reference `utils/conv_type.py::GetWeightSubnet.backward`), so pruned weights keep
    learning and can regrow. Ties go to the lower flat index (the reference's sort leaves them open),
    and `active` is an exact count (the reference keeps numel - int(prune_rate * numel)).
    """
    return _MagnitudeSTE.apply(weight, active, decay)
