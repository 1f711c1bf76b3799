"""Sparsifier: any registered method applied to any model from the user's own training loop.

    sparsifier = Sparsifier(model, optimizer, method="rigl", sparsity=0.9, total_steps=10_000)
    for x, y in loader:
        loss_fn(model(x), y).backward()
        sparsifier.step()        # the optimizer step (skipped on RigL's update steps), every
        optimizer.zero_grad()    # copy masked, the mask updated on the method's schedule

The model may be a plain module, DistributedDataParallel, an FSDP2 module (`fully_shard`, the
optimizer built after it) or a DeepSpeed engine (ZeRO 0-3): the Sparsifier finds the parameter
access that fits it, and the user's loop does not change.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.profiler import record_function
from torch.nn.parallel import DistributedDataParallel

from distsparse.config import Config, MethodConfig, validate
from distsparse.distributed.mask_sync import verify_identical_masks
from distsparse.distributed.process_group import all_reduce
from distsparse.errors import ConfigError
from distsparse.methods import SparsityMethod, TrainingSchedule, build_method
from distsparse.methods.init_masks import InitContext
from distsparse.sparsifier.access import DDPAccess, ParameterAccess, PlainAccess
from distsparse.sparsifier.fsdp_access import FSDPAccess
from distsparse.sparsity.masks import MaskSet, sparsifiable_parameters

__all__ = ["MaskUpdate", "Sparsifier"]

Batches = Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
LOOKAHEAD = 256
"""Steps the schedule is read ahead: `Sparsifier.step` decides again only at the next update."""


@dataclasses.dataclass(frozen=True)
class MaskUpdate:
    """What the last mask update changed: its step, the layers with a new mask, its seconds."""

    step: int
    layers_changed: int
    seconds: float


class Sparsifier:
    """Masks, a sparsity method and the parameter access of whatever wraps the model.

    `method` is any method of `distsparse train` but `dense`; its config keys are keyword
    arguments (update_interval, drop_fraction, init, prune_scope, ...). `total_steps` counts
    optimizer steps of the global batch. Pruning-at-init criteria (`init=...`) score
    `init_batches()`, an iterable of (inputs, targets) on the model's device. A wrong name or
    value raises ConfigError naming the argument. `state`: a `state_dict()` to resume from; its
    masks replace the initial ones before any copy is masked. `masks`: full boolean masks of every
    masked weight to start from instead of the method's initial ones (e.g. `method="static"` to
    fine-tune a pruned network with its mask fixed).
    """

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
        method: str = "rigl", sparsity: float = 0.9, total_steps: int | None = None, *,
        seed: int = 0, sparse_gradients: bool = False, init_batches: Batches | None = None,
        global_batch: int | None = None, state: Mapping[str, Any] | None = None,
        masks: Mapping[str, torch.Tensor] | None = None, **options: Any,
    ) -> None:
        config = _method_config(method, sparsity, options)
        if total_steps is None or total_steps < 1:
            raise ConfigError(f"argument 'total_steps' = {total_steps!r}: expected the number of "
                              "optimizer steps of training, >= 1")
        schedule = TrainingSchedule(total_steps=total_steps, steps_per_epoch=total_steps)
        try:
            built = build_method(config, schedule, seed)
        except ConfigError as exc:
            raise ConfigError(_argument_message(str(exc))) from None
        access, module = _access_for(model, optimizer, sparse_gradients)
        context = None
        if init_batches is not None:
            sample = next(iter(init_batches()))[0]
            context = InitContext(module, init_batches, global_batch or len(sample),
                                  tuple(sample.shape[1:]), all_reduce)
        if state is not None and masks is not None:
            raise ConfigError("arguments 'state' and 'masks': give one (a state holds its masks)")
        argument = "state" if state is not None else "masks"
        try:
            self._setup(built, module, access, context,
                        state["masks"] if state is not None else masks, require_all=True)
            if state is not None:
                self.load_state_dict(state)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"argument '{argument}': {exc.args[0]}") from None

    @classmethod
    def from_method(cls, method: SparsityMethod, module: nn.Module, access: ParameterAccess,
                    masks: Mapping[str, torch.Tensor]) -> Sparsifier:
        """A Sparsifier over a built method, the access of the module's wrapper, and full masks
        to start from (the trainer computes them before wrapping, or resumes them)."""
        sparsifier = cls.__new__(cls)
        sparsifier._setup(method, module, access, None, masks)
        return sparsifier

    def _setup(self, method: SparsityMethod, module: nn.Module, access: ParameterAccess,
               context: InitContext | None, masks: Mapping[str, torch.Tensor] | None = None,
               require_all: bool = False) -> None:
        config = method.config
        try:
            params = sparsifiable_parameters(module, config.dense_first_layer,
                                             config.dense_last_layer, config.include, config.exclude)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if not params:
            raise ConfigError("the model has no parameter to mask (see include / exclude)")
        self.method, self.access, self._step = method, access, 0
        self.mask_set = MaskSet(params)
        access.bind(self.mask_set)
        if masks is None:
            try:
                masks = method.initial_masks(self.mask_set.shapes(), context)
            except ValueError as exc:
                raise ConfigError(f"argument 'init' = {config.init!r}: {exc}") from None
        elif require_all:
            missing = [name for name in params if name not in masks]
            if missing:
                raise KeyError(f"no mask for '{missing[0]}' (every masked weight needs one)")
        self.mask_set.update(masks)
        self.mask_set.use_layout(access.selection_layout(self.mask_set.shapes()))
        method.layout = self.mask_set.layout
        self.last_update: MaskUpdate | None = None
        self._pending_grads: dict[str, torch.Tensor] | None = None
        self.mask_all()
        self._check_identical()
        self._prepare_next_step()
        self._method_prepared = False

    @property
    def step_count(self) -> int:
        """Optimizer steps taken so far (the method's schedule position)."""
        return self._step

    @step_count.setter
    def step_count(self, step: int) -> None:
        self._step = step
        self._prepare_next_step()

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """The boolean mask of every masked weight, as this rank holds it (pieces under ZeRO-3)."""
        return self.mask_set.masks

    def density(self) -> float:
        """Fraction of active entries over all masked weights."""
        return self.mask_set.density()

    def layer_density(self) -> dict[str, float]:
        """Fraction of active entries of each masked weight."""
        return self.mask_set.layer_density()

    def fingerprint(self) -> str:
        """SHA-256 over layer names and mask bits (a collective where masks are pieces)."""
        return self.mask_set.fingerprint()

    def mask_all(self) -> None:
        """Zero masked-off entries of every copy of every masked weight."""
        if self.method.uses_masks:
            self.access.mask_all_copies(self.mask_set)

    def step(self, scaler: torch.amp.GradScaler | None = None) -> bool:
        """One optimizer step with masks; returns whether the optimizer updated the weights.

        Call after backward (on the last micro-batch when accumulating gradients), before
        zero_grad. RigL's update steps replace the optimizer step (as rigl does); every other
        method steps, then updates the mask. With a GradScaler the scaler steps and updates; a
        step it skips (inf/NaN gradients) changes neither masks nor the method's step count.
        """
        replaces = self._updates_next and self.method.update_replaces_optimizer_step
        if scaler is not None and scaler.is_enabled():
            return self._scaled_step(scaler, replaces)
        if self._grows_next:
            self.before_optimizer_step()
        if replaces:
            self.access.skip_step()
        else:
            self.access.step()
        self.after_optimizer_step()
        return not replaces

    def _scaled_step(self, scaler: torch.amp.GradScaler, replaces: bool) -> bool:
        """`step` through a GradScaler: unscale, step unless replaced, update the scale; a step
        whose scale dropped found inf/NaN gradients and counts as not taken."""
        scale = scaler.get_scale()
        scaler.unscale_(self.access.optimizer)
        self.before_optimizer_step()
        if not replaces:
            scaler.step(self.access.optimizer)
        scaler.update()  # the inf check of unscale_ is enough where no step is taken
        if scaler.get_scale() < scale:
            self.after_optimizer_step(skipped=True)
            return False
        self.after_optimizer_step()
        return not replaces

    def before_optimizer_step(self) -> None:
        """Read what this step's mask update needs before the optimizer step clears or changes
        it: the dense gradient (averaged over ranks) when the update grows by gradient.

        With `after_optimizer_step`, the entry point for loops whose optimizer step someone else
        takes (a Hugging Face Trainer): call it after backward and clipping, before that step.
        """
        self._pending_grads = self.access.grads() if self._grows_next else None

    def after_optimizer_step(self, skipped: bool = False) -> None:
        """After an optimizer step taken outside the Sparsifier: mask every copy, update the masks
        when the schedule says so (from the gradient `before_optimizer_step` read), count the step.

        The update follows the step for every method, RigL included (`step()` skips RigL's
        optimizer step instead). `skipped`: the step was not taken (a loss scaler found inf/NaN);
        masks and the step count stay as they are.
        """
        grads, self._pending_grads = self._pending_grads, None
        if skipped:
            return
        if self._updates_next and grads is None and self._grows_next:
            raise RuntimeError(f"step {self._step} grows by gradient: call "
                               "before_optimizer_step() before the optimizer step")
        self.mask_all()
        if not self._method_prepared:  # once a run or resume, from the masks and weights it has
            self.method.prepare(self._step, self.mask_set.masks, self.access.weights())
            self._method_prepared = True
        if self._updates_next:
            self._update_masks(self._step, grads)
        self._step += 1
        if self._step >= self._recheck_at:
            self._prepare_next_step()

    def _update_masks(self, step: int, grads: Mapping[str, torch.Tensor] | None) -> None:
        tick = time.perf_counter()
        with record_function("distsparse.method.update"):
            changed = self.method.update(step, self.mask_set.masks, self.access.weights(), grads)
        with record_function("distsparse.masks.update"):
            self.mask_set.update(changed)
        with record_function("distsparse.mask_all"):
            self.mask_all()
        with record_function("distsparse.check_identical"):
            self._check_identical(step)
        self.last_update = MaskUpdate(step, len(changed), time.perf_counter() - tick)

    def _check_identical(self, step: int | None = None) -> None:
        device = next(iter(self.mask_set.masks.values())).device
        verify_identical_masks(self.mask_set, device, self.step_count if step is None else step)

    def grows_by_gradient(self, step: int) -> bool:
        """Whether the mask update at `step` reads the dense gradient (RigL, GraNet growth)."""
        return self._updates_at(step) and self.method.needs_dense_grad(step)

    def _updates_at(self, step: int) -> bool:
        """Whether the masks change after optimizer step `step`."""
        return self.method.uses_masks and self.method.is_update_step(step)

    def _prepare_next_step(self) -> None:
        """Decide what the next step does (update the masks? from the dense gradient?), ask for
        dense gradients in its backward when it grows by gradient, and find the next step to
        decide again: after an update step the next one, else the next update within `LOOKAHEAD`
        steps (the schedule is a function of the step), so the steps between read no schedule."""
        step = self._step
        self._updates_next = self._updates_at(step)
        self._grows_next = self._updates_next and self.method.needs_dense_grad(step)
        self.access.set_dense_gradients(self._grows_next)
        self._recheck_at = step + 1
        while not self._updates_next and self._recheck_at < step + LOOKAHEAD \
                and not self._updates_at(self._recheck_at):
            self._recheck_at += 1

    def state_dict(self) -> dict[str, Any]:
        """Full masks, method state and step count (a collective where masks are pieces)."""
        return {"masks": self.mask_set.state_dict(), "method": self.method.state_dict(),
                "step": self.step_count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()` output and mask every copy with the loaded masks."""
        self.mask_set.load_state_dict(state["masks"])
        self.method.load_state_dict(state["method"])
        self.step_count = int(state["step"])
        self.mask_all()
        self._method_prepared = False

    def summary(self) -> str:
        """A table of every masked weight: shape, size, active entries and density."""
        counts = self.mask_set.active_counts()
        shapes = self.mask_set.shapes()
        width = max(len(name) for name in shapes)
        lines = [f"{'layer':<{width}}  {'shape':>18}  {'numel':>10}  {'active':>10}  density",
                 "-" * (width + 56)]
        for name, shape in shapes.items():
            numel = self.mask_set.layout.numel(name)
            lines.append(f"{name:<{width}}  {str(tuple(shape)):>18}  {numel:>10}  "
                         f"{counts[name]:>10}  {counts[name] / numel:.4f}")
        total = sum(self.mask_set.layout.numel(name) for name in shapes)
        lines.append(f"{'total':<{width}}  {'':>18}  {total:>10}  {sum(counts.values()):>10}  "
                     f"{self.density():.4f}")
        return (f"Sparsifier(method={self.method.name}, sparsity={self.method.config.sparsity}, "
                f"step={self.step_count})\n" + "\n".join(lines))

    __repr__ = summary


def _method_config(method: str, sparsity: float, options: Mapping[str, Any]) -> MethodConfig:
    """The method's config from keyword arguments, validated; ConfigError names the argument."""
    known = {f.name for f in dataclasses.fields(MethodConfig)} - {"name", "sparsity"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown argument '{unknown[0]}': expected one of "
                          f"{', '.join(sorted(known))}")
    if method == "dense":
        raise ConfigError("argument 'method' = 'dense': a dense run needs no Sparsifier")
    config = MethodConfig(name=method, sparsity=sparsity,
                          **{key: list(value) if key in ("include", "exclude") else value
                             for key, value in options.items()})
    try:
        validate(Config(method=config))
    except ConfigError as exc:
        raise ConfigError(_argument_message(str(exc))) from None
    return config


def _argument_message(message: str) -> str:
    """A config error about `method.<key>` worded for the API's keyword argument `<key>`."""
    return (message.replace("config key 'method.name'", "argument 'method'")
            .replace("config key 'method.", "argument '"))


def _access_for(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                sparse_gradients: bool) -> tuple[ParameterAccess, nn.Module]:
    """The parameter access that fits the model's wrapper, and the module it wraps."""
    if hasattr(model, "zero_optimization_stage"):  # a DeepSpeed engine, without importing it
        from distsparse.sparsifier.deepspeed_access import DeepSpeedAccess

        return DeepSpeedAccess(model), model.module
    if isinstance(model, FSDPModule):  # fully_shard applied (FSDP2): DTensor parameters
        return FSDPAccess(model, optimizer), model
    if optimizer is None:
        raise ConfigError("argument 'optimizer': expected the torch optimizer of the model")
    if isinstance(model, DistributedDataParallel):
        return DDPAccess(model, optimizer, sparse_gradients), model.module
    if sparse_gradients:
        raise ConfigError("argument 'sparse_gradients' = True: needs a DistributedDataParallel model")
    return PlainAccess(optimizer), model
