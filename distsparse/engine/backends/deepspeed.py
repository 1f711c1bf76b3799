"""DeepSpeed ZeRO stages 0-3: the engine around the trainer's model, its backward and checkpoints.

The masks' side of the engine (every copy of a weight at every stage, the pieces of ZeRO-3) is
`distsparse.sparsifier.deepspeed_access.DeepSpeedAccess`, this backend's `access`.

Checkpoints are DeepSpeed's own (`DeepSpeedCheckpointer`): every rank writes its shards through
`engine.save_checkpoint` (no gather of weights or optimizer state), with the trainer's state (full
masks, method, scheduler, step, RNG) as client_state, read back through `engine.load_checkpoint`
into an engine of the same stage and, at stages 1-3, the same world size (the layout and the
checks are in `distsparse.engine.native_checkpoint`). `model_state_dict` gathers the full model one
parameter at a time, for the model file evaluation and pruning read. A single-process checkpoint
(`last.pt` of a single or DDP run) still loads: its optimizer state, put into the torch optimizer
before `deepspeed.initialize`, is scattered into the partitions.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import deepspeed
import torch
from torch import nn

from distsparse.distributed.process_group import DistEnv
from distsparse.engine.backends.base import OptimizerFactory
from distsparse.engine.backends.single import SingleBackend
from distsparse.engine.native_checkpoint import (
    DEEPSPEED_DIR,
    NativeCheckpoint,
    commit_native,
    save_model_file,
    step_tag,
)
from distsparse.errors import CheckpointError, ConfigError
from distsparse.sparsifier.deepspeed_access import DeepSpeedAccess

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


class DeepSpeedBackend(SingleBackend):
    """A DeepSpeed engine built from the trainer's model and torch optimizer."""

    def __init__(
        self, model: nn.Module, optimizer_factory: OptimizerFactory, env: DistEnv,
        config: dict[str, Any],
    ) -> None:
        """`config` is the DeepSpeed config from `deepspeed_config` (it holds the ZeRO stage); the
        torch optimizer is built over the bare model before `deepspeed.initialize`."""
        super().__init__(model, optimizer_factory)
        optimizer = self.optimizer
        stage = config["zero_optimization"]["stage"]
        self.rank, self.world_size, self.stage = env.rank, env.world_size, stage
        self.input_dtype = _mixed_precision(config)
        # A state loaded from a checkpoint is keyed by the model's parameters; where DeepSpeed
        # steps fp32 copies (stages 1-3, and 0 in bf16/fp16) it is scattered into them after
        # initialize.
        steps_copies = stage > 0 or self.input_dtype is not None
        pending = {p: optimizer.state.pop(p) for p in list(optimizer.state)} if steps_copies else {}
        self.model, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.access = DeepSpeedAccess(self.model, optimizer)
        self.checkpointer = DeepSpeedCheckpointer(self)
        if pending:
            self.access.load_optimizer_state(pending)

    def backward(self, loss: torch.Tensor) -> None:
        """engine.backward: gradients reduced over ranks (engine.step clears them)."""
        self.model.backward(loss)

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



class DeepSpeedCheckpointer:
    """DeepSpeed's own sharded checkpoints in `RUN/checkpoints/deepspeed` (`native_checkpoint`).

    Every rank writes its shards through `engine.save_checkpoint` with the run's other state as
    client_state (no gather of weights or optimizer state); rank 0 then commits the tag. When
    training ends or stops, the gathered model and full masks go to `checkpoints/model.pt`, the
    single-process layout that evaluation and pruning read.
    """

    def __init__(self, backend: DeepSpeedBackend) -> None:
        self.backend = backend

    def save(self, run_dir: Path, step: int, state: dict[str, Any]) -> None:
        backend, directory, tag = self.backend, run_dir / DEEPSPEED_DIR, step_tag(step)
        backend.model.save_checkpoint(str(directory), tag=tag, client_state=state,
                                      save_latest=False)
        if backend.rank == 0:
            commit_native(directory, tag, {"step": step, "world_size": backend.world_size,
                                           "zero_stage": backend.stage, "config": state["config"]})

    def load(self, checkpoint: NativeCheckpoint) -> dict[str, Any]:
        """Model, optimizer and engine state of the tag (a collective); returns client_state."""
        path, client_state = self.backend.model.load_checkpoint(
            str(checkpoint.directory), tag=checkpoint.tag, load_optimizer_states=True,
            load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"checkpoint {checkpoint.directory}: DeepSpeed could not load "
                                  f"tag {checkpoint.tag}")
        return client_state

    def finish(self, run_dir: Path, state: dict[str, Any]) -> None:
        """Rank 0 writes the model (gathered on every rank) and masks as `checkpoints/model.pt`."""
        model = self.backend.model_state_dict()
        if self.backend.rank == 0:
            save_model_file(run_dir, state, model)
