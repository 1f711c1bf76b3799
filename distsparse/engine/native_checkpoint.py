"""The backends' native checkpoints in a run directory: layout, `latest`, sidecar, checks, DCP I/O.

Two formats, one layout: a directory of tags (`step_000000042`), each written by every rank, a
sidecar `distsparse.json` (step, world size, config; DeepSpeed also its ZeRO stage) and `latest`
naming the newest complete tag.
- DeepSpeed (`RUN/checkpoints/deepspeed/`, the save_dir of `engine.save_checkpoint`): every rank's
  shards and DeepSpeed's model-states file, which holds the trainer's client_state (masks, method,
  scheduler, step, RNG, FLOPs, config). Only a DeepSpeed engine of the same stage reads it.
- FSDP2 (`RUN/checkpoints/fsdp/`): a `torch.distributed.checkpoint` (DCP) directory per tag, every
  rank's shards of the model and optimizer state keyed by parameter name, and the client state in
  `client_state.pt` (rank 0). DCP re-slices by global index on load, so any backend and world size
  reads it: the model into the bare model before wrapping, the optimizer state into the optimizer
  the backend builds (plain or sharded by `fully_shard`).
After every rank has written the tag, rank 0 writes the sidecar into it, then points `latest` at it
(both by rename), then removes the older tags. DeepSpeed's own `latest` is not used: rank 0 writes
it before the other ranks finish and not atomically. So a crash at any point leaves `latest`
naming a complete tag, and the checks on resume read only small JSON files.
This module imports neither DeepSpeed nor the trainer: evaluation and launchers use it too.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from distsparse.config import BackendConfig
from distsparse.engine.checkpoint import (
    MODEL_NAME,
    load_checkpoint,
    save_checkpoint,
    write_atomically,
)
from distsparse.errors import CheckpointError

__all__ = ["CLIENT_STATE", "DCPCheckpoint", "DEEPSPEED_DIR", "FSDP_DIR", "NativeCheckpoint",
           "check_native_resume", "commit_native", "latest_native", "load_dcp_model",
           "load_dcp_optimizer", "read_dcp_client_state", "remove_native", "save_dcp",
           "save_model_file", "step_tag"]

DEEPSPEED_DIR = "checkpoints/deepspeed"
"""Where a DeepSpeed run directory keeps DeepSpeed's own checkpoints."""
FSDP_DIR = "checkpoints/fsdp"
"""Where an FSDP2 run directory keeps its DCP checkpoints."""
CLIENT_STATE = "client_state.pt"
"""The file of a DCP checkpoint directory that holds the client state (rank 0 writes it)."""
SIDECAR = "distsparse.json"
_TAG_PREFIX = "step_"
_GROUPS = "optimizer_groups"
"""Client-state key of the optimizer's hyperparameters where the DCP files hold no state."""


@dataclass(frozen=True)
class NativeCheckpoint:
    """The newest complete DeepSpeed checkpoint of a run, as its sidecar describes it."""

    directory: Path
    tag: str
    step: int
    world_size: int
    zero_stage: int
    config: dict[str, Any]

    @property
    def source(self) -> Path:
        return self.directory / self.tag

    def check(self, backend: BackendConfig, world_size: int) -> None:
        """`check_native_resume` with this run's backend keys."""
        check_native_resume(self, backend.name, world_size, backend.zero_stage)

    def restore_model(self, model: nn.Module) -> None:
        """Nothing: DeepSpeed loads its shards into the engine."""

    def restore_optimizer(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Nothing: DeepSpeed loads its shards into the engine."""

    def restore_wrapped(self, checkpointer: Any) -> dict[str, Any]:
        """Model, optimizer and engine state through the DeepSpeed backend's checkpointer."""
        return checkpointer.load(self)


@dataclass(frozen=True)
class DCPCheckpoint:
    """The newest complete FSDP2 (DCP) checkpoint of a run: any backend and world size loads it."""

    directory: Path
    tag: str
    step: int
    world_size: int
    config: dict[str, Any]

    @property
    def source(self) -> Path:
        return self.directory / self.tag

    def check(self, backend: BackendConfig, world_size: int) -> None:
        """Nothing to refuse: DCP re-slices every tensor by global index for the new ranks."""

    def restore_model(self, model: nn.Module) -> None:
        """The full model into the bare model (each rank reads every shard it needs)."""
        load_dcp_model(self.source, model)

    def restore_optimizer(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer state, sliced to `module`'s parameters (once a step was taken: at step 0
        the current config's)."""
        if self.step > 0:
            load_dcp_optimizer(self.source, module, optimizer)

    def restore_wrapped(self, checkpointer: Any) -> dict[str, Any]:
        """The client state (masks, method, scheduler, step, RNG, FLOPs, config)."""
        return read_dcp_client_state(self.source)


def step_tag(step: int) -> str:
    """The tag of the checkpoint written after `step` optimizer steps."""
    return f"{_TAG_PREFIX}{step:09d}"


def latest_native(run_dir: Path) -> NativeCheckpoint | DCPCheckpoint | None:
    """The newest checkpoint a `latest` names (DeepSpeed's or FSDP2's), or None when the run has
    none; CheckpointError if a sidecar is unreadable."""
    found: list[NativeCheckpoint | DCPCheckpoint] = []
    for name in (DEEPSPEED_DIR, FSDP_DIR):
        directory = Path(run_dir) / name
        latest = directory / "latest"
        if not latest.is_file():
            continue
        tag = latest.read_text(encoding="utf-8").strip()
        try:
            record = json.loads((directory / tag / SIDECAR).read_text(encoding="utf-8"))
            common = (directory, tag, int(record["step"]), int(record["world_size"]))
            config = dict(record["config"])
            found.append(NativeCheckpoint(*common, int(record["zero_stage"]), config)
                         if name == DEEPSPEED_DIR else DCPCheckpoint(*common, config))
        except (OSError, ValueError, KeyError, TypeError):
            raise CheckpointError(
                f"checkpoint {directory}: {tag}/{SIDECAR} is missing or corrupt") from None
    return max(found, key=lambda checkpoint: checkpoint.step, default=None)


def check_native_resume(checkpoint: NativeCheckpoint, backend: str, world_size: int,
                        zero_stage: int) -> None:
    """Stop with one line unless this run can load a DeepSpeed `checkpoint` exactly as written.

    DeepSpeed cannot re-partition ZeRO 1-3 optimizer state for another data-parallel world size,
    and only a DeepSpeed engine of the same stage reads the shard layout; at stage 0 every file
    holds full tensors, so any world size above 1 loads it.
    """
    written = (f"checkpoint {checkpoint.directory} was written by {checkpoint.world_size} ranks at "
               f"ZeRO stage {checkpoint.zero_stage}")
    if backend != "deepspeed":
        raise CheckpointError(f"{written}; resume with backend.name=deepspeed (got {backend})")
    if zero_stage != checkpoint.zero_stage:
        raise CheckpointError(f"{written}; resume with backend.zero_stage={checkpoint.zero_stage} "
                              f"(got {zero_stage})")
    if world_size == 1 or (checkpoint.zero_stage > 0 and world_size != checkpoint.world_size):
        raise CheckpointError(f"{written}; resume with --nproc {checkpoint.world_size} (got {world_size})")


def commit_native(directory: Path, tag: str, record: dict[str, Any]) -> None:
    """Rank 0, once every rank has written `tag`: its sidecar, then `latest`, then older tags go."""
    write_atomically(directory / tag / SIDECAR, lambda file: file.write(json.dumps(record).encode()))
    write_atomically(directory / "latest", lambda file: file.write(tag.encode()))
    for entry in directory.iterdir():
        if entry.is_dir() and entry.name.startswith(_TAG_PREFIX) and entry.name != tag:
            shutil.rmtree(entry)


def remove_native(run_dir: Path) -> None:
    """Rank 0, once a newer `last.pt` is written: the native checkpoints and the model file they
    ended with are stale; `latest` goes first, so a crash leaves either format whole."""
    stale = [Path(run_dir) / name for name in (DEEPSPEED_DIR, FSDP_DIR)
             if (Path(run_dir) / name).is_dir()]
    for directory in stale:
        (directory / "latest").unlink(missing_ok=True)
        shutil.rmtree(directory)
    if stale:
        (Path(run_dir) / MODEL_NAME).unlink(missing_ok=True)


def save_model_file(run_dir: Path, state: dict[str, Any], model: dict[str, torch.Tensor]) -> None:
    """`checkpoints/model.pt`: the full model and masks a sharded run ended with, in the
    single-process layout evaluation, pruning and export read without the wrapper."""
    save_checkpoint({"config": state["config"], "step": state["step"], "model": model,
                     "masks": state["masks"]}, Path(run_dir) / MODEL_NAME)


def save_dcp(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             client_state: dict[str, Any], rank: int) -> None:
    """Every rank writes its shards of model and optimizer state under `directory` (DCP), rank 0
    the client state: a collective; `directory` appears, or is replaced, only once all are written.

    A fresh optimizer (no state yet) saves only its hyperparameters: DCP's optimizer state dict
    would first create its state with a zero-gradient step, which changes what the next real step
    does (SGD's momentum buffer starts as weight_decay * w, Adam's step count at 1).
    """
    staging = directory.with_name(f".{directory.name}.partial")
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash
        staging.mkdir(parents=True)
    dist.barrier()
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    groups = None
    if optimizer.state:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    else:
        groups = [{key: value for key, value in group.items() if key != "params"}
                  for group in optimizer.param_groups]
    dcp.save(state, checkpoint_id=staging)
    if rank == 0:
        save_checkpoint({**client_state, _GROUPS: groups}, staging / CLIENT_STATE)
    dist.barrier()
    if rank == 0:
        previous = directory.with_name(f".{directory.name}.previous")
        if directory.exists():
            directory.rename(previous)
        staging.rename(directory)
        shutil.rmtree(previous, ignore_errors=True)
    dist.barrier()


def _check_complete(directory: Path) -> None:
    if not (directory / ".metadata").is_file() or not (directory / CLIENT_STATE).is_file():
        raise CheckpointError(f"checkpoint {directory} is not a complete DCP checkpoint "
                              f"(expected .metadata and {CLIENT_STATE})")


def _client_file(directory: Path) -> dict[str, Any]:
    """The client state file; without `optimizer_groups` (written before it existed) the DCP
    files hold the optimizer state."""
    _check_complete(directory)
    state = load_checkpoint(directory / CLIENT_STATE, required=())
    state.setdefault(_GROUPS, None)
    return state


def read_dcp_client_state(directory: Path) -> dict[str, Any]:
    """The client state of a DCP checkpoint directory; CheckpointError names it if incomplete."""
    state = _client_file(Path(directory))
    for key in ("format", _GROUPS):
        state.pop(key)
    return state


def load_dcp_model(directory: Path, model: nn.Module) -> None:
    """The checkpoint's model into `model`, plain or sharded by `fully_shard` (a collective where
    a process group exists); CheckpointError names the directory when it does not fit."""
    _check_complete(Path(directory))
    state = {"model": get_model_state_dict(model)}
    try:
        dcp.load(state, checkpoint_id=directory, no_dist=not dist.is_initialized())
    except Exception as exc:  # DCP raises CheckpointException, RuntimeError, KeyError ...
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {directory} does not fit the model ({detail})") from None
    set_model_state_dict(model, state["model"])


def load_dcp_optimizer(directory: Path, module: nn.Module,
                       optimizer: torch.optim.Optimizer) -> None:
    """The checkpoint's optimizer state into `optimizer` over `module`'s parameters (plain or
    sharded), or only its hyperparameters where none was saved (a collective)."""
    groups = _client_file(Path(directory))[_GROUPS]
    if groups is not None:
        for group, saved in zip(optimizer.param_groups, groups, strict=True):
            group.update(saved)
        return
    state = {"optimizer": get_optimizer_state_dict(module, optimizer)}
    dcp.load(state, checkpoint_id=directory, no_dist=not dist.is_initialized())
    set_optimizer_state_dict(module, optimizer, state["optimizer"])
