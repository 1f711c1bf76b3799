"""Gradual magnitude pruning (GMP) and GraNet (GMP plus zero-cost neuroregeneration).

GMP: Zhu & Gupta, "To prune, or not to prune", arXiv 1710.01878 (cubic schedule).
GraNet: Liu et al., "Sparse Training via Boosting Pruning Plasticity with Neuroregeneration",
arXiv 2106.10404; reference Shiweiliuiiiiiii/GraNet `ImageNet/core.py` (`Masking.step`,
`pruning`, `truncate_weights`) and `ImageNet/funcs.py` (`magnitude_prune`, `gradient_growth`).
At each update step GraNet prunes globally by |w| to the cubic target, then per layer drops
ceil(rate * nnz) more by |w| and regrows as many by |dense gradient|, with the rate following
a cosine decay from 0.5 to 0.005 over training (its `CosineDecay`, the default
`method.drop_fraction_anneal=cosine`; `constant` keeps it at method.drop_fraction, as rigl's).
Deliberate differences:
- the reference prunes only while iter <= final_iter - 1, so the cubic target is never reached;
  here the first update step at or after prune_end reaches the target exactly;
- the reference keeps |w| > threshold, so ties make the count inexact; here counts are exact;
- epochs are converted to steps once, from the global batch (the reference divides by the world
  size in one place and not in another) and the initial mask does not depend on the rank.
"""
from __future__ import annotations

import math

from distsparse.errors import ConfigError
from distsparse.methods.base import Masks, SparsityMethod, register
from distsparse.sparsity.allocation import active_count, layer_densities
from distsparse.sparsity.schedules import cosine_decay, cubic_sparsity, is_update_step
from distsparse.sparsity.scores import gradient_scores, magnitude_scores

__all__ = ["GMP", "GraNet", "GraNetST"]

GRANET_MIN_PRUNE_RATE = 0.005
"""GraNet `CosineDecay(..., eta_min=0.005)` of the regrowth rate."""


@register("gmp")
class GMP(SparsityMethod):
    """Gradual magnitude pruning from init_density to the target on the cubic schedule."""

    defaults = {"init_density": 1.0}

    def __init__(self, config, schedule, seed) -> None:
        super().__init__(config, schedule, seed)
        self.prune_begin = schedule.step_at(config.prune_start)
        self.prune_finish = schedule.step_at(config.prune_end)
        interval = config.update_interval
        last_update = -(-max(self.prune_finish, 1) // interval) * interval
        if last_update >= schedule.total_steps:
            raise ConfigError(
                f"config key 'method.prune_end' = {config.prune_end}: no mask update "
                f"(every method.update_interval={interval} steps) falls between step "
                f"{self.prune_finish} and the end of training ({schedule.total_steps} steps)"
            )
        if config.init_density < 1.0 - config.sparsity:
            raise ConfigError(
                f"config key 'method.init_density' = {config.init_density}: expected at least "
                f"the final density {1.0 - config.sparsity:.6g}"
            )

    def initial_density(self) -> float:
        return self.config.init_density

    def is_update_step(self, step: int) -> bool:
        return is_update_step(step, self.config.update_interval, self.prune_begin, self.schedule.total_steps)

    def target_sparsity(self, step: int) -> float:
        """The cubic schedule's overall sparsity at a step (reaches the target at prune_end)."""
        span = self.prune_finish - self.prune_begin
        progress = (step - self.prune_begin) / span if span > 0 else 1.0
        return cubic_sparsity(progress, 1.0 - self.config.init_density, self.config.sparsity)

    def prune(self, step: int, masks, weights) -> Masks:
        """Magnitude pruning to the schedule's target, globally or layer by layer."""
        scores = magnitude_scores(weights)
        sparsity = self.target_sparsity(step)
        layout = self.selection(masks)
        active = layout.active_counts(masks)
        if self.config.prune_scope == "global":
            total = sum(layout.numel(name) for name in masks)
            keep = active_count(total, 1.0 - sparsity)
            if keep >= sum(active.values()):
                return {}
            return layout.global_topk(scores, keep, eligible=masks)
        return self._prune_layerwise(step, masks, scores, active)

    def _prune_layerwise(self, step, masks, scores, active) -> Masks:
        layout = self.selection(masks)
        shapes = {name: layout.shapes[name] for name in masks}
        final = layer_densities(self.config.distribution, shapes, 1.0 - self.config.sparsity)
        initial = layer_densities(self.config.distribution, shapes, self.config.init_density) \
            if self.config.init_density < 1.0 else dict.fromkeys(shapes, 1.0)
        span = self.prune_finish - self.prune_begin
        progress = (step - self.prune_begin) / span if span > 0 else 1.0
        keep = {}
        for name in masks:
            layer_sparsity = cubic_sparsity(progress, 1.0 - initial[name], 1.0 - final[name])
            count = active_count(layout.numel(name), 1.0 - layer_sparsity)
            if count < active[name]:
                keep[name] = count
        return layout.topk_per_layer(scores, keep, eligible=masks) if keep else {}

    def update(self, step, masks, weights, grads) -> Masks:
        return self.prune(step, masks, weights)


@register("granet")
class GraNet(GMP):
    """GraNet: GMP plus per-layer prune-and-regrow by gradient until update_end."""

    defaults = {**GMP.defaults, "drop_fraction": 0.5, "update_end": 1.0}

    def needs_dense_grad(self, step: int) -> bool:
        return self.is_update_step(step) and self.config.growth == "gradient"

    def regrowth_rate(self, step: int) -> float:
        """GraNet's prune rate: by default (`method.drop_fraction_anneal=cosine`) its
        `CosineDecay` over all of training from drop_fraction to 0.005; constant: drop_fraction."""
        if self.config.drop_fraction_anneal == "constant":
            return self.config.drop_fraction
        return cosine_decay(step, self.schedule.total_steps, self.config.drop_fraction,
                            GRANET_MIN_PRUNE_RATE)

    def update(self, step, masks, weights, grads) -> Masks:
        pruned = {**masks, **self.prune(step, masks, weights)}
        if step > self.schedule.step_at(self.config.update_end):
            return pruned
        rate = self.regrowth_rate(step)
        # GraNet funcs.magnitude_prune: num_remove = ceil(prune_rate * num_nonzero).
        active = self.selection(pruned).active_counts(pruned)
        counts = {name: math.ceil(rate * active[name]) for name in pruned}
        drop = magnitude_scores(weights)
        grow = (
            gradient_scores({name: grads[name] for name in pruned})
            if self.config.growth == "gradient"
            else self.random_grow_scores(step, pruned)
        )
        return {**pruned, **self.swap_step(pruned, drop, grow, counts, active)}


@register("granet_st")
class GraNetST(GraNet):
    """GraNet sparse-to-sparse: starts from an ERK mask at init_density 0.5 (GraNet README)."""

    defaults = {**GraNet.defaults, "init_density": 0.5}
