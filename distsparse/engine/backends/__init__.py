"""Backends: single process, DDP, DeepSpeed and FSDP2 (DeepSpeed imported on use:
distsparse.engine.backends.deepspeed).

`backend_settings` checks what a backend needs from the config before anything is written;
`build_backend` wraps the model and builds its optimizer. They are the only place that chooses a
backend by name.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distsparse.config import Config
from distsparse.distributed.process_group import DistEnv
from distsparse.engine.backends.base import Backend, OptimizerFactory
from distsparse.engine.backends.ddp import DDPBackend
from distsparse.engine.backends.single import SingleBackend

__all__ = ["Backend", "DDPBackend", "OptimizerFactory", "SingleBackend", "backend_settings",
           "build_backend"]


def _wrapped_by(config: Config, world_size: int) -> str:
    """The backend that runs: any backend on one worker runs as `single`."""
    return "single" if world_size == 1 else config.backend.name


def backend_settings(config: Config, world_size: int) -> Any:
    """What the backend needs merged and checked before the run starts (DeepSpeed's JSON)."""
    if _wrapped_by(config, world_size) == "deepspeed":
        from distsparse.engine.backends.deepspeed import deepspeed_config

        backend = config.backend
        return deepspeed_config(backend.zero_stage, config.train.batch_size, world_size,
                                backend.deepspeed_config)
    return None


def build_backend(config: Config, model: nn.Module, optimizer_factory: OptimizerFactory,
                  env: DistEnv, device: torch.device, settings: Any,
                  sparse_gradients: bool) -> Backend:
    """Wrap the model as `config.backend` says (`settings` from `backend_settings`) and build its
    optimizer with `optimizer_factory` (over the bare model, or after FSDP2 sharded it).

    `sparse_gradients`: DDP all-reduces only active gradient entries between growth steps.
    FSDP2 computes in bf16 on a GPU (`default_mixed_precision`), unless train.dtype=float64.
    """
    name = _wrapped_by(config, env.world_size)
    if name == "single":
        return SingleBackend(model, optimizer_factory)
    if name == "fsdp":
        from distsparse.engine.backends.fsdp import FSDPBackend, default_mixed_precision

        exact = config.train.dtype == "float64"
        return FSDPBackend(model, optimizer_factory, env, device,
                           None if exact else default_mixed_precision(device))
    if device.type == "cuda" and config.backend.sync_batchnorm:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if name == "deepspeed":
        from distsparse.engine.backends.deepspeed import DeepSpeedBackend

        return DeepSpeedBackend(model, optimizer_factory, env, settings)
    return DDPBackend(model, optimizer_factory, env, device, sparse_gradients)
