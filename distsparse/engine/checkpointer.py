"""One checkpointer over a run's stateful parts, whatever wraps the model.

A checkpoint holds the model and optimizer (written by the backend, in its wrapper's format) and
the run's other stateful parts as one dict: the Sparsifier (masks, method, step), the LR
scheduler, FLOPs, RNG, wall time and the config (torchtitan's `components/checkpointer` shape).
Each backend's `checkpointer` writes its format: `FileCheckpointer` one `last.pt` of full state
dicts (single process, DDP), DeepSpeed its own sharded tags (`engine/backends/deepspeed.py`),
FSDP2 DCP directories (`engine/backends/fsdp.py`). `find_checkpoint` reads the newest a run
directory holds, as a `SavedCheckpoint` the trainer checks, then restores around wrapping without
knowing which backend runs: the model into the bare model, the optimizer state into the optimizer
the backend builds (before or after wrapping, as the wrapper needs), the rest last.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
from torch.distributed.tensor import DTensor

from distsparse.config import BackendConfig
from distsparse.engine.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from distsparse.engine.native_checkpoint import latest_native, remove_native
from distsparse.errors import CheckpointError

__all__ = ["Checkpointer", "FileCheckpoint", "FileCheckpointer", "SavedCheckpoint",
           "ShardedCheckpointer", "find_checkpoint"]


class Checkpointer(Protocol):
    """Writes a run's checkpoints in the format of the backend that owns it."""

    def save(self, run_dir: Path, step: int, state: dict[str, Any]) -> None:
        """Write the model, the optimizer and `state` as the checkpoint of `step` (a collective)."""

    def finish(self, run_dir: Path, state: dict[str, Any]) -> None:
        """When training ends or stops: leave the model and masks where evaluation reads them."""


class ShardedCheckpointer(Checkpointer, Protocol):
    """A checkpointer whose format only its own wrapper reads (DeepSpeed's tags)."""

    def load(self, checkpoint: Any) -> dict[str, Any]:
        """Load the model and optimizer of `checkpoint` into the wrapped model (a collective);
        return the run's other state."""


class SavedCheckpoint(Protocol):
    """A checkpoint found in a run directory: checked, then restored around wrapping."""

    step: int
    config: dict[str, Any]
    source: Path

    def check(self, backend: BackendConfig, world_size: int) -> None:
        """Stop with one line unless this backend and world size can load it."""

    def restore_model(self, model: nn.Module) -> None:
        """Load what this format loads into the bare model, before wrapping."""

    def restore_optimizer(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Load what this format loads into the optimizer a backend has just built over `module`'s
        parameters (the bare model's, or the sharded ones of `fully_shard`)."""

    def restore_wrapped(self, checkpointer: ShardedCheckpointer) -> dict[str, Any]:
        """Load what this format loads through the wrapper; return the run's other state."""


@dataclass(frozen=True)
class FileCheckpoint:
    """`last.pt`: full state dicts that any backend and world size can load."""

    source: Path
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def config(self) -> dict[str, Any]:
        return self.state["config"]

    def check(self, backend: BackendConfig, world_size: int) -> None:
        """Full tensors: every backend and world size loads them."""

    def restore_model(self, model: nn.Module) -> None:
        """The model's full state dict."""
        try:
            model.load_state_dict(self.state["model"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"checkpoint {self.source} does not fit the model: {str(exc).splitlines()[0]}"
            ) from None

    def restore_optimizer(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer once a step was taken (at step 0 the current config's); full tensors are
        sliced where `fully_shard` sharded the parameters."""
        if self.step > 0:
            _load_full_optimizer_state(module, optimizer, self.state["optimizer"])

    def restore_wrapped(self, checkpointer: ShardedCheckpointer) -> dict[str, Any]:
        """Nothing more to load: the state is in the file."""
        return self.state


class FileCheckpointer:
    """Rank 0 writes `last.pt` from the full model and optimizer state dicts (single, DDP)."""

    def __init__(self, backend: Any) -> None:
        """`backend`: its `model_state_dict()`, `optimizer` and `rank` are read at each save."""
        self.backend = backend

    def save(self, run_dir: Path, step: int, state: dict[str, Any]) -> None:
        """Rank 0 writes `last.pt`; a native checkpoint left by an earlier part of the run (FSDP2
        on more ranks) is then stale and removed."""
        backend = self.backend
        full = {**state, "model": backend.model_state_dict(),
                "optimizer": backend.optimizer.state_dict()}
        if backend.rank == 0:
            save_checkpoint(full, run_dir / CHECKPOINT_NAME)
            remove_native(run_dir)

    def finish(self, run_dir: Path, state: dict[str, Any]) -> None:
        """Nothing: `last.pt` holds the model and masks."""


def _load_full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer,
                               state: dict[str, Any]) -> None:
    """A torch optimizer state dict of full tensors into `optimizer`; where its parameters are
    DTensors (`fully_shard`), keyed by parameter name and sliced to this rank's shards."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not any(isinstance(p, DTensor) for p in params):
        optimizer.load_state_dict(state)
        return
    names = {p: name for name, p in module.named_parameters()}
    fqns = [names[p] for p in params]
    keyed = {"state": {fqns[index]: value for index, value in state["state"].items()},
             "param_groups": [{**group, "params": [fqns[index] for index in group["params"]]}
                              for group in state["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, keyed,
                             options=StateDictOptions(full_state_dict=True))


def find_checkpoint(run_dir: Path) -> SavedCheckpoint:
    """The newest checkpoint of a run: a backend's own format if it wrote one (a `last.pt` written
    later removes it), else `last.pt`."""
    native = latest_native(run_dir)
    if native is not None:
        return native
    path = run_dir / CHECKPOINT_NAME
    return FileCheckpoint(path, load_checkpoint(path))
