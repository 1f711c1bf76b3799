"""A DeepSpeed engine's parameter access at ZeRO stages 0-3: masks in every copy of a weight.

Zeroing the model's weights after a step is not enough at stages 1-3: the fp32 master partition
and the optimizer state would bring pruned weights back. After every step this access masks the
piece of each copy this rank owns, with the mask sliced to that piece's layout: the full tensor at
stage 0 (in bf16/fp16 also the fp32 copy of each parameter that DeepSpeed's
FP16_UnfusedOptimizer steps), the flat fp32 partition of each parameter group at stages 1/2
(located through each parameter's `_hp_mapping`, the addresses `safe_set_full_fp32_param` writes
through, without its all-reduce), and the per-rank slice `ds_tensor` at stage 3 (through the
`safe_*_local_*` API).

At stage 3 masks are held in the layout of `ds_tensor` without its padding (`PieceLayout`): mask
updates read this rank's fp32 master piece (`safe_get_local_fp32_param`) and its piece of the
reduced gradient (`safe_get_local_grad`, the average over ranks as DDP's), and select with the
sharded radix select; no weight or gradient is gathered. What moves per update: the selection's
histograms and one all-reduce of per-layer counts (kilobytes), and the bit-packed masks of the
layers DeepSpeed keeps persistent (whole on every rank, so their full mask is needed to mask them;
small by DeepSpeed's `stage3_param_persistence_threshold`).
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_local_fp32_param,
    safe_get_local_grad,
    safe_get_local_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from torch import nn

from distsparse.sparsifier.access import StepCopies
from distsparse.sparsity.layout import FullLayout, PieceLayout
from distsparse.sparsity.masks import MaskSet

__all__ = ["DeepSpeedAccess"]


def _is_state_tensor(value: Any) -> bool:
    """Element-wise optimizer state (momentum, exp_avg, ...), not a scalar such as Adam's step."""
    return torch.is_tensor(value) and value.dim() > 0


class DeepSpeedAccess:
    """The pieces of a DeepSpeed engine's masked weights this rank owns, and their copies."""

    def __init__(self, engine: Any, optimizer: torch.optim.Optimizer | None = None) -> None:
        """`optimizer`: the torch optimizer handed to deepspeed.initialize (found if omitted)."""
        self.engine = engine
        self.stage = engine.zero_optimization_stage()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        wrapper = engine.optimizer
        self.optimizer: torch.optim.Optimizer = optimizer or getattr(wrapper, "optimizer", wrapper)
        """The torch optimizer DeepSpeed steps (its parameters are flat fp32 copies at 1-3)."""
        self.copies = StepCopies(self.optimizer)
        mixed = engine.bfloat16_enabled() or engine.fp16_enabled()
        # DeepSpeed steps fp32 copies, not the model's parameters, at stages 1-3 (flat partitions)
        # and at stage 0 in bf16/fp16 (FP16_UnfusedOptimizer: one fp32 copy per parameter).
        self.flat_master = self.stage > 0 or mixed
        self.mixed = mixed
        self.fragments = self._find_fragments() if self.flat_master and self.stage < 3 else {}
        self._wrap_optimizer_step()
        self.mask_set: MaskSet | None = None
        self.owned_cache: tuple[list[torch.Tensor], dict[Any, torch.Tensor]] = ([], {})
        self.persistent_masks: dict[str, torch.Tensor] = {}

    def bind(self, masks: MaskSet) -> None:
        self.mask_set = masks
        self.owned_cache = ([], {})

    def _wrap_optimizer_step(self) -> None:
        """Let `skip_step` run DeepSpeed's step bookkeeping while the torch update does nothing."""
        self.skipping = False
        inner = self.optimizer.step

        @functools.wraps(inner)  # keeps an LR scheduler's step-order tracking
        def step(*args: Any, **kwargs: Any) -> Any:
            return None if self.skipping else inner(*args, **kwargs)

        self.optimizer.step = step

    def step(self) -> None:
        """engine.step: the optimizer update (on this rank's partition), then gradients cleared."""
        self.engine.step()

    def skip_step(self) -> None:
        """Clear the gradients through engine.step without updating weights or optimizer state."""
        self.skipping = True
        try:
            self.engine.step()
        finally:
            self.skipping = False

    def set_dense_gradients(self, needed: bool) -> None:
        """DeepSpeed always reduces whole gradients."""

    def selection_layout(self, shapes: dict[str, tuple[int, ...]]) -> FullLayout:
        """Full tensors at stages 0-2; at stage 3 the pieces `ds_tensor` holds, without padding."""
        if self.stage < 3:
            return FullLayout(shapes)
        return PieceLayout(shapes, self.rank, self.world_size, dist.all_reduce, self._all_gather)

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return parts

    def _piece(self, partition: torch.Tensor, name: str) -> torch.Tensor:
        """Stage 3: this rank's partition of a layer without the padding the last ranks carry."""
        return partition.detach().reshape(-1)[: self.mask_set.masks[name].numel()]

    def weights(self) -> dict[str, torch.Tensor]:
        """Full weights (in bf16/fp16 from the fp32 master); at stage 3 the local fp32 pieces."""
        params = self.mask_set.params
        if self.stage == 3:
            return {name: self._piece(safe_get_local_fp32_param(p), name) for name, p in params.items()}
        if not self.mixed:
            return {name: p.detach() for name, p in params.items()}
        if self.stage == 0:  # each parameter's own fp32 copy
            return {name: self.fragments[p][0] for name, p in params.items()}
        return {name: safe_get_full_fp32_param(p).reshape(p.shape) for name, p in params.items()}

    def grads(self) -> dict[str, torch.Tensor]:
        """The dense gradient (stage 3: its piece) averaged over ranks; before engine.step."""
        params = self.mask_set.params
        if self.stage == 3:
            return {name: self._piece(safe_get_local_grad(p), name).clone()
                    for name, p in params.items()}
        return {name: safe_get_full_grad(p).detach().reshape(p.shape).clone()
                for name, p in params.items()}

    @torch.no_grad()
    def mask_all_copies(self, masks: MaskSet) -> None:
        """Zero masked-off entries in this rank's piece of the weight, fp32 master and state."""
        if not self.flat_master:  # stage 0 in fp32: the torch optimizer steps the weights
            self.copies.mask(masks)
            return
        owned = self._owned_masks(masks)
        if self.stage < 3:
            masks.apply()
            for group in self.optimizer.param_groups:
                for flat in group["params"]:
                    keep = owned[flat]
                    flat.masked_fill_(~keep, 0)
                    for value in self.optimizer.state.get(flat, {}).values():
                        if _is_state_tensor(value):
                            value.masked_fill_(~keep, 0)
            return
        keys = self._state_keys()
        for name, param in masks.params.items():
            keep = owned[name]
            param.ds_tensor.masked_fill_(~keep, 0)
            if name in self.persistent_masks and param.data.numel() == param.ds_numel:
                param.data.masked_fill_(~self.persistent_masks[name].reshape(param.data.shape), 0)
            safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).masked_fill(~keep, 0))
            for key in keys:
                value = safe_get_local_optimizer_state(param, key)
                safe_set_local_optimizer_state(param, value.masked_fill(~keep, 0), key)

    def _owned_masks(self, masks: MaskSet) -> dict[Any, torch.Tensor]:
        """Masks in the layout of this rank's pieces, rebuilt when a layer's mask changes.

        Stages 1/2 (and 0 in bf16/fp16): one flat mask per fp32 copy the optimizer steps (keyed by
        that tensor), placed through `fragments`; stage 3: the mask piece padded (masked off) to
        the size of `ds_tensor` (keyed by layer name), and the full masks of persistent parameters
        gathered bit-packed (a collective, on every rank).
        """
        sources, cached = self.owned_cache
        current = list(masks.masks.values())
        if len(sources) == len(current) and all(a is b for a, b in zip(sources, current)):
            return cached
        owned: dict[Any, torch.Tensor] = {}
        if self.stage < 3:
            for flat in self._flats():
                owned[flat] = torch.ones_like(flat, dtype=torch.bool)
            for name, param in masks.params.items():
                fragment = self.fragments.get(param)
                if fragment is not None:
                    flat, lp_start, hp_start, numel = fragment
                    owned[flat].view(-1).narrow(0, hp_start, numel).copy_(
                        masks.masks[name].reshape(-1).narrow(0, lp_start, numel))
        else:
            for name, param in masks.params.items():
                keep = torch.zeros(param.ds_tensor.numel(), dtype=torch.bool,
                                   device=param.ds_tensor.device)
                keep[: masks.masks[name].numel()] = masks.masks[name]
                owned[name] = keep
            # Persistent parameters stay whole on every rank once first gathered (and are
            # re-gathered after each step), so their whole copy needs the full mask.
            persistent = {name: mask for name, mask in masks.masks.items()
                          if getattr(masks.params[name], "ds_persist", False)}
            self.persistent_masks = masks.layout.full_masks(persistent)
        self.owned_cache = (current, owned)
        return owned

    def _owned_slice(self, full: torch.Tensor, param: nn.Parameter, fill: Any) -> torch.Tensor:
        """Stage 3: this rank's slice of a full tensor, padded like `ds_tensor`."""
        size = param.ds_tensor.numel()
        flat = full.reshape(-1).to(param.ds_tensor.device)
        padded = torch.full((size * self.world_size,), fill, dtype=flat.dtype, device=flat.device)
        padded[: flat.numel()] = flat
        return padded.narrow(0, self.rank * size, size)

    def _state_keys(self) -> list[str]:
        return sorted({key for state in self.optimizer.state.values()
                       for key, value in state.items() if _is_state_tensor(value)})

    def _groups(self) -> list[list[nn.Parameter]]:
        """The model's parameters per optimizer group, as DeepSpeed grouped them."""
        return [list(group) for group in self.engine.optimizer.bit16_groups]

    def _find_fragments(self) -> dict[nn.Parameter, tuple[torch.Tensor, int, int, int]]:
        """Where each parameter's elements sit in the fp32 copies this rank steps.

        (copy, start in the flattened parameter, start in the copy, count): at stages 1/2 from
        DeepSpeed's `_hp_mapping` into the group's flat partition (parameters with no elements here
        are left out); at stage 0 in bf16/fp16 the whole per-parameter fp32 copy of the
        FP16_UnfusedOptimizer DeepSpeed wraps a torch optimizer in.
        """
        if self.stage == 0:
            wrapper = self.engine.optimizer
            return {param: (copy, 0, 0, param.numel())
                    for params, copies in zip(wrapper.fp16_groups, wrapper.fp32_groups)
                    for param, copy in zip(params, copies)}
        fragments = {}
        for group, params in zip(self.optimizer.param_groups, self._groups()):
            for param in params:
                if getattr(param, "_hp_mapping", None) is not None:
                    lp, hp = param._hp_mapping.lp_fragment_address, param._hp_mapping.hp_fragment_address
                    fragments[param] = (group["params"][0], lp.start, hp.start, lp.numel)
        return fragments

    @torch.no_grad()
    def load_optimizer_state(self, pending: Mapping[nn.Parameter, dict[str, Any]]) -> None:
        """Scatter a single-process optimizer state (keyed by model parameter) into the fp32 copies
        DeepSpeed steps (stages 1-3, and 0 in bf16/fp16)."""
        entries = next(iter(pending.values()))
        for flat in self._flats():
            self.optimizer.state[flat] = {
                key: torch.zeros_like(flat) if _is_state_tensor(value) else value.clone()
                for key, value in entries.items()
            }
        for param in self.engine.module.parameters():
            for key, value in pending.get(param, {}).items():
                if _is_state_tensor(value):
                    self._set_owned_state(param, key, value)

    def _flats(self) -> list[torch.Tensor]:
        """The flat fp32 partitions the torch optimizer steps (stage 3 lists them outside steps)."""
        if self.stage == 3:
            return list(self.engine.optimizer.fp32_partitioned_groups_flat)
        return [flat for group in self.optimizer.param_groups for flat in group["params"]]

    def _set_owned_state(self, param: nn.Parameter, key: str, full: torch.Tensor) -> None:
        if self.stage == 3:
            safe_set_local_optimizer_state(param, self._owned_slice(full.float(), param, 0.0), key)
            return
        fragment = self.fragments.get(param)
        if fragment is not None:
            flat, lp_start, hp_start, numel = fragment
            self.optimizer.state[flat][key].view(-1).narrow(0, hp_start, numel).copy_(
                full.reshape(-1).narrow(0, lp_start, numel))
