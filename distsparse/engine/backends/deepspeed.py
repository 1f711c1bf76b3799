"""DeepSpeed ZeRO stages 0-3: masks in the model weight, the fp32 master and every optimizer state.

Zeroing the model's weights after a step is not enough at stages 1-3: the fp32 master partition
and the optimizer state would bring pruned weights back. After every step this backend masks the
piece of each copy this rank owns, with the mask sliced to that piece's layout: the full tensor at
stage 0 (in bf16/fp16 also the fp32 copy of each parameter that DeepSpeed's
FP16_UnfusedOptimizer steps), the flat fp32 partition of each parameter group at stages 1/2 (located through each
parameter's `_hp_mapping`, the addresses `safe_set_full_fp32_param` writes through, without its
all-reduce), and the per-rank slice `ds_tensor` at stage 3 (through the `safe_*_local_*` API).

At stage 3 masks are held in the layout of `ds_tensor` without its padding (`PieceLayout`): mask
updates read this rank's fp32 master piece (`safe_get_local_fp32_param`) and its piece of the
reduced gradient (`safe_get_local_grad`, the average over ranks as DDP's), and select with the
sharded radix select; no weight or gradient is gathered. What moves per update: the selection's
histograms and one all-reduce of per-layer counts (kilobytes), and the bit-packed masks of the
layers DeepSpeed keeps persistent (whole on every rank, so their full mask is needed to mask them;
small by DeepSpeed's `stage3_param_persistence_threshold`). The logged fingerprint, the summary and
checkpoints gather all masks bit-packed (numel / 8 bytes) where they are written.

Checkpoints are DeepSpeed's own: `save_checkpoint` has every rank write its shards through
`engine.save_checkpoint` (no gather of weights or optimizer state), with the trainer's state (full
masks, method, scheduler, step, RNG) as client_state, and `load_checkpoint` reads them back through
`engine.load_checkpoint` into an engine of the same stage and, at stages 1-3, the same world size
(the layout and the checks are in `distsparse.engine.native_checkpoint`). `model_state_dict`
gathers the full model one parameter at a time, for the model file evaluation and pruning read. A
single-process checkpoint (`last.pt` of a single or DDP run) still loads: its optimizer state, put
into the torch optimizer before `deepspeed.initialize`, is scattered into the partitions.
"""
from __future__ import annotations

import copy
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import deepspeed
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

from distsparse.dist.process_group import DistEnv, all_reduce
from distsparse.engine.backends.single import SingleBackend
from distsparse.errors import CheckpointError, ConfigError
from distsparse.sparsity.layout import FullLayout, PieceLayout
from distsparse.sparsity.masks import MaskSet

__all__ = ["DeepSpeedBackend", "deepspeed_config"]

_OWNED = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
          "zero_optimization.stage", "zero_allow_untested_optimizer")
_DEFAULTS: dict[str, Any] = {"gradient_clipping": 0.0, "steps_per_print": 2**31 - 1,
                             "wall_clock_breakdown": False}


def deepspeed_config(stage: int, global_batch: int, world_size: int, path: str | None) -> dict[str, Any]:
    """The DeepSpeed config: our defaults, then the JSON at `path`, then the keys distsparse owns.

    distsparse owns the batch sizes (from train.batch_size, no gradient accumulation), the ZeRO
    stage (backend.zero_stage) and zero_allow_untested_optimizer (the optimizer is train.optimizer);
    the JSON may repeat them only with the same values. The JSON may override the defaults
    (gradient_clipping 0, no step printing) and add anything else (bf16, fp16, ZeRO bucket sizes).
    """
    ours = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": global_batch // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
    }
    user = _read_json(Path(path)) if path else {}
    for key in ("optimizer", "scheduler"):
        if key in user:
            raise ConfigError(f"DeepSpeed config {path} sets '{key}': expected none "
                              "(distsparse builds them from train.*)")
    for dotted in _OWNED:
        theirs, mine = _lookup(user, dotted), _lookup(ours, dotted)
        if theirs is not None and theirs != mine:
            raise ConfigError(f"DeepSpeed config {path} sets {dotted}={theirs!r}; distsparse sets "
                              f"it to {mine!r} from its own config: remove it from the JSON")
    return _merge(_merge(copy.deepcopy(_DEFAULTS), user), ours)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise ConfigError(f"config key 'backend.deepspeed_config': {path} cannot be read") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"DeepSpeed config {path} must hold a JSON object")
    return loaded


def _lookup(tree: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, Mapping) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _mixed_precision(config: Mapping[str, Any]) -> torch.dtype | None:
    """The model dtype DeepSpeed casts to (bf16 or fp16 enabled in its config), else None."""
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if _lookup(config, f"{key}.enabled"):
            return dtype
    return None


def _is_state_tensor(value: Any) -> bool:
    """Element-wise optimizer state (momentum, exp_avg, ...), not a scalar such as Adam's step."""
    return torch.is_tensor(value) and value.dim() > 0


class DeepSpeedBackend(SingleBackend):
    """A DeepSpeed engine built from the trainer's model and torch optimizer."""

    def __init__(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, masks: MaskSet, env: DistEnv,
        config: dict[str, Any],
    ) -> None:
        """`config` is the DeepSpeed config from `deepspeed_config` (it holds the ZeRO stage)."""
        super().__init__(model, optimizer, masks)
        stage = config["zero_optimization"]["stage"]
        self.rank, self.world_size, self.stage = env.rank, env.world_size, stage
        self.groups = [list(group["params"]) for group in optimizer.param_groups]
        self.input_dtype = _mixed_precision(config)
        # DeepSpeed steps fp32 copies, not the model's parameters, at stages 1-3 (flat partitions)
        # and at stage 0 in bf16/fp16 (FP16_UnfusedOptimizer: one fp32 copy per parameter).
        self.flat_master = stage > 0 or self.input_dtype is not None
        # A state loaded from a checkpoint is keyed by the model's parameters; where DeepSpeed
        # steps flat copies it is scattered into them after initialize.
        pending = {p: optimizer.state.pop(p) for p in list(optimizer.state)} if self.flat_master else {}
        self.model, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.fragments = self._find_fragments() if self.flat_master and stage < 3 else {}
        self._wrap_optimizer_step()
        self.dense_requested, self.dense_grads = False, {}
        self.owned_cache: tuple[list[torch.Tensor], dict[Any, torch.Tensor]] = ([], {})
        self.persistent_masks: dict[str, torch.Tensor] = {}
        if pending:
            self._install_optimizer_state(pending)

    def _wrap_optimizer_step(self) -> None:
        """Let `skip_step` run DeepSpeed's step bookkeeping while the torch update does nothing."""
        self.skipping = False
        inner = self.optimizer.step

        @functools.wraps(inner)  # keeps the LR scheduler's step-order tracking
        def step(*args: Any, **kwargs: Any) -> Any:
            return None if self.skipping else inner(*args, **kwargs)

        self.optimizer.step = step

    def backward(self, loss: torch.Tensor) -> None:
        """engine.backward (gradients reduced over ranks); keeps the dense gradient if asked for."""
        self.model.backward(loss)
        self.dense_grads = {}
        if self.dense_requested and self.stage == 3:
            self.dense_grads = {name: self._piece(safe_get_local_grad(p), name).clone()
                                for name, p in self.mask_set.params.items()}
        elif self.dense_requested:
            self.dense_grads = {name: safe_get_full_grad(p).detach().reshape(p.shape).clone()
                                for name, p in self.mask_set.params.items()}

    def step(self) -> None:
        """engine.step: the optimizer update (on this rank's partition), then gradients cleared."""
        self.model.step()

    def skip_step(self) -> None:
        """Clear the gradients through engine.step without updating weights or optimizer state."""
        self.skipping = True
        try:
            self.model.step()
        finally:
            self.skipping = False

    def set_dense_gradients(self, needed: bool) -> None:
        self.dense_requested = needed

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
        if self.stage == 3:
            return {name: self._piece(safe_get_local_fp32_param(p), name)
                    for name, p in self.mask_set.params.items()}
        if self.input_dtype is None:
            return super().weights()
        if self.stage == 0:  # each parameter's own fp32 copy
            return {name: self.fragments[p][0] for name, p in self.mask_set.params.items()}
        return {name: safe_get_full_fp32_param(p).reshape(p.shape)
                for name, p in self.mask_set.params.items()}

    def grads(self) -> dict[str, torch.Tensor]:
        """The dense gradient (stage 3: its piece) averaged over ranks, from the last backward asking."""
        return self.dense_grads

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        return all_reduce(value) / self.world_size

    @torch.no_grad()
    def mask_all_copies(self, masks: MaskSet) -> None:
        """Zero masked-off entries in this rank's piece of the weight, fp32 master and state."""
        if not self.flat_master:
            super().mask_all_copies(masks)
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
        that tensor), placed through `fragments`; stage 3: the
        mask piece padded (masked off) to the size of `ds_tensor` (keyed by layer name), and the
        full masks of persistent parameters gathered bit-packed (a collective, on every rank).
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

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The full model state dict under canonical names, on the CPU.

        Stage 3 gathers one parameter at a time (a collective: call on every rank), so no rank
        ever holds more than one full parameter on the device.
        """
        module = self.model.module
        if self.stage < 3:
            return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}
        state = {}
        for key, value in module.state_dict(keep_vars=True).items():
            if hasattr(value, "ds_id"):
                with deepspeed.zero.GatheredParameters([value]):
                    state[key] = value.data.detach().cpu().clone()
            else:
                state[key] = value.detach().cpu().clone()
        return state

    def optimizer_state_dict(self) -> dict[str, Any]:
        """Not gathered: DeepSpeed writes each rank's optimizer partition in `save_checkpoint`."""
        raise NotImplementedError("a DeepSpeed optimizer state is checkpointed by save_checkpoint")

    def save_checkpoint(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Every rank writes its shards of tag `tag` under `directory` (a collective); no `latest`."""
        self.model.save_checkpoint(str(directory), tag=tag, client_state=client_state,
                                   save_latest=False)

    def load_checkpoint(self, directory: Path, tag: str) -> dict[str, Any]:
        """Load model, optimizer and engine state of tag `tag` (a collective); return client_state."""
        path, client_state = self.model.load_checkpoint(
            str(directory), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"checkpoint {directory}: DeepSpeed could not load tag {tag}")
        return client_state

    def _find_fragments(self) -> dict[nn.Parameter, tuple[torch.Tensor, int, int, int]]:
        """Where each parameter's elements sit in the fp32 copies this rank steps.

        (copy, start in the flattened parameter, start in the copy, count): at stages 1/2 from
        DeepSpeed's `_hp_mapping` into the group's flat partition (parameters with no elements here
        are left out); at stage 0 in bf16/fp16 the whole per-parameter fp32 copy of the
        FP16_UnfusedOptimizer DeepSpeed wraps a torch optimizer in.
        """
        if self.stage == 0:
            wrapper = self.model.optimizer
            return {param: (copy, 0, 0, param.numel())
                    for params, copies in zip(wrapper.fp16_groups, wrapper.fp32_groups)
                    for param, copy in zip(params, copies)}
        fragments = {}
        for group, params in zip(self.optimizer.param_groups, self.groups):
            for param in params:
                if getattr(param, "_hp_mapping", None) is not None:
                    lp, hp = param._hp_mapping.lp_fragment_address, param._hp_mapping.hp_fragment_address
                    fragments[param] = (group["params"][0], lp.start, hp.start, lp.numel)
        return fragments

    @torch.no_grad()
    def _install_optimizer_state(self, pending: Mapping[nn.Parameter, dict[str, Any]]) -> None:
        """Scatter a single-process optimizer state into DeepSpeed's flat copies."""
        entries = next(iter(pending.values()))
        for flat in self._flats():
            self.optimizer.state[flat] = {
                key: torch.zeros_like(flat) if _is_state_tensor(value) else value.clone()
                for key, value in entries.items()
            }
        for params in self.groups:
            for param in params:
                for key, value in pending.get(param, {}).items():
                    if _is_state_tensor(value):
                        self._set_owned_state(param, key, value)

    def _flats(self) -> list[torch.Tensor]:
        """The flat fp32 partitions the torch optimizer steps (stage 3 lists them outside steps)."""
        if self.stage == 3:
            return list(self.model.optimizer.fp32_partitioned_groups_flat)
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
