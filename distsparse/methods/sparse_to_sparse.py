"""Sparse-to-sparse training at constant density: static sparse, SET and RigL.

RigL: Evci et al., "Rigging the Lottery", arXiv 1911.11134; reference google-research/rigl
`rigl/sparse_optimizers_base.py` (`_get_update_op`, `is_mask_update_iter`, `get_drop_fraction`)
and `rigl/sparse_optimizers.py`. SET: Mocanu et al. 2018, as in the same file (SparseSETOptimizer).
As there, SET takes the optimizer step and then drops and grows (`SparseSETOptimizerBase.
apply_gradients`), while RigL's mask update replaces the step (`SparseRigLOptimizerBase.
apply_gradients`).
Deliberate differences from the reference, each pinned by a test:
- ties in drop/grow scores are broken by global element index instead of rigl's N(0, 1e-5) noise
  on the drop score, so every rank and world size selects the same mask;
- SET's random growth draws from a counter-based generator keyed by (seed, step, layer, element).
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from distsparse.methods.base import Masks, SparsityMethod, register
from distsparse.sparsity.schedules import cosine_decay, is_update_step
from distsparse.sparsity.scores import gradient_scores, magnitude_scores

__all__ = ["RigL", "SET", "StaticSparse"]


@register("static")
class StaticSparse(SparsityMethod):
    """A fixed random mask at the target density, layer-wise by `method.distribution` (ERK)."""


class _DropAndGrow(SparsityMethod):
    """Every update_interval steps until update_end: drop the smallest |w|, regrow as many."""

    defaults = {"drop_fraction": 0.3, "update_end": 0.75}

    def end_step(self) -> int:
        """Last step at which the mask may change."""
        return self.schedule.step_at(self.config.update_end)

    def is_update_step(self, step: int) -> bool:
        return is_update_step(step, self.config.update_interval, 0, self.end_step())

    def drop_fraction(self, step: int) -> float:
        """rigl's constant or cosine drop fraction (cosine decays to 0 at update_end)."""
        if self.config.drop_fraction_anneal == "constant":
            return self.config.drop_fraction
        return cosine_decay(step, self.end_step(), self.config.drop_fraction)

    def grow_scores(self, step: int, masks: Mapping[str, torch.Tensor],
                    grads: Mapping[str, torch.Tensor] | None) -> Masks:
        """Scores of inactive connections; higher grows first."""
        raise NotImplementedError

    def prepare(self, step, masks, weights) -> None:
        """The layout expects the first drop from `step` on (`expect_drop`)."""
        upcoming = [later for later in range(step, step + self.config.update_interval + 1)
                    if self.is_update_step(later)]
        if upcoming:
            self.selection(masks).expect_drop(magnitude_scores(weights), masks,
                                              1 - self.drop_fraction(upcoming[0]))

    def update(self, step, masks, weights, grads) -> Masks:
        fraction = self.drop_fraction(step)
        # rigl: n_prune = int(n_ones * drop_fraction), per layer.
        active = self.selection(masks).active_counts(masks)
        counts = {name: math.floor(active[name] * fraction) for name in masks}
        drop = magnitude_scores(weights)
        return self.swap_step(masks, drop, self.grow_scores(step, masks, grads), counts, active)


@register("set")
class SET(_DropAndGrow):
    """SET: after the optimizer step, drop by magnitude and grow at random."""

    def grow_scores(self, step, masks, grads) -> Masks:
        return self.random_grow_scores(step, masks)


@register("rigl")
class RigL(_DropAndGrow):
    """RigL: drop by magnitude, grow by the magnitude of the dense (all-reduced) gradient; the
    update takes the place of the optimizer step."""

    update_replaces_optimizer_step = True

    def needs_dense_grad(self, step: int) -> bool:
        return self.is_update_step(step)

    def grow_scores(self, step, masks, grads) -> Masks:
        return gradient_scores({name: grads[name] for name in masks})
