"""The interface every sparsity method implements, its registry, and the shared update steps.

A method is scores plus a schedule: it says when the mask changes and returns the new masks from
weights and (dense, all-reduced) gradients. It never touches optimizers, backends or launchers;
the trainer applies the masks it returns to every copy of every weight.

Masks, weights and gradients come in the layout of the pieces this rank owns (full tensors, or
ZeRO-3's 1-D pieces); scores are element-wise, and every step that depends on where elements live
(counts, top-k, drop-and-grow, random scores by global index, full shapes) goes through `layout`,
so the same method code runs on either.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from distsparse.config import MethodConfig
from distsparse.errors import ConfigError
from distsparse.methods.init_masks import InitContext, initial_masks
from distsparse.sparsity.layout import FullLayout, full_layout_of

__all__ = [
    "METHODS",
    "SparsityMethod",
    "TrainingSchedule",
    "build_method",
    "register",
    "resolve_method_config",
]

Masks = dict[str, torch.Tensor]
METHODS: dict[str, type["SparsityMethod"]] = {}


def register(name: str):
    """Class decorator: make a method available as `method.name=<name>`."""

    def wrap(cls: type[SparsityMethod]) -> type[SparsityMethod]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap


@dataclass(frozen=True)
class TrainingSchedule:
    """Length of training in optimizer steps of the GLOBAL batch (the same on 1 or N workers)."""

    total_steps: int
    steps_per_epoch: int

    def step_at(self, fraction: float) -> int:
        """The step a fraction of training falls on."""
        return round(fraction * self.total_steps)


class SparsityMethod:
    """Base class: a static mask chosen by `method.init` (random by the layer distribution)."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    uses_masks: ClassVar[bool] = True
    update_replaces_optimizer_step: ClassVar[bool] = False
    """True where the optimizer step is skipped on mask-update steps (rigl's reference does so)."""

    def __init__(self, config: MethodConfig, schedule: TrainingSchedule, seed: int) -> None:
        self.config = config
        self.schedule = schedule
        self.seed = seed
        self.layout: FullLayout | None = None
        """Where mask elements live, set by the trainer; None: full tensors shaped as the masks."""

    def selection(self, masks: Mapping[str, torch.Tensor]) -> FullLayout:
        """The layout updates select through: the trainer's, else full tensors of `masks`."""
        return self.layout if self.layout is not None else full_layout_of(masks)

    def initial_density(self) -> float:
        """Overall density of the initial mask."""
        return 1.0 - self.config.sparsity

    def initial_masks(
        self, shapes: Mapping[str, tuple[int, ...]], context: InitContext | None = None
    ) -> Masks:
        """The mask at step 0 by `method.init` with exact counts; never depends on the rank.

        Full-shape masks computed alike on every rank (pruning-at-init scores included), which a
        sharded layout then slices to the pieces each rank owns; only updates avoid full tensors.
        """
        density = self.initial_density()
        if density >= 1.0:
            return {name: torch.ones(shape, dtype=torch.bool) for name, shape in shapes.items()}
        return initial_masks(self.config, shapes, density, self.seed, context)

    def is_update_step(self, step: int) -> bool:
        """Whether the mask changes at this step."""
        return False

    def needs_dense_grad(self, step: int) -> bool:
        """Whether `update` at this step reads dense gradients (RigL/GraNet growth)."""
        return False

    def update(
        self, step: int, masks: Mapping[str, torch.Tensor], weights: Mapping[str, torch.Tensor],
        grads: Mapping[str, torch.Tensor] | None,
    ) -> Masks:
        """New masks for the layers that change at this step."""
        return {}

    def prepare(self, step: int, masks: Mapping[str, torch.Tensor],
                weights: Mapping[str, torch.Tensor]) -> None:
        """Ready the layout for the first update from `step` on, with the masks and weights of
        the first step a run takes once started or resumed (nothing by default)."""

    def state_dict(self) -> dict[str, Any]:
        """Method state for checkpoints (the built-in methods are stateless functions of step)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore method state from a checkpoint."""

    def swap_step(
        self, masks: Mapping[str, torch.Tensor], drop_scores: Mapping[str, torch.Tensor],
        grow_scores: Mapping[str, torch.Tensor], counts: Mapping[str, int],
        active: Mapping[str, int] | None = None,
    ) -> Masks:
        """Per layer: drop `counts[name]` active entries by drop score and regrow as many by grow
        score; `active`, the layout's active counts of `masks` where known, is not counted again."""
        return self.selection(masks).drop_and_grow(
            masks, drop_scores, grow_scores, {name: counts[name] for name in masks}, active)

    def random_grow_scores(self, step: int, masks: Mapping[str, torch.Tensor]) -> Masks:
        """Counter-based random scores keyed by (seed, step, layer, global element index)."""
        device = next(iter(masks.values())).device if masks else "cpu"
        return self.selection(masks).random_scores(self.seed, step, "grow", list(masks), device)


def resolve_method_config(config: MethodConfig) -> MethodConfig:
    """A copy with every None field set to the named method's default."""
    if config.name not in METHODS:
        raise ConfigError(
            f"config key 'method.name' = {config.name!r}: expected one of {', '.join(sorted(METHODS))}"
        )
    defaults = {"init": "random", **METHODS[config.name].defaults}
    own_init = METHODS[config.name].defaults.get("init")
    if own_init is not None and config.init not in (None, own_init):
        raise ConfigError(
            f"config key 'method.init' = {config.init!r}: method.name={config.name!r} chooses its "
            f"mask by {own_init}; use method.name=static method.init={config.init} instead"
        )
    filled = {key: value for key, value in defaults.items() if getattr(config, key) is None}
    return dataclasses.replace(config, **filled)


def build_method(config: MethodConfig, schedule: TrainingSchedule, seed: int) -> SparsityMethod:
    """The registered method for `config.name`, with its defaults filled in."""
    resolved = resolve_method_config(config)
    return METHODS[resolved.name](resolved, schedule, seed)
